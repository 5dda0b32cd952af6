"""A pipeline's jobs and its stages, on the client's event loop: a CPU stage groups the jobs waiting
for it into Dask tasks, a model stage turns each job into a Batcher request, a fan-out stage turns a
list into sub-jobs. A stage hands the jobs it finished back to :meth:`Pipeline._proceed`."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any

from distributed import Future as DaskFuture

from ..client.batcher import Batcher
from ..core.requests import RequestFuture
from ..errors import BatcherClosedError
from .steps import _Chain, _elements, _Row, _Whole, run_group

if TYPE_CHECKING:
    from . import JobFuture, Pipeline

logger = logging.getLogger(__package__)

#: Dask task priority of a CPU group = job priority * this + the stage's position in the chain, so
#: that, at one job priority, groups of later stages run first (jobs in flight drain before new ones)
STAGE_PRIORITY_STRIDE = 1024
#: how long jobs of a priority count as "about" for :meth:`_CpuStage._group_size` (seconds)
PRIORITY_MEMORY = 1.0


# -- jobs and their inputs --------------------------------------------------------------------------
class _FutureInput:
    """A job whose input is the value of a Dask Future."""

    __slots__ = ("future",)

    def __init__(self, future: DaskFuture):
        self.future = future


class _RowInput:
    """A job whose input is one row of a Dask Future's value (an element of a dask array block)."""

    __slots__ = ("future", "row")

    def __init__(self, future: DaskFuture, row: int):
        self.future = future
        self.row = row


_DASK_INPUTS = (_FutureInput, _RowInput)


class _Job:
    __slots__ = (
        "future", "priority", "deadline", "stages", "index", "value", "parent", "slot",
        "pending", "results", "children", "request", "group", "done", "since",
    )

    def __init__(self, value: Any, priority: int, deadline: float | None, stages: list, *,
                 future: JobFuture | None = None, parent: _Job | None = None, slot: int = 0):
        self.future = future
        self.priority = priority
        self.deadline = deadline
        self.stages = stages
        self.index = 0  # next stage to run
        self.value = value
        self.parent = parent
        self.slot = slot  # position in the parent's list (fan-out)
        self.pending = 0  # unfinished children
        self.results: list[Any] | None = None
        self.children: list[_Job] | None = None
        self.request: RequestFuture | None = None  # model request in flight
        self.group: _Group | None = None  # CPU group in flight
        self.done = False
        self.since = 0.0  # when it entered its current stage's queue


class _Group:
    __slots__ = ("jobs", "priority", "future", "live")

    def __init__(self, jobs: list[_Job], priority: int):
        self.jobs = jobs
        self.priority = priority
        self.future: DaskFuture | None = None
        self.live = len(jobs)


# -- stages ---------------------------------------------------------------------------------------
class _CpuStage:
    """Jobs waiting for a CPU step (per priority, FIFO) and the groups of it running on Dask."""

    kind = "cpu"

    def __init__(self, pipe: Pipeline, chain: _Chain, name: str, options: dict[str, Any], order: int):
        self.pipe = pipe
        self.chain = chain
        self.name = name
        self.options = options
        self.order = order
        self.key_prefix = "dynbatch-" + "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name)
        self.queues: dict[int, deque[_Job]] = {}
        self.inflight: set[_Group] = set()
        self.flush_soon = False
        self.timer: asyncio.TimerHandle | None = None
        self.timer_due = 0.0
        self.groups = 0
        self.jobs = 0
        self.seconds_per_job: float | None = None  # compute time of this step, moving average
        self.seen: dict[int, float] = {}  # priority -> when a job of it last entered

    def queued(self) -> int:
        return sum(1 for dq in self.queues.values() for j in dq if not j.done)

    def enter(self, jobs: list[_Job]) -> None:
        now = time.monotonic()
        for job in jobs:
            if job.done:
                continue
            if job.deadline is not None and now > job.deadline:
                self.pipe._timed_out(job, self.name)
                continue
            job.since = now
            self.seen[job.priority] = now
            dq = self.queues.get(job.priority)
            if dq is None:
                dq = self.queues[job.priority] = deque()
            dq.append(job)
        if not self.flush_soon:  # every job entering in this loop iteration joins the same flush
            self.flush_soon = True
            self.pipe._loop.call_soon(self.flush)

    def _on_timer(self) -> None:
        self.timer = None
        self.flush()

    def flush(self) -> None:
        """Send every group that is full; a partial one when no group of this step (of its
        priority or higher) runs, or when its oldest job waited ``group_delay`` and fewer such
        groups than the cluster's threads are in flight. At most ``limit`` such groups in flight."""
        self.flush_soon = False
        now = time.monotonic()
        limit = self.pipe._group_limit()
        wait: float | None = None
        for priority in sorted(self.queues, reverse=True):
            dq = self.queues[priority]
            size = self._group_size(priority, now)
            while dq:
                while dq and dq[0].done:  # cancelled or failed while waiting
                    dq.popleft()
                if not dq:
                    break
                ahead = sum(1 for g in self.inflight if g.priority >= priority)  # lower ones never hold it back
                if ahead >= limit:
                    break
                if len(dq) < size and ahead:
                    # a partial group waits for more jobs: up to group_delay, and for as long as
                    # every thread has a group of this step to run (sending it gains nothing then)
                    due = dq[0].since + self.pipe.group_delay
                    if now < due:
                        wait = due - now if wait is None else min(wait, due - now)
                        break
                    if ahead >= limit // 2:
                        break  # the next group to come back flushes again
                jobs = self._take(dq, size, now)
                if jobs:
                    self._send(jobs, priority)
            if not dq:
                del self.queues[priority]
        if wait is not None:
            self._flush_in(wait, now)

    def _take(self, dq: deque[_Job], size: int, now: float) -> list[_Job]:
        """Up to ``size`` jobs from the front of ``dq``; those whose deadline passed fail on the way."""
        jobs: list[_Job] = []
        while dq and len(jobs) < size:
            job = dq.popleft()
            if job.done:
                continue
            if job.deadline is not None and now > job.deadline:
                self.pipe._timed_out(job, self.name)
                continue
            jobs.append(job)
        return jobs

    def _flush_in(self, wait: float, now: float) -> None:
        """Flush again in ``wait`` seconds, unless a flush is due sooner."""
        if self.timer is None or now + wait < self.timer_due:
            if self.timer is not None:
                self.timer.cancel()
            self.timer_due = now + wait
            self.timer = self.pipe._loop.call_later(wait, self._on_timer)

    def _group_size(self, priority: int, now: float) -> int:
        """``group_size``; but while jobs of a higher priority are about (seen in the last second),
        a group of lower priority runs at most ``group_seconds``: a running Dask task cannot be
        pre-empted, so a long one would make those jobs wait."""
        pipe = self.pipe
        if self.seconds_per_job is None or not any(
            p > priority and now - seen < PRIORITY_MEMORY for p, seen in self.seen.items()
        ):
            return pipe.group_size
        return max(1, min(pipe.group_size, int(pipe.group_seconds / max(self.seconds_per_job, 1e-9))))

    def _send(self, jobs: list[_Job], priority: int) -> None:
        items: list[Any] = []
        inputs: list[DaskFuture] = []
        positions: dict[Any, int] = {}
        for job in jobs:
            value = job.value
            if isinstance(value, _DASK_INPUTS):
                pos = positions.get(value.future.key)
                if pos is None:
                    pos = positions[value.future.key] = len(inputs)
                    inputs.append(value.future)
                items.append(_Row(pos, value.row) if isinstance(value, _RowInput) else _Whole(pos))
            else:
                items.append(value)
        group = _Group(jobs, priority)
        try:
            group.future = self.pipe.client.submit(
                run_group,
                self.chain,
                items,
                inputs,
                key=f"{self.key_prefix}-{uuid.uuid4().hex}",
                priority=priority * STAGE_PRIORITY_STRIDE + self.order,
                **self.options,
            )
        except Exception as exc:  # the client is closing, a step cannot be pickled, ...
            for job in jobs:
                self.pipe._fail(job, exc)
            return
        for job in jobs:
            job.group = group
        self.inflight.add(group)
        self.groups += 1
        self.jobs += len(jobs)
        self.pipe._in_background(self._collect(group))

    async def _collect(self, group: _Group) -> None:
        pipe = self.pipe
        try:
            # gathers the group's values to the client
            seconds, results = await self.pipe.client.gather(group.future, asynchronous=True)
            per_job = seconds / max(1, len(group.jobs))
            self.seconds_per_job = per_job if self.seconds_per_job is None else 0.8 * self.seconds_per_job + 0.2 * per_job
        except BaseException as exc:
            if group.live:  # the whole task failed (e.g. its worker died too often)
                logger.warning("dynbatch pipeline: a group of %d jobs at step %r failed as a whole: %r", group.live, self.name, exc)
                for job in group.jobs:
                    job.group = None
                    pipe._fail(job, exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
            results = None
        finally:
            self.inflight.discard(group)
            group.future = None
        if results is not None:
            advanced = []
            for job, (ok, value) in zip(group.jobs, results):
                job.group = None
                if job.done:  # cancelled or failed meanwhile: its result is dropped
                    continue
                if ok:
                    job.value = value
                    job.index += 1
                    advanced.append(job)
                else:
                    pipe._fail(job, value)
            pipe._proceed(advanced)
        if self.queues:
            self.flush()

    def drop(self, job: _Job) -> None:
        """``job`` was abandoned while its group runs; cancel the task once no job wants it."""
        group = job.group
        job.group = None
        if group is None:
            return
        group.live -= 1
        if group.live == 0 and group.future is not None:
            self.pipe._in_background(self.pipe.client.cancel([group.future], asynchronous=True))

    def stats(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "queued": self.queued(),
            "groups_in_flight": len(self.inflight),
            "groups": self.groups,
            "jobs": self.jobs,
            "mean_group": self.jobs / self.groups if self.groups else None,
        }


class _ModelStage:
    """Each job's value -> one request to the Batcher, with the job's priority and remaining time."""

    kind = "model"

    def __init__(self, pipe: Pipeline, batcher: Batcher, order: int):
        self.pipe = pipe
        self.batcher = batcher
        self.name = batcher.spec.name
        self.order = order
        self.requests = 0

    def enter(self, jobs: list[_Job]) -> None:
        pipe = self.pipe
        now = time.monotonic()
        same: dict[tuple[int, float | None], list[_Job]] = {}  # one Batcher.map per priority and deadline
        for job in jobs:
            if job.done:
                continue
            if job.deadline is not None and now >= job.deadline:
                pipe._timed_out(job, self.name)
                continue
            same.setdefault((job.priority, job.deadline), []).append(job)
        for (priority, deadline), group in same.items():
            timeout = None if deadline is None else deadline - now
            values = [j.value.future if isinstance(j.value, _FutureInput) else j.value for j in group]
            try:
                futures = self.batcher.map(values, priority=priority, timeout=timeout)
            except BatcherClosedError as exc:
                for job in group:
                    pipe._fail(job, exc)
                continue
            except Exception:
                # map() refused the whole group (a full queue with overload="reject"): submit one
                # by one so that each job gets its own outcome
                futures = []
                for _job, value in zip(group, values):
                    try:
                        futures.append(self.batcher.submit(value, priority=priority, timeout=timeout))
                    except Exception as exc:
                        futures.append(exc)
            for job, future in zip(group, futures):
                if isinstance(future, BaseException):
                    pipe._fail(job, future)
                    continue
                self.requests += 1
                job.request = future
                job.value = None
                future.add_done_callback(lambda f, job=job: pipe._on_loop(self._done, job, f))

    def _done(self, job: _Job, request: RequestFuture) -> None:
        if job.done or job.request is not request:
            return
        job.request = None
        if request.cancelled():  # not by us (we mark the job done first): the Batcher was closed
            self.pipe._fail(job, BatcherClosedError(self.name))
            return
        exc = request.exception()
        if exc is not None:
            self.pipe._fail(job, exc)
            return
        job.value = request.result()
        job.index += 1
        self.pipe._proceed([job])

    def stats(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "requests": self.requests}


class _FanOutStage:
    """A list -> one sub-job per element through ``stages``; results gathered in order."""

    kind = "fan_out"

    def __init__(self, pipe: Pipeline, stages: list, order: int):
        self.pipe = pipe
        self.stages = stages
        self.order = order
        self.name = "fan_out(" + ", ".join(s.name for s in stages) + ")"
        self.elements = 0

    def enter(self, jobs: list[_Job]) -> None:
        pipe = self.pipe
        now = time.monotonic()
        children: list[_Job] = []
        for job in jobs:
            if job.done:
                continue
            if job.deadline is not None and now > job.deadline:
                pipe._timed_out(job, self.name)
                continue
            try:
                elements = _elements(job.value)
            except TypeError as exc:
                pipe._fail(job, exc)
                continue
            job.value = None
            if not elements:
                job.value = []
                job.index += 1
                pipe._proceed([job])
                continue
            job.pending = len(elements)
            job.results = [None] * len(elements)
            job.children = [
                _Job(e, job.priority, job.deadline, self.stages, parent=job, slot=i) for i, e in enumerate(elements)
            ]
            children.extend(job.children)
            self.elements += len(elements)
        pipe._proceed(children)

    def stats(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "elements": self.elements,
                "stages": [s.stats() for s in self.stages]}
