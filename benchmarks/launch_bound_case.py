"""Open loop on a model that behaves like a GPU on a host where launching a batch is slow.

A GPU batch of ResNet-50 costs the host a few milliseconds of Python (kernel launches, the GIL
held) however few its rows, then the device's time per row. On some lent GPU hosts a batch of
20-60 rows costs the worker 8-10 ms; at 70 % load the partial batches must then overlap the
device closely or they grow, and latency with them. This case imitates that on the CPU machine:
each batch holds the GIL for ``--spin`` seconds (a busy loop in Python), then sleeps ``--per-row``
seconds per row (the device computing, the GIL free). One worker process x 1 thread.

Per round: a closed loop of 30,000 requests three times (the last one's rate is the capacity),
then Poisson arrivals (``common.open_loop``) at 30 % and 70 % of it for 6 s each: p50 and p99
latency, device batches and their mean size. The latency target is 100 ms; the GPU case's target
for 70 % load is p99 within 2x the target.

    python benchmarks/launch_bound_case.py                       # results/launch_bound_case.{json,png}
    python benchmarks/launch_bound_case.py --rounds 1 --seconds 2 --out /tmp/lb   # smoke test

To compare two versions of the package in one sitting, run this file under each with
``PYTHONPATH=<a checkout of the other version>`` and ``--out`` a folder of its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_stamp, open_loop  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LOADS = (0.3, 0.7)


def launch_bound_model(spin: float, per_row: float):
    """A ``load`` whose model holds the GIL for ``spin`` seconds per batch, then sleeps
    ``per_row`` seconds per row; returns the first 8 values of each row."""

    def load(device: str = "cpu"):
        def model(batch):
            end = time.perf_counter() + spin
            while time.perf_counter() < end:  # busy in Python, as kernel launches are
                pass
            time.sleep(per_row * len(batch))
            return batch[:, :8]

        return model

    return load


def one_round(client, args) -> dict:
    import dask_dynbatch as ddb

    xs = np.random.default_rng(0).random((2000, 1024), dtype=np.float32)
    spec = ddb.ModelSpec("launch-bound", load=launch_bound_model(args.spin, args.per_row), latency_target=0.1)
    out: dict = {"open_loop": []}
    with ddb.Batcher(client, spec) as batcher:
        for _ in range(3):
            started = time.perf_counter()
            [f.result() for f in batcher.map([xs[i % len(xs)] for i in range(args.requests)])]
            out["capacity"] = args.requests / (time.perf_counter() - started)
        for load in LOADS:
            started = time.time()
            got = open_loop(batcher, xs, load * out["capacity"], args.seconds)
            batches = [h for h in batcher.history() if h["time"] >= started]
            got |= {"load": load, "batches": len(batches),
                    "mean_batch": float(np.mean([h.get("device_batch", h["size"]) for h in batches])) if batches else None}
            out["open_loop"].append(got)
            print(f"  load {load:.0%}: p50 {got['p50_ms']:.1f} ms, p99 {got['p99_ms']:.1f} ms, "
                  f"{len(batches)} batches of {got['mean_batch'] or 0:.0f} rows", flush=True)
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r, rnd in enumerate(result["rounds"]):
        loads = [o["load"] * 100 for o in rnd["open_loop"]]
        ax.plot(loads, [o["p99_ms"] for o in rnd["open_loop"]], "o-", color="C0", label="p99" if r == 0 else None)
        ax.plot(loads, [o["p50_ms"] for o in rnd["open_loop"]], "s--", color="C1", label="p50" if r == 0 else None)
    ax.axhline(2 * result["latency_target_ms"], color="grey", ls=":", label="2x the latency target")
    ax.set_xlabel("offered load, % of the closed loop's rate")
    ax.set_ylabel("latency, ms")
    ax.set_title(f"launch-bound model: {result['spin'] * 1e3:.0f} ms of GIL per batch + "
                 f"{result['per_row'] * 1e6:.0f} us per row")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spin", type=float, default=0.004, help="seconds of GIL-holding Python per batch")
    parser.add_argument("--per-row", type=float, default=7.5e-5, help="seconds of GIL-free sleep per row")
    parser.add_argument("--requests", type=int, default=30_000)
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds of each open-loop load")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--name", default="launch_bound_case")
    args = parser.parse_args()

    import dask
    from distributed import Client, LocalCluster

    import dask_dynbatch as ddb

    dask.config.set({"dynbatch.benchmark.on-start": False})
    started = time.time()
    result = {"machine": machine_stamp(), "spin": args.spin, "per_row": args.per_row, "latency_target_ms": 100.0,
              "rounds": []}
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        for r in range(args.rounds):
            print(f"round {r + 1}", flush=True)
            result["rounds"].append(one_round(client, args))
    p99_70 = [o["p99_ms"] for rnd in result["rounds"] for o in rnd["open_loop"] if o["load"] == 0.7]
    result["p99_at_70_ms"] = p99_70
    result["target_met"] = all(p <= 2 * result["latency_target_ms"] for p in p99_70)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1, default=float))
    plot(result, out / f"{args.name}.png")
    print(f"p99 at 70 %: {', '.join(f'{p:.0f}' for p in p99_70)} ms; wrote {out / args.name}.json/.png "
          f"in {time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
