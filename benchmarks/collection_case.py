"""Inference over a Dask collection where the data lives (targets: ``Batcher.predict`` of a dask
array of 60,000 CNN images >= 1.1x the best hand-written ``map_blocks`` with a cached model, and
>= 0.9x the same rows sent through ``Batcher.map`` from the client).

One LocalCluster (1 worker process x 1 thread, as the CPU case), the CPU case's model (a 3-conv
CNN on 64x64x3 uint8 images). The images are made and persisted on the worker before anything is
timed, once per chunking, so every contender reads the same blocks from the worker's memory:

``predict_<c>``   ``batcher.predict(images).sum(axis=0).compute()`` on the array chunked by ``c``
                  rows (a reduction: the predictions stay on the cluster)
``map_blocks_<c>``  ``images.map_blocks(run the cached model on the block).sum(axis=0).compute()``,
                  chunks of 64, 512 and 4,096 rows
``client_map``   the rows brought to the client once (untimed), then ``batcher.map`` of them and every
                  result (what a user without collections does)
``ray_data``     Ray Data's ``map_batches`` with an actor pool of one actor on the same images (when
                  ``--ray-python`` names a Python with ray installed: run in its own process)

Rounds rotate the order; each contender's throughput is its median over the rounds.

    python benchmarks/collection_case.py           # writes benchmarks/results/collection_case.{json,png}
    python benchmarks/collection_case.py --images 6000 --rounds 1 --out /tmp/coll   # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_stamp, save, throughput_bars  # noqa: E402

import dask_dynbatch as ddb  # noqa: E402
from dask_dynbatch import baselines  # noqa: E402
from dask_dynbatch.examples import build_tiny_cnn  # noqa: E402

CHUNKS = (64, 512, 4096)
PREDICT_CHUNKS = (512, 4096)


def worker_clock(dask_worker) -> dict:
    """The worker process's CPU seconds, and the seconds its statistical profiler has spent walking
    the stacks of the threads that run tasks (on the worker's event loop, every 10 ms)."""
    return {"cpu_s": time.process_time(), "profile_s": dask_worker.digests_total.get("profile-duration", 0.0)}


def cached_model_block(block: np.ndarray) -> np.ndarray:
    """The hand-written contender: the model cached in the worker process, run on the whole block."""
    return baselines.predict_chunk(build_tiny_cnn, block, "cpu")


RAY_SCRIPT = r"""
import json, sys, time
import numpy as np
import ray
sys.path.insert(0, sys.argv[3])
from dask_dynbatch.examples import build_tiny_cnn

n, batch = int(sys.argv[1]), int(sys.argv[2])
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
rng = np.random.default_rng(0)
images = rng.integers(0, 255, (n, 64, 64, 3), dtype=np.uint8)

class Model:
    def __init__(self):
        import torch
        self.torch = torch
        self.model = build_tiny_cnn().eval()
    def __call__(self, rows):
        with self.torch.inference_mode():
            # one number per image: Ray Data sums scalar columns, not tensor ones
            return {"s": self.model(self.torch.from_numpy(rows["image"])).numpy().sum(axis=1)}

ds = ray.data.from_numpy(images).rename_columns({"data": "image"}).materialize()
out = {}
for _ in range(2):
    started = time.perf_counter()
    total = ds.map_batches(Model, batch_size=batch, compute=ray.data.ActorPoolStrategy(size=1)).sum("s")
    out.setdefault("seconds", []).append(time.perf_counter() - started)
print("@@ray " + json.dumps({"seconds": out["seconds"], "batch_size": batch, "ray": ray.__version__}))
"""


def ray_contender(python: str, n: int, batch: int) -> dict:
    repo = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([python, "-c", RAY_SCRIPT, str(n), str(batch), repo], capture_output=True, text=True,
                          timeout=900)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("@@ray ")), None)
    if line is None:
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(line[len("@@ray "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=60_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ray-python", default=None, help="a Python with ray[data] and torch installed")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    import dask.array as da
    from distributed import Client, LocalCluster, wait

    n = args.images
    result: dict = {"machine": machine_stamp(), "images": n, "chunks": list(CHUNKS)}
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        arrays = {}
        for c in sorted(set(CHUNKS) | set(PREDICT_CHUNKS)):
            # made on the worker, identical for every chunking (same seed), held there
            x = da.random.RandomState(0).randint(0, 255, (n, 64, 64, 3), chunks=(c, 64, 64, 3)).astype(np.uint8)
            arrays[c] = x.persist()
        wait(list(arrays.values()))
        client.submit(cached_model_block, np.zeros((1, 64, 64, 3), np.uint8), pure=False).result()
        with ddb.Batcher(client, ddb.ModelSpec("collection-cnn", load=build_tiny_cnn)) as batcher:
            rows = list(arrays[512].compute())  # for client_map: on the client before the clock starts
            for _ in range(2):  # untimed: load, the controller climbs
                batcher.predict(arrays[512]).sum(axis=0).compute()
            reference = None

            def predict(c):
                def run():
                    return batcher.predict(arrays[c]).sum(axis=0).compute()
                return run

            def by_blocks(c):
                def run():
                    return arrays[c].map_blocks(cached_model_block, dtype=np.float32, chunks=(arrays[c].chunks[0], (10,)),
                                                drop_axis=[2, 3], new_axis=None).sum(axis=0).compute()
                return run

            def client_map():
                return np.sum([f.result() for f in batcher.map(rows)], axis=0)

            contenders = {f"predict_{c}": predict(c) for c in PREDICT_CHUNKS}
            contenders |= {f"map_blocks_{c}": by_blocks(c) for c in CHUNKS}
            contenders["client_map"] = client_map
            seconds: dict[str, list[float]] = {k: [] for k in contenders}
            worker_s: dict[str, list[dict]] = {k: [] for k in contenders}
            for r in range(args.rounds):
                names = list(contenders)
                names = names[r % len(names):] + names[: r % len(names)]
                for name in names:
                    (before,) = client.run(worker_clock).values()
                    started = time.perf_counter()
                    total = contenders[name]()
                    seconds[name].append(time.perf_counter() - started)
                    (after,) = client.run(worker_clock).values()
                    worker_s[name].append({k: after[k] - before[k] for k in after})
                    if reference is None:
                        reference = total
                    else:  # every contender computes the same sum of logits
                        np.testing.assert_allclose(total, reference, rtol=1e-2)  # float32 sums in other orders
                    print(name, f"{n / seconds[name][-1]:,.0f} images/s", flush=True)
            submitted = batcher.stats()["submitted"]  # from this client: client_map's rows and one probe row per predict
            servers = client.run(lambda dask_worker: [s.state() for s in dask_worker.extensions["dynbatch"].servers.values()])
    throughput = {k: n / statistics.median(v) for k, v in seconds.items()}
    if args.ray_python:
        ray = ray_contender(args.ray_python, n, 512)
        result["ray_data"] = ray
        if "seconds" in ray:
            throughput["ray_data"] = n / min(ray["seconds"])  # its faster pass (the first starts the actor)
    else:
        result["ray_data"] = {"error": "not run: no --ray-python given"}
    best_blocks = max((k for k in throughput if k.startswith("map_blocks")), key=throughput.get)
    state = next(iter(next(iter(servers.values()))), {})
    result |= {
        "throughput": throughput,
        "seconds": seconds,
        "best_map_blocks": best_blocks,
        "ratio_to_map_blocks": {k: throughput[k] / throughput[best_blocks] for k in throughput if k.startswith("predict")},
        "ratio_to_client_map": {k: throughput[k] / throughput["client_map"] for k in throughput if k.startswith("predict")},
        "server": {k: state.get(k) for k in ("batches", "samples", "recent_mean_batch")},
        # per contender and round: the worker's CPU seconds and its profiler's seconds on the event loop
        "worker_seconds": worker_s,
        "client_submitted": submitted,
        "targets": {"ratio_to_map_blocks": 1.1, "ratio_to_client_map": 0.9},
    }
    path = save("collection_case", result, args.out)
    print(path, json.dumps({k: result[k] for k in ("ratio_to_map_blocks", "ratio_to_client_map")}, indent=None))
    plot(result, Path(args.out) / "collection_case.png")


def plot(result: dict, path: Path) -> None:
    names = list(result["throughput"])
    colors = ["tab:blue" if k.startswith("predict") else "tab:orange" if k == "client_map" else "tab:purple"
              if k == "ray_data" else "tab:gray" for k in names]
    m = result["machine"]
    throughput_bars(path, result["throughput"], colors, "images/s",
                    f"{result['images']:,} CNN images in a dask array ({m.get('cpu_count', '?')} cores): predict / best "
                    f"map_blocks {max(result['ratio_to_map_blocks'].values()):.2f}")


if __name__ == "__main__":
    main()
