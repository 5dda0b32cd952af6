"""Jobs split by resource kind: chains of CPU steps and model steps, one future per job.

A job is a chain such as *decode (CPU) -> segment (model A) -> crop (CPU) -> classify each crop
(model B) -> report (CPU)*. Declare the chain once with :func:`cpu`, :func:`model` and
:func:`fan_out`; :class:`Pipeline` runs thousands of jobs through it:

- **CPU steps** run on Dask workers, **grouped**: the jobs waiting at a CPU step are taken together,
  up to ``group_size`` of them (a partial group waits ``group_delay`` for more jobs while earlier
  groups run, and longer while every thread has a group of that step), and one Dask task runs the
  step on the whole group. Adjacent CPU steps are fused
  into that one task. So N jobs make about N / group_size tasks per CPU stage, not N (a Dask task
  costs milliseconds of scheduling).
- **Model steps** turn each job's value into one request to a :class:`~dask_dynbatch.Batcher`, which
  batches requests across jobs. ``fan_out`` turns a list into one sub-job per element (e.g. one
  request per crop) and gathers the results back into a list, in order.
- **Everything is asynchronous**: jobs move on from future callbacks on the client's event loop, so
  the stages overlap: while model A runs a batch, CPU groups of other jobs run on the workers.
- A job's ``priority`` goes with it into every step: into each model request, into the choice of
  which waiting jobs form the next CPU group (one priority per group, highest first), and into
  the Dask priority of that group's task (later steps of the chain first, to drain jobs in flight).
  While higher-priority jobs are about, lower-priority CPU groups are kept short
  (``group_seconds``), since Dask cannot pre-empt a running task.
- A job's ``timeout`` is a deadline: each step gets the time that is left (a model request gets
  it as its own timeout). A job whose deadline passed before one of its steps starts fails with
  :class:`~dask_dynbatch.RequestTimeoutError` and that step is not run.
- ``JobFuture.cancel()`` succeeds until the job finished: the job's queued model requests are
  cancelled (never run), it leaves the CPU queue, and a result that still arrives is dropped.
- A failure in one job (a step raises, the model rejects its sample) fails that job alone.

Where values live: CPU groups run on workers and each group's result is gathered back to the
client (one transfer per group), because the Batcher takes samples from the client. Inputs that are
Dask Futures or dask collections are *not* moved through the client when the chain starts with a
CPU step: the group task takes them as dependencies and reads its rows on the worker.

>>> pipe = Pipeline(client, [cpu(decode), model(seg), cpu(crop), fan_out(model(cls)), cpu(report)])  # doctest: +SKIP
>>> pipe.submit(raw, priority=1, timeout="2s").result()                                             # doctest: +SKIP
>>> [f.result() for f in pipe.map(dask_array_of_images)]                                           # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
import math
import pickle
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dask.base import is_dask_collection
from distributed import Future as DaskFuture
from distributed import as_completed

from .core.requests import RequestFuture
from .client.batcher import Batcher
from .errors import BatcherClosedError, RequestTimeoutError
from .spec import parse_seconds

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

#: Dask task priority of a CPU group = job priority * this + the stage's position in the chain, so
#: that, at one job priority, groups of later stages run first (jobs in flight drain before new ones)
STAGE_PRIORITY_STRIDE = 1024
#: how long jobs of a priority count as "about" for :meth:`_CpuStage._group_size` (seconds)
PRIORITY_MEMORY = 1.0
#: how often the pipeline counts the cluster's worker threads (seconds)
THREADS_REFRESH_S = 5.0


# -- declaring a chain ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CpuStep:
    """A CPU step: ``fn(value) -> value``, run on Dask workers for groups of jobs. See :func:`cpu`."""

    fn: Callable[[Any], Any]
    name: str
    resources: tuple[tuple[str, float], ...] | None = None
    workers: tuple[str, ...] | None = None
    allow_other_workers: bool = False

    def _dask_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.resources:
            options["resources"] = dict(self.resources)
        if self.workers:
            options["workers"] = list(self.workers)
            options["allow_other_workers"] = self.allow_other_workers
        return options


@dataclass(frozen=True)
class ModelStep:
    """A model step: each job's value becomes one request to ``batcher``. See :func:`model`."""

    batcher: Batcher


@dataclass(frozen=True)
class FanOut:
    """Run ``steps`` on each element of a list; results gathered into a list. See :func:`fan_out`."""

    steps: tuple[Any, ...] = field(default_factory=tuple)


def cpu(
    fn: Callable[[Any], Any],
    *,
    name: str | None = None,
    resources: dict[str, float] | None = None,
    workers: str | Sequence[str] | None = None,
    allow_other_workers: bool = False,
) -> CpuStep:
    """Declare a CPU step ``fn(value) -> value`` that runs on Dask workers.

    Jobs at this step are grouped: one Dask task runs ``fn`` on a group of jobs (each job's call
    is separate; an exception fails that job alone). ``resources``/``workers``/``allow_other_workers``
    restrict where the groups run, as in :meth:`distributed.Client.submit` (e.g. keep CPU steps off
    GPU workers). ``fn`` must be picklable.
    """
    if not callable(fn):
        raise TypeError(f"cpu() takes a callable (value -> value), not {fn!r}")
    if isinstance(workers, str):
        workers = [workers]
    return CpuStep(
        fn=fn,
        name=name or getattr(fn, "__name__", type(fn).__name__),
        resources=tuple(sorted(resources.items())) if resources else None,
        workers=tuple(workers) if workers else None,
        allow_other_workers=bool(allow_other_workers),
    )


def model(batcher: Batcher) -> ModelStep:
    """Declare a model step: each job's value (one sample, no batch dimension) -> one request to ``batcher``."""
    if not isinstance(batcher, Batcher):
        raise TypeError(f"model() takes a dask_dynbatch.Batcher, not {type(batcher).__name__}")
    return ModelStep(batcher)


def fan_out(*steps: Any) -> FanOut:
    """Declare a fan-out: the job's value is a list (or an array: its rows); every element runs
    through ``steps`` as a sub-job with the job's priority and deadline, and the results are
    gathered back into a list in the same order. A failing element fails the whole job.

    ``fan_out(model(b))`` sends one request per element; ``fan_out(model(b), cpu(f))`` runs a
    short chain per element.
    """
    if not steps:
        raise ValueError("fan_out() needs at least one step, e.g. fan_out(model(batcher))")
    if len(steps) == 1 and isinstance(steps[0], (list, tuple)):
        steps = tuple(steps[0])
    for step in steps:
        _check_step(step)
    return FanOut(tuple(steps))


def _check_step(step: Any) -> None:
    if not isinstance(step, (CpuStep, ModelStep, FanOut)):
        raise TypeError(
            f"a pipeline step must be cpu(fn), model(batcher) or fan_out(...), not {step!r}; "
            "wrap a plain function with dask_dynbatch.cpu(fn)"
        )


# -- what runs on the workers ---------------------------------------------------------------------
class _Chain:
    """Fused CPU steps: ``fns`` applied in order (picklable; sent with each group)."""

    __slots__ = ("fns",)

    def __init__(self, fns: Sequence[Callable[[Any], Any]]):
        self.fns = tuple(fns)

    def __call__(self, value: Any) -> Any:
        for fn in self.fns:
            value = fn(value)
        return value

    def __reduce__(self):
        return (_Chain, (self.fns,))


class _Each:
    """A CPU-only fan-out: the fused steps applied to each element of a list."""

    __slots__ = ("chain",)

    def __init__(self, chain: _Chain):
        self.chain = chain

    def __call__(self, values: Any) -> list[Any]:
        return [self.chain(v) for v in _elements(values)]

    def __reduce__(self):
        return (_Each, (self.chain,))


class _Whole:
    """In a group's items: the value of ``inputs[index]`` (a Dask Future given as input)."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __reduce__(self):
        return (_Whole, (self.index,))


class _Row:
    """In a group's items: row ``row`` of ``inputs[index]`` (one element of a dask array's block)."""

    __slots__ = ("index", "row")

    def __init__(self, index: int, row: int):
        self.index = index
        self.row = row

    def __reduce__(self):
        return (_Row, (self.index, self.row))


def run_group(chain: Callable[[Any], Any], items: list[Any], inputs: list[Any]) -> tuple[float, list[tuple[bool, Any]]]:
    """The Dask task of one CPU group: ``chain`` on every item.

    ``inputs`` are the values of the Dask Futures the items refer to (Dask resolved them). Returns
    the seconds it computed and, per item, ``(True, value)`` or ``(False, error)``.
    """
    started = time.perf_counter()
    out: list[tuple[bool, Any]] = []
    for item in items:
        try:
            if isinstance(item, _Row):
                item = inputs[item.index][item.row]
            elif isinstance(item, _Whole):
                item = inputs[item.index]
            out.append((True, chain(item)))
        except Exception as exc:
            out.append((False, _portable(exc)))
    return time.perf_counter() - started, out


def _portable(exc: BaseException) -> BaseException:
    """The exception if it survives pickling (traceback included, as distributed does), else a stand-in."""
    try:
        import tblib.pickling_support

        tblib.pickling_support.install(exc)
    except Exception:
        pass
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _elements(value: Any) -> list[Any]:
    if isinstance(value, (str, bytes, dict)):
        raise TypeError(f"fan_out needs a list or an array of elements, not a {type(value).__name__}")
    try:
        return list(value)
    except TypeError:
        raise TypeError(f"fan_out needs a list or an array of elements, not a {type(value).__name__}") from None


# -- inputs that live on the cluster ----------------------------------------------------------------
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


# -- futures and jobs -------------------------------------------------------------------------------
class JobFuture(RequestFuture):
    """The future of one pipeline job (a :class:`~dask_dynbatch.RequestFuture`: awaitable).

    ``cancel()`` succeeds until the job has finished: queued model requests of the job are
    cancelled and never run, the job leaves the CPU queue, and a result still in flight is dropped.
    """


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
        pipe = self.pipe
        now = time.monotonic()
        limit = pipe._group_limit()
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
                    due = dq[0].since + pipe.group_delay
                    if now < due:
                        wait = due - now if wait is None else min(wait, due - now)
                        break
                    if ahead >= limit // 2:
                        break  # the next group to come back flushes again
                jobs: list[_Job] = []
                while dq and len(jobs) < size:
                    job = dq.popleft()
                    if job.done:
                        continue
                    if job.deadline is not None and now > job.deadline:
                        pipe._timed_out(job, self.name)
                        continue
                    jobs.append(job)
                if jobs:
                    self._send(jobs, priority)
            if not dq:
                del self.queues[priority]
        if wait is not None and (self.timer is None or now + wait < self.timer_due):
            if self.timer is not None:
                self.timer.cancel()
            self.timer_due = now + wait
            self.timer = pipe._loop.call_later(wait, self._on_timer)

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
                # Batcher.map validates every sample before queuing any: submit one by one so that
                # a bad sample fails its own job only
                futures = []
                for job, value in zip(group, values):
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


# -- the pipeline ---------------------------------------------------------------------------------
class Pipeline:
    """Run jobs through a chain of CPU steps and model steps; one future per job.

    Parameters
    ----------
    client
        A connected :class:`distributed.Client` (sync or asynchronous): CPU steps run on its
        workers; model steps use Batchers made with the same client.
    steps
        The chain: :func:`cpu`, :func:`model` and :func:`fan_out` steps, in order.
    group_size
        Most jobs one Dask task of a CPU step runs.
    group_delay
        Longest time a partial CPU group waits for more jobs while groups of that step are
        running (seconds or a string such as ``"5ms"``); with none running it is sent at once.
    group_seconds
        While jobs of a higher priority are about, a CPU group of lower priority is cut to about
        this much compute (measured per step), because a running Dask task cannot be pre-empted.
    max_groups_in_flight
        Groups of one CPU step that may be submitted to Dask at once (counting only groups of
        a priority at least as high). Default: twice the cluster's threads. The rest wait here,
        which lets groups fill up and lets higher-priority jobs go first.

    Examples
    --------
    >>> pipe = Pipeline(client, [cpu(decode), model(seg), cpu(crop), fan_out(model(cls)), cpu(report)])  # doctest: +SKIP
    >>> fut = pipe.submit(raw, priority=0, timeout=None)                                                # doctest: +SKIP
    >>> futs = pipe.map(raws)                  # a list, Dask Futures, or a dask array (one job per row) # doctest: +SKIP
    """

    def __init__(
        self,
        client: Client,
        steps: Sequence[Any],
        *,
        group_size: int = 64,
        group_delay: float | str = "5ms",
        group_seconds: float | str = "20ms",
        max_groups_in_flight: int | None = None,
    ):
        steps = list(steps)
        if not steps:
            raise ValueError("a Pipeline needs at least one step")
        for step in steps:
            _check_step(step)
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive integer, not {group_size!r}")
        if max_groups_in_flight is not None and (not isinstance(max_groups_in_flight, int) or max_groups_in_flight < 1):
            raise ValueError(f"max_groups_in_flight must be a positive integer or None, not {max_groups_in_flight!r}")
        self.client = client
        self.steps = steps
        self.group_size = group_size
        self.group_delay = parse_seconds(group_delay, "group_delay")
        self.group_seconds = parse_seconds(group_seconds, "group_seconds")
        self.max_groups_in_flight = max_groups_in_flight
        self._loop = client.loop.asyncio_loop
        self._order = 0
        self._stages = self._compile(steps)
        self._jobs: set[_Job] = set()  # unfinished top-level jobs (touched on the event loop only)
        self._counts_lock = threading.Lock()
        self._counts = {"submitted": 0, "delivered": 0, "failed": 0, "timed_out": 0, "cancelled": 0}
        self._closed = False
        self._tasks: set[asyncio.Task] = set()  # background work, kept until done
        self._threads = 0  # worker threads in the cluster, counted in the background
        self._threads_checked = time.monotonic()
        self._on_loop(lambda: self._in_background(self._count_threads()))

    def __repr__(self) -> str:
        return f"<Pipeline {' -> '.join(s.name for s in self._stages)}: running={len(self._jobs)}>"

    # -- declaring -------------------------------------------------------------------------------
    def _compile(self, steps: Sequence[Any]) -> list:
        """Steps -> stages: adjacent CPU steps (same placement) fuse into one; a fan-out of CPU
        steps only becomes a CPU step over the list."""
        plans: list[Any] = []  # CpuStep-like tuples (fns, names, options) or stage objects
        for step in steps:
            if isinstance(step, FanOut):
                sub = self._compile(step.steps)
                if len(sub) == 1 and isinstance(sub[0], _CpuStage):
                    inner = sub[0]
                    plan: Any = ([_Each(inner.chain)], [f"each({inner.name})"], inner.options)
                else:
                    plan = _FanOutStage(self, sub, self._next_order())
            elif isinstance(step, CpuStep):
                plan = ([step.fn], [step.name], step._dask_options())
            else:
                plan = _ModelStage(self, step.batcher, self._next_order())
            if isinstance(plan, tuple) and plans and isinstance(plans[-1], tuple) and plans[-1][2] == plan[2]:
                fns, names, options = plans[-1]
                plans[-1] = (fns + plan[0], names + plan[1], options)
            else:
                plans.append(plan)
        return [
            _CpuStage(self, _Chain(p[0]), "+".join(p[1]), p[2], self._next_order()) if isinstance(p, tuple) else p
            for p in plans
        ]

    def _next_order(self) -> int:
        self._order += 1
        return self._order

    # -- submitting ------------------------------------------------------------------------------
    def submit(self, x: Any, *, priority: int = 0, timeout: float | str | None = None) -> JobFuture:
        """Start one job on input ``x`` (a value or a Dask Future); return its future.

        ``priority``: higher goes first in every step. ``timeout``: seconds (or ``"2s"``) from now
        after which the job's next step is not started; the job fails with
        :class:`~dask_dynbatch.RequestTimeoutError`.
        """
        return self.map([x], priority=priority, timeout=timeout)[0]

    def map(
        self,
        xs: Any,
        *,
        priority: int = 0,
        timeout: float | str | None = None,
        per: str | None = None,
    ) -> list[JobFuture]:
        """Start one job per input; one future per job, in order.

        ``xs``: an iterable of values, Dask Futures or ``Delayed`` objects; or a dask collection.
        A dask array gives one job per element along its first axis (``per="element"``, the
        default) or one per block of rows (``per="block"``); other collections (bag, dataframe)
        give one job per partition. Inputs on the cluster stay there when the first step is a
        CPU step (the group task reads them); otherwise they are fetched to the client.
        """
        if self._closed:
            raise RuntimeError("this Pipeline is closed; create a new one to submit more jobs")
        deadline = None if timeout is None else time.monotonic() + parse_seconds(timeout, "timeout")
        inputs = self._inputs(xs, per)
        jobs = []
        for value in inputs:
            future = JobFuture()
            job = _Job(value, priority, deadline, self._stages, future=future)
            future._on_cancel = lambda job=job: self._job_cancelled(job)
            jobs.append(job)
        with self._counts_lock:
            self._counts["submitted"] += len(jobs)
        self._on_loop(self._start, jobs)
        return [job.future for job in jobs]

    def _inputs(self, xs: Any, per: str | None) -> list[Any]:
        if per not in (None, "element", "block"):
            raise ValueError(f"per must be 'element' or 'block', not {per!r}")
        if is_dask_collection(xs):
            return self._collection_inputs(xs, per)
        if per == "block":
            raise ValueError("per='block' applies to a dask collection given as xs")
        items = list(xs)
        lazy = [i for i, x in enumerate(items) if is_dask_collection(x)]
        if lazy:
            for i, future in zip(lazy, self.client.compute([items[i] for i in lazy])):
                items[i] = future
        return [_FutureInput(x) if isinstance(x, DaskFuture) else x for x in items]

    def _collection_inputs(self, xs: Any, per: str | None) -> list[Any]:
        import dask.array as da

        if isinstance(xs, da.Array):
            if xs.ndim == 0:
                raise ValueError("map() takes a dask array with at least one dimension (one job per element)")
            if xs.ndim > 1 and any(len(c) > 1 for c in xs.chunks[1:]):
                xs = xs.rechunk({i: -1 for i in range(1, xs.ndim)})  # a block = whole rows
            futures = self.client.compute(list(xs.to_delayed().ravel()))
            if per == "block":
                return [_FutureInput(f) for f in futures]
            sizes = xs.chunks[0]
            if any(math.isnan(s) for s in sizes):  # unknown chunk sizes
                raise ValueError(
                    "this dask array has unknown chunk sizes, so its elements cannot be counted; call "
                    "array.compute_chunk_sizes() first, or use pipe.map(array, per='block') (one job per block)"
                )
            return [_RowInput(f, i) for f, n in zip(futures, sizes) for i in range(int(n))]
        if per == "element":
            raise ValueError(
                f"per='element' is for dask arrays; a {type(xs).__name__} gives one job per partition (per='block')"
            )
        if not hasattr(xs, "to_delayed"):
            raise TypeError(f"cannot split a {type(xs).__name__} into jobs; pass a list of Delayed objects instead")
        parts = xs.to_delayed()
        parts = list(parts.ravel()) if hasattr(parts, "ravel") else list(parts)
        return [_FutureInput(f) for f in self.client.compute(parts)]

    # -- running (client event loop) --------------------------------------------------------------
    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    def _start(self, jobs: list[_Job]) -> None:
        first = self._stages[0]
        ready: list[_Job] = []
        waiting: dict[Any, tuple[DaskFuture, list[_Job]]] = {}
        for job in jobs:
            if job.future.done():  # cancelled before it started
                job.done = True
                continue
            self._jobs.add(job)
            value = job.value
            if isinstance(value, _DASK_INPUTS) and not (isinstance(first, _ModelStage) and isinstance(value, _FutureInput)):
                waiting.setdefault(value.future.key, (value.future, []))[1].append(job)
            else:
                ready.append(job)  # a Batcher takes a Dask Future as it is
        self._proceed(ready)
        for future, group in waiting.values():
            self._in_background(self._input_ready(future, group, fetch=not isinstance(first, _CpuStage)))

    async def _input_ready(self, future: DaskFuture, jobs: list[_Job], fetch: bool) -> None:
        """Jobs whose input is (a row of) a Dask Future start once it is computed. A CPU step reads
        it on the worker (no transfer); other first steps need the value here, fetched once for all
        its rows. If it failed, only these jobs fail."""
        try:
            if fetch:
                data = await self.client.gather(future, asynchronous=True)
            else:
                async for _ in as_completed([future], loop=self.client.loop):  # waits; moves no data
                    pass
                if future.status == "error":
                    raise await future.exception(asynchronous=True)
                if future.status != "finished":
                    raise RuntimeError(f"the Dask Future given as input is {future.status}: {future.key!r}")
        except BaseException as exc:
            for job in jobs:
                self._fail(job, exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
            return
        if fetch:
            for job in jobs:
                value = job.value
                try:
                    job.value = data[value.row] if isinstance(value, _RowInput) else data
                except Exception as exc:
                    self._fail(job, exc)
        self._proceed([job for job in jobs if not job.done])

    def _proceed(self, jobs: list[_Job]) -> None:
        """Send jobs into their next stage (all jobs bound for one stage together), or finish them."""
        bound: dict[int, tuple[Any, list[_Job]]] = {}
        for job in jobs:
            if job.done:
                continue
            if job.index >= len(job.stages):
                self._finish(job)
                continue
            stage = job.stages[job.index]
            bound.setdefault(id(stage), (stage, []))[1].append(job)
        for stage, group in bound.values():
            stage.enter(group)

    def _finish(self, job: _Job) -> None:
        job.done = True
        value, job.value = job.value, None
        parent = job.parent
        if parent is not None:
            if parent.done:
                return
            parent.results[job.slot] = value
            parent.pending -= 1
            if parent.pending == 0:
                parent.value, parent.results, parent.children = parent.results, None, None
                parent.index += 1
                self._proceed([parent])
            return
        self._jobs.discard(job)
        if job.future.set_running_or_notify_cancel():
            job.future.set_result(value)
            self._count("delivered")

    def _fail(self, job: _Job, exc: BaseException) -> None:
        """Fail a job alone (a failing sub-job fails its parent and abandons the siblings)."""
        if job.done:
            return
        self._abandon(job)
        if job.parent is not None:
            self._fail(job.parent, exc)
            return
        self._jobs.discard(job)
        if job.future.set_running_or_notify_cancel():
            job.future.set_exception(exc)
            self._count("timed_out" if isinstance(exc, RequestTimeoutError) else "failed")

    def _timed_out(self, job: _Job, step: str) -> None:
        self._fail(job, RequestTimeoutError(f"the job's deadline passed before step {step!r} started; it was not run"))

    def _job_cancelled(self, job: _Job) -> None:
        """``job.future.cancel()`` succeeded (any thread): count it now, drop the job on the loop."""
        self._count("cancelled")
        self._on_loop(self._drop, job)

    def _drop(self, job: _Job) -> None:
        self._abandon(job)
        self._jobs.discard(job)

    def _abandon(self, job: _Job) -> None:
        if job.done:
            return
        job.done = True
        job.value = None
        request, job.request = job.request, None
        if request is not None:
            request.cancel()  # True while queued: it never runs; else its result is ignored
        if job.group is not None:
            job.stages[job.index].drop(job)
        children, job.children = job.children, None
        for child in children or ():
            self._abandon(child)

    def _count(self, what: str, n: int = 1) -> None:
        with self._counts_lock:
            self._counts[what] += n

    def _group_limit(self) -> int:
        if self.max_groups_in_flight is not None:
            return self.max_groups_in_flight
        if time.monotonic() > self._threads_checked + THREADS_REFRESH_S:
            self._threads_checked = time.monotonic()
            self._in_background(self._count_threads())
        return max(2, 2 * self._threads)

    async def _count_threads(self) -> None:
        """The cluster's worker threads (the default limit of groups in flight follows them)."""
        try:
            workers = (await self.client.scheduler.identity())["workers"]
        except Exception as exc:  # the scheduler is unreachable for now: keep the last count
            logger.debug("dynbatch pipeline: cluster threads not counted: %r", exc)
            return
        threads = sum(int(w.get("nthreads") or 0) for w in workers.values())
        if threads != self._threads:
            self._threads = threads
            for stage in self._stages:
                if isinstance(stage, _CpuStage) and stage.queues:
                    stage.flush()

    def _in_background(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- closing, introspection -------------------------------------------------------------------
    def close(self) -> None:
        """Stop accepting jobs and cancel every unfinished one (the Batchers stay open)."""
        self._closed = True

        def cancel_all() -> None:
            for job in list(self._jobs):
                job.future.cancel()

        self._on_loop(cancel_all)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def stats(self) -> dict[str, Any]:
        """Job counts (``submitted == delivered + failed + timed_out + cancelled + running``) and,
        per stage, queue depth, groups sent and mean jobs per group (CPU), requests (model)."""
        with self._counts_lock:
            counts = dict(self._counts)
        finished = counts["delivered"] + counts["failed"] + counts["timed_out"] + counts["cancelled"]
        return {**counts, "running": counts["submitted"] - finished, "stages": [s.stats() for s in self._stages]}


__all__ = ["CpuStep", "FanOut", "JobFuture", "ModelStep", "Pipeline", "cpu", "fan_out", "model", "run_group"]
