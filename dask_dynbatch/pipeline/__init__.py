"""Jobs split by resource kind: chains of CPU steps and model steps, one future per job.

A job is a chain such as *decode (CPU) -> segment (model A) -> crop (CPU) -> classify each crop
(model B) -> report (CPU)*. Declare the chain once with :func:`cpu`, :func:`model` and
:func:`fan_out`; :class:`Pipeline` runs thousands of jobs through it:

- **CPU steps** run on Dask workers, **grouped**: the jobs waiting at a CPU step are taken together,
  up to ``group_size`` of them (a partial group waits ``group_delay`` for more jobs while earlier
  groups run, and longer while every thread has a group of that step), and one Dask task runs the
  step on the whole group. Adjacent CPU steps are fused into that one task. So N jobs make about
  N / group_size tasks per CPU stage, not N (a Dask task costs milliseconds of scheduling).
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

Layout: :mod:`.steps` declares the chain and holds what the CPU groups run on the workers,
:mod:`.stages` the jobs and stages on the client's event loop, this module :class:`Pipeline`.

>>> pipe = Pipeline(client, [cpu(decode), model(seg), cpu(crop), fan_out(model(cls)), cpu(report)])  # doctest: +SKIP
>>> pipe.submit(raw, priority=1, timeout="2s").result()                                             # doctest: +SKIP
>>> [f.result() for f in pipe.map(dask_array_of_images)]                                           # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from dask.base import is_dask_collection
from distributed import Future as DaskFuture
from distributed import as_completed

from ..core.requests import RequestFuture
from ..errors import RequestTimeoutError
from ..spec import parse_seconds
from .stages import _DASK_INPUTS, _CpuStage, _FanOutStage, _FutureInput, _Job, _ModelStage, _RowInput
from .steps import CpuStep, FanOut, ModelStep, _Chain, _check_step, _Each, cpu, fan_out, model, run_group

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["CpuStep", "FanOut", "JobFuture", "ModelStep", "Pipeline", "cpu", "fan_out", "model", "run_group"]

logger = logging.getLogger(__name__)

#: how often the pipeline counts the cluster's worker threads (seconds)
THREADS_REFRESH_S = 5.0


class JobFuture(RequestFuture):
    """The future of one pipeline job (a :class:`~dask_dynbatch.RequestFuture`: awaitable);
    ``cancel()`` succeeds until the job has finished (what it stops: see the module docstring)."""


class Pipeline:
    """Run jobs through a chain of CPU steps and model steps; one future per job.

    ``client``: a connected :class:`distributed.Client` (sync or asynchronous); CPU steps run on its
    workers, model steps use Batchers made with the same client. ``steps``: :func:`cpu`,
    :func:`model` and :func:`fan_out` steps, in order.

    - ``group_size``: most jobs one Dask task of a CPU step runs.
    - ``group_delay``: longest a partial CPU group waits for more jobs while groups of its step
      are running (seconds or a string such as ``"5ms"``).
    - ``group_seconds``: about how much compute a CPU group of lower priority is cut to while jobs
      of a higher priority are about.
    - ``max_groups_in_flight``: groups of one CPU step submitted to Dask at once (counting only
      groups of a priority at least as high); default twice the cluster's threads. The rest wait
      here, which lets groups fill up and lets higher-priority jobs go first.
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

    def predict(self, x: Any, *, priority: int = 0, timeout: float | str | None = None,
                on_error: str = "raise") -> Any:
        """Run the chain over every row of the Dask collection ``x``, where its data lives; a lazy
        collection of the same kind, as :meth:`Batcher.predict <dask_dynbatch.Batcher.predict>`
        returns. Each block's task runs the chain over its rows: CPU steps in the task, model steps
        through the worker's own Batcher of each model, all the block's rows (or fan-out elements)
        at once. One row runs through :meth:`submit` from here first, to learn the output's shape.
        ``on_error="missing"``: a row whose chain failed is missing (NaN, None in a Bag) instead of
        failing the computation with :class:`~dask_dynbatch.RowError`; its position and error are
        logged as a Dask event of topic ``"dynbatch-row-errors"`` (source ``"pipeline"``), which
        ``client.get_events("dynbatch-row-errors")`` returns."""
        from ..client.dask_collections import run_collection
        from .steps import ChainRows, chain_plan

        if not is_dask_collection(x):
            raise TypeError(f"Pipeline.predict() takes a dask Array, Bag, DataFrame or Series, not a {type(x).__name__}; "
                            "for values in memory use map()")
        seconds = None if timeout is None else parse_seconds(timeout, "timeout")
        runner = ChainRows(chain_plan(self.steps), priority, seconds)
        return run_collection(runner, lambda sample: self.submit(sample).result(), x, on_error=on_error)

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

