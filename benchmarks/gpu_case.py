"""The GPU case on a GPU machine: ResNet-50 fp16 channels-last on uint8
224x224 images sent from the client, every contender on the same cluster in one run.

Sections (``--sections``, comma separated; each writes into one JSON as it finishes):
  raw       the model alone, inputs already on the GPU, batch 1..512 (the ceiling)
  rawcompiled  the same under torch.compile (default mode), batch 64..512 (the compiled ceiling)
  compiled  dask-dynbatch with ModelSpec(compile=True), closed loop, once its buckets are compiled
  plain     plain Dask: one task per request; hand-chunked 32/128/512
  dynbatch  dask-dynbatch with default settings, closed loop
  dynbatchcomm  the same with the shared-memory transport off: every batch over the Dask comm (TCP)
  frontendgpu  the data path to the GPU alone: a torch module that returns 8 values per image
  frontend  the data path alone: the same images through a model that returns 8 values per image
            (on the worker's CPU), shared-memory transport, batches of up to 512
  rawprobe  is the ceiling the model's or the setting's? torchvision's ResNet-50 alone on fp16 input,
            and our wrapper with cudnn.benchmark on, batch 256 and 512
  open      open loop, Poisson arrivals at 30/70/100 % of the measured capacity
  openfrozen  the same with gc.freeze() in the client before each load
  cupy      a CuPy MLP: batched results against NumPy, throughput
  pressure  another process holds most GPU memory as the run starts, lets go, takes it again; plain
            Dask at fixed chunks of 2,048 and 512 under the same neighbour
  h2dprobe  staging a batch to the GPU from page-locked memory, alone and beside compute
  hetero    one GPU worker plus two CPU workers (placement)
  shared    two workers on the one GPU, one with a much smaller memory budget
  daskcuda  the dynbatch closed loop again on dask-cuda's LocalCUDACluster
  multigpu  LocalCUDACluster on 1 GPU vs all visible GPUs (scaling), then the GPUs made unequal:
            another process holds most of the last GPU's memory

    python benchmarks/gpu_case.py --out DIR --sections raw,plain,dynbatch,open,cupy
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_stamp, open_loop, rate, server_state  # noqa: E402

import dask_dynbatch as ddb  # noqa: E402
from dask_dynbatch import baselines  # noqa: E402
from dask_dynbatch.examples import build_numpy_mlp, build_resnet50, resnet_images  # noqa: E402

POOL = 1024  # distinct images; requests reuse them

if os.environ.get("DYNBATCH_SMOKE"):  # a CPU smoke test of this script: the tiny CNN instead
    from dask_dynbatch.examples import build_tiny_cnn as build_resnet50  # noqa: F811
    from dask_dynbatch.examples import tiny_cnn_images as resnet_images  # noqa: F811


def start_cluster(**kw):
    from distributed import Client, LocalCluster

    kw.setdefault("n_workers", 1)
    kw.setdefault("threads_per_worker", 1)
    cluster = LocalCluster(processes=True, dashboard_address=":0", **kw)
    client = Client(cluster)
    return cluster, client


def sec_raw(client, images, res, args):
    ((_, table),) = client.run(baselines.raw_loop, build_resnet50, images[0], [1, 64, 128, 256, 512], 3.0).items()
    res["raw"] = {str(k): v for k, v in table.items()}
    res["ceiling"] = max(table.values())


def _raw_variants(images_row, seconds=3.0):
    """In the worker: the plain torchvision ResNet-50 (fp16, channels-last, on normalised fp16 input)
    and our uint8 wrapper with and without cudnn.benchmark, at batch 256 and 512."""
    import torch
    import torchvision

    out = {}
    dev = "cuda:0"
    plain = torchvision.models.resnet50(weights=None).eval().half().to(dev, memory_format=torch.channels_last)
    ours = build_resnet50(dev).to(dev)

    def measure(fn, x):
        with torch.inference_mode():
            fn(x)  # warm up
            fn(x)
            torch.cuda.synchronize()
            return baselines.samples_per_second(lambda: fn(x), len(x), seconds, torch.cuda.synchronize)

    for n in (256, 512):
        u8 = torch.from_numpy(np.ascontiguousarray(np.broadcast_to(images_row, (n, *images_row.shape)))).to(dev)
        f16 = torch.randn(n, 3, 224, 224, device=dev).half().contiguous(memory_format=torch.channels_last)
        for bench in (False, True):
            torch.backends.cudnn.benchmark = bench
            out[f"torchvision_fp16_cl_{n}_cudnn_benchmark_{bench}"] = measure(plain, f16)
            out[f"ours_uint8_{n}_cudnn_benchmark_{bench}"] = measure(ours, u8)
        torch.backends.cudnn.benchmark = False
    return out


def sec_rawprobe(client, images, res, args):
    ((_, table),) = client.run(_raw_variants, images[0]).items()
    res["rawprobe"] = table


def sec_rawcompiled(client, images, res, args):
    ((_, table),) = client.run(baselines.raw_compiled_loop, build_resnet50, images[0], [64, 128, 256, 512], 3.0).items()
    res["raw_compiled"] = {str(k): v for k, v in table["throughput"].items()}
    res["raw_compiled_compile_seconds"] = {str(k): v for k, v in table["compile_seconds"].items()}
    res["compiled_ceiling"] = max(table["throughput"].values())


COMPILED_COLUMNS = ("time", "size", "latency", "compute_s", "wait_s", "stage_s", "queued_s", "round_trip_s", "stack_s",
                    "device_batch", "controller_size")


def _dynamo_counters():
    """In the worker: torch._dynamo's frame and recompile counters (JSON-able)."""
    import torch._dynamo.utils

    counters = torch._dynamo.utils.counters
    return {group: dict(counters[group]) for group in ("frames", "stats", "recompiles", "graph_break") if group in counters}


def sec_compiled(client, images, res, args):
    """ModelSpec(compile=True): serve until the controller's bucket is compiled, then time."""
    # the compiled ceiling is flat from 512 on (27,961 at 512 on the H200); larger buckets would
    # only add cold compiles (tens of seconds each) to the warm-up
    spec = ddb.ModelSpec("resnet50-compiled", load=build_resnet50, compile=True, max_batch_size=512)
    samples = [images[i % len(images)] for i in range(args.requests)]
    warmup = []
    with ddb.Batcher(client, spec) as batcher:
        started = time.time()
        while time.time() - started < args.compile_wait:
            [f.result(timeout=180) for f in batcher.map(samples[:8000])]  # fail, never hang, the section
            (worker,) = batcher.stats()["workers"].values()
            state = worker["compile"] or {}
            size = worker["controller"]["size"]
            buckets = state.get("buckets") or {}
            warmup.append({"t": time.time() - started, "size": size, "ready": state.get("ready"),
                           "compiled_batches": state.get("compiled_batches"), "eager_batches": state.get("eager_batches")})
            print("compile warm-up", warmup[-1], flush=True)
            settled = len(warmup) >= 3 and warmup[-3]["size"] == warmup[-2]["size"] == size
            idle = not any(b.get("state") in ("queued", "compiling") for b in buckets.values())
            if state.get("error") or (buckets.get(str(size), {}).get("state") == "ready" and settled and idle):
                break
        untimed = []
        profiler = None
        if args.profile_compiled:  # py-spy of the worker over the passes below: what a slow batch waits on
            (pid,) = client.run(os.getpid).values()
            try:
                profiler = subprocess.Popen(["py-spy", "record", "--format", "raw", "--idle", "--threads", "-r", "100",
                                             "-d", str(args.profile_seconds), "-o", str(Path(args.out) / "compiled_worker.txt"),
                                             "--pid", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            except OSError as exc:  # no py-spy here: the section runs unprofiled
                print("compiled: no profile:", exc, flush=True)
        dynamo_before = next(iter(client.run(_dynamo_counters).values()))
        for _ in range(2):  # as the eager closed loop: untimed passes once every bucket is ready
            untimed.append(rate(len(samples), lambda: [f.result() for f in batcher.map(samples)])[0])
        timed = samples * 3
        t_timed = time.time()
        throughput, seconds = rate(len(timed), lambda: [f.result() for f in batcher.map(timed)])
        dynamo_after = next(iter(client.run(_dynamo_counters).values()))
        if profiler is not None:  # stop it now (py-spy writes its file on SIGINT)
            profiler.send_signal(signal.SIGINT)
            try:
                profiler.wait(timeout=30)
            except subprocess.TimeoutExpired:
                profiler.kill()
        stats = batcher.stats()
        hist = batcher.history()
    (worker,) = stats["workers"].values()
    out = {
        "untimed_passes": untimed,
        "throughput": throughput,
        "seconds": seconds,
        "requests": len(timed),
        "latency_p50_ms": stats["latency_p50"] * 1e3,
        "latency_p99_ms": stats["latency_p99"] * 1e3,
        "controller_size": worker["controller"]["size"],
        "compile": worker["compile"],
        "warmup": warmup,
        "timed_from": t_timed,
        # torch._dynamo's counters in the worker before the untimed passes and after the timed one:
        # a recompile while serving shows as a change
        "dynamo_counters": {"before": dynamo_before, "after": dynamo_after},
        "history_columns": COMPILED_COLUMNS,
        "history": [tuple(h[k] for k in COMPILED_COLUMNS) for h in hist[-2000:]],
    }
    if res.get("ceiling"):
        out["ratio_to_eager_ceiling"] = throughput / res["ceiling"]
    if res.get("compiled_ceiling"):
        out["ratio_to_compiled_ceiling"] = throughput / res["compiled_ceiling"]
    res["compiled"] = out


def sec_h2dprobe(images, res, args):
    """Why staging is slower while the GPU computes: a batch of 1,536 images copied to the GPU on a
    side stream from page-locked (cudaHostRegister) memory, alone and while ResNet-50 runs batch
    1,536 on the default stream, into a fresh device tensor and into one allocated beforehand."""
    import torch

    model = build_resnet50("cuda:0").to("cuda:0").eval()
    rows = 1536
    host = np.ascontiguousarray(np.stack([images[i % len(images)] for i in range(rows)]))
    rc = int(torch.cuda.cudart().cudaHostRegister(host.ctypes.data, host.nbytes, 0))
    src = torch.from_numpy(host)
    side = torch.cuda.Stream()
    dst = torch.empty(src.shape, dtype=src.dtype, device="cuda:0")
    x = src.to("cuda:0")
    out = {"register_rc": rc, "bytes": host.nbytes}

    def copy(fresh):
        t0 = time.perf_counter()
        with torch.cuda.stream(side):
            if fresh:
                y = src.to("cuda:0", non_blocking=True)
            else:
                y = dst.copy_(src, non_blocking=True)
        side.synchronize()
        del y
        return time.perf_counter() - t0

    with torch.inference_mode():
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        for fresh in (True, False):
            alone = [copy(fresh) for _ in range(5)]
            busy = []
            for _ in range(5):
                model(x)  # queued on the default stream; the copy runs beside it
                busy.append(copy(fresh))
                torch.cuda.synchronize()
            key = "fresh" if fresh else "preallocated"
            out[key] = {"alone_ms": 1e3 * float(np.median(alone)), "beside_compute_ms": 1e3 * float(np.median(busy))}
        t0 = time.perf_counter()
        model(x)
        torch.cuda.synchronize()
        out["compute_ms"] = 1e3 * (time.perf_counter() - t0)

    # as in the worker: a device thread runs the batch and copies its outputs to the host while
    # this (transfer) thread stages the next batch. "pageable": .cpu() right after the forward
    # (the copy waits behind the kernels); "sync_first": the stream is synchronized, then .cpu()
    def device_thread(how, launched):
        with torch.inference_mode():
            y = model(x)
            launched.set()
            if how == "sync_first":
                torch.cuda.current_stream().synchronize()
            y.cpu()

    for how in ("pageable", "sync_first"):
        times = []
        for _ in range(5):
            launched = threading.Event()
            t = threading.Thread(target=device_thread, args=(how, launched))
            t.start()
            launched.wait()
            time.sleep(0.002)  # the device thread is in its copy (or its wait) now
            times.append(copy(True))
            t.join()
            torch.cuda.synchronize()
        out[f"beside_device_thread_{how}_ms"] = 1e3 * float(np.median(times))
    torch.cuda.cudart().cudaHostUnregister(host.ctypes.data)
    res["h2d_probe"] = out
    print("h2d probe", out, flush=True)


def sec_plain(client, images, res, args):
    out = {}
    load = build_resnet50
    n1 = 400
    client.gather(client.map(baselines.predict_one, [load] * 8, list(images[:8]), pure=False))
    out["one_task_per_request"], _ = rate(n1, lambda: client.gather(
        client.map(baselines.predict_one, [load] * n1, list(images[:n1]), pure=False)))
    many = np.concatenate([images] * 4)  # 4096 images
    for chunk in (32, 128, 512):
        chunks = [many[i: i + chunk] for i in range(0, len(many), chunk)]
        client.gather(client.map(baselines.predict_chunk, [load] * 2, chunks[:2], pure=False))
        out[f"chunked_{chunk}"], _ = rate(len(many), lambda: client.gather(
            client.map(baselines.predict_chunk, [load] * len(chunks), chunks, pure=False)))
    res["plain"] = out


def closed_loop(client, images, name, n, profile_dir=None, passes=3, **spec_kw):
    """Closed loop (``n`` requests submitted at once), timed after ``passes`` untimed passes of the
    same: the controller climbs and every shape it visits is set up once (cuDNN plans, pinned
    buffers). The first pass's throughput (right after the model loaded) is reported beside it."""
    spec = ddb.ModelSpec(name, load=build_resnet50, **spec_kw)
    samples = [images[i % len(images)] for i in range(n)]
    with ddb.Batcher(client, spec) as batcher:
        [f.result() for f in batcher.map(samples[: n // 5])]  # load
        warm = []
        for _ in range(passes):
            throughput, _ = rate(n, lambda: [f.result() for f in batcher.map(samples)])
            warm.append({"throughput": throughput,
                         "sizes": {a: w["controller"]["size"] for a, w in batcher.stats()["workers"].items()}})
            print(name, "untimed pass", warm[-1], flush=True)
        profilers = []
        if profile_dir:  # py-spy of the worker and this client while the timed run goes on
            pids = {"worker": next(iter(client.run(os.getpid).values())), "client": os.getpid()}
            profilers = [subprocess.Popen(["py-spy", "record", "--format", "raw", "-d", "4", "-r", "200", "--threads",
                                           "-o", str(Path(profile_dir) / f"{who}.txt"), "--pid", str(pid)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT) for who, pid in pids.items()]
        failed = []
        t_timed = time.time()
        throughput, seconds = rate(n, lambda: failed.extend(f for f in batcher.map(samples) if f.exception() is not None))
        for p in profilers:
            p.wait(timeout=30)
        stats = batcher.stats()
        hist = batcher.history()
        servers = server_state(client, name)  # the workers' model servers: they own the batch size
    timed = [h for h in hist if h["time"] >= t_timed]
    return {
        "throughput": throughput,
        "seconds": seconds,
        "timed_started": t_timed,  # epoch seconds: where the timed pass's history starts
        "requests": n,
        "failed": len(failed),
        "untimed_passes": warm,
        "first_pass_throughput": warm[0]["throughput"] if warm else None,
        "latency_p50_ms": stats["latency_p50"] * 1e3,
        "latency_p99_ms": stats["latency_p99"] * 1e3,
        "timed_mean_batch": sum(h["size"] for h in timed) / max(1, len(timed)),
        "timed_mean_device_batch": sum(h["device_batch"] for h in timed) / max(1, len(timed)),
        "workers": {a: {k: w[k] for k in ("device", "samples", "batches", "memory_cap", "throughput", "transport")}
                    | {"controller_size": w["controller"]["size"], "reason": w["controller"]["reason"],
                       "phase": w["controller"]["phase"], "mean_batch": w["samples"] / max(1, w["batches"])}
                    | server_summary(servers.get(a))
                    for a, w in stats["workers"].items()},
        # the first 8 columns as before the rebuild (plot_gpu.py reads them by position)
        "history_columns": CLOSED_COLUMNS,
        "history": [tuple(h[k] for k in CLOSED_COLUMNS) for h in hist[-3000:]],
    }


#: ``closed_loop``'s history rows; ``size``: rows of the shipment, ``device_batch``: of the device
#: batch it ran in (rows of every client), ``controller_size``: the server's size after it
CLOSED_COLUMNS = ("time", "worker", "size", "latency", "cap", "compute_s", "wait_s", "stage_s", "device_batch",
                  "controller_size", "queued_s", "stack_s", "round_trip_s", "worker_s")


def server_summary(state: dict | None) -> dict:
    """What a worker's model server did (from ``server_states()`` on the worker): device batches,
    their mean size, and the controller's final size and phase."""
    if not state:
        return {}
    controller = state.get("controller") or {}
    return {"server_batches": state.get("batches"), "server_samples": state.get("samples"),
            "server_mean_batch": state["samples"] / max(1, state["batches"]) if state.get("batches") else None,
            "server_shared_batches": state.get("shared_batches"), "loads": state.get("loads"),
            "server_controller_size": controller.get("size"), "server_phase": controller.get("phase"),
            "server_best_size": controller.get("best_size")}


def sec_dynbatch(client, images, res, args):
    res["dynbatch"] = closed_loop(client, images, "resnet50", args.requests, profile_dir=args.profile and args.out)
    if res.get("ceiling"):
        res["dynbatch"]["ratio_to_ceiling"] = res["dynbatch"]["throughput"] / res["ceiling"]


def build_head(device="cpu"):
    """Returns each image's first 8 bytes as float32: the data path without a model."""
    return _head


def _head(batch):
    return batch.reshape(len(batch), -1)[:, :8].astype(np.float32)


def sec_frontend(client, images, res, args):
    spec = ddb.ModelSpec("head", load=build_head, device="cpu", max_batch_size=512)
    samples = [images[i % len(images)] for i in range(args.requests)]
    with ddb.Batcher(client, spec) as batcher:
        got = [f.result() for f in batcher.map(samples[:8000])]
        assert np.array_equal(got[7], images[7].reshape(-1)[:8].astype(np.float32))
        throughput, seconds = rate(len(samples), lambda: [f.result() for f in batcher.map(samples)])
        (worker,) = batcher.stats()["workers"].values()
    res["frontend"] = {"throughput": throughput, "seconds": seconds, "transport": worker["transport"],
                       "mean_batch": worker["samples"] / max(1, worker["batches"])}


def build_gpu_head(device="cpu"):
    """A torch module returning each image's first 8 values as float32 on the worker's device: the
    data path to the GPU (shared memory, page-locked, copied by DMA) without a model."""
    import torch

    class Head(torch.nn.Module):
        def forward(self, images):
            return images.reshape(len(images), -1)[:, :8].float()

    return Head().to(device)


def sec_frontendgpu(client, images, res, args):
    spec = ddb.ModelSpec("gpu-head", load=build_gpu_head, max_batch_size=1024)
    samples = [images[i % len(images)] for i in range(args.requests)]
    with ddb.Batcher(client, spec) as batcher:
        got = [f.result() for f in batcher.map(samples[:8000])]
        assert np.array_equal(got[7], images[7].reshape(-1)[:8].astype(np.float32))
        for _ in range(2):
            [f.result() for f in batcher.map(samples)]
        throughput, seconds = rate(len(samples), lambda: [f.result() for f in batcher.map(samples)])
        (worker,) = batcher.stats()["workers"].values()
        hist = batcher.history()[-200:]
    res["frontend_gpu"] = {"throughput": throughput, "seconds": seconds, "transport": worker["transport"],
                           "device": worker["device"], "mean_batch": worker["samples"] / max(1, worker["batches"]),
                           "mean_stage_ms": 1e3 * sum(h["stage_s"] for h in hist) / max(1, len(hist)),
                           "mean_rows": sum(h["size"] for h in hist) / max(1, len(hist)),
                           "mean_device_batch": sum(h["device_batch"] for h in hist) / max(1, len(hist))}


def sec_dynbatchprof(client, images, res, args):
    """The dynbatch closed loop again, with py-spy profiles of the worker and the client (not a
    headline figure: sampling costs some throughput)."""
    res["dynbatch_profiled"] = closed_loop(client, images, "resnet50-prof", args.requests, profile_dir=args.out)


def sec_dynbatchcomm(client, images, res, args):
    import dask

    with dask.config.set({"dynbatch.transport.shared-memory": False}):
        res["dynbatch_comm"] = closed_loop(client, images, "resnet50-comm", args.requests)
    if res.get("ceiling"):
        res["dynbatch_comm"]["ratio_to_ceiling"] = res["dynbatch_comm"]["throughput"] / res["ceiling"]


OPEN_COLUMNS = ("time", "size", "latency", "controller_size", "compute_s", "wait_s", "stage_s", "queued_s",
                "round_trip_s", "worker_s", "stack_s", "device_batch")


class ClientPauses:
    """This process's garbage collections of at least ``min_s`` seconds while installed: when
    each ended (time.time(), to line up with ``Batcher.history()``), its generation and length."""

    def __init__(self, min_s: float = 0.01):
        self.min_s = min_s
        self.pauses: list[tuple[float, int, float]] = []
        self.total_s = 0.0
        self._started = None

    def _callback(self, phase, info):
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            pause = time.perf_counter() - self._started
            self.total_s += pause
            if pause >= self.min_s:
                self.pauses.append((time.time(), info.get("generation"), pause))

    def __enter__(self):
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._callback)

    def summary(self):
        return {"total_s": self.total_s, "pauses_over_min": [list(p) for p in self.pauses], "min_s": self.min_s}


def sec_open(client, images, res, args, freeze=False, key="open_loop"):
    """Open loop at 30/70/100 % of the closed loop's throughput, this client's GC pauses recorded.
    ``freeze``: ``gc.freeze()`` in this client before each load (what a long-running front end may
    do after start-up: the collector no longer walks what exists by then)."""
    capacity = res.get("dynbatch", {}).get("throughput") or 10_000
    spec = ddb.ModelSpec(f"resnet50-{key}", load=build_resnet50)
    out = []
    with ddb.Batcher(client, spec) as batcher:
        for _ in range(3):  # as the closed loop: the controller climbs, shapes are set up once
            [f.result() for f in batcher.map([images[i % POOL] for i in range(args.requests)])]
        for frac in (0.3, 0.7, 1.0):
            if freeze:
                gc.collect()
                gc.freeze()
            started = time.time()
            with ClientPauses() as pauses:
                got = open_loop(batcher, images, frac * capacity, 6.0)
            hist = [h for h in batcher.history() if h["time"] >= started]
            got |= {"load": frac, "batches": len(hist), "gc_frozen": freeze, "started": started,
                    "client_gc": pauses.summary(),
                    "forecast": {a: w.get("forecast") for a, w in batcher.stats()["workers"].items()},
                    "mean_batch": sum(h["size"] for h in hist) / max(1, len(hist)),
                    "mean_device_batch": sum(h["device_batch"] for h in hist) / max(1, len(hist)),
                    "history_columns": OPEN_COLUMNS,
                    "history": [tuple(h[k] for k in OPEN_COLUMNS) for h in hist[-1500:]]}
            out.append(got)
            print({k: v for k, v in got.items() if k not in ("history", "client_gc")},
                  "client gc pauses", [(round(t - started, 3), g, round(s, 3)) for t, g, s in pauses.pauses], flush=True)
    if freeze:
        gc.unfreeze()
    res[key] = out
    res["latency_target_ms"] = spec.latency_target * 1e3


def sec_openfrozen(client, images, res, args):
    sec_open(client, images, res, args, freeze=True, key="open_loop_gc_frozen")


def sec_cupy(client, images, res, args):
    import cupy  # noqa: F401  (fails the section clearly if absent)

    xs = np.random.default_rng(1).standard_normal((20_000, 256), dtype=np.float32)
    spec = ddb.ModelSpec("cupy-mlp", load=build_numpy_mlp)
    with ddb.Batcher(client, spec) as batcher:
        got = np.stack([f.result() for f in batcher.map(xs[:2000])])
        expected = build_numpy_mlp("cpu")(xs[:2000])
        err = float(np.max(np.abs(got - expected)))
        throughput, _ = rate(len(xs), lambda: [f.result() for f in batcher.map(xs)])
        devices = {a: w["device"] for a, w in batcher.stats()["workers"].items()}
    res["cupy"] = {"max_abs_error_vs_numpy": err, "throughput": throughput, "devices": devices}


HOG = r"""
import select, sys, time, torch
keep = int(float(sys.argv[1]) * 2**30); hold = float(sys.argv[2])
until_told = len(sys.argv) > 3 and sys.argv[3] == "stdin"   # also let go at a line or EOF on stdin
blocks = []
deadline = time.time() + hold
while time.time() < deadline:          # greedy neighbour: take whatever frees up, down to `keep`
    if until_told and select.select([sys.stdin], [], [], 0)[0]:
        break
    free, total = torch.cuda.mem_get_info()
    grab = free - keep
    took = 0
    while grab > 256 * 2**20:  # in pieces of at most 1 GiB: one allocation of all that is free can fail
        try:
            blocks.append(torch.empty(min(grab, 2**30), dtype=torch.uint8, device="cuda"))
        except torch.cuda.OutOfMemoryError:
            break
        took += 1
        grab = torch.cuda.mem_get_info()[0] - keep
    if took:
        print(f"{time.time():.3f} hog holds", sum(b.numel() for b in blocks) / 2**30, "GiB", flush=True)
    time.sleep(0.05)
print(f"{time.time():.3f} hog releases", flush=True)
"""


def start_hog(path, keep_gib, hold_s=600):
    """The hog process; returns once it holds its memory (its first 'holds' line). It lets go
    after ``hold_s`` or when :func:`release_hog` is called, whichever comes first."""
    hog = subprocess.Popen([sys.executable, str(path), str(keep_gib), str(hold_s), "stdin"], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in hog.stdout:
        lines.append(line)
        if "holds" in line:
            break
    return hog, lines


def release_hog(hog):
    """Tells the hog to let go; returns the rest of its output once it exited."""
    hog.stdin.write("release\n")
    hog.stdin.flush()
    return hog.communicate(timeout=60)[0].splitlines(keepends=True)


def sec_pressure(images, res, args):
    """Another process holds most of the GPU's memory when the run starts (all but
    ``--hog-keep-gib``), lets go of it mid-run, takes whatever is free again, and lets go again.
    dask-dynbatch (default settings) serves every request; the same workload hand-chunked at fixed
    large batches on plain Dask, started under the same neighbour, is shown beside it."""
    from distributed import Client, LocalCluster

    hog_path = Path(args.out) / "hog.py"
    hog_path.write_text(HOG)
    timeline = []
    stop = threading.Event()

    def sample_memory():
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        while not stop.is_set():
            timeline.append((time.time(), pynvml.nvmlDeviceGetMemoryInfo(handle).free / 2**30))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()
    origin = time.time()
    out = {"hog_keep_gib": args.hog_keep_gib, "events": []}
    res["pressure"] = out

    def event(what):
        out["events"].append((time.time() - origin, what))
        print(f"pressure {time.time() - origin:.1f} s: {what}", flush=True)

    samples = [images[i % POOL] for i in range(args.pressure_requests)]
    hog_lines = []
    # 1. dask-dynbatch, started while the neighbour holds the memory
    hog, lines = start_hog(hog_path, args.hog_keep_gib)
    hog_lines += lines
    event("hog holds the GPU")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        spec = ddb.ModelSpec("resnet50-pressure", load=build_resnet50)
        with ddb.Batcher(client, spec) as batcher:
            event("dynbatch starts")
            futures = batcher.map(samples)
            futures[0].exception()
            event("first result")
            time.sleep(args.pressure_phase)
            hog_lines += release_hog(hog)
            event("hog released")
            time.sleep(args.pressure_phase)
            hog, lines = start_hog(hog_path, args.hog_keep_gib)  # takes what is free now
            hog_lines += lines
            event("hog holds again")
            time.sleep(args.pressure_phase)
            hog_lines += release_hog(hog)
            event("hog released again")
            failed = [f for f in futures if f.exception() is not None]
            event("dynbatch done")
            stats = batcher.stats()
            hist = batcher.history()
    errors = sorted({f"{type(f.exception()).__name__}: {str(f.exception())[:160]}" for f in failed[:50]})
    (worker,) = stats["workers"].values()
    out["dynbatch"] = {
        "requests": len(samples), "failed": len(failed), "delivered": stats["delivered"], "errors": errors,
        "history_columns": ("t", "size", "cap", "latency", "controller_size", "device_batch"),
        "history": [(h["time"] - origin, h["size"], h["cap"], h["latency"], h["controller_size"], h["device_batch"])
                    for h in hist],
        "final_controller": worker["controller"]["size"], "memory_cap": worker["memory_cap"],
    }
    event(f"dynbatch: {len(failed)} of {len(samples)} failed")
    # 2. plain Dask, fixed chunks, started under the same neighbour (fresh worker: nothing cached)
    many = np.stack(samples[:8192])
    for chunk in (2048, 512):
        hog, lines = start_hog(hog_path, args.hog_keep_gib)
        hog_lines += lines
        event(f"hog holds the GPU for fixed {chunk}")
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            chunks = [many[i: i + chunk] for i in range(0, len(many), chunk)]
            t0 = time.perf_counter()
            futs = client.map(baselines.predict_chunk, [build_resnet50] * len(chunks), chunks, pure=False)
            failed, errs = 0, set()
            for f in futs:
                try:
                    f.result()
                except Exception as e:
                    failed += 1
                    errs.add(f"{type(e).__name__}: {str(e)[:160]}")
            seconds = time.perf_counter() - t0
        hog_lines += release_hog(hog)
        out[f"fixed_{chunk}"] = {"chunks": len(chunks), "failed_chunks": failed, "errors": sorted(errs),
                                 "seconds_incl_model_load": seconds, "samples": len(many)}
        event(f"fixed {chunk}: {failed} of {len(chunks)} chunks failed")
    stop.set()
    out["free_gib"] = [(t - origin, f) for t, f in timeline]
    out["hog_output"] = "".join(hog_lines)[-3000:]
    out["origin_unix"] = origin


def sec_hetero(images, res, args):
    """One GPU worker and two CPU workers serving ResNet-50."""
    from distributed import Client, LocalCluster, Nanny

    cluster = LocalCluster(n_workers=0, processes=True, dashboard_address=":0")
    client = Client(cluster)
    try:
        client.register_plugin(ddb.DynBatchPlugin())
        loop_nannies = []
        for i, env in enumerate([{}, {"CUDA_VISIBLE_DEVICES": ""}, {"CUDA_VISIBLE_DEVICES": ""}]):
            loop_nannies.append(cluster.sync(Nanny, cluster.scheduler_address, nthreads=4 if i else 1,
                                             env=env, name=f"{'gpu' if i == 0 else 'cpu'}-{i}"))
        client.wait_for_workers(3)
        # the reference benchmark is no longer run at worker start: measure now, for placement's
        # prior until each worker has run a batch; the scores reach the scheduler with a heartbeat
        tables = ddb.rerun_benchmark(client)
        time.sleep(4)
        gpu_only = closed_loop(client, images, "resnet50-gpu-only", args.requests // 2, resources=None, device="cuda")
        both = closed_loop(client, images, "resnet50-hetero", args.requests // 2)
        res["hetero"] = both | {"gpu_only_throughput": gpu_only["throughput"],
                                "ratio_to_gpu_only": both["throughput"] / gpu_only["throughput"],
                                "reference_benchmark": {a: (t or {}).get("best_throughput", (t or {}).get("error"))
                                                        for a, t in tables.items()}}
    finally:
        for n in locals().get("loop_nannies", []):
            cluster.sync(n.close)
        client.close()
        cluster.close()


def sec_shared(images, res, args):
    """Two workers on one GPU, with memory budgets 0.5 and 0.05 (the one-GPU variant of the several-GPU run)."""
    from distributed import Client, LocalCluster, Nanny

    cluster = LocalCluster(n_workers=0, processes=True, dashboard_address=":0")
    client = Client(cluster)
    nannies = []
    try:
        client.register_plugin(ddb.DynBatchPlugin())
        for name, budget in (("big", "0.5"), ("small", "0.05")):
            nannies.append(cluster.sync(Nanny, cluster.scheduler_address, nthreads=1, name=name,
                                        env={"DASK_DYNBATCH__MEMORY_BUDGET": budget}))
        client.wait_for_workers(2)
        res["shared_gpu"] = closed_loop(client, images, "resnet50-shared", args.requests // 2)
    finally:
        for n in nannies:
            cluster.sync(n.close)
        client.close()
        cluster.close()


def sec_daskcuda(images, res, args):
    from dask_cuda import LocalCUDACluster
    from distributed import Client

    with LocalCUDACluster(dashboard_address=":0") as cluster, Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        out = closed_loop(client, images, "resnet50-cuda", args.requests)
        state = client.run_on_scheduler(lambda dask_scheduler: {
            a: {k: v for k, v in ws.metrics.items() if k.startswith("gpu")} for a, ws in dask_scheduler.workers.items()})
        out["scheduler_gpu_metrics"] = state
        res["dask_cuda"] = out


def sec_multigpu(images, res, args):
    """Scaling from 1 GPU to every visible GPU, then the GPUs made unequal."""
    from dask_cuda import LocalCUDACluster
    from distributed import Client
    from distributed.diagnostics import nvml

    gpus = nvml.device_get_count()
    out = {"gpus": gpus}
    res["multigpu"] = out
    if gpus < 2:
        out["error"] = "fewer than 2 GPUs visible"
        return
    all_gpus = ",".join(str(i) for i in range(gpus))

    def shares(run):
        total = sum(w["samples"] for w in run["workers"].values()) or 1
        return {a: w["samples"] / total for a, w in run["workers"].items()}

    with LocalCUDACluster(CUDA_VISIBLE_DEVICES="0", dashboard_address=":0") as cluster, Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        out["one_gpu"] = closed_loop(client, images, "resnet50-1gpu", args.requests)
    print("1 GPU", out["one_gpu"]["throughput"], flush=True)
    with LocalCUDACluster(CUDA_VISIBLE_DEVICES=all_gpus, dashboard_address=":0") as cluster, Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        two = closed_loop(client, images, "resnet50-allgpu", args.requests * gpus)
        out["all_gpus"] = two | {"shares": shares(two)}
        out["scaling"] = two["throughput"] / out["one_gpu"]["throughput"]
        print("all GPUs", two["throughput"], "scaling", out["scaling"], flush=True)
        # unequal GPUs: a neighbour takes all but `hog_keep_gib` of the last GPU, for the whole run
        hog_path = Path(args.out) / "hog.py"
        hog_path.write_text(HOG)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpus - 1))
        hog = subprocess.Popen([sys.executable, str(hog_path), str(args.hog_keep_gib), "60"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(6)  # the hog takes the memory; the worker's poll publishes the new cap
        worker_gpu = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0])
        unequal = closed_loop(client, images, "resnet50-unequal", args.requests * gpus)
        hog.kill()
        hog_out = hog.communicate(timeout=30)[0]
        memory = client.run(lambda dask_worker: {
            d: {k: r.get(k) for k in ("effective_free", "used_fraction", "capacity")}
            for d, r in (dask_worker.extensions["dynbatch"].heartbeat().get("devices") or {}).items()})
        out["unequal"] = unequal | {"shares": shares(unequal), "worker_gpu": worker_gpu,
                                    "memory_after": memory, "hog_output": hog_out[-1500:],
                                    "hog_gpu": gpus - 1, "hog_keep_gib": args.hog_keep_gib}
        print("unequal", unequal["throughput"], shares(unequal), flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--sections", default="raw,plain,dynbatch,open,cupy")
    parser.add_argument("--requests", type=int, default=40_000)
    parser.add_argument("--pressure-requests", type=int, default=200_000)
    parser.add_argument("--hog-keep-gib", type=float, default=3.0)
    parser.add_argument("--pressure-phase", type=float, default=4.0, help="seconds of each phase of the pressure section")
    parser.add_argument("--name", default="gpu_case")
    parser.add_argument("--compile-wait", type=float, default=240.0, help="longest warm-up of the compiled section (s)")
    parser.add_argument("--profile", action="store_true", help="py-spy profiles of the dynbatch closed loop")
    parser.add_argument("--profile-compiled", action="store_true", help="py-spy profile of the worker in the compiled section")
    parser.add_argument("--profile-seconds", type=int, default=120, help="longest that profile runs (s); it stops after the timed pass")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    res["machine"] = machine_stamp()
    images = resnet_images(POOL)
    sections = args.sections.split(",")

    def save():
        path.write_text(json.dumps(res, indent=1, default=float))

    in_cluster = [s for s in sections if s in ("raw", "rawprobe", "rawcompiled", "plain", "frontend", "dynbatch", "dynbatchcomm",
                                               "dynbatchprof",
                                               "compiled", "open", "openfrozen", "cupy", "frontendgpu")]
    if in_cluster:
        cluster, client = start_cluster()
        try:
            # every contender runs on the same worker, under the same worker settings
            client.register_plugin(ddb.DynBatchPlugin())
            for s in in_cluster:
                t0 = time.time()
                try:
                    globals()[f"sec_{s}"](client, images, res, args)
                except Exception:
                    res.setdefault("errors", {})[s] = traceback.format_exc()[-3000:]
                res.setdefault("section_seconds", {})[s] = time.time() - t0
                print(s, "done in", round(time.time() - t0, 1), "s", {k: v for k, v in res.items() if k == s and not isinstance(v, dict)}, flush=True)
                save()
        finally:
            client.close()
            cluster.close()
    for s in ("h2dprobe", "pressure", "hetero", "shared", "daskcuda", "multigpu"):
        if s in sections:
            t0 = time.time()
            try:
                globals()[f"sec_{s}"](images, res, args)
            except Exception:
                res.setdefault("errors", {})[s] = traceback.format_exc()[-3000:]
            res.setdefault("section_seconds", {})[s] = time.time() - t0
            print(s, "done in", round(time.time() - t0, 1), "s", flush=True)
            save()
    save()
    summary = {k: res.get(k) for k in ("ceiling",)}
    summary["dynbatch"] = res.get("dynbatch", {}).get("throughput")
    summary["dynbatch_comm"] = res.get("dynbatch_comm", {}).get("throughput")
    summary["rawprobe"] = res.get("rawprobe")
    summary["frontend"] = res.get("frontend")
    summary["open"] = [(o.get("load"), o.get("p50_ms"), o.get("p99_ms")) for o in res.get("open_loop", [])]
    summary["dynbatch_workers"] = res.get("dynbatch", {}).get("workers")
    summary["ratio"] = res.get("dynbatch", {}).get("ratio_to_ceiling")
    summary["plain"] = res.get("plain")
    summary["compiled_ceiling"] = res.get("compiled_ceiling")
    summary["compiled"] = {k: res.get("compiled", {}).get(k) for k in ("throughput", "ratio_to_eager_ceiling", "controller_size")}
    summary["multigpu"] = {k: (v.get("throughput") if isinstance(v, dict) else v) for k, v in res.get("multigpu", {}).items()}
    summary["errors"] = list(res.get("errors", {}))
    print(json.dumps(summary, indent=1, default=float), flush=True)


if __name__ == "__main__":
    main()
