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
import os
import pickle
import threading
import time
import uuid
import warnings
import weakref
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import dask.config
import numpy as np
from distributed import Future as DaskFuture
from distributed.core import clean_exception, send_recv
from distributed.protocol import Serialize, to_serialize
from distributed.protocol.pickle import dumps as pickle_dumps

from .batching import Request, RequestFuture, RequestQueue, as_numpy_sample, split_rows, stack_in_chunks
from .control import BatchSizeController
from .errors import (
    BatcherClosedError,
    CompileWarning,
    InputSignatureError,
    PluginNotRegisteredError,
    QueueFullError,
    RequestTimeoutError,
    UnknownModelError,
)
from .pacing import BusyForecast
from .placement import WorkerLoad, fill_unknown_throughputs, plan
from .shm import ShmRing, ShmSlot, shm_supported
from .spec import ModelSpec, parse_seconds, spec_token
from .worker_plugin import ADVICE_TOPIC, CLUSTER_TOPIC

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

#: map() queues requests in chunks of this many (the dispatcher starts on the first chunk)
MAP_CHUNK = 1024
#: map() sleeps this long between chunks (from another thread than the event loop's)
MAP_YIELD_S = 0.0005
#: a request is re-queued at most this many times after its worker died under its batch
MAX_ATTEMPTS = 3
#: seconds to connect to a worker before its batch goes back to the queue (it was not sent)
CONNECT_TIMEOUT = 5.0
#: a worker that a batch was lost with gets no batch for this long, even if the scheduler still
#: lists it (the scheduler notices a dead worker a little later than the client)
LOST_COOLDOWN = 2.0
#: how often the dispatcher refreshes the cluster view and reports its state (seconds)
REFRESH_INTERVAL = 0.5
REPORT_INTERVAL = 1.0
#: partial batches (fewer requests than the worker's batch size) are sent only while the worker
#: has fewer batches than this in flight; full batches go up to ModelSpec.max_inflight
PARTIAL_INFLIGHT = 2
#: a batch larger than this travels as stacked chunks of at most this many bytes, one Dask frame
#: each (see :func:`~dask_dynbatch.batching.stack_in_chunks`); the worker joins them straight into
#: the buffer the device copies from
SEND_CHUNK_BYTES = 16 * 2**20
#: batches at least this large are stacked in a helper thread (NumPy copies without holding the
#: GIL), so that the event loop goes on sending and receiving other batches meanwhile
STACK_IN_THREAD_BYTES = 4 * 2**20
#: a batch stacked into shared memory is split into parts of at least this many bytes, stacked by
#: the helper threads in parallel (one thread copies ~2 GB/s: on the GPU machine that capped the
#: data path at ~15k ResNet images/s)
STACK_PART_BYTES = 8 * 2**20
#: helper threads that stack batches: a quarter of the cores, 1 to 4
STACK_THREADS = max(1, min(4, (os.cpu_count() or 1) // 4))
_stacker: concurrent.futures.ThreadPoolExecutor | None = None


def _stack_into(samples: list[np.ndarray], out: np.ndarray) -> None:
    """Stack samples into ``out`` (a shared-memory view); NumPy copies without holding the GIL."""
    np.stack(samples, out=out)


def _shm_min_bytes() -> int:
    return int(dask.config.get("dynbatch.transport.shared-memory-min-bytes", 65536))


def _shm_wanted(address: str) -> bool:
    """Whether to try shared memory for batches to ``address`` (the worker says if it cannot map it).
    Not for in-process workers: their comm passes the batch without copying it at all."""
    return (bool(dask.config.get("dynbatch.transport.shared-memory", True)) and not address.startswith("inproc://")
            and shm_supported())


def _stack_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _stacker
    if _stacker is None:
        _stacker = concurrent.futures.ThreadPoolExecutor(STACK_THREADS, thread_name_prefix="dynbatch-stack")
    return _stacker


class _WorkerSlot:
    """What the batcher knows of one worker for its model."""

    def __init__(self, address: str, view: dict, controller: BatchSizeController):
        self.address = address
        self.view = view
        self.controller = controller
        self.inflight = 0
        self.inflight_samples = 0
        self.alive = True
        self.lost_until = 0.0  # monotonic time before which the worker counts as dead
        self.last_done = 0.0  # monotonic time the worker's last batch came back
        self.batches = 0
        self.samples = 0
        self.cap: int | None = None
        self.throughput: float | None = None  # samples/s end to end, EWMA
        self.device = view.get("device", "cpu")
        self.compile: dict[str, Any] | None = None  # the worker's compile state (compiled models)
        self.shm: ShmRing | None = None  # shared-memory slots for this worker (same host), see shm.py
        self.forecast = BusyForecast()  # when its device frees: paces partial batches, see pacing.py

    def close_shm(self) -> list[str]:
        """Stop sending through shared memory; returns the slot names the worker still maps."""
        ring, self.shm = self.shm, None
        return ring.close() if ring is not None else []

    def observe_throughput(self, n: int, service_s: float) -> None:
        if service_s <= 0:
            return
        rate = n / service_s
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
            "forecast": self.forecast.state(),
            "compile": self.compile,
            "transport": "shared-memory" if self.shm is not None else "comm",
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

    Notes
    -----
    Every request's future resolves exactly once, whatever fails:

    - a worker that dies or leaves with batches in flight: their requests go back to the front of
      the queue and run elsewhere (a request whose worker died ``MAX_ATTEMPTS`` times fails);
    - no worker able to run the model: requests wait for one to join, or fail at their
      ``timeout`` with a :class:`RequestTimeoutError` that says so;
    - a sample that does not match the input signature: ``submit`` raises
      :class:`InputSignatureError`; a Dask-Future input that does not match fails alone;
    - a sample that makes the model raise: the batch is bisected on the worker and only that
      request fails, with the model's exception and traceback;
    - a full queue: ``ModelSpec.overload`` says whether ``submit`` waits or raises
      :class:`QueueFullError`;
    - :meth:`close`, or the client closing: queued requests are cancelled (see :meth:`close`).
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
        self._inflight: dict[int, list[Request]] = {}  # batches sent and not answered yet
        self._waiting_for_inputs = 0  # requests whose Dask-Future input is not computed yet
        self._counts = {"submitted": 0, "delivered": 0, "failed": 0, "cancelled": 0, "timed_out": 0, "requeued": 0}
        self._counts_lock = threading.Lock()  # user threads and the event loop both count
        self._latencies: deque[float] = deque(maxlen=20_000)  # per request, seconds
        self._history: deque[tuple] = deque(maxlen=5_000)  # rows of history(), see there
        self._wake_pending = False
        self._wake_lock = threading.Lock()
        self._loop = client.loop.asyncio_loop
        self._started_at = time.time()
        self._no_worker_since: float | None = None
        self._refresh_requested = False  # a worker joined or left: refresh the cluster view now
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
        self._update_workers(await self._register())
        _listen_for_advice(self)
        self._wake_event = asyncio.Event()
        self._main_task = asyncio.ensure_future(self._main())

    async def _register(self) -> dict[str, dict]:
        """Register the model on the scheduler (again after a scheduler restart or a reconnect:
        the scheduler forgets a model when its last client leaves); returns the workers' views."""
        spec = self.spec
        reply = await self.client.scheduler.dynbatch_register_model(
            name=spec.name,
            payload=self._payload,
            token=self._token,
            resources=dict(spec.resources),
            device=spec.device,
            client=self.client.id,
        )
        return reply["workers"]

    def close(self, drain: bool = False, timeout: float | str | None = None) -> asyncio.Future | None:
        """Stop accepting requests; ``submit`` raises :class:`BatcherClosedError` from now on.

        With ``drain=False`` (default) requests still queued are cancelled (``future.cancelled()``
        is ``True``), and so are requests whose Dask-Future input is not computed yet. Batches
        already sent complete and deliver. A request that already started once and waits to run
        again (its worker died) can no longer be cancelled: it fails with
        :class:`BatcherClosedError`.

        With ``drain=True`` it first waits (up to ``timeout``) until every request submitted so
        far is delivered or failed, then closes as above. On the event loop of an asynchronous
        client it cannot wait there: it returns an awaitable, ``await batcher.close(drain=True)``.

        A Batcher whose client closes closes too: its queued requests are cancelled and the
        requests of its batches in flight fail with :class:`BatcherClosedError`.
        """
        if drain and self._on_loop_thread():
            return asyncio.ensure_future(self._drain_then_close(timeout))
        if self._closed:
            return None
        if drain:
            deadline = None if timeout is None else time.monotonic() + parse_seconds(timeout, "timeout")
            while self._busy() and (deadline is None or time.monotonic() < deadline):
                time.sleep(0.01)
        self._close_now()
        return None

    async def _drain_then_close(self, timeout: float | str | None) -> None:
        deadline = None if timeout is None else time.monotonic() + parse_seconds(timeout, "timeout")
        while not self._closed and self._busy() and (deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(0.01)
        self._close_now()

    def _busy(self) -> bool:
        return bool(len(self._queue) or self._waiting_for_inputs or self._inflight)

    def _close_now(self, error: BaseException | None = None) -> None:
        """Close: cancel what is queued (what cannot be cancelled fails with ``error``); wake blocked submitters."""
        if self._closed:
            return
        self._closed = True
        started = []
        cancelled = 0
        for req in self._queue.drain():
            if req.future.cancel():
                cancelled += 1
            else:  # re-queued after its worker died: running, so it cannot be cancelled
                started.append(req)
        self._count("cancelled", cancelled)
        if started:
            self._fail(started, error or _closed_error(
                self.spec.name, "the request waited to run again after its worker died, and was not re-run"))
        with self._room:
            self._room.notify_all()
        self._wake()

    def _abandon(self, reason: str) -> None:
        """The client is gone: nothing can be sent or received any more. Resolve every future."""
        logger.warning("dynbatch: closing the Batcher of model %r: %s", self.spec.name, reason)
        error = _closed_error(self.spec.name, reason)
        self._close_now(error)
        for reqs in list(self._inflight.values()):
            self._fail(reqs, error)

    def _client_gone(self) -> bool:
        return self.client.status in ("closing", "closed")

    def __enter__(self) -> Batcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- submit ----------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise BatcherClosedError(self.spec.name)

    def _count(self, key: str, n: int = 1) -> None:
        if n:
            with self._counts_lock:
                self._counts[key] += n

    def _as_sample(self, x: Any) -> np.ndarray:
        """``x`` as a NumPy sample that matches the model's input signature, or a clear error."""
        name = self.spec.name
        try:
            sample = as_numpy_sample(x)
        except TypeError:
            raise
        except Exception as exc:  # ragged nested lists, objects whose __array__ fails
            if self._signature is not None:
                takes = f"model {name!r} expects one sample of shape {self._signature[0]} and dtype {self._signature[1]}"
            else:
                takes = f"model {name!r} takes one sample as an array"
            raise InputSignatureError(
                f"{takes}; could not make an array of the {type(x).__name__} given ({exc})"
            ) from None
        signature = self._signature
        if signature is not None:  # the hot path: one comparison per request, no string formatting
            shape, dtype = signature
            if sample.shape == shape and sample.dtype == dtype:
                return sample
            raise InputSignatureError(
                f"model {name!r} expects one sample of shape {shape} and dtype {dtype} "
                f"(no batch dimension); {_received(x, sample)}"
            )
        received = _received(x, sample)
        # no signature yet: this sample sets it, if it can be one
        if sample.dtype.kind not in _NUMERIC_KINDS:
            raise InputSignatureError(
                f"model {name!r} takes arrays of numbers or booleans; {received}. To send other values, "
                "declare ModelSpec(input_shape=..., input_dtype=...)"
            )
        if sample.ndim == 0:
            raise InputSignatureError(
                f"model {name!r}: a sample must be an array with at least one dimension, not a scalar; {received}. "
                "For scalar samples declare ModelSpec(input_shape=(), input_dtype=...)"
            )
        if sample.size == 0:
            raise InputSignatureError(f"model {name!r}: a sample must not be empty; {received}")
        self._signature = (sample.shape, sample.dtype)
        return sample

    def _make_request(self, x: Any, sample: np.ndarray | None, priority: int, deadline: float | None,
                      now: float) -> Request:
        future = RequestFuture()
        if sample is None:  # a Dask Future
            return Request(None, future, priority=priority, deadline=deadline, enqueued=now, dask_future=x)
        req = Request(sample, future, priority=priority, deadline=deadline, enqueued=now)
        if type(x).__module__.startswith("torch"):
            future._as_torch = True
        return req

    def submit(self, x: Any, *, priority: int = 0, timeout: float | str | None = None) -> RequestFuture:
        """Submit one sample (no batch dimension) or a Dask Future whose value is one sample.

        ``priority``: higher is batched first. ``timeout``: a request whose batch has not started
        this long after ``submit`` fails with :class:`RequestTimeoutError` and is not run (also
        when it waits for a worker, or, with ``overload="block"``, for room in the queue).

        A sample that does not match the model's input signature (declared in the
        :class:`ModelSpec`, else learned from the first sample: an array of numbers or booleans
        with at least one dimension and one element) raises :class:`InputSignatureError` here.
        When the queue holds ``ModelSpec.max_queue`` requests, ``overload="block"`` waits for room
        and ``overload="reject"`` raises :class:`QueueFullError`.
        """
        return self.map([x], priority=priority, timeout=timeout)[0]

    def map(self, xs: Iterable[Any], *, priority: int = 0, timeout: float | str | None = None) -> list[RequestFuture]:
        """Submit many samples; one future per sample, in order.

        Every sample is checked before any is queued: one that does not match raises and none is
        submitted. Then requests join the queue in chunks of :data:`MAP_CHUNK`, so that the first
        batches are on their way while the rest are still being made.
        """
        self._check_open()
        now = time.monotonic()
        deadline = None if timeout is None else now + parse_seconds(timeout, "timeout")
        xs = xs if isinstance(xs, (list, tuple)) else list(xs)
        samples = [None if isinstance(x, DaskFuture) else self._as_sample(x) for x in xs]
        limit = self.spec.max_queue
        if self.spec.overload == "reject" and limit is not None:
            inline = sum(1 for sample in samples if sample is not None)
            if len(self._queue) + inline > limit:  # all or nothing
                raise self._queue_full_error()
        futures: list[RequestFuture] = []
        yield_gil = len(xs) > MAP_CHUNK and not self._on_loop_thread()
        for start in range(0, len(xs), MAP_CHUNK):
            if yield_gil and start:
                # let the event loop and the stacking threads take the GIL: otherwise this loop
                # holds it until the switch interval, and the first batches leave only once all
                # requests are made (0.7 s for 120,000 on the H200 host, the GPU idle meanwhile)
                time.sleep(MAP_YIELD_S)
            requests = [self._make_request(x, sample, priority, deadline, now)
                        for x, sample in zip(xs[start:start + MAP_CHUNK], samples[start:start + MAP_CHUNK])]
            self._count("submitted", len(requests))
            self._enqueue([req for req in requests if req.dask_future is None], deadline)
            for req in requests:
                if req.dask_future is not None:
                    self._wait_for_input(req)
            futures.extend(r.future for r in requests)
        return futures

    def _enqueue(self, requests: list[Request], deadline: float | None = None) -> None:
        if not requests:
            return
        limit = self.spec.max_queue
        if limit is not None and len(self._queue) + len(requests) > limit:
            if self.spec.overload == "reject":
                raise self._queue_full_error()
            if self._on_loop_thread():
                raise QueueFullError(
                    f"model {self.spec.name!r}: the queue is full (max_queue={limit}) and submit() was called on the "
                    "client's event loop, where it cannot block; await earlier results first"
                )
            start = 0  # block: push what fits, wait for room for the rest
            while start < len(requests):
                with self._room:
                    while len(self._queue) >= limit and not self._closed:
                        if deadline is not None and time.monotonic() > deadline:
                            break
                        self._room.wait(0.1)
                if deadline is not None and time.monotonic() > deadline and len(self._queue) >= limit:
                    self._fail(requests[start:], RequestTimeoutError(
                        f"request to model {self.spec.name!r} timed out waiting for room in the queue "
                        f"(max_queue={limit}, overload='block')"), "timed_out")
                    return
                self._check_open()
                room = max(1, limit - len(self._queue))
                self._queue.push(requests[start : start + room])
                start += room
                self._wake()
            return
        self._queue.push(requests)
        self._wake()

    def _queue_full_error(self) -> QueueFullError:
        return QueueFullError(
            f"model {self.spec.name!r}: the queue holds {len(self._queue)} requests (max_queue={self.spec.max_queue}); "
            "retry later, or raise ModelSpec.max_queue / use overload='block'"
        )

    def _on_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def _wait_for_input(self, req: Request) -> None:
        """A Dask-Future input joins the queue once its value exists on a worker (its data stays there)."""
        with self._counts_lock:
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
                if req.future.done():
                    if req.future.cancelled():  # by its user, while its input was computed
                        self._count("cancelled")
                elif self._closed:
                    if req.future.cancel():
                        self._count("cancelled")
                else:
                    self._queue.push([req])
                    self._wake()
                return
            exc = await dask_future._exception() if status == "error" else None
            if exc is None:
                exc = RuntimeError(f"the Dask Future given as input is {status}: {dask_future.key!r}")
            if not req.future.done():
                req.future.set_exception(exc)
                self._count("failed")
            elif req.future.cancelled():
                self._count("cancelled")
        finally:
            with self._counts_lock:
                self._waiting_for_inputs -= 1

    # -- dispatcher (client event loop) -----------------------------------------------------------
    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        try:
            self._loop.call_soon_threadsafe(self._wake_on_loop)
        except RuntimeError:  # the client's loop is closed: nothing left to wake
            pass

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
            if self._client_gone():
                if not self._closed or self._inflight:
                    self._abandon(f"its client is {self.client.status}")
                for slot in self._slots.values():  # the scheduler drops the workers' mappings
                    slot.close_shm()
                return
            now = time.monotonic()
            if self._closed and not self._inflight:
                await self._report()
                await self._release_shm()
                return
            try:
                if now >= next_refresh or self._refresh_requested:
                    self._refresh_requested = False
                    next_refresh = now + REFRESH_INTERVAL
                    await self._refresh_workers()
                if now >= next_report:
                    next_report = now + REPORT_INTERVAL
                    asyncio.ensure_future(self._report())
                timeout = min(self._dispatch(now), max(0.0, next_refresh - now))
            except Exception:  # a bug must not stop the dispatcher: requests would wait forever
                logger.exception("dynbatch: dispatcher error for model %r", self.spec.name)
                timeout = REFRESH_INTERVAL

    def _fail(self, reqs: Iterable[Request], exc: BaseException, counter: str = "failed") -> None:
        n = 0
        for req in reqs:
            try:
                req.future.set_exception(exc)
                n += 1
            except concurrent.futures.InvalidStateError:
                pass
        self._count(counter, n)
        with self._room:
            self._room.notify_all()

    def _timeout_error(self, now: float) -> RequestTimeoutError:
        message = f"request to model {self.spec.name!r} timed out before its batch started"
        if self._no_worker_since is not None:
            message += (
                f": no worker able to run the model for the last {now - self._no_worker_since:.1f} s "
                f"({self._worker_requirements()})"
            )
        return RequestTimeoutError(message)

    def _worker_requirements(self) -> str:
        needs = ["the DynBatchPlugin's worker half"]
        if self.spec.resources:
            needs.append(f"resources {dict(self.spec.resources)}")
        if self.spec.device == "cuda":
            needs.append("a CUDA device")
        return "a worker needs " + ", ".join(needs)

    def _dispatch(self, now: float) -> float:
        """Form and send as many batches as workers have room for; return seconds until the next try."""
        live = [s for s in self._slots.values() if s.alive]
        if not live and len(self._queue):
            if self._no_worker_since is None:
                self._no_worker_since = now
                logger.warning(
                    "dynbatch: no worker can run model %r (%s); %d requests wait for one to join "
                    "(or fail at their timeout)", self.spec.name, self._worker_requirements(), len(self._queue)
                )
        elif live and self._no_worker_since is not None:
            logger.info("dynbatch: workers for model %r are back after %.1f s", self.spec.name, now - self._no_worker_since)
            self._no_worker_since = None
        expired = self._queue.expire(now)
        if expired:
            self._fail(expired, self._timeout_error(now), "timed_out")
        if not len(self._queue) or not live or self._closed:
            return REFRESH_INTERVAL
        max_delay = self.spec.max_delay
        rates = fill_unknown_throughputs(
            {s.address: s.throughput for s in live}, {s.address: _benchmark_score(s.view) for s in live}
        )
        if all(s.inflight >= self.spec.max_inflight for s in live):
            return REFRESH_INTERVAL
        # busy workers stay in the plan (free_slots=0): the split keeps their share for them
        loads = [self._load(s, rates.get(s.address)) for s in live]
        full_size = {load.address: min(load.batch_size, load.cap or load.batch_size) for load in loads}
        retry_in = REFRESH_INTERVAL
        for address, size in plan(len(self._queue), loads):
            slot = self._slots[address]
            if size < full_size[address] and slot.inflight > 0:
                # A partial batch for a busy worker would only wait there: keep filling it here.
                # One batch may wait behind the running one (its transfer overlaps that compute)
                # once the oldest request has waited max_delay; more than that must be full.
                if slot.inflight >= PARTIAL_INFLIGHT:
                    continue
                oldest = self._queue.oldest_enqueued()
                if oldest is not None and now - oldest < max_delay:
                    retry_in = min(retry_in, oldest + max_delay - now)
                    continue
                # ...and not before it would reach the device as it frees (just in time: it carries
                # every request that arrives meanwhile, and the device does not wait for it)
                send_at = slot.forecast.send_at(size)
                if now < send_at:
                    retry_in = min(retry_in, send_at - now)
                    continue
            batch, expired = self._queue.pop(size, now)
            if expired:
                self._fail(expired, self._timeout_error(now), "timed_out")
            if batch:
                slot.inflight += 1
                slot.inflight_samples += len(batch)
                self._inflight[id(batch)] = batch
                slot.forecast.sent(len(batch), now)
                full = len(batch) >= full_size[address]
                asyncio.ensure_future(self._send(slot, batch, now, slot.inflight, slot.controller.size, full))
        with self._room:
            self._room.notify_all()
        return retry_in

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

    async def _send(self, slot: _WorkerSlot, reqs: list[Request], formed: float, depth: int, proposed: int,
                    full: bool = True) -> None:
        """Send one batch and deliver its results.

        ``depth``: batches in flight on that worker when this one was sent, itself included;
        ``proposed``: the controller's size then; ``full``: whether the batch is as large as the
        worker's size (not the short tail of a backlog). Whatever happens, every request of the batch is
        resolved or back in the queue when this returns."""
        try:
            await self._run_batch(slot, reqs, depth, proposed, full, formed)
        except Exception as exc:  # a reply we cannot read, a model output we cannot split...
            logger.warning("dynbatch: batch of %d for model %r failed on the client: %r", len(reqs), self.spec.name, exc)
            self._fail(reqs, exc)  # the requests not resolved yet
        finally:
            self._inflight.pop(id(reqs), None)
            slot.inflight -= 1
            slot.inflight_samples -= len(reqs)
            slot.forecast.replied(len(reqs), time.monotonic())
            self._wake()

    async def _run_batch(self, slot: _WorkerSlot, reqs: list[Request], depth: int, proposed: int,
                         full: bool = True, formed: float | None = None) -> None:
        oldest = min(r.enqueued for r in reqs)
        inline = [r.sample for r in reqs if r.dask_future is None]
        keyed = [(i, r.dask_future.key) for i, r in enumerate(reqs) if r.dask_future is not None]
        ring = slot.shm
        shm_slot: ShmSlot | None = None
        new_slot = False
        shm_ref: dict[str, Any] | None = None
        batch = None
        if inline:
            nbytes = inline[0].nbytes * len(inline)
            loop = asyncio.get_running_loop()
            if ring is not None and nbytes >= _shm_min_bytes():
                shm_slot = ring.acquire(nbytes)
                # a slot's first batch pays one-time costs on both sides: the client's first writes
                # fault its pages in, the worker maps it and (GPU) page-locks it
                new_slot = shm_slot is not None and not shm_slot.attached
            if shm_slot is not None:  # same host: stack straight into shared memory, send its name
                try:
                    shm_ref = await self._stack_shared(inline, shm_slot, nbytes)
                except BaseException:
                    ring.release(shm_slot)
                    raise
            elif nbytes >= STACK_IN_THREAD_BYTES:
                batch = await loop.run_in_executor(_stack_pool(), stack_in_chunks, inline, SEND_CHUNK_BYTES)
            else:
                batch = stack_in_chunks(inline, SEND_CHUNK_BYTES)
        signature = None
        if keyed and self._signature is not None:  # lets the worker check inputs from Dask Futures
            signature = (self._signature[0], self._signature[1].str)
        extra: dict[str, Any] = {}
        if not full:
            extra["full"] = False
        if signature is not None:
            extra["signature"] = signature
        if shm_ref is not None:
            extra["shm"] = shm_ref
        if ring is not None:
            dropped = ring.take_retired()
            if dropped:
                extra["shm_drop"] = dropped
        pool = self.client.rpc
        try:
            try:
                comm = await pool.connect(slot.address, timeout=CONNECT_TIMEOUT)
            except OSError as exc:  # not sent: nothing ran, no attempt used
                self._worker_lost(slot, reqs, exc, sent=False)
                return
            sent = time.monotonic()
            try:
                reply = await send_recv(
                    comm=comm,
                    op="dynbatch_run",
                    serializers=pool.serializers,
                    deserializers=pool.deserializers,
                    model=self.spec.name,
                    token=self._token,
                    n=len(reqs),
                    batch=to_serialize(batch) if batch is not None else None,
                    keyed=keyed or None,
                    client=self.client.id,
                    **extra,
                )
            except OSError as exc:  # the worker died or is unreachable: nothing is lost, re-run elsewhere
                self._worker_lost(slot, reqs, exc, sent=True)
                return
            finally:
                pool.reuse(slot.address, comm)
            if shm_slot is not None and isinstance(reply, dict):
                if reply.get("shm_error") is not None:
                    # nothing ran: send this batch (and, unless the slot was just stale, every
                    # later one to this worker) over the comm
                    self._on_shm_error(slot, ring, shm_slot, reply["shm_error"])
                    shm_slot = None
                    await self._run_batch(slot, reqs, depth, proposed, full, formed)
                    return
                shm_slot.mark_attached()  # the worker maps it: unlink the name, nothing can leak
        finally:
            if shm_slot is not None:
                ring.release(shm_slot)
        if not isinstance(reply, dict):  # no dynbatch_run handler: the worker is closing (plugin torn down)
            self._worker_lost(slot, reqs, RuntimeError(f"the worker answered {reply!r}: it is closing"), sent=False)
            return
        done = time.monotonic()
        if reply.get("batch_error") is not None:
            self._fail(reqs, _remote_exception(reply["batch_error"]))
            return
        self._deliver(reqs, reply, done)
        n = len(reqs)
        compute_s = reply.get("compute_s") or (done - sent)
        # What this batch cost the pipeline, overheads included. When the worker's previous batch
        # came back after this one was sent, the worker was busy with our batches all along, and
        # the time between the two replies is exactly this batch's share: what a steady stream of
        # batches of this size delivers. Otherwise (the pipeline ran dry) its round trip shared
        # with the batches in flight with it. Compute time alone would hide per-batch overheads
        # (transfer, serialisation, the event loops) and favour batches that are too small; the
        # round trip divided by the batches in flight swings with that number, which made the
        # throughput rule stop growth on noise (measured on the GPU).
        previous_done, slot.last_done = slot.last_done, max(slot.last_done, done)
        if depth > 1 and sent < previous_done < done:
            service_s = max(compute_s, done - previous_done)
        else:
            service_s = max(compute_s, (done - sent) / depth)
        slot.batches += 1
        slot.samples += n
        slot.observe_throughput(n, service_s)
        if "cap" in reply:
            slot.cap = reply["cap"]
            slot.controller.set_cap(slot.cap)
        if "compile" in reply:
            self._on_compile_state(slot, reply["compile"])
        formation_wait = min(sent - oldest, self.spec.max_delay)
        latency = (done - sent) + formation_wait  # what its requests saw (after leaving the queue)
        # The controller is held to the batch's own latency (formation wait + its share of the
        # pipeline), not to the wait behind the other batches in flight with it: that wait comes
        # from the load, and shrinking batches would only lower throughput and lengthen it.
        # Batches whose time says little about their size are not shown to the controller: the
        # model was loaded for it (cold), a bucket compiled beside it, its shape was new on the
        # device, or it went through a shared-memory slot for the first time. The slot ring grows to
        # the next power of two as batches grow, and its first up to max_inflight + 1 batches at
        # each new slot size each paid a fresh slot: on an H100 they staged in 7-38 ms instead of
        # 1-2, the controller took that for a throughput fall at that size and, remembering the
        # fall, held the size at 80-112 for ~150 batches (earlier/gpu_h100_3c04b38.json, first pass).
        hidden = next((why for why, flag in (("cold", reply.get("cold")), ("compiling", reply.get("compiling")),
                                             ("new_shape", reply.get("new_shape")), ("new_slot", new_slot)) if flag),
                      None)
        if hidden is None:
            slot.controller.observe(n, formation_wait + service_s, service_s, proposed=proposed)
            decision, reason = slot.controller.decision, slot.controller.reason
            if reply.get("compute_s"):
                # from forming the batch to its rows being ready on the worker: stacking, half the
                # round trip's comm, staging
                lead = None
                if formed is not None:
                    comm_s = max(0.0, (done - sent) - (reply.get("worker_s") or 0.0))
                    lead = (sent - formed) + comm_s / 2 + (reply.get("stage_s") or 0.0)
                slot.forecast.observe(n, reply["compute_s"], lead)
        else:
            decision, reason = "not shown", hidden
        self._history.append((time.time(), slot.address, n, latency, slot.cap, proposed, reply.get("compute_s"),
                              reply.get("wait_s"), reply.get("stage_s"), sent - oldest, done - sent,
                              reply.get("worker_s"), sent - formed if formed is not None else None, service_s,
                              decision, reason))

    async def _stack_shared(self, inline: list[np.ndarray], shm_slot: ShmSlot, nbytes: int) -> dict[str, Any]:
        """Stack the rows into the slot; returns its reference. By default NumPy stacks them, large
        batches in parallel parts from helper threads; with ``dynbatch.transport.shared-memory-copy:
        write`` the slot writes them (:meth:`ShmSlot.write_rows`: the GIL released once), large
        batches from a helper thread. On the H100 host (session 7, one machine, both in one call)
        NumPy's data path moved 46.0k ResNet images/s against 33.8k, and the closed loop reached
        92 % of the eager ceiling against 88 %; ``write`` is for clients whose other threads keep
        the GIL busy (there, NumPy's copy waits for the GIL at every row: see write_rows)."""
        shape = (len(inline), *inline[0].shape)
        if dask.config.get("dynbatch.transport.shared-memory-copy", "numpy") == "write":
            if nbytes >= STACK_IN_THREAD_BYTES:
                await asyncio.get_running_loop().run_in_executor(_stack_pool(), shm_slot.write_rows, inline)
            else:
                shm_slot.write_rows(inline)
            return {"name": shm_slot.name, "shape": shape, "dtype": inline[0].dtype.str}
        view = shm_slot.array(shape, inline[0].dtype)
        if nbytes >= STACK_IN_THREAD_BYTES:
            loop = asyncio.get_running_loop()
            parts = min(STACK_THREADS, max(1, nbytes // STACK_PART_BYTES), len(inline))
            bounds = np.linspace(0, len(inline), parts + 1).astype(int)
            await asyncio.gather(*(
                loop.run_in_executor(_stack_pool(), _stack_into, inline[a:b], view[a:b])
                for a, b in zip(bounds[:-1], bounds[1:])
            ))
        else:
            _stack_into(inline, view)
        return {"name": shm_slot.name, "shape": shape, "dtype": inline[0].dtype.str}

    def _on_shm_error(self, slot: _WorkerSlot, ring: ShmRing, shm_slot: ShmSlot, error: str) -> None:
        """The worker could not map a shared-memory slot. A slot it had mapped before is stale (the
        worker restarted at the same address, or dropped it): retire it and keep the ring; a new one
        it cannot open means another host or container: the comm from now on."""
        stale = shm_slot.attached  # (retiring closes the slot, which marks it so)
        ring.retire(shm_slot)
        if stale:
            logger.info("dynbatch: worker %s lost shared-memory slot %s (%s); a new one is made", slot.address,
                        shm_slot.name, error)
            return
        if slot.shm is ring:
            slot.close_shm()
        logger.info("dynbatch: worker %s cannot map this client's shared memory (%s); batches to it travel "
                    "over the comm", slot.address, error)

    def _on_compile_state(self, slot: _WorkerSlot, state: dict[str, Any] | None) -> None:
        error = (state or {}).get("error")
        if error and not (slot.compile or {}).get("error"):
            warnings.warn(
                f"dask-dynbatch: model {self.spec.name!r} could not be compiled on worker {slot.address} "
                f"and is served eagerly there: {error}",
                CompileWarning,
                stacklevel=2,
            )
        slot.compile = state

    def _deliver(self, reqs: list[Request], reply: dict, done: float) -> None:
        self._latencies.extend(done - r.enqueued for r in reqs)
        for row, err in reply["errors"]:
            self._fail([reqs[row]], _remote_exception(err))
        for rows, outputs in reply["pieces"]:
            if isinstance(outputs, Serialize):  # the in-process transport does not serialise
                outputs = outputs.data
            delivered = 0
            for row, value in zip(rows, split_rows(outputs, len(rows))):
                req = reqs[row]
                if getattr(req.future, "_as_torch", False):
                    value = _to_torch(value)
                try:
                    req.future.set_result(value)
                    delivered += 1
                except concurrent.futures.InvalidStateError:
                    pass
            self._count("delivered", delivered)

    def _worker_lost(self, slot: _WorkerSlot, reqs: list[Request], exc: BaseException, *, sent: bool) -> None:
        """The batch's worker died or could not be reached: its requests go back to the front of
        the queue (``sent``: it may have run there; a request lost this way ``MAX_ATTEMPTS`` times
        fails, in case it is what kills workers)."""
        slot.alive = False
        slot.lost_until = time.monotonic() + LOST_COOLDOWN
        if self._closed:
            self._fail(reqs, _closed_error(self.spec.name, f"its worker {slot.address} was lost ({exc}) after the close"))
            return
        logger.warning("dynbatch: lost contact with %s (%s); re-queuing %d requests", slot.address, exc, len(reqs))
        retry, give_up = [], []
        for req in reqs:
            if sent:
                req.attempts += 1
            (retry if req.attempts < MAX_ATTEMPTS else give_up).append(req)
        if give_up:
            self._fail(give_up, RuntimeError(
                f"model {self.spec.name!r}: the worker running this request died {MAX_ATTEMPTS} times "
                f"(last: {slot.address}, {exc}); it is not tried again"))
        self._queue.push(retry, front=True)
        self._count("requeued", len(retry))

    async def _release_shm(self) -> None:
        """Closed: free this Batcher's shared-memory slots, and the workers' mappings of them."""

        async def drop(address: str, names: list[str]) -> None:
            try:
                await self.client.rpc(address).dynbatch_shm_drop(client=self.client.id, names=names)
            except Exception as exc:  # the worker left: its mappings went with it
                logger.debug("dynbatch: shared-memory drop on %s failed: %r", address, exc)

        drops = [(a, s.close_shm()) for a, s in self._slots.items()]
        await asyncio.gather(*(drop(a, names) for a, names in drops if names))

    async def _refresh_workers(self) -> None:
        try:
            try:
                views = await self.client.scheduler.dynbatch_workers(model=self.spec.name)
            except UnknownModelError:
                views = await self._register()
        except Exception as exc:  # scheduler unreachable for now (or the client closing): keep the last view
            logger.debug("dynbatch: cluster view not refreshed: %r", exc)
            return
        self._update_workers(views)

    def _update_workers(self, views: dict[str, dict]) -> None:
        now = time.monotonic()
        for address, view in views.items():
            slot = self._slots.get(address)
            if slot is None:
                slot = self._slots[address] = _WorkerSlot(address, view, self._new_controller(view.get("device", "cpu")))
                if _shm_wanted(address):
                    slot.shm = ShmRing(keep=self.spec.max_inflight + 1)
            else:
                slot.view = view
                slot.device = view.get("device", slot.device)
                slot.alive = now >= slot.lost_until
        for address in list(self._slots):
            if address not in views:
                slot = self._slots[address]
                slot.alive = False
                if not slot.inflight:
                    slot.close_shm()  # the worker is gone, and its mappings with it
                    del self._slots[address]

    def _refresh_soon(self) -> None:
        """Re-plan event: a worker joined or left (pushed by the scheduler plugin, on the client loop)."""
        self._refresh_requested = True
        self._wake()

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
        return BatchSizeController(
            self.spec.latency_target,
            initial_size=self.spec.initial_size(device),
            max_size=self.spec.batch_limit(device),
            ladder=self.spec.ladder(device),
        )

    async def _report(self) -> None:
        try:
            await self.client.scheduler.dynbatch_report(batcher=self.id, stats=self.stats(), client=self.client.id)
        except Exception:  # the dashboard view is best effort; the next report repeats it
            logger.debug("dynbatch: report failed", exc_info=True)


    # -- introspection ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counts, queue depth, latency percentiles and, per worker, the controller's state."""
        # deque.copy() runs in C under the GIL: a consistent snapshot while the event loop appends
        lat = np.fromiter(self._latencies.copy(), dtype=float) if self._latencies else None
        with self._counts_lock:
            counts = dict(self._counts)
        counts["cancelled"] += self._queue.cancelled
        return {
            "model": self.spec.name,
            "batcher": self.id,
            "latency_target": self.spec.latency_target,
            "queued": len(self._queue),
            "waiting_for_inputs": self._waiting_for_inputs,
            "in_flight": sum(len(reqs) for reqs in list(self._inflight.values())),
            "no_worker": self._no_worker_since is not None,
            "closed": self._closed,
            **counts,
            "latency_p50": float(np.percentile(lat, 50)) if lat is not None else None,
            "latency_p95": float(np.percentile(lat, 95)) if lat is not None else None,
            "latency_p99": float(np.percentile(lat, 99)) if lat is not None else None,
            "workers": {a: s.to_dict() for a, s in self._slots.items()},
        }

    def history(self) -> list[dict[str, Any]]:
        """Recent batches: time, worker, size, latency, memory cap, controller size; on the worker,
        seconds running (``compute_s``), waiting for the device thread (``wait_s``), staging
        (``stage_s``: copying in, to the device) and in all (``worker_s``); on the client, seconds
        from its oldest request's arrival to the send (``queued_s``: waiting in the queue, then
        stacking), stacking alone (``stack_s``: from forming the batch to sending it) and from the
        send to the reply (``round_trip_s``); the batch's share of the worker's time (``service_s``,
        what its throughput is measured by); and what the batch-size controller made of it
        (``decision``: ``"grow"``, ``"shrink"``, ``"hold"``, or ``"not shown"`` for a batch whose time
        says little about its size, and ``reason``: the controller's words, or why it was not shown:
        ``"cold"``, ``"compiling"``, ``"new_shape"``, ``"new_slot"``)."""
        keys = ("time", "worker", "size", "latency", "cap", "controller_size", "compute_s", "wait_s", "stage_s",
                "queued_s", "round_trip_s", "worker_s", "stack_s", "service_s", "decision", "reason")
        return [dict(zip(keys, row)) for row in self._history.copy()]


# One topic handler per client (a client keeps one handler per topic), fanned out to its batchers.
_advice_listeners: dict[str, weakref.WeakSet] = {}


def _listen_for_advice(batcher: Batcher) -> None:
    client = batcher.client
    listeners = _advice_listeners.get(client.id)
    if listeners is None:
        listeners = _advice_listeners[client.id] = weakref.WeakSet()

        def on_advice(event, listeners=listeners) -> None:
            _, message = event
            for b in list(listeners):
                b._on_advice(message)

        def on_cluster_change(event, listeners=listeners) -> None:
            for b in list(listeners):
                b._refresh_soon()

        client.subscribe_topic(ADVICE_TOPIC, on_advice)
        client.subscribe_topic(CLUSTER_TOPIC, on_cluster_change)
    listeners.add(batcher)


#: dtype kinds a learned input signature accepts: booleans, integers, floats, complex numbers
_NUMERIC_KINDS = "biufc"


def _closed_error(model: str, detail: str) -> BatcherClosedError:
    error = BatcherClosedError(model)
    error.args = (f"{error.args[0]} ({detail})",)
    return error


def _remote_exception(err: dict) -> BaseException:
    """The exception a worker sent (``error_message``), with its traceback; an exception that
    cannot be rebuilt on the client becomes an ``Exception`` carrying its text and the worker's
    traceback text."""
    # the in-process transport leaves the pickled exception in its Serialize wrapper
    err = {k: (v.data if isinstance(v, Serialize) else v) for k, v in err.items()}
    try:
        _, exc, tb = clean_exception(**err)
    except Exception:
        exc, tb = None, None
    if exc is None or (type(exc) is Exception and exc.args and isinstance(exc.args[0], (bytes, bytearray))):
        exc = Exception(err.get("exception_text") or "the worker sent an exception that could not be read")
        tb = None
        tb_text = err.get("traceback_text")
        if tb_text and hasattr(exc, "add_note"):
            exc.add_note(f"traceback on the worker:\n{tb_text}")
    return exc.with_traceback(tb) if tb is not None else exc


def _received(x: Any, sample: np.ndarray) -> str:
    text = f"received shape {sample.shape} and dtype {sample.dtype}"
    return text if isinstance(x, np.ndarray) else f"{text} (from a {type(x).__name__})"


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


def rerun_benchmark(client: Client, workers: Iterable[str] | None = None):
    """Measure the workers' devices with the reference model again (the load-performance table of
    S1, which each worker also measures when the plugin starts there); placement uses the new
    scores from the workers' next heartbeats.

    Returns ``{worker address: table}`` (each table a dict with ``rows`` per batch size and
    ``best_throughput``; ``error`` when the worker could not run it). The benchmark runs in each
    worker's device thread, between batches. With an asynchronous client, ``await`` the result.
    """

    async def run() -> dict[str, Any]:
        if not await client.run_on_scheduler(_scheduler_has_plugin):
            raise PluginNotRegisteredError(client.scheduler.address)
        addresses = list(workers) if workers is not None else list((await client.scheduler.identity())["workers"])

        async def one(address: str) -> tuple[str, Any]:
            return address, await client.rpc(address).dynbatch_benchmark()

        return dict(await asyncio.gather(*(one(a) for a in addresses)))

    return run() if client.asynchronous else client.sync(run)
