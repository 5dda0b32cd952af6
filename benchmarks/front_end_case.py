"""The client's own costs, in a fresh client process (``front_end_case.json``).

``noop``    ``Batcher.map`` of 100,000 rows of a no-op model and every result, three passes after
            a warm-up, with the cyclic garbage collector as it is (``gc``), switched off
            (``gc_off``) and after ``gc.freeze()`` (``gc_frozen``); per pass the requests/s and the
            collections of each generation with their time (``gc.callbacks``)
``padded``  ``map`` of 5,000 dict samples of log-normal lengths through a padded model that costs
            nothing (its outputs are left uninitialised), two passes: what the path around a
            variable-length model carries

    python benchmarks/front_end_case.py          # about a minute on a 2-core machine
    PYTHONPATH=<checkout of another commit> python benchmarks/front_end_case.py --name front_end_case_<commit>
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_stamp, save  # noqa: E402

import dask_dynbatch as ddb  # noqa: E402
from dask_dynbatch.examples import build_identity  # noqa: E402


def build_free_padded(device: str = "cpu"):
    """``{"pooler_output": ...}`` of width 768, uninitialised: a padded model that costs nothing."""
    import torch

    class Free(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return {"pooler_output": torch.empty(input_ids.shape[0], 768)}

    return Free().eval()


class GcCount:
    """Collections of each generation and their seconds, while installed."""

    def __init__(self) -> None:
        self.count: Counter = Counter()
        self.seconds: Counter = Counter()
        self._started = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.count[info["generation"]] += 1
            self.seconds[info["generation"]] += time.perf_counter() - self._started


def noop_passes(client, rows: int, mode: str) -> list[dict]:
    xs = np.zeros((rows, 4), dtype=np.float32)
    out = []
    with ddb.Batcher(client, ddb.ModelSpec(f"front-end-{mode}", load=build_identity)) as batcher:
        [f.result() for f in batcher.map(xs[:1000])]
        if mode == "gc_frozen":
            gc.collect()
            gc.freeze()
        if mode == "gc_off":
            gc.disable()
        try:
            for _ in range(3):
                counter = GcCount()
                gc.callbacks.append(counter)
                started = time.perf_counter()
                [f.result() for f in batcher.map(xs)]
                seconds = time.perf_counter() - started
                gc.callbacks.remove(counter)
                out.append({"requests_per_s": rows / seconds,
                            "collections": {str(k): v for k, v in sorted(counter.count.items())},
                            "collection_s": {str(k): v for k, v in sorted(counter.seconds.items())}})
                print(mode, {k: (round(v) if isinstance(v, float) else v) for k, v in out[-1].items()}, flush=True)
        finally:
            gc.enable()
            gc.unfreeze()
    return out


def padded_passes(client, requests: int) -> list[float]:
    lengths = np.clip(np.random.default_rng(0).lognormal(np.log(80), 0.6, requests), 5, 512).astype(int)
    samples = [{"input_ids": np.ones(n, dtype=np.int64), "attention_mask": np.ones(n, dtype=np.int64)} for n in lengths]
    rates = []
    with ddb.Batcher(client, ddb.ModelSpec("front-end-padded", load=build_free_padded, pad_value=0)) as batcher:
        for _ in range(2):
            started = time.perf_counter()
            [f.result() for f in batcher.map(samples)]
            rates.append(requests / (time.perf_counter() - started))
            print("padded", round(rates[-1]), flush=True)
    return rates


def main(argv: list[str] | None = None) -> None:
    from distributed import Client, LocalCluster

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--padded", type=int, default=5_000)
    parser.add_argument("--name", default="front_end_case")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    result: dict = {"machine": machine_stamp(), "rows": args.rows, "padded_requests": args.padded}
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        result["noop"] = {mode: noop_passes(client, args.rows, mode) for mode in ("gc", "gc_off", "gc_frozen")}
        result["padded"] = padded_passes(client, args.padded)
    save(args.name, result, args.out)


if __name__ == "__main__":
    main()
