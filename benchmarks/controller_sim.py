"""Where does the batch-size controller settle on the throughput curves we measured, and how much of
the best throughput within the latency target does it get? A simulation, no cluster:

    python benchmarks/controller_sim.py

Curves (end-to-end samples/s by batch size): the CPU case's fixed-size dask-dynbatch runs (peak at
64-128, falling above) and the H200 GPU case's raw ResNet-50 fp16 loop (saturating), with
multiplicative noise on each batch's service time. Each setting runs 8 seeds of 400 batches; the
first 100 are the climb and are left out. Quoted in ``dask_dynbatch/control.py`` (throughput
tolerance).
"""

from __future__ import annotations

import numpy as np

from dask_dynbatch.compiled import shape_ladder
from dask_dynbatch.control import BatchSizeController

TARGET = 0.1  # s
FORMATION_S = 0.002  # added to each batch's latency (waiting for the batch to fill)


def cpu_curve(n: float) -> float:
    """cpu_case.py, 2026-12-02: dask-dynbatch at fixed sizes 8/32/64/128/512 (and a guess at 2048)."""
    return float(np.interp(np.log(n), np.log([8, 32, 64, 128, 512, 2048]), [3600, 6800, 9100, 8500, 7000, 5500]))


def gpu_curve(n: float) -> float:
    """gpu_case.py on the H200, 2026-12-02: the raw loop of ResNet-50 fp16 (1,024 and up extrapolated)."""
    return float(np.interp(np.log(n), np.log([1, 64, 128, 256, 512, 1024, 2048]),
                           [240, 12000, 14000, 15500, 16300, 16700, 16800]))


def efficiency(curve, tolerance: float, noise: float, seed: int, *, initial: int, ladder=None,
               batches: int = 400) -> tuple[float, int]:
    """(mean throughput after the climb / best throughput within the target, median size)."""
    rng = np.random.default_rng(seed)
    controller = BatchSizeController(TARGET, initial_size=initial, throughput_tolerance=tolerance, ladder=ladder)
    sizes = []
    for _ in range(batches):
        n = controller.size
        service = n / curve(n) * (1 + noise * rng.standard_normal())
        controller.observe(n, service + FORMATION_S, service)
        sizes.append(n)
    best = max(curve(n) for n in range(1, 4096) if n / curve(n) + FORMATION_S <= TARGET)
    tail = sizes[100:]
    return float(np.mean([curve(n) for n in tail]) / best), int(np.median(tail))


def main() -> None:
    print("curve  tolerance  noise  efficiency (mean, min over seeds)  median sizes")
    for name, curve, initial, ladder in (("cpu", cpu_curve, 8, None), ("gpu", gpu_curve, 64, shape_ladder(None))):
        for tolerance in (0.2, 0.1, 0.05):
            for noise in (0.05, 0.15):
                runs = [efficiency(curve, tolerance, noise, seed, initial=initial, ladder=ladder) for seed in range(8)]
                effs = [e for e, _ in runs]
                print(f"{name:5s}  {tolerance:9.2f}  {noise:5.2f}  {np.mean(effs):.3f}, {min(effs):.3f}"
                      f"{'':22s}{[s for _, s in runs]}")


if __name__ == "__main__":
    main()
