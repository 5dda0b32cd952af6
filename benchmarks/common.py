"""Shared helpers of the benchmark scripts: machine stamp, timing, open-loop load, result files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def machine_stamp() -> dict:
    """Which machine produced a result: CPU model and cores, or the GPU and its driver."""
    stamp = {
        "host": platform.node(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if os.environ.get("DYNBATCH_COMMIT"):  # the device machine's copy of the tree has no usable git history
        stamp["commit"] = os.environ["DYNBATCH_COMMIT"]
    else:
        stamp["commit"] = _git_commit()
    try:
        with open("/proc/cpuinfo") as f:
            stamp["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            stamp["gpu"] = out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    import dask
    import distributed

    stamp["dask"] = dask.__version__
    stamp["distributed"] = distributed.__version__
    try:
        import torch

        stamp["torch"] = torch.__version__
    except ImportError:
        pass
    return stamp


def _git_commit() -> str | None:
    """The checkout's commit, with ``+changes`` when files differ from it (None without git)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                  "dask_dynbatch", "benchmarks/*.py"], capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+changes" if changed.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def _server_states(dask_worker=None) -> list[dict]:
    plugin = dask_worker.extensions.get("dynbatch")
    return plugin.server_states() if plugin is not None else []


def server_states(client) -> dict[str, list[dict]]:
    """Every worker's model servers (``DynBatchWorkerPlugin.server_states()``): per worker address,
    one dict per loaded (model, version) with ``controller`` (the full controller state),
    ``batches``, ``samples``, ``shared_batches``, ``loads``, ..."""
    return client.run(_server_states)


def server_state(client, model: str) -> dict[str, dict]:
    """The state of ``model``'s newest loaded version on each worker that has it (address -> state)."""
    out = {}
    for address, states in server_states(client).items():
        mine = [s for s in states if s["name"] == model]
        if mine:
            out[address] = max(mine, key=lambda s: s["version"])
    return out


def rate(n: int, fn) -> tuple[float, float]:
    """Run ``fn()``; return (items per second, seconds)."""
    started = time.perf_counter()
    fn()
    seconds = time.perf_counter() - started
    return n / seconds, seconds


def open_loop(batcher, samples, rate_per_s: float, seconds: float, seed: int = 0,
              latencies_out: list[float] | None = None) -> dict:
    """Poisson arrivals at ``rate_per_s`` for ``seconds``; per-request latency percentiles (and every
    request's latency in seconds appended to ``latencies_out``, for runs that pool several clients).

    Like a serving front end, the loop keeps a request's future only until it is done (a callback
    records the latency and counts it off). Until 2026-12-06 it kept every future, with its
    callback, to the end of the run: tens of thousands of objects that survived into the collector's
    oldest generation and set off full collections of the client's heap. On the 2-core CPU machine
    at 6,000 requests/s (no-op model) that was 265-271 collections, one full one of 111-113 ms, and
    p99 13 ms, against 4-6 collections, no full one and p99 4-5 ms when futures are dropped.
    """
    rng = np.random.default_rng(seed)
    n = max(1, int(rate_per_s * seconds))
    gaps = rng.exponential(1.0 / rate_per_s, size=n)
    latencies: list[float] = []
    failures: list[BaseException] = []
    lock = threading.Lock()
    all_done = threading.Event()
    remaining = n

    def record(fut, t_submit):
        nonlocal remaining
        latency = time.perf_counter() - t_submit
        with lock:
            if fut.cancelled():
                failures.append(RuntimeError("cancelled"))
            elif fut.exception() is not None:
                failures.append(fut.exception())
            else:
                latencies.append(latency)
            remaining -= 1
            if remaining == 0:
                all_done.set()

    started = time.perf_counter()
    due = started
    for i in range(n):
        due += gaps[i]
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t_submit = time.perf_counter()
        batcher.submit(samples[i % len(samples)]).add_done_callback(lambda f, t=t_submit: record(f, t))
    all_done.wait()
    elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} of {n} open-loop requests failed; first: {failures[0]!r}")
    lat = np.array(latencies)
    if latencies_out is not None:
        latencies_out.extend(latencies)
    return {
        "offered_rate": rate_per_s,
        "requests": n,
        "achieved_rate": n / elapsed,
        "p50_ms": float(np.percentile(lat, 50) * 1e3),
        "p99_ms": float(np.percentile(lat, 99) * 1e3),
        "harness": "futures dropped once done",
    }


def throughput_bars(path: str | Path, throughput: dict[str, float], colors: list[str], ylabel: str, title: str) -> None:
    """A bar per contender of a one-run comparison, written as a PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(list(throughput), list(throughput.values()), color=colors)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(name: str, result: dict, directory: str | Path | None = None) -> Path:
    """Write ``result`` as ``<directory>/<name>.json`` (default: ``benchmarks/results``)."""
    directory = Path(directory) if directory is not None else RESULTS
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=float))
    return path
