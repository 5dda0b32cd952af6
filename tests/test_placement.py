"""Tests for dask_dynbatch.core.placement: the workload figure and plan().

The simulations below use a fake clock: an event loop of completions, no real time.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field

import pytest

from dask_dynbatch.core.placement import (
    WorkerLoad,
    WorkloadWeights,
    common_finish_time,
    effective_throughput,
    fill_unknown_throughputs,
    hardware_slowdown,
    plan,
    water_filling_shares,
    workload,
)


def ideal_makespan(n: int, throughputs) -> float:
    """Makespan of the ideal (fractional) split of ``n`` samples: ``n / sum(r)``."""
    return n / sum(throughputs)

# ----------------------------------------------------------------------------------------------
# A deterministic event-loop simulation of a batcher driving plan()
# ----------------------------------------------------------------------------------------------


@dataclass
class SimWorker:
    """A simulated worker: one device that runs batches one after another."""

    address: str
    true_rate: float  # samples/s
    batch_size: int = 32
    slots: int = 1
    per_batch_overhead_s: float = 0.0
    memory_utilization: float = 0.0
    cap: int | None = None
    known_rate: float | None = None  # what placement is told before anything is measured
    learn: bool = True  # replace known_rate with measured samples/s after each batch
    # state
    busy_slots: int = 0
    inflight: int = 0
    device_free_at: float = 0.0
    served: int = 0
    batches: int = 0
    last_finish: float = 0.0
    batch_sizes_seen: list[int] = field(default_factory=list)

    def load(self) -> WorkerLoad:
        return WorkerLoad(
            address=self.address,
            throughput=self.known_rate,
            inflight_samples=self.inflight,
            memory_utilization=self.memory_utilization,
            cap=self.cap,
            free_slots=self.slots - self.busy_slots,
            batch_size=self.batch_size,
        )


@dataclass
class SimResult:
    makespan: float
    served: dict[str, int]
    workers: dict[str, SimWorker]


def simulate(
    workers: list[SimWorker],
    requests: int,
    *,
    weights: WorkloadWeights | None = None,
    arrival_rate: float | None = None,
    tick_s: float = 0.002,
) -> SimResult:
    """Serve ``requests`` samples with repeated plan() calls on a fake clock.

    With ``arrival_rate`` None all requests are queued at t=0; otherwise they arrive at that
    rate (requests/s), in chunks every ``tick_s``, and plan() also runs at every tick.
    """
    by_address = {w.address: w for w in workers}
    arrived = requests if arrival_rate is None else 0
    backlog = arrived
    now = 0.0
    completions: list[tuple[float, int, str, int, float]] = []
    sequence = 0
    next_tick = 0.0 if arrival_rate is not None else math.inf
    rounds = 0
    while arrived < requests or backlog > 0 or completions:
        rounds += 1
        assert rounds < 1_000_000, "simulation does not terminate"
        if backlog > 0:
            decisions = plan(backlog, [w.load() for w in workers], weights=weights)
            for address, size in decisions:
                w = by_address[address]
                assert 1 <= size <= backlog
                assert w.busy_slots < w.slots, "plan exceeded free slots"
                backlog -= size
                service = w.per_batch_overhead_s + size / w.true_rate
                start = max(now, w.device_free_at)
                finish = start + service
                w.device_free_at = finish
                w.busy_slots += 1
                w.inflight += size
                w.batch_sizes_seen.append(size)
                heapq.heappush(completions, (finish, sequence, address, size, service))
                sequence += 1
        next_completion = completions[0][0] if completions else math.inf
        if arrived < requests and next_tick <= next_completion:
            now = next_tick
            due = min(requests, int(math.floor(arrival_rate * (now + tick_s) + 1e-9)))
            backlog += due - arrived
            arrived = due
            next_tick = now + tick_s
            continue
        if not completions:
            assert backlog == 0, "backlog left but nothing in flight: plan() stalled"
            break
        now, _, address, size, service = heapq.heappop(completions)
        w = by_address[address]
        w.busy_slots -= 1
        w.inflight -= size
        w.served += size
        w.batches += 1
        w.last_finish = now
        if w.learn:
            w.known_rate = size / service
    return SimResult(now, {w.address: w.served for w in workers}, by_address)


# ----------------------------------------------------------------------------------------------
# Heterogeneous split: two workers, 3x apart, 10,000 requests
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch_size, slots, overhead, start_known",
    [
        (32, 1, 0.0, True),
        (32, 2, 0.0, True),
        (64, 1, 0.002, True),
        (16, 2, 0.001, False),  # throughputs learned from the first batches
        (128, 1, 0.0, False),
    ],
)
def test_two_workers_3x_share_and_makespan(batch_size, slots, overhead, start_known):
    fast_rate, slow_rate = 3000.0, 1000.0
    fast = SimWorker("fast", fast_rate, batch_size, slots, overhead, known_rate=fast_rate if start_known else None)
    slow = SimWorker("slow", slow_rate, batch_size, slots, overhead, known_rate=slow_rate if start_known else None)
    requests = 10_000
    result = simulate([fast, slow], requests)

    assert sum(result.served.values()) == requests
    # Throughput share as the batcher sees it (with per-batch overhead included).
    fast_eff = batch_size / (overhead + batch_size / fast_rate)
    slow_eff = batch_size / (overhead + batch_size / slow_rate)
    for address, rate in (("fast", fast_eff), ("slow", slow_eff)):
        expected_share = rate / (fast_eff + slow_eff)
        share = result.served[address] / requests
        assert abs(share - expected_share) <= 0.15 * expected_share, (address, share, expected_share)
    ideal = ideal_makespan(requests, [fast_eff, slow_eff])
    assert result.makespan <= 1.15 * ideal, (result.makespan, ideal)
    # Both finish close together.
    assert abs(fast.last_finish - slow.last_finish) <= 0.15 * ideal


def test_three_to_one_with_tight_caps():
    fast = SimWorker("fast", 3000.0, batch_size=64, cap=8, known_rate=3000.0)
    slow = SimWorker("slow", 1000.0, batch_size=64, known_rate=1000.0)
    result = simulate([fast, slow], 10_000)
    assert max(fast.batch_sizes_seen) <= 8
    assert max(slow.batch_sizes_seen) <= 64
    share_fast = result.served["fast"] / 10_000
    assert abs(share_fast - 0.75) <= 0.15 * 0.75
    assert result.makespan <= 1.15 * ideal_makespan(10_000, [3000.0, 1000.0])


# ----------------------------------------------------------------------------------------------
# Hardware state
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("slots", [1, 2])
def test_memory_nearly_full_receives_less_work(slots):
    # Two equally fast workers serving a stream at 70 % of their joint capacity; one reports
    # its memory nearly full.  Placement is told the measured throughput (equal for both).
    calm = SimWorker("calm", 1000.0, 32, slots, known_rate=1000.0)
    full = SimWorker("full", 1000.0, 32, slots, known_rate=1000.0, memory_utilization=0.97)
    result = simulate([calm, full], 10_000, arrival_rate=1400.0)
    assert sum(result.served.values()) == 10_000
    assert result.served["full"] < 0.4 * 10_000
    assert result.served["full"] > 0  # penalised, not excluded


def test_memory_nearly_full_backlog_at_once():
    # All requests queued at once: both are kept busy (the pull model gives a free worker
    # work while any is left), and the pressured worker gets less of the final split.
    calm = SimWorker("calm", 1000.0, 32, known_rate=1000.0, learn=False)
    full = SimWorker("full", 1000.0, 32, known_rate=1000.0, learn=False, memory_utilization=0.97)
    result = simulate([calm, full], 10_000)
    assert result.served["full"] < result.served["calm"]


def test_memory_pressure_in_single_plan():
    workers = [
        WorkerLoad("a", 100.0, memory_utilization=0.2, batch_size=1000),
        WorkerLoad("b", 100.0, memory_utilization=0.99, batch_size=1000),
    ]
    sizes = dict(plan(100, workers))
    assert sizes["a"] > sizes["b"]
    assert plan(100, workers)[0][0] == "a"  # least workload first


def test_workload_formula_and_weights():
    w = WorkerLoad("a", 100.0, inflight_samples=50, batch_size=50)
    assert workload(w) == pytest.approx(1.0)
    # Memory below threshold: no penalty; at 0.9 with threshold 0.8: 1 + 4 * 0.5 = 3.
    w.memory_utilization = 0.5
    assert workload(w) == pytest.approx(1.0)
    w.memory_utilization = 0.9
    assert hardware_slowdown(w) == pytest.approx(3.0)
    assert workload(w) == pytest.approx(3.0)
    custom = WorkloadWeights(memory_weight=1.0, memory_threshold=0.5)
    assert workload(w, custom) == pytest.approx(1.0 * (1 + 0.4 / 0.5))
    # The cap bounds the batch counted in the figure.
    w2 = WorkerLoad("b", 10.0, batch_size=100, cap=10)
    assert workload(w2) == pytest.approx(1.0)
    assert workload(WorkerLoad("c", 10.0, cap=0)) == math.inf
    # Unknown throughput: fallback, else the default from the weights.
    unknown = WorkerLoad("d", None, batch_size=10)
    assert workload(unknown, fallback=5.0) == pytest.approx(2.0)
    assert workload(unknown, WorkloadWeights(unknown_throughput=20.0)) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        WorkloadWeights(memory_threshold=1.0)


def test_effective_throughput_clamps_utilisation():
    w = WorkerLoad("a", 100.0, memory_utilization=1.7)
    assert effective_throughput(w) == pytest.approx(100.0 / 5.0)
    w.memory_utilization = -3
    assert effective_throughput(w) == pytest.approx(100.0)


# ----------------------------------------------------------------------------------------------
# GPU beside CPUs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overhead", [0.0, 0.004])
def test_gpu_beside_cpus_takes_almost_all_and_is_never_slower(overhead):
    def make_gpu():
        return SimWorker("gpu", 5000.0, batch_size=256, per_batch_overhead_s=overhead, known_rate=5000.0)

    def make_cpu(i):
        return SimWorker(f"cpu{i}", 100.0, batch_size=16, per_batch_overhead_s=overhead, known_rate=100.0)

    requests = 10_000
    alone = simulate([make_gpu()], requests)
    mixed = simulate([make_gpu(), make_cpu(0), make_cpu(1)], requests)
    assert sum(mixed.served.values()) == requests
    assert mixed.served["gpu"] / requests >= 0.9
    assert mixed.makespan <= alone.makespan + 1e-9
    # Throughput with the CPUs is at least the GPU's alone.
    assert requests / mixed.makespan >= requests / alone.makespan


def test_slow_worker_gets_nothing_for_small_backlog():
    workers = [
        WorkerLoad("gpu", 5000.0, batch_size=256),
        WorkerLoad("cpu", 50.0, batch_size=16),
    ]
    assert plan(10, workers) == [("gpu", 10)]
    # A slow worker is used when the fast one is busy long enough.
    busy_gpu = WorkerLoad("gpu", 5000.0, inflight_samples=50_000, free_slots=0, batch_size=256)
    assert plan(10, [busy_gpu, workers[1]]) == [("cpu", 10)]


def test_busy_fast_worker_keeps_its_share():
    # Fast worker busy (no free slots) for 0.1 s; slow idle.  Backlog 100:
    # common finish t solves 1000*(t-0.1) + 100*t = 100 -> t = 0.1818; slow share 18.
    fast = WorkerLoad("fast", 1000.0, inflight_samples=100, free_slots=0, batch_size=64)
    slow = WorkerLoad("slow", 100.0, batch_size=64)
    assert plan(100, [fast, slow]) == [("slow", 18)]


# ----------------------------------------------------------------------------------------------
# Caps, free slots, invariants
# ----------------------------------------------------------------------------------------------


def test_caps_and_free_slots_respected():
    workers = [
        WorkerLoad("a", 1000.0, cap=10, free_slots=2, batch_size=64),
        WorkerLoad("b", 1000.0, cap=None, free_slots=3, batch_size=16),
        WorkerLoad("c", 1000.0, cap=0, free_slots=4, batch_size=16),
        WorkerLoad("d", 1000.0, free_slots=0, batch_size=16),
    ]
    decisions = plan(10_000, workers)
    counts: dict[str, int] = {}
    for address, _size in decisions:
        counts[address] = counts.get(address, 0) + 1
    assert counts == {"a": 2, "b": 3}
    assert all(size == 10 for address, size in decisions if address == "a")
    assert all(size == 16 for address, size in decisions if address == "b")


def test_sizes_argument_overrides_batch_size():
    workers = [WorkerLoad("a", 100.0, batch_size=4, free_slots=1)]
    assert plan(100, workers, {"a": 50}) == [("a", 50)]
    assert plan(100, workers) == [("a", 4)]


def test_plan_invariants_random():
    rng = random.Random(1234)
    for _ in range(2000):
        count = rng.randint(1, 6)
        workers = []
        for i in range(count):
            workers.append(
                WorkerLoad(
                    address=f"w{i}",
                    throughput=rng.choice([None, rng.uniform(1, 10_000)]),
                    inflight_samples=rng.randint(0, 550),
                    memory_utilization=rng.random(),
                    cap=rng.choice([None, 0, rng.randint(1, 300)]),
                    free_slots=rng.randint(0, 3),
                    batch_size=rng.randint(1, 512),
                )
            )
        backlog = rng.randint(0, 5000)
        decisions = plan(backlog, workers)
        assert sum(size for _, size in decisions) <= backlog
        by_address = {w.address: w for w in workers}
        used: dict[str, int] = {}
        for address, size in decisions:
            w = by_address[address]
            assert size >= 1
            assert size <= w.batch_size
            if w.cap is not None:
                assert size <= w.cap
            used[address] = used.get(address, 0) + 1
        for address, n in used.items():
            assert n <= by_address[address].free_slots


def test_plan_uses_all_idle_workers_for_a_large_backlog():
    workers = [WorkerLoad(f"w{i}", 100.0 * (i + 1), batch_size=8, free_slots=1) for i in range(4)]
    decisions = plan(10_000, workers)
    assert sorted(a for a, _ in decisions) == ["w0", "w1", "w2", "w3"]
    assert all(size == 8 for _, size in decisions)
    # least workload first: fastest first
    assert [a for a, _ in decisions] == ["w3", "w2", "w1", "w0"]


def test_small_backlog_split_in_proportion():
    workers = [WorkerLoad("fast", 300.0, batch_size=100), WorkerLoad("slow", 100.0, batch_size=100)]
    assert dict(plan(40, workers)) == {"fast": 30, "slow": 10}


def test_empty_inputs():
    assert plan(0, [WorkerLoad("a", 1.0)]) == []
    assert plan(5, []) == []
    with pytest.raises(ValueError):
        plan(5, [WorkerLoad("a", 1.0), WorkerLoad("a", 2.0)])


# ----------------------------------------------------------------------------------------------
# Unknown throughput: probing
# ----------------------------------------------------------------------------------------------


def test_unknown_throughput_is_probed():
    workers = [WorkerLoad("known", 100.0, batch_size=16), WorkerLoad("new", None, batch_size=16)]
    assert sorted(a for a, _ in plan(1000, workers)) == ["known", "new"]
    # Every worker unknown: equal split.
    workers = [WorkerLoad("x", None, batch_size=100), WorkerLoad("y", None, batch_size=100)]
    assert dict(plan(10, workers)) == {"x": 5, "y": 5}


def test_unknown_worker_learns_in_simulation():
    fast = SimWorker("fast", 3000.0, 32, known_rate=3000.0)
    new = SimWorker("new", 1000.0, 32, known_rate=None)
    result = simulate([fast, new], 10_000)
    assert result.workers["new"].batches >= 1
    assert result.workers["new"].known_rate == pytest.approx(1000.0)
    assert abs(result.served["new"] / 10_000 - 0.25) <= 0.15 * 0.25


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def test_common_finish_time_and_shares():
    assert common_finish_time(400, [300, 100]) == pytest.approx(1.0)
    assert water_filling_shares(400, [300, 100]) == pytest.approx([300, 100])
    # The second worker is busy past the common finish time: it takes no part.
    assert common_finish_time(300, [300, 100], [0, 5]) == pytest.approx(1.0)
    assert water_filling_shares(300, [300, 100], [0, 5]) == pytest.approx([300, 0])
    shares = water_filling_shares(100, [1000, 100], [0.1, 0])
    assert sum(shares) == pytest.approx(100)
    with pytest.raises(ValueError):
        common_finish_time(1, [0.0])


def test_fill_unknown_throughputs():
    measured = {"a": 200.0, "b": None, "c": None}
    scores = {"a": 100.0, "b": 50.0, "c": None}
    assert fill_unknown_throughputs(measured, scores) == {"a": 200.0, "b": 100.0, "c": None}
    assert fill_unknown_throughputs({"a": None}, {"a": 3.0, "b": 6.0}) == {"a": 3.0, "b": 6.0}
