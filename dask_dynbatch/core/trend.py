"""The Mann-Kendall trend test, and the Theil-Sen slope the controller corrects latency with (pure).

The batch-size controller asks two questions of short series: are its recent sizes still going the
way it moves them, and does latency, corrected for the sizes that ran, creep up. ``docs/controller.md``
says why these tests and not others.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np


class MKResult(NamedTuple):
    """Result of :func:`mann_kendall`.

    Attributes
    ----------
    s : float
        Mann-Kendall statistic, ``sum(sign(x[j] - x[i]) for i < j)``.
    var_s : float
        Variance of ``s`` under no trend, tie-corrected.
    z : float
        Standardised statistic with the continuity correction: ``(s - sign(s)) / sqrt(var_s)``.
    p : float
        Two-sided p-value of ``z`` under the standard normal.
    n : int
        Number of observations used (NaNs are dropped).
    trend : str
        ``"increasing"``, ``"decreasing"`` or ``"no trend"`` at the ``alpha`` passed.
    """

    s: float
    var_s: float
    z: float
    p: float
    n: int
    trend: str


@functools.lru_cache(maxsize=64)
def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``i < j`` of ``n`` points (cached: the controller asks for the same few ``n``
    after every batch)."""
    return np.triu_indices(n, 1)


def mann_kendall(x: Iterable[float], *, alpha: float = 0.05) -> MKResult:
    """Two-sided Mann-Kendall trend test.

    Parameters
    ----------
    x : iterable of float
        The series, in time order.  NaNs are dropped.
    alpha : float, default 0.05
        Significance level used for ``trend``.

    Returns
    -------
    MKResult
        ``s``, ``var_s``, ``z``, ``p``, ``n`` and ``trend``.  With fewer than 2 points, or all points
        equal, ``s = z = 0``, ``p = 1`` and ``trend = "no trend"``.

    Notes
    -----
    ``S = sum_{i<j} sign(x_j - x_i)``;
    ``Var(S) = [n(n-1)(2n+5) - sum_t t(t-1)(2t+5)] / 18`` over groups of ``t`` tied values;
    ``Z = (S - 1)/sqrt(Var S)`` if ``S > 0``, ``(S + 1)/sqrt(Var S)`` if ``S < 0``, else 0;
    ``p = 2 (1 - Phi(|Z|))``.  This matches ``pymannkendall.original_test``.  With no ties,
    ``p < 0.05`` is out of reach below ``n = 5``.  The Hamed-Rao correction for autocorrelation was
    considered and rejected (``docs/controller.md``, ``benchmarks/mk_autocorrelation.py``).

    Examples
    --------
    >>> r = mann_kendall([1, 2, 3, 4, 5])
    >>> r.s, round(r.var_s, 3), round(r.z, 4), r.trend
    (10.0, 16.667, 2.2045, 'increasing')
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    # plain Python: the controller's series are a few dozen points, where NumPy's per-call costs
    # would be most of the time of every batch
    values = [v for v in map(float, x) if v == v]  # (v == v drops NaN)
    n = len(values)
    if n < 2 or min(values) == max(values):  # (all equal: S = Var S = 0, the usual series at a held size)
        return MKResult(0.0, 0.0, 0.0, 1.0, n, "no trend")

    s = 0
    for i, earlier in enumerate(values):
        for later in values[i + 1 :]:
            s += (later > earlier) - (later < earlier)
    s = float(s)
    ties = sum(t * (t - 1) * (2 * t + 5) for t in Counter(values).values())
    var_s = float(n * (n - 1) * (2 * n + 5) - ties) / 18.0

    z = 0.0 if s == 0.0 or var_s <= 0.0 else (s - math.copysign(1.0, s)) / math.sqrt(var_s)
    p = math.erfc(abs(z) / math.sqrt(2.0))
    if p < alpha and z > 0:
        trend = "increasing"
    elif p < alpha and z < 0:
        trend = "decreasing"
    else:
        trend = "no trend"
    return MKResult(s, var_s, z, p, n, trend)


def theil_sen_slope(x: np.ndarray, y: np.ndarray) -> float:
    """Median slope ``(y[j] - y[i]) / (x[j] - x[i])`` over the pairs with distinct ``x`` (0 if none)."""
    if len(x) < 2:
        return 0.0
    i, j = _pairs(len(x))
    distinct = x[j] != x[i]
    if not distinct.any():
        return 0.0
    return float(np.median((y[j] - y[i])[distinct] / (x[j] - x[i])[distinct]))
