"""Batch-size control: the batch size of one (worker, model) from the latency and throughput of its
batches (pure Python + NumPy).

After every batch, :meth:`BatchSizeController.observe` is told the size that ran, the latency its
requests saw and the time the device was busy with it, and answers with the next size to propose.
The rules in brief (``docs/controller.md`` gives each one and the reason for it):

- *Steps.*  Under the latency target the size grows by one step (``max(1, size // 8)``, a fixed
  ``b_delta``, or the next rung of a ladder); a fresh controller doubles instead (slow start) until
  its first late batch or fall of throughput.
- *Late batches* always shrink the size at once; right after a growth step, by undoing that step.
- *Trend gate.*  A growth run (:attr:`Phase.CLIMB`, :attr:`Phase.PROBE`) continues past its first
  three steps only while a Mann-Kendall test finds the last ``window`` sizes increasing.  At rest
  (:attr:`Phase.HOLD`) the size probes upwards only after ``patience`` batches under target, when the
  sizes no longer trend down and latency corrected for size does not trend up; ``patience`` doubles
  after each probe that found nothing better.
- *Throughput* (:class:`ThroughputTable`).  Two full batches in a row more than
  ``throughput_tolerance`` below the best size's throughput settle the size back at the best one,
  and growth stays below that fall while it holds.
- *Short or stale batches* say nothing about the proposal; the *memory cap* bounds it at once.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any, NamedTuple

import numpy as np

from .throughput import BestSize, ThroughputTable
from .trend import mann_kendall, theil_sen_slope

__all__ = ["BatchSizeController", "Phase"]


# ---------------------------------------------------------------------------------------------
# Sizes a proposal may take
# ---------------------------------------------------------------------------------------------


class _SizeRange:
    """The sizes a proposal may take, ``[min_size, min(cap, max_size)]`` (the cap wins, never below 1;
    on the ladder if there is one), and one step up or down among them."""

    def __init__(self, min_size: int, max_size: int | None, b_delta: int | None,
                 ladder: tuple[int, ...] | None) -> None:
        self.min_size = min_size
        self.max_size = max_size
        self.cap: int | None = None
        self.b_delta = b_delta
        self.ladder = ladder

    def upper(self) -> int | float:
        bounds = [b for b in (self.max_size, self.cap) if b is not None]
        return min(bounds) if bounds else math.inf

    def top(self) -> int | float:
        """Largest size a proposal may take: the upper bound, rounded down to a rung on a ladder."""
        upper = self.upper()
        if self.ladder is None:
            return upper
        if not math.isfinite(upper):
            return self.ladder[-1]
        below = bisect.bisect_right(self.ladder, upper)
        return self.ladder[below - 1] if below else upper

    def lower(self) -> int:
        return int(min(self.min_size, self.upper()))

    def bounded(self, size: int) -> int:
        """``size`` within the range; on a ladder rounded down to a rung (unless below them all)."""
        size = max(1, int(min(max(size, self.min_size), self.upper())))
        if self.ladder is not None:
            below = bisect.bisect_right(self.ladder, size)
            if below:
                size = self.ladder[below - 1]
        return size

    def _step(self, size: int) -> int:
        return self.b_delta if self.b_delta is not None else max(1, size // 8)

    def up(self, size: int, doubling: bool) -> int:
        """One step of growth: ``b_delta`` more or the next rung; when ``doubling``, twice the size
        (on a ladder the smallest rung at least that, else the top rung)."""
        if self.ladder is None:
            return 2 * size if doubling else size + self._step(size)
        above = bisect.bisect_right(self.ladder, size)
        if above == len(self.ladder):
            return size
        if not doubling:
            return self.ladder[above]
        doubled = bisect.bisect_left(self.ladder, 2 * size)
        return self.ladder[doubled] if doubled < len(self.ladder) else self.ladder[-1]

    def down(self, size: int) -> int:
        """One step of shrinking: ``b_delta`` less, or the rung below."""
        if self.ladder is None:
            return size - self._step(size)
        below = bisect.bisect_left(self.ladder, size)
        return self.ladder[below - 1] if below else size


# ---------------------------------------------------------------------------------------------
# Batch-size controller
# ---------------------------------------------------------------------------------------------

_UNCONFIRMED_RUN_STEPS = 3  # Mann-Kendall cannot confirm a trend from fewer steps of a run


class Phase(Enum):
    """Where the controller is between its moves (``state()["phase"]`` holds the value).

    Attributes
    ----------
    CLIMB
        A growth run from a fresh start, or resumed after a memory cap or a bound: its first
        3 steps are taken untested, later ones only while the size trend is increasing.
    PROBE
        A growth run that started from rest, gated like a climb; how it ends sets ``patience``
        (doubled when it ends at or below where it started, reset when it got further).
    HOLD
        Not growing: the last move was a hold or a shrink.  Growing from here is a probe, which
        waits for ``patience`` batches under target and for the trends to allow it.
    """

    CLIMB = "climb"
    PROBE = "probe"
    HOLD = "hold"


class _Decision(NamedTuple):
    """What one batch leads to.

    ``effect`` says how it bears on the phase: ``"neutral"`` (the batch says nothing about the
    proposal), ``"at_bound"`` (growth blocked by the cap or ``max_size`` only), ``"probe"`` (growth
    from rest) or ``"normal"``.
    """

    size: int
    decision: str  # "grow", "shrink" or "hold"
    reason: str
    effect: str = "normal"


class _PhaseState:
    """The controller's :class:`Phase`, the counters its rules read, and the transitions after each
    move (a hold, a growth step or a shrink) and after the memory cap moves the size."""

    def __init__(self, size: int, window: int, slow_start: bool) -> None:
        self.phase = Phase.CLIMB  # a fresh controller is a growth run that has not taken a step yet
        self.run_steps = 0  # steps taken by the current growth run
        self.slow_start = slow_start  # growth doubles until the first shrink or throughput fall
        self.base_patience = max(2, window // 2)
        self.max_patience = 4 * window
        self.patience = self.base_patience  # batches under target at rest before a probe
        self.holds_under_target = 0  # consecutive full batches under target held at this size
        self.probe_origin: int | None = None  # in PROBE: the size the probe started from
        self.last_growth_from = size  # the proposal before the last growth step

    @property
    def just_grew(self) -> bool:
        """Whether the last move was a growth step (no hold, bound or cap since)."""
        return self.phase is not Phase.HOLD and self.run_steps > 0

    def held(self, proposal: int, at_bound: bool, under_target: bool) -> None:
        """The size stayed; ``at_bound``: only the cap or ``max_size`` stopped growth."""
        if at_bound:
            self.restart_growth_run()  # grow as a fresh run once the bound lifts
        else:
            if self.phase is Phase.PROBE and proposal > self.probe_origin:
                self.patience = self.base_patience  # the probe advanced before the trend stopped it
            self._rest()
        self.holds_under_target = self.holds_under_target + 1 if under_target else 0

    def grew(self, proposal: int, probe: bool) -> None:
        """The size grew from ``proposal``; ``probe``: from rest."""
        if probe:
            self.phase, self.probe_origin, self.run_steps = Phase.PROBE, proposal, 1
        elif self.phase is Phase.HOLD:
            self.phase, self.run_steps = Phase.CLIMB, 1
        else:
            self.run_steps += 1
        self.holds_under_target = 0
        self.last_growth_from = proposal

    def shrank(self, new_size: int) -> None:
        """The size shrank to ``new_size``: slow start is over, and a probe is judged."""
        self.slow_start = False
        if self.phase is Phase.PROBE:
            failed = new_size <= self.probe_origin  # the probe found nothing better: wait longer next time
            self.patience = min(self.max_patience, 2 * self.patience) if failed else self.base_patience
        self._rest()
        self.holds_under_target = 0

    def squeezed(self) -> None:
        """The memory cap lowered the size: a fresh growth run once it lifts (no probe to judge)."""
        self.phase, self.run_steps, self.probe_origin = Phase.CLIMB, 0, None

    def restart_growth_run(self, reset_patience: bool = False) -> None:
        """A growth run from here, without waiting for ``patience`` (a probe stays a probe)."""
        if reset_patience:
            self.patience = self.base_patience
        self.phase = Phase.PROBE if self.phase is Phase.PROBE else Phase.CLIMB
        self.run_steps = 0

    def _rest(self) -> None:
        self.phase, self.run_steps, self.probe_origin = Phase.HOLD, 0, None


class BatchSizeController:
    """Batch size for one (worker, model) from observed latency and throughput.

    The rules and their reasons: the module docstring and ``docs/controller.md``.

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
        Fixed additive step (and no slow start).  Default: ``max(1, size // 8)``.
    throughput_tolerance : float, default 0.1
        Growth stops when throughput falls this fraction below the best seen at a smaller size.
    clock : callable, default time.monotonic
        Time source, only used to stamp ``state()["observed_at"]``.
    ladder : sequence of int, optional
        Bucket sizes the proposal must be one of (compiled models and the shape ladder,
        :mod:`dask_dynbatch.core.ladder`): a step moves to the next rung up or down instead of by
        ``b_delta``, and bounds (cap, ``max_size``) are rounded down to a rung.

    Examples
    --------
    >>> c = BatchSizeController(0.05, initial_size=4)
    >>> c.observe(4, latency=0.01, service_time=0.008)  # slow start: doubles
    8
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
        _check_arguments(latency_target, min_size, max_size, window, alpha, b_delta, throughput_tolerance)
        self._target = float(latency_target)
        self._window = int(window)
        self._alpha = float(alpha)
        self._clock = clock
        self._range = _SizeRange(int(min_size), None if max_size is None else int(max_size),
                                 None if b_delta is None else int(b_delta), _sorted_ladder(ladder))
        self._table = ThroughputTable(self._target, throughput_tolerance, forget_after=16 * self._window)
        self._size = self._range.bounded(int(initial_size))
        self._recent_sizes: deque[int] = deque([self._size], maxlen=self._window)
        self._history: deque[tuple[int, float]] = deque(maxlen=4 * self._window)  # (size, latency)
        self._observations = 0
        self._observed_at: float | None = None
        self._phases = _PhaseState(self._size, self._window, slow_start=b_delta is None)
        self._size_before_cap: int | None = None  # the size chosen before a memory cap squeezed it

        self._size_trend = mann_kendall(self._recent_sizes, alpha=self._alpha)
        self._latency_trend = mann_kendall([], alpha=self._alpha)
        self._decision = "hold"
        self._reason = "no batch observed yet"

    # ------------------------------------------------------------------ public interface
    @property
    def size(self) -> int:
        """Current proposal, within ``[min_size, min(cap, max_size)]`` (the cap wins; never < 1)."""
        return self._size

    @property
    def latency_target(self) -> float:
        """The latency target, seconds."""
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
        return self._range.cap

    @property
    def phase(self) -> Phase:
        """Where the controller is between its moves."""
        return self._phases.phase

    def throughput_at(self, size: int) -> float | None:
        """Average throughput (samples/s, or the ``work`` batches were observed with a second) of
        recent batches of about ``size`` (its size bin), None if unknown."""
        return self._table.throughput_at(size)

    def observe(self, size: int, latency: float, service_time: float, proposed: int | None = None,
                full: bool | None = None, work: float | None = None) -> int:
        """Learn from one finished batch and return the next proposal.

        Parameters
        ----------
        size : int
            Number of samples that actually ran (may be below the proposal when the queue was short).
        latency : float
            Seconds its requests experienced: batch formation wait + round trip.
        service_time : float
            Seconds the worker was busy with it; ``size / service_time`` (or ``work / service_time``)
            is its throughput.  A value <= 0 or not finite is ignored for throughput.
        proposed : int, optional
            The proposal in force when the batch was formed (default: the current one).  With
            several batches in flight, results arrive for batches formed under earlier proposals:
            a batch is *short* only when it is smaller than the proposal it was formed under, and a
            full batch formed before the last change says nothing about the current proposal.
        full : bool, optional
            Whether the batch was as large as its proposal allowed, where its size cannot say so:
            a batch weighed in cost units stops at the last whole row that fits, short of the
            proposal however long the queue. Default: it is full when ``size`` reaches the proposal.
        work : float, optional
            What the batch did that counts, where its size also counts waste: a batch of padded
            samples is sized in padded elements, and its throughput is its real ones per second (a
            larger batch pads more: by its size alone, it would look faster). Default: ``size``.

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
        self._history.append((size, latency))
        self._table.record(size, latency, float(service_time), work)

        proposal = self._size
        self._size_trend = mann_kendall(self._recent_sizes, alpha=self._alpha)
        self._latency_trend = mann_kendall(self._latency_residuals(), alpha=self._alpha)
        formed_under = proposal if proposed is None else int(proposed)
        self._apply(proposal, self._decide(size, latency, proposal, formed_under, full))
        return self._size

    def set_cap(self, cap: int | None) -> None:
        """Bound the proposal by a memory cap (None: no cap).  Takes effect immediately.

        Calling it again with the same cap (e.g. before every batch) changes nothing.  A cap below
        the proposal lowers it at once; a cap that held the proposal down and then lifts lets growth
        resume at the next batch under target, without waiting for ``patience``, from the size
        chosen before the cap squeezed it (within the new cap).
        """
        if cap is not None:
            cap = max(1, int(cap))
        if cap == self._range.cap:
            return
        was_binding = self._range.cap is not None and self._range.cap <= self._size
        self._range.cap = cap
        bounded = self._range.bounded(self._size)
        if bounded < self._size:
            self._squeeze(cap, bounded)
        elif was_binding and (cap is None or cap > self._size):
            self._lift(cap)

    def state(self) -> dict[str, Any]:
        """JSON-able snapshot for ``stats()`` and the dashboard.

        Returns
        -------
        dict
            ``size``, ``target``, ``cap``, ``min_size``, ``max_size``, ``latencies`` (recent,
            seconds), ``sizes`` (recent proposals), ``z``, ``p``, ``s``, ``trend`` (of the sizes),
            ``latency_trend`` (z, p and trend of the latency residuals), ``decision`` (``"grow"``,
            ``"shrink"`` or ``"hold"``), ``reason``, ``best_size``, ``best_throughput`` (its
            average), ``best_throughput_bound`` (what the rules compare with: the average less what
            luck may have added), ``throughput_noise`` (one batch's relative standard deviation, or
            None until measured), ``throughput`` (``{size bin: samples/s}``, bins not seen for
            ``16 * window`` batches included), ``phase``
            (:class:`Phase` value), ``patience``, ``slow_start``, ``ladder`` (bucket sizes, or None),
            ``observations`` and ``observed_at`` (clock reading of the last observation, or None).
        """
        sizes, residuals = self._size_trend, self._latency_trend
        return {
            "size": self._size,
            "target": self._target,
            "cap": self._range.cap,
            "min_size": self._range.min_size,
            "max_size": self._range.max_size,
            "latencies": [float(v) for v in self._recent_latencies()],
            "sizes": [int(v) for v in self._recent_sizes],
            "z": float(sizes.z),
            "p": float(sizes.p),
            "s": float(sizes.s),
            "trend": sizes.trend,
            "latency_trend": {"z": float(residuals.z), "p": float(residuals.p), "trend": residuals.trend},
            "decision": self._decision,
            "reason": self._reason,
            **self._table.state(),
            "phase": self._phases.phase.value,
            "patience": self._phases.patience,
            "slow_start": self._phases.slow_start,
            "ladder": list(self._range.ladder) if self._range.ladder is not None else None,
            "observations": self._observations,
            "observed_at": self._observed_at,
        }

    def __repr__(self) -> str:
        return (
            f"<BatchSizeController size={self._size} target={self._target:.4g}s cap={self._range.cap} "
            f"decision={self._decision!r}>"
        )

    # ------------------------------------------------------------------ rules
    def _decide(self, size: int, latency: float, proposal: int, formed_under: int, full: bool | None) -> _Decision:
        if latency > self._target:
            return self._on_late_batch(size, latency, proposal)
        if not full and size < min(formed_under, proposal):
            reason = f"batch ran short ({size} of {formed_under}): no evidence about {proposal}, hold"
            return _Decision(proposal, "hold", reason, "neutral")
        if formed_under < proposal:
            reason = f"batch of {size} was formed before the proposal grew to {proposal}: wait for its evidence"
            return _Decision(proposal, "hold", reason, "neutral")
        return self._on_target_met(size, latency, proposal)

    def _on_late_batch(self, size: int, latency: float, proposal: int) -> _Decision:
        """A late batch shrinks at once, whatever the trend: it is a failure users see."""
        late = f"latency {latency:.4g}s > target {self._target:.4g}s"
        if size > proposal:  # formed before the last shrink: the proposal is already below it
            reason = f"{late} for a batch of {size} formed before the last shrink; already at {proposal}"
            return _Decision(proposal, "hold", reason, "neutral")
        if proposal <= self._range.lower():
            return _Decision(proposal, "hold", f"{late} but already at the smallest size {proposal}")
        new_size = self._range.down(proposal)
        if self._phases.just_grew:  # undo that step: the size before it met the target
            new_size = max(new_size, self._phases.last_growth_from)
        new_size = self._range.bounded(new_size)
        reason = f"{late}: shrink {proposal} -> {new_size} (a late batch overrides the trend gate)"
        return _Decision(new_size, "shrink", reason)

    def _on_target_met(self, size: int, latency: float, proposal: int) -> _Decision:
        """A full batch under target: the first of the rules below that applies decides."""
        met = f"latency {latency:.4g}s <= target {self._target:.4g}s"
        best = self._table.best()
        settle = self._throughput_rule(size, proposal, best, met)
        if settle is not None:
            return settle
        if proposal >= self._range.top():
            cap = self._range.cap
            bound = "memory cap" if cap is not None and cap == self._range.upper() else "max_size"
            return _Decision(proposal, "hold", f"{met}, but at the {bound} ({proposal})", "at_bound")
        grown = self._range.bounded(self._range.up(proposal, doubling=self._phases.slow_start))
        held_back = self._known_fall_rule(proposal, grown, best, met)
        if held_back is not None:
            return held_back
        if self._phases.phase is Phase.HOLD:
            return self._probe_rule(proposal, grown, met)
        return self._growth_run_rule(proposal, grown, met)

    def _throughput_rule(self, size: int, proposal: int, best: BestSize, met: str) -> _Decision | None:
        """Two full batches in a row below the best settle back at the best size; the first one
        ends slow start.  None when the rule does not apply."""
        below = self._table.below_best(size, best)
        fall = self._table.confirm_fall(size, below)  # one slow batch may be a busy neighbour: need two
        tolerance = self._table.tolerance
        current = self._table.throughput_at(size)
        if below and fall is None and self._phases.slow_start:
            # doubling again before a second batch could confirm the fall would overshoot twice as far
            self._phases.slow_start = False
            reason = (f"{met}, but throughput at {size} ({current:.4g}/s) fell more than "
                      f"{tolerance:.0%} below the best ({best.bound:.4g}/s at {best.size}): "
                      "slow start ends, hold")
            return _Decision(proposal, "hold", reason)
        if fall is None:
            return None
        self._phases.slow_start = False
        self._table.remember_fall(fall, best.size)
        new_size = self._range.bounded(min(best.size, proposal))
        reason = (
            f"throughput at {size} ({current:.4g}/s) is more than {tolerance:.0%} "
            f"below the best, {best.bound:.4g}/s at {best.size}: settle at {new_size}"
        )
        return _Decision(new_size, "shrink" if new_size < proposal else "hold", reason)

    def _known_fall_rule(self, proposal: int, grown: int, best: BestSize, met: str) -> _Decision | None:
        """No growth to a size where throughput fell not long ago, while the fall holds: back to the
        best size, as when the fall was found, rather than park between the two."""
        fall = self._table.fall_in_force(best.size)
        if fall is None or grown < fall:
            return None
        new_size = self._range.bounded(min(best.size, proposal))
        reason = (f"{met}, but throughput fell at {fall} within the last {self._table.forget_after} batches: "
                  + (f"back to the best, {best.size}" if new_size < proposal else "hold"))
        return _Decision(new_size, "shrink" if new_size < proposal else "hold", reason)

    def _growth_run_rule(self, proposal: int, grown: int, met: str) -> _Decision:
        """A growth run goes on for its first steps untested, then while the size trend agrees."""
        steps = self._phases.run_steps
        if steps < _UNCONFIRMED_RUN_STEPS:
            reason = f"{met}: grow {proposal} -> {grown} (run step {steps + 1}, too early to test)"
            return _Decision(grown, "grow", reason)
        trend = f"size trend z={self._size_trend.z:.2f} p={self._size_trend.p:.2g}"
        if self._size_trend.trend == "increasing":
            return _Decision(grown, "grow", f"{met}: grow {proposal} -> {grown}, {trend} agrees")
        return _Decision(proposal, "hold", f"{met}, but {trend} no longer confirms growth: hold")

    def _probe_rule(self, proposal: int, grown: int, met: str) -> _Decision:
        """From rest, probe upwards after ``patience`` batches under target, once the sizes no
        longer trend down and latency does not creep up at this size."""
        holds = self._phases.holds_under_target
        wait = self._phases.patience - holds - 1
        if wait > 0:
            return _Decision(proposal, "hold", f"{met}: hold, probe upward after {wait} more batches under target")
        trend = f"size trend z={self._size_trend.z:.2f} p={self._size_trend.p:.2g}"
        if self._size_trend.trend == "decreasing":
            return _Decision(proposal, "hold", f"{met}, but {trend} is still decreasing: hold")
        residuals = self._latency_trend
        if residuals.trend == "increasing":
            reason = (
                f"{met}, but latency is creeping up at this size "
                f"(residual trend z={residuals.z:.2f} p={residuals.p:.2g}): hold"
            )
            return _Decision(proposal, "hold", reason)
        reason = f"{met} for {holds + 1} batches: probe {proposal} -> {grown}"
        return _Decision(grown, "grow", reason, "probe")

    # ------------------------------------------------------------------ phase transitions
    def _apply(self, proposal: int, decision: _Decision) -> None:
        """Adopt ``decision`` and move to the phase it leads to."""
        self._decision, self._reason = decision.decision, decision.reason
        if decision.effect == "neutral":  # a batch that says nothing about the proposal changes nothing
            return
        if decision.size == proposal:
            under_target = bool(self._history) and self._history[-1][1] <= self._target
            self._phases.held(proposal, decision.effect == "at_bound", under_target)
        elif decision.size > proposal:
            self._phases.grew(proposal, probe=decision.effect == "probe")
        else:
            self._phases.shrank(decision.size)
        self._size = decision.size
        self._recent_sizes.append(decision.size)

    def _squeeze(self, cap: int, bounded: int) -> None:
        """The cap lowered the size: an outside clamp, no trend of ours, so restart the window."""
        self._reason = f"memory cap {cap} lowered the size from {self._size} to {bounded}"
        self._size_before_cap = max(self._size, self._size_before_cap or 0)
        self._size = bounded
        self._recent_sizes = deque([bounded], maxlen=self._window)
        self._phases.squeezed()

    def _lift(self, cap: int | None) -> None:
        """The cap that held the size down lifted: return to the size chosen before the squeeze
        (within the new cap) rather than climb back step by step."""
        self._phases.restart_growth_run(reset_patience=True)
        before = self._size_before_cap
        if before is None or before <= self._size:
            return
        restored = self._range.bounded(before)
        self._reason = f"memory cap lifted to {cap}: back from {self._size} to {restored}"
        self._size = restored
        self._recent_sizes = deque([restored], maxlen=self._window)
        if cap is None or cap >= before:
            self._size_before_cap = None

    # ------------------------------------------------------------------ latency history
    def _recent_latencies(self) -> list[float]:
        return [latency for _, latency in self._history][-self._window:]

    def _latency_residuals(self) -> list[float]:
        """The last ``window`` latencies less ``slope * size``, with the Theil-Sen slope of latency on
        size over the whole history: what is left of latency once the controller's own sizes are
        taken out."""
        ran = [s for s, _ in self._history]
        if min(ran) == max(ran):  # one size throughout: the slope is 0
            return self._recent_latencies()
        sizes = np.array(ran, dtype=float)
        latencies = np.array([v for _, v in self._history], dtype=float)
        slope = theil_sen_slope(sizes, latencies)
        recent = slice(max(0, len(sizes) - self._window), len(sizes))
        return list(latencies[recent] - slope * sizes[recent])


def _check_arguments(latency_target: float, min_size: int, max_size: int | None, window: int, alpha: float,
                     b_delta: int | None, throughput_tolerance: float) -> None:
    if not (isinstance(latency_target, (int, float)) and math.isfinite(latency_target) and latency_target > 0):
        raise ValueError(f"latency_target must be a finite number of seconds > 0, got {latency_target!r}")
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


def _sorted_ladder(ladder: Iterable[int] | None) -> tuple[int, ...] | None:
    if ladder is None:
        return None
    rungs = tuple(sorted({int(r) for r in ladder}))
    if not rungs or rungs[0] < 1:
        raise ValueError(f"ladder must hold positive sizes, got {ladder!r}")
    return rungs
