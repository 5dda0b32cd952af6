"""Where does the batch-size controller settle on the throughput curves we measured, and how much of
the best throughput within the latency target does it get? A simulation, no cluster:

    python benchmarks/controller_sim.py

Curves (end-to-end samples/s by batch size):

- ``cpu``: the CPU case's dask-dynbatch throughput per size, measured end to end in the default run
  of cpu_case.json (2026-12-06): rising to ~12,500 at 400-511 rows, half speed from 512 (an
  activation buffer past glibc's largest mmap threshold);
- ``max64``: the same curve with ``max_size=64`` (the issue's ``max_batch_size=64`` contender);
- ``cliff``: tests/test_control.py's cliff model (throughput halves from 500 rows), target 1 s;
- ``gpu``: the H200 GPU case's raw ResNet-50 fp16 loop (saturating), on the shape ladder.

Noise on each batch's measured service time, two shapes: ``quiet`` (5 % Gaussian) and ``2-core``,
shaped like what the 2-core CPU machine's runs show (cpu_case.json's ``service_s`` per batch):
13 % Gaussian, one batch in ten measured at its compute time alone (its reply arrived clumped with
the one before: 25 % optimistic), and bursts of 2-4 batches 20-70 % slower about every 50 batches.
Each setting runs 16 seeds of 600 batches; the first 100 are the climb and are left out. Printed:
mean and worst efficiency over the seeds (and, for ``cpu`` and ``cliff``, the mean number of
batches in the slow sizes from 500 rows on). A change to ``dask_dynbatch/core/controller.py`` that
means to keep its decisions must leave this output unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dask_dynbatch.core.controller import BatchSizeController
from dask_dynbatch.core.ladder import shape_ladder

FORMATION_S = 0.002  # added to each batch's latency (waiting for the batch to fill)


def cpu_curve(n: float) -> float:
    """cpu_case.json, 2026-12-06: the default run's rows / time per size."""
    return float(np.interp(np.log(n), np.log([8, 16, 32, 64, 128, 256, 400, 511, 512, 2048]),
                           [4100, 6900, 9500, 11000, 11700, 11800, 12400, 12500, 8200, 6000]))


def cliff_curve(n: float) -> float:
    """tests/test_control.py's CliffThroughputModel."""
    return n / ((2.0 + n / 14.0) * (2.0 if n >= 500 else 1.0)) * 1000


def gpu_curve(n: float) -> float:
    """gpu_case.py on the H200, 2026-12-02: the raw loop of ResNet-50 fp16 (1,024 and up extrapolated)."""
    return float(np.interp(np.log(n), np.log([1, 64, 128, 256, 512, 1024, 2048]),
                           [240, 12000, 14000, 15500, 16300, 16700, 16800]))


CASES = {  # name: (curve, latency target s, initial size, max size, ladder)
    "cliff": (cliff_curve, 1.0, 8, None, None),
    "cpu": (cpu_curve, 0.1, 8, None, None),
    "max64": (cpu_curve, 0.1, 8, 64, None),
    "gpu": (gpu_curve, 0.1, 64, None, shape_ladder(None)),
}


class Run(NamedTuple):
    efficiency: float  # mean throughput after the climb / best throughput within the target
    median_size: int
    slow_batches: int  # batches at 500 rows or more
    early: float  # mean throughput of batches 50-300 / best: what cpu_case.py times after the load


def efficiency(name: str, noise: str, seed: int, batches: int = 600) -> Run:
    """One seed of one curve and noise shape (see the module docstring)."""
    curve, target, initial, max_size, ladder = CASES[name]
    rng = np.random.default_rng(seed)
    controller = BatchSizeController(target, initial_size=initial, max_size=max_size, ladder=ladder)
    sizes, burst, burst_factor = [], 0, 1.0
    for _ in range(batches):
        n = controller.size
        if noise == "quiet":
            factor = 1 + 0.05 * rng.standard_normal()
        else:
            factor = 1 + 0.13 * rng.standard_normal()
            if rng.random() < 0.1:
                factor = 0.75
            if burst == 0 and rng.random() < 0.02:
                burst, burst_factor = int(rng.integers(2, 5)), rng.uniform(1.2, 1.7)
            if burst:
                factor *= burst_factor
                burst -= 1
        service = n / curve(n) * max(factor, 0.3)
        controller.observe(n, service + FORMATION_S, service)
        sizes.append(n)
    tail = sizes[100:]
    best = max(curve(k) for k in range(1, (max_size or 4096) + 1) if k / curve(k) + FORMATION_S <= target)
    early = float(np.mean([curve(k) for k in sizes[50:300]]) / best)
    return Run(float(np.mean([curve(k) for k in tail]) / best), int(np.median(tail)), sum(k >= 500 for k in tail), early)


def main() -> None:
    print("curve  noise   efficiency mean (worst of 16 seeds)  median size  batches >= 500 rows  early (worst)")
    for name in CASES:
        for noise in ("quiet", "2-core"):
            runs = [efficiency(name, noise, seed) for seed in range(16)]
            effs = [r.efficiency for r in runs]
            early = [r.early for r in runs]
            slow = f"{np.mean([r.slow_batches for r in runs]):.0f}" if name in ("cpu", "cliff") else ""
            print(f"{name:6s} {noise:7s} {np.mean(effs):.3f} ({min(effs):.3f}){'':22s}"
                  f"{int(np.median([r.median_size for r in runs])):>6d}       {slow:>6s}               "
                  f"{np.mean(early):.3f} ({min(early):.3f})")


if __name__ == "__main__":
    main()
