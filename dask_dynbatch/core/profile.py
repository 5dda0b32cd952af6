"""How much memory a model's batch needs: ``fixed_bytes + bytes_per_sample * n``.

Policies
--------
Fit
    ``peak_bytes`` is the peak a batch adds over the memory held before it (torch:
    ``max_memory_allocated`` after ``reset_peak_memory_stats``, minus ``memory_allocated`` at the
    start); a peak that includes resident weights only makes the profile conservative. For each
    batch size the largest peak seen is kept. With two or more sizes, least squares gives the
    slope (bytes per sample) and the intercept is raised until the line lies on or above every
    observation (a cap must not admit a batch bigger than one seen to need more). A non-positive
    slope or negative intercept falls back to the line through the origin above every point,
    ``max(peak / n)``. With one size the estimate is ``peak / n`` per sample and no fixed part (an
    upper bound on the per-sample cost).
Out of memory
    An OOM at batch size ``n`` with ``available`` bytes says ``bytes_for(n) > available``: the
    per-sample cost is raised so that the cap at that availability drops below ``n``. If the
    memory available right after the failure explains it (the profile says ``n`` no longer fits:
    another process took memory), the cap there becomes ``n - 1`` and the fit is otherwise
    trusted. If not (the profile underestimates), it becomes halfway between the largest size that
    succeeded and ``n``, so repeated OOMs bisect to the real limit in a few failures instead of
    one per row. A constraint is dropped when a batch of ``n`` or more later succeeds with no more
    memory available. A batch of one that runs out of memory adds no constraint (it cannot lower
    the cap further and would punish ordinary samples for one outsized input).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["MAX_CAP", "MemoryProfile", "estimate_bytes_per_sample"]

#: Largest cap ever reported (keeps arithmetic on absurd profiles finite).
MAX_CAP = 1 << 31


def estimate_bytes_per_sample(
    sample_nbytes: int,
    output_nbytes: int = 0,
    activation_factor: float = 4.0,
    *,
    compute_itemsize_ratio: float = 1.0,
) -> int:
    """Rough memory cost of one sample, used until a measurement replaces it:
    ``input + converted input * (1 + activation_factor) + output`` bytes.

    ``activation_factor`` is a guess of the activations kept alive during the forward pass, as a
    multiple of the converted input (deep or wide models need more); ``compute_itemsize_ratio``
    is the compute dtype's item size over the input's (4.0 for ``uint8`` images run in ``float32``).
    """
    if sample_nbytes < 0 or output_nbytes < 0 or activation_factor < 0:
        raise ValueError("sizes and activation_factor must be >= 0")
    converted = sample_nbytes * compute_itemsize_ratio
    return int(math.ceil(sample_nbytes + converted * (1.0 + activation_factor) + output_nbytes))


class MemoryProfile:
    """Memory a model's batch needs, fitted from measured peaks and OOMs (see the module docstring).

    ``warmup``: first :meth:`update` observations ignored (the first batches allocate one-time
    workspaces and autotuning buffers). ``max_sizes``: distinct batch sizes remembered, oldest
    forgotten first. ``bytes_per_sample``/``fixed_bytes``: a prior (e.g. from
    :func:`estimate_bytes_per_sample`) used until a measurement exists.

    Not thread-safe on its own; :class:`~dask_dynbatch.core.memory.MemorySizer` guards it.
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
        """Record that a batch of ``n`` rows peaked at ``peak_bytes``; ``available_bytes`` (memory
        available when it started) drops the OOM constraints this success contradicts.
        False when the observation was a warm-up and was ignored."""
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
        """Record that a batch of ``n`` rows ran out of memory with ``available_bytes`` available
        when it started. ``explained``: the profile already says ``n`` rows do not fit in the
        memory available *now*, so only ``n`` is ruled out (see "Out of memory" above)."""
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
        fixed, per_sample, how = self._fit_peaks()
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

    def _fit_peaks(self) -> tuple[float, float | None, str]:
        """``(fixed, per_sample, basis)`` from the peaks alone (else the prior)."""
        sizes = list(self._peaks)
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
                return fixed, slope, "fit"
            return 0.0, max(y / x for x, y in zip(xs, ys)), "envelope"
        if len(sizes) == 1:
            size = sizes[0]
            return 0.0, self._peaks[size] / size, "single"
        if self._prior is not None:
            fixed, per_sample = self._prior
            return fixed, per_sample, "prior"
        return 0.0, None, "none"

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
