"""Placement: the workload figure of a worker and which workers get the next batches.

* :func:`workload` combines a worker's throughput for a model (what its model server measured,
  else the mean of the known workers), the work already committed to it and its memory state into
  one figure: the expected number of seconds until a new batch sent to it now would be finished.
* :func:`plan` decides which workers receive the next batches and how large they are: the backlog
  is split so that all workers finish it together ("water filling" over their current loads),
  within memory caps and free slots. A worker so slow that any batch given to it would finish
  after the faster workers have finished everything gets nothing, so adding a slow CPU worker
  beside a GPU worker never lowers the total throughput.

Pure: no Dask, no torch, no clock. Everything is deterministic for given inputs.
"""

from __future__ import annotations

import heapq
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "WorkerLoad",
    "WorkloadWeights",
    "batch_limit",
    "common_finish_time",
    "effective_throughput",
    "fallback_throughput",
    "fill_unknown_throughputs",
    "hardware_slowdown",
    "plan",
    "water_filling_shares",
    "workload",
]


def _usable_rate(value: float | None) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _clamp01(value: float) -> float:
    if value is None or not math.isfinite(value):
        return 0.0
    return min(1.0, max(0.0, float(value)))


@dataclass
class WorkerLoad:
    """What placement knows about one worker for one model at the moment of a decision."""

    address: str  # unique key
    #: samples/s for this model: measured from recent batches, else from the benchmark score.
    #: None (or non-positive, non-finite) is unknown: placement assumes the mean of the known
    #: workers, so that a new worker is probed with real work
    throughput: float | None
    inflight_samples: int = 0  # sent, results not back yet
    #: fraction (0..1) of the device memory in use; memory our framework caches but does not use
    #: should count as free, or the worker's own caching would penalise it
    memory_utilization: float = 0.0
    #: largest batch that fits on the device now; None: no known cap; 0: nothing fits, the worker
    #: gets no batch and no share
    cap: int | None = None
    free_slots: int = 1  # more batches it may be given now (concurrency limit minus in flight)
    batch_size: int = 1  # the latency controller's proposal for this worker and model

    @property
    def pending_samples(self) -> int:
        """Samples already committed to this worker (sent, results not back yet)."""
        return max(0, int(self.inflight_samples))


@dataclass
class WorkloadWeights:
    """Weights of the hardware state in the workload figure (configurable).

    :func:`workload` divides a worker's throughput by a *slowdown* factor::

        slowdown = 1 + memory_weight * max(0, m - memory_threshold) / (1 - memory_threshold)

    with ``m`` the memory utilisation, clamped to 0..1: free below ``memory_threshold`` (in
    [0, 1)), then growing linearly to ``1 + memory_weight`` at 100 % use. A nearly full device
    risks out-of-memory splits and retries and can only take small batches, so it should receive
    less work, but it is never excluded outright. ``unknown_throughput`` (samples/s) is assumed
    when no worker's throughput is known; its scale does not matter for the split (all workers
    are then equal), it only sets the unit of the workload figure.
    """

    memory_weight: float = 4.0
    memory_threshold: float = 0.8
    unknown_throughput: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.memory_threshold < 1.0:
            raise ValueError(f"memory_threshold must be in [0, 1), got {self.memory_threshold!r}")
        if self.memory_weight < 0:
            raise ValueError("memory_weight must be >= 0")
        if not _usable_rate(self.unknown_throughput):
            raise ValueError(f"unknown_throughput must be > 0, got {self.unknown_throughput!r}")


DEFAULT_WEIGHTS = WorkloadWeights()


# -- The workload figure -----------------------------------------------------------------------
def hardware_slowdown(worker: WorkerLoad, weights: WorkloadWeights = DEFAULT_WEIGHTS) -> float:
    """Factor (>= 1) by which memory pressure stretches this worker's service time (the formula:
    :class:`WorkloadWeights`)."""
    memory = _clamp01(worker.memory_utilization)
    memory_pressure = max(0.0, memory - weights.memory_threshold) / (1.0 - weights.memory_threshold)
    return 1.0 + weights.memory_weight * memory_pressure


def fallback_throughput(
    workers: Iterable[WorkerLoad], weights: WorkloadWeights = DEFAULT_WEIGHTS
) -> float:
    """Throughput to assume for workers whose throughput is unknown: the mean of the known (raw)
    ones, else ``weights.unknown_throughput``. The mean gives a new worker an average share, so
    that it is probed with real batches and gets a measured throughput quickly."""
    known = [float(w.throughput) for w in workers if _usable_rate(w.throughput)]
    if not known:
        return float(weights.unknown_throughput)
    return sum(known) / len(known)


def effective_throughput(
    worker: WorkerLoad,
    weights: WorkloadWeights = DEFAULT_WEIGHTS,
    *,
    fallback: float | None = None,
) -> float:
    """Samples/s this worker is expected to deliver now: ``throughput / hardware_slowdown``, > 0.
    An unknown throughput is taken as ``fallback``, else ``weights.unknown_throughput``."""
    if _usable_rate(worker.throughput):
        raw = float(worker.throughput)
    elif _usable_rate(fallback):
        raw = float(fallback)
    else:
        raw = float(weights.unknown_throughput)
    return raw / hardware_slowdown(worker, weights)


def batch_limit(worker: WorkerLoad, sizes: Mapping[str, int] | None = None) -> int:
    """Largest batch this worker may be given now: ``min(batch size, memory cap)``, 0 when the cap
    is 0, else at least 1. ``sizes`` (address -> size) overrides ``worker.batch_size``."""
    size = worker.batch_size
    if sizes is not None and worker.address in sizes:
        size = sizes[worker.address]
    size = max(1, int(size))
    if worker.cap is not None:
        if int(worker.cap) <= 0:
            return 0
        size = min(size, int(worker.cap))
    return size


def workload(
    worker: WorkerLoad,
    weights: WorkloadWeights = DEFAULT_WEIGHTS,
    *,
    fallback: float | None = None,
) -> float:
    """The workload figure: seconds until a new batch sent now would finish.

    .. math::

        W = \\frac{q + b}{T} \\cdot \\Big(1 + w_{mem} \\frac{\\max(0, m - \\theta)}{1 - \\theta}\\Big)

    with ``q`` the samples in flight, ``b = min(batch_size, cap)`` the batch it would get now,
    ``T`` its throughput (unknown: ``fallback``), ``m`` its memory utilisation and ``w_mem``,
    ``theta`` from ``weights``. In seconds, so it compares directly across GPUs and CPUs of any
    speed: the smallest figure is the worker that would return a new batch first. ``math.inf``
    when the memory cap is 0 (nothing fits).
    """
    limit = batch_limit(worker)
    if limit == 0:
        return math.inf
    rate = effective_throughput(worker, weights, fallback=fallback)
    return (worker.pending_samples + limit) / rate


# -- Splitting work so that workers finish together --------------------------------------------
def common_finish_time(
    samples: float, throughputs: Sequence[float], busy_seconds: Sequence[float] | None = None
) -> float:
    """Seconds from now at which workers finish ``samples`` together, each starting after its
    current load (``busy_seconds``, default 0; ``throughputs`` all > 0).

    Solves ``sum_i r_i * max(0, t - busy_i) = samples`` for ``t`` ("water filling"): workers
    whose current load lasts past ``t`` take no part. ``min(busy)`` for ``samples == 0``.
    """
    rates = [float(r) for r in throughputs]
    if not rates:
        raise ValueError("no workers")
    if any(not _usable_rate(r) for r in rates):
        raise ValueError("throughputs must be positive and finite")
    busy = [0.0] * len(rates) if busy_seconds is None else [max(0.0, float(b)) for b in busy_seconds]
    order = sorted(range(len(rates)), key=lambda i: busy[i])
    rate_sum = 0.0
    weighted_busy = 0.0
    level = busy[order[0]]
    for position, index in enumerate(order):
        rate_sum += rates[index]
        weighted_busy += rates[index] * busy[index]
        level = (max(0.0, samples) + weighted_busy) / rate_sum
        next_busy = busy[order[position + 1]] if position + 1 < len(order) else math.inf
        if level <= next_busy:
            break
    return level


def water_filling_shares(
    samples: float, throughputs: Sequence[float], busy_seconds: Sequence[float] | None = None
) -> list[float]:
    """Continuous shares of ``samples`` that make all participating workers finish together:
    ``r_i * max(0, t - busy_i)`` with ``t`` from :func:`common_finish_time`, summing to ``samples``
    (with no current load: proportional to throughput)."""
    busy = [0.0] * len(throughputs) if busy_seconds is None else [max(0.0, float(b)) for b in busy_seconds]
    level = common_finish_time(samples, throughputs, busy)
    return [float(r) * max(0.0, level - b) for r, b in zip(throughputs, busy)]


def fill_unknown_throughputs(
    measured: Mapping[str, float | None], scores: Mapping[str, float | None]
) -> dict[str, float | None]:
    """Estimate unknown per-model throughputs from benchmark scores.

    A worker that has not yet run a model has only its benchmark score (reference model,
    another unit).  The median ratio ``measured / score`` over workers that have both converts
    scores into this model's samples/s.  When no worker has a measured value the scores are
    returned as they are (their ratios are what the split needs). Returns, per address, the
    measured value where known, else the calibrated score, else ``None``.
    """
    addresses = list(dict.fromkeys([*measured, *scores]))
    known_measured = {a: float(measured[a]) for a in measured if _usable_rate(measured.get(a))}
    known_scores = {a: float(scores[a]) for a in scores if _usable_rate(scores.get(a))}
    if not known_measured:
        return {a: known_scores.get(a) for a in addresses}
    ratios = [known_measured[a] / known_scores[a] for a in known_measured if a in known_scores]
    ratio = statistics.median(ratios) if ratios else None
    result: dict[str, float | None] = {}
    for a in addresses:
        if a in known_measured:
            result[a] = known_measured[a]
        elif ratio is not None and a in known_scores:
            result[a] = known_scores[a] * ratio
        else:
            result[a] = None
    return result


# -- The plan ----------------------------------------------------------------------------------
@dataclass
class _Candidate:
    worker: WorkerLoad
    rate: float  # effective samples/s
    busy: float  # seconds until its committed work is done
    limit: int  # largest batch now


def plan(
    backlog: int,
    workers: Sequence[WorkerLoad],
    sizes: Mapping[str, int] | None = None,
    *,
    weights: WorkloadWeights | None = None,
) -> list[tuple[str, int]]:
    """Decide which workers get the next batches now, and how large each batch is.

    Algorithm
    ---------
    1. Every worker able to take a batch (memory cap not 0) gets an effective throughput
       ``r_i = throughput / hardware_slowdown`` (unknown throughput: the mean of the known
       ones, so new workers are probed) and a busy time ``busy_i = pending_i / r_i``.
    2. The backlog is shared so that everyone finishes together: the common finish time ``t``
       solves ``sum_i r_i * max(0, t - busy_i) = backlog`` and worker ``i``'s share is
       ``r_i * max(0, t - busy_i)``.  With idle workers this is the split in proportion to
       throughput; a worker whose current load already lasts past ``t`` gets no share.  Shares
       are rounded down and the remaining samples go one at a time to the worker that would
       finish that extra sample earliest, so a worker so slow that even one sample would finish
       after the others have done all the work gets nothing.  Workers without free slots keep
       their share (it waits for them) instead of pushing it onto slower workers.
    3. A worker with free slots receives ``min(share, free_slots * limit)`` samples now, as
       batches of at most ``limit = min(batch size, cap)``; the rest of its share stays in the
       backlog for its next batches.  Memory caps bound the batch, not the share: a fast
       worker with a small cap runs several batches rather than handing its work to a slower
       worker.
    4. Batches are ordered by the workload figure of the slot they take (:func:`workload` for a
       worker's first batch; each further batch on the same worker adds ``limit / r_i``): least
       workload first.  Ties go by address.

    ``workers`` are those able to run the model (resources and device already filtered), with
    unique addresses; ``sizes`` (address -> size) overrides their ``batch_size``. Returns
    ``(address, size)`` batches to form now, least workload first: every size is >= 1 and at most
    the worker's ``min(batch size, cap)``, no worker appears more often than its ``free_slots``,
    and the sizes sum to at most ``backlog``.
    """
    weights = weights or DEFAULT_WEIGHTS
    backlog = int(backlog)
    if backlog <= 0 or not workers:
        return []
    addresses = [w.address for w in workers]
    if len(set(addresses)) != len(addresses):
        raise ValueError("worker addresses must be unique")
    candidates = _candidates(workers, sizes, weights)
    if not candidates:
        return []
    rates = [c.rate for c in candidates]
    busy = [c.busy for c in candidates]
    shares = water_filling_shares(backlog, rates, busy)
    counts = _round_shares(backlog, shares, rates, busy, [c.worker.address for c in candidates])
    return _batches(candidates, counts)


def _candidates(
    workers: Sequence[WorkerLoad], sizes: Mapping[str, int] | None, weights: WorkloadWeights
) -> list[_Candidate]:
    """Step 1 of :func:`plan`: the workers able to take a batch now, with their rates and busy times."""
    fallback = fallback_throughput(workers, weights)
    candidates: list[_Candidate] = []
    for worker in workers:
        limit = batch_limit(worker, sizes)
        if limit == 0:
            continue
        rate = effective_throughput(worker, weights, fallback=fallback)
        candidates.append(_Candidate(worker, rate, worker.pending_samples / rate, limit))
    return candidates


def _batches(candidates: Sequence[_Candidate], counts: Sequence[int]) -> list[tuple[str, int]]:
    """Steps 3 and 4 of :func:`plan`: each worker's count as batches in its free slots, ordered."""
    batches: list[tuple[float, str, int]] = []
    for candidate, count in zip(candidates, counts):
        slots = max(0, int(candidate.worker.free_slots))
        to_send = min(count, slots * candidate.limit)
        # Order key: the workload figure of each successive batch slot on this worker.
        figure = candidate.busy
        while to_send > 0 and slots > 0:
            size = min(candidate.limit, to_send)
            figure += candidate.limit / candidate.rate
            batches.append((figure, candidate.worker.address, size))
            to_send -= size
            slots -= 1
    batches.sort(key=lambda item: (item[0], item[1]))
    return [(address, size) for _, address, size in batches]


def _round_shares(
    total: int,
    shares: Sequence[float],
    rates: Sequence[float],
    busy: Sequence[float],
    addresses: Sequence[str],
) -> list[int]:
    """Round continuous shares to integers summing to ``total`` without stretching the makespan.

    Floors first; the leftover samples (fewer than the number of workers) go one at a time to
    the worker whose finish time with one more sample is smallest (ties: faster, then address).
    """
    counts = [max(0, int(math.floor(s + 1e-9))) for s in shares]
    # Guard against floating-point overshoot: take back from the latest finisher.
    while sum(counts) > total:
        index = max(
            (i for i in range(len(counts)) if counts[i] > 0),
            key=lambda i: (busy[i] + counts[i] / rates[i], addresses[i]),
        )
        counts[index] -= 1
    leftover = total - sum(counts)
    heap = [(busy[i] + (counts[i] + 1) / rates[i], -rates[i], addresses[i], i) for i in range(len(counts))]
    heapq.heapify(heap)
    while leftover > 0 and heap:
        _, _, _, index = heapq.heappop(heap)
        counts[index] += 1
        leftover -= 1
        heapq.heappush(heap, (busy[index] + (counts[index] + 1) / rates[index], -rates[index], addresses[index], index))
    return counts
