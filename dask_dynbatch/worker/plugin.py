"""The worker half: its handlers, its model servers, its memory watch and its heartbeat.

Installed on every current and future worker by :class:`~dask_dynbatch.DynBatchPlugin`. Shipments
arrive by direct RPC from clients (``dynbatch_run``, see :mod:`dask_dynbatch.protocol`); no Dask
task is created for them. Each (model, version) gets one :class:`~dask_dynbatch.worker.server.ModelServer`,
loaded once (concurrent first shipments wait for one load) and shared by every client. A batch that
runs far past its time is stuck: the :mod:`~dask_dynbatch.worker.watchdog` hands every row back
and has the worker restarted.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import pickle
import threading
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import dask
from distributed import WorkerPlugin
from distributed.protocol import to_serialize
from tornado.ioloop import PeriodicCallback

from .. import protocol
from .._compat import call_as_worker
from ..core.memory import MemorySizer
from ..core.service import DeviceTurns
from ..core.tree import Structure
from ..protocol import ModelSuperseded, PartsLost, ShipmentReply, WorkerRestarting, error_reply, raise_if_error, unwrap
from ..shm import ReplyFiles, ShmAttachments, ShmUnavailable
from .compile import warm_in_subprocess
from .intake import assemble_keyed, assemble_keyed_tree, inline_arrays, tree_from_slot
from .model import LoadedModel, choose_device, visible_gpu_count
from .server import ModelServer, Shipment
from .staging import pin_host_memory, tune_malloc_for_inference
from .telemetry import CachedMemorySource, detect_memory_source, device_telemetry
from .watchdog import CHECK_INTERVAL, DeviceThread, Watchdog, execution_clock

if TYPE_CHECKING:
    from distributed import Worker

logger = logging.getLogger(__name__)

#: how often the worker reads free device memory to detect changes (seconds)
MEMORY_POLL_INTERVAL = 0.1
#: seconds a shipment answered in parts waits, once every row ran, for its client to collect the
#: last part before it is dropped (the client is gone)
PARTS_TTL = 60.0


class _Parts:
    """A shipment answered in parts, between the client's calls."""

    def __init__(self, server: ModelServer, shipment: Shipment, received: float):
        self.server = server
        self.shipment = shipment
        self.received = received
        self.touched = time.monotonic()



class DynBatchWorkerPlugin(WorkerPlugin):
    """Worker half of dask-dynbatch (installed by the scheduler plugin; not registered by users)."""

    name = protocol.PLUGIN_NAME
    idempotent = True

    def __init__(self, tune_malloc: bool = True, memory_budget: float | int | None = None,
                 safety_margin: float = 0.1, min_change: float = 0.05,
                 safety_margin_max: int | str | None = "1 GiB"):
        self.tune_malloc = tune_malloc
        self.memory_budget = memory_budget
        self.safety_margin = safety_margin
        self.safety_margin_max = None if safety_margin_max is None else dask.utils.parse_bytes(safety_margin_max)
        self.min_change = min_change

    # -- lifecycle ---------------------------------------------------------------------------------
    def setup(self, worker: Worker) -> None:
        self.worker = worker
        self.servers: dict[tuple[str, int], ModelServer] = {}
        self.loads: Counter[tuple[str, int]] = Counter()  # model loads on this worker, per version
        self._load_locks: dict[tuple[str, int], asyncio.Lock] = {}
        # one thread per device: its batches run one after another while the event loop receives
        # the next shipments; GPU batches are staged in a transfer thread meanwhile
        self.device_threads: dict[str, DeviceThread] = {}
        # when each device last finished a batch of any of its models: a batch's time on the device
        # starts there (core/service.py)
        self.device_turns: defaultdict[str, DeviceTurns] = defaultdict(DeviceTurns)
        self.stager = ThreadPoolExecutor(1, thread_name_prefix="dynbatch-stage")
        # waits for a GPU batch's outputs to reach host memory while the device thread goes on (a
        # daemon thread: a hung GPU holds it, and it must not hold up a restart)
        self.copier = DeviceThread("dynbatch-copy-out")
        self.shm = ShmAttachments()  # shared-memory slots of clients on this host
        # large replies to clients on this host that ask for it go back through shared memory,
        # written off the event loop
        self.replies = ReplyFiles()
        self.reply_writer = ThreadPoolExecutor(2, thread_name_prefix="dynbatch-reply")
        # shipments answered in parts (padded or weighed rows run over several device batches): the
        # client collects each part as its rows' batches finish
        self.parts: dict[str, _Parts] = {}
        # tokens of this process only: a client asking a worker that restarted at the same address
        # must not collect another shipment's rows
        self._part_prefix = f"{uuid.uuid4().hex[:12]}-"
        self._part_tokens = itertools.count(1)
        self._pin_slots = bool(dask.config.get("dynbatch.transport.page-lock", True))
        self.gpu_count = visible_gpu_count()
        self.malloc_tuned = tune_malloc_for_inference() if self.tune_malloc else False
        self.sizers: dict[str, MemorySizer] = {}
        # a per-worker budget (two workers sharing one GPU) comes from the worker's own config:
        # DASK_DYNBATCH__MEMORY_BUDGET=0.3
        budget = dask.config.get("dynbatch.memory-budget", None)
        self.budget = float(budget) if budget is not None else self.memory_budget
        self.benchmark: dict[str, Any] | None = None
        if dask.config.get("dynbatch.benchmark.on-start", False):
            self._device_thread("cuda:0" if self.gpu_count else "cpu").submit(self._run_benchmark)
        self._poller = PeriodicCallback(self._poll_memory, MEMORY_POLL_INTERVAL * 1000)
        self._poller.start()
        self.watchdog = Watchdog(worker, lambda: self.servers.values())
        self._watch = PeriodicCallback(self.watchdog.check, CHECK_INTERVAL * 1000)
        self._watch.start()
        worker.handlers.update({
            protocol.RUN: self.run,
            protocol.COLLECT: self.collect,
            protocol.UNLOAD: self.unload,
            protocol.SHM_DROP: self.drop_shm,
            protocol.BENCHMARK: self.rerun_benchmark,
            protocol.SERVER_STATE: self.server_states,
        })
        worker.extensions[protocol.PLUGIN_NAME] = self
        # pushed to clients: a worker that can serve is ready now, not at their next refresh
        worker.log_event(protocol.CLUSTER_TOPIC, {"action": "ready", "worker": worker.address,
                                                  "device": "cuda" if self.gpu_count else "cpu"})

    def teardown(self, worker: Worker) -> None:
        self._poller.stop()
        self._watch.stop()
        for server in self.servers.values():
            server.close()
        for op in (protocol.RUN, protocol.COLLECT, protocol.UNLOAD, protocol.BENCHMARK, protocol.SERVER_STATE):
            worker.handlers.pop(op, None)
        worker.extensions.pop(protocol.PLUGIN_NAME, None)
        for executor in (*self.device_threads.values(), self.stager, self.copier, self.reply_writer):
            executor.shutdown(wait=False, cancel_futures=True)
        self.replies.close()
        # dynbatch_shm_drop stays: the scheduler asks every worker to drop a leaving client's
        # slots, also one that is closing; with the mappings closed here it drops nothing
        self.shm.close()

    # -- shipments --------------------------------------------------------------------------------
    async def run(self, model: str, version: int, client: str, n: int, batch: Any = None,
                  shm: dict[str, Any] | None = None, keyed: list[tuple[int, Any]] | None = None,
                  signature: tuple[tuple[int, ...], str] | None = None,
                  priorities: list[tuple[int, int]] | None = None, queued_s: float = 0.0,
                  new_slot: bool = False, shm_drop: list[str] | None = None, isolate: bool = False,
                  reply_shm: bool = False, parts: bool = False) -> dict[str, Any]:
        """Handler ``dynbatch_run``: serve one shipment of ``n`` rows of ``model`` version ``version``.

        Rows come inline in ``batch`` (stacked, or a list of stacked chunks), in the shared-memory
        slot ``shm`` of ``client`` (``name``, ``shape``, ``dtype``; same host, see
        :mod:`dask_dynbatch.shm`), and as Dask Futures ``keyed`` (``(row, key)``) that must match
        ``signature``. ``priorities``: ``(first row, priority)`` runs; ``queued_s``: how long the
        oldest row waited in the client; ``new_slot``: the slot is used for the first time;
        ``shm_drop``: slots the client retired; ``isolate``: run these rows in device batches of their
        own (suspects after a worker died); ``reply_shm``: the client is on this host and reads
        large replies from shared memory; ``parts``: answer with the first rows that have results
        and let the client collect the rest (``dynbatch_collect``), rather than once every row has.
        Returns a :class:`~dask_dynbatch.protocol.ShipmentReply`,
        or an error reply: the slot cannot be mapped (nothing ran), the version was replaced, the
        worker restarts (nothing ran), the model failed to load, an input was lost."""
        if self.watchdog.restarting is not None:
            return error_reply(WorkerRestarting(self.worker.address))
        self.watchdog.active_runs += 1
        try:
            return await self._serve(model, version, client, n, batch, shm, keyed, signature, priorities, queued_s,
                                     new_slot, shm_drop, isolate, reply_shm, parts)
        finally:
            self.watchdog.active_runs -= 1

    async def _serve(self, model, version, client, n, batch, shm, keyed, signature, priorities, queued_s, new_slot,
                     shm_drop, isolate, reply_shm, parts) -> dict[str, Any]:
        received = time.perf_counter()
        if shm_drop:
            self.shm.drop(client, shm_drop)
        try:
            arrays: list[Any] = inline_arrays(batch)
            if shm is not None and "tree" in shm:
                arrays = [tree_from_slot(self.shm.array, client, shm, n - len(keyed or ()))]
            elif shm is not None:
                arrays = [self.shm.array(client, shm["name"], shm["shape"], shm["dtype"])]
            carried = sum(len(a) for a in arrays)
            if carried != n - len(keyed or ()):  # never leave a request without its answer
                raise ValueError(f"the shipment of {n} rows carries {carried} inline and {len(keyed or ())} "
                                 "from Dask Futures")
            server = await self.server_for(model, version)
            shipment = await self._shipment(client, n, arrays, keyed, signature, priorities, queued_s, new_slot,
                                             slot=shm["name"] if shm is not None else None, isolate=isolate)
            if self.watchdog.restarting is not None:  # a batch got stuck while this one was taken in
                raise WorkerRestarting(self.worker.address)
            try:
                server.start(shipment)
                await (shipment.news() if parts else shipment.done)
            finally:
                server.check_retired()
        except (ShmUnavailable, ModelSuperseded, WorkerRestarting) as exc:  # expected: the client re-sends
            return error_reply(exc)
        except Exception as exc:  # the shipment could not run at all
            logger.warning("dynbatch: shipment of %d rows of model %r failed: %r", n, model, exc)
            return error_reply(exc)
        return await self._reply(server, shipment, reply_shm, received)

    async def collect(self, token: str, client: str, reply_shm: bool = False) -> dict[str, Any]:
        """Handler ``dynbatch_collect``: the next part of the reply to ``client``'s shipment answered
        in parts (``token``: its reply's ``more``), once some of its rows have results not sent yet,
        or its last part once every row has. ``reply_shm`` as for ``dynbatch_run``. An error reply
        :class:`~dask_dynbatch.protocol.PartsLost`: this process does not hold that shipment (or a
        process before it at this address gave the token)."""
        entry = self.parts.get(token)
        if entry is None or entry.shipment.client != client:
            restarted = not token.startswith(self._part_prefix)
            return error_reply(PartsLost(self.worker.address, token, restarted=restarted))
        self.watchdog.active_runs += 1  # (until its reply is out, as for dynbatch_run)
        try:
            await entry.shipment.news()
            return await self._reply(entry.server, entry.shipment, reply_shm, entry.received, token)
        finally:
            self.watchdog.active_runs -= 1

    async def _reply(self, server: ModelServer, shipment: Shipment, reply_shm: bool, received: float,
                     token: str | None = None) -> dict[str, Any]:
        """The reply to ``shipment`` with the results not sent yet: the last one (every row has its
        result: timings, device batches, rows stuck or not run), or a part (``more``: the token the
        client collects the next part with)."""
        final = shipment.done.done()
        pieces, errors = shipment.take()
        if not final and token is None:  # the first part: the shipment waits here for the next calls
            token = f"{self._part_prefix}{next(self._part_tokens)}"
            self.parts[token] = _Parts(server, shipment, received)
            self.watchdog.active_runs += 1  # a restart waits for the stuck rows' reply to go out
        elif final and token is not None and self.parts.pop(token, None) is not None:
            self.watchdog.active_runs -= 1
        entry = self.parts.get(token) if token is not None else None
        if entry is not None:
            entry.touched = time.monotonic()
        loaded = server.loaded
        reply_file = await self._write_reply(pieces) if reply_shm and pieces else None
        common: dict[str, Any] = {
            "pieces": [(rows, None if reply_file is not None else to_serialize(outputs)) for rows, outputs in pieces],
            "reply_file": reply_file,
            "errors": [(row, error_reply(exc)) for row, exc in sorted(errors.items())],
            "advice": server.advice().to_msg(),
            "version": server.version,
            "device": server.device,
        }
        if not final:
            return ShipmentReply(**common, batches=[], more=token).to_msg()
        return ShipmentReply(
            **common,
            batches=[record.to_msg() for record in shipment.records],
            compute_s=shipment.compute_s,
            stage_s=shipment.stage_s,
            wait_s=shipment.wait_s,
            worker_s=time.perf_counter() - received,
            cold=shipment.cold,
            compile=loaded.compile_summary() if loaded.spec.compile else None,
            unrun=sorted(shipment.unrun),
            stuck=sorted(shipment.stuck),
            stuck_limit=shipment.stuck_limit,
        ).to_msg()

    async def _write_reply(self, pieces: list[tuple[list[int], Any]]) -> dict[str, Any] | None:
        """Write the pieces' outputs to a shared-memory reply file; None: the comm carries them."""
        written = None
        try:
            written = self.reply_writer.submit(self.replies.write, [outputs for _, outputs in pieces],
                                               int(dask.config.get("dynbatch.transport.shared-memory-min-bytes",
                                                                   65536)))
            return await asyncio.wrap_future(written)
        except asyncio.CancelledError:
            if written is None or not written.cancelled():
                raise  # the handler itself is cancelled
            return None  # (a write cancelled as the worker closes: the comm carries the reply)
        except Exception as exc:  # (the worker closes, its writer is shut down): the comm carries it
            logger.debug("dynbatch: reply not written to shared memory: %r", exc)
            return None

    def _expire_parts(self, now: float) -> None:
        """Drop shipments answered in parts whose last part nobody collected (their client is gone)."""
        for token, entry in list(self.parts.items()):
            if entry.shipment.done.done() and now - entry.touched > PARTS_TTL:
                del self.parts[token]
                self.watchdog.active_runs -= 1

    async def _shipment(self, client, n, arrays, keyed, signature, priorities, queued_s, new_slot, slot, isolate):
        index = errors = None
        if keyed:
            data = await self._fetch(list({key for _, key in keyed}))
            signature = unwrap(signature)
            if isinstance(signature, Structure):
                joined, index, errors = assemble_keyed_tree(n, arrays, keyed, data, signature)
            else:
                joined, index, errors = assemble_keyed(n, arrays, keyed, data, signature)
            arrays = [joined] if joined is not None and len(joined) else []
            slot = None  # the rows were copied out of the slot
        return Shipment(client, n, arrays, index=None if index is not None and len(index) == n else index,
                        errors=errors, priorities=priorities, queued_s=queued_s, new_slot=new_slot, slot=slot,
                        isolate=isolate)

    async def _fetch(self, keys: list) -> dict:
        """Values of Dask Futures given as inputs, from this worker's memory or its peers."""
        from distributed import Future

        data = {k: self.worker.data[k] for k in keys if k in self.worker.data}
        missing = [k for k in keys if k not in data]
        if missing:
            client = self.worker.client
            futures = [Future(k, client) for k in missing]
            try:
                values = await client.gather(futures, asynchronous=True)
            except Exception as exc:
                raise KeyError(f"inputs no longer available on the cluster: {sorted(map(str, missing))} ({exc!r})") from exc
            data.update(zip(missing, values))
        return data

    # -- model servers ----------------------------------------------------------------------------
    async def server_for(self, name: str, version: int) -> ModelServer:
        """The server of ``name`` at ``version``, loading the model on first use (one load, however
        many shipments ask at once). A version older than one this worker serves is superseded."""
        server = self.servers.get((name, version))
        if server is not None and not server.retiring:
            return server
        newest = max((v for (n, v) in self.servers if n == name), default=None)
        if server is not None or (newest is not None and version < newest):
            raise ModelSuperseded(name, newest)
        lock = self._load_locks.setdefault((name, version), asyncio.Lock())
        async with lock:
            server = self.servers.get((name, version))
            if server is None:
                server = await self._load(name, version)
        self._load_locks.pop((name, version), None)
        if server.retiring:
            raise ModelSuperseded(name, max(v for (n, v) in self.servers if n == name))
        return server

    async def _load(self, name: str, version: int) -> ModelServer:
        reply = raise_if_error(await self.worker.scheduler.dynbatch_get_model(name=name, version=version))
        spec = pickle.loads(reply["payload"])
        device = choose_device(spec, self.gpu_count)
        sizer = self.sizer_for(device)
        warm = None
        if dask.config.get("dynbatch.compile.warm-in-subprocess", True):
            warm = functools.partial(warm_in_subprocess, reply["payload"], device)
        loaded = await asyncio.get_running_loop().run_in_executor(
            self._device_thread(device), call_as_worker, self.worker, LoadedModel, spec, device, version,
            self._compile_submit, functools.partial(self._compile_reserve, name, device), warm,
        )
        self.device_turns[device].occupied_until(time.monotonic())  # the load held the device thread
        self.loads[(name, version)] += 1
        server = ModelServer(loaded, sizer, self._device_thread(device), self.stager,
                             call_as_worker=functools.partial(call_as_worker, self.worker), pin_slot=self._pin_slot,
                             on_retired=self._drop, clock=execution_clock(spec), copier=self.copier,
                             turns=self.device_turns[device])
        self.servers[(name, version)] = server
        logger.info("dynbatch: loaded model %r version %d on %s in %.2fs", name, version, device, loaded.load_seconds)
        for (other, v), old in list(self.servers.items()):
            if other == name and v < version:
                old.retire()
        return server

    def _drop(self, server: ModelServer) -> None:
        if self.servers.get((server.name, server.version)) is server:
            del self.servers[(server.name, server.version)]
            server.close()
            logger.info("dynbatch: unloaded model %r version %d", server.name, server.version)

    def unload(self, names: list[str], below: int | None = None) -> list[str]:
        """Handler ``dynbatch_unload``: retire the servers of ``names`` (only versions below
        ``below`` when given: a newer one replaced them). Shipments already here are served first."""
        retired = []
        for (name, version), server in list(self.servers.items()):
            if name in names and (below is None or version < below):
                server.retire()
                retired.append(name)
        return retired

    def _device_thread(self, device: str) -> DeviceThread:
        executor = self.device_threads.get(device)
        if executor is None:
            executor = self.device_threads[device] = DeviceThread(f"dynbatch-{device}")
        return executor

    def _compile_submit(self, fn) -> None:
        """ModelSpec(compile=...): buckets compile in a background thread while the device thread
        serves. A daemon thread, so that a compile in progress never holds up the worker's exit."""
        threading.Thread(target=call_as_worker, args=(self.worker, fn), name="dynbatch-compile", daemon=True).start()

    def _compile_reserve(self, name: str, device: str, rows: int):
        """Device memory for a warm-up batch of ``rows`` (None: no room now, try later)."""
        return self.sizers[device].try_reserve(name, rows)

    def _pin_slot(self, shipment: Shipment) -> bool:
        """Page-lock a client's slot for the GPU once (its batches then go to the device straight
        out of shared memory, one copy fewer); after a refusal, never again on this worker."""
        if not self._pin_slots:
            return False
        if self.shm.pin(shipment.client, shipment.slot, pin_host_memory):
            return True
        self._pin_slots = False
        return False

    def drop_shm(self, client: str, names: list[str] | None = None) -> int:
        """Handler ``dynbatch_shm_drop``: unmap a client's shared-memory slots (``names``, or all:
        the client left). Returns how many were mapped."""
        return self.shm.drop(client, names)

    # -- memory -----------------------------------------------------------------------------------
    def sizer_for(self, device: str) -> MemorySizer:
        """The memory sizer of a device, shared by every model on it."""
        sizer = self.sizers.get(device)
        if sizer is None:
            # one reading serves every question a batch asks; host RAM (psutil reads /proc) changes slowly
            max_age = 0.005 if device.startswith("cuda") else 0.05
            source = CachedMemorySource(
                detect_memory_source(device, memory_limit=self.worker.memory_manager.memory_limit), max_age=max_age
            )
            sizer = self.sizers[device] = MemorySizer(
                source, safety_margin=self.safety_margin, safety_margin_max=self.safety_margin_max,
                budget=self.budget, min_change=self.min_change,
            )
        return sizer

    def advice(self) -> list[dict[str, Any]]:
        """Every server's advice now."""
        return [{"name": s.name, "version": s.version, **s.advice(refresh=True).to_msg()} for s in self.servers.values()]

    def _poll_memory(self) -> None:
        """Re-plan event: free memory moved by more than the threshold -> push new advice at once."""
        self._expire_parts(time.monotonic())
        try:  # (reply files no client came for: unlinked here also while none are written)
            self.replies.sweep()
        except OSError:
            logger.debug("dynbatch: reply files not swept", exc_info=True)
        changed = False
        for sizer in self.sizers.values():
            try:
                changed |= sizer.poll()
            except Exception:  # telemetry is best effort
                logger.debug("dynbatch: memory poll failed", exc_info=True)
        if changed and self.servers:
            self.worker.log_event(protocol.ADVICE_TOPIC, {"worker": self.worker.address, "advice": self.advice()})

    # -- reporting --------------------------------------------------------------------------------
    def heartbeat(self) -> dict[str, Any]:
        """Sent with every heartbeat to the scheduler extension's ``heartbeat(ws, data)``."""
        return {
            "device": "cuda" if self.gpu_count else "cpu",
            "malloc_tuned": self.malloc_tuned,
            "memory_budget": self.budget,
            "benchmark": (self.benchmark or {}).get("best_throughput"),
            "devices": {d: device_telemetry(sizer.source) for d, sizer in self.sizers.items()},
            "shared_memory": {**self.shm.summary(), **self.replies.summary()},
            "servers": self.server_states(),
            "restarting": self.watchdog.restarting,
        }

    def server_states(self) -> list[dict[str, Any]]:
        """Handler ``dynbatch_server_state``: the state of every model server here."""
        return [{**s.state(), "loads": self.loads[(s.name, s.version)]} for s in self.servers.values()]

    def _run_benchmark(self) -> dict[str, Any] | None:
        """Reference-model table of this worker's device (opt-in: ``dynbatch.benchmark.on-start``)."""
        from .reference import benchmark_device

        device = "cuda:0" if self.gpu_count else "cpu"
        budget = float(dask.config.get("dynbatch.benchmark.time-budget", None) or (3.0 if self.gpu_count else 1.0))
        try:
            table = benchmark_device(device, time_budget_s=budget)
        except Exception as exc:  # no torch, or the device failed: placement uses measured rates only
            logger.info("dynbatch: reference benchmark on %s not run: %r", device, exc)
            self.benchmark = {"device": device, "error": repr(exc)}
            return self.benchmark
        self.benchmark = table.to_dict() | {"best_throughput": table.best_throughput}
        return self.benchmark

    async def rerun_benchmark(self) -> dict[str, Any] | None:
        """Handler ``dynbatch_benchmark``: measure the device with the reference model, in the device
        thread between batches."""
        device = "cuda:0" if self.gpu_count else "cpu"
        try:
            return await asyncio.get_running_loop().run_in_executor(self._device_thread(device), self._run_benchmark)
        finally:
            self.device_turns[device].occupied_until(time.monotonic())
