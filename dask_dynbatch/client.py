"""The user-facing :class:`Batcher`: one future per request, batches formed in front of Dask.

A Batcher lives in the client process. ``submit``/``map`` put requests into a
:class:`~dask_dynbatch.batching.RequestQueue`; a dispatcher coroutine on the client's event loop
forms batches and sends each one by direct RPC to the worker chosen by
:func:`~dask_dynbatch.placement.plan`. No Dask task is created per request or per batch.
See ``docs/design.md`` for the whole flow.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import pickle
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
from distributed import Future as DaskFuture
from distributed.core import clean_exception
from distributed.protocol import to_serialize
from distributed.protocol.pickle import dumps as pickle_dumps

from .batching import Request, RequestFuture, RequestQueue, as_numpy_sample, split_rows, stack_samples
from .control import BatchSizeController
from .errors import (
    BatcherClosedError,
    InputSignatureError,
    NoWorkerError,
    PluginNotRegisteredError,
    QueueFullError,
    RequestTimeoutError,
)
from .placement import WorkerLoad, fill_unknown_throughputs, plan
from .spec import ModelSpec, parse_seconds, spec_token
from .worker_plugin import ADVICE_TOPIC

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

#: a batch is re-queued at most this many times after its worker died under it
MAX_ATTEMPTS = 3
#: how often the dispatcher refreshes the cluster view and reports its state (seconds)
REFRESH_INTERVAL = 0.5
REPORT_INTERVAL = 1.0
#: stack batches larger than this in a thread, off the event loop
STACK_IN_THREAD_BYTES = 1 << 20


class _WorkerSlot:
    """What the batcher knows of one worker for its model."""

    def __init__(self, address: str, view: dict, controller: BatchSizeController):
        self.address = address
        self.view = view
        self.controller = controller
        self.inflight = 0
        self.inflight_samples = 0
        self.alive = True
        self.batches = 0
        self.samples = 0
        self.cap: int | None = None
        self.throughput: float | None = None  # samples/s end to end, EWMA
        self.device = view.get("device", "cpu")

    def observe_throughput(self, n: int, compute_s: float) -> None:
        if compute_s <= 0:
            return
        rate = n / compute_s
        self.throughput = rate if self.throughput is None else 0.8 * self.throughput + 0.2 * rate

    def to_dict(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "device": self.device,
            "alive": self.alive,
            "inflight_batches": self.inflight,
            "inflight_samples": self.inflight_samples,
            "batches": self.batches,
            "samples": self.samples,
            "memory_cap": self.cap,
            "throughput": self.throughput,
            "controller": self.controller.state(),
        }


class Batcher:
    """Dynamic batching of inference requests for one model on a Dask cluster.

    Parameters
    ----------
    client
        A connected :class:`distributed.Client` whose scheduler has the
        :class:`~dask_dynbatch.DynBatchPlugin` registered.
    spec
        The model, see :class:`~dask_dynbatch.ModelSpec`.

    Examples
    --------
    >>> client.register_plugin(DynBatchPlugin())              # doctest: +SKIP
    >>> batcher = Batcher(client, ModelSpec("cnn", load=build)) # doctest: +SKIP
    >>> batcher.submit(image).result()                          # doctest: +SKIP
    >>> [f.result() for f in batcher.map(images)]               # doctest: +SKIP

    With an asynchronous client, ``await Batcher(client, spec)`` and ``await batcher.submit(x)``.
    """

    def __init__(self, client: Client, spec: ModelSpec):
        if not isinstance(spec, ModelSpec):
            raise TypeError(f"Batcher needs a ModelSpec, not {type(spec).__name__}")
        self.client = client
        self.spec = spec
        self.id = f"{spec.name}-{uuid.uuid4().hex[:8]}"
        self._payload = pickle_dumps(spec)
        self._token = spec_token(self._payload)
        self._queue = RequestQueue()
        self._room = threading.Condition()  # submit() waits here when the queue is full ("block")
        self._closed = False
        self._signature: tuple[tuple[int, ...], np.dtype] | None = (
            (spec.input_shape, np.dtype(spec.input_dtype)) if spec.input_shape is not None and spec.input_dtype is not None else None
        )
        self._slots: dict[str, _WorkerSlot] = {}
        self._waiting_for_inputs = 0  # requests whose Dask-Future input is not computed yet
        self._counts = {"submitted": 0, "delivered": 0, "failed": 0, "cancelled": 0, "timed_out": 0, "requeued": 0}
        self._latencies: deque[float] = deque(maxlen=20_000)  # per request, seconds
        self._history: deque[tuple] = deque(maxlen=5_000)  # (time, worker, size, latency, cap, controller size)
        self._wake_pending = False
        self._wake_lock = threading.Lock()
        self._loop = client.loop.asyncio_loop
        self._started_at = time.time()
        self._no_worker_since: float | None = None
        self._main_task: asyncio.Task | None = None
        if client.asynchronous:
            self._started = asyncio.ensure_future(self._start())
        else:
            client.sync(self._start)
            self._started = None

    @classmethod
    def from_name(cls, client: Client, name: str) -> Batcher:
        """A Batcher for a model that another Batcher (maybe another client) registered.

        Raises :class:`~dask_dynbatch.UnknownModelError` when no model of that name is registered.
        With an asynchronous client, ``await Batcher.from_name(client, name)``.
        """

        async def fetch_spec() -> ModelSpec:
            if not await client.run_on_scheduler(_scheduler_has_plugin):
                raise PluginNotRegisteredError(client.scheduler.address)
            reply = await client.scheduler.dynbatch_get_model(name=name)
            return pickle.loads(reply["payload"])

        if client.asynchronous:

            async def attach() -> Batcher:
                return await cls(client, await fetch_spec())

            return attach()
        return cls(client, client.sync(fetch_spec))

    def __await__(self):
        async def _wait():
            if self._started is not None:
                await self._started
            return self

        return _wait().__await__()

    def __repr__(self) -> str:
        return f"<Batcher {self.spec.name!r}: queued={len(self._queue)} workers={len(self._slots)}>"

    # -- start / close ---------------------------------------------------------------------------
    async def _start(self) -> None:
        has_plugin = await self.client.run_on_scheduler(_scheduler_has_plugin)
        if not has_plugin:
            raise PluginNotRegisteredError(self.client.scheduler.address)
        spec = self.spec
        views = (
            await self.client.scheduler.dynbatch_register_model(
                name=spec.name,
                payload=self._payload,
                token=self._token,
                resources=dict(spec.resources),
                device=spec.device,
                client=self.client.id,
            )
        )["workers"]
        self._update_workers(views)
        _listen_for_advice(self)
        self._wake_event = asyncio.Event()
        self._main_task = asyncio.ensure_future(self._main())

    def close(self, drain: bool = False, timeout: float | str | None = None) -> None:
        """Stop accepting requests.

        With ``drain=False`` (default) requests still queued are cancelled; batches already sent
        complete and deliver. With ``drain=True`` it waits (up to ``timeout``) until every queued
        request is delivered, then closes.
        """
        if self._closed:
            return
        if drain:
            deadline = None if timeout is None else time.monotonic() + parse_seconds(timeout, "timeout")
            while len(self._queue) or self._waiting_for_inputs or any(s.inflight for s in self._slots.values()):
                if deadline is not None and time.monotonic() > deadline:
                    break
                time.sleep(0.01)
        self._closed = True
        for req in self._queue.drain():
            if req.future.cancel():
                self._counts["cancelled"] += 1
        with self._room:
            self._room.notify_all()
        self._wake()

    def __enter__(self) -> Batcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- submit ----------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise BatcherClosedError(self.spec.name)

    def _check_signature(self, sample: np.ndarray) -> None:
        if sample.dtype == object:
            raise InputSignatureError(f"model {self.spec.name!r} takes numeric arrays, not {type(sample).__name__} of objects")
        if self._signature is None:
            if sample.ndim == 0:
                raise InputSignatureError(f"model {self.spec.name!r}: a sample must be an array, not a scalar")
            self._signature = (sample.shape, sample.dtype)
            return
        shape, dtype = self._signature
        if sample.shape != shape or sample.dtype != dtype:
            raise InputSignatureError(
                f"model {self.spec.name!r} expects one sample of shape {shape} and dtype {dtype} "
                f"(no batch dimension); received shape {sample.shape} and dtype {sample.dtype}"
            )

    def _make_request(self, x: Any, priority: int, deadline: float | None, now: float) -> Request:
        future = RequestFuture()
        if isinstance(x, DaskFuture):
            req = Request(None, future, priority=priority, deadline=deadline, enqueued=now, dask_future=x)
        else:
            is_torch = type(x).__module__.startswith("torch")
            sample = as_numpy_sample(x)
            self._check_signature(sample)
            req = Request(sample, future, priority=priority, deadline=deadline, enqueued=now)
            if is_torch:
                future._as_torch = True
        return req

    def submit(self, x: Any, *, priority: int = 0, timeout: float | str | None = None) -> RequestFuture:
        """Submit one sample (no batch dimension) or a Dask Future whose value is one sample.

        ``priority``: higher is batched first. ``timeout``: a request whose batch has not started
        this long after ``submit`` fails with :class:`RequestTimeoutError` and is not run.
        """
        return self.map([x], priority=priority, timeout=timeout)[0]

    def map(self, xs: Iterable[Any], *, priority: int = 0, timeout: float | str | None = None) -> list[RequestFuture]:
        """Submit many samples; one future per sample, in order."""
        self._check_open()
        now = time.monotonic()
        deadline = None if timeout is None else now + parse_seconds(timeout, "timeout")
        requests = [self._make_request(x, priority, deadline, now) for x in xs]
        ready = []
        for req in requests:
            if req.dask_future is not None:
                self._wait_for_input(req)
            else:
                ready.append(req)
        self._enqueue(ready)
        self._counts["submitted"] += len(requests)
        return [r.future for r in requests]

    def _enqueue(self, requests: list[Request]) -> None:
        if not requests:
            return
        limit = self.spec.max_queue
        if limit is not None and len(self._queue) + len(requests) > limit:
            if self.spec.overload == "reject":
                raise QueueFullError(
                    f"model {self.spec.name!r}: the queue holds {len(self._queue)} requests (max_queue={limit}); "
                    "retry later, or raise ModelSpec.max_queue / use overload='block'"
                )
            if self._on_loop_thread():
                raise QueueFullError(
                    f"model {self.spec.name!r}: the queue is full (max_queue={limit}) and submit() was called on the "
                    "client's event loop, where it cannot block; await earlier results first"
                )
            start = 0  # block: push what fits, wait for room for the rest
            while start < len(requests):
                with self._room:
                    while len(self._queue) >= limit and not self._closed:
                        self._room.wait(0.1)
                self._check_open()
                room = max(1, limit - len(self._queue))
                self._queue.push(requests[start : start + room])
                start += room
                self._wake()
            return
        self._queue.push(requests)
        self._wake()

    def _on_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def _wait_for_input(self, req: Request) -> None:
        """A Dask-Future input joins the queue once its value exists on a worker (its data stays there)."""
        self._waiting_for_inputs += 1

        def start_waiting() -> None:
            asyncio.ensure_future(self._input_ready(req))

        if self._on_loop_thread():
            start_waiting()
        else:
            self._loop.call_soon_threadsafe(start_waiting)

    async def _input_ready(self, req: Request) -> None:
        dask_future = req.dask_future
        try:
            await dask_future._state.wait()  # the client's own record of the key: no data moves
            status = dask_future.status
            if status == "finished":
                if not req.future.done():
                    self._queue.push([req])
                    self._wake()
                return
            exc = await dask_future._exception() if status == "error" else None
            if exc is None:
                exc = RuntimeError(f"the Dask Future given as input is {status}: {dask_future.key!r}")
            if req.future.set_running_or_notify_cancel():
                req.future.set_exception(exc)
                self._counts["failed"] += 1
        finally:
            self._waiting_for_inputs -= 1

    # -- dispatcher (client event loop) -----------------------------------------------------------
    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        self._loop.call_soon_threadsafe(self._wake_on_loop)

    def _wake_on_loop(self) -> None:
        event = getattr(self, "_wake_event", None)
        if event is not None:
            event.set()

    async def _main(self) -> None:
        next_refresh = next_report = time.monotonic()
        timeout = REFRESH_INTERVAL
        while True:
            try:
                await asyncio.wait_for(self._wake_event.wait(), timeout)
            except asyncio.TimeoutError:
                pass
            self._wake_event.clear()
            with self._wake_lock:
                self._wake_pending = False
            now = time.monotonic()
            if self._closed and not any(s.inflight for s in self._slots.values()):
                await self._report()
                return
            if now >= next_refresh:
                next_refresh = now + REFRESH_INTERVAL
                await self._refresh_workers()
            if now >= next_report:
                next_report = now + REPORT_INTERVAL
                asyncio.ensure_future(self._report())
            timeout = min(self._dispatch(now), max(0.0, next_refresh - now))

    def _fail(self, reqs: Iterable[Request], exc: BaseException, counter: str = "failed") -> None:
        for req in reqs:
            try:
                req.future.set_exception(exc)
                self._counts[counter] += 1
            except concurrent.futures.InvalidStateError:
                pass
        with self._room:
            self._room.notify_all()

    def _dispatch(self, now: float) -> float:
        """Form and send as many batches as workers have room for; return seconds until the next try."""
        expired = self._queue.expire(now)
        if expired:
            self._fail(expired, RequestTimeoutError(f"request to model {self.spec.name!r} timed out before its batch started"), "timed_out")
        if not len(self._queue):
            return REFRESH_INTERVAL
        live = [s for s in self._slots.values() if s.alive]
        if not live:
            if self._no_worker_since is None:
                self._no_worker_since = now
                logger.warning("dynbatch: no worker can run model %r; %d requests wait", self.spec.name, len(self._queue))
            return REFRESH_INTERVAL
        self._no_worker_since = None
        max_delay = self.spec.max_delay
        rates = fill_unknown_throughputs(
            {s.address: s.throughput for s in live}, {s.address: _benchmark_score(s.view) for s in live}
        )
        if all(s.inflight >= self.spec.max_inflight for s in live):
            return REFRESH_INTERVAL
        # busy workers stay in the plan (free_slots=0): the split keeps their share for them
        loads = [self._load(s, rates.get(s.address)) for s in live]
        for address, size in plan(len(self._queue), loads):
            slot = self._slots[address]
            if len(self._queue) < size and slot.inflight > 0:
                oldest = self._queue.oldest_enqueued()
                if oldest is not None and now - oldest < max_delay:
                    return oldest + max_delay - now  # wait a little for the batch to fill
            batch, expired = self._queue.pop(size, now)
            if expired:
                self._fail(expired, RequestTimeoutError(f"request to model {self.spec.name!r} timed out before its batch started"), "timed_out")
            if batch:
                slot.inflight += 1
                slot.inflight_samples += len(batch)
                asyncio.ensure_future(self._send(slot, batch, now, slot.inflight))
        with self._room:
            self._room.notify_all()
        return REFRESH_INTERVAL

    def _load(self, slot: _WorkerSlot, throughput: float | None) -> WorkerLoad:
        """The placement inputs for one worker. Memory use is what our worker half reads for its
        device (other processes included, our own allocator cache counted as free); compute
        utilisation is left out because NVML's figure includes our own batches."""
        view = slot.view
        devices = (view.get("dynbatch") or {}).get("devices") or {}
        fractions = [d.get("used_fraction") for d in devices.values() if d.get("used_fraction") is not None]
        if fractions:
            mem_util = max(fractions)
        elif view.get("memory_limit"):
            mem_util = (view.get("memory_process") or 0) / view["memory_limit"]
        else:
            mem_util = 0.0
        size = slot.controller.size
        limit = self.spec.batch_limit(slot.device)
        if limit is not None:
            size = min(size, limit)
        return WorkerLoad(
            address=slot.address,
            throughput=throughput,
            inflight_samples=slot.inflight_samples,
            memory_utilization=min(1.0, mem_util),
            compute_utilization=0.0,
            cap=slot.cap,
            free_slots=max(0, self.spec.max_inflight - slot.inflight),
            batch_size=max(1, size),
        )

    async def _send(self, slot: _WorkerSlot, reqs: list[Request], formed: float, depth: int) -> None:
        """Send one batch and deliver its results; ``depth`` = batches in flight on that worker
        when this one was sent, itself included."""
        oldest = min(r.enqueued for r in reqs)
        try:
            inline = [r.sample for r in reqs if r.dask_future is None]
            keyed = [(i, r.dask_future.key) for i, r in enumerate(reqs) if r.dask_future is not None]
            batch = None
            if inline:
                nbytes = inline[0].nbytes * len(inline)
                if nbytes > STACK_IN_THREAD_BYTES:
                    batch = await asyncio.get_running_loop().run_in_executor(None, stack_samples, inline)
                else:
                    batch = stack_samples(inline)
            sent = time.monotonic()
            reply = await self.client.rpc(slot.address).dynbatch_run(
                model=self.spec.name,
                token=self._token,
                n=len(reqs),
                batch=to_serialize(batch) if batch is not None else None,
                keyed=keyed or None,
            )
        except OSError as exc:  # the worker died or is unreachable: nothing is lost, re-run elsewhere
            self._worker_lost(slot, reqs, exc)
            return
        except Exception as exc:
            self._fail(reqs, exc)
            slot.inflight -= 1
            slot.inflight_samples -= len(reqs)
            self._wake()
            return
        done = time.monotonic()
        slot.inflight -= 1
        slot.inflight_samples -= len(reqs)
        if reply.get("batch_error") is not None:
            _, exc, tb = clean_exception(**reply["batch_error"])
            self._fail(reqs, exc.with_traceback(tb) if tb is not None else exc)
            self._wake()
            return
        self._deliver(reqs, reply, done)
        n = len(reqs)
        compute_s = reply.get("compute_s") or (done - sent)
        # what this batch cost the pipeline, overheads included: its round trip shared with the
        # batches that were in flight with it. Compute time alone would hide per-batch overheads
        # (transfer, serialisation, the event loops) and favour batches that are too small.
        service_s = max(compute_s, (done - sent) / depth)
        slot.batches += 1
        slot.samples += n
        slot.observe_throughput(n, service_s)
        if "cap" in reply:
            slot.cap = reply["cap"]
            slot.controller.set_cap(slot.cap)
        latency = (done - sent) + min(sent - oldest, self.spec.max_delay)
        proposed_before = slot.controller.size
        slot.controller.observe(n, latency, service_s)
        self._history.append((time.time(), slot.address, n, latency, slot.cap, proposed_before))
        self._wake()

    def _deliver(self, reqs: list[Request], reply: dict, done: float) -> None:
        delivered = failed = 0
        for rows, outputs in reply["pieces"]:
            for row, value in zip(rows, split_rows(outputs, len(rows))):
                req = reqs[row]
                if getattr(req.future, "_as_torch", False):
                    value = _to_torch(value)
                try:
                    req.future.set_result(value)
                    delivered += 1
                except concurrent.futures.InvalidStateError:
                    pass
        for row, err in reply["errors"]:
            _, exc, tb = clean_exception(**err)
            try:
                reqs[row].future.set_exception(exc.with_traceback(tb) if tb is not None else exc)
                failed += 1
            except concurrent.futures.InvalidStateError:
                pass
        self._counts["delivered"] += delivered
        self._counts["failed"] += failed
        self._latencies.extend(done - r.enqueued for r in reqs)

    def _worker_lost(self, slot: _WorkerSlot, reqs: list[Request], exc: BaseException) -> None:
        slot.inflight -= 1
        slot.inflight_samples -= len(reqs)
        slot.alive = False
        logger.warning("dynbatch: lost contact with %s (%s); re-queuing %d requests", slot.address, exc, len(reqs))
        retry, give_up = [], []
        for req in reqs:
            req.attempts += 1
            (retry if req.attempts < MAX_ATTEMPTS else give_up).append(req)
        if give_up:
            self._fail(give_up, RuntimeError(f"the worker running this request died {MAX_ATTEMPTS} times ({exc})"))
        self._queue.push(retry, front=True)
        self._counts["requeued"] += len(retry)
        self._wake()

    async def _refresh_workers(self) -> None:
        try:
            views = await self.client.scheduler.dynbatch_workers(model=self.spec.name)
        except Exception as exc:  # scheduler unreachable for now (or the client closing): keep the last view
            logger.debug("dynbatch: cluster view not refreshed: %r", exc)
            return
        self._update_workers(views)

    def _update_workers(self, views: dict[str, dict]) -> None:
        for address, view in views.items():
            slot = self._slots.get(address)
            if slot is None:
                self._slots[address] = _WorkerSlot(address, view, self._new_controller(view.get("device", "cpu")))
            else:
                slot.view = view
                slot.device = view.get("device", slot.device)
                slot.alive = True
        for address in list(self._slots):
            if address not in views:
                slot = self._slots[address]
                slot.alive = False
                if not slot.inflight:
                    del self._slots[address]

    def _on_advice(self, message: dict) -> None:
        """Memory advice pushed by a worker whose free memory changed (on the client loop)."""
        slot = self._slots.get(message.get("worker"))
        cap = (message.get("caps") or {}).get(self.spec.name, "absent")
        if slot is None or cap == "absent":
            return
        slot.cap = cap
        slot.controller.set_cap(cap)
        self._wake()

    def _new_controller(self, device: str) -> BatchSizeController:
        limit = self.spec.batch_limit(device)
        initial = min(self.spec.initial_batch_size, limit) if limit else self.spec.initial_batch_size
        return BatchSizeController(self.spec.latency_target, initial_size=initial, max_size=limit)

    async def _report(self) -> None:
        try:
            await self.client.scheduler.dynbatch_report(batcher=self.id, stats=self.stats(), client=self.client.id)
        except Exception:  # the dashboard view is best effort; the next report repeats it
            logger.debug("dynbatch: report failed", exc_info=True)

    # -- introspection ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counts, queue depth, latency percentiles and, per worker, the controller's state."""
        lat = np.fromiter(self._latencies, dtype=float) if self._latencies else None
        return {
            "model": self.spec.name,
            "batcher": self.id,
            "latency_target": self.spec.latency_target,
            "queued": len(self._queue),
            "waiting_for_inputs": self._waiting_for_inputs,
            "closed": self._closed,
            **self._counts,
            "latency_p50": float(np.percentile(lat, 50)) if lat is not None else None,
            "latency_p95": float(np.percentile(lat, 95)) if lat is not None else None,
            "latency_p99": float(np.percentile(lat, 99)) if lat is not None else None,
            "workers": {a: s.to_dict() for a, s in self._slots.items()},
        }

    def history(self) -> list[dict[str, Any]]:
        """Recent batches: time, worker, size, latency, memory cap, controller size."""
        keys = ("time", "worker", "size", "latency", "cap", "controller_size")
        return [dict(zip(keys, row)) for row in self._history]


# One topic handler per client (a client keeps one handler per topic), fanned out to its batchers.
_advice_listeners: dict[str, weakref.WeakSet] = {}


def _listen_for_advice(batcher: Batcher) -> None:
    client = batcher.client
    listeners = _advice_listeners.get(client.id)
    if listeners is None:
        listeners = _advice_listeners[client.id] = weakref.WeakSet()

        def on_event(event, listeners=listeners) -> None:
            _, message = event
            for b in list(listeners):
                b._on_advice(message)

        client.subscribe_topic(ADVICE_TOPIC, on_event)
    listeners.add(batcher)


def _benchmark_score(view: dict) -> float | None:
    bench = (view.get("dynbatch") or {}).get("benchmark") or {}
    return bench.get("best_throughput")


def _scheduler_has_plugin(dask_scheduler=None) -> bool:
    return "dynbatch" in dask_scheduler.extensions


def _to_torch(value: Any) -> Any:
    import torch

    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, dict):
        return {k: _to_torch(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to_torch(v) for v in value)
    return value
