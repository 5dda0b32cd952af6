"""Running averages per batch size: what batches of about this many rows cost (pure).

One estimator serves every part that learns from batches: the batch-size controller keeps
throughput and latency per size, the pacing forecasts keep device time and lead per size, and the
model server's advice to clients (throughput at its size, for placement) is read off the same.
Batches fall into *bins* by rows; a bin keeps the plain average of its first ``warm_up``
observations, then an exponentially weighted one (weight ``weight``): a plain start, so that a
bin's first batch does not carry its luck for long, and an EWMA after, so that the bin follows a
model or load that changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any


def power_of_two_bin(rows: int) -> int:
    """Bins 1, 2-3, 4-7, 8-15, ... (keyed by the bit length of ``rows``)."""
    return int(rows).bit_length()


def fine_bin(rows: int) -> int:
    """Exact sizes up to 16; above, the nearest of 8 geometric steps per doubling (16, 17, 19, 21,
    23, 25, 27, 29, 32, 35, ...), so that powers of two are bin centres and neighbours differ by ~9 %."""
    if rows <= 16:
        return int(rows)
    step = round(8 * math.log2(rows / 16))
    return int(round(16 * 2 ** (step / 8)))


class Bin:
    """What the batches of one bin averaged: ``rows`` and each named value, ``count`` observations,
    ``last_seen`` (the estimator's observation index at the last one)."""

    __slots__ = ("count", "last_seen", "rows", "values")

    def __init__(self, last_seen: int):
        self.count = 0
        self.last_seen = last_seen
        self.rows = 0.0
        self.values: dict[str, float | None] = {}

    def get(self, name: str) -> float | None:
        return self.values.get(name)

    def __repr__(self) -> str:
        return f"Bin(count={self.count}, rows={self.rows:.1f}, values={self.values})"


class SizeBins:
    """Averages per bin of batch sizes.

    Parameters
    ----------
    bin_of
        Rows -> bin key (:func:`power_of_two_bin`, :func:`fine_bin`).
    weight
        Weight of a new observation once a bin has seen ``warm_up`` of them.
    warm_up
        Observations a bin averages plainly first.
    forget_after
        A bin not observed for more than this many observations (of any bin) starts afresh and
        is left out of :meth:`bins` meanwhile (the model or the load may have changed); None: kept
        for good.
    """

    def __init__(self, bin_of: Callable[[int], int] = power_of_two_bin, *, weight: float = 0.2,
                 warm_up: int = 4, forget_after: int | None = None):
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"weight must be in (0, 1], not {weight!r}")
        self.bin_of = bin_of
        self.weight = float(weight)
        self.warm_up = max(1, int(warm_up))
        self.forget_after = forget_after
        self.observations = 0
        self._bins: dict[int, Bin] = {}

    def observe(self, rows: int, **values: float | None) -> Bin | None:
        """Add one batch of ``rows``. A value given as None (not measured), negative or not finite
        leaves its average as it is; a batch of no rows is not counted."""
        if rows <= 0:
            return None
        self.observations += 1
        key = self.bin_of(rows)
        b = self._bins.get(key)
        if b is None or not self._fresh(b):
            b = self._bins[key] = Bin(self.observations)
        b.count += 1
        w = 1.0 / b.count if b.count <= self.warm_up else self.weight
        b.rows += w * (rows - b.rows)
        for name, value in values.items():
            if value is None or not 0 <= value < math.inf:  # (not <= also drops NaN)
                continue
            old = b.values.get(name)
            b.values[name] = float(value) if old is None else old + w * (value - old)
        b.last_seen = self.observations
        return b

    def _fresh(self, b: Bin) -> bool:
        return self.forget_after is None or self.observations - b.last_seen <= self.forget_after

    def get(self, rows: int) -> Bin | None:
        """The bin of ``rows``, if it has fresh observations."""
        b = self._bins.get(self.bin_of(rows))
        return b if b is not None and self._fresh(b) else None

    def bins(self) -> Iterator[tuple[int, Bin]]:
        """(key, bin) of every fresh bin, by key."""
        for key in sorted(self._bins):
            b = self._bins[key]
            if self._fresh(b):
                yield key, b

    def __len__(self) -> int:
        return sum(1 for _ in self.bins())

    def points(self, name: str) -> list[tuple[float, float]]:
        """(mean rows, mean value) of each bin with that value, by rows, the value made non-decreasing."""
        out: list[tuple[float, float]] = []
        for _, b in self.bins():
            value = b.values.get(name)
            if value is None or not 0 <= value < math.inf:  # (not <= also drops NaN)
                continue
            out.append((b.rows, max(value, out[-1][1]) if out else value))
        return out

    def at(self, name: str, rows: float) -> float | None:
        """A value that grows with rows (device time, lead) for a batch of ``rows``; None before any
        observation.

        Read off the line between the neighbouring bins' averages; past the largest bin along the
        slope of the last two (clamped between flat and proportional: never more than the largest
        bin's value per row); below the smallest as the smallest's value (with one bin only: in
        proportion to rows above it). What a batch of 1,000 rows costs is not forgotten while the
        load keeps batches small, and a size between bins is not read off one average per row.
        """
        pts = self.points(name)
        if not pts:
            return None
        r_last, v_last = pts[-1]
        if rows >= r_last:
            if len(pts) == 1:
                return v_last * rows / r_last
            r_prev, v_prev = pts[-2]
            slope = min(v_last / r_last, max(0.0, (v_last - v_prev) / (r_last - r_prev)))
            return v_last + slope * (rows - r_last)
        if rows <= pts[0][0]:
            return pts[0][1]
        i = next(i for i, (r, _) in enumerate(pts) if rows <= r)  # 0 < i < len(pts)
        (r0, v0), (r1, v1) = pts[i - 1], pts[i]
        return v0 + (v1 - v0) * (rows - r0) / (r1 - r0)

    def state(self, name: str) -> dict[int, float]:
        """Rows (rounded) -> value, one entry per bin that has it (JSON-able)."""
        return {round(r): v for r, v in self.points(name)}

    def summary(self) -> dict[str, Any]:
        return {str(key): {"count": b.count, "rows": b.rows, **b.values} for key, b in self.bins()}
