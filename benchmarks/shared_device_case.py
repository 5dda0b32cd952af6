"""Several models flooded on one device: do they keep the device's throughput, at the sizes each has alone?

One LocalCluster worker process with one thread, the plugin registered, three models ``a``, ``b``,
``c`` that each sleep ``4 ms + 50 us per row`` and return their input (float32 rows of 16 values;
``dask_dynbatch.examples.timed_model``): their cost is simulated and releases the GIL, so the two
cores of the CPU machine carry only the package's own work. The device thread runs one batch at a
time, so the device's ceiling is one model's: ``rows / (0.004 + 50e-6 * rows)`` a second, which
approaches 20,000 rows/s as batches grow. Default settings (100 ms latency target: up to ~1,900 rows).

``alone``     each model in turn: ``--rows`` rows through ``Batcher.predict``, ``--passes`` times
              (the first untimed); rows/s and the mean device batch of the last pass.
``together``  all three at once, ``--rows`` each, from three threads of this client, ``--rounds``
              times; per round the total rows/s (all rows / the last finish) and each model's mean
              device batch (from its model server's counts).

``open``      then Poisson arrivals for all three at once (``common.open_loop``, one thread each, one
              request per row), at ``--loads`` of the mean rate alone shared equally by the three,
              ``--open-seconds`` each: per model p50 and p99 latency (the latency target is 100 ms)
              and its mean device batch. Below saturation a batch's size follows its arrivals, not
              the target.

The ratio ``together / alone`` (total rows a second of the three models at once against the mean of
one at a time) is what sharing costs: near 1 when the device stays as busy with three as with one.

    python benchmarks/shared_device_case.py     # writes benchmarks/results/shared_device_case.{json,png}
    python benchmarks/shared_device_case.py --rows 5000 --rounds 1 --passes 1 --open-seconds 1 --out /tmp/shared   # smoke test
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_stamp, open_loop, save, server_state  # noqa: E402

MODELS = ("a", "b", "c")
OVERHEAD_S, PER_ROW_S = 0.004, 50e-6


def server_counts(client, name: str) -> tuple[int, int]:
    """(device batches, rows) the model's server has run so far ((0, 0) before it is loaded)."""
    states = list(server_state(client, name).values())
    return (states[0]["batches"], states[0]["samples"]) if states else (0, 0)


def each_at_once(fn, names) -> None:
    """``fn(k, name)`` for every name, each in its own thread, all at once; returns when all did."""
    threads = [threading.Thread(target=fn, args=(k, name)) for k, name in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def run_predicts(batchers: dict, x: np.ndarray) -> dict[str, float]:
    """``predict(x)`` on every Batcher at once, each from its own thread; seconds each took."""
    done: dict[str, float] = {}
    started = time.perf_counter()

    def one(_: int, name: str) -> None:
        out = batchers[name].predict(x)
        assert out.shape == x.shape
        done[name] = time.perf_counter() - started

    each_at_once(one, batchers)
    return done


def open_mix(client, batchers: dict, samples: np.ndarray, load: float, alone_rate: float, seconds: float) -> dict:
    """Poisson arrivals for every model at once, ``load`` x ``alone_rate`` in all, shared equally."""
    rate = load * alone_rate / len(batchers)
    before = {name: server_counts(client, name) for name in batchers}
    out: dict[str, dict] = {}

    def one(k: int, name: str) -> None:
        out[name] = open_loop(batchers[name], samples, rate, seconds, seed=k)

    each_at_once(one, batchers)
    for name in batchers:
        batches, rows = np.subtract(server_counts(client, name), before[name])
        out[name]["mean_batch"] = float(rows / max(1, batches))
    print(f"open at {load:.0%} ({rate:,.0f}/s each):",
          {name: (round(r["p50_ms"], 1), round(r["p99_ms"], 1), round(r["mean_batch"], 1)) for name, r in out.items()},
          flush=True)
    return {"load": load, "rate_per_model": rate, "models": out}


def measure(args) -> dict:
    from distributed import Client, LocalCluster

    import dask_dynbatch as ddb
    from dask_dynbatch.examples import timed_model

    x = np.zeros((args.rows, 16), np.float32)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        load = timed_model({0: PER_ROW_S}, overhead=OVERHEAD_S)
        batchers = {name: ddb.Batcher(client, ddb.ModelSpec(name, load=load)) for name in MODELS}
        alone = {}
        for name in MODELS:
            for _ in range(args.passes):
                before = server_counts(client, name)
                seconds = run_predicts({name: batchers[name]}, x)[name]
                batches, rows = np.subtract(server_counts(client, name), before)
            alone[name] = {"rows_per_s": args.rows / seconds, "mean_batch": rows / max(1, batches)}
            print(f"alone {name}: {alone[name]['rows_per_s']:,.0f} rows/s, batches of {alone[name]['mean_batch']:.0f}",
                  flush=True)
        rounds = []
        for k in range(args.rounds):
            before = {name: server_counts(client, name) for name in MODELS}
            seconds = run_predicts(batchers, x)
            after = {name: server_counts(client, name) for name in MODELS}
            mean_batch = {name: float((after[name][1] - before[name][1]) / max(1, after[name][0] - before[name][0]))
                          for name in MODELS}
            total = len(MODELS) * args.rows / max(seconds.values())
            rounds.append({"rows_per_s": total, "mean_batch": mean_batch, "seconds": seconds})
            print(f"together round {k}: {total:,.0f} rows/s, batches {mean_batch}", flush=True)
        controllers = {name: next(iter(server_state(client, name).values()))["controller"]["size"] for name in MODELS}
        alone_rate = float(np.mean([v["rows_per_s"] for v in alone.values()]))
        open_runs = [open_mix(client, batchers, x[:1000], load, alone_rate, args.open_seconds) for load in args.loads]
        for b in batchers.values():
            b.close()
    alone_mean = float(np.mean([v["rows_per_s"] for v in alone.values()]))
    together_mean = float(np.mean([r["rows_per_s"] for r in rounds]))
    return {
        "machine": machine_stamp(),
        "setup": {"rows": args.rows, "rounds": args.rounds, "passes": args.passes, "overhead_s": OVERHEAD_S,
                  "per_row_s": PER_ROW_S, "latency_target_s": 0.1, "models": list(MODELS)},
        "alone": alone,
        "together": rounds,
        "controller_size_at_end": controllers,
        "open": open_runs,
        "ratio_together_to_alone": together_mean / alone_mean,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    labels = [f"alone {m}" for m in result["alone"]] + [f"together {k}" for k in range(len(result["together"]))]
    rates = [v["rows_per_s"] for v in result["alone"].values()] + [r["rows_per_s"] for r in result["together"]]
    left.bar(labels, rates, color=["#888"] * len(result["alone"]) + ["#1f77b4"] * len(result["together"]))
    left.set_ylabel("rows/s (all models)")
    left.tick_params(axis="x", rotation=30, labelsize=8)
    for m in result["alone"]:
        right.plot([r["mean_batch"][m] for r in result["together"]], marker="o", label=f"{m} together")
        right.axhline(result["alone"][m]["mean_batch"], ls=":", color="#888")
    right.set_xlabel("round")
    right.set_ylabel("mean device batch (dotted: alone)")
    right.legend(fontsize=8)
    fig.suptitle(f"Three models on one device thread: together/alone {result['ratio_together_to_alone']:.2f}x "
                 f"({result['machine'].get('commit')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=60_000, help="rows of each predict")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--passes", type=int, default=2, help="passes of each model alone (the last one counts)")
    parser.add_argument("--loads", default="0.5,0.7,0.9", type=lambda v: [float(x) for x in v.split(",")],
                        help="open-loop rates, fractions of the mean rate alone (empty: none)")
    parser.add_argument("--open-seconds", type=float, default=5.0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    result = measure(args)
    path = save("shared_device_case", result, args.out)
    plot(result, path.with_suffix(".png"))
    print(f"together/alone {result['ratio_together_to_alone']:.2f}x -> {path}")


if __name__ == "__main__":
    main()
