"""The worker half: loads models once per worker and device, runs batches, reports statistics.

Installed on every current and future worker by :class:`~dask_dynbatch.DynBatchPlugin`. Batches
arrive by direct RPC from the client (``dynbatch_run``); no Dask task is created for them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import pickle
import threading
import time
from collections import Counter, defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import dask
import numpy as np
from distributed import WorkerPlugin
from distributed.core import error_message
from distributed.protocol import Serialize, to_serialize
from distributed.utils_comm import gather_from_workers
from distributed.worker import _worker_cvar
from tornado.ioloop import PeriodicCallback

from .batching import join_chunks
from .benchmark import LazyModelTable, benchmark_device
from .compiled import warm_in_subprocess
from .errors import InputSignatureError
from .runtime import (LoadedModel, bisect_poison, choose_device, pin_host_memory, tune_malloc_for_inference,
                      visible_gpu_count)
from .shm import ShmAttachments, ShmUnavailable
from .sizing import MemorySizer, run_split_on_oom
from .telemetry import CachedMemorySource, detect_memory_source, device_telemetry

if TYPE_CHECKING:
    from distributed import Worker

logger = logging.getLogger(__name__)

PLUGIN_NAME = "dynbatch"
#: topic on which workers publish memory advice when free memory changes (re-plan event)
ADVICE_TOPIC = "dynbatch-advice"
#: topic on which the scheduler plugin announces workers joining and leaving (re-plan event)
CLUSTER_TOPIC = "dynbatch-cluster"
#: an eager CUDA model's shape-ladder rungs up to this many rows are warmed before its first batch
SHAPE_WARMUP_ROWS = 2048
#: how often the worker reads free device memory to detect changes (seconds)
MEMORY_POLL_INTERVAL = 0.1


class ModelStats:
    """Per-model batch statistics kept on the worker and sent on the heartbeat."""

    def __init__(self) -> None:
        self.batches = 0
        self.samples = 0
        self.failed_samples = 0
        self.compute_seconds = 0.0
        self.ooms = 0
        self.recent: deque[tuple[float, int, float]] = deque(maxlen=64)  # (time, size, compute seconds)

    def to_dict(self) -> dict[str, Any]:
        sizes = [s for _, s, _ in self.recent]
        secs = sum(c for _, _, c in self.recent)
        return {
            "batches": self.batches,
            "samples": self.samples,
            "failed_samples": self.failed_samples,
            "compute_seconds": self.compute_seconds,
            "ooms": self.ooms,
            "recent_mean_batch": float(np.mean(sizes)) if sizes else None,
            "recent_throughput": (sum(sizes) / secs) if secs > 0 else None,
        }


class DynBatchWorkerPlugin(WorkerPlugin):
    """Worker half of dask-dynbatch (installed by the scheduler plugin; not registered by users)."""

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self, tune_malloc: bool = True, memory_budget: float | int | None = None,
                 safety_margin: float = 0.1, min_change: float = 0.05,
                 safety_margin_max: int | str | None = "1 GiB"):
        self.tune_malloc = tune_malloc
        self.memory_budget = memory_budget
        self.safety_margin = safety_margin
        self.safety_margin_max = None if safety_margin_max is None else dask.utils.parse_bytes(safety_margin_max)
        self.min_change = min_change

    # -- lifecycle ---------------------------------------------------------------------------
    def setup(self, worker: Worker) -> None:
        self.worker = worker
        self.models: dict[str, LoadedModel] = {}
        self.stats: dict[str, ModelStats] = defaultdict(ModelStats)
        self._load_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # one thread per device: batches on a device run one after another, while the event loop
        # receives the next batch (transfer overlaps compute)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="dynbatch")
        # copies to the device happen here, so that the next batch's transfer overlaps this one's compute
        self.stager = ThreadPoolExecutor(1, thread_name_prefix="dynbatch-stage")
        # shared-memory slots of clients on this host (see shm.py)
        self.shm = ShmAttachments()
        self._pin_slots = bool(dask.config.get("dynbatch.transport.page-lock", True))
        self.gpu_count = visible_gpu_count()
        self.malloc_tuned = tune_malloc_for_inference() if self.tune_malloc else False
        self.sizers: dict[str, MemorySizer] = {}
        # a per-worker budget (e.g. two workers sharing one GPU) comes from the worker's config/env:
        # DASK_DYNBATCH__MEMORY_BUDGET=0.3
        budget = dask.config.get("dynbatch.memory-budget", None)
        self.budget = float(budget) if budget is not None else self.memory_budget
        self._poller = PeriodicCallback(self._poll_memory, MEMORY_POLL_INTERVAL * 1000)
        self._poller.start()
        self.benchmark: dict[str, Any] | None = None
        self.model_tables: dict[str, LazyModelTable] = {}
        if dask.config.get("dynbatch.benchmark.on-start", True):
            # S1: measure this worker's device with the reference model, in the device thread so
            # that it never overlaps a batch
            self.executor.submit(self._run_benchmark)
        worker.handlers["dynbatch_run"] = self.run_batch
        worker.handlers["dynbatch_benchmark"] = self.rerun_benchmark
        worker.handlers["dynbatch_unload"] = self.unload_models
        worker.handlers["dynbatch_shm_drop"] = self.drop_shm
        worker.metrics["dynbatch"] = self.heartbeat_metrics
        worker.extensions["dynbatch"] = self

    def teardown(self, worker: Worker) -> None:
        self._poller.stop()
        for loaded in self.models.values():
            loaded.close()
        worker.handlers.pop("dynbatch_run", None)
        worker.handlers.pop("dynbatch_benchmark", None)
        worker.handlers.pop("dynbatch_unload", None)
        worker.metrics.pop("dynbatch", None)
        worker.extensions.pop("dynbatch", None)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.stager.shutdown(wait=False, cancel_futures=True)
        # dynbatch_shm_drop stays: the scheduler asks every worker to drop a leaving client's
        # slots, also one that is closing; with the mappings closed here it drops nothing
        self.shm.close()

    # -- telemetry -----------------------------------------------------------------------------
    def heartbeat_metrics(self, worker: Worker) -> dict[str, Any]:
        """Sent to the scheduler with every heartbeat (``ws.metrics["dynbatch"]``)."""
        caps = self.memory_caps()
        return {
            "device": "cuda" if self.gpu_count else "cpu",
            "malloc_tuned": self.malloc_tuned,
            "memory_budget": self.budget,
            "benchmark": self.benchmark,
            "devices": {d: device_telemetry(sizer.source) for d, sizer in self.sizers.items()},
            "shared_memory": self.shm.summary(),
            "models": {
                name: {
                    "device": m.device,
                    "load_seconds": m.load_seconds,
                    "memory_cap": caps.get(name),
                    "table": self.model_tables[name].to_dict() if name in self.model_tables else None,
                    "compile": m.compile_summary(),
                    **self.stats[name].to_dict(),
                }
                for name, m in self.models.items()
            },
        }

    def _as_worker(self, fn, *args):
        """Call ``fn`` in the device thread so that ``distributed.get_worker()`` works inside the
        user's ``load`` and ``predict`` (as it does inside a task)."""
        token = _worker_cvar.set(self.worker)
        try:
            return fn(*args)
        finally:
            _worker_cvar.reset(token)

    def _run_benchmark(self) -> dict[str, Any] | None:
        """Load-performance table of this worker's device (reference model, time budget)."""
        device = "cuda:0" if self.gpu_count else "cpu"
        budget = float(dask.config.get("dynbatch.benchmark.time-budget", None) or (3.0 if self.gpu_count else 1.0))
        try:
            table = benchmark_device(device, time_budget_s=budget)
        except Exception as exc:  # no torch, or the device failed: placement falls back to measured rates
            logger.info("dynbatch: reference benchmark on %s not run: %r", device, exc)
            self.benchmark = {"device": device, "error": repr(exc)}
            return self.benchmark
        self.benchmark = table.to_dict() | {"best_throughput": table.best_throughput}
        return self.benchmark

    async def rerun_benchmark(self) -> dict[str, Any] | None:
        """Handler ``dynbatch_benchmark``: measure again (on request from a client)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._run_benchmark)

    def sizer_for(self, device: str) -> MemorySizer:
        """The memory sizer of a device, shared by every model on it."""
        sizer = self.sizers.get(device)
        if sizer is None:
            # readings serve every question a batch asks; host RAM (psutil reads /proc) changes slowly
            max_age = 0.005 if device.startswith("cuda") else 0.05
            source = CachedMemorySource(
                detect_memory_source(device, memory_limit=self.worker.memory_manager.memory_limit), max_age=max_age
            )
            sizer = self.sizers[device] = MemorySizer(
                source, safety_margin=self.safety_margin, safety_margin_max=self.safety_margin_max,
                budget=self.budget, min_change=self.min_change
            )
        return sizer

    def memory_caps(self) -> dict[str, int | None]:
        return {name: self.sizers[m.device].cap(name) for name, m in self.models.items() if m.device in self.sizers}

    def _poll_memory(self) -> None:
        """Re-plan event: free memory moved by more than the threshold -> publish new caps at once."""
        changed = False
        for sizer in self.sizers.values():
            try:
                changed |= sizer.poll()
            except Exception:  # telemetry is best effort
                logger.debug("dynbatch: memory poll failed", exc_info=True)
        if changed:
            self.worker.log_event(ADVICE_TOPIC, {"worker": self.worker.address, "caps": self.memory_caps()})

    # -- models ------------------------------------------------------------------------------
    async def get_model(self, name: str, token: str) -> LoadedModel:
        loaded = self.models.get(name)
        if loaded is not None and loaded.token == token:
            return loaded
        async with self._load_locks[name]:
            loaded = self.models.get(name)
            if loaded is not None and loaded.token == token:
                return loaded
            reply = await self.worker.scheduler.dynbatch_get_model(name=name)
            spec = pickle.loads(reply["payload"])
            device = choose_device(spec, self.gpu_count)
            loop = asyncio.get_running_loop()
            warm = None
            if dask.config.get("dynbatch.compile.warm-in-subprocess", True):
                warm = functools.partial(warm_in_subprocess, reply["payload"], device)
            loaded = await loop.run_in_executor(
                self.executor, self._as_worker, LoadedModel, spec, device, reply["token"],
                self._compile_submit, functools.partial(self._compile_reserve, name, device), warm,
            )
            self.sizer_for(device)
            self.models[name] = loaded
            logger.info("dynbatch: loaded model %r on %s in %.2fs", name, device, loaded.load_seconds)
            return loaded

    def _compile_submit(self, fn) -> None:
        """ModelSpec(compile=...): buckets compile in a background thread (one at a time: the
        compiler runs one drain at once) while the device thread serves. A daemon thread, so that
        a compile in progress never holds up the worker's exit."""
        threading.Thread(target=self._as_worker, args=(fn,), name="dynbatch-compile", daemon=True).start()

    def _compile_reserve(self, name: str, device: str, rows: int):
        """Device memory for a warm-up batch of ``rows`` (None: no room now, try later)."""
        sizer = self.sizers.get(device)
        return sizer.try_reserve(name, rows) if sizer is not None else None

    def unload_models(self, names: list[str]) -> list[str]:
        """Handler ``dynbatch_unload``: forget models no client uses any more (their weights,
        statistics, memory profiles). A batch still running keeps its own reference. Returns the
        names that were loaded here."""
        unloaded = []
        for name in names:
            loaded = self.models.pop(name, None)
            self.stats.pop(name, None)
            self.model_tables.pop(name, None)
            self._load_locks.pop(name, None)
            if loaded is None:
                continue
            loaded.close()
            sizer = self.sizers.get(loaded.device)
            if sizer is not None:
                sizer.forget(name)
            loaded.free_cache()
            unloaded.append(name)
        if unloaded:
            logger.info("dynbatch: unloaded models %s (no client uses them)", unloaded)
        return unloaded

    def _pin_shared(self, client: str, name: str) -> bool:
        """Page-lock a client's slot for the GPU once (its batches then go to the device straight
        out of shared memory, one copy fewer); after a refusal, never again on this worker."""
        if not self._pin_slots:
            return False
        if self.shm.pin(client, name, pin_host_memory):
            return True
        self._pin_slots = False
        return False

    def drop_shm(self, client: str, names: list[str] | None = None) -> int:
        """Handler ``dynbatch_shm_drop``: unmap a client's shared-memory slots (``names``, or all:
        the client left). Returns how many were mapped."""
        return self.shm.drop(client, names)

    async def _fetch_keys(self, keys: list) -> dict:
        """Data of Dask Futures given as inputs, from this worker or its peers."""
        data = {k: self.worker.data[k] for k in keys if k in self.worker.data}
        missing = [k for k in keys if k not in data]
        if missing:
            who_has = await self.worker.scheduler.who_has(keys=missing)
            got, lost, failed, _ = await gather_from_workers(who_has, rpc=self.worker.rpc, who=self.worker.address)
            data.update(got)
            if lost or failed:
                raise KeyError(f"inputs no longer available on the cluster: {sorted(map(str, set(lost) | set(failed)))}")
        return data

    # -- the batch handler ---------------------------------------------------------------------
    async def run_batch(
        self,
        model: str,
        token: str,
        n: int,
        batch: Any = None,
        keyed: list[tuple[int, Any]] | None = None,
        signature: tuple[tuple[int, ...], str] | None = None,
        full: bool = True,
        client: str | None = None,
        shm: dict[str, Any] | None = None,
        shm_drop: list[str] | None = None,
    ) -> dict[str, Any]:
        """Run one batch of ``n`` requests; ``batch`` holds the inline rows (stacked, or a list of
        stacked chunks that the transfer thread joins here), ``keyed`` the ``(row, key)`` pairs of
        rows given as Dask Futures, ``signature`` the client's ``(shape, dtype)`` of one sample that
        those must match; ``full`` whether the batch is as large as the client's size for this
        worker (a compiled model compiles the buckets of full batches sooner).

        ``shm`` (``name``, ``shape``, ``dtype``) says that the inline rows are in a shared-memory
        slot of ``client`` instead (same host, see :mod:`dask_dynbatch.shm`): they are copied out
        before the reply, which the client waits for before reusing the slot. A slot that cannot be
        mapped is answered with ``shm_error`` and nothing runs. ``shm_drop``: slots the client
        retired."""
        received = time.perf_counter()
        if shm_drop:
            self.shm.drop(client, shm_drop)
        if isinstance(batch, Serialize):  # the in-process transport does not serialise
            batch = batch.data
        if shm is not None:
            try:
                batch = self.shm.array(client, shm["name"], shm["shape"], shm["dtype"])
            except ShmUnavailable as exc:
                return {"status": "OK", "shm_error": str(exc)}
        try:
            cold = model not in self.models or self.models[model].token != token
            loaded = await self.get_model(model, token)
            row_errors: dict[int, BaseException] = {}
            if keyed:
                batch, row_errors = await self._assemble(n, batch, keyed, signature)
            loop = asyncio.get_running_loop()
            # rows in shared memory are copied out here (_assemble copied them already if keyed)
            shared = shm is not None and not keyed
            compiling = loaded.compiling
            new_shape = loaded.first_at_size(n)
            timing: dict[str, float] = {}

            def execute(rows, copy_in=False):
                timing["start"] = time.perf_counter()
                if copy_in:  # host rows for a host model: copied in the device thread, no hop
                    rows = loaded.stage(rows, shared)
                return self._as_worker(self._execute, loaded, rows, row_errors, full)

            def stage_then_execute(rows):
                # the transfer thread hands the staged batch to the device thread itself: no turn of
                # the event loop between the two (it may be busy with other batches' messages)
                timing["staging"] = time.perf_counter()
                pinned = shared and self._pin_shared(client, shm["name"])
                staged = loaded.stage(rows, shared, pinned=pinned)
                timing["staged"] = time.perf_counter()
                return self.executor.submit(execute, staged)

            needs_stage = not row_errors and (loaded.stages_on_device or isinstance(batch, list) or shared)
            if needs_stage and loaded.stages_on_device:  # to the GPU while the batch before computes
                running = await loop.run_in_executor(self.stager, stage_then_execute, batch)
                pieces, errors, compute_s = await asyncio.wrap_future(running)
            else:
                pieces, errors, compute_s = await loop.run_in_executor(self.executor, execute, batch, needs_stage)
        except Exception as exc:  # the batch could not run at all (model failed to load, inputs lost)
            logger.warning("dynbatch: batch of %d for model %r failed: %r", n, model, exc)
            return {"status": "OK", "batch_error": error_message(exc)}
        stats = self.stats[model]
        stats.batches += 1
        stats.samples += n - len(errors)
        stats.failed_samples += len(errors)
        stats.compute_seconds += compute_s
        stats.recent.append((time.time(), n, compute_s))
        if n > len(errors):  # some rows ran (a batch of inputs that all failed to arrive did not)
            table = self.model_tables.get(model)
            if table is None:
                table = self.model_tables[model] = LazyModelTable(model, loaded.device)
            table.observe(n - len(errors), compute_s)  # the model's own load-performance table, from use
        return {
            "status": "OK",
            "pieces": [(rows, to_serialize(out)) for rows, out in pieces],
            "errors": [(row, error_message(exc)) for row, exc in errors.items()],
            "compute_s": compute_s,
            "cold": cold,  # the model was loaded for this batch: its latency says nothing about size
            # the first batch of this size: one-time set-up (cuDNN plans, allocator growth: ~40 ms
            # for ResNet-50 on an H200) made it slower than its size is
            "new_shape": new_shape,
            # a bucket compiled while this batch ran: it ran eagerly beside a busy compiler, so its
            # latency says little about its size either
            "compiling": compiling or loaded.compiling,
            "worker_s": time.perf_counter() - received,
            # where the batch's time on the worker went: waiting for and copying in the transfer
            # thread (stage_s), waiting for the device thread (wait_s), running (compute_s)
            "stage_s": timing["staged"] - timing["staging"] if "staged" in timing else 0.0,
            "wait_s": timing["start"] - timing.get("staged", received),
            "device": loaded.device,
            "cap": self.sizers[loaded.device].cap(model),
            **({"compile": loaded.compile_summary()} if loaded.spec.compile else {}),
        }

    async def _assemble(self, n: int, inline: np.ndarray | None, keyed: list[tuple[int, Any]],
                        signature: tuple[tuple[int, ...], str] | None = None):
        """Full batch from inline rows plus rows fetched by key; a row that cannot be placed fails alone.

        Rows must match ``signature`` (the client's), else the inline rows, else the most common
        shape and dtype among the fetched rows."""
        data = await self._fetch_keys([k for _, k in keyed])
        if inline is not None:
            inline = join_chunks(inline)
        errors: dict[int, BaseException] = {}
        values: dict[int, np.ndarray] = {}
        not_arrays: dict[int, str] = {}
        for row, key in keyed:
            try:
                values[row] = np.asarray(data[key])
            except Exception as exc:  # e.g. a ragged list
                not_arrays[row] = str(exc)
        if signature is not None:
            shape, dtype = tuple(signature[0]), np.dtype(signature[1])
        elif inline is not None and len(inline):
            shape, dtype = inline[0].shape, inline[0].dtype
        elif values:
            shape, dtype = Counter((v.shape, v.dtype) for v in values.values()).most_common(1)[0][0]
        else:
            shape, dtype = (), np.dtype(float)  # every row failed
        full = np.zeros((n,) + shape, dtype=dtype)
        for row, key in keyed:
            if row in not_arrays:
                errors[row] = InputSignatureError(
                    f"input from Dask Future {key!r} is not an array ({not_arrays[row]}); "
                    f"the model expects shape {shape} and dtype {dtype}"
                )
        keyed_rows = {row for row, _ in keyed}
        inline_rows = [r for r in range(n) if r not in keyed_rows]
        if inline_rows:
            full[inline_rows] = inline
        for row, key in keyed:
            value = values.get(row)
            if value is None:
                continue
            if value.shape != shape or value.dtype != dtype:
                errors[row] = InputSignatureError(
                    f"input from Dask Future {key!r} has shape {value.shape} and dtype {value.dtype}; "
                    f"the model expects shape {shape} and dtype {dtype}"
                )
            else:
                full[row] = value
        return full, errors

    def _execute(self, loaded: LoadedModel, batch: np.ndarray, bad_rows: dict[int, BaseException], full: bool = True):
        """Runs in the device thread: the batch cut to the memory cap, split on OOM, bisected
        around poison requests. Rows in ``bad_rows`` (inputs that could not be placed) fail alone."""
        started = time.perf_counter()
        if bad_rows:  # rows that could not be placed are left out; pieces map back through ``rows``
            rows = np.array([r for r in range(len(batch)) if r not in bad_rows], dtype=np.intp)
            good = batch[rows]
        else:
            good = batch
        name = loaded.spec.name
        sizer = self.sizers[loaded.device]
        if loaded.wants_shape_warmup and len(good):
            cap = sizer.cap(name)
            loaded.warm_shapes(good, min(SHAPE_WARMUP_ROWS, cap if cap is not None else SHAPE_WARMUP_ROWS))

        def run_reserved(part: np.ndarray):
            with sizer.reserve(name, loaded.rows_for(len(part))) as reservation:
                baseline = loaded.memory_mark()
                outputs = loaded(part, full=full)
                reservation.record(loaded.memory_peak(baseline, part, outputs))
            return outputs

        def run_range(start: int, stop: int):
            chunks = run_split_on_oom(
                lambda a, b: run_reserved(good[start + a : start + b]),
                stop - start,
                on_oom=lambda k: self._on_oom(sizer, name, k),
                free_cache=loaded.free_cache,
                max_rows=lambda: loaded.max_rows(sizer.cap(name)),
                on_sample_too_large="collect",
            )
            return [(start + c.start, start + c.stop, c.output, c.error) for c in chunks]

        pieces, errors = bisect_poison(run_range, len(good))
        if bad_rows:
            pieces = [(rows[a:b].tolist(), out) for a, b, out in pieces]
            errors = {int(rows[r]): e for r, e in errors.items()} | bad_rows
        else:
            pieces = [(list(range(a, b)), out) for a, b, out in pieces]
        return pieces, errors, time.perf_counter() - started

    def _on_oom(self, sizer: MemorySizer, name: str, rows: int) -> None:
        sizer.on_oom(name, rows)
        self.stats[name].ooms += 1
