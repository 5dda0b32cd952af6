"""Requests, their futures and the queue they wait in on the client.

Pure logic: no Dask, no plugin. The :class:`~dask_dynbatch.Batcher` pushes from user threads and
pops on the client's event loop, so the queue is thread-safe.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .blocks import Block

_PENDING, _RUNNING, _CANCELLED, _CANCELLED_AND_NOTIFIED, _FINISHED = (
    "PENDING", "RUNNING", "CANCELLED", "CANCELLED_AND_NOTIFIED", "FINISHED"
)
_DONE = frozenset({_CANCELLED, _CANCELLED_AND_NOTIFIED, _FINISHED})
# One re-entrant lock for the state of every request future. A Condition per future (what
# concurrent.futures.Future creates in __init__) costs several microseconds, more than everything
# else a request costs; here a future gets one only when a thread actually waits on it.
_LOCK = threading.RLock()


class RequestFuture(concurrent.futures.Future):
    """The future of one inference request.

    A :class:`concurrent.futures.Future` (``result(timeout)``, ``exception()``, ``done()``,
    ``cancel()``, ``add_done_callback``; works with ``concurrent.futures.wait`` and
    ``as_completed``) that is also awaitable from an asynchronous client. ``cancel()`` succeeds
    while the request waits in the queue; once its batch has started it returns ``False`` and the
    result is delivered.
    """

    def __init__(self) -> None:  # no super().__init__(): the Condition is created lazily
        self._state = _PENDING
        self._result = None
        self._exception = None
        # The waiter and callback lists are made when first needed: a future that nobody waits on
        # through concurrent.futures.wait() and that has no callback (most of them) holds no list.
        # Fewer objects the cyclic garbage collector tracks per request: collections set off by
        # request allocations would otherwise take a large part of the submitting thread.
        self._w: list | None = None
        self._callbacks: list | None = None
        self._cond: threading.Condition | None = None
        self._on_cancel: Callable[[], None] | None = None
        self._queued: Request | None = None  # the request while it waits in a RequestQueue

    def _lazy_list(self, attr: str) -> list:
        value = getattr(self, attr)
        if value is None:
            with _LOCK:
                value = getattr(self, attr)
                if value is None:
                    value = []
                    setattr(self, attr, value)
        return value

    @property
    def _waiters(self) -> list:  # concurrent.futures.wait() and as_completed() append to it
        return self._lazy_list("_w")

    @property
    def _done_callbacks(self) -> list:
        return self._lazy_list("_callbacks")

    def _invoke_callbacks(self) -> None:
        if self._callbacks:
            super()._invoke_callbacks()

    @property
    def _condition(self) -> threading.Condition:  # used by the base class and concurrent.futures.wait
        cond = self._cond
        if cond is None:
            with _LOCK:
                if self._cond is None:
                    self._cond = threading.Condition(_LOCK)
                cond = self._cond
        return cond

    def done(self) -> bool:
        return self._state in _DONE

    def cancelled(self) -> bool:
        return self._state in (_CANCELLED, _CANCELLED_AND_NOTIFIED)

    def running(self) -> bool:
        return self._state == _RUNNING

    def result(self, timeout: float | None = None) -> Any:
        if self._state == _FINISHED:
            if self._exception is not None:
                raise self._exception
            return self._result
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == _FINISHED:
            return self._exception
        return super().exception(timeout)

    def add_done_callback(self, fn: Callable[[RequestFuture], Any]) -> None:
        with _LOCK:
            if self._state not in _DONE:
                self._done_callbacks.append(fn)
                return
        try:
            fn(self)
        except Exception:
            concurrent.futures._base.LOGGER.exception("exception calling callback for %r", self)

    def set_running_or_notify_cancel(self) -> bool:
        with _LOCK:
            if self._state == _CANCELLED:
                self._notify_cancelled()
                return False
            if self._state == _CANCELLED_AND_NOTIFIED:  # cancel() notifies at once (see there)
                return False
            if self._state == _PENDING:
                self._state = _RUNNING
                return True
            raise RuntimeError(f"Future in unexpected state {self._state}")

    def _notify_cancelled(self) -> None:
        self._state = _CANCELLED_AND_NOTIFIED
        for waiter in self._w or ():
            waiter.add_cancelled(self)

    def _finish(self, result: Any, exception: BaseException | None) -> None:
        with _LOCK:
            if self._state in _DONE:
                raise concurrent.futures.InvalidStateError(f"{self._state}: {self!r}")
            self._result = result
            self._exception = exception
            self._state = _FINISHED
            for waiter in self._w or ():
                if exception is None:
                    waiter.add_result(self)
                else:
                    waiter.add_exception(self)
            if self._cond is not None:
                self._cond.notify_all()
        self._invoke_callbacks()

    def set_result(self, result: Any) -> None:
        self._finish(result, None)

    def set_exception(self, exception: BaseException) -> None:
        self._finish(None, exception)

    def cancel(self) -> bool:
        cancelled = super().cancel()
        if cancelled:
            with _LOCK:
                if self._state == _CANCELLED:
                    # no executor will ever pick it up to notify: do it now, or
                    # concurrent.futures.wait() and as_completed() would wait for it forever
                    self._notify_cancelled()
        if cancelled:
            req, self._queued = self._queued, None
            if req is not None:
                req.owner._on_cancel(req)
            if self._on_cancel is not None:
                on_cancel, self._on_cancel = self._on_cancel, None
                on_cancel()
        return cancelled

    def __repr__(self) -> str:
        return f"<RequestFuture state={self._state.lower()}>"

    def __await__(self):
        return asyncio.wrap_future(self).__await__()


class Request(RequestFuture):
    """One sample waiting for its batch, and its future: what ``submit`` and ``map`` return (a
    :class:`~dask_dynbatch.core.blocks.BlockPart`, rows of a block, resolves the block's future).

    One object rather than a request holding a future: a pending request is then one object the
    cyclic garbage collector tracks, not two, and a burst of requests sets off half as many full
    collections. Once done or cancelled, it lets go of its sample."""

    #: rows it carries, and the block they belong to: a block part's own, class-wide for one sample
    rows: int = 1
    block: Block | None = None

    __slots__ = ("sample", "_future", "priority", "deadline", "enqueued", "dask_future", "attempts", "seq", "queued",
                 "owner", "as_torch")

    def __init__(
        self,
        sample: Any,
        future: RequestFuture | None = None,
        *,
        priority: int = 0,
        deadline: float | None = None,
        enqueued: float = 0.0,
        dask_future: Any = None,
        seq: int = 0,
        as_torch: bool = False,
    ):
        RequestFuture.__init__(self)
        self.sample = sample
        self._future = future  # None: it is its own future
        self.priority = priority
        self.deadline = deadline
        self.enqueued = enqueued
        self.dask_future = dask_future
        self.attempts = 0  # batches of this request lost with their worker
        self.seq = seq
        self.queued = False  # counted in its RequestQueue's length
        self.owner: RequestQueue | None = None  # the queue it was pushed to
        self.as_torch = as_torch  # the sample was a torch tensor: so is its result

    @property
    def future(self) -> RequestFuture:
        """The future its result resolves: itself, or the one it was given."""
        return self if self._future is None else self._future

    def _finish(self, result: Any, exception: BaseException | None) -> None:
        super()._finish(result, exception)
        self.sample = self.dask_future = None  # the user's future keeps its result only

    def cancel(self) -> bool:
        cancelled = super().cancel()
        if cancelled:  # (its Dask Future, if any, stays: the Batcher finds its waiter by it)
            self.sample = None
        return cancelled


class RequestQueue:
    """Requests by priority (higher first), FIFO within a priority; its length and sizes count rows
    (a block part counts its rows, and is cut when it does not fit whole).

    Cancelled requests leave the count at once and are dropped when reached. Requests whose deadline
    passed are returned separately by :meth:`pop` so that the caller fails them without running them.
    A request put back with ``push(..., front=True)`` (its worker died under its batch) keeps its
    running state: it cannot be cancelled any more, and it runs again when popped.
    """

    #: rebuild the deadline heap when it holds this many more entries than live requests
    _HEAP_SLACK = 1024

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_priority: dict[int, deque[Request]] = {}
        self._priorities: list[int] = []  # descending
        self._live = 0
        self._seq = itertools.count()
        self._deadlines: list[tuple[float, int, Request]] = []  # heap
        #: requests cancelled by their user while queued
        self.cancelled = 0

    def __len__(self) -> int:
        """Rows queued."""
        return self._live

    def _deque(self, priority: int) -> deque[Request]:
        dq = self._by_priority.get(priority)
        if dq is None:
            dq = self._by_priority[priority] = deque()
            self._priorities = sorted(self._by_priority, reverse=True)
        return dq

    def _on_cancel(self, req: Request) -> None:
        with self._lock:
            if req.queued:
                req.queued = False
                self._live -= req.rows
                self.cancelled += req.rows

    def _unqueue(self, req: Request) -> None:
        """Caller holds the lock: ``req`` leaves the count (it is being taken out)."""
        req.queued = False
        req.future._queued = None
        self._live -= req.rows

    def push(self, requests: Iterable[Request], *, front: bool = False) -> int:
        """Add requests (at the front of their priority when re-queued); return the new length."""
        with self._lock:
            for req in requests:
                if req.future.done() or req.queued:  # cancelled or failed meanwhile
                    continue
                req.queued = True
                req.owner = self
                req.future._queued = req  # cancel() finds its way back here, no closure per request
                if not front:
                    req.seq = next(self._seq)
                if req.deadline is not None:  # again when re-queued: it may wait for a worker
                    heapq.heappush(self._deadlines, (req.deadline, req.seq, req))
                dq = self._deque(req.priority)
                if front:
                    dq.appendleft(req)
                else:
                    dq.append(req)
                self._live += req.rows
            return self._live

    def pop(self, n: int, now: float) -> tuple[list[Request], list[Request]]:
        """Take up to ``n`` rows of runnable requests, highest priority first.

        Returns ``(batch, expired)``. Every request in ``batch`` is marked running (its ``cancel()``
        now returns ``False``); ``expired`` requests passed their deadline and must be failed. A
        block part with more rows than are left to take is cut: its first rows go into ``batch``.
        """
        batch: list[Request] = []
        expired: list[Request] = []
        taken = 0
        with self._lock:
            for priority in self._priorities:
                dq = self._by_priority[priority]
                while dq and taken < n:
                    req = dq.popleft()
                    if not req.queued:  # cancelled or expired: already uncounted
                        continue
                    if req.deadline is not None and now > req.deadline:
                        self._unqueue(req)
                        expired.append(req)
                    elif not _start(req.future):
                        self._unqueue(req)
                        if req.future.cancelled():  # cancelled between the check and now
                            self.cancelled += req.rows
                    elif req.rows > n - taken:  # a block part larger than the room left
                        head = req.take(n - taken)  # type: ignore[attr-defined]  # only block parts have rows > 1
                        self._live -= head.rows
                        dq.appendleft(req)  # the rest keeps its place (running: it cannot be cancelled any more)
                        batch.append(head)
                        taken += head.rows
                    else:
                        self._unqueue(req)
                        batch.append(req)
                        taken += req.rows
                if taken >= n:
                    break
            if len(self._deadlines) > 2 * self._live + self._HEAP_SLACK:
                # entries of requests that already ran keep their samples alive: drop them
                self._deadlines = [e for e in self._deadlines if e[2].queued]
                heapq.heapify(self._deadlines)
        return batch, expired

    def expire(self, now: float) -> list[Request]:
        """Remove and return every queued request whose deadline has passed (O(expired * log n))."""
        out: list[Request] = []
        with self._lock:
            heap = self._deadlines
            while heap and heap[0][0] < now:
                _, _, req = heapq.heappop(heap)
                if not req.queued:  # ran, was cancelled, or already expired
                    continue
                self._unqueue(req)  # pop() skips it from now on
                out.append(req)
        return out

    def oldest_enqueued(self) -> float | None:
        """Enqueue time of the oldest live request (``None`` when empty)."""
        with self._lock:
            oldest = None
            for dq in self._by_priority.values():
                for req in dq:
                    if req.queued:
                        if oldest is None or req.enqueued < oldest:
                            oldest = req.enqueued
                        break
            return oldest

    def drain(self) -> list[Request]:
        """Remove and return every live request."""
        with self._lock:
            out = [r for p in self._priorities for r in self._by_priority[p] if r.queued]
            for r in out:
                self._unqueue(r)
            for dq in self._by_priority.values():
                dq.clear()
            self._deadlines.clear()
            self._live = 0
            return out


def _start(future: RequestFuture) -> bool:
    """Mark a popped request's future running; ``False`` if it was cancelled or resolved meanwhile."""
    state = future._state
    if state == _RUNNING:  # re-queued after its worker died: it runs again
        return True
    if state == _PENDING:
        return future.set_running_or_notify_cancel()
    return False
