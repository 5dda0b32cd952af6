"""Batch sizes from the memory a device has free now.

One :class:`MemorySizer` per device, shared by every model loaded on it.  For
each model it keeps a :class:`MemoryProfile` (fixed bytes plus bytes per
sample, fitted from measured peaks) and turns the device's free memory into a
*cap*: the largest batch that fits now.  Batches reserve their memory while
they run so that concurrent batches of several models jointly fit.  Out of
memory errors are recognised (:func:`is_oom_error`), the batch is split and
retried (:func:`run_split_on_oom`) and the profile is corrected.

This module is pure: it imports no GPU library, no dask and no plugin (only
:mod:`dask_dynbatch.errors`, for ``SampleTooLargeError``).  The memory numbers
come from a :class:`MemorySource` (anything with ``read() -> DeviceMemory``;
the real ones are in :mod:`dask_dynbatch.worker.telemetry`, a settable
:class:`FakeMemory` is here for tests).

Policies
--------
Available memory
    ``available = effective_free - margin - reserved``, ``margin = min(safety_margin * capacity,
    safety_margin_max)``, where ``effective_free`` is free device memory plus our framework's unused
    cache, ``capacity`` is the device's total (or its explicit limit) and
    ``reserved`` is the sum of the reservations of all batches in flight on
    the device.  With a ``budget``, ``available`` is also at most
    ``budget_bytes - framework_used - reserved``.  A batch in flight may
    already show up in ``effective_free`` *and* be subtracted as a reservation:
    the double count is deliberate, it errs towards smaller batches (an OOM
    costs a split and a retry, a smaller batch costs a little throughput).
Cap
    ``profile.max_samples(available)``, at least 1 (a model is never told it
    may not run a single sample; whether that sample fits is found out by
    running it).  ``None`` while the model has no profile: the caller uses its
    own conservative default.
Fair share
    When other models are active on the device (holding a reservation or
    waiting for one), a model's cap and partial grants are also limited to
    ``(available + reserved) / k - own_reserved`` where ``k`` is the number of
    active models, this one included - but never below one sample when one
    sample fits in ``available``.
Admission
    Reservations are granted first come, first served across all models on a
    device: a request waits while an older request of any model waits, so no
    model is starved by another's stream of batches.  A request is granted
    when its memory fits ``available`` (or, for ``partial=True``, when at
    least one sample does: it gets as many rows as fit), or when nothing else
    is in flight on the device (waiting cannot make more memory appear; an
    OOM is then handled by splitting).
Out of memory
    An OOM at batch size ``n`` with ``available`` bytes says
    ``bytes_for(n) > available``: the profile raises its bytes per sample so
    that the cap at that availability drops below ``n``.  If the memory
    available right after the failure explains it (the profile says ``n``
    no longer fits: another process took memory), the cap at that
    availability becomes ``n - 1`` and the fit is otherwise trusted.  If not
    (the profile underestimates), the cap there becomes halfway between the
    largest batch size that succeeded and ``n``, so repeated OOMs bisect to
    the real limit.  A constraint is dropped when a batch of ``n`` or more
    later succeeds with no more memory available.  A batch of one that runs
    out of memory adds no constraint (it cannot lower the cap further and
    would punish ordinary samples for one outsized input).
Change detection
    :meth:`MemorySizer.poll` reports a re-plan event when the memory not held
    by this process (``effective_free + framework_used``) moved by more than
    ``min_change`` of the device capacity since the last reported change, so
    our own batches starting and finishing do not count as events.
"""

from __future__ import annotations

import math
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal, NamedTuple, Protocol, runtime_checkable

from ..errors import SampleTooLargeError

__all__ = [
    "DeviceMemory",
    "FakeMemory",
    "MemorySource",
    "MemoryProfile",
    "MemorySizer",
    "Reservation",
    "OutputChunk",
    "estimate_bytes_per_sample",
    "is_oom_error",
    "run_split_on_oom",
]

#: Largest cap ever reported (keeps arithmetic on absurd profiles finite).
MAX_CAP = 1 << 31



@dataclass
class DeviceMemory:
    """One reading of a device's memory, in bytes.

    Parameters
    ----------
    total : int
        Physical memory of the device (GPU memory, or host RAM).
    free : int
        Memory free as the driver / operating system sees it, other processes
        included.  Where ``limit`` applies, already clipped to what the limit
        leaves.
    framework_reserved_unused : int, default 0
        Memory our own framework's allocator holds in its cache but does not
        use (torch ``memory_reserved - memory_allocated``, CuPy pool
        ``total_bytes - used_bytes``).  Other processes cannot use it; we can.
    limit : int or None
        An explicit budget for this process on this device (a Dask worker's
        ``memory_limit`` on CPU, torch's per-process memory fraction, a CuPy
        pool limit), or None.
    framework_used : int or None
        Bytes this process holds on the device in live allocations (torch
        ``memory_allocated``, CuPy pool ``used_bytes``, process RSS on the
        host, this process's usage by NVML), or None when the source cannot
        tell.  Used for explicit per-device budgets and to tell other
        processes' memory changes from our own.
    nvml_free : int or None
        Free memory as NVML reports it, when the source read NVML.
    source : str
        Name of the source that produced the reading.
    """

    total: int
    free: int
    framework_reserved_unused: int = 0
    limit: int | None = None
    framework_used: int | None = None
    nvml_free: int | None = None
    source: str = ""

    @property
    def capacity(self) -> int:
        """Memory this process may use at most: ``total``, or ``limit`` if smaller."""
        if self.limit is not None:
            return max(0, min(self.total, self.limit))
        return self.total

    @property
    def effective_free(self) -> int:
        """Memory a new allocation of ours can get now: free plus our unused cache."""
        return max(0, self.free) + max(0, self.framework_reserved_unused)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict, with ``capacity`` and ``effective_free`` added."""
        out = asdict(self)
        out["capacity"] = self.capacity
        out["effective_free"] = self.effective_free
        return out


@runtime_checkable
class MemorySource(Protocol):
    """Anything that can say how much memory a device has free now."""

    def read(self) -> DeviceMemory:
        """Return a fresh :class:`DeviceMemory` reading."""
        ...


class FakeMemory:
    """A memory source with numbers set by hand, for deterministic tests.

    Parameters
    ----------
    total : int
        Total bytes.
    free : int
        Free bytes; set ``fake.free = ...`` to simulate other jobs.
    framework_reserved_unused : int, default 0
    limit : int or None
    framework_used : int or None

    Attributes
    ----------
    reads : int
        How many times :meth:`read` was called.
    """

    name = "fake"

    def __init__(
        self,
        total: int,
        free: int,
        *,
        framework_reserved_unused: int = 0,
        limit: int | None = None,
        framework_used: int | None = None,
    ):
        self.total = int(total)
        self.free = int(free)
        self.framework_reserved_unused = int(framework_reserved_unused)
        self.limit = limit
        self.framework_used = framework_used
        self.reads = 0
        self._lock = threading.Lock()

    def read(self) -> DeviceMemory:
        """Return the numbers currently set, and count the read."""
        with self._lock:
            self.reads += 1
            return DeviceMemory(
                total=self.total,
                free=self.free,
                framework_reserved_unused=self.framework_reserved_unused,
                limit=self.limit,
                framework_used=self.framework_used,
                source=self.name,
            )

    def __repr__(self) -> str:
        return f"FakeMemory(total={self.total}, free={self.free})"


# --------------------------------------------------------------- OOM errors
_OOM_CLASS_NAMES = frozenset({"OutOfMemoryError", "OutOfMemory", "ResourceExhaustedError"})
_OOM_MESSAGES = (
    "out of memory",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "cudnn_status_not_enough_workspace",
    "cufft_alloc_failed",
    "cusolver_status_alloc_failed",
    "cusparse_status_alloc_failed",
    "curand_status_allocation_failed",
    "cuda_error_out_of_memory",
    "cudaerrormemoryallocation",
    "can't allocate memory",
    "failed to allocate memory",
    "resource_exhausted",
)


def is_oom_error(exc: BaseException) -> bool:
    """Whether an exception means a memory allocation failed.

    Recognises torch's ``OutOfMemoryError`` (``torch.cuda.OutOfMemoryError``
    is the same class), CuPy's ``OutOfMemoryError`` and any other
    ``MemoryError``, and ``RuntimeError``s whose text reports an allocation
    failure (``out of memory``, ``CUBLAS_STATUS_ALLOC_FAILED``,
    ``CUDNN_STATUS_ALLOC_FAILED``, ``CUDNN_STATUS_NOT_ENOUGH_WORKSPACE``, the
    other CUDA libraries' ``*_ALLOC_FAILED``, torch's CPU allocator's
    ``can't allocate memory``).  Explicit causes (``raise X from oom``) are
    followed.  A :class:`SampleTooLargeError` (a ``MemoryError``) is *not* an
    out-of-memory error here: it is the verdict after splitting.  Never
    imports torch or CuPy.

    Parameters
    ----------
    exc : BaseException

    Returns
    -------
    bool
    """
    seen = 0
    while exc is not None and seen < 8:
        seen += 1
        if isinstance(exc, SampleTooLargeError):
            return False
        if isinstance(exc, MemoryError):
            return True
        if any(cls.__name__ in _OOM_CLASS_NAMES for cls in type(exc).__mro__):
            return True
        torch = sys.modules.get("torch")
        torch_oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
        if isinstance(torch_oom, type) and isinstance(exc, torch_oom):
            return True
        if isinstance(exc, RuntimeError):
            text = str(exc).lower()
            if any(pattern in text for pattern in _OOM_MESSAGES):
                return True
        exc = exc.__cause__
    return False


def _drop_exception_references(exc: BaseException) -> None:
    """Release what a caught exception keeps alive (frames, their tensors).

    Clears the locals of finished frames in its traceback and in the
    tracebacks of its cause/context, then detaches them.
    """
    pending = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if current.__traceback__ is not None:
            traceback.clear_frames(current.__traceback__)
            current.__traceback__ = None
        pending.extend([current.__cause__, current.__context__])
        current.__cause__ = None
        current.__context__ = None


# ------------------------------------------------------------ split & retry
class OutputChunk(NamedTuple):
    """Output of rows ``start:stop`` of a batch, or the error of one row.

    Attributes
    ----------
    start, stop : int
        Row range, ``stop`` exclusive.
    output : Any
        What ``run(start, stop)`` returned; None for an error chunk.
    error : SampleTooLargeError or None
        Set (and ``stop == start + 1``) when that single row did not fit.
    """

    start: int
    stop: int
    output: Any
    error: SampleTooLargeError | None = None


def run_split_on_oom(
    run: Callable[[int, int], Any],
    n: int,
    *,
    on_oom: Callable[[int], Any] | None = None,
    free_cache: Callable[[], Any] | None = None,
    max_rows: Callable[[], int | None] | None = None,
    on_sample_too_large: Literal["raise", "collect"] = "raise",
) -> list[OutputChunk]:
    """Run rows ``0:n`` through ``run``, splitting ranges that run out of memory.

    Parameters
    ----------
    run : callable ``(start, stop) -> output``
        Runs rows ``start:stop`` of the batch and returns their output.
    n : int
        Number of rows.
    on_oom : callable ``(n_rows) -> None``, optional
        Called after each out-of-memory failure with the size of the range
        that failed (e.g. ``lambda k: sizer.on_oom(model, k)``).
    free_cache : callable, optional
        Called after each failure, once the exception is released (e.g.
        ``torch.cuda.empty_cache``).
    max_rows : callable ``() -> int | None``, optional
        Consulted before each range not yet tried (e.g.
        ``lambda: sizer.cap(model)``): ranges longer than it are cut, so a cap
        lowered by an OOM also applies to the rest of the batch.  Halves of a
        failed range run as they are.
    on_sample_too_large : {"raise", "collect"}, default "raise"
        What to do when a single row runs out of memory: raise
        :class:`SampleTooLargeError`, or record it as an error chunk and go on
        with the other rows (the row fails alone).

    Returns
    -------
    list of OutputChunk
        Contiguous chunks covering ``0:n`` in row order, each run exactly once
        successfully: concatenate ``chunk.output`` in list order (after
        handling chunks whose ``error`` is set, in ``"collect"`` mode).

    Raises
    ------
    SampleTooLargeError
        A single row ran out of memory (``on_sample_too_large="raise"``).
    Exception
        Any exception of ``run`` that is not an out-of-memory error, unchanged.

    Notes
    -----
    On an out-of-memory error the exception and its traceback are released
    (frame locals cleared, so tensors of the failed attempt can be freed)
    before ``free_cache`` and ``on_oom`` run; then the range is split in two
    halves, retried first half first.  A row is never run again once its
    range succeeded.
    """
    if on_sample_too_large not in ("raise", "collect"):
        raise ValueError("on_sample_too_large must be 'raise' or 'collect'")
    n = int(n)
    chunks: list[OutputChunk] = []
    # (start, stop, is_half_of_failed_range)
    pending: deque[tuple[int, int, bool]] = deque([(0, n, False)] if n > 0 else [])
    while pending:
        start, stop, is_half = pending.popleft()
        if not is_half and max_rows is not None:
            limit = max_rows()
            if limit is not None and 1 <= limit < stop - start:
                pending.appendleft((start + limit, stop, False))
                stop = start + limit
        failure_text: str | None = None
        try:
            output = run(start, stop)
        except Exception as exc:
            if not is_oom_error(exc):
                raise
            failure_text = f"{type(exc).__name__}: {exc}"[:500]
            _drop_exception_references(exc)
        # leaving the except block unbinds ``exc``: nothing holds the failed attempt
        if failure_text is None:
            chunks.append(OutputChunk(start, stop, output))
            continue
        if free_cache is not None:
            free_cache()
        if on_oom is not None:
            on_oom(stop - start)
        if stop - start == 1:
            error = SampleTooLargeError(start, failure_text)
            if on_sample_too_large == "raise":
                raise error
            chunks.append(OutputChunk(start, stop, None, error))
            continue
        middle = start + (stop - start) // 2
        pending.appendleft((middle, stop, True))
        pending.appendleft((start, middle, True))
    return chunks


# ------------------------------------------------------------------ profile
def estimate_bytes_per_sample(
    sample_nbytes: int,
    output_nbytes: int = 0,
    activation_factor: float = 4.0,
    *,
    compute_itemsize_ratio: float = 1.0,
) -> int:
    """Honest rough estimate of the memory one sample costs (where nothing is measured).

    Parameters
    ----------
    sample_nbytes : int
        Bytes of one input row as it arrives.
    output_nbytes : int, default 0
        Bytes of one output row.
    activation_factor : float, default 4.0
        Activations kept alive during the forward pass, as a multiple of the
        converted input.  Deep or wide models need more; it is a guess, used
        until a measurement replaces it.
    compute_itemsize_ratio : float, default 1.0
        Item size of the compute dtype over the input's (4.0 for ``uint8``
        images converted to ``float32``).

    Returns
    -------
    int
        ``input + converted input * (1 + activation_factor) + output`` bytes.
    """
    if sample_nbytes < 0 or output_nbytes < 0 or activation_factor < 0:
        raise ValueError("sizes and activation_factor must be >= 0")
    converted = sample_nbytes * compute_itemsize_ratio
    return int(math.ceil(sample_nbytes + converted * (1.0 + activation_factor) + output_nbytes))


class MemoryProfile:
    """Memory a model's batch needs: ``fixed_bytes + bytes_per_sample * n``.

    Parameters
    ----------
    warmup : int, default 0
        Number of first :meth:`update` observations to ignore (the first
        batches allocate one-time workspaces and autotuning buffers).
    max_sizes : int, default 32
        Distinct batch sizes remembered (the oldest is forgotten first).
    bytes_per_sample, fixed_bytes : optional
        A prior estimate (e.g. :func:`estimate_bytes_per_sample`) used until a
        measurement exists.

    Notes
    -----
    ``peak_bytes`` should be the peak a batch adds over the memory held before
    it (torch: ``max_memory_allocated`` after ``reset_peak_memory_stats``,
    minus ``memory_allocated`` at the start); a peak that includes resident
    weights only makes the profile conservative.

    Fit: for each batch size the largest peak seen is kept.  With two or more
    distinct sizes, least squares gives the slope (bytes per sample); the
    intercept is then raised so that the line lies on or above every
    observation (a cap must not admit a batch bigger than one seen to need
    more).  A non-positive slope or negative intercept falls back to the line
    through the origin above every point, ``max(peak / n)``.  With one size
    the honest estimate is ``peak / n`` per sample and no fixed part (an upper
    bound on the per-sample cost).  Out-of-memory constraints raise the
    per-sample cost further (see :meth:`on_oom`).

    Not thread-safe on its own; :class:`MemorySizer` guards it with its lock.
    """

    def __init__(
        self,
        *,
        warmup: int = 0,
        max_sizes: int = 32,
        bytes_per_sample: float | None = None,
        fixed_bytes: int = 0,
    ):
        if warmup < 0 or max_sizes < 2:
            raise ValueError("warmup must be >= 0 and max_sizes >= 2")
        self.warmup_remaining = int(warmup)
        self.max_sizes = int(max_sizes)
        self._peaks: dict[int, int] = {}
        # batch size -> (available bytes, divisor): bytes_for(n) > available
        self._constraints: dict[int, tuple[int, float]] = {}
        self._prior: tuple[float, float] | None = None
        if bytes_per_sample is not None:
            self.set_prior(bytes_per_sample, fixed_bytes)
        self.observations = 0
        self.oom_count = 0
        self._fit: tuple[float, float | None, str] = (0.0, None, "none")
        self._refit()

    # ---- inputs
    def set_prior(self, bytes_per_sample: float, fixed_bytes: float = 0) -> None:
        """Use an estimate until measurements exist."""
        if bytes_per_sample <= 0 or fixed_bytes < 0:
            raise ValueError("bytes_per_sample must be > 0 and fixed_bytes >= 0")
        self._prior = (float(fixed_bytes), float(bytes_per_sample))
        self._refit()

    def update(self, n: int, peak_bytes: int, available_bytes: int | None = None) -> bool:
        """Record that a batch of ``n`` rows peaked at ``peak_bytes``.

        Parameters
        ----------
        n : int
            Rows in the batch (>= 1).
        peak_bytes : int
            Peak memory the batch needed.
        available_bytes : int, optional
            Memory that was available when the batch started; used to drop
            out-of-memory constraints this success contradicts.

        Returns
        -------
        bool
            False when the observation was a warm-up and was ignored.
        """
        n = int(n)
        if n < 1:
            raise ValueError(f"batch size must be >= 1, got {n}")
        self.observations += 1
        self._clear_contradicted(n, available_bytes)
        if self.warmup_remaining > 0:
            self.warmup_remaining -= 1
            self._refit()
            return False
        peak = max(0, int(peak_bytes))
        previous = self._peaks.pop(n, None)
        self._peaks[n] = peak if previous is None else max(previous, peak)
        while len(self._peaks) > self.max_sizes:
            del self._peaks[next(iter(self._peaks))]
        self._refit()
        return True

    def on_oom(self, n: int, available_bytes: int, *, explained: bool = False) -> None:
        """Record that a batch of ``n`` rows ran out of memory with ``available_bytes``.

        Parameters
        ----------
        n : int
            Rows in the batch that failed.
        available_bytes : int
            Memory that was available to it when it started.
        explained : bool, default False
            True when the profile already says ``n`` rows do not fit in the
            memory available *now* (another process took memory while the
            batch ran): the profile is not wrong, and only ``n`` itself is
            ruled out at that availability.

        Notes
        -----
        The per-sample cost is raised so that ``max_samples(available_bytes)``
        is at most a target size: ``n - 1`` when explained or when no smaller
        batch has succeeded yet, otherwise halfway between the largest size
        that succeeded and ``n`` (bisection: a profile that underestimates
        converges in a few OOMs instead of one OOM per row).  ``n == 1`` adds
        no constraint.
        """
        self.oom_count += 1
        n = int(n)
        target = n - 1
        if not explained:
            smaller = [size for size in self._peaks if size < n]
            if smaller:
                largest_ok = max(smaller)
                target = min(n - 1, max(largest_ok, (largest_ok + n) // 2))
        self._add_constraint(n, int(available_bytes), target + 0.5)

    def _add_constraint(self, n: int, available: int, divisor: float) -> None:
        if n <= 1 or available <= 0:
            self._refit()
            return
        old = self._constraints.pop(n, None)
        if old is not None and old[0] / old[1] > available / divisor:
            available, divisor = old
        self._constraints[n] = (available, divisor)
        while len(self._constraints) > self.max_sizes:
            del self._constraints[next(iter(self._constraints))]
        self._refit()

    def _clear_contradicted(self, n: int, available: int | None) -> None:
        for size, (limit_available, _divisor) in list(self._constraints.items()):
            if size <= n and (available is None or available <= limit_available):
                del self._constraints[size]

    # ---- fit
    def _refit(self) -> None:
        sizes = list(self._peaks)
        fixed, per_sample, how = 0.0, None, "none"
        if len(sizes) >= 2:
            xs = [float(s) for s in sizes]
            ys = [float(self._peaks[s]) for s in sizes]
            x_mean = sum(xs) / len(xs)
            y_mean = sum(ys) / len(ys)
            sxx = sum((x - x_mean) ** 2 for x in xs)
            sxy = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys))
            slope = sxy / sxx
            intercept = y_mean - slope * x_mean
            if slope > 0 and intercept >= 0:
                fixed = intercept + max(0.0, max(y - (intercept + slope * x) for x, y in zip(xs, ys)))
                per_sample, how = slope, "fit"
            else:
                fixed, per_sample, how = 0.0, max(y / x for x, y in zip(xs, ys)), "envelope"
        elif len(sizes) == 1:
            size = sizes[0]
            fixed, per_sample, how = 0.0, self._peaks[size] / size, "single"
        elif self._prior is not None:
            fixed, per_sample = self._prior
            how = "prior"
        floors = [
            (available - fixed) / divisor
            for available, divisor in self._constraints.values()
            if available > fixed
        ]
        if floors and (per_sample is None or max(floors) > per_sample):
            per_sample = max(floors)
            how = how + "+oom" if how != "none" else "oom"
        if per_sample is not None:
            per_sample = max(per_sample, 1.0)
        self._fit = (fixed, per_sample, how)

    # ---- outputs
    @property
    def known(self) -> bool:
        """Whether there is any estimate (measured, prior or from an OOM)."""
        return self._fit[1] is not None

    @property
    def fixed_bytes(self) -> int:
        """Bytes a batch needs regardless of its size."""
        return int(math.ceil(self._fit[0]))

    @property
    def bytes_per_sample(self) -> float | None:
        """Bytes each row adds, or None when unknown."""
        return self._fit[1]

    @property
    def basis(self) -> str:
        """Where the estimate comes from: ``fit``, ``envelope``, ``single``, ``prior``, ``oom``, ``none`` (``+oom`` when raised by an OOM)."""
        return self._fit[2]

    def bytes_for(self, n: int) -> int | None:
        """Bytes a batch of ``n`` rows needs, or None when unknown."""
        fixed, per_sample, _ = self._fit
        if per_sample is None:
            return None
        return int(math.ceil(fixed + per_sample * n))

    def max_samples(self, available_bytes: float) -> int | None:
        """Largest batch that fits in ``available_bytes`` (may be 0), or None when unknown."""
        fixed, per_sample, _ = self._fit
        if per_sample is None:
            return None
        room = available_bytes - fixed
        if room < per_sample:
            return 0
        return int(min(MAX_CAP, math.floor(room / per_sample)))

    def state(self) -> dict[str, Any]:
        """JSON-able summary."""
        return {
            "fixed_bytes": self.fixed_bytes,
            "bytes_per_sample": self.bytes_per_sample,
            "basis": self.basis,
            "points": [[n, peak] for n, peak in sorted(self._peaks.items())],
            "oom_constraints": [
                [n, available] for n, (available, _d) in sorted(self._constraints.items())
            ],
            "observations": self.observations,
            "oom_count": self.oom_count,
            "warmup_remaining": self.warmup_remaining,
        }

    def __repr__(self) -> str:
        return (
            f"MemoryProfile(fixed_bytes={self.fixed_bytes}, "
            f"bytes_per_sample={self.bytes_per_sample}, basis={self.basis!r})"
        )


# -------------------------------------------------------------------- sizer
class Reservation:
    """Memory held for one batch in flight; a context manager.

    Attributes
    ----------
    model : str
    requested : int
        Rows asked for.
    n : int
        Rows granted: run at most this many under the reservation (equal to
        ``requested`` unless ``partial=True`` was passed).
    bytes : int
        Bytes counted against the device (0 when the model has no profile).
    available_bytes : int
        Memory available to the batch when it was granted (other batches'
        reservations and the safety margin already taken off).
    """

    def __init__(self, sizer: MemorySizer, model: str, requested: int, n: int, nbytes: int, available_bytes: int):
        self._sizer = sizer
        self.model = model
        self.requested = requested
        self.n = n
        self.bytes = nbytes
        self.available_bytes = available_bytes
        self.released = False

    def release(self) -> None:
        """Give the memory back (idempotent)."""
        self._sizer._release(self)

    def record(self, peak_bytes: int) -> None:
        """Record the batch's measured peak (see :meth:`MemorySizer.record`)."""
        self._sizer.record(self.model, self.n, peak_bytes, available_bytes=self.available_bytes)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def __repr__(self) -> str:
        return (
            f"Reservation(model={self.model!r}, n={self.n}, bytes={self.bytes}, "
            f"released={self.released})"
        )


class _Ticket:
    __slots__ = ("model", "n")

    def __init__(self, model: str, n: int):
        self.model = model
        self.n = n


class MemorySizer:
    """Batch-size caps for every model on one device, from its free memory now.

    Parameters
    ----------
    source : MemorySource
        Where readings come from (:mod:`dask_dynbatch.telemetry`).
    safety_margin : float, default 0.1
        Fraction of the device capacity kept free.
    safety_margin_max : int, optional
        At most this many bytes kept free (10 % of an H200 is 14 GiB: with a neighbour holding the
        rest, a pure fraction would leave a model no room at all).
    budget : float or int, optional
        Explicit per-device budget for this process: a fraction ``0 < b <= 1``
        of the capacity, or bytes (``> 1``).  Batches are admitted only while
        ``framework_used + reserved + new batch <= budget``.
    min_change : float, default 0.05
        Fraction of capacity that free memory must move by for :meth:`poll`
        to report a change.
    warmup_batches : int, default 1
        First :meth:`record` calls per model that are ignored (warm-up).
    recheck_interval : float, default 0.05
        Seconds between re-reads of the source while a reservation waits
        (other processes may free memory without telling us).

    Notes
    -----
    Thread-safe: every method takes the sizer's lock; batches run in executor
    threads.  See the module docstring for the policies.
    """

    def __init__(
        self,
        source: MemorySource,
        *,
        safety_margin: float = 0.1,
        safety_margin_max: int | None = None,
        budget: float | int | None = None,
        min_change: float = 0.05,
        warmup_batches: int = 1,
        recheck_interval: float = 0.05,
    ):
        if not 0 <= safety_margin < 1:
            raise ValueError(f"safety_margin must be in [0, 1), got {safety_margin}")
        if safety_margin_max is not None and safety_margin_max < 0:
            raise ValueError(f"safety_margin_max must be >= 0 bytes, got {safety_margin_max}")
        if budget is not None and not budget > 0:
            raise ValueError(f"budget must be a fraction in (0, 1] or bytes > 1, got {budget}")
        if min_change < 0:
            raise ValueError(f"min_change must be >= 0, got {min_change}")
        if warmup_batches < 0:
            raise ValueError("warmup_batches must be >= 0")
        self.source = source
        self.safety_margin = float(safety_margin)
        self.safety_margin_max = None if safety_margin_max is None else int(safety_margin_max)
        self.budget = budget
        self.min_change = float(min_change)
        self.warmup_batches = int(warmup_batches)
        self.recheck_interval = float(recheck_interval)
        self._lock = threading.RLock()
        self._condition = threading.Condition(self._lock)
        self._profiles: dict[str, MemoryProfile] = {}
        self._reservations: dict[int, Reservation] = {}
        self._queue: deque[_Ticket] = deque()
        self._latest: DeviceMemory | None = None
        self._reference_outside: int | None = None
        self._reference_capacity: int | None = None
        self._last_cap: dict[str, int | None] = {}
        self._last_available: dict[str, int] = {}
        self._thread_grants = threading.local()
        self._oom_counts: dict[str, int] = {}
        self._waits = 0

    # ---- profiles
    def profile(self, model: str) -> MemoryProfile:
        """The model's profile (created empty on first use)."""
        with self._lock:
            profile = self._profiles.get(model)
            if profile is None:
                profile = self._profiles[model] = MemoryProfile(warmup=self.warmup_batches)
            return profile

    def forget(self, model: str) -> None:
        """Drop a model's profile (e.g. when it is unloaded)."""
        with self._condition:
            self._profiles.pop(model, None)
            self._last_cap.pop(model, None)
            self._last_available.pop(model, None)
            self._condition.notify_all()

    # ---- readings
    def read(self) -> DeviceMemory:
        """Read the source now (the last good reading if it fails)."""
        with self._lock:
            try:
                self._latest = self.source.read()
            except Exception:
                if self._latest is None:
                    raise
            if self._reference_outside is None:  # first reading: the reference for changes
                self._reference_outside = self._outside_free(self._latest)
                self._reference_capacity = self._latest.capacity
            return self._latest

    def _budget_bytes(self, reading: DeviceMemory) -> float | None:
        if self.budget is None:
            return None
        if self.budget <= 1:
            return float(self.budget) * reading.capacity
        return float(self.budget)

    def margin_bytes(self, reading: DeviceMemory) -> float:
        """Bytes kept free on the device: ``safety_margin`` of its capacity, at most ``safety_margin_max``."""
        margin = self.safety_margin * reading.capacity
        return margin if self.safety_margin_max is None else min(margin, self.safety_margin_max)

    def reserved_bytes(self, model: str | None = None) -> int:
        """Bytes reserved by batches in flight (of one model, or of all)."""
        with self._lock:
            return sum(
                r.bytes for r in self._reservations.values() if model is None or r.model == model
            )

    def available_bytes(self, reading: DeviceMemory | None = None) -> int:
        """Memory a new batch may use now (see the module docstring)."""
        with self._lock:
            reading = self.read() if reading is None else reading
            reserved = self.reserved_bytes()
            available = reading.effective_free - self.margin_bytes(reading) - reserved
            budget = self._budget_bytes(reading)
            if budget is not None:
                available = min(available, budget - (reading.framework_used or 0) - reserved)
            return int(max(0, available))

    def _fair_share_limit(self, model: str, profile: MemoryProfile, available: int) -> int | None:
        """Rows ``model`` may take under the fair-share rule, or None when it does not apply."""
        others = {r.model for r in self._reservations.values()} | {t.model for t in self._queue}
        others.discard(model)
        if not others:
            return None
        pool = available + self.reserved_bytes()
        share = pool / (len(others) + 1) - self.reserved_bytes(model)
        return profile.max_samples(share) if share > 0 else 0

    def _limit(self, model: str, available: int) -> int | None:
        """Rows that fit now for ``model`` (may be 0), or None without a profile."""
        profile = self._profiles.get(model)
        if profile is None or not profile.known:
            return None
        fit = profile.max_samples(available)
        share = self._fair_share_limit(model, profile, available)
        if share is not None and share < fit:
            fit = max(share, 1 if fit >= 1 else 0)
        return fit

    # ---- caps
    def cap(self, model: str) -> int | None:
        """Largest batch of ``model`` that fits in the device's memory now.

        Parameters
        ----------
        model : str

        Returns
        -------
        int or None
            At least 1; None while the model has no profile (the caller then
            uses a conservative default size).
        """
        with self._lock:
            available = self.available_bytes()
            self._last_available[model] = available
            limit = self._limit(model, available)
            cap = None if limit is None else max(1, limit)
            self._last_cap[model] = cap
            return cap

    # ---- reservations
    def _try_grant(self, model: str, n: int, partial: bool) -> Reservation | None:
        available = self.available_bytes()
        self._last_available[model] = available
        profile = self._profiles.get(model)
        limit = self._limit(model, available)
        nothing_in_flight = not self._reservations
        if limit is None:  # no profile: cost unknown, counted as 0 bytes
            granted = n
        elif partial:
            if limit >= 1:
                granted = min(n, limit)
            elif nothing_in_flight:
                granted = 1
            else:
                return None
        elif n <= limit or nothing_in_flight:
            granted = n
        else:
            return None
        nbytes = 0 if profile is None or not profile.known else profile.bytes_for(granted)
        reservation = Reservation(self, model, n, granted, int(nbytes or 0), available)
        self._reservations[id(reservation)] = reservation
        grants = getattr(self._thread_grants, "available", None)
        if grants is None:
            grants = self._thread_grants.available = {}
        grants[model] = available
        if limit is not None:
            self._last_cap[model] = max(1, limit)
        return reservation

    def reserve(
        self,
        model: str,
        n: int,
        *,
        partial: bool = False,
        timeout: float | None = None,
    ) -> Reservation:
        """Reserve memory for a batch of ``n`` rows of ``model`` on this device.

        Parameters
        ----------
        model : str
        n : int
            Rows in the batch (>= 1).
        partial : bool, default False
            Grant fewer rows when not all fit (``Reservation.n`` says how
            many; at least 1).  Otherwise wait until all ``n`` fit.
        timeout : float, optional
            Seconds to wait at most.

        Returns
        -------
        Reservation
            Use as a context manager; released on exit.  Counted against every
            model on the device until released.

        Raises
        ------
        TimeoutError
            Nothing could be granted within ``timeout``.

        Notes
        -----
        Requests are served first come, first served across models.  A
        request is granted when it fits (see the module docstring), or when
        nothing else is in flight on the device.  While it waits the source
        is re-read every ``recheck_interval`` seconds, and at once when a
        reservation is released, a profile changes or :meth:`poll` sees a
        change.  Do not ask for a second full reservation from a thread that
        holds one and waits on it: the request could wait for memory that only
        the caller can release (use ``partial=True`` or ``timeout``).
        """
        n = int(n)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            if not self._queue:
                granted = self._try_grant(model, n, partial)
                if granted is not None:
                    return granted
            ticket = _Ticket(model, n)
            self._queue.append(ticket)
            self._waits += 1
            try:
                while True:
                    if self._queue[0] is ticket:
                        granted = self._try_grant(model, n, partial)
                        if granted is not None:
                            self._queue.popleft()
                            self._condition.notify_all()
                            return granted
                    wait = self.recheck_interval
                    if deadline is not None:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise TimeoutError(
                                f"no memory for {n} rows of {model!r} within {timeout} s"
                            )
                        wait = min(wait, remaining)
                    self._condition.wait(wait)
            except BaseException:
                try:
                    self._queue.remove(ticket)
                except ValueError:
                    pass
                self._condition.notify_all()
                raise

    def try_reserve(self, model: str, n: int, *, partial: bool = False) -> Reservation | None:
        """Like :meth:`reserve` but never waits: None when it cannot be granted now."""
        n = int(n)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        with self._lock:
            if self._queue:
                return None
            return self._try_grant(model, n, partial)

    def _release(self, reservation: Reservation) -> None:
        with self._condition:
            if reservation.released:
                return
            reservation.released = True
            self._reservations.pop(id(reservation), None)
            self._condition.notify_all()

    # ---- learning
    def _grant_available(self, model: str) -> int | None:
        grants = getattr(self._thread_grants, "available", None) or {}
        if model in grants:
            return grants[model]
        return self._last_available.get(model)

    def record(
        self,
        model: str,
        n: int,
        peak_bytes: int,
        *,
        available_bytes: int | None = None,
    ) -> None:
        """Record a successful batch's peak memory.

        Parameters
        ----------
        model : str
        n : int
            Rows in the batch.
        peak_bytes : int
            Peak memory the batch added (see :class:`MemoryProfile`).
        available_bytes : int, optional
            Memory available when it started (``Reservation.available_bytes``).
        """
        with self._condition:
            if available_bytes is None:
                available_bytes = self._grant_available(model)
            profile = self.profile(model)
            profile.update(n, peak_bytes, available_bytes)
            self._condition.notify_all()

    def on_oom(self, model: str, n: int, *, available_bytes: int | None = None) -> None:
        """A batch of ``n`` rows of ``model`` ran out of memory: lower its cap below ``n``.

        Parameters
        ----------
        model : str
        n : int
        available_bytes : int, optional
            Memory available when that batch was granted; defaults to what
            this thread's last reservation for the model was granted with,
            else the last value computed for the model, else now.
        """
        with self._condition:
            available_now = self.available_bytes()
            available = available_bytes if available_bytes is not None else self._grant_available(model)
            if available is None:
                available = available_now
            profile = self.profile(model)
            needed = profile.bytes_for(n)
            explained = needed is not None and needed > available_now
            profile.on_oom(n, available, explained=explained)
            self._oom_counts[model] = self._oom_counts.get(model, 0) + 1
            self._condition.notify_all()

    # ---- change detection
    @staticmethod
    def _outside_free(reading: DeviceMemory) -> int:
        return reading.effective_free + (reading.framework_used or 0)

    def changed_since_last(self, threshold: float | None = None) -> bool:
        """Whether the latest reading moved by more than ``threshold`` of capacity.

        Compares memory not held by this process (``effective_free +
        framework_used``) with the value at the last reported change; the
        reference moves only when a change is reported, so slow drifts add up.

        Parameters
        ----------
        threshold : float, optional
            Fraction of capacity; defaults to ``min_change``.

        Returns
        -------
        bool
            False when nothing was read before (the first reading is the
            reference).
        """
        threshold = self.min_change if threshold is None else threshold
        with self._lock:
            reading = self._latest
            if reading is None:
                return False
            outside = self._outside_free(reading)
            capacity = reading.capacity
            if self._reference_outside is None:
                self._reference_outside, self._reference_capacity = outside, capacity
                return False
            moved = abs(outside - self._reference_outside) > threshold * max(capacity, 1)
            if moved or capacity != self._reference_capacity:
                self._reference_outside, self._reference_capacity = outside, capacity
                return True
            return False

    def poll(self) -> bool:
        """Read the source; True when free memory moved by more than ``min_change`` (a re-plan event)."""
        with self._condition:
            self.read()
            changed = self.changed_since_last()
            if changed:
                self._condition.notify_all()
            return changed

    # ---- reporting
    def used_fraction(self) -> float | None:
        """Fraction of the device's capacity not free to a new batch, from the latest reading (our
        own allocator's unused cache counts as free); None before any reading."""
        with self._lock:
            reading = self._latest
        if reading is None or reading.capacity <= 0:
            return None
        return min(1.0, max(0.0, 1.0 - reading.effective_free / reading.capacity))

    # ---- reporting
    def state(self) -> dict[str, Any]:
        """JSON-able summary: latest reading, reservations, per-model caps and profiles."""
        with self._lock:
            reading = self._latest
            models = {}
            for model, profile in self._profiles.items():
                models[model] = {
                    "cap": self._last_cap.get(model),
                    "reserved_bytes": self.reserved_bytes(model),
                    "ooms": self._oom_counts.get(model, 0),
                    "profile": profile.state(),
                }
            return {
                "memory": None if reading is None else reading.to_dict(),
                "safety_margin": self.safety_margin,
                "safety_margin_max": self.safety_margin_max,
                "budget": self.budget,
                "reserved_bytes": self.reserved_bytes(),
                "in_flight": len(self._reservations),
                "waiting": len(self._queue),
                "waits": self._waits,
                "models": models,
            }

    def __repr__(self) -> str:
        return (f"MemorySizer(source={self.source!r}, safety_margin={self.safety_margin}, "
                f"safety_margin_max={self.safety_margin_max}, budget={self.budget})")
