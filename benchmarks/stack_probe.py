"""How long the client takes to stack a batch of ResNet images into a shared-memory slot, alone and
beside a thread running Python (as the client's event loop does while it delivers results):
``pwritev`` from a helper thread (``write``: ``dynbatch.transport.shared-memory-copy: write``), NumPy
in one thread or in four parallel parts (``numpy_1``, ``numpy_4``: ``shared-memory-copy: numpy``, the
client's default), and
``torch.stack`` in one or four parts (for the record: torch copies each row with its own thread
pool, whose threads wait for each other). Why it matters: ``dask_dynbatch.shm.ShmSlot.write_rows``.

    python benchmarks/stack_probe.py [--rows 1280] [--out benchmarks/results] [--name stack_probe]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from common import machine_stamp


def stack_numpy(samples, out, parts, pool):
    bounds = np.linspace(0, len(samples), parts + 1).astype(int)
    list(pool.map(lambda ab: np.stack(samples[ab[0]:ab[1]], out=out[ab[0]:ab[1]]), zip(bounds[:-1], bounds[1:])))


def stack_torch(samples, out, parts, pool):
    bounds = np.linspace(0, len(samples), parts + 1).astype(int)

    def part(ab):
        a, b = ab
        torch.stack([torch.from_numpy(s) for s in samples[a:b]], out=torch.from_numpy(out[a:b]))

    list(pool.map(part, zip(bounds[:-1], bounds[1:])))


def write_rows(samples, out_fd, parts, pool):
    """What the client does with ``shared-memory-copy: write`` (dask_dynbatch.shm.ShmSlot.write_rows): pwritev."""
    per_row = samples[0].nbytes
    for start in range(0, len(samples), 1024):
        os.pwritev(out_fd, samples[start:start + 1024], start * per_row)


def timed(fn, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"min_ms": 1e3 * min(times), "median_ms": 1e3 * float(np.median(times))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1280)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="stack_probe")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    samples = [rng.integers(0, 255, (224, 224, 3), dtype=np.uint8) for _ in range(args.rows)]
    nbytes = args.rows * samples[0].nbytes
    path = f"/dev/shm/stack-probe-{os.getpid()}"  # a slot as the client makes one
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.posix_fallocate(fd, 0, nbytes)
    os.unlink(path)
    out = np.frombuffer(mmap.mmap(fd, nbytes), np.uint8).reshape(args.rows, 224, 224, 3)
    out[:] = 1  # pages faulted in, like a reused slot
    pool = ThreadPoolExecutor(4)
    results = {}
    for busy in (False, True):
        stop = threading.Event()
        spinner = None
        if busy:
            def spin():
                x = 0
                while not stop.is_set():
                    x += 1
            spinner = threading.Thread(target=spin, daemon=True)
            spinner.start()
        for name, fn, parts in (("write", write_rows, 1), ("numpy_1", stack_numpy, 1), ("numpy_4", stack_numpy, 4),
                                ("torch_1", stack_torch, 1), ("torch_4", stack_torch, 4)):
            reps = 1 if busy and name != "write" else 5
            out[:] = 0
            target = fd if fn is write_rows else out
            r = timed(lambda: pool.submit(fn, samples, target, parts, pool).result() if fn is write_rows
                      else fn(samples, target, parts, pool), reps)
            assert np.array_equal(out[-1], samples[-1]) and np.array_equal(out[0], samples[0])
            results[f"{name}{'_beside_python' if busy else ''}"] = r
            print(name, "beside a Python thread" if busy else "alone", {k: round(v, 1) for k, v in r.items()}, flush=True)
        stop.set()
        if spinner:
            spinner.join()
    doc = {"machine": machine_stamp(), "rows": args.rows, "mbytes": out.nbytes / 1e6,
           "torch_threads": torch.get_num_threads(), "results": results,
           "note": "python benchmarks/stack_probe.py: stacking one batch of uint8 224x224x3 images into a "
                   "shared-memory slot, alone and beside a thread running Python"}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{args.name}.json").write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
