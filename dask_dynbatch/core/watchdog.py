"""When a running device batch counts as stuck (pure: no dask).

A Python thread cannot be stopped, so a model call that hangs (a deadlocked collective, a
data-dependent endless loop) holds its device for good. The model server therefore knows how long
its batches take, per size, and declares a batch stuck once it runs far past that: ``factor``
times the expected time, never less than ``floor`` seconds. Before any batch finished (a first
batch warms shapes and caches) the limit is ``first``. An explicit ``timeout``
(``ModelSpec.execution_timeout``) replaces all of this.
"""

from __future__ import annotations

from .estimate import SizeBins, power_of_two_bin


class ExecutionClock:
    """Device time per batch size, and the execution limit it implies.

    Parameters
    ----------
    timeout
        A fixed limit in seconds for every batch (None: derived from measured times).
    factor
        The limit is this many times the expected time of a batch of its size ...
    floor
        ... and at least this many seconds.
    first
        The limit before any batch finished.
    """

    def __init__(self, timeout: float | str | None = None, *, factor: float = 10.0, floor: float = 5.0,
                 first: float = 60.0):
        self.timeout = None if timeout is None else float(timeout)  # ModelSpec parsed it to seconds
        self.factor = float(factor)
        self.floor = float(floor)
        self.first = max(float(first), self.floor)
        self._times = SizeBins(power_of_two_bin)

    def observe(self, rows: int, seconds: float) -> None:
        """A device batch of ``rows`` finished after ``seconds`` on the device."""
        self._times.observe(rows, compute_s=seconds)

    def expected(self, rows: int) -> float | None:
        """Seconds a batch of ``rows`` takes (None: no batch finished yet)."""
        return self._times.at("compute_s", rows)

    def limit(self, rows: int) -> float:
        """Seconds after which a running batch of ``rows`` counts as stuck."""
        if self.timeout is not None:
            return self.timeout
        expected = self.expected(rows)
        if expected is None:
            return self.first
        return max(self.floor, self.factor * expected)
