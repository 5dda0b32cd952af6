"""Batch-size control: a Mann-Kendall trend test and the latency/throughput controller.

One :class:`BatchSizeController` runs in the client per (worker, model).  After every batch the
client calls :meth:`BatchSizeController.observe` with the size that ran, the latency its requests
experienced and the time the worker was busy; the controller answers with the next batch size to
propose.  This module is pure Python + NumPy (no Dask, no GPU libraries) so that it can be tested
with a deterministic fake.

Algorithm (source method S401-S406)
-----------------------------------
*Additive steps (S401).*  Below the latency target the proposal grows by ``b_delta``, above it it
shrinks by ``b_delta``.  By default ``b_delta = max(1, size // 8)``: one sample at a time up to 16,
then about 12.5 % of the size.  A fixed step would take hundreds of batches to reach the sizes a GPU
needs (512 on the H100 case of MISSION.md) or would be far too coarse at batch 4 on a CPU; a step of
1/8 gets from 1 to 512 in about 45 batches and changes latency by at most ~12 % per step, which is
fine-grained enough to sit just under a target.  A fixed ``b_delta`` can be given instead.

*Slow start.*  Until its first late batch (or the throughput rule below settles it), a fresh
controller with the default ``b_delta`` doubles the size at each step instead (on a ladder: the
smallest rung at least twice the size), like TCP's slow start: the first late batch undoes that doubling and additive steps
take over from the last size that met the target.  On our CPU case, additive steps from 8 took
some 100 batches (several thousand requests) to reach the sizes where throughput levels off (128
and up), and on the GPU from 64 to 1,024 as long; doubling gets there in 4-6 steps.  A looser
target (:meth:`~BatchSizeController.set_target`) starts a slow start again.

*Trend gate (S402-S405).*  The controller keeps its last ``window`` proposals and runs
:func:`mann_kendall` on them.  A step is a *continuation* when it goes the way the controller last
moved, and a *reversal* (or a start from rest) otherwise:

- A continuation of a growth run is taken while the size trend is ``"increasing"`` at ``alpha``.  The
  first ``3`` steps of a run are exempt because Mann-Kendall cannot confirm a trend from so few
  changes (after a flat window of 8 a run needs 3 steps to reach p < 0.05; from a cold start the
  window holds only 4 points after 3 steps, the fewest at which p < 0.1 is possible).
- A reversal to growth (after a shrink, or after a hold) is a *probe*.  It needs ``patience``
  consecutive full batches under target at the current size, a size trend that is not
  ``"decreasing"`` (the momentum of the previous shrink run has left the window) and a latency
  residual trend that is not ``"increasing"`` (see below).  ``patience`` starts at ``window // 2``,
  doubles after every failed probe (a probe whose run ends back at or below where it started), up
  to ``4 * window``, and returns to ``window // 2`` after a probe that advanced, on
  :meth:`~BatchSizeController.set_target` and when the memory cap lifts.  Waiting and backing off
  are what keep the size from thrashing on noisy latency; probing is what keeps it from sticking
  forever, including at a local optimum.
- **A latency violation always shrinks at once**, whatever the trend says: a late batch is a
  user-visible failure, while a needless shrink costs one step of throughput that the next probe
  recovers.  A late batch right after a growth step undoes exactly that step (the size before it
  was on time); otherwise the size shrinks by ``b_delta``.  (Only exception: a violation by a batch
  *larger* than the current proposal, i.e. one formed before the last shrink while several batches
  were in flight, does not shrink again; the proposal is already below the size that was late.)

*Throughput (S406).*  Throughput ``size / service_time`` is kept per size bucket (exact up to 16,
then 8 buckets per doubling, so 8, 16, 32, 64 ... are bucket centres) as an exponentially weighted
moving average, together with that bucket's latency.  The controller stops growing when the
throughput at the current size has fallen, on two full batches in a row, more than
``throughput_tolerance`` (10 %) below the best throughput seen at a smaller size whose latency
meets the target, and settles back at that best size; nor does it grow again, probe included,
to that size or beyond for the next ``16 * window`` batches, as long as the fallen size's
throughput stays more than the tolerance below the best's (settled at the best, the controller
measures it again, and a fall that only came from a lucky first estimate of the best is forgotten).  So on a model whose throughput peaks at an interior size (our CPU case: 4,373 img/s at 8,
2,883 at 64) it settles at the peak, not at the largest size under the latency target; on a
saturating GPU curve the tolerance keeps noise from stopping the climb early.  (It was 20 % while
the GPU path had ~40 ms stalls at every new shape and every other batch; with those gone, a
simulation of both measured curves with 5-15 % noise per batch, in an earlier version of
``benchmarks/controller_sim.py`` that swept the tolerance, gave 94-97 % of the best throughput
on the CPU curve at 10 % against 91-94 % at 20 %, and 99.7 % on the GPU curve either way.)  Buckets not visited
for ``16 * window`` batches are ignored (the model or the load may have changed).

*Which size is best, under noise.*  On a busy 2-core machine one batch's measured time varies by
10-15 % (more when replies arrive clumped), and a climb sees a dozen sizes two or three times
each: the best of them on averages alone is mostly the luckiest.  In a recorded CPU run it was
11,820 samples/s "at 17 rows", whose 13 batches averaged 7,450, and later 11,480 "at 38", below
which 64 rows "fell" at 10,310 while its 480 batches averaged 12,620; in the run before, such a
fall held ``max_batch_size=64`` at 35-47 rows for a third of the timed requests.  Three rules:

- The best size is the one with the highest *lower bound*: its average less twice the standard
  error it has beyond a well-measured size's, ``noise * sqrt(1/k - 1/7)`` for an average of k
  batches (7: what an EWMA of weight 1/4 holds), where ``noise`` is one batch's relative standard
  deviation, measured robustly (median absolute deviation of the last 64 batches from their
  sizes' averages, at most 0.25: ``throughput_noise`` in :meth:`~BatchSizeController.state`).  A
  size seen once must beat a well-measured one by more than its luck; two well-measured sizes
  compare by their averages, so a real fall is seen as sharply as before (a bound on every
  average, even a long-measured one, made a burst of slow batches hide the CPU case's cliff in
  simulation); a quiet device (a GPU: ~1-3 %) keeps all its comparisons sharp.
- A size's first four batches are averaged plainly before the EWMA takes over (from the first
  batch, two batches leave the first one weighing 3/4).
- A remembered fall is kept only while the fallen size's average stays more than the tolerance
  below the best's bound: settled at the best, the controller measures it again.

``benchmarks/controller_sim.py``, noise shaped like the 2-core machine's, worst of 16 seeds, before
these rules -> with them: the ``max_batch_size=64`` curve 0.97 -> 1.00 of the best throughput, the
CPU curve 0.90 -> 0.96, the GPU curve 0.92 -> 0.99, the cliff 0.85 -> 0.95; over batches 50-300
after load (what the CPU benchmark times) 0.94 -> 0.99, 0.86 -> 0.94, 0.89 -> 0.98 and
0.72 -> 0.88.  With quiet noise (5 %) nothing gets worse by more than 0.01.

*Short batches.*  ``observe`` records the size that actually ran.  A batch smaller than the proposal
(the queue held fewer requests) says nothing about the proposal: meeting the target with it does not
justify growing (the controller holds, and such batches do not count towards ``patience``), and its
throughput is recorded under its own size, so a short, slow batch never makes the proposal look
"too large" to the throughput rule.  A short batch that misses the target still shrinks the
proposal by one step (never straight down to the short size): smaller batches only ever lower
latency, and under light load a smaller batch also fills sooner.

*Ladder.*  For compiled models (:mod:`dask_dynbatch.compiled`) the proposal lives on a ladder of
bucket sizes: a step goes to the next rung up or down (the doubling ladder makes each step a
doubling, which the throughput rule and a late batch undo as usual), and bounds are rounded down to
a rung, so every full batch fills a compiled bucket exactly.

*Memory cap.*  :meth:`~BatchSizeController.set_cap` bounds the proposal at once; the proposal stays
within ``[min_size, min(cap, max_size)]`` (the cap wins over ``min_size``; the size is never below 1).

Autocorrelation: why latency residuals, not Hamed-Rao
-----------------------------------------------------
Mann-Kendall assumes independent observations.  The controller's own sizes are not: each is the
previous one plus or minus a step, so the series is a random walk driven by latency noise.  We
checked the Hamed-Rao variance correction (implemented here as ``mann_kendall(hamed_rao=True)`` and
verified against ``pymannkendall``) on the windows the controller sees: with n = 8 only
autocorrelations beyond ``1.96 / sqrt(8) = 0.69`` count as significant, so on a monotone run, a run
after a hold or a shrink followed by holds the correction factor is exactly 1, and the one pattern it
does react to, a size alternating up and down (lag-1 autocorrelation strongly negative), gets its
variance *divided by* about 2.3, so that a thrashing window looks *more* like a trend.  At this
window length it is either inert or harmful.

We therefore use the size test for what it can honestly say on this series -- a calibrated
threshold on momentum (|S| relative to its no-trend spread, ties included), not a probability -- and
put the one statistical question the controller asks, "is latency creeping up at a fixed size, so
that probing upward now would be unwise?", to the **trend of latency residuals**: the latencies of
the last ``window`` batches minus ``slope * size``, where ``slope`` is the Theil-Sen slope of latency
on size over the last ``4 * window`` batches.  Taking out the size effect removes the channel through
which the controller's own decisions enter the latency series, so what is left is measurement noise
plus outside drift (load, contention, thermals): close to independent, which is what the test
assumes.  A probe waits while that trend is ``"increasing"``.

Window and alpha
----------------
``window = 8``: with no ties Mann-Kendall cannot reach p < 0.05 below n = 5, and the controller's
windows are full of ties (holds), which need more points still; 8 points confirm a clean run within
3 steps while forgetting a finished run within a few batches.  ``alpha = 0.1``: the gate is a
momentum check whose type-I error costs one more step, which the very next latency sample checks
(and a violation undoes at once), while a type-II error costs a hold, i.e. throughput.  At n = 8
without ties alpha = 0.1 needs |S| >= 15 of 28 (0.05 would need 17), and after a hold 2 steps of a new
run already count as a trend.

What it buys (``tests/test_control.py``, latency = 10 ms + 1 ms * size + noise, target 110 ms, so
the best size is 100; 500 batches, noise 4.5-18 % of the target, 20 seeds checked while tuning):
80 % of the best size within 29-37 batches; 0.18-0.29 times the direction changes of plain
additive increase/decrease with the same step rule; 10-20 % late batches against its 47 %, at
97-99 % of its throughput.
"""

from __future__ import annotations

import functools
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from statistics import NormalDist
from typing import NamedTuple

import numpy as np

__all__ = ["BatchSizeController", "MKResult", "mann_kendall", "size_bucket"]


# ---------------------------------------------------------------------------------------------
# Mann-Kendall trend test
# ---------------------------------------------------------------------------------------------


class MKResult(NamedTuple):
    """Result of :func:`mann_kendall`.

    Attributes
    ----------
    s : float
        Mann-Kendall statistic, ``sum(sign(x[j] - x[i]) for i < j)``.
    var_s : float
        Variance of ``s`` under no trend, tie-corrected (and Hamed-Rao corrected if asked).
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


def _average_ranks(values: np.ndarray) -> np.ndarray:
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


@functools.lru_cache(maxsize=64)
def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``i < j`` of ``n`` points (cached: the controller asks for the same few ``n``
    after every batch)."""
    return np.triu_indices(n, 1)


def _theil_sen_slope_over_time(values: np.ndarray) -> float:
    """Median of ``(x[j] - x[i]) / (j - i)`` over all ``i < j`` (Sen's slope)."""
    i, j = _pairs(len(values))
    return float(np.median((values[j] - values[i]) / (j - i)))


def _hamed_rao_factor(values: np.ndarray, alpha: float, lag: int | None) -> float:
    """Hamed and Rao (1998) variance inflation factor ``n / n*`` for an autocorrelated series.

    The series is detrended with Sen's slope, ranked, and the autocorrelations of the ranks that are
    significant at ``alpha`` (``|r_k| > z_{1-alpha/2} / sqrt(n)``) for lags ``1..lag`` (all lags when
    ``lag`` is None) enter ``1 + 2 / (n (n-1) (n-2)) * sum (n-k)(n-k-1)(n-k-2) r_k``.
    """
    n = len(values)
    detrended = values - _theil_sen_slope_over_time(values) * np.arange(1, n + 1)
    ranks = _average_ranks(detrended)
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


def mann_kendall(
    x: Iterable[float], *, alpha: float = 0.05, hamed_rao: bool = False, lag: int | None = None
) -> MKResult:
    """Two-sided Mann-Kendall trend test.

    Parameters
    ----------
    x : iterable of float
        The series, in time order.  NaNs are dropped.
    alpha : float, default 0.05
        Significance level used for ``trend`` (and, with ``hamed_rao``, for choosing which
        autocorrelations count).
    hamed_rao : bool, default False
        Multiply the variance by the Hamed-Rao (1998) autocorrelation correction factor computed on
        the ranks of the Sen-detrended series.  Should the factor come out <= 0 (possible for short
        series with strong negative autocorrelation), the uncorrected variance is kept.
    lag : int, optional
        With ``hamed_rao``: number of lags considered (default: all, ``n - 1``; Hamed and Rao
        suggest 3).

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
    ``p = 2 (1 - Phi(|Z|))``.  This matches ``pymannkendall.original_test`` (and
    ``hamed_rao_modification_test`` with ``hamed_rao=True``).  With no ties, ``p < 0.05`` is out of
    reach below ``n = 5``.

    Examples
    --------
    >>> r = mann_kendall([1, 2, 3, 4, 5])
    >>> r.s, round(r.var_s, 3), round(r.z, 4), r.trend
    (10.0, 16.667, 2.2045, 'increasing')
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    values = np.asarray(x if isinstance(x, np.ndarray) else list(x), dtype=float).ravel()
    values = values[~np.isnan(values)]
    n = int(values.size)
    if n < 2:
        return MKResult(0.0, 0.0, 0.0, 1.0, n, "no trend")

    i, j = _pairs(n)
    s = float(np.sign(values[j] - values[i]).sum())

    _, tie_counts = np.unique(values, return_counts=True)
    var_s = float(n * (n - 1) * (2 * n + 5) - np.sum(tie_counts * (tie_counts - 1) * (2 * tie_counts + 5))) / 18.0
    if hamed_rao and n >= 3:
        factor = _hamed_rao_factor(values, alpha, lag)
        if factor > 0.0:
            var_s *= factor

    if s == 0.0 or var_s <= 0.0:
        z = 0.0
    else:
        z = (s - math.copysign(1.0, s)) / math.sqrt(var_s)
    p = math.erfc(abs(z) / math.sqrt(2.0))
    if p < alpha and z > 0:
        trend = "increasing"
    elif p < alpha and z < 0:
        trend = "decreasing"
    else:
        trend = "no trend"
    return MKResult(s, var_s, z, p, n, trend)


# ---------------------------------------------------------------------------------------------
# Batch-size controller
# ---------------------------------------------------------------------------------------------

_UNCONFIRMED_RUN_STEPS = 3  # steps of a run taken before Mann-Kendall must confirm its trend
_EWMA_WEIGHT = 0.25  # weight of a new sample in the per-size throughput/latency averages
#: the best size is chosen by its throughput less this many of its excess standard errors (module docstring)
_BEST_BOUND_Z = 2.0
#: an EWMA of weight 0.25 averages about (2 - 0.25) / 0.25 = 7 batches
_EWMA_SAMPLES = 7
#: the per-batch noise is taken as at most this (relative standard deviation): a size seen once
#: keeps at least 1 - 2 * 0.25 * sqrt(1 - 1/7) = 0.54 of its average as its bound
_MAX_NOISE = 0.25


def size_bucket(size: int) -> int:
    """Bucket of a batch size for the throughput table.

    Exact up to 16; above, the nearest of 8 geometric steps per doubling (16, 17, 19, 21, 23, 25,
    27, 29, 32, 35, ...), so powers of two are bucket centres and neighbours differ by ~9 %.
    """
    if size <= 16:
        return int(size)
    step = round(8 * math.log2(size / 16))
    return int(round(16 * 2 ** (step / 8)))


class _Decision(NamedTuple):
    """What one observation leads to.

    ``kind`` says how it bears on the run state: ``"neutral"`` (the batch says nothing about the
    proposal), ``"at_bound"`` (growth blocked by the cap or max_size only), ``"probe"`` (a growth run
    starts from rest) or ``"normal"``.
    """

    size: int
    decision: str  # "grow", "shrink" or "hold"
    reason: str
    kind: str = "normal"


@dataclass
class _BucketStats:
    throughput: float | None  # EWMA of samples/s (None until a batch with a valid service time)
    latency: float  # EWMA of latency, s
    last_seen: int  # observation index of the last update
    count: int = 1  # observations averaged in


class BatchSizeController:
    """Batch size for one (worker, model) from observed latency and throughput.

    See the module docstring for the algorithm and the reasons behind the defaults.

    Parameters
    ----------
    latency_target : float
        Seconds a request may take, batch formation wait included.
    initial_size : int, default 1
        First proposal.
    min_size, max_size : int, optional
        Bounds of the proposal (``max_size=None``: unbounded, apart from the memory cap).
    window : int, default 8
        How many recent proposals (and latencies) the Mann-Kendall tests look at.  At least 5.
    alpha : float, default 0.1
        Significance level of the trend tests.
    b_delta : int, optional
        Fixed additive step.  Default: ``max(1, size // 8)``.
    throughput_tolerance : float, default 0.1
        Growth stops when throughput falls this fraction below the best seen at a smaller size.
    clock : callable, default time.monotonic
        Time source, only used to stamp ``state()["observed_at"]``.
    ladder : sequence of int, optional
        Bucket sizes the proposal must be one of (compiled models, see
        :mod:`dask_dynbatch.compiled`): a step moves to the next rung up or down instead of by
        ``b_delta``, and bounds (cap, ``max_size``) are rounded down to a rung.

    Examples
    --------
    >>> c = BatchSizeController(0.05, initial_size=4)
    >>> c.observe(4, latency=0.01, service_time=0.008)
    5
    >>> c.set_cap(3); c.size
    3
    """

    def __init__(
        self,
        latency_target: float,
        *,
        initial_size: int = 1,
        min_size: int = 1,
        max_size: int | None = None,
        window: int = 8,
        alpha: float = 0.1,
        b_delta: int | None = None,
        throughput_tolerance: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        ladder: Iterable[int] | None = None,
    ) -> None:
        _check_target(latency_target)
        if int(min_size) < 1:
            raise ValueError(f"min_size must be >= 1, got {min_size!r}")
        if max_size is not None and int(max_size) < int(min_size):
            raise ValueError(f"max_size ({max_size!r}) must be >= min_size ({min_size!r})")
        if int(window) < 5:
            raise ValueError(f"window must be >= 5 (too few points for Mann-Kendall), got {window!r}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        if b_delta is not None and int(b_delta) < 1:
            raise ValueError(f"b_delta must be >= 1 or None, got {b_delta!r}")
        if not 0.0 <= throughput_tolerance < 1.0:
            raise ValueError(f"throughput_tolerance must be in [0, 1), got {throughput_tolerance!r}")

        self._target = float(latency_target)
        self._min_size = int(min_size)
        self._max_size = None if max_size is None else int(max_size)
        self._cap: int | None = None
        self._window = int(window)
        self._alpha = float(alpha)
        self._b_delta = None if b_delta is None else int(b_delta)
        self._throughput_tolerance = float(throughput_tolerance)
        self._clock = clock
        self._ladder = tuple(sorted({int(r) for r in ladder})) if ladder is not None else None
        if self._ladder is not None and (not self._ladder or self._ladder[0] < 1):
            raise ValueError(f"ladder must hold positive sizes, got {ladder!r}")

        self._base_patience = max(2, self._window // 2)
        self._max_patience = 4 * self._window
        self._patience = self._base_patience
        self._bucket_memory = 16 * self._window

        self._size = self._bounded(int(initial_size))
        self._recent_sizes: deque[int] = deque([self._size], maxlen=self._window)
        self._recent_latencies: deque[float] = deque(maxlen=self._window)
        self._size_latency_history: deque[tuple[int, float]] = deque(maxlen=4 * self._window)
        self._buckets: dict[int, _BucketStats] = {}

        self._observations = 0
        # doubling steps until the first late batch or throughput settle (not with a fixed b_delta)
        self._slow_start = self._b_delta is None
        self._below_best: int | None = None  # size of the last full batch under target, when it ran more than the tolerance below the best
        # one batch's relative deviation from its size's average so far, last 64, and the noise
        # estimated from them (see _record)
        self._residuals: deque[float] = deque(maxlen=64)
        self._noise_estimate: float | None = None
        self._fall: tuple[int, int] | None = None  # (size, observation) of the last confirmed throughput fall
        # A fresh controller is a growth run that has not taken its first step yet.
        self._run_direction = +1  # +1 growing, -1 shrinking, 0 at rest (the last decision was a hold)
        self._run_length = 0  # steps taken in the current run
        self._holds_under_target = 0  # consecutive full batches under target since the last move
        self._probe_origin: int | None = None  # size a probing growth run started from
        self._size_before_cap: int | None = None  # size chosen before a memory cap squeezed it
        self._size_before_step = self._size  # proposal before the last change of size
        self._size_trend = mann_kendall(self._recent_sizes, alpha=self._alpha)
        self._latency_trend = mann_kendall([], alpha=self._alpha)
        self._decision = "hold"
        self._reason = "no batch observed yet"
        self._observed_at: float | None = None

    # ------------------------------------------------------------------ public interface
    @property
    def size(self) -> int:
        """Current proposal, within ``[min_size, min(cap, max_size)]`` (the cap wins; never < 1)."""
        return self._size

    @property
    def latency_target(self) -> float:
        """Current latency target, seconds."""
        return self._target

    @property
    def decision(self) -> str:
        """The last decision: ``"grow"``, ``"shrink"`` or ``"hold"``."""
        return self._decision

    @property
    def reason(self) -> str:
        """Why the last decision was taken, in words."""
        return self._reason

    @property
    def cap(self) -> int | None:
        """Current memory cap (None: none)."""
        return self._cap

    def observe(self, size: int, latency: float, service_time: float, proposed: int | None = None) -> int:
        """Learn from one finished batch and return the next proposal.

        Parameters
        ----------
        size : int
            Number of samples that actually ran (may be below the proposal when the queue was short).
        latency : float
            Seconds its requests experienced: batch formation wait + round trip.
        service_time : float
            Seconds the worker was busy with it; ``size / service_time`` is its throughput.  A value
            <= 0 or not finite is ignored for throughput.
        proposed : int, optional
            The proposal in force when the batch was formed (default: the current one).  With
            several batches in flight, results arrive for batches formed under earlier proposals:
            a batch is *short* only when it is smaller than the proposal it was formed under, and a
            full batch formed before the last change says nothing about the current proposal.

        Returns
        -------
        int
            The next proposed batch size (also available as :attr:`size`).
        """
        size = int(size)
        latency = float(latency)
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size!r}")
        if not math.isfinite(latency) or latency < 0:
            raise ValueError(f"latency must be a finite number >= 0, got {latency!r}")
        self._observations += 1
        self._observed_at = self._clock()
        self._record(size, latency, float(service_time))

        proposal = self._size
        self._size_trend = mann_kendall(self._recent_sizes, alpha=self._alpha)
        self._latency_trend = mann_kendall(self._latency_residuals(), alpha=self._alpha)

        formed_under = proposal if proposed is None else int(proposed)
        if latency > self._target:
            decision = self._on_late_batch(size, latency, proposal)
        elif size < min(formed_under, proposal):
            reason = f"batch ran short ({size} of {formed_under}): no evidence about {proposal}, hold"
            decision = _Decision(proposal, "hold", reason, "neutral")
        elif formed_under < proposal:
            reason = f"batch of {size} was formed before the proposal grew to {proposal}: wait for its evidence"
            decision = _Decision(proposal, "hold", reason, "neutral")
        else:
            decision = self._on_target_met(size, latency, proposal)
        self._apply(proposal, decision)
        return self._size

    def set_cap(self, cap: int | None) -> None:
        """Bound the proposal by a memory cap (None: no cap).  Takes effect immediately.

        Calling it again with the same cap (e.g. before every batch) changes nothing.  A cap below
        the proposal lowers it at once; a cap that held the proposal down and then lifts lets growth
        resume at the next batch under target, without waiting for ``patience``.
        """
        if cap is not None:
            cap = max(1, int(cap))
        if cap == self._cap:
            return
        was_binding = self._cap is not None and self._cap <= self._size
        self._cap = cap
        bounded = self._bounded(self._size)
        if bounded < self._size:
            self._reason = f"memory cap {cap} lowered the size from {self._size} to {bounded}"
            # remember what the controller had chosen, to return to it when memory comes back
            self._size_before_cap = max(self._size, self._size_before_cap or 0)
            self._size = bounded
            # An outside clamp is no trend of ours: restart the window, and let growth resume as a
            # fresh run as soon as the cap lifts.
            self._recent_sizes = deque([bounded], maxlen=self._window)
            self._run_direction, self._run_length = +1, 0
            self._probe_origin = None
        elif was_binding and (cap is None or cap > self._size):
            self._patience = self._base_patience
            self._run_direction, self._run_length = +1, 0
            before = self._size_before_cap
            if before is not None and before > self._size:
                # memory came back: return at once to the size chosen before the squeeze (within
                # the new cap), instead of climbing back from the cap by additive steps
                restored = self._bounded(before)
                self._reason = f"memory cap lifted to {cap}: back from {self._size} to {restored}"
                self._size = restored
                self._recent_sizes = deque([restored], maxlen=self._window)
                if cap is None or cap >= before:
                    self._size_before_cap = None

    def set_target(self, latency_target: float) -> None:
        """Change the latency target.

        A tighter target shrinks at the next late batch; under a looser one growth starts at the
        next full batch under target, without waiting for ``patience``.
        """
        _check_target(latency_target)
        latency_target = float(latency_target)
        if latency_target == self._target:
            return
        self._reason = f"target changed from {self._target:.4g}s to {latency_target:.4g}s"
        if latency_target > self._target and self._b_delta is None:
            self._slow_start = True
        self._target = latency_target
        self._patience = self._base_patience
        self._run_direction, self._run_length = +1, 0
        self._probe_origin = None

    def state(self) -> dict:
        """JSON-able snapshot for ``stats()`` and the dashboard.

        Returns
        -------
        dict
            ``size``, ``target``, ``cap``, ``min_size``, ``max_size``, ``latencies`` (recent,
            seconds), ``sizes`` (recent proposals), ``z``, ``p``, ``s``, ``trend`` (of the sizes),
            ``latency_trend`` (z, p and trend of the latency residuals), ``decision`` (``"grow"``,
            ``"shrink"`` or ``"hold"``), ``reason``, ``best_size``, ``best_throughput`` (its
            average), ``best_throughput_bound`` (what the rules compare with: the average less what
            luck may have added, see the module docstring), ``throughput_noise`` (one batch's
            relative standard deviation, or None until measured),
            ``throughput`` (``{size bucket: samples/s}``), ``patience``, ``ladder`` (bucket sizes, or None), ``observations`` and
            ``observed_at`` (clock reading of the last observation, or None).
        """
        best_size, best_bound = self._best()
        best_throughput = None if best_size is None else float(self._buckets[best_size].throughput)
        return {
            "size": self._size,
            "target": self._target,
            "cap": self._cap,
            "min_size": self._min_size,
            "max_size": self._max_size,
            "latencies": [float(v) for v in self._recent_latencies],
            "sizes": [int(v) for v in self._recent_sizes],
            "z": float(self._size_trend.z),
            "p": float(self._size_trend.p),
            "s": float(self._size_trend.s),
            "trend": self._size_trend.trend,
            "latency_trend": {
                "z": float(self._latency_trend.z),
                "p": float(self._latency_trend.p),
                "trend": self._latency_trend.trend,
            },
            "decision": self._decision,
            "reason": self._reason,
            "best_size": best_size,
            "best_throughput": best_throughput,
            "best_throughput_bound": best_bound,
            "throughput_noise": self._noise_estimate,
            "throughput": {
                bucket: float(stats.throughput)
                for bucket, stats in sorted(self._buckets.items())
                if stats.throughput is not None
            },
            "patience": self._patience,
            "slow_start": self._slow_start,
            "ladder": list(self._ladder) if self._ladder is not None else None,
            "observations": self._observations,
            "observed_at": self._observed_at,
        }

    def __repr__(self) -> str:
        return (
            f"<BatchSizeController size={self._size} target={self._target:.4g}s cap={self._cap} "
            f"decision={self._decision!r}>"
        )

    # ------------------------------------------------------------------ decisions
    def _on_late_batch(self, size: int, latency: float, proposal: int) -> _Decision:
        late = f"latency {latency:.4g}s > target {self._target:.4g}s"
        if size > proposal:
            reason = f"{late} for a batch of {size} formed before the last shrink; already at {proposal}"
            return _Decision(proposal, "hold", reason, "neutral")
        if proposal <= self._lower():
            return _Decision(proposal, "hold", f"{late} but already at the smallest size {proposal}")
        new_size = self._down(proposal)
        if self._run_direction > 0 and self._run_length > 0 and self._size_before_step < proposal:
            # Late right after a growth step: undo exactly that step (the size before it met the
            # target), rather than shrinking by the larger step of the larger size and drifting down.
            new_size = max(new_size, self._size_before_step)
        new_size = self._bounded(new_size)
        reason = f"{late}: shrink {proposal} -> {new_size} (a late batch overrides the trend gate)"
        return _Decision(new_size, "shrink", reason)

    def _on_target_met(self, size: int, latency: float, proposal: int) -> _Decision:
        met = f"latency {latency:.4g}s <= target {self._target:.4g}s"
        best_size, best_throughput = self._best()
        current = self._buckets.get(size_bucket(size))
        below = (
            best_size is not None
            and best_throughput is not None
            and current is not None
            and current.throughput is not None
            and size_bucket(best_size) < size_bucket(size)
            and current.throughput < (1.0 - self._throughput_tolerance) * best_throughput
        )
        # one batch below the best is not enough: a single slow batch (a busy neighbour, a GC
        # pause) would otherwise settle the size back, which measured end-to-end throughput on a
        # shared machine does often; two in a row above the best size are
        confirmed, previous = below and self._below_best is not None, self._below_best
        self._below_best = size if below else None
        if below and self._slow_start and not confirmed:
            # doubling again before the second batch could confirm would overshoot twice as far
            self._slow_start = False
            reason = (f"{met}, but throughput at {size} ({current.throughput:.4g}/s) fell more than "
                      f"{self._throughput_tolerance:.0%} below the best ({best_throughput:.4g}/s at {best_size}): "
                      "slow start ends, hold")
            return _Decision(proposal, "hold", reason)
        if confirmed:
            self._slow_start = False
            fall = min(size, previous if previous is not None else size)
            if self._known_fall(fall, best_size) is not None:  # a fall at or below the one known
                fall = min(fall, self._fall[0])
            self._fall = (fall, self._observations)
            new_size = self._bounded(min(best_size, proposal))
            reason = (
                f"throughput at {size} ({current.throughput:.4g}/s) is more than {self._throughput_tolerance:.0%} "
                f"below the best, {best_throughput:.4g}/s at {best_size}: settle at {new_size}"
            )
            return _Decision(new_size, "shrink" if new_size < proposal else "hold", reason)
        if proposal >= self._top():
            bound = "memory cap" if self._cap is not None and self._cap == self._upper() else "max_size"
            return _Decision(proposal, "hold", f"{met}, but at the {bound} ({proposal})", "at_bound")

        sizes = self._size_trend
        trend_text = f"size trend z={sizes.z:.2f} p={sizes.p:.2g}"
        grown = self._bounded(self._up(proposal))
        fall = self._known_fall(grown, best_size)
        if fall is not None:
            # back to the best, as when the fall was found (a probe that stops short of the fall
            # would otherwise park between the best and the fall)
            new_size = self._bounded(min(best_size, proposal))
            reason = (f"{met}, but throughput fell at {fall} within the last {self._bucket_memory} batches: "
                      + (f"back to the best, {best_size}" if new_size < proposal else "hold"))
            return _Decision(new_size, "shrink" if new_size < proposal else "hold", reason)
        if self._run_direction > 0:
            if self._run_length < _UNCONFIRMED_RUN_STEPS:
                reason = f"{met}: grow {proposal} -> {grown} (run step {self._run_length + 1}, too early to test)"
                return _Decision(grown, "grow", reason)
            if sizes.trend == "increasing":
                return _Decision(grown, "grow", f"{met}: grow {proposal} -> {grown}, {trend_text} agrees")
            return _Decision(proposal, "hold", f"{met}, but {trend_text} no longer confirms growth: hold")

        # At rest or after a shrink: growing would reverse or restart, i.e. probe.
        wait = self._patience - self._holds_under_target - 1
        if wait > 0:
            return _Decision(proposal, "hold", f"{met}: hold, probe upward after {wait} more batches under target")
        if sizes.trend == "decreasing":
            return _Decision(proposal, "hold", f"{met}, but {trend_text} is still decreasing: hold")
        residuals = self._latency_trend
        if residuals.trend == "increasing":
            reason = (
                f"{met}, but latency is creeping up at this size "
                f"(residual trend z={residuals.z:.2f} p={residuals.p:.2g}): hold"
            )
            return _Decision(proposal, "hold", reason)
        reason = f"{met} for {self._holds_under_target + 1} batches: probe {proposal} -> {grown}"
        return _Decision(grown, "grow", reason, "probe")

    def _apply(self, proposal: int, decision: _Decision) -> None:
        """Adopt ``decision`` and update the run state (direction, length, holds, probe, patience)."""
        self._decision, self._reason = decision.decision, decision.reason
        if decision.kind == "neutral":  # a batch that says nothing about the proposal changes nothing
            return
        new_size = decision.size
        direction = (new_size > proposal) - (new_size < proposal)
        if direction == 0:
            if decision.kind == "at_bound":
                self._run_direction, self._run_length = +1, 0  # grow as a fresh run once the bound lifts
            else:
                if self._probe_origin is not None and proposal > self._probe_origin:
                    self._patience = self._base_patience  # the probe advanced before the trend stopped it
                self._probe_origin = None
                self._run_direction, self._run_length = 0, 0
            under_target = bool(self._recent_latencies) and self._recent_latencies[-1] <= self._target
            self._holds_under_target = self._holds_under_target + 1 if under_target else 0
        else:
            if direction < 0:
                self._slow_start = False
            if direction < 0 and self._probe_origin is not None:
                if new_size <= self._probe_origin:  # the probe found nothing better: wait longer next time
                    self._patience = min(self._max_patience, 2 * self._patience)
                else:
                    self._patience = self._base_patience
                self._probe_origin = None
            if decision.kind == "probe":
                self._probe_origin = proposal
            if direction == self._run_direction:
                self._run_length += 1
            else:
                self._run_direction, self._run_length = direction, 1
            self._holds_under_target = 0
            self._size_before_step = proposal
        self._size = new_size
        self._recent_sizes.append(new_size)

    # ------------------------------------------------------------------ bookkeeping
    def _record(self, size: int, latency: float, service_time: float) -> None:
        self._recent_latencies.append(latency)
        self._size_latency_history.append((size, latency))
        throughput = size / service_time if service_time > 0 and math.isfinite(service_time) else None
        bucket = size_bucket(size)
        stats = self._buckets.get(bucket)
        if stats is None or self._observations - stats.last_seen > self._bucket_memory:
            self._buckets[bucket] = _BucketStats(throughput, latency, self._observations)
            return
        if throughput is not None and stats.throughput:
            self._residuals.append(abs(throughput - stats.throughput) / stats.throughput)
            if len(self._residuals) >= 8:
                # One batch's relative standard deviation of throughput, pooled over sizes: robustly,
                # from the median absolute deviation (a late batch or a stall would dominate a mean
                # of squares: one such run measured 0.40 where the batches' spread was ~0.13), at
                # most _MAX_NOISE; None until 8 batches showed it. Once per batch here, not per size
                # each time the best is sought.
                self._noise_estimate = min(_MAX_NOISE, 1.4826 * float(np.median(self._residuals)))
        stats.count += 1
        # a plain mean of the first 1 / _EWMA_WEIGHT batches, then the EWMA: otherwise a bucket's
        # first batch alone would weigh 3/4 after two, and a size seen a few times in a climb would
        # carry whatever luck its first batch had
        weight = max(_EWMA_WEIGHT, 1.0 / stats.count)
        stats.latency += weight * (latency - stats.latency)
        if throughput is not None:
            if stats.throughput is None:
                stats.throughput = throughput
            else:
                stats.throughput += weight * (throughput - stats.throughput)
        stats.last_seen = self._observations

    def _latency_residuals(self) -> list[float]:
        """Last ``window`` latencies minus ``slope * size`` (Theil-Sen slope of latency on size)."""
        history = list(self._size_latency_history)
        sizes = np.array([s for s, _ in history], dtype=float)
        latencies = np.array([v for _, v in history], dtype=float)
        slope = 0.0
        if len(history) >= 2:
            i, j = _pairs(len(history))
            distinct = sizes[j] != sizes[i]
            if distinct.any():
                slope = float(np.median((latencies[j] - latencies[i])[distinct] / (sizes[j] - sizes[i])[distinct]))
        recent = slice(max(0, len(history) - self._window), len(history))
        return list(latencies[recent] - slope * sizes[recent])

    def _known_fall(self, size: int, best_size: int | None) -> int | None:
        """The size at which throughput was last confirmed to fall (see :meth:`_on_target_met`),
        when growing to ``size`` would reach it again, it lies above the best size
        ``best_size``, the fall was less than ``16 * window`` batches ago and the fallen size's
        throughput is still more than the tolerance below the best's. Without this, a model whose throughput falls off a cliff just above its best
        size (our CPU case: half speed from 513 rows, where an activation buffer outgrows glibc's
        largest mmap threshold, 32 MiB) is probed there again after every ``patience``, two slow batches
        each time."""
        if self._fall is None:
            return None
        fall, when = self._fall
        if self._observations - when > self._bucket_memory:
            self._fall = None
            return None
        if best_size is None or size_bucket(fall) <= size_bucket(best_size):
            return None
        # Kept only while it still holds: settled back at the best size, the controller measures it
        # again and again, and a fall that came from a lucky estimate of the best (one fast batch
        # among a dozen sizes seen two or three times each in a climb) is forgotten as soon as the
        # best's own average no longer beats the fallen size by the tolerance.
        fallen = self._buckets.get(size_bucket(fall))
        best = self._buckets.get(size_bucket(best_size))
        if (fallen is None or fallen.throughput is None or best is None or best.throughput is None
                or fallen.throughput >= (1.0 - self._throughput_tolerance) * self._throughput_bound(best)):
            self._fall = None
            return None
        return fall if size >= fall else None

    def _best(self) -> tuple[int | None, float | None]:
        """Size bucket with the best recent throughput among those meeting the latency target,
        and that throughput's lower bound (:meth:`_throughput_bound`), which the rules compare with."""
        best_size, best_bound = None, None
        for bucket, stats in self._buckets.items():
            if stats.throughput is None or stats.latency > self._target:
                continue
            if self._observations - stats.last_seen > self._bucket_memory:
                continue
            bound = self._throughput_bound(stats)
            if best_bound is None or bound > best_bound:
                best_size, best_bound = bucket, bound
        return best_size, best_bound

    def _throughput_bound(self, stats: _BucketStats) -> float:
        """A size's throughput less ``_BEST_BOUND_Z`` times the standard error its average has
        beyond that of a well-measured size's (the measured noise, see :meth:`_record`, times
        ``sqrt(1/k - 1/7)`` for an average of k batches; nothing from 7 on, what an EWMA of
        weight 1/4 holds); the average itself until the noise is known."""
        if self._noise_estimate is None:
            return float(stats.throughput)
        excess = math.sqrt(max(0.0, 1.0 / stats.count - 1.0 / _EWMA_SAMPLES))
        return float(stats.throughput) * (1.0 - _BEST_BOUND_Z * self._noise_estimate * excess)

    def _step(self, size: int) -> int:
        return self._b_delta if self._b_delta is not None else max(1, size // 8)

    def _up(self, size: int) -> int:
        """One step of growth: ``b_delta`` more, or the next rung of the ladder; in slow start
        twice the size (the smallest rung at least that)."""
        if self._ladder is None:
            return 2 * size if self._slow_start else size + self._step(size)
        bigger = [r for r in self._ladder if r > size]
        if self._slow_start:
            doubled = [r for r in bigger if r >= 2 * size]
            return doubled[0] if doubled else (bigger[-1] if bigger else size)
        return bigger[0] if bigger else size

    def _down(self, size: int) -> int:
        """One step of shrinking: ``b_delta`` less, or the rung below."""
        if self._ladder is None:
            return size - self._step(size)
        smaller = [r for r in self._ladder if r < size]
        return smaller[-1] if smaller else size

    def _upper(self) -> int | float:
        bounds = [b for b in (self._max_size, self._cap) if b is not None]
        return min(bounds) if bounds else math.inf

    def _top(self) -> int | float:
        """Largest size a proposal may take: the upper bound, rounded down to a rung with a ladder."""
        upper = self._upper()
        if self._ladder is not None and math.isfinite(upper):
            rungs = [r for r in self._ladder if r <= upper]
            return rungs[-1] if rungs else upper
        if self._ladder is not None:
            return self._ladder[-1]
        return upper

    def _lower(self) -> int:
        return int(min(self._min_size, self._upper()))

    def _bounded(self, size: int) -> int:
        """``size`` clipped to ``[min_size, min(cap, max_size)]``; the upper bound wins, never below 1.
        With a ladder, rounded down to a rung (a bound below the lowest rung is kept as it is)."""
        size = max(1, int(min(max(size, self._min_size), self._upper())))
        if self._ladder is not None:
            rungs = [r for r in self._ladder if r <= size]
            if rungs:
                size = rungs[-1]
        return size


def _check_target(latency_target: float) -> None:
    if not (isinstance(latency_target, (int, float)) and math.isfinite(latency_target) and latency_target > 0):
        raise ValueError(f"latency_target must be a finite number of seconds > 0, got {latency_target!r}")
