"""Throughput and latency per batch size, and what the controller's throughput rule reads off
them: the best size under noise, and a remembered fall of throughput above it (pure)."""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any, NamedTuple

from .estimate import Bin, SizeBins, fine_bin

_EWMA_WEIGHT = 0.25  # weight of a new batch in a size's averages, once past its plain start
_WARM_UP = 4  # a size's first batches are averaged plainly, so its first batch's luck fades fast
_EWMA_SAMPLES = 7  # an EWMA of weight 1/4 averages about (2 - 1/4) / (1/4) = 7 batches
_BEST_BOUND_Z = 2.0  # standard errors taken off a thin average before it may count as the best
# the per-batch noise is taken as at most this: a size seen once keeps at least
# 1 - 2 * 0.25 * sqrt(1 - 1/7) = 0.54 of its average as its bound
_MAX_NOISE = 0.25
_NOISE_BATCHES = 64  # the noise is estimated from the deviations of this many recent batches ...
_NOISE_MIN_BATCHES = 8  # ... and not before this many
_MAD_TO_SD = 1.4826  # median absolute deviation -> standard deviation, for normal noise


class BestSize(NamedTuple):
    """The size bin with the highest throughput lower bound among those meeting the latency target
    (all None while there is none)."""

    size: int | None  # the bin's key, a batch size
    throughput: float | None  # the bin's average throughput, samples/s
    bound: float | None  # its lower bound (:meth:`ThroughputTable.bound`): what the rules compare


class ThroughputTable:
    """Throughput and latency per batch size, and what the throughput rule reads off them.

    Per size bin (:func:`~dask_dynbatch.core.estimate.fine_bin`: exact up to 16, then 8 bins per
    doubling) the table averages throughput and latency with
    :class:`~dask_dynbatch.core.estimate.SizeBins` (a plain mean of the first 4 batches, then an
    EWMA of weight 1/4; a bin unseen for ``forget_after`` batches starts afresh).  It also keeps one
    batch's relative noise, finds the best size by a lower bound on its throughput, and remembers the
    last confirmed fall of throughput above the best size.

    Parameters
    ----------
    latency_target : float
        Seconds; only a size whose average latency meets it can be the best.
    tolerance : float
        A size has fallen when its throughput is more than this fraction below the best's bound.
    forget_after : int
        Batches after which an unvisited bin, and a fall, are forgotten.
    """

    def __init__(self, latency_target: float, tolerance: float, forget_after: int) -> None:
        self.latency_target = float(latency_target)
        self.tolerance = float(tolerance)
        self.forget_after = int(forget_after)
        self._bins = SizeBins(fine_bin, weight=_EWMA_WEIGHT, warm_up=_WARM_UP, forget_after=self.forget_after)
        # Each key's current Bin in the order first seen, forgotten ones too: a fall is judged on the
        # fallen bin's last average, state() lists every bin, and of equal bounds the first seen is best.
        self._seen: dict[int, Bin] = {}
        self._deviations: deque[float] = deque(maxlen=_NOISE_BATCHES)
        self.noise: float | None = None  # one batch's relative standard deviation; None until measured
        self._below_best: int | None = None  # the last full batch under target, if it ran below the best
        self._fall: tuple[int, int] | None = None  # (size, batch count) of the last confirmed fall

    def record(self, size: int, latency: float, service_time: float, work: float | None = None) -> None:
        """Add one batch that did ``work`` (default: ``size``) in ``service_time``; a
        ``service_time`` <= 0 or not finite leaves throughput out."""
        done = size if work is None else work
        throughput = done / service_time if service_time > 0 and math.isfinite(service_time) else None
        previous = self.throughput_at(size)
        added_to = self._bins.observe(size, throughput=throughput, latency=latency)
        if added_to is None:
            return
        self._seen[fine_bin(size)] = added_to
        if throughput is not None and previous and added_to.count > 1:  # (count 1: the bin started afresh)
            self._add_deviation(abs(throughput - previous) / previous)

    def _add_deviation(self, deviation: float) -> None:
        self._deviations.append(deviation)
        if len(self._deviations) >= _NOISE_MIN_BATCHES:
            # the median, not a mean of squares, so that a late batch or a stall does not dominate it
            self.noise = min(_MAX_NOISE, _MAD_TO_SD * statistics.median(self._deviations))

    def throughput_at(self, size: int) -> float | None:
        """Average throughput of the bin of ``size`` (samples/s, or work/s), None if unknown."""
        found = self._bins.get(size)
        return None if found is None else found.get("throughput")

    def bound(self, bin_: Bin) -> float:
        """A bin's average throughput less ``_BEST_BOUND_Z`` times the standard error it has beyond a
        well-measured bin's (``noise * sqrt(1/k - 1/7)`` for k batches); the average itself until the
        noise is known."""
        throughput = float(bin_.get("throughput"))
        if self.noise is None:
            return throughput
        excess = math.sqrt(max(0.0, 1.0 / bin_.count - 1.0 / _EWMA_SAMPLES))
        return throughput * (1.0 - _BEST_BOUND_Z * self.noise * excess)

    def best(self) -> BestSize:
        """The bin with the highest lower bound among those whose average latency meets the target."""
        best, best_bound = BestSize(None, None, None), None
        for key, bin_ in self._seen.items():
            throughput = bin_.get("throughput")
            if throughput is None or bin_.get("latency") > self.latency_target or self._bins.get(key) is None:
                continue
            bound = self.bound(bin_)
            if best_bound is None or bound > best_bound:
                best, best_bound = BestSize(key, float(throughput), bound), bound
        return best

    def below_best(self, size: int, best: BestSize) -> bool:
        """Whether the bin of ``size`` lies above the best and its throughput is more than the
        tolerance below the best's bound."""
        current = self.throughput_at(size)
        return (best.size is not None and best.bound is not None and current is not None
                and fine_bin(best.size) < fine_bin(size)
                and current < (1.0 - self.tolerance) * best.bound)

    def confirm_fall(self, size: int, below: bool) -> int | None:
        """Note a full batch under target and whether it ran below the best; return where throughput
        fell (the smaller size) when it and the previous such batch both did, else None."""
        previous, self._below_best = self._below_best, (size if below else None)
        return min(size, previous) if below and previous is not None else None

    def remember_fall(self, size: int, best_size: int | None) -> None:
        """Remember a confirmed fall at ``size`` (or at the one in force, if lower) from now on."""
        known = self.fall_in_force(best_size)
        self._fall = (size if known is None else min(size, known), self._bins.observations)

    def fall_in_force(self, best_size: int | None) -> int | None:
        """The remembered fall's size while it still holds: confirmed less than ``forget_after``
        batches ago, above ``best_size``, and its throughput still more than the tolerance below the
        best's bound.  A fall that no longer holds is forgotten."""
        if self._fall is None:
            return None
        fall, when = self._fall
        if self._bins.observations - when > self.forget_after:
            self._fall = None
            return None
        if best_size is None or fine_bin(fall) <= fine_bin(best_size):
            return None
        if not self._still_below(fall, best_size):
            self._fall = None  # the best, measured again, no longer beats it: the fall was its luck
            return None
        return fall

    def _still_below(self, fall: int, best_size: int) -> bool:
        """The fallen bin's last average (even if forgotten since) still below the best's bound."""
        fallen, best = self._seen.get(fine_bin(fall)), self._seen.get(fine_bin(best_size))
        if fallen is None or best is None or fallen.get("throughput") is None or best.get("throughput") is None:
            return False
        return fallen.get("throughput") < (1.0 - self.tolerance) * self.bound(best)

    def state(self) -> dict[str, Any]:
        """``best_size``, ``best_throughput``, ``best_throughput_bound``, ``throughput_noise`` and
        ``throughput`` (``{bin: samples/s}``, forgotten bins included) for
        :meth:`BatchSizeController.state`."""
        best = self.best()
        throughput = {key: float(bin_.get("throughput")) for key, bin_ in sorted(self._seen.items())
                      if bin_.get("throughput") is not None}
        return {"best_size": best.size, "best_throughput": best.throughput, "best_throughput_bound": best.bound,
                "throughput_noise": self.noise, "throughput": throughput}
