"""The reference benchmark: how fast a device runs a reference model at several batch sizes.

Opt-in (``dynbatch.benchmark.on-start``, or :func:`dask_dynbatch.rerun_benchmark`): each worker can
measure its device with a reference model (torchvision ResNet-50 with random weights when
torchvision is importable, else a small built-in CNN), in its per-device variant (fp16 and
channels-last on CUDA, fp32 on CPU). The result, a :class:`LoadPerformanceTable` (samples/s and
latency per batch size), gives placement a prior for workers that have not run a model yet; once
a worker's model server has measured the model itself, its own figure wins.

* :func:`measure_table`: the timing loop (any ``run_batch(n)``, any clock), with a total time
  budget and out-of-memory handling;
* :func:`reference_model` and :func:`benchmark_device`: the reference model and its table.

torch (and torchvision) are imported lazily, inside the functions that need them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..core.oom import is_oom_error

__all__ = [
    "CPU_BATCH_SIZES",
    "CUDA_BATCH_SIZES",
    "DEFAULT_BATCH_SIZES",
    "LoadPerformanceRow",
    "LoadPerformanceTable",
    "ReferenceModel",
    "benchmark_device",
    "measure_table",
    "reference_model",
    "small_cnn",
]

DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 8, 32, 128)
"""Batch sizes :func:`measure_table` tries by default."""
CPU_BATCH_SIZES: tuple[int, ...] = (1, 4, 16, 64)
"""Batch sizes :func:`benchmark_device` tries on a CPU."""
CUDA_BATCH_SIZES: tuple[int, ...] = (1, 8, 32, 128, 256, 512)
"""Batch sizes :func:`benchmark_device` tries on a CUDA device."""

STATUS_OK = "ok"
STATUS_OOM = "out of memory"
STATUS_SKIPPED_BUDGET = "skipped: time budget spent"
STATUS_SKIPPED_AFTER_OOM = "skipped: a smaller size ran out of memory"

_MIN_SECONDS = 1e-9


# -- The table ---------------------------------------------------------------------------------
@dataclass
class LoadPerformanceRow:
    """One batch size of a load-performance table."""

    batch_size: int
    samples_per_s: float | None = None  # batch_size / latency_s when the size ran
    latency_s: float | None = None  # median seconds per batch (one synchronised forward pass)
    ran: bool = False
    runs: int = 0  # timed runs the figures come from (observations, for a lazy table)
    status: str = STATUS_OK  # "ok", "out of memory" or "skipped: ..."


@dataclass
class LoadPerformanceTable:
    """Samples/s and latency per batch size for one model on one device (rows sorted by size)."""

    device: str  # e.g. "cpu" or "cuda:0"
    model_name: str  # "resnet50", "small_cnn" or a user model's name
    rows: list[LoadPerformanceRow] = field(default_factory=list)
    device_name: str | None = None  # GPU product name, CPU model
    dtype: str | None = None  # what the model ran in, e.g. "float16"
    time_budget_s: float | None = None
    elapsed_s: float = 0.0
    measured_at: float | None = None  # time.time() of the measurement

    # -- summaries ---------------------------------------------------------------------------

    @property
    def ran_rows(self) -> list[LoadPerformanceRow]:
        """Rows that ran, sorted by batch size."""
        return sorted(
            (r for r in self.rows if r.ran and r.latency_s is not None and r.latency_s > 0),
            key=lambda r: r.batch_size,
        )

    @property
    def largest_batch(self) -> int | None:
        """Largest batch size that ran (``None`` if none did)."""
        rows = self.ran_rows
        return rows[-1].batch_size if rows else None

    @property
    def best_throughput(self) -> float | None:
        """Highest samples/s over the sizes that ran: the device's benchmark score."""
        rows = self.ran_rows
        return max(r.samples_per_s for r in rows) if rows else None  # type: ignore[type-var]

    @property
    def best_batch_size(self) -> int | None:
        """Batch size that reached :attr:`best_throughput` (smallest on ties)."""
        rows = self.ran_rows
        if not rows:
            return None
        best = max(r.samples_per_s for r in rows)  # type: ignore[type-var]
        return min(r.batch_size for r in rows if r.samples_per_s == best)

    def row(self, batch_size: int) -> LoadPerformanceRow | None:
        """The row for exactly ``batch_size``, if one exists."""
        for r in self.rows:
            if r.batch_size == batch_size:
                return r
        return None

    # -- serialisation -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON- and msgpack-friendly), with the summaries included."""
        data = asdict(self)
        data["largest_batch"] = self.largest_batch
        data["best_throughput"] = self.best_throughput
        data["best_batch_size"] = self.best_batch_size
        return data


# -- The timing loop ---------------------------------------------------------------------------
def measure_table(
    run_batch: Callable[[int], Any],
    batch_sizes: Iterable[int] = DEFAULT_BATCH_SIZES,
    *,
    time_budget_s: float = 2.0,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
    is_oom: Callable[[BaseException], bool] = is_oom_error,
    min_runs: int = 1,
    max_runs: int = 50,
    device: str = "unknown",
    model_name: str = "custom",
    device_name: str | None = None,
    dtype: str | None = None,
) -> LoadPerformanceTable:
    """Time ``run_batch(n)`` (one batch of ``n`` samples, returning when done: synchronised on a
    GPU) for increasing batch sizes within a total time budget, warm-up included.

    For each size in increasing order: ``warmup`` untimed calls, then timed calls until the
    size's slice of the remaining budget is used (at least ``min_runs``, at most
    ``max_runs``); the row records the median latency.  Growth stops

    * when the budget is spent, or when the next size is predicted not to fit in what is left
      (its warm-up and first timed run, extrapolated from the previous size's latency, as if
      per-sample time stayed constant): the remaining sizes are recorded as skipped;
    * when a size fails with an error ``is_oom`` accepts: that size is recorded ``ran=False``
      with status ``"out of memory"`` and the larger ones are skipped (other errors propagate).

    The budget is checked before each call, so the total can exceed it by at most the calls
    needed to measure the first size (which always runs) or one call in progress. ``device``,
    ``model_name``, ``device_name`` and ``dtype`` are copied into the table.
    """
    sizes = _sorted_sizes(batch_sizes)
    min_runs = max(1, int(min_runs))
    max_runs = max(min_runs, int(max_runs))
    warmup = max(0, int(warmup))

    started = clock()
    deadline = started + float(time_budget_s)
    rows: list[LoadPerformanceRow] = []
    stop_status: str | None = None
    previous: LoadPerformanceRow | None = None

    for index, size in enumerate(sizes):
        if stop_status is not None:
            rows.append(LoadPerformanceRow(size, status=stop_status))
            continue
        now = clock()
        remaining = deadline - now
        if _over_budget(previous, size, remaining, calls=warmup + min_runs):
            stop_status = STATUS_SKIPPED_BUDGET
            rows.append(LoadPerformanceRow(size, status=stop_status))
            continue
        slice_end = now + max(0.0, remaining) / (len(sizes) - index)
        try:
            durations = _time_size(run_batch, size, warmup, clock, min_runs, max_runs, slice_end)
        except Exception as exc:  # noqa: BLE001 - classified below
            if not is_oom(exc):
                raise
            rows.append(LoadPerformanceRow(size, ran=False, status=STATUS_OOM))
            stop_status = STATUS_SKIPPED_AFTER_OOM
            continue
        latency = max(statistics.median(durations), _MIN_SECONDS)
        previous = LoadPerformanceRow(
            size, samples_per_s=size / latency, latency_s=latency, ran=True, runs=len(durations)
        )
        rows.append(previous)

    return LoadPerformanceTable(
        device=device,
        model_name=model_name,
        rows=rows,
        device_name=device_name,
        dtype=dtype,
        time_budget_s=float(time_budget_s),
        elapsed_s=clock() - started,
        measured_at=time.time(),
    )


def _sorted_sizes(batch_sizes: Iterable[int]) -> list[int]:
    sizes = sorted({int(n) for n in batch_sizes})
    if not sizes:
        raise ValueError("no batch sizes given")
    if sizes[0] < 1:
        raise ValueError(f"batch sizes must be >= 1, got {sizes[0]}")
    return sizes


def _over_budget(previous: LoadPerformanceRow | None, size: int, remaining: float, calls: int) -> bool:
    """Whether ``calls`` calls of ``size`` are predicted not to fit in ``remaining`` seconds (the
    previous size's latency extrapolated at constant per-sample time; the first size always runs)."""
    if previous is None:
        return False
    predicted_call = previous.latency_s * size / previous.batch_size  # type: ignore[operator]
    return remaining <= 0 or predicted_call * calls > remaining


def _time_size(
    run_batch: Callable[[int], Any],
    size: int,
    warmup: int,
    clock: Callable[[], float],
    min_runs: int,
    max_runs: int,
    slice_end: float,
) -> list[float]:
    """Seconds of each timed call of one size, after ``warmup`` untimed ones: at least
    ``min_runs`` calls, then more until the next would end past ``slice_end`` (at most ``max_runs``)."""
    durations: list[float] = []
    for _ in range(warmup):
        run_batch(size)
    while True:
        before = clock()
        run_batch(size)
        after = clock()
        durations.append(max(0.0, after - before))
        if len(durations) >= max_runs:
            return durations
        if len(durations) >= min_runs and after + durations[-1] > slice_end:
            return durations


# -- The reference model and the device benchmark (lazy torch) ---------------------------------
@dataclass
class ReferenceModel:
    """A model ready to benchmark on one device (its per-device variant applied): ``module`` in
    eval mode on ``device`` in ``dtype`` (a torch dtype name, of inputs and weights)."""

    name: str  # "resnet50", "small_cnn" or a user model's name
    module: Any
    sample_shape: tuple[int, ...]  # one input sample, e.g. (3, 224, 224)
    device: str
    dtype: str
    channels_last: bool = False  # whether inputs are laid out channels-last


def small_cnn(num_classes: int = 10) -> Any:
    """The built-in small CNN for 64x64 RGB inputs, ``Conv(3->32, s2) ReLU Conv(32->64, s2) ReLU
    Conv(64->128, s2) ReLU AvgPool Linear``: the reference model when torchvision is not importable,
    and the CPU demo's model."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 32, kernel_size=3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(32, 64, kernel_size=3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(64, 128, kernel_size=3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


def _torchvision_resnet50() -> Any | None:
    try:
        from torchvision.models import resnet50
    except Exception:  # noqa: BLE001 - torchvision missing or broken: fall back
        return None
    return resnet50(weights=None)  # random weights: nothing is downloaded


def reference_model(device: Any = "cpu", *, prefer: str = "auto") -> ReferenceModel:
    """The reference model for ``device``: float16 weights and channels-last on CUDA, float32
    elsewhere.

    ``prefer="auto"``: torchvision ResNet-50 (random weights, never downloads) when torchvision is
    importable, else the built-in :func:`small_cnn`; ``"resnet50"`` raises ``ImportError`` without
    torchvision; ``"small_cnn"`` always builds the small CNN.
    """
    import torch

    if prefer not in ("auto", "resnet50", "small_cnn"):
        raise ValueError(f"prefer must be 'auto', 'resnet50' or 'small_cnn', got {prefer!r}")
    torch_device = torch.device(device)
    module = None
    if prefer in ("auto", "resnet50"):
        module = _torchvision_resnet50()
        if module is None and prefer == "resnet50":
            raise ImportError("torchvision is required for the ResNet-50 reference model")
    if module is not None:
        name, sample_shape = "resnet50", (3, 224, 224)
    else:
        module, name, sample_shape = small_cnn(), "small_cnn", (3, 64, 64)

    on_cuda = torch_device.type == "cuda"
    dtype = torch.float16 if on_cuda else torch.float32
    module = module.eval().to(device=torch_device, dtype=dtype)
    if on_cuda:
        module = module.to(memory_format=torch.channels_last)
    return ReferenceModel(
        name=name,
        module=module,
        sample_shape=sample_shape,
        device=str(torch_device),
        dtype=str(dtype).replace("torch.", ""),
        channels_last=on_cuda,
    )


def _device_description(torch_device: Any) -> str:
    import platform

    import torch

    if torch_device.type == "cuda":
        try:
            return torch.cuda.get_device_name(torch_device)
        except Exception:  # noqa: BLE001
            return "cuda"
    processor = platform.processor() or platform.machine() or "cpu"
    return f"{processor} ({torch.get_num_threads()} torch threads)"


def benchmark_device(
    device: Any = "cpu",
    time_budget_s: float = 2.0,
    model: Any = None,
    *,
    batch_sizes: Sequence[int] | None = None,
    sample_shape: Sequence[int] | None = None,
    warmup: int = 1,
    prefer: str = "auto",
    clock: Callable[[], float] = time.perf_counter,
) -> LoadPerformanceTable:
    """Measure the load-performance table of ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...)
    with :func:`measure_table`.

    ``model``: a :class:`ReferenceModel`, a bare ``torch.nn.Module`` (used as it is, in its
    parameters' dtype, on inputs of ``sample_shape``, default ``(3, 224, 224)``), or None for
    :func:`reference_model` (with ``prefer``). ``batch_sizes`` default to
    :data:`CUDA_BATCH_SIZES` on CUDA, :data:`CPU_BATCH_SIZES` elsewhere.
    """
    import torch

    torch_device = torch.device(device)
    if torch_device.type == "cuda" and torch_device.index is None:
        torch_device = torch.device("cuda", torch.cuda.current_device())
    reference = _as_reference(model, torch_device, sample_shape, prefer)
    if batch_sizes is None:
        batch_sizes = CUDA_BATCH_SIZES if torch_device.type == "cuda" else CPU_BATCH_SIZES
    run_batch = _RandomBatches(reference, torch_device)
    try:
        return measure_table(
            run_batch,
            batch_sizes,
            time_budget_s=time_budget_s,
            warmup=warmup,
            clock=clock,
            device=str(torch_device),
            model_name=reference.name,
            device_name=_device_description(torch_device),
            dtype=reference.dtype,
        )
    finally:
        run_batch.inputs.clear()


def _as_reference(model: Any, torch_device: Any, sample_shape: Sequence[int] | None, prefer: str) -> ReferenceModel:
    """What :func:`benchmark_device` measures, as a :class:`ReferenceModel` on ``torch_device``."""
    import torch

    if model is None:
        return reference_model(torch_device, prefer=prefer)
    if isinstance(model, ReferenceModel):
        return model
    module = model.eval().to(torch_device)
    parameter = next(iter(module.parameters()), None)
    dtype = parameter.dtype if parameter is not None else torch.float32
    return ReferenceModel(
        name=type(model).__name__,
        module=module,
        sample_shape=tuple(sample_shape or (3, 224, 224)),
        device=str(torch_device),
        dtype=str(dtype).replace("torch.", ""),
        channels_last=False,
    )


class _RandomBatches:
    """``run_batch(n)`` for :func:`measure_table`: a forward pass under ``torch.inference_mode()``
    on random inputs made on the device (once per size, so outside the timed calls after warm-up;
    one size's input alive at a time); on CUDA each call ends with ``torch.cuda.synchronize``. An
    out-of-memory error drops the input and frees the device cache before it propagates."""

    def __init__(self, reference: ReferenceModel, torch_device: Any):
        import torch

        self.reference = reference
        self.device = torch_device
        self.on_cuda = torch_device.type == "cuda"
        self.dtype = getattr(torch, reference.dtype)
        self.inputs: dict[int, Any] = {}

    def __call__(self, n: int) -> None:
        import torch

        try:
            with torch.inference_mode():
                x = self.inputs.get(n)
                if x is None:
                    self.inputs.clear()  # keep one input alive at a time
                    x = torch.randn((n, *self.reference.sample_shape), device=self.device, dtype=self.dtype)
                    if self.reference.channels_last and x.dim() == 4:
                        x = x.contiguous(memory_format=torch.channels_last)
                    self.inputs[n] = x
                self.reference.module(x)
                if self.on_cuda:
                    torch.cuda.synchronize(self.device)
        except Exception as exc:
            if is_oom_error(exc):
                self.inputs.clear()
                if self.on_cuda:
                    torch.cuda.empty_cache()
            raise
