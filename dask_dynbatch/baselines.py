"""Plain-Dask baselines the benchmarks compare against: one task per request, hand-chunked tasks,
and the raw model loop. Importable on workers (the model is cached per worker process)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

_models: dict[Any, Any] = {}


def _model(load: Callable[..., Any], device: str) -> Any:
    key = (load, device)
    model = _models.get(key)
    if model is None:
        from .spec import ModelSpec
        from .worker.model import LoadedModel

        model = _models[key] = LoadedModel(ModelSpec("baseline", load=load), device)
    return model


def default_device() -> str:
    from .worker.model import visible_gpu_count

    return "cuda:0" if visible_gpu_count() else "cpu"


def _on_host(outputs: Any) -> Any:
    """Host arrays: a CUDA batch's outputs come back on their way to host memory (``PendingHost``)."""
    from .worker.model import PendingHost

    return outputs.result() if isinstance(outputs, PendingHost) else outputs


def predict_one(load: Callable[..., Any], sample: np.ndarray, device: str | None = None) -> np.ndarray:
    """One Dask task per request."""
    return _on_host(_model(load, device or default_device())(sample[None]))[0]


def predict_chunk(load: Callable[..., Any], chunk: np.ndarray, device: str | None = None) -> np.ndarray:
    """One Dask task per hand-made chunk of requests."""
    return _on_host(_model(load, device or default_device())(chunk))


def raw_loop(load: Callable[..., Any], sample: np.ndarray, batch_sizes: list[int], seconds: float = 2.0,
             device: str | None = None) -> dict[int, float]:
    """The model alone, inputs already in place, at each batch size: samples/s (the ceiling)."""
    device = device or default_device()
    model = _model(load, device)
    out = {}
    for n in batch_sizes:
        batch = np.ascontiguousarray(np.broadcast_to(sample, (n,) + sample.shape))
        if device.startswith("cuda"):
            import torch

            xb = torch.from_numpy(batch).to(device)
            run = lambda: model.model(xb)  # noqa: E731
            sync = torch.cuda.synchronize
            ctx = torch.inference_mode
        else:
            import contextlib

            run = lambda: model(batch)  # noqa: E731
            sync = lambda: None  # noqa: E731
            ctx = contextlib.nullcontext
        with ctx():
            run()  # warm up
            run()
            sync()
            out[n] = samples_per_second(run, n, seconds, sync)
    return out


def samples_per_second(run: Callable[[], Any], rows: int, seconds: float, sync: Callable[[], Any] = lambda: None) -> float:
    """Call ``run()`` (one batch of ``rows``) back to back for ``seconds``; samples/s, the device
    synchronised (``sync``) before the clock stops. Warm up before calling this."""
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        run()
        done += rows
    sync()
    return done / (time.perf_counter() - started)


def raw_compiled_loop(load: Callable[..., Any], sample: np.ndarray, batch_sizes: list[int], seconds: float = 2.0,
                      mode: str = "default", device: str | None = None) -> dict[str, dict[int, float]]:
    """The compiled ceiling: ``torch.compile(model, mode=mode, dynamic=False)`` alone, inputs already
    in place, at each batch size. Returns ``{"throughput": {size: samples/s}, "compile_seconds":
    {size: s}}`` (compile time: the first two calls at that size)."""
    import torch

    from .worker.compile import compile_shape, compile_static

    device = device or default_device()
    model = _model(load, device)
    compiled = compile_static(model.model, mode, len(batch_sizes))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    throughput, compile_seconds = {}, {}
    for n in batch_sizes:
        batch = np.ascontiguousarray(np.broadcast_to(sample, (n,) + sample.shape))
        xb = torch.from_numpy(batch).to(device)
        with torch.inference_mode():
            started = time.perf_counter()
            compile_shape(lambda m, x: m(x), compiled, xb)
            compile_seconds[n] = time.perf_counter() - started
            throughput[n] = samples_per_second(lambda: compiled(xb), n, seconds, sync)
    return {"throughput": throughput, "compile_seconds": compile_seconds}
