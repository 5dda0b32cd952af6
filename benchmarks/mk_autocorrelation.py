"""The rejected alternative: Mann-Kendall with the Hamed-Rao (1998) correction for autocorrelation.

    python benchmarks/mk_autocorrelation.py

Mann-Kendall assumes independent observations, and the batch-size controller's own sizes are not:
each is the previous one plus or minus a step. The Hamed-Rao correction scales the variance of S by
``n / n*`` from the significant autocorrelations of the ranks of the detrended series. This script
keeps that implementation (it used to be ``mann_kendall(hamed_rao=True, lag=...)`` in the
controller module), re-checks it against ``pymannkendall.hamed_rao_modification_test`` and shows
what it does on the windows the controller sees (``docs/controller.md``, "Why latency residuals"):
on a monotone run, a run after a hold, or a shrink followed by holds the factor is exactly 1, and on
a size alternating up and down it *divides* the variance by about 2.3, so that thrashing looks more
like a trend. The controller tests latency residuals instead.

Exits with status 1 if any check fails.
"""

from __future__ import annotations

import math
import sys
from statistics import NormalDist

import numpy as np

from dask_dynbatch.core.trend import MKResult, mann_kendall


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values``, ties getting the mean of the ranks they span (like ``rankdata``)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=float)
    start = 0
    while start < len(values):
        stop = start + 1
        while stop < len(values) and sorted_values[stop] == sorted_values[start]:
            stop += 1
        ranks[order[start:stop]] = (start + 1 + stop) / 2.0  # mean of ranks start+1 .. stop
        start = stop
    return ranks


def theil_sen_slope_over_time(values: np.ndarray) -> float:
    """Median of ``(x[j] - x[i]) / (j - i)`` over all ``i < j`` (Sen's slope)."""
    i, j = np.triu_indices(len(values), 1)
    return float(np.median((values[j] - values[i]) / (j - i)))


def hamed_rao_factor(values: np.ndarray, alpha: float, lag: int | None) -> float:
    """Hamed and Rao (1998) variance inflation factor ``n / n*`` for an autocorrelated series.

    The series is detrended with Sen's slope, ranked, and the autocorrelations of the ranks that are
    significant at ``alpha`` (``|r_k| > z_{1-alpha/2} / sqrt(n)``) for lags ``1..lag`` (all lags when
    ``lag`` is None) enter ``1 + 2 / (n (n-1) (n-2)) * sum (n-k)(n-k-1)(n-k-2) r_k``.
    """
    n = len(values)
    detrended = values - theil_sen_slope_over_time(values) * np.arange(1, n + 1)
    ranks = average_ranks(detrended)
    centred = ranks - ranks.mean()
    autocovariance_0 = float(np.dot(centred, centred)) / n
    if autocovariance_0 == 0.0:  # detrended series constant: nothing to correct
        return 1.0
    max_lag = n - 1 if lag is None else min(int(lag), n - 1)
    bound = NormalDist().inv_cdf(1.0 - alpha / 2.0) / math.sqrt(n)
    weighted_sum = 0.0
    for k in range(1, max_lag + 1):
        r_k = float(np.dot(centred[:-k], centred[k:])) / n / autocovariance_0
        if abs(r_k) > bound:
            weighted_sum += (n - k) * (n - k - 1) * (n - k - 2) * r_k
    return 1.0 + 2.0 / (n * (n - 1) * (n - 2)) * weighted_sum


def mann_kendall_hamed_rao(x, *, alpha: float = 0.05, lag: int | None = None) -> MKResult:
    """:func:`~dask_dynbatch.core.controller.mann_kendall` with its variance multiplied by the
    Hamed-Rao factor (kept uncorrected should the factor come out <= 0, which short series with
    strong negative autocorrelation can give; ``pymannkendall`` then yields NaN)."""
    values = np.asarray(x, dtype=float).ravel()
    values = values[~np.isnan(values)]
    plain = mann_kendall(values, alpha=alpha)
    if plain.n < 3:
        return plain
    factor = hamed_rao_factor(values, alpha, lag)
    var_s = plain.var_s * factor if factor > 0.0 else plain.var_s
    s = plain.s
    z = 0.0 if s == 0.0 or var_s <= 0.0 else (s - math.copysign(1.0, s)) / math.sqrt(var_s)
    p = math.erfc(abs(z) / math.sqrt(2.0))
    trend = "increasing" if p < alpha and z > 0 else "decreasing" if p < alpha and z < 0 else "no trend"
    return MKResult(s, var_s, z, p, plain.n, trend)


def ar1_series(seed: int, n: int) -> np.ndarray:
    """AR(1) with coefficient 0.8 and a weak trend: the case Hamed-Rao is for."""
    rng = np.random.default_rng(seed)
    x = np.zeros(n)
    noise = rng.normal(size=n)
    for t in range(1, n):
        x[t] = 0.8 * x[t - 1] + noise[t]
    return x + 0.03 * np.arange(n)


def check_against_pymannkendall() -> list[str]:
    """Our Hamed-Rao against ``pymannkendall`` on AR(1) series; the failures, as text."""
    import pymannkendall

    failures = []
    for lag in (None, 3):
        compared = corrected = 0
        for n in (10, 20, 40, 100):
            for seed in range(8):
                x = ar1_series(seed, n)
                ref = pymannkendall.hamed_rao_modification_test(x, alpha=0.05, lag=lag)
                if not (np.isfinite(ref.var_s) and ref.var_s > 0):
                    continue  # pymannkendall's NaN where the factor is <= 0; we keep the plain variance
                ours = mann_kendall_hamed_rao(x, alpha=0.05, lag=lag)
                compared += 1
                corrected += not math.isclose(ours.var_s, mann_kendall(x).var_s)
                if not (math.isclose(ours.var_s, ref.var_s, rel_tol=1e-6) and abs(ours.z - ref.z) <= 1e-9
                        and abs(ours.p - ref.p) <= 1e-9 and ours.trend == ref.trend):
                    failures.append(f"lag={lag} n={n} seed={seed}: ours {ours} vs pymannkendall {ref}")
        print(f"lag={lag}: {compared} series compared with pymannkendall, {corrected} of them corrected")
        if compared < 25 or corrected < 10:
            failures.append(f"lag={lag}: too few comparisons ({compared}) or corrections ({corrected})")
    return failures


def check_controller_windows() -> list[str]:
    """What the correction does on windows of 8 proposals like the controller's."""
    failures = []
    inert = {
        "a growth run": [1, 2, 3, 4, 5, 6, 7, 8],
        "a growth run of larger steps": [8, 9, 10, 11, 12, 13, 14, 16],
        "a run after a hold": [90, 90, 90, 90, 90, 101, 113, 127],
        "a shrink run, then holds": [118, 132, 116, 102, 90, 90, 90, 90],
    }
    for name, window in inert.items():
        same = mann_kendall_hamed_rao(window) == mann_kendall(window)
        print(f"{name} {window}: {'unchanged' if same else 'CHANGED'}")
        if not same:
            failures.append(f"{name}: the correction changed the result")
    thrash = [100, 112] * 4
    plain, corrected = mann_kendall(thrash), mann_kendall_hamed_rao(thrash)
    ratio = plain.var_s / corrected.var_s
    print(f"alternating {thrash}: variance divided by {ratio:.2f}, |z| {abs(plain.z):.3f} -> {abs(corrected.z):.3f}")
    if not (abs(ratio - 2.26) <= 0.01 and abs(corrected.z) > abs(plain.z)):
        failures.append("alternating window: expected the variance divided by ~2.26 and a larger |z|")
    print(f"significance bound on one autocorrelation at n = 8: 1.96 / sqrt(8) = {1.96 / math.sqrt(8):.2f}")
    return failures


def main() -> int:
    failures = check_against_pymannkendall() + check_controller_windows()
    for failure in failures:
        print("FAILED:", failure)
    print("all checks passed" if not failures else f"{len(failures)} checks failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
