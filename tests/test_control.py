"""Tests of dask_dynbatch.core.controller: the Mann-Kendall test and the batch-size controller.

The controller is driven by deterministic fakes (seeded NumPy generators, no clock, no Dask):
latency = a + b * size + noise for the latency-limited cases, and a service time
1 ms + 0.1 ms * size + size**2 / 64 ms, whose throughput peaks at size 8, for the interior-peak case.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from dask_dynbatch.core.controller import BatchSizeController, Phase
from dask_dynbatch.core.estimate import fine_bin
from dask_dynbatch.core.trend import MKResult, mann_kendall

# -------------------------------------------------------------------------------------------------
# Mann-Kendall
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "series, s, var_s, z",
    [
        # 10 increasing pairs; Var = 5*4*15/18; Z = (10 - 1) / sqrt(Var)
        ([1, 2, 3, 4, 5], 10.0, 300 / 18, 9 / math.sqrt(300 / 18)),
        # pairs: (1,2)+ (1,2)+ (1,3)+ (2,2)0 (2,3)+ (2,3)+ -> 5; one tie group of 2: (156 - 18) / 18
        ([1, 2, 2, 3], 5.0, 138 / 18, 4 / math.sqrt(138 / 18)),
        # (3,1)- (3,2)- (1,2)+ -> -1; continuity correction gives Z = 0
        ([3, 1, 2], -1.0, 66 / 18, 0.0),
        # 5 4 3 2 1 decreasing
        ([5, 4, 3, 2, 1], -10.0, 300 / 18, -9 / math.sqrt(300 / 18)),
    ],
)
def test_mann_kendall_hand_computed(series, s, var_s, z):
    result = mann_kendall(series)
    assert isinstance(result, MKResult)
    assert result.n == len(series)
    assert result.s == s
    assert result.var_s == pytest.approx(var_s)
    assert result.z == pytest.approx(z)
    assert result.p == pytest.approx(math.erfc(abs(z) / math.sqrt(2)))


def test_mann_kendall_trend_labels_and_small_n():
    assert mann_kendall([1, 2, 3, 4, 5]).trend == "increasing"  # p = 0.0275
    assert mann_kendall([5, 4, 3, 2, 1]).trend == "decreasing"
    # With no ties p < 0.05 is out of reach below n = 5: a perfect run of 4 gives p = 0.089.
    four = mann_kendall([1, 2, 3, 4])
    assert four.p == pytest.approx(0.0894, abs=1e-4)
    assert four.trend == "no trend"
    assert mann_kendall([1, 2, 3, 4], alpha=0.1).trend == "increasing"
    for degenerate in ([], [7.0], [2, 2, 2, 2]):
        result = mann_kendall(degenerate)
        assert (result.s, result.z, result.p, result.trend) == (0.0, 0.0, 1.0, "no trend")
    # NaNs are dropped
    assert mann_kendall([1, float("nan"), 2, 3, 4, 5]) == mann_kendall([1, 2, 3, 4, 5])
    with pytest.raises(ValueError):
        mann_kendall([1, 2, 3], alpha=1.5)


def _series_for_reference(seed: int, n: int, kind: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "continuous":
        return rng.normal(size=n) + 0.02 * np.arange(n) * rng.choice([-1, 0, 1])
    if kind == "ties":
        return np.round(rng.normal(size=n) * 2 + 0.05 * np.arange(n) * rng.choice([-1, 1]))
    # AR(1) with a weak trend: the case Hamed-Rao is for
    x = np.zeros(n)
    noise = rng.normal(size=n)
    for t in range(1, n):
        x[t] = 0.8 * x[t - 1] + noise[t]
    return x + 0.03 * np.arange(n)


@pytest.mark.parametrize("n", [3, 5, 8, 10, 20, 50, 200])
@pytest.mark.parametrize("kind", ["continuous", "ties", "ar1"])
def test_mann_kendall_matches_pymannkendall(n, kind):
    pymannkendall = pytest.importorskip("pymannkendall")
    for seed in range(5):
        x = _series_for_reference(seed, n, kind)
        ours = mann_kendall(x, alpha=0.05)
        ref = pymannkendall.original_test(x, alpha=0.05)
        assert ours.s == ref.s
        assert ours.var_s == pytest.approx(ref.var_s)
        assert ours.z == pytest.approx(ref.z, abs=1e-12)
        assert ours.p == pytest.approx(ref.p, abs=1e-12)
        assert ours.trend == ref.trend


# -------------------------------------------------------------------------------------------------
# Deterministic fakes and the plain additive baseline
# -------------------------------------------------------------------------------------------------


@dataclass
class LinearLatencyModel:
    """latency = base + per_sample * size + N(0, noise); service time = base + per_sample * size (+3 %)."""

    base_s: float = 0.010
    per_sample_s: float = 0.001
    noise_s: float = 0.0

    def run(self, size: int, rng: np.random.Generator) -> tuple[float, float]:
        mean = self.base_s + self.per_sample_s * size
        latency = max(1e-4, mean + self.noise_s * rng.standard_normal())
        service_time = mean * (1 + 0.03 * rng.standard_normal())
        return latency, service_time

    def throughput(self, size: int) -> float:
        return size / (self.base_s + self.per_sample_s * size)

    def largest_size_within(self, target: float) -> int:
        return math.floor((target - self.base_s) / self.per_sample_s + 1e-9)


@dataclass
class PeakedThroughputModel:
    """Service time 1 ms + 0.1 ms * size + size**2 / 64 ms (+5 % noise): throughput peaks at 8.

    Latency is the service time plus 1 ms, far below any target used with it.
    """

    def service_ms(self, size: float) -> float:
        return 1.0 + 0.1 * size + size * size / 64

    def throughput(self, size: float) -> float:
        return size / self.service_ms(size) * 1000

    def run(self, size: int, rng: np.random.Generator) -> tuple[float, float]:
        service_time = self.service_ms(size) * (1 + 0.05 * rng.standard_normal()) / 1000
        return service_time + 0.001, service_time


class CliffThroughputModel:
    """Throughput that rises slowly with size and halves from 500 rows on (+5 % noise), like the CPU
    case, whose activation buffer outgrows glibc's largest mmap threshold from 513 rows. Latency is the
    service time plus 1 ms, far below any target used with it."""

    cliff = 500

    def service_ms(self, size: float) -> float:
        return (2.0 + size / 14.0) * (2.0 if size >= self.cliff else 1.0)

    def throughput(self, size: float) -> float:
        return size / self.service_ms(size) * 1000

    def run(self, size: int, rng: np.random.Generator) -> tuple[float, float]:
        service_time = self.service_ms(size) * (1 + 0.05 * rng.standard_normal()) / 1000
        return service_time + 0.001, service_time


class PlainAdditiveController:
    """S401 alone: +b_delta under the target, -b_delta above it, no trend gate, same step rule."""

    def __init__(self, latency_target: float, *, initial_size: int = 1):
        self.target = latency_target
        self.size = initial_size

    def observe(self, size: int, latency: float, service_time: float) -> int:
        step = max(1, self.size // 8)
        self.size = self.size + step if latency <= self.target else max(1, self.size - step)
        return self.size


@dataclass
class Trace:
    proposals: np.ndarray  # proposal after each batch
    ran: np.ndarray  # size of each batch
    latencies: np.ndarray


def simulate(
    controller,
    model,
    batches: int,
    *,
    seed: int,
    queue_at: Callable[[int], int] | None = None,
    in_flight: int = 1,
) -> Trace:
    """Feed ``batches`` batches through ``controller``.

    ``queue_at(k)`` limits how many requests are waiting (a batch runs ``min(proposal, queue)``);
    with ``in_flight > 1`` each observation arrives ``in_flight - 1`` batches after the batch was
    formed, as with a pipelined client.
    """
    rng = np.random.default_rng(seed)
    proposals, ran, latencies = [], [], []
    formed: deque[int] = deque()
    for k in range(batches):
        size = controller.size if queue_at is None else min(controller.size, queue_at(k))
        formed.append(size)
        if len(formed) < in_flight:
            proposals.append(controller.size)
            continue
        size = formed.popleft()
        latency, service_time = model.run(size, rng)
        controller.observe(size, latency, service_time)
        proposals.append(controller.size)
        ran.append(size)
        latencies.append(latency)
    return Trace(np.array(proposals), np.array(ran), np.array(latencies))


def direction_changes(sizes: np.ndarray) -> int:
    """How often the size moved the other way from its previous move (holds are skipped)."""
    moves = np.sign(np.diff(sizes))
    moves = moves[moves != 0]
    return int(np.sum(moves[1:] != moves[:-1]))


# -------------------------------------------------------------------------------------------------
# Controller: latency-limited convergence, thrash, target changes
# -------------------------------------------------------------------------------------------------

TARGET = 0.11  # s; with LinearLatencyModel() the largest size meeting it is 100


def test_converges_without_noise_within_35_batches():
    model = LinearLatencyModel()
    best = model.largest_size_within(TARGET)
    assert best == 100
    trace = simulate(BatchSizeController(TARGET), model, 300, seed=0)
    first_near = int(np.argmax(trace.proposals >= 0.85 * best))
    assert first_near <= 35  # 1..8 in steps of 1, then +12.5 % per batch
    settled = trace.proposals[35:]
    assert settled.min() >= 0.85 * best
    # only short probes go past the boundary (each undone at once, and rarer as patience backs off)
    assert np.mean(settled > best) <= 0.05
    # then it sits one step below the boundary, probing one step up every 4 * window batches
    late = trace.proposals[150:]
    resting = int(np.median(late))
    assert 0.85 * best <= resting <= best
    assert set(late.tolist()) <= {resting, resting + resting // 8}
    assert np.mean(late != resting) <= 0.04  # one probe per ~33 batches


@pytest.mark.parametrize("noise_s", [0.005, 0.01, 0.02])  # 4.5 %, 9 % and 18 % of the target
def test_converges_with_noise(noise_s):
    model = LinearLatencyModel(noise_s=noise_s)
    best = model.largest_size_within(TARGET)
    for seed in range(3):
        trace = simulate(BatchSizeController(TARGET), model, 500, seed=seed)
        assert int(np.argmax(trace.proposals >= 0.8 * best)) <= 40
        settled = trace.proposals[50:]
        assert 0.65 * best <= np.median(settled) <= best
        assert np.percentile(settled, 5) >= 0.5 * best
        assert np.percentile(settled, 95) <= 1.15 * best


@pytest.mark.parametrize("noise_s", [0.005, 0.01, 0.02])
def test_trend_gate_halves_direction_changes_of_plain_additive(noise_s):
    model = LinearLatencyModel(noise_s=noise_s)
    for seed in range(3):
        gated = simulate(BatchSizeController(TARGET), model, 500, seed=seed)
        plain = simulate(PlainAdditiveController(TARGET), model, 500, seed=seed)
        assert direction_changes(gated.proposals) <= 0.5 * direction_changes(plain.proposals)
        # ... at (almost) the same throughput, with far fewer late batches
        gated_throughput = np.mean([model.throughput(s) for s in gated.ran[50:]])
        plain_throughput = np.mean([model.throughput(s) for s in plain.ran[50:]])
        assert gated_throughput >= 0.95 * plain_throughput
        assert np.mean(gated.latencies[50:] > TARGET) <= 0.5 * np.mean(plain.latencies[50:] > TARGET)


# -------------------------------------------------------------------------------------------------
# Throughput (S406)
# -------------------------------------------------------------------------------------------------


def test_interior_throughput_peak_found():
    model = PeakedThroughputModel()
    peak = model.throughput(8)
    assert model.throughput(64) < 0.35 * peak and model.throughput(16) < 0.9 * peak  # interior peak
    for seed in range(5):
        # every size meets a 1 s target: only throughput can stop the growth
        controller = BatchSizeController(1.0)
        trace = simulate(controller, model, 500, seed=seed)
        assert trace.latencies.max() < 1.0
        assert int(np.argmax(trace.proposals >= 6)) <= 10
        assert 6 <= np.median(trace.proposals[100:]) <= 12
        # slow start overshoots by at most one doubling past the sizes within tolerance (16), and
        # never goes looking near 64
        assert trace.proposals.max() <= 32
        efficiency = np.mean([model.throughput(s) for s in trace.ran[100:]]) / peak
        assert efficiency >= 0.9
        state = controller.state()
        assert 6 <= state["best_size"] <= 12
        assert state["best_throughput"] == pytest.approx(peak, rel=0.15)


def test_a_throughput_cliff_is_not_probed_again_while_it_is_known():
    model = CliffThroughputModel()
    assert model.throughput(499) > 1.9 * model.throughput(500)
    for seed in range(5):
        controller = BatchSizeController(1.0)  # every size meets the target: only throughput stops growth
        trace = simulate(controller, model, 600, seed=seed)
        late = trace.ran[100:]
        cliff = int(np.sum(late >= model.cliff))
        # a probe into the cliff costs two batches there, and the fall is remembered for 16 * 8 = 128
        # batches while it holds: here 8-17 such batches in 500 over seeds 0-7 and 97-98 % of the
        # best throughput (re-probing after every patience instead: 34-46 and 94-96 %)
        assert cliff <= 20, cliff
        # it still sits near the top of the good range: from 375 rows on, within 2 % of the best
        assert model.throughput(375) >= 0.98 * model.throughput(model.cliff - 1)
        assert np.median(late) >= 375
        efficiency = np.mean([model.throughput(s) for s in late]) / model.throughput(model.cliff - 1)
        assert efficiency >= 0.95


def test_best_size_must_meet_the_latency_target():
    # throughput rises with size but latency passes the target above 40: the best size is <= 40
    model = LinearLatencyModel(base_s=0.02, per_sample_s=0.002)
    controller = BatchSizeController(0.1)
    simulate(controller, model, 200, seed=1)
    state = controller.state()
    assert state["best_size"] <= 40
    # higher throughput was seen, but only at sizes whose latency misses the target
    better_but_late = [b for b, tp in state["throughput"].items() if tp > state["best_throughput"]]
    assert better_but_late
    assert all(model.base_s + model.per_sample_s * b > 0.1 for b in better_but_late)


# -------------------------------------------------------------------------------------------------
# Memory cap, bounds, short and stale batches
# -------------------------------------------------------------------------------------------------


def test_cap_always_respected_and_growth_resumes_when_lifted():
    rng = np.random.default_rng(7)
    model = LinearLatencyModel(noise_s=0.005)
    controller = BatchSizeController(TARGET)
    caps: list[int | None] = []
    for k in range(600):
        if k % 25 == 0:
            choices = [None, 3, 10, 40, 70, 200]
            cap = None if k >= 500 else choices[int(rng.integers(len(choices)))]
            controller.set_cap(cap)
            caps.append(cap)
            if cap is not None:
                assert controller.size <= cap  # at once, before any batch
        size = controller.size
        if caps[-1] is not None:
            assert size <= caps[-1]
        latency, service_time = model.run(size, rng)
        proposal = controller.observe(size, latency, service_time)
        assert proposal == controller.size
        if caps[-1] is not None:
            assert proposal <= caps[-1]
            assert controller.state()["cap"] == caps[-1]
    assert controller.state()["cap"] is None
    # lifted at batch 500: back near the latency-limited size within 100 batches
    assert controller.size >= 0.65 * model.largest_size_within(TARGET)


def test_cap_lift_resumes_growth_without_waiting():
    model = LinearLatencyModel()
    controller = BatchSizeController(TARGET)
    controller.set_cap(20)
    trace = simulate(controller, model, 60, seed=0)
    assert trace.proposals.max() == 20 and controller.size == 20
    assert "memory cap" in controller.state()["reason"]
    controller.set_cap(None)
    trace = simulate(controller, model, 20, seed=1)
    assert trace.proposals[0] > 20  # the first batch under target after the lift grows
    assert trace.proposals[-1] >= 80


def test_repeating_the_same_cap_before_every_batch_changes_nothing():
    # The client calls set_cap(current cap) before every observe.
    class CapEveryBatch(BatchSizeController):
        def observe(self, size, latency, service_time):
            self.set_cap(self.cap)
            return super().observe(size, latency, service_time)

    model = LinearLatencyModel(noise_s=0.005)
    plain = simulate(BatchSizeController(TARGET), model, 300, seed=4)
    repeated = simulate(CapEveryBatch(TARGET), model, 300, seed=4)
    np.testing.assert_array_equal(plain.proposals, repeated.proposals)
    capped = BatchSizeController(TARGET)
    capped.set_cap(500)  # a cap that never binds
    np.testing.assert_array_equal(simulate(capped, model, 300, seed=4).proposals, plain.proposals)


def test_bounds_min_max_and_cap_below_min():
    controller = BatchSizeController(1.0, initial_size=500, min_size=4, max_size=64)
    assert controller.size == 64
    trace = simulate(controller, LinearLatencyModel(base_s=0.001, per_sample_s=1e-6), 100, seed=0)
    assert trace.proposals.max() <= 64 and trace.proposals.min() >= 4
    assert "max_size" in controller.state()["reason"]
    slow = BatchSizeController(0.001, initial_size=8, min_size=4)
    simulate(slow, LinearLatencyModel(base_s=0.01), 50, seed=0)  # every batch late
    assert slow.size == 4
    slow.set_cap(2)  # memory beats min_size
    assert slow.size == 2
    slow.set_cap(0)  # a batch of one must still be possible
    assert slow.size == 1


def test_weighed_batch_stopped_by_its_budget_counts_as_full():
    # A batch in cost units stops at the last whole row that fits (here 9 rows of 100 tokens for a
    # budget of 950): told it was full, the controller grows from it; told nothing, it holds.
    grows = BatchSizeController(1.0, initial_size=950)
    assert grows.observe(900, 0.01, 0.01, proposed=950, full=True) > 950
    assert grows.decision == "grow"
    holds = BatchSizeController(1.0, initial_size=950)
    assert holds.observe(900, 0.01, 0.01, proposed=950) == 950
    assert "ran short" in holds.reason
    late = BatchSizeController(1.0, initial_size=950)
    assert late.observe(900, 2.0, 0.01, proposed=950, full=True) < 950  # late shrinks, full or not


def test_fixed_b_delta_steps():
    controller = BatchSizeController(1.0, initial_size=10, b_delta=5)
    assert controller.observe(10, 0.01, 0.01) == 15
    assert controller.observe(15, 0.01, 0.01) == 20
    assert controller.observe(20, 2.0, 0.01) == 15  # late right after a step: that step is undone
    assert controller.observe(15, 2.0, 0.01) == 10


def test_short_batches_do_not_drive_the_proposal():
    model = LinearLatencyModel()
    controller = BatchSizeController(TARGET)
    simulate(controller, model, 60, seed=0)
    settled = controller.size
    assert settled >= 80
    # The queue now holds only 5 requests: batches of 5, fast and with poor throughput.
    trace = simulate(controller, model, 100, seed=1, queue_at=lambda k: 5)
    assert set(trace.ran.tolist()) == {5}
    assert np.all(trace.proposals == settled)  # no growth from untested sizes, no "too large"
    state = controller.state()
    assert "ran short" in state["reason"]
    assert 5 in state["throughput"] and state["throughput"][5] < 0.5 * state["best_throughput"]
    assert state["best_size"] >= 80
    # The queue refills: carry on from the same proposal.
    trace = simulate(controller, model, 10, seed=2)
    assert trace.ran[0] == settled


def test_short_late_batch_shrinks_one_step_only():
    controller = BatchSizeController(0.1, initial_size=64)
    assert controller.observe(3, 0.5, 0.01) == 56  # one step of 64 // 8, not down to 3


def test_late_batch_formed_before_the_last_shrink_does_not_shrink_again():
    controller = BatchSizeController(0.1, initial_size=64)
    assert controller.observe(64, 0.2, 0.15) == 56
    assert controller.observe(64, 0.2, 0.15) == 56  # stale: it ran at 64, we already propose 56
    assert "before the last shrink" in controller.state()["reason"]
    assert controller.observe(56, 0.2, 0.15) == 49


def test_pipelined_observations_still_converge():
    model = LinearLatencyModel(noise_s=0.005)
    best = model.largest_size_within(TARGET)
    for in_flight in (2, 3):
        trace = simulate(BatchSizeController(TARGET), model, 500, seed=3, in_flight=in_flight)
        # each step waits for a batch of the new size: convergence takes ~in_flight times longer
        assert int(np.argmax(trace.proposals >= 0.8 * best)) <= 35 * in_flight
        assert 0.65 * best <= np.median(trace.proposals[150:]) <= best
        assert np.percentile(trace.proposals[150:], 95) <= 1.15 * best


# -------------------------------------------------------------------------------------------------
# Trend gate details
# -------------------------------------------------------------------------------------------------


def _shrink_then_hold(latencies: list[float]) -> BatchSizeController:
    """A controller that was just late at 48 (so it rests at 42) and then sees ``latencies`` at 42."""
    controller = BatchSizeController(0.1, initial_size=48)
    assert controller.observe(48, 0.11, 0.05) == 42
    for latency in latencies:
        controller.observe(42, latency, 0.05)
    return controller


def test_probe_after_patience_when_latency_is_steady():
    patience = 8 // 2
    held = _shrink_then_hold([0.06] * (patience - 1))
    assert held.size == 42 and held.state()["decision"] == "hold"
    assert "probe upward after 1 more" in held.state()["reason"]
    probed = _shrink_then_hold([0.06] * patience)
    assert probed.size == 47 and "probe 42 -> 47" in probed.state()["reason"]


def test_no_probe_while_latency_creeps_up_at_a_fixed_size():
    controller = _shrink_then_hold([0.06] * 4)  # probes 42 -> 47 ...
    assert controller.observe(47, 0.11, 0.05) == 42  # ... which is late: back to 42, patience 8
    assert controller.state()["patience"] == 8
    for latency in np.linspace(0.05, 0.095, 8):  # at 42, latency rises but stays under target
        controller.observe(42, float(latency), 0.05)
    state = controller.state()
    assert controller.size == 42
    assert state["latency_trend"]["trend"] == "increasing"
    assert "creeping up" in state["reason"]
    # once latency is steady again the probe goes ahead
    for _ in range(8):
        controller.observe(42, 0.07, 0.05)
        if controller.size > 42:
            break
    assert controller.size == 47


def test_failed_probes_back_off_and_success_resets():
    model = LinearLatencyModel()  # no noise: every probe past 100 fails the same way
    controller = BatchSizeController(TARGET)
    patience = []
    for _ in range(200):
        size = controller.size
        controller.observe(size, *model.run(size, np.random.default_rng(0)))
        patience.append(controller.state()["patience"])
    assert patience[0] == 4 and max(patience) == 32 == patience[-1]


def test_continuing_growth_needs_the_size_trend_after_three_steps():
    controller = BatchSizeController(1.0, initial_size=16)
    reasons = []
    for _ in range(6):
        size = controller.size
        controller.observe(size, 0.01, 0.01)
        reasons.append(controller.state()["reason"])
    assert all("too early to test" in r for r in reasons[:3])
    assert all("agrees" in r for r in reasons[3:])
    assert controller.state()["trend"] == "increasing"


# -------------------------------------------------------------------------------------------------
# state(), validation, helpers
# -------------------------------------------------------------------------------------------------


def test_state_is_json_and_complete():
    controller = BatchSizeController(TARGET, clock=lambda: 123.0)
    empty = controller.state()
    json.dumps(empty, allow_nan=False)
    assert empty["decision"] == "hold" and empty["best_size"] is None and empty["observed_at"] is None
    simulate(controller, LinearLatencyModel(noise_s=0.005), 120, seed=0)
    state = controller.state()
    text = json.dumps(state, allow_nan=False)
    assert json.loads(text)["size"] == controller.size
    for key in (
        "size", "target", "cap", "max_size", "latencies", "z", "p", "decision", "reason",
        "best_size", "best_throughput", "throughput",
    ):
        assert key in state
    assert state["decision"] in {"grow", "shrink", "hold"}
    assert len(state["latencies"]) == 8 and len(state["sizes"]) == 8
    assert all(isinstance(k, int) for k in state["throughput"])
    assert state["observed_at"] == 123.0
    assert isinstance(state["reason"], str) and state["reason"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"latency_target": 0},
        {"latency_target": float("nan")},
        {"latency_target": 0.1, "min_size": 0},
        {"latency_target": 0.1, "min_size": 8, "max_size": 4},
        {"latency_target": 0.1, "window": 4},
        {"latency_target": 0.1, "alpha": 0},
        {"latency_target": 0.1, "b_delta": 0},
        {"latency_target": 0.1, "throughput_tolerance": 1.0},
    ],
)
def test_invalid_arguments(kwargs):
    target = kwargs.pop("latency_target")
    with pytest.raises(ValueError):
        BatchSizeController(target, **kwargs)


def test_invalid_observations():
    controller = BatchSizeController(0.1)
    for size, latency in ((0, 0.01), (1, -0.01), (1, float("nan")), (1, float("inf"))):
        with pytest.raises(ValueError):
            controller.observe(size, latency, 0.01)
    # an unusable service time only skips the throughput sample
    assert controller.observe(1, 0.01, 0.0) == 2
    assert controller.state()["throughput"] == {}


def test_fine_bin():
    assert [fine_bin(s) for s in (1, 8, 16)] == [1, 8, 16]
    assert [fine_bin(s) for s in (32, 64, 128, 512)] == [32, 64, 128, 512]
    buckets = [fine_bin(s) for s in range(1, 2000)]
    assert buckets == sorted(buckets)
    assert all(abs(fine_bin(s) - s) / s <= 0.06 for s in range(17, 2000))


def test_size_returns_after_memory_squeeze():
    """A cap that squeezed the size down and then lifts gives the size chosen before it back."""
    from dask_dynbatch.core.controller import BatchSizeController

    c = BatchSizeController(1.0, initial_size=300)
    c.set_cap(1)
    assert c.size == 1
    c.set_cap(50)
    assert c.size == 50  # within the new cap
    c.set_cap(None)
    assert c.size == 300


def test_slow_start_doubles_until_the_first_late_batch():
    # best size within 100 ms: 980; additive steps of 1/8 from 8 would need ~40 batches to get there
    model = LinearLatencyModel(base_s=0.002, per_sample_s=0.0001)
    controller = BatchSizeController(0.1, initial_size=8)
    trace = simulate(controller, model, 60, seed=0)
    assert trace.proposals[:7].tolist() == [16, 32, 64, 128, 256, 512, 1024]
    assert trace.ran[7] == 1024 and trace.latencies[7] > 0.1  # 1024 was late: slow start ends, additive steps from there
    assert not controller.state()["slow_start"]
    assert 0.85 * 980 <= np.median(trace.proposals[10:]) <= 980
    # with three batches in flight each doubling waits for evidence about itself
    pipelined = simulate(BatchSizeController(0.1, initial_size=8), model, 60, seed=0, in_flight=3)
    assert int(np.argmax(pipelined.proposals >= 512)) <= 20


def test_slow_start_on_a_ladder():
    ladder = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)
    controller = BatchSizeController(1.0, initial_size=8, ladder=ladder)
    sizes = [controller.observe(controller.size, 0.01, 0.01) for _ in range(4)]
    assert sizes == [16, 32, 64, 128]  # the smallest rung at least twice the size
    controller.observe(128, 2.0, 0.5)  # late: slow start ends, one rung down
    assert controller.size == 112 and not controller.state()["slow_start"]


def test_a_bucket_averages_its_first_batches_plainly():
    controller = BatchSizeController(1.0, initial_size=32, b_delta=1)
    for service in (0.016, 0.032, 0.016, 0.032):  # 2,000 and 1,000 samples/s, alternately
        controller.observe(32, 0.05, service)
    # a plain mean (1,500/s), not an EWMA that gives the first batch three quarters after two
    assert controller.state()["throughput"][32] == pytest.approx(1500)


def test_a_fall_measured_against_a_lucky_best_is_forgotten():
    """What a recorded CPU run showed (max_batch_size=64): one lucky batch made 38 rows look best
    (11,480/s), two ordinary batches at 64 (10,300/s) then confirmed a "fall" there, and the fall
    kept the size at 38-47 for 128 batches. Settled at 38, the controller measures it again
    (10,400/s): the fall no longer holds, so it is forgotten and the size returns to 64."""
    controller = BatchSizeController(1.0, initial_size=64, max_size=64)  # latency is never the limit
    controller.observe(38, 0.01, 38 / 11_480, proposed=64)  # a short batch, and a lucky one
    for _ in range(2):
        controller.observe(64, 0.01, 64 / 10_300)
    assert controller.size == 38 and "settle at 38" in controller.reason
    ran = []
    for _ in range(60):
        size = controller.size
        ran.append(size)
        controller.observe(size, 0.01, size / (10_400 if size < 64 else 10_300))
    assert 64 in ran  # back within 60 batches, not after the 128 a real fall is remembered for
    assert ran[-10:] == [64] * 10


def test_a_real_fall_survives_remeasuring_the_best():
    """The same situation with a real cliff: the best size measured again stays better by far, so the
    fall is kept and the controller does not probe into it again for 128 batches."""

    def rate(size: int) -> float:
        return 4_000.0 if size >= 32 else 8_000.0 + 50.0 * size

    controller = BatchSizeController(1.0, initial_size=16, max_size=64)
    ran, reasons = [], []
    for _ in range(140):
        size = controller.size
        ran.append(size)
        controller.observe(size, 0.01, size / rate(size))
        reasons.append(controller.reason)
    settled = next(i for i, r in enumerate(reasons) if "settle at" in r)
    assert settled < 20
    assert all(size < 32 for size in ran[settled + 1 : settled + 100])
    assert any("throughput fell at" in r for r in reasons[settled + 1 :])  # held back by the memory


def test_one_lucky_batch_does_not_make_the_best_size():
    """The best size is chosen by its throughput less what luck may have added to a thin average,
    so a size seen once must beat a well-measured one by more than the noise. Numbers as in a
    recorded CPU run: batches of 64 vary by ~15 % around 10,000/s, one short batch of 38 ran at
    11,500/s."""
    controller = BatchSizeController(1.0, initial_size=64, max_size=64)
    for k in range(20):
        controller.observe(64, 0.01, 64 / (8_500 if k % 2 else 11_500))
    controller.observe(38, 0.01, 38 / 11_500, proposed=64)  # a short batch, and a lucky one
    state = controller.state()
    assert 0.1 <= state["throughput_noise"] <= 0.25
    assert state["throughput"][38] > state["throughput"][64]  # on averages alone 38 would be best
    assert state["best_size"] == 64
    assert state["best_throughput_bound"] == state["best_throughput"]  # well measured: no discount
    for _ in range(2):  # two ordinary batches of 64 are no "fall" below the lucky 38
        controller.observe(64, 0.01, 64 / 9_000)
    assert controller.size == 64 and "settle" not in controller.reason


def test_a_fall_below_a_well_measured_best_counts_as_before():
    """Noise discounts only a thin average: a size measured for long is compared by its average,
    so a real fall of 20 % below it is seen on two batches even with 15 % noise."""
    controller = BatchSizeController(1.0, initial_size=256, max_size=512, b_delta=256)
    for k in range(12):
        controller.observe(256, 0.01, 256 / (10_000 * (1.15 if k % 2 else 0.85)))
    assert controller.state()["throughput_noise"] >= 0.1
    while controller.size == 256:  # patience, then a probe to 512
        controller.observe(256, 0.01, 256 / 10_000)
    for _ in range(2):
        controller.observe(512, 0.01, 512 / 7_800)
    assert controller.size == 256 and "settle at 256" in controller.reason


def test_phase_follows_the_moves():
    controller = BatchSizeController(0.1, initial_size=48)
    assert controller.phase is Phase.CLIMB and controller.state()["phase"] == "climb"
    assert controller.observe(48, 0.11, 0.05) == 42  # late: shrink, then rest
    assert controller.phase is Phase.HOLD
    for _ in range(4):  # patience 4 under target: probe
        controller.observe(42, 0.06, 0.05)
    assert controller.size == 47 and controller.phase is Phase.PROBE
    assert controller.observe(47, 0.11, 0.05) == 42  # the probe was late: rest, patience doubled
    assert controller.phase is Phase.HOLD and controller.state()["patience"] == 8
    controller.set_cap(20)  # a memory squeeze is no trend of ours: a fresh growth run once it lifts
    assert controller.phase is Phase.CLIMB and controller.state()["phase"] == "climb"


def test_throughput_at_reads_the_size_bin():
    controller = BatchSizeController(1.0, initial_size=64, b_delta=1)
    assert controller.throughput_at(64) is None
    for service in (0.032, 0.064):  # 2,000 and 1,000 samples/s
        controller.observe(64, 0.05, service)
    assert controller.throughput_at(64) == pytest.approx(1500)
    assert controller.throughput_at(63) == controller.throughput_at(64) == controller.state()["throughput"][64]
    assert controller.throughput_at(32) is None


def test_a_probe_that_advanced_resets_patience():
    controller = _shrink_then_hold([0.06] * 4)  # probes 42 -> 47 ...
    assert controller.observe(47, 0.11, 0.05) == 42  # ... which fails: patience 8
    for _ in range(8):
        controller.observe(42, 0.06, 0.05)
    assert controller.size == 47 and controller.phase is Phase.PROBE  # probes again, and this time
    assert controller.observe(47, 0.06, 0.05) == 52  # 47 is on time: the run goes on
    assert controller.observe(52, 0.11, 0.05) == 47  # late: back to 47, above where the probe began
    assert controller.phase is Phase.HOLD and controller.state()["patience"] == 4


# -- several models on one device ------------------------------------------------------------------
def test_device_turns_count_a_batch_from_the_devices_previous_batch_end():
    from dask_dynbatch.core.service import DeviceTurns

    turns = DeviceTurns()
    assert turns.service_time(first_arrival=1.0, done=1.5, compute_s=0.4) == pytest.approx(0.5)  # idle device: from arrival
    # rows that arrived while another model's batch ran: from that batch's end, not their arrival
    assert turns.service_time(first_arrival=1.2, done=1.7, compute_s=0.2) == pytest.approx(0.2)
    # rows that arrived after the device went idle: from their arrival
    assert turns.service_time(first_arrival=2.0, done=2.1, compute_s=0.05) == pytest.approx(0.1)
    # never less than the batch's own device time (copies that overlapped the previous batch)
    assert turns.service_time(first_arrival=1.9, done=2.15, compute_s=0.08) == pytest.approx(0.08)
    # something else held the device (a model's load): rows that waited for it were queueing
    turns.occupied_until(3.0)
    assert turns.service_time(first_arrival=2.5, done=3.2, compute_s=0.1) == pytest.approx(0.2)


def _flood_models_on_one_device(models: int, batches: int, shared: bool) -> list[int]:
    """``models`` backlogged models taking turns on one device (4 ms + 50 us a row a batch), each with
    its own controller; their batch times counted from the device's previous batch end (``shared``)
    or from their own model's (one DeviceTurns each). Returns each controller's final size."""
    from dask_dynbatch.core.service import DeviceTurns

    controllers = [BatchSizeController(0.1, initial_size=16, max_size=8192) for _ in range(models)]
    device = DeviceTurns()
    turns = [device if shared else DeviceTurns() for _ in range(models)]
    now = 0.0
    for k in range(batches):
        m = k % models
        size = controllers[m].size
        compute = 0.004 + 50e-6 * size
        now += compute
        service = turns[m].service_time(first_arrival=0.0, done=now, compute_s=compute)  # all rows queued from the start
        controllers[m].observe(size, service, service)
    return [c.size for c in controllers]


def test_models_sharing_a_device_each_size_as_if_alone():
    """Three backlogged models on one device: a batch's time does not include the other models'
    batches before it (they are queueing, as its own model's earlier batches are), so each
    controller ends where one model alone does; counted from each model's own previous batch,
    they shrink until three batches together fit the target, some far below the others."""
    alone = _flood_models_on_one_device(1, 300, shared=True)[0]
    assert alone > 1000  # 4 ms + 50 us a row within 100 ms: up to 1,920 rows
    assert _flood_models_on_one_device(3, 900, shared=True) == [alone] * 3
    separate = _flood_models_on_one_device(3, 900, shared=False)
    assert sum(separate) < 3 * alone / 2 and min(separate) < alone / 4
