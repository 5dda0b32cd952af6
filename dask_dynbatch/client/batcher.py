"""The user-facing :class:`Batcher`: one future per request, shipments formed in front of Dask.

A Batcher lives in the client process. ``submit``/``map`` check each sample and put requests into
a :class:`~dask_dynbatch.core.requests.RequestQueue`; its :class:`~dask_dynbatch.client.dispatcher.Dispatcher`
on the client's event loop sends them as shipments to the workers' model servers, which form the
device batches. No Dask task is created per request or per batch. See ``docs/design.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from distributed import Future as DaskFuture
from distributed import as_completed

from ..core.blocks import Block, BlockPart, count_rows
from ..core.requests import Request, RequestFuture, RequestQueue
from ..errors import (
    BatcherClosedError,
    InputSignatureError,
    PluginNotRegisteredError,
    QueueFullError,
    RequestTimeoutError,
)
from ..protocol import HistoryRecord
from ..spec import ModelSpec, parse_seconds
from .dispatcher import Dispatcher, closed_error
from .ledger import Ledger
from .progress import ProgressBar
from .registration import RegisteredModel, fetch_spec
from .samples import check_any
from .transport import Transport, producing

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: map() queues requests in chunks of this many (the dispatcher starts on the first chunk)
MAP_CHUNK = 1024
#: map() sleeps this long between chunks (from another thread than the event loop's), so that the
#: event loop and the stacking threads get the GIL and the first shipments leave meanwhile
MAP_YIELD_S = 0.0005
#: seconds between checks of a collection task waiting for the queue to run short, besides the
#: dispatcher's notices
BACKLOG_RECHECK = 0.05


def _sync_or_async(client: Client, make: Callable[[], Awaitable[T]]) -> T | Awaitable[T]:
    """Run ``make()`` to completion for a synchronous client; hand back the awaitable for an
    asynchronous one."""
    return make() if client.asynchronous else client.sync(make)


class Batcher:
    """Dynamic batching of inference requests for one model on a Dask cluster.

    Parameters
    ----------
    client
        A connected :class:`distributed.Client` whose scheduler has the
        :class:`~dask_dynbatch.DynBatchPlugin` registered.
    spec
        The model, see :class:`~dask_dynbatch.ModelSpec`. It is registered on the cluster under its
        name: a Batcher of the same name and the same spec (from any client) attaches to it and
        shares its loaded model and its device batches; a different spec under that name raises
        :class:`~dask_dynbatch.ModelConflictError`.
    replace
        Replace a registered model of the same name that differs: new shipments go to the new
        version, shipments in flight finish on the old one, which is then unloaded; every Batcher
        of that name switches (``history()`` says which version served each shipment).

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

    - a worker that dies or leaves with shipments in flight: their requests go back to the front of
      the queue and run elsewhere; those that may have run there are retried in halves that run
      alone, so that a request that kills its worker fails alone with :class:`WorkerCrashError`;
    - a device batch that runs far past its time (``ModelSpec.execution_timeout``): its requests are
      retried in halves the same way (the one that hangs fails with :class:`ExecutionTimeoutError`),
      and its worker is restarted;
    - a request's ``timeout`` passes, queued or running: it fails with :class:`RequestTimeoutError`
      at once; a result that arrives later is dropped;
    - no worker able to run the model: requests wait for one to join, or fail at their
      ``timeout`` with a :class:`RequestTimeoutError` that says so;
    - a sample that does not match the input signature: ``submit`` raises
      :class:`InputSignatureError`; a Dask-Future input that does not match fails alone;
    - a sample that makes the model raise: the device batch is bisected on the worker and only that
      request fails, with the model's exception and traceback;
    - a full queue: ``ModelSpec.overload`` says whether ``submit`` waits or raises
      :class:`QueueFullError`;
    - :meth:`close`, or the client closing: queued requests are cancelled (see :meth:`close`).
    """

    def __init__(self, client: Client, spec: ModelSpec, *, replace: bool = False):
        if not isinstance(spec, ModelSpec):
            raise TypeError(f"Batcher needs a ModelSpec, not {type(spec).__name__}")
        self.client = client
        self.id = f"{spec.name}-{uuid.uuid4().hex[:8]}"
        self._model = RegisteredModel(spec)
        self._queue = RequestQueue()
        self._ledger = Ledger()
        self._closed = False
        self._waiting_for_inputs = 0  # requests whose Dask-Future input is not computed yet
        self._waiting_lock = threading.Lock()
        self._history: deque[HistoryRecord] = deque(maxlen=5_000)
        self._transport = Transport(client, spec.name, weighed=spec.cost is not None)
        self._dispatcher = Dispatcher(client, self._model, self._queue, self._ledger, self._transport,
                                      self._history, report=self._report)
        self._dispatcher.batcher_id = self.id
        self._dispatcher.on_client_gone = self._abandon
        self._loop = client.loop.asyncio_loop

        async def start() -> None:
            views = await self._model.register(client, replace=replace)
            self._dispatcher.start(views)

        self._started = _sync_or_async(client, start)
        if client.asynchronous:
            self._started = asyncio.ensure_future(self._started)

    @classmethod
    def from_name(cls, client: Client, name: str) -> Batcher:
        """A Batcher of the model registered under ``name`` (by this client or another): it shares
        that model's loaded copies and device batches.

        Raises :class:`~dask_dynbatch.UnknownModelError` when no model of that name is registered.
        With an asynchronous client, ``await Batcher.from_name(client, name)``.
        """
        if client.asynchronous:

            async def attach() -> Batcher:
                return await cls(client, await fetch_spec(client, name))

            return attach()  # type: ignore[return-value]
        return cls(client, client.sync(fetch_spec, client, name))

    @property
    def spec(self) -> ModelSpec:
        """The model's spec (the new one, once the model was replaced)."""
        return self._model.spec

    @property
    def version(self) -> int:
        """The version of the model this Batcher sends to."""
        return self._model.version

    def __await__(self):
        async def wait() -> Batcher:
            if isinstance(self._started, asyncio.Future):
                await self._started
            return self

        return wait().__await__()

    def __repr__(self) -> str:
        return f"<Batcher {self.spec.name!r} v{self.version}: queued={len(self._queue)} workers={len(self._dispatcher.slots)}>"

    def __enter__(self) -> Batcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- submitting ---------------------------------------------------------------------------------
    def submit(self, x: Any, *, priority: int = 0, timeout: float | str | None = None) -> RequestFuture:
        """Submit one sample (no batch dimension) or a Dask Future whose value is one sample.

        ``priority``: higher is batched first (also against other clients' requests on the worker).
        ``timeout``: a request without its result this long after ``submit`` fails with
        :class:`RequestTimeoutError`: not run if it was still waiting (also for a worker, or, with
        ``overload="block"``, for room in the queue); if its shipment was running, a result that
        arrives later is dropped.

        A sample that does not match the model's input signature (declared in the
        :class:`ModelSpec`, else learned from the first sample: an array of numbers or booleans
        with at least one dimension and one element) raises :class:`InputSignatureError` here.
        When the queue holds ``ModelSpec.max_queue`` requests, ``overload="block"`` waits for room
        and ``overload="reject"`` raises :class:`QueueFullError`.
        """
        return self._submit_all([x], priority, timeout, raise_rejected=True)[0]

    def map(self, xs: Iterable[Any], *, priority: int = 0, timeout: float | str | None = None,
            progress: bool = False) -> list[RequestFuture]:
        """Submit many samples; one future per sample, in order.

        Requests are checked and queued in chunks of :data:`MAP_CHUNK`, so that the first shipments
        are on their way while the rest are still being checked. A sample that does not match the
        model's input signature fails its own future (the error names its index); the others run.
        ``progress=True`` shows a progress bar (text on stderr, a widget in a notebook) that follows
        the futures until all have finished; ``map`` itself returns at once.
        """
        futures = self._submit_all(xs, priority, timeout, raise_rejected=False)
        if progress:
            ProgressBar(futures)
        return futures

    def predict(self, x: Any, *, priority: int = 0, timeout: float | str | None = None,
                progress: bool = False, on_error: str = "raise") -> Any:
        """Run the model on every sample of the array ``x`` (its first dimension indexes the
        samples) and return the outputs as one array, in order (a list when their shapes differ).

        The rows are checked against the input signature at once (:class:`InputSignatureError`
        for the whole array) and queued in blocks of rows, one request each (not a request per
        row); the rows are batched with everyone else's, and a block may be cut between shipments
        and workers. Raises the exception of the first row that failed (the rest of its block is
        dropped; ``stats()`` counts its rows failed). A torch tensor in gives a tensor out.
        ``progress=True`` shows a progress bar while waiting.

        ``x`` may also be a Dask collection: the result is then a lazy collection of the same kind
        (a dask Array with the input's row chunks, a Bag, a DataFrame or Series with the index
        kept; a frame's rows are dict samples keyed by column). Computing it runs each block's rows
        through the model servers from the worker that holds the block, never through the client,
        in dynamic batches across blocks. A row that fails fails the computation with an error
        naming its position, or, with ``on_error="missing"``, its output is missing (NaN; None in
        a Bag) and :meth:`row_errors` lists it. There ``timeout`` counts from when a block's task
        starts, its wait for the model's queue to run short included.

        Examples
        --------
        >>> outputs = batcher.predict(images)   # doctest: +SKIP
        >>> outputs.shape                       # doctest: +SKIP
        (100000, 10)
        """
        from .bulk import predict

        return predict(self, x, priority=priority, timeout=timeout, progress=progress, on_error=on_error)

    def _submit_all(self, xs: Iterable[Any], priority: int, timeout: float | str | None, *,
                    raise_rejected: bool, into: list[RequestFuture] | None = None) -> list[RequestFuture]:
        """Queue ``xs``, one request each; ``into``: the list the futures are appended to as they
        are made (a progress bar reads it)."""
        self._check_open()
        now = time.monotonic()
        deadline = None if timeout is None else now + parse_seconds(timeout, "timeout")
        xs = xs if isinstance(xs, (list, tuple, np.ndarray)) else list(xs)
        spec = self.spec
        if spec.overload == "reject" and spec.max_queue is not None:
            inline = sum(1 for x in xs if not isinstance(x, DaskFuture))
            if len(self._queue) + inline > spec.max_queue:  # all or nothing
                raise self._queue_full_error()
        futures: list[RequestFuture] = [] if into is None else into
        yield_gil = len(xs) > MAP_CHUNK and not self._on_loop_thread()
        with producing() if yield_gil else contextlib.nullcontext():
            self._submit_chunks(xs, priority, deadline, now, raise_rejected, futures, yield_gil)
        return futures

    def _submit_chunks(self, xs: Any, priority: int, deadline: float | None, now: float, raise_rejected: bool,
                       futures: list[RequestFuture], yield_gil: bool) -> None:
        for start in range(0, len(xs), MAP_CHUNK):
            if yield_gil and start:
                time.sleep(MAP_YIELD_S)
            requests, rejected = [], []
            for i, x in enumerate(xs[start:start + MAP_CHUNK], start):
                try:
                    sample = None if isinstance(x, DaskFuture) else check_any(x, self._model)
                except (InputSignatureError, TypeError) as exc:
                    if raise_rejected:
                        raise
                    rejected.append((Request(None, enqueued=now), type(exc)(f"sample {i} of map(): {exc}")))
                    futures.append(rejected[-1][0].future)
                    continue
                requests.append(self._request(x, sample, priority, deadline, now))
                futures.append(requests[-1].future)
            self._ledger.count("submitted", len(requests) + len(rejected))
            for req, exc in rejected:
                self._ledger.fail([req], exc)
            self._enqueue([req for req in requests if req.dask_future is None], deadline)
            self._wait_for_inputs([req for req in requests if req.dask_future is not None])

    def _submit_blocks(self, rows: np.ndarray, block_rows: int, priority: int, timeout: float | str | None,
                       into: list[RequestFuture]) -> list[int]:
        """Queue ``rows`` (C-contiguous, already checked against the signature) as blocks of up to
        ``block_rows`` rows: one request and one future each (:mod:`~dask_dynbatch.core.blocks`);
        the futures are appended to ``into``. Returns the blocks' rows."""
        self._check_open()
        now = time.monotonic()
        deadline = None if timeout is None else now + parse_seconds(timeout, "timeout")
        spec = self.spec
        if spec.max_queue is not None:
            block_rows = min(block_rows, spec.max_queue)  # a block must fit into an empty queue
            if spec.overload == "reject" and len(self._queue) + len(rows) > spec.max_queue:  # all or nothing
                raise self._queue_full_error()
        requests: list[Request] = []
        for start in range(0, len(rows), block_rows):
            block = rows[start : start + block_rows]
            requests.append(BlockPart(Block(len(block)), block, priority=priority, deadline=deadline, enqueued=now))
        into.extend(r.future for r in requests)
        sizes = [r.rows for r in requests]  # before the dispatcher cuts any of them
        self._ledger.count("submitted", len(rows))
        self._enqueue(requests, deadline)
        return sizes

    def _request(self, x: Any, sample: Any, priority: int, deadline: float | None,
                 now: float) -> Request:
        if sample is None:  # a Dask Future
            return Request(None, priority=priority, deadline=deadline, enqueued=now, dask_future=x)
        return Request(sample, priority=priority, deadline=deadline, enqueued=now,
                       as_torch=type(x).__module__.startswith("torch"))

    def _enqueue(self, requests: list[Request], deadline: float | None = None) -> None:
        if not requests:
            return
        limit = self.spec.max_queue
        if limit is None or len(self._queue) + count_rows(requests)[0] <= limit:
            self._queue.push(requests)
            self._dispatcher.wake()
            return
        if self.spec.overload == "reject":
            raise self._queue_full_error()
        if self._on_loop_thread():
            raise QueueFullError(
                f"model {self.spec.name!r}: the queue is full (max_queue={limit}) and submit() was called on the "
                "client's event loop, where it cannot block; await earlier results first"
            )
        start = 0  # block: push what fits, wait for room for the rest
        room = self._ledger.room
        while start < len(requests):
            with room:
                room.wait_for(lambda: len(self._queue) + requests[start].rows <= limit or self._closed or
                              (deadline is not None and time.monotonic() > deadline), timeout=None if deadline is None
                              else max(0.0, deadline - time.monotonic()))
            if deadline is not None and time.monotonic() > deadline and len(self._queue) + requests[start].rows > limit:
                self._ledger.fail(requests[start:], RequestTimeoutError(
                    f"request to model {self.spec.name!r} timed out waiting for room in the queue "
                    f"(max_queue={limit}, overload='block')"), "timed_out")
                return
            self._check_open()
            take, free = 0, limit - len(self._queue)  # at least one request: the wait made room for it
            while start + take < len(requests) and (take == 0 or requests[start + take].rows <= free):
                free -= requests[start + take].rows
                take += 1
            self._queue.push(requests[start : start + take])
            start += take
            self._dispatcher.wake()

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

    def _wait_for_inputs(self, reqs: list[Request]) -> None:
        """Requests whose input is a Dask Future join the queue once its value exists on a worker
        (the value stays there; the worker fetches it)."""
        if not reqs:
            return
        with self._waiting_lock:
            self._waiting_for_inputs += len(reqs)
        if self._on_loop_thread():
            self._dispatcher.in_background(self._inputs_ready(reqs))
        else:
            self._loop.call_soon_threadsafe(lambda: self._dispatcher.in_background(self._inputs_ready(reqs)))

    async def _inputs_ready(self, reqs: list[Request]) -> None:
        by_future: dict[Any, list[Request]] = {}
        for req in reqs:
            by_future.setdefault(req.dask_future, []).append(req)
        async for dask_future in as_completed(list(by_future), loop=self.client.loop):
            for req in by_future.pop(dask_future, ()):
                try:
                    await self._input_ready(req)
                finally:
                    with self._waiting_lock:
                        self._waiting_for_inputs -= 1

    async def _input_ready(self, req: Request) -> None:
        dask_future = req.dask_future
        if dask_future.status == "finished":
            if req.future.done():
                if req.future.cancelled():  # by its user, while its input was computed
                    self._ledger.count("cancelled")
            elif self._closed:
                if req.future.cancel():
                    self._ledger.count("cancelled")
            else:
                self._queue.push([req])
                self._dispatcher.wake()
            return
        exc = None
        if dask_future.status == "error":
            exc = await dask_future.exception(asynchronous=True)
        if exc is None:
            exc = RuntimeError(f"the Dask Future given as input is {dask_future.status}: {dask_future.key!r}")
        if not req.future.done():
            self._ledger.fail([req], exc)
        elif req.future.cancelled():
            self._ledger.count("cancelled")

    def _check_open(self) -> None:
        if self._closed:
            raise BatcherClosedError(self.spec.name)

    # -- closing ------------------------------------------------------------------------------------
    def close(self, drain: bool = False, timeout: float | str | None = None) -> Awaitable[None] | None:
        """Stop accepting requests; ``submit`` raises :class:`BatcherClosedError` from now on.

        With ``drain=False`` (default) requests still queued are cancelled (``future.cancelled()``
        is ``True``), and so are requests whose Dask-Future input is not computed yet. Shipments
        already sent complete and deliver. A request that already started once and waits to run
        again (its worker died) can no longer be cancelled: it fails with
        :class:`BatcherClosedError`.

        With ``drain=True`` it first waits (up to ``timeout``) until every request submitted so
        far is delivered or failed, then closes as above. With an asynchronous client it returns an
        awaitable: ``await batcher.close(drain=True)``.

        A Batcher whose client closes closes too: its queued requests are cancelled and the
        requests of its shipments in flight fail with :class:`BatcherClosedError`.
        """
        deadline = None if timeout is None else time.monotonic() + parse_seconds(timeout, "timeout")

        async def close() -> None:
            while drain and not self._closed and self._busy() and (deadline is None or time.monotonic() < deadline):
                await asyncio.sleep(0.01)
            self._close_now()

        if not drain or self._closed:
            self._close_now()
            return None
        if self.client.asynchronous or self._on_loop_thread():
            return asyncio.ensure_future(close()) if self._on_loop_thread() else close()
        self.client.sync(close)
        return None

    def _busy(self) -> bool:
        return bool(len(self._queue) or self._waiting_for_inputs or self._dispatcher.inflight
                    or len(self._dispatcher.quarantine))

    def _close_now(self, error: BaseException | None = None) -> None:
        """Close: cancel what is queued (what cannot be cancelled fails with ``error``); wake blocked submitters."""
        if self._closed:
            return
        self._closed = True
        self._dispatcher.closed = True
        started, cancelled = [], 0
        for req in self._queue.drain():
            if req.future.cancel():
                cancelled += req.rows
            else:  # re-queued after its worker died: running, so it cannot be cancelled
                started.append(req)
        started.extend(self._dispatcher.quarantine.drain())
        self._ledger.count("cancelled", cancelled)
        if started:
            self._ledger.fail(started, error or closed_error(
                self.spec.name, "the request waited to run again after its worker died, and was not re-run"))
        self._ledger.notify_room()
        self._dispatcher.wake()
        self._transport.close()

    def _wait_for_backlog_room(self, deadline: float | None = None) -> None:
        """Wait until fewer rows wait in this Batcher's queue than its workers take next
        (:meth:`Dispatcher.rows_ahead`), it closes, no worker is known (nothing to pace by), or
        the monotonic ``deadline`` passes: a feeder that sends more ahead of that (a collection's
        tasks) holds memory, and a thread per task, for nothing."""

        def room_now() -> bool:
            ahead = self._dispatcher.rows_ahead()
            return self._closed or ahead == 0 or len(self._queue) < ahead

        room = self._ledger.room
        with room:
            while not room_now():
                left = BACKLOG_RECHECK if deadline is None else min(BACKLOG_RECHECK, deadline - time.monotonic())
                if left <= 0:
                    return
                # dispatch passes notify; the timeout only bounds the delay of a change that does not
                room.wait(left)

    def _abandon(self, reason: str) -> None:
        """The client is gone: nothing can be sent or received any more. Resolve every future."""
        if self._closed and not self._dispatcher.inflight:
            return
        logger.warning("dynbatch: closing the Batcher of model %r: %s", self.spec.name, reason)
        error = closed_error(self.spec.name, reason)
        self._close_now(error)
        for reqs in list(self._dispatcher.inflight.values()):
            self._ledger.fail(reqs, error)

    # -- introspection ------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counts, queue depth, latency percentiles and, per worker, what its model server advised
        (batch size, memory cap, throughput, the controller's last decision and why).

        Counts are rows (a block of :meth:`predict` counts its rows, which share one fate):
        ``submitted``, ``delivered``, ``failed``, ``cancelled``, ``timed_out`` (of which
        ``timed_out_running`` after their shipment left), ``requeued`` (sent again after their
        worker died, closed or restarted), ``stuck`` (requests in device batches declared stuck),
        ``isolated`` (requests re-sent in groups of suspects), ``quarantined`` (of ``failed``: a
        request that made its worker die or hang alone), ``answered_early`` (of ``delivered``: results
        that came back before the rest of their shipment had run, in a part of its reply).
        ``quarantine``: suspects waiting now."""
        counts = self._ledger.counts()
        counts["cancelled"] += self._queue.cancelled
        dispatcher = self._dispatcher
        return {
            "model": self.spec.name,
            "version": self.version,
            "batcher": self.id,
            "latency_target": self.spec.latency_target,
            "queued": len(self._queue),
            "quarantine": len(dispatcher.quarantine),
            "waiting_for_inputs": self._waiting_for_inputs,
            "in_flight": sum(s.inflight_rows for s in list(dispatcher.slots.values())),
            "no_worker": dispatcher.no_worker_since is not None,
            "closed": self._closed,
            **counts,
            **self._ledger.percentiles(),
            "workers": {a: s.to_dict() for a, s in list(dispatcher.slots.items())},
        }

    def _report(self) -> dict[str, Any]:
        """What the scheduler shows of this Batcher (dashboard, /metrics)."""
        stats = self.stats()
        figures = self._dispatcher.workloads()
        for address, worker in stats["workers"].items():
            worker.pop("forecast", None)
            worker["workload"] = figures.get(address)
        return stats

    def row_errors(self) -> list[dict[str, Any]]:
        """Rows of this model that failed while ``predict(collection, on_error="missing")`` was
        computed, oldest first: ``{"time", "task", "row", "error"}`` each, ``row`` naming its
        position (e.g. ``"row 217 of the array"``), ``error`` the exception's repr, ``task`` the
        key of the task that ran it. Read from the scheduler's event log (topic
        ``dynbatch-row-errors``): cluster-wide (every computation of this model, repeated when
        Dask ran a task again), at most 100 rows per task (the record's ``failed`` counts them
        all), the latest events only (``distributed.admin.low-level-log-length``). Awaitable
        with an asynchronous client."""
        from .dask_collections import ROW_ERRORS

        label = f"model {self.spec.name!r}"

        def rows(events: Any) -> list[dict[str, Any]]:
            return [{"time": when, "task": msg.get("task"), **row} for when, msg in events
                    if msg.get("source") == label for row in msg["rows"]]

        if self.client.asynchronous:
            async def read() -> list[dict[str, Any]]:
                return rows(await self.client.get_events(ROW_ERRORS))

            return read()  # type: ignore[return-value]
        return rows(self.client.get_events(ROW_ERRORS))

    def history(self) -> list[dict[str, Any]]:
        """Recent shipments, one row each: ``time``, ``worker``, ``version`` of the model that served
        it, ``size`` (its rows), ``device_batch`` (rows of the device batch it ran in, from every
        client), ``latency`` (what its requests saw after leaving the queue), ``cap`` and
        ``controller_size`` (the server's memory cap and batch size after it); on the worker,
        seconds its rows ran (``compute_s``: their share of each device batch), waiting for the
        device thread (``wait_s``), staging (``stage_s``: copying in, to the device) and in all
        (``worker_s``); on the client, seconds
        from its oldest request's arrival to the send (``queued_s``), stacking (``stack_s``) and the
        round trip (``round_trip_s``); the device batch's own time on the device (``service_s``,
        from the device's previous batch end, whichever model's, or from its rows' arrival if the
        device was idle: what throughput is measured by); and what the server's batch-size controller made of it
        (``decision``: ``"grow"``, ``"shrink"``, ``"hold"``, or ``"not shown"`` for a batch whose time
        says little about its size, and ``reason``: the controller's words, or why it was not shown:
        ``"cold"``, ``"compiling"``, ``"new_shape"``, ``"new_slot"``); ``outcome``: ``"served"``, or
        ``"worker died"`` / ``"stuck"`` for a shipment whose rows were lost with their worker or in a
        stuck device batch (they are retried in smaller groups), and ``isolated`` for a group of such
        suspects that ran in device batches of its own."""
        return [record.to_dict() for record in self._history.copy()]


def rerun_benchmark(client: Client, workers: Iterable[str] | None = None):
    """Measure the workers' devices with the reference model (ResNet-50 when torchvision is
    installed, else a small CNN); placement uses the scores, calibrated against measured rates, for
    workers that have not run a model yet. Each worker also measures at start when
    ``dynbatch.benchmark.on-start`` is set.

    Returns ``{worker address: table}`` (each table a dict with ``rows`` per batch size and
    ``best_throughput``; ``error`` when the worker could not run it). The benchmark runs in each
    worker's device thread, between batches. With an asynchronous client, ``await`` the result.
    """

    async def run() -> dict[str, Any]:
        addresses = list(workers) if workers is not None else list((await client.scheduler.identity())["workers"])

        async def one(address: str) -> tuple[str, Any]:
            reply = await client.rpc(address).dynbatch_benchmark()
            if reply is None:
                raise PluginNotRegisteredError(client.scheduler.address)
            return address, reply

        return dict(await asyncio.gather(*(one(a) for a in addresses)))

    return _sync_or_async(client, run)
