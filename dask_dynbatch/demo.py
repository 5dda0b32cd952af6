"""``python -m dask_dynbatch.demo``: dynamic batching on an embedded local cluster.

Starts a LocalCluster (one worker on the GPU when one is visible, else CPU workers), registers the
plugin, serves a small CNN, and prints throughput next to plain Dask with one task per request, and
the address of the dashboard page.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from .examples import build_tiny_cnn, tiny_cnn_images

_model_cache: dict = {}


def predict_one(image: np.ndarray) -> np.ndarray:
    """Plain Dask baseline: one task per request, the model cached in the worker process."""
    import torch

    model = _model_cache.get("cnn")
    if model is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = _model_cache["cnn"] = build_tiny_cnn().to(device).eval()
    device = next(model.parameters()).device
    with torch.inference_mode():
        return model(torch.from_numpy(image[None]).to(device))[0].cpu().numpy()


def main(argv: list[str] | None = None) -> None:
    import torch
    from distributed import Client, LocalCluster

    import dask_dynbatch as ddb

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests sent through dask-dynbatch")
    parser.add_argument("--plain-requests", type=int, default=1_000, help="requests sent as one Dask task each")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: 1 with a GPU, else 2)")
    args = parser.parse_args(argv)

    # the plain-Dask baseline ships its images inside the task graph, as hand-written code would
    warnings.filterwarnings("ignore", message="Sending large graph")
    gpu = torch.cuda.is_available()
    n_workers = args.workers or (1 if gpu else 2)
    print(f"starting a local cluster: {n_workers} worker(s), {'GPU' if gpu else 'CPU'}", flush=True)
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, dashboard_address=":8787") as cluster, Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        print(f"dashboard: {client.dashboard_link}  (dask-dynbatch page: /dynbatch)", flush=True)
        images = tiny_cnn_images(args.requests)

        plain = images[: args.plain_requests]
        client.gather(client.map(predict_one, plain[:n_workers * 4], pure=False))  # warm up
        t0 = time.perf_counter()
        client.gather(client.map(predict_one, list(plain), pure=False))
        plain_rate = len(plain) / (time.perf_counter() - t0)

        spec = ddb.ModelSpec("tiny-cnn", load=build_tiny_cnn, latency_target="50ms")
        with ddb.Batcher(client, spec) as batcher:
            [f.result() for f in batcher.map(images[:512])]  # warm up: load the model on each worker
            t0 = time.perf_counter()
            futures = batcher.map(images)
            outputs = [f.result() for f in futures]
            rate = len(outputs) / (time.perf_counter() - t0)
            stats = batcher.stats()

        print(f"plain Dask, one task per request: {plain_rate:10,.0f} requests/s", flush=True)
        print(f"dask-dynbatch:                     {rate:10,.0f} requests/s  ({rate / plain_rate:.1f}x)", flush=True)
        print(f"latency p50 {stats['latency_p50'] * 1e3:.1f} ms, p95 {stats['latency_p95'] * 1e3:.1f} ms (under a closed-loop backlog)")
        for address, w in stats["workers"].items():
            c = w["controller"]
            print(f"  {address}: {w['samples']} samples in {w['batches']} batches, batch size now {c['size']} ({c['reason']})")


if __name__ == "__main__":
    main()
