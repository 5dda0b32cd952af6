"""Time to the first result, and the front end's rate through ``Batcher.predict``.

**First result.** A fresh LocalCluster (1 worker process x 1 thread, on the GPU when one is visible),
the plugin registered, then, timed: ``Batcher(client, spec)`` and one ``submit(x).result()``. The
worker reports how long its ``load`` took (``load_seconds``: importing torch, building the model,
moving it to the device); the target is a first result within that + 0.5 s on the CPU and + 2 s on
the GPU, that is, nothing (reference benchmark, shape warm-ups) before the first batch but the load.
Repeated ``--rounds`` times, each on a new cluster; then the first 2,000 results after it (a backlog
right after the load, where shape warm-ups now run beside serving).

**Front end.** ``Batcher.predict`` of an array of ``--rows`` float32 rows of 8 values on a no-op
model (``build_identity``), rows/s from the call to the stacked result, after a warm-up call.

    python benchmarks/first_result.py                      # writes benchmarks/results/first_result.json
    python benchmarks/first_result.py --model resnet50     # on a GPU machine (needs torchvision)
    python benchmarks/first_result.py --rounds 1 --rows 100000 --out /tmp/fr   # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_stamp, save, server_state  # noqa: E402

import dask_dynbatch as ddb  # noqa: E402
from dask_dynbatch.examples import (  # noqa: E402
    build_identity,
    build_resnet50,
    build_tiny_cnn,
    resnet_images,
    tiny_cnn_images,
)

MODELS = {"tiny-cnn": (build_tiny_cnn, tiny_cnn_images), "resnet50": (build_resnet50, resnet_images)}


def first_result(model: str, gpu: bool) -> dict:
    from distributed import Client, LocalCluster

    load, make_inputs = MODELS[model]
    inputs = make_inputs(2_001)
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster, Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        client.wait_for_workers(1)
        spec = ddb.ModelSpec(model, load=load, device="cuda" if gpu else "cpu")
        t0 = time.perf_counter()
        batcher = ddb.Batcher(client, spec)
        batcher.submit(inputs[0]).result()
        first = time.perf_counter() - t0
        t1 = time.perf_counter()
        batcher.predict(inputs[1:])
        backlog = time.perf_counter() - t1
        (state,) = server_state(client, model).values()
        batcher.close()
    return {"first_result_s": first, "load_s": state["load_seconds"], "over_load_s": first - state["load_seconds"],
            "device": state["device"], "next_2000_s": backlog}


def front_end(rows: int) -> dict:
    from distributed import Client, LocalCluster

    x = np.random.default_rng(0).standard_normal((rows, 8), dtype=np.float32)
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster, Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        with ddb.Batcher(client, ddb.ModelSpec("noop", load=build_identity)) as batcher:
            batcher.predict(x[:10_000])
            t0 = time.perf_counter()
            y = batcher.predict(x)
            seconds = time.perf_counter() - t0
    assert y.shape == x.shape
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default=None,
                        help="default: resnet50 on a GPU machine, else tiny-cnn")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows through predict() for the front end (0: skip)")
    parser.add_argument("--out", default=None, help="directory of the JSON (default benchmarks/results)")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()

    from dask_dynbatch.worker.model import visible_gpu_count

    gpu = visible_gpu_count() > 0
    model = args.model or ("resnet50" if gpu else "tiny-cnn")
    target = 2.0 if gpu else 0.5
    rounds = []
    for i in range(args.rounds):
        rounds.append(first_result(model, gpu))
        r = rounds[-1]
        print(f"round {i + 1}: first result {r['first_result_s']:.2f} s, load {r['load_s']:.2f} s "
              f"(+{r['over_load_s']:.2f} s; target +{target} s), next 2,000 in {r['next_2000_s']:.2f} s", flush=True)
    result = {"machine": machine_stamp(), "model": model, "gpu": gpu, "target_over_load_s": target, "rounds": rounds,
              "median_over_load_s": statistics.median(r["over_load_s"] for r in rounds) if rounds else None}
    if args.rows:
        result["front_end"] = front_end(args.rows)
        print(f"front end: predict() of {args.rows:,} rows on a no-op model: "
              f"{result['front_end']['rows_per_s']:,.0f} rows/s", flush=True)
    print(f"wrote {save(args.name or ('first_result_gpu' if gpu else 'first_result'), result, args.out)}")


if __name__ == "__main__":
    main()
