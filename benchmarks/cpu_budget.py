"""Where the CPU case's cores go (``cpu_budget.json``): what stops dask-dynbatch short of the raw
loop on a small CPU machine.

``raw_beside``  the raw model loop in the worker (dask-dynbatch's worker settings, inputs in place)
                at batches of 32, 64 and 256, alone and beside 1 or 2 processes that each keep one
                core busy with Python: how much the loop loses when anything else runs
``raw_inputs``  the raw model loop in the worker at batches of 64 and 256 on the batch it was
                given, called again and again (as the ceiling measures it), against the same loop
                on a fresh batch each call (consecutive rows of the 30,000 images, made in the
                worker), as a view and as a copy (a batch staged from a shipment is a copy): what
                the ceiling gains from an input already in the caches
``budget``      dask-dynbatch closed loops of the CPU case's 30,000 images, default settings and
                ``max_batch_size`` 32 and 64, three passes each after 4,000 to settle: wall time, the
                CPU seconds of the client process, of the worker's threads (the device thread and
                the event loop), and the device time its batches report

    python benchmarks/cpu_budget.py                # about 3 minutes on a 2-core machine
    python benchmarks/cpu_budget.py --sections raw_inputs --name cpu_budget_inputs   # one section
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_stamp, save  # noqa: E402

import dask_dynbatch as ddb  # noqa: E402
from dask_dynbatch import baselines  # noqa: E402
from dask_dynbatch.examples import build_tiny_cnn, tiny_cnn_images  # noqa: E402


def burn(stop) -> None:
    """Keep one core busy with Python until ``stop`` is set."""
    x = 0
    while not stop.is_set():
        for i in range(10_000):
            x += i


def raw_beside(client, images: np.ndarray, sizes: list[int], rounds: int) -> list[dict]:
    out = []
    for burners in [0, 1, 2] * rounds:
        stop = mp.Event()
        procs = [mp.Process(target=burn, args=(stop,), daemon=True) for _ in range(burners)]
        for p in procs:
            p.start()
        try:
            ((_, raw),) = client.run(baselines.raw_loop, build_tiny_cnn, images[0], sizes, 2.0).items()
        finally:
            stop.set()
            for p in procs:
                p.join()
        out.append({"burners": burners, "throughput": {str(k): v for k, v in raw.items()}})
        print("raw beside", burners, {k: round(v) for k, v in raw.items()}, flush=True)
    return out


def raw_on_inputs(load, n_images: int, sizes: list[int], seconds: float) -> dict[str, dict[int, float]]:
    """In the worker: samples/s of the raw loop per batch size, on one batch called again and
    again (``same``, as ``baselines.raw_loop``), on a fresh view of the next rows each call
    (``fresh_view``) and on a fresh copy of them (``fresh_copy``)."""
    import itertools

    images = tiny_cnn_images(n_images)
    model = baselines._model(load, "cpu")
    out: dict[str, dict[int, float]] = {"same": {}, "fresh_view": {}, "fresh_copy": {}}
    for n in sizes:
        starts = itertools.cycle(range(0, len(images) - n + 1, n))
        variants = {
            "same": lambda: model(images[:n]),
            "fresh_view": lambda: model(images[(s := next(starts)):s + n]),
            "fresh_copy": lambda: model(images[(s := next(starts)):s + n].copy()),
        }
        for name, run in variants.items():
            run(), run()  # warm up
            out[name][n] = baselines.samples_per_second(run, n, seconds)
    return out


def raw_inputs(client, n_images: int, sizes: list[int], rounds: int) -> list[dict]:
    out = []
    for _ in range(rounds):
        ((_, table),) = client.run(raw_on_inputs, build_tiny_cnn, n_images, sizes, 2.0).items()
        out.append({name: {str(k): v for k, v in t.items()} for name, t in table.items()})
        print("raw on inputs", {name: {k: round(v) for k, v in t.items()} for name, t in table.items()}, flush=True)
    return out


def cpu_seconds(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def thread_seconds(pid: int) -> dict[int, float]:
    import psutil

    return {t.id: t.user_time + t.system_time for t in psutil.Process(pid).threads()}


def budget(client, images: np.ndarray, name: str, worker_pid: int, **spec_kw) -> list[dict]:
    """Three closed-loop passes; per pass the wall time and where the CPU seconds went."""
    passes = []
    with ddb.Batcher(client, ddb.ModelSpec(name, load=build_tiny_cnn, **spec_kw)) as batcher:
        [f.result() for f in batcher.map(images[:4000])]
        for _ in range(3):
            client_0, worker_0, threads_0 = cpu_seconds(os.getpid()), cpu_seconds(worker_pid), thread_seconds(worker_pid)
            started, wall_0 = time.perf_counter(), time.time()
            [f.result() for f in batcher.map(images)]
            wall = time.perf_counter() - started
            threads_1 = thread_seconds(worker_pid)
            busiest = sorted((threads_1[k] - threads_0.get(k, 0.0) for k in threads_1), reverse=True)
            history = [h for h in batcher.history() if h["time"] >= wall_0]
            passes.append({
                "throughput": len(images) / wall, "wall_s": wall,
                "client_cpu_s": cpu_seconds(os.getpid()) - client_0,
                "worker_cpu_s": cpu_seconds(worker_pid) - worker_0,
                # the device thread is the busiest one; the event loop the next
                "worker_device_thread_cpu_s": busiest[0], "worker_loop_thread_cpu_s": busiest[1],
                "device_s": sum(h["compute_s"] for h in history),
                "mean_device_batch": float(np.mean([h["device_batch"] for h in history])) if history else None,
            })
            print(name, {k: round(v, 2) if isinstance(v, float) else v for k, v in passes[-1].items()}, flush=True)
    return passes


def main(argv: list[str] | None = None) -> None:
    from distributed import Client, LocalCluster

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the raw loop beside 0, 1 and 2 busy processes")
    parser.add_argument("--sections", default="raw_beside,raw_inputs,budget")
    parser.add_argument("--name", default="cpu_budget", help="result file name")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    images = tiny_cnn_images(args.requests)
    result: dict = {"machine": machine_stamp(), "requests": args.requests,
                    "case": "cpu: 3-conv CNN, 64x64 uint8, 1 worker x 1 thread"}
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        (worker_pid,) = client.run(os.getpid).values()
        result["torch_threads"] = next(iter(client.run(lambda: __import__("torch").get_num_threads()).values()))
        if "raw_beside" in sections:
            result["raw_beside"] = raw_beside(client, images, [32, 64, 256], args.rounds)
        if "raw_inputs" in sections:
            result["raw_inputs"] = raw_inputs(client, args.requests, [64, 256], args.rounds + 1)
        if "budget" in sections:
            result["budget"] = {
                name: budget(client, images, f"cnn-budget-{name}", worker_pid, **kw)
                for name, kw in (("default", {}), ("max32", {"max_batch_size": 32}), ("max64", {"max_batch_size": 64}))
            }
    save(args.name, result, args.out)


if __name__ == "__main__":
    main()
