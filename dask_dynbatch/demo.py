"""``python -m dask_dynbatch.demo``: dynamic batching on an embedded local cluster.

Starts a LocalCluster (one worker on the GPU when one is visible, else CPU workers), registers the
plugin, serves a small model, and prints throughput next to plain Dask with one task per request,
and the address of the dashboard page. The model is a small CNN when torch is installed
(``pip install 'dask-dynbatch[torch]'``), else a NumPy MLP.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
import warnings
from typing import Any

import numpy as np

from .examples import build_numpy_mlp, build_tiny_cnn, tiny_cnn_images

_model_cache: dict = {}

#: the NumPy MLP's input: one vector of this many float32 features per request
MLP_FEATURES = 256


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


def predict_one_numpy(vector: np.ndarray) -> np.ndarray:
    """Plain Dask baseline of the NumPy MLP: one task per request."""
    model = _model_cache.get("mlp")
    if model is None:
        model = _model_cache["mlp"] = build_numpy_mlp()
    return model(vector[None])[0]


def mlp_inputs(n: int, seed: int = 0) -> np.ndarray:
    """``n`` random float32 vectors for the NumPy MLP."""
    return np.random.default_rng(seed).standard_normal((n, MLP_FEATURES), dtype=np.float32)


def _choose_model(requested: str) -> tuple[str, Any, Any, Any]:
    """(name, load, inputs, plain-Dask function) of the demo's model."""
    has_torch = importlib.util.find_spec("torch") is not None
    if requested == "cnn" and not has_torch:
        raise SystemExit("--model cnn needs torch: pip install 'dask-dynbatch[torch]'")
    if requested == "cnn" or (requested == "auto" and has_torch):
        return "tiny-cnn", build_tiny_cnn, tiny_cnn_images, predict_one
    if requested == "auto":
        print("torch is not installed: serving a NumPy MLP (for the CNN demo: pip install 'dask-dynbatch[torch]')",
              flush=True)
    return "numpy-mlp", build_numpy_mlp, mlp_inputs, predict_one_numpy


def _gpu_visible() -> bool:
    from .worker.model import visible_gpu_count

    return visible_gpu_count() > 0


def main(argv: list[str] | None = None) -> None:
    from distributed import Client, LocalCluster

    import dask_dynbatch as ddb

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests sent through dask-dynbatch")
    parser.add_argument("--plain-requests", type=int, default=1_000, help="requests sent as one Dask task each")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: 1 with a GPU, else 2)")
    parser.add_argument("--model", choices=("auto", "cnn", "numpy"), default="auto",
                        help="the torch CNN, the NumPy MLP, or the CNN when torch is installed (default)")
    parser.add_argument("--dashboard-address", default=":8787", help="where the dashboard listens (':0': any port)")
    args = parser.parse_args(argv)

    name, load, make_inputs, plain_predict = _choose_model(args.model)
    # the plain-Dask baseline ships its inputs inside the task graph, as hand-written code would
    warnings.filterwarnings("ignore", message="Sending large graph")
    gpu = _gpu_visible()
    n_workers = args.workers or (1 if gpu else 2)
    print(f"starting a local cluster: {n_workers} worker(s), {'GPU' if gpu else 'CPU'}", flush=True)
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, dashboard_address=args.dashboard_address) as cluster, \
            Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        print(f"dashboard: {client.dashboard_link}  (dask-dynbatch page: /dynbatch)", flush=True)
        inputs = make_inputs(args.requests)

        plain = inputs[: args.plain_requests]
        client.gather(client.map(plain_predict, plain[:n_workers * 4], pure=False))  # warm up
        t0 = time.perf_counter()
        client.gather(client.map(plain_predict, list(plain), pure=False))
        plain_rate = len(plain) / (time.perf_counter() - t0)

        spec = ddb.ModelSpec(name, load=load, latency_target="50ms")
        with ddb.Batcher(client, spec) as batcher:
            batcher.predict(inputs[:512])  # warm up: load the model on each worker
            t0 = time.perf_counter()
            outputs = batcher.predict(inputs)
            rate = len(outputs) / (time.perf_counter() - t0)
            stats = batcher.stats()

        print(f"model {name}: {len(outputs):,} outputs of shape {outputs.shape[1:]}", flush=True)
        print(f"plain Dask, one task per request: {plain_rate:10,.0f} requests/s", flush=True)
        print(f"dask-dynbatch:                     {rate:10,.0f} requests/s  ({rate / plain_rate:.1f}x)", flush=True)
        print(f"latency p50 {stats['latency_p50'] * 1e3:.1f} ms, p95 {stats['latency_p95'] * 1e3:.1f} ms (under a closed-loop backlog)")
        print("per worker (the warm-up's rows included):")
        for address, w in stats["workers"].items():
            c = w["controller"]
            print(f"  {address}: {w['samples']} samples in {w['batches']} batches, batch size now {c['size']} ({c['reason']})")


if __name__ == "__main__":
    main()
