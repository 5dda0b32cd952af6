"""Declaring a pipeline's chain (:func:`cpu`, :func:`model`, :func:`fan_out`) and what its CPU
groups run on the workers (:func:`run_group` and the picklable pieces sent with it).

Workers unpickle :func:`run_group` by reference, so its module path, ``dask_dynbatch.pipeline.steps``,
must stay stable.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..client.batcher import Batcher

__all__ = ["CpuStep", "FanOut", "ModelStep", "cpu", "fan_out", "model", "run_group"]


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


# -- a chain run inside a collection's task (Pipeline.predict) ------------------------------------
def chain_plan(steps: Sequence[Any]) -> tuple:
    """The declared steps as a picklable plan: ``("cpu", fn)``, ``("model", name)``,
    ``("fan_out", plan)``."""
    out: list[tuple] = []
    for step in steps:
        if isinstance(step, CpuStep):
            out.append(("cpu", step.fn))
        elif isinstance(step, ModelStep):
            out.append(("model", step.batcher.spec.name))
        else:
            out.append(("fan_out", chain_plan(step.steps)))
    return tuple(out)


@dataclass(frozen=True)
class ChainRows:
    """What a collection's task runs its rows through for ``Pipeline.predict``: the chain's steps
    in order over all the block's rows at once, CPU steps right there in the task, model steps
    through the worker's own Batcher of each model (one request per row, or per element of a
    fan-out), so that the rows of a block form batches together. A row whose step fails drops out
    with its error; the others go on."""

    plan: tuple
    priority: int = 0
    timeout: float | None = None
    label = "pipeline"  # unannotated: one for every chain, not a field

    def rows(self, values: list[Any]) -> list[tuple[bool, Any]]:
        return self._run(self.plan, [(True, v) for v in values])

    def _run(self, plan: tuple, state: list[tuple[bool, Any]]) -> list[tuple[bool, Any]]:
        from ..client.dask_collections import ModelRows

        for kind, what in plan:
            alive = [i for i, (ok, _) in enumerate(state) if ok]
            if not alive:
                break
            if kind == "cpu":
                for i in alive:
                    try:
                        state[i] = (True, what(state[i][1]))
                    except Exception as exc:
                        state[i] = (False, exc)
            elif kind == "model":
                results = ModelRows(what, self.priority, self.timeout).rows([state[i][1] for i in alive])
                for i, result in zip(alive, results):
                    state[i] = result
            else:  # a fan-out: every element of every row, through the sub-plan together
                owners: list[int] = []
                elements: list[tuple[bool, Any]] = []
                for i in alive:
                    try:
                        items = _elements(state[i][1])
                    except TypeError as exc:
                        state[i] = (False, exc)
                        continue
                    owners.extend([i] * len(items))
                    elements.extend((True, v) for v in items)
                    state[i] = (True, [])
                done = self._run(what, elements)
                for i, (ok, value) in zip(owners, done):
                    if not state[i][0]:
                        continue
                    state[i] = (True, state[i][1] + [value]) if ok else (False, value)
        return state
