"""Padding of the model server's batches of padded samples, by budget, without a device
(``padding_sim.json``): the 20,000 lengths of ``gpu_text_case.py`` (log-normal, median ~80, at most
512) queued at once in a ``CostQueue`` (parts of 2,000 rows, as shipments), then taken batch by
batch at a fixed budget (tokens: rows times the batch's longest row) until none is left.

``fixed_window``   every batch chosen among the 8,192 oldest rows (``LOOKAHEAD``)
``default``        among ``CHOICES`` batches' worth of the oldest rows, up to ``MAX_LOOKAHEAD``
``sorted``         the hand-written loop of ``gpu_text_case.py``: all rows sorted by length, cut
                   into batches of at most the budget

Padding is padded tokens per real one, less one; also the batches and the queue's milliseconds per
batch on this machine.

    python benchmarks/padding_sim.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_stamp, save  # noqa: E402
from gpu_text_case import make_requests  # noqa: E402

from dask_dynbatch.core.formation import CostQueue, Part  # noqa: E402
from dask_dynbatch.core.tree import TreeRows  # noqa: E402

BUDGETS = (16384, 32768, 65536, 131072)


def queue_of(lengths: np.ndarray, ship: int = 2000) -> CostQueue:
    queue = CostQueue(padded=True)
    for start in range(0, len(lengths), ship):
        rows = TreeRows.stack(("leaf",), [[np.zeros(int(n), dtype=np.int8)] for n in lengths[start : start + ship]], [True])
        queue.push([Part("shipment", start, rows)])
    return queue


def drain(lengths: np.ndarray, budget: int, max_lookahead: int) -> dict:
    queue = queue_of(lengths)
    queue.MAX_LOOKAHEAD = max_lookahead
    padded = real = batches = 0
    started = time.perf_counter()
    while len(queue):
        _, taken, _ = queue.take_weighed(budget)
        padded += len(taken) * max(taken)
        real += sum(taken)
        batches += 1
    return {"padding": padded / real - 1, "batches": batches, "ms_per_batch": 1e3 * (time.perf_counter() - started) / batches}


def sorted_loop(lengths: np.ndarray, budget: int) -> dict:
    ordered = np.sort(lengths)
    padded, start, batches = 0, 0, 0
    while start < len(ordered):
        stop = start + 1
        while stop < len(ordered) and (stop + 1 - start) * ordered[stop] <= budget:
            stop += 1
        padded += (stop - start) * int(ordered[stop - 1])
        start, batches = stop, batches + 1
    return {"padding": padded / int(ordered.sum()) - 1, "batches": batches}


def main() -> None:
    lengths = np.array([len(r) for r in make_requests(20_000, 80)])
    result = {"machine": machine_stamp(), "requests": len(lengths), "budgets": {}}
    for budget in BUDGETS:
        row = {"fixed_window": drain(lengths, budget, CostQueue.LOOKAHEAD),
               "default": drain(lengths, budget, CostQueue.MAX_LOOKAHEAD),
               "sorted": sorted_loop(lengths, budget)}
        result["budgets"][str(budget)] = row
        print(budget, {k: round(v["padding"], 3) for k, v in row.items()}, flush=True)
    save("padding_sim", result)


if __name__ == "__main__":
    main()
