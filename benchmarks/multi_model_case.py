"""Three models sharing one GPU whose memory is the binding limit, under a job mix that changes.

One LocalCluster worker process with the GPU. Its memory is limited for every contender alike by a
per-process limit (``torch.cuda.set_per_process_memory_fraction``, which dask-dynbatch reads as the
device's capacity): the plugin's ``memory_budget`` would only hold dask-dynbatch back, while the
static loops below would still use the whole card. The limit is the resident weights plus
``--pressure`` times the memory the three models need together at the batch sizes where each one's
throughput levels off (from the sweep), or ``--budget-gib``. Three models are loaded at once:

``segmenter``   torchvision FCN-ResNet50 (random weights), fp16, uint8 512x512 images in; returns the
                class map at 1/4 resolution and the image at 1/2 (what the crop step cuts from)
``classifier``  ResNet-50, fp16 channels-last, uint8 224x224 images in (``examples.build_resnet50``)
``vit``         torchvision ViT-B/16 (random weights), fp16, uint8 224x224 images in: a transformer,
                a few MB per sample against the segmenter's tens

Jobs arrive open-loop (Poisson; the same arrival schedule for every contender) in three phases:
segmenter-heavy, classifier-heavy, and a burst of all three; some jobs are a ``Pipeline`` segment ->
crop regions (CPU) -> classify each crop (a fan-out to the classifier). Rates are fractions of each
model's throughput alone at the best safe static batch size (``PHASES``) times ``--load`` (default
1.3: the phases ask 1.04, 1.04 and 1.76 times what the safe static sizes serve, so that a difference
in throughput can show; at a load every contender keeps up with, all serve the same).

``dynbatch``        dask-dynbatch, default plugin settings: three Batchers (each ModelSpec gives its
                    name, load function and latency target only) and a Pipeline, fed from this
                    client; latency from submit to the result here. Warmed up for ``--warmup``
                    seconds of the burst mix first.
``static_safe``     in the worker, one serving thread per model with a CUDA stream of its own (as
                    Triton gives each model an instance: batches of the three models run at the same
                    time; inputs copied from page-locked memory),
                    fixed batch sizes: a batch leaves when full or when its oldest request waited
                    5 ms (dask-dynbatch's default ``max_delay``), padded up to a power of two (shapes
                    warmed in the sweep). The sizes are those a careful user picks from the sweep: the
                    best throughput whose three batches fit the limit together (the burst, the worst
                    mix), then checked by a rehearsal of the run (its three phases at the rates these
                    sizes would get, pipeline jobs and their crops included, ``--verify-seconds`` each,
                    then every model's queue filled at once: full batches of all three together)
                    through this same server, and lowered until no batch fails; checked again the same
                    way right before its run (what the contenders before it left allocated counts).
``static_average``  the same, sized for the average mix: the memory of the three models' batches, each
                    weighted by the share of the time its model is busy at the average mix, fits the
                    limit (the memory in use fits on average, not when all three run at once);
                    requests of a batch that runs out of memory fail (counted).
``no_batching``     the same threads, one request per batch.

The static contenders run inside the worker process with inputs already there (no transport, the
arrival schedule replayed by a feeder thread there): their best case. Reported per phase: throughput
and p50/p99 latency per model and for the pipeline jobs, failed and unfinished requests; over time:
dask-dynbatch's device batches and memory caps per model (``Batcher.history()``, ``stats()``), the
GPU memory the worker process holds; targets: 0 failed for dask-dynbatch, total throughput >= 1.2x
the best static contender that failed nothing in the run (``targets.throughput_baseline``; a static
contender whose requests failed was not safe, whatever its check said: ``static_safe_was_safe``, and
the ratio is then no valid test of the target: ``throughput_valid``),
each model's p99 within 2x its latency target in phases dask-dynbatch keeps up with. JSON via
``common.save`` after each contender, and a PNG.

    python benchmarks/multi_model_case.py --out $OUT                   # on the GPU machine (~6 minutes)
    python benchmarks/multi_model_case.py --smoke --out /tmp/multi     # on a CPU: tiny models, the code paths only

``--smoke`` uses tiny torch models on small images and emulates the memory limit for the static
contenders (a ledger of the bytes each running batch needs: a batch that does not fit fails, as it
would on the GPU).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import sys
import threading
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_stamp, save  # noqa: E402

import dask_dynbatch as ddb  # noqa: E402

MODELS = ("segmenter", "classifier", "vit")
KINDS = (*MODELS, "pipeline")  # a request's kind in the schedule: a model, or a pipeline job
PIPELINE = KINDS.index("pipeline")
#: image side per model and size; crops for the classifier are cut at its side
SIDES = {"full": {"segmenter": 512, "classifier": 224, "vit": 224},
         "smoke": {"segmenter": 64, "classifier": 32, "vit": 32}}
#: batch sizes the sweep measures (powers of two: the static contenders pad partial batches to them)
LADDERS = {"full": {"segmenter": [1, 2, 4, 8, 16, 32], "classifier": [1, 2, 4, 8, 16, 32, 64, 128, 256, 512],
                    "vit": [1, 2, 4, 8, 16, 32, 64, 128, 256]},
           "smoke": {"segmenter": [1, 2, 4, 8], "classifier": [1, 2, 4, 8, 16], "vit": [1, 2, 4, 8, 16]}}
#: the latency each model's requests should see (ModelSpec.latency_target); a pipeline job's is the
#: segmenter's plus the classifier's
LATENCY_TARGET = {"segmenter": 0.3, "classifier": 0.1, "vit": 0.1, "pipeline": 0.4}
#: per phase, each kind's arrival rate as a fraction of its model's throughput alone at the best safe
#: static size (a pipeline job costs one segmentation and its crops' classifications)
PHASES = [
    ("segmenter-heavy", {"segmenter": 0.55, "classifier": 0.1, "vit": 0.05, "pipeline": 0.1}),
    ("classifier-heavy", {"segmenter": 0.05, "classifier": 0.5, "vit": 0.2, "pipeline": 0.05}),
    ("burst", {"segmenter": 0.4, "classifier": 0.4, "vit": 0.4, "pipeline": 0.15}),
]
MAX_DELAY = 0.005  # dask-dynbatch's default max_delay: how long a static batch waits to fill
POOL = {"segmenter": 32, "classifier": 64}  # distinct images per pool; requests reuse them
MIN_CROPS, MAX_CROPS = 3, 4  # regions one segmented image gives
#: the smoke run's emulated memory profile per model: (fixed bytes, bytes per sample)
SMOKE_PROFILE = {"segmenter": (1 << 20, 4 << 20), "classifier": (0, 256 << 10), "vit": (0, 128 << 10)}
COLORS = {"segmenter": "tab:red", "classifier": "tab:blue", "vit": "tab:green", "pipeline": "tab:purple"}


# -- models (built in the worker) -----------------------------------------------------------------------
def _from_uint8(net, dtype, *, channels_last: bool = False, segment: bool = False):
    """``net`` behind the conversion of uint8 NHWC images to normalised NCHW of ``dtype`` (ImageNet
    mean and spread, kept on the device as buffers). ``segment``: the net returns ``{"out": scores}``,
    and the module returns the class map at 1/4 resolution (uint8) and the image at 1/2 (what the
    crop step cuts from)."""
    import torch
    from torch import nn

    class FromUint8(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255)
            self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255)

        def forward(self, images):
            x = (images.permute(0, 3, 1, 2).to(dtype) - self.mean) / self.std
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if not segment:
                return self.net(x)
            mask = self.net(x)["out"][:, :, ::4, ::4].argmax(1).to(torch.uint8)
            return mask, images[:, ::2, ::2].contiguous()

    return FromUint8().eval()


def _tiny_nets():
    """The smoke run's stand-ins, without torchvision: a segmenter at full resolution (its memory per
    sample grows with the image) and a one-layer ViT."""
    import torch
    from torch import nn

    class TinySegmenter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                      nn.ReLU(), nn.Conv2d(16, 5, 1))

        def forward(self, x):
            return {"out": self.body(x)}

    class TinyViT(nn.Module):
        def __init__(self, side: int = 32, patch: int = 8, width: int = 32, classes: int = 10) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, width, patch, stride=patch)
            self.position = nn.Parameter(torch.zeros(1, (side // patch) ** 2, width))
            layer = nn.TransformerEncoderLayer(width, 2, 2 * width, batch_first=True, dropout=0.0)
            self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
            self.head = nn.Linear(width, classes)

        def forward(self, x):
            tokens = self.patch(x).flatten(2).transpose(1, 2) + self.position
            return self.head(self.encoder(tokens).mean(1))

    return TinySegmenter, TinyViT


def build_segmenter(device: str = "cpu", size: str = "full"):
    """FCN-ResNet50 with 21 classes, fp16 channels-last on CUDA (the GPU run), or a tiny segmenter
    (smoke): uint8 NHWC images -> (class map at 1/4 resolution, the image at 1/2)."""
    import torch

    cuda = str(device).startswith("cuda")
    torch.manual_seed(0)
    if size == "full":
        from torchvision.models.segmentation import fcn_resnet50

        net = fcn_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=False)
    else:
        net = _tiny_nets()[0]()
    model = _from_uint8(net, torch.float16 if cuda else torch.float32, channels_last=cuda, segment=True).to(device)
    return model.to(dtype=torch.float16, memory_format=torch.channels_last) if cuda else model


def build_classifier(device: str = "cpu", size: str = "full"):
    """ResNet-50, fp16 channels-last on CUDA (the GPU run), or the tiny CNN (smoke): uint8 NHWC -> logits."""
    from dask_dynbatch.examples import build_resnet50, build_tiny_cnn

    return (build_resnet50 if size == "full" else build_tiny_cnn)(device).eval().to(device)


def build_vit(device: str = "cpu", size: str = "full"):
    """ViT-B/16, fp16 on CUDA (the GPU run), or a one-layer ViT of width 32 (smoke): uint8 NHWC -> logits."""
    import torch

    cuda = str(device).startswith("cuda")
    torch.manual_seed(0)
    if size == "full":
        from torchvision.models import vit_b_16

        net = vit_b_16(weights=None)
    else:
        net = _tiny_nets()[1](side=SIDES["smoke"]["vit"])
    model = _from_uint8(net, torch.float16 if cuda else torch.float32).to(device)
    return model.half() if cuda else model


BUILDERS = {"segmenter": build_segmenter, "classifier": build_classifier, "vit": build_vit}


def pools(size: str) -> dict[str, np.ndarray]:
    """The images requests are made of (the same in the client and the worker): per model."""
    sides = SIDES[size]
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 256, size=(POOL["segmenter"], sides["segmenter"], sides["segmenter"], 3), dtype=np.uint8)
    cls = rng.integers(0, 256, size=(POOL["classifier"], sides["classifier"], sides["classifier"], 3), dtype=np.uint8)
    return {"segmenter": seg, "classifier": cls, "vit": cls}


def crop_regions(segmented: tuple[np.ndarray, np.ndarray], side: int = 224) -> list[np.ndarray]:
    """The pipeline's CPU step: the bounding boxes of the (up to ``MAX_CROPS``) largest classes of
    the class map that cover at least 1 % of it, then quadrants of the image until there are
    ``MIN_CROPS`` (with random weights the map is nearly one class: the quadrants stand in for the
    regions a trained model finds), each cut from the half-resolution image and resized (nearest)
    to ``side`` x ``side``."""
    mask, image = segmented
    classes, counts = np.unique(mask, return_counts=True)
    scale = image.shape[0] / mask.shape[0]
    boxes = []
    for c, count in sorted(zip(classes, counts), key=lambda cc: -cc[1])[:MAX_CROPS]:
        if count < 0.01 * mask.size:
            break
        ys, xs = np.nonzero(mask == c)
        boxes.append((int(ys.min() * scale), int((ys.max() + 1) * scale), int(xs.min() * scale), int((xs.max() + 1) * scale)))
    h, w = image.shape[:2]
    quadrants = [(0, h // 2, 0, w // 2), (0, h // 2, w // 2, w), (h // 2, h, 0, w // 2), (h // 2, h, w // 2, w)]
    boxes += quadrants[: max(0, MIN_CROPS - len(boxes))]
    return [_resize(image[y0:max(y1, y0 + 8), x0:max(x1, x0 + 8)], side) for y0, y1, x0, x1 in boxes]


def _resize(image: np.ndarray, side: int) -> np.ndarray:
    rows = np.arange(side) * image.shape[0] // side
    cols = np.arange(side) * image.shape[1] // side
    return np.ascontiguousarray(image[rows][:, cols])


# -- the worker's side: static models, the sweep, the static server, memory samples ---------------------
#: this module's state in the worker process (the client imports it by name, so the worker does too)
_WORKER: dict[str, Any] = {}


def _device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def worker_setup(size: str) -> dict:
    """Build the static contenders' copies of the three models and the image pools; start sampling
    the process's GPU memory (every 0.1 s, for the plot)."""
    import torch

    device = _device()
    started = time.perf_counter()
    _WORKER["size"] = size
    _WORKER["device"] = device
    _WORKER["models"] = {name: BUILDERS[name](device, size) for name in MODELS}
    _WORKER["pools"] = pools(size)
    if "memory" not in _WORKER:
        _WORKER["memory"] = []
        threading.Thread(target=_sample_memory, daemon=True, name="multi-memory").start()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"device": device, "load_s": time.perf_counter() - started, **memory_now()}


def memory_now() -> dict:
    """This process's GPU memory now: live tensors, the allocator's reservation, the device in use."""
    import torch

    if not torch.cuda.is_available():
        import psutil

        return {"allocated": psutil.Process().memory_info().rss, "reserved": None, "device_used": None}
    free, total = torch.cuda.mem_get_info()
    return {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved(),
            "device_used": total - free, "device_total": total}


def _sample_memory() -> None:
    samples = _WORKER["memory"]
    while True:
        try:
            now = memory_now()
            samples.append((time.time(), now["allocated"], now["reserved"], now["device_used"]))
        except Exception:  # a reading failed (the device is busy being reset): the next one may not
            pass
        time.sleep(0.1)


def memory_between(t0: float, t1: float) -> list[tuple]:
    """The memory samples taken between two epoch times (time, allocated, reserved, device used)."""
    return [s for s in _WORKER.get("memory", []) if t0 <= s[0] <= t1]


def set_memory_limit(limit_bytes: int | None) -> dict:
    """Limit this process's GPU memory (torch's per-process fraction, which dask-dynbatch's memory
    sizer reads as the device's capacity), and drop the allocator's cache."""
    import torch

    if not torch.cuda.is_available():
        return {"fraction": None}
    total = torch.cuda.mem_get_info()[1]
    fraction = 1.0 if limit_bytes is None else min(1.0, limit_bytes / total)
    torch.cuda.set_per_process_memory_fraction(fraction)
    torch.cuda.empty_cache()
    return {"fraction": fraction, "limit": int(fraction * total), "total": total}


def free_cache() -> None:
    """Between contenders: give the allocator's cache back, so that each starts alike."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _batch(name: str, rows: int) -> np.ndarray:
    pool = _WORKER["pools"][name]
    return np.ascontiguousarray(pool[np.arange(rows) % len(pool)])


def _own_stream(name: str):
    """Model ``name``'s CUDA stream (as a serving instance has one): its copies and kernels do not
    wait for the other models' threads; on a CPU, nothing. One stream per model for the whole
    process, reused by every check and run: cuBLAS keeps a workspace per (handle, stream) that
    ``torch.cuda.empty_cache()`` does not free, so a new stream per run can leave memory allocated
    behind each time (likely part of why the recorded GPU run had 611 MiB allocated when the limit
    was set and the check ran, and about 990 MiB at rest when ``no_batching`` ran)."""
    import contextlib

    import torch

    if not torch.cuda.is_available():
        return contextlib.nullcontext()
    streams = _WORKER.setdefault("streams", {})
    if name not in streams:
        streams[name] = torch.cuda.Stream()
    return torch.cuda.stream(streams[name])


def _to_device(host: np.ndarray, device: str) -> Any:
    """A batch to the device: from page-locked memory, on the thread's stream."""
    import torch

    x = torch.from_numpy(host)
    return x.pin_memory().to(device, non_blocking=True) if device.startswith("cuda") else x


def _to_host(outputs: Any) -> Any:
    if isinstance(outputs, tuple):
        return tuple(o.cpu().numpy() for o in outputs)
    return outputs.cpu().numpy()


def sweep(seconds: float) -> dict:
    """Each static model alone at each ladder size, its input already on the device: samples/s and
    the memory a batch adds at its peak (input, activations and output). On a CPU the peak is the
    emulated profile. Also: how many crops a segmented pool image gives (the pipeline's fan-out)."""
    import torch

    device, size = _WORKER["device"], _WORKER["size"]
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out: dict[str, Any] = {}
    for name in MODELS:
        model = _WORKER["models"][name]
        rows_out = []
        for rows in LADDERS[size][name]:
            host = _batch(name, rows)
            with torch.inference_mode():
                if cuda:
                    sync()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                x = torch.from_numpy(host).to(device)
                _to_host(model(x))  # the first call of a shape sets it up (cuDNN plans)
                sync()
                if cuda:
                    peak = torch.cuda.max_memory_allocated() - base
                else:
                    fixed, per_sample = SMOKE_PROFILE[name]
                    peak = fixed + per_sample * rows
                calls, started = 0, time.perf_counter()
                while calls < 2 or time.perf_counter() - started < seconds:
                    model(x)
                    calls += 1
                sync()
                elapsed = time.perf_counter() - started
            rows_out.append({"rows": rows, "throughput": rows * calls / elapsed, "batch_s": elapsed / calls,
                             "peak_bytes": int(peak)})
            del x
        out[name] = rows_out
    with torch.inference_mode():
        mask, image = _to_host(_WORKER["models"]["segmenter"](torch.from_numpy(_batch("segmenter", 8)).to(device)))
    out["crops_per_job"] = float(np.mean([len(crop_regions((m, i), SIDES[size]["classifier"]))
                                          for m, i in zip(mask, image)]))
    if cuda:
        torch.cuda.empty_cache()
    return out


class _Ledger:
    """The smoke run's stand-in for a GPU's memory limit: each running batch holds the bytes its
    model's profile says; one that does not fit raises ``MemoryError``."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self.lock = threading.Lock()

    def hold(self, name: str, rows: int) -> int:
        fixed, per_sample = SMOKE_PROFILE[name]
        need = fixed + per_sample * rows
        with self.lock:
            if self.used + need > self.capacity:
                raise MemoryError(f"emulated out of memory: {need} bytes wanted, {self.capacity - self.used} free")
            self.used += need
        return need

    def give_back(self, nbytes: int) -> None:
        with self.lock:
            self.used -= nbytes


class _Item:
    __slots__ = ("index", "x", "role", "since")

    def __init__(self, index: int, x: np.ndarray, role: int, since: float):
        self.index = index  # the request's (or the pipeline job's) position in the schedule
        self.x = x
        self.role = role  # DIRECT, SEGMENT (a pipeline job's first step) or CROP (one of its crops)
        self.since = since


DIRECT, SEGMENT, CROP = 0, 1, 2


class StaticServer:
    """One thread per model serving fixed-size batches, fed by a thread that replays the arrival
    schedule (see the module docstring, ``static_safe``)."""

    def __init__(self, sizes: dict[str, int], ledger_bytes: int | None, n: int):
        self.sizes = sizes
        self.ledger = _Ledger(ledger_bytes) if ledger_bytes else None
        self.queues: dict[str, deque[_Item]] = {name: deque() for name in MODELS}
        self.ready = {name: threading.Condition() for name in MODELS}
        self.done = np.full(n, np.nan)
        self.ok = np.zeros(n, dtype=bool)
        self.jobs: dict[int, list] = {}  # pipeline job -> [crops left, failed]
        self.batches: list[tuple] = []  # (time, model, rows, padded to, ok)
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.t0 = 0.0

    def push(self, name: str, item: _Item) -> None:
        with self.ready[name]:
            self.queues[name].append(item)
            self.ready[name].notify()

    def finish(self, index: int, ok: bool) -> None:
        self.done[index] = time.perf_counter() - self.t0
        self.ok[index] = ok

    def serve(self, name: str) -> None:
        try:
            with _own_stream(name):
                self._serve(name)
        except Exception:  # the thread's requests stay unfinished; say why
            with self.lock:
                self.errors.append(f"{name} thread: {traceback.format_exc()[-1500:]}")

    def _serve(self, name: str) -> None:
        import torch

        from dask_dynbatch.core.oom import is_oom_error

        model = _WORKER["models"][name]
        device = _WORKER["device"]
        crop_side = SIDES[_WORKER["size"]]["classifier"]
        size = self.sizes[name]
        queue, ready = self.queues[name], self.ready[name]
        while True:
            with ready:
                while not queue and not self.stop.is_set():
                    ready.wait(0.05)
                if self.stop.is_set():
                    return
                due = queue[0].since + MAX_DELAY  # a partial batch leaves when its oldest waited this long
                while len(queue) < size and not self.stop.is_set():
                    left = due - time.perf_counter()
                    if left <= 0:
                        break
                    ready.wait(left)
                items = [queue.popleft() for _ in range(min(size, len(queue)))]
            padded = min(size, 1 << (len(items) - 1).bit_length())  # a shape the sweep warmed
            host = np.stack([item.x for item in items] + [items[-1].x] * (padded - len(items)))
            held, ok, outputs = 0, True, None
            try:
                held = self.ledger.hold(name, padded) if self.ledger else 0
                with torch.inference_mode():
                    outputs = _to_host(model(_to_device(host, device)))
            except Exception as exc:
                ok = False
                if not is_oom_error(exc):
                    with self.lock:
                        self.errors.append(f"{name}: {exc!r}"[:300])
            finally:
                if self.ledger and held:
                    self.ledger.give_back(held)
            with self.lock:
                self.batches.append((time.perf_counter() - self.t0, name, len(items), padded, ok))
            for row, item in enumerate(items):
                if item.role == DIRECT:
                    self.finish(item.index, ok)
                elif item.role == SEGMENT:
                    if not ok:
                        self.finish(item.index, False)
                        continue
                    crops = crop_regions((outputs[0][row], outputs[1][row]), crop_side)
                    with self.lock:
                        self.jobs[item.index] = [len(crops), False]
                    now = time.perf_counter()
                    for crop in crops:
                        self.push("classifier", _Item(item.index, crop, CROP, now))
                else:
                    with self.lock:
                        job = self.jobs[item.index]
                        job[0] -= 1
                        job[1] |= not ok
                        last = job[0] == 0
                    if last:
                        self.finish(item.index, not job[1])

    def feed(self, arrival: np.ndarray, kind: np.ndarray, pool_index: np.ndarray) -> np.ndarray:
        """Push each request at its time; returns how late each push was (s)."""
        images = _WORKER["pools"]
        late = np.zeros(len(arrival))
        for i in range(len(arrival)):
            delay = self.t0 + arrival[i] - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            late[i] = max(0.0, -delay)
            k = int(kind[i])
            name = "segmenter" if k == PIPELINE else MODELS[k]
            self.push(name, _Item(i, images[name][pool_index[i]], SEGMENT if k == PIPELINE else DIRECT,
                                  time.perf_counter()))
        return late


def serve_static(sizes: dict[str, int], arrival: np.ndarray, kind: np.ndarray, pool_index: np.ndarray,
                 drain_s: float, ledger_bytes: int | None) -> dict:
    """A Dask task: replay the schedule against fixed batch sizes ``sizes`` in this worker; each
    request's completion time (s from the start; NaN: unfinished) and outcome, the batches run."""
    server = StaticServer(sizes, ledger_bytes, len(arrival))
    threads = [threading.Thread(target=server.serve, args=(name,), name=f"static-{name}") for name in MODELS]
    wall0 = time.time()
    server.t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    late = server.feed(arrival, kind, pool_index)
    deadline = time.perf_counter() + drain_s
    while time.perf_counter() < deadline and np.isnan(server.done).any():
        time.sleep(0.05)
    server.stop.set()
    for name in MODELS:
        with server.ready[name]:
            server.ready[name].notify_all()
    for thread in threads:
        thread.join()
    free_cache()
    return {"wall0": wall0, "done": server.done, "ok": server.ok, "batches": server.batches,
            "errors": server.errors[:20], "feeder_late": lateness(late)}


def check_static(sizes: dict[str, int], arrival: np.ndarray, kind: np.ndarray, pool_index: np.ndarray,
                 drain_s: float, ledger_bytes: int | None) -> dict:
    """A careful user's check of fixed sizes: a rehearsal of the run at ``sizes`` (``serve_static``
    on a schedule of the run's phases and rates, pipeline jobs and their crops included, so that
    the three models' batches, full and padded partial ones, run together as they will), from the
    state the run starts in (the allocator's cache emptied first). Out-of-memory failures per model
    (batches and requests), batches run, errors, and this process's memory before it."""
    free_cache()
    before = memory_now()
    run = serve_static(sizes, arrival, kind, pool_index, drain_s, ledger_bytes)
    failed_batches = {name: 0 for name in MODELS}
    ran = {name: 0 for name in MODELS}
    for _t, name, _rows, _padded, ok in run["batches"]:
        ran[name] += 1
        failed_batches[name] += not ok
    failed_requests = {kind_name: int((~run["ok"] & ~np.isnan(run["done"]) & (kind == k)).sum())
                       for k, kind_name in enumerate(KINDS)}
    return {"failures": failed_batches, "failed_requests": failed_requests, "batches": ran,
            "requests": len(arrival), "unfinished": int(np.isnan(run["done"]).sum()),
            "errors": run["errors"], "feeder_late": run["feeder_late"], "memory_before": before}


def lateness(late: np.ndarray) -> dict:
    """How far behind its schedule a feeder fell (a harness limit, not the contender's)."""
    return {"p99_ms": float(np.percentile(late, 99) * 1e3) if len(late) else 0.0,
            "max_ms": float(late.max() * 1e3) if len(late) else 0.0}


# -- the client's side: static sizes, the schedule, dask-dynbatch's run, the summary ----------------------
SLACK = 0.9  # share of the limit's room a static configuration may plan for (the rest: allocator slack)


def saturation_rows(rows: list[dict]) -> dict:
    """The smallest ladder size whose throughput is within 5 % of the model's best."""
    best = max(r["throughput"] for r in rows)
    return next(r for r in rows if r["throughput"] >= 0.95 * best)


def choose_static(table: dict, room: float, busy: dict[str, float] | None = None) -> dict[str, int]:
    """Fixed batch sizes with the most throughput (the sum of each model's log throughput alone, so
    that no model is given up for another) whose peaks fit ``room``: all three at once, or (``busy``,
    the average mix) weighted by the share of the time each model is busy at the average mix: the
    memory in use then fits on average, not when all three run at once."""
    weight = busy or {name: 1.0 for name in MODELS}
    best: tuple | None = None
    for combo in itertools.product(*(table[name] for name in MODELS)):
        peaks = [r["peak_bytes"] for r in combo]
        if sum(weight[name] * peak for name, peak in zip(MODELS, peaks)) > room:
            continue
        key = (round(sum(math.log(r["throughput"]) for r in combo), 3), -sum(peaks))
        if best is None or key > best[0]:
            best = (key, combo)
    if best is None:  # not even one sample of each fits: the smallest sizes, they will fail
        return {name: table[name][0]["rows"] for name in MODELS}
    return {name: r["rows"] for name, r in zip(MODELS, best[1])}


def average_busy(cost: dict[str, float], crops_per_job: float) -> dict[str, float]:
    """Each model's share of the device's time at the average mix of ``PHASES`` (a pipeline job's
    share split between the segmenter and its crops' classifications by their cost)."""
    busy = {name: 0.0 for name in MODELS}
    for _name, mix in PHASES:
        for kind, share in mix.items():
            if kind == "pipeline":
                busy["segmenter"] += share * cost["segmenter"] / cost["pipeline"] / len(PHASES)
                busy["classifier"] += share * crops_per_job * cost["classifier"] / cost["pipeline"] / len(PHASES)
            else:
                busy[kind] += share / len(PHASES)
    return busy


def row_at(table: dict, name: str, rows: int) -> dict:
    return next(r for r in table[name] if r["rows"] == rows)


def request_cost(table: dict, sizes: dict[str, int], crops_per_job: float) -> dict[str, float]:
    """Device seconds of one request of each kind at ``sizes`` (throughput alone from the sweep)."""
    cost = {name: 1.0 / row_at(table, name, sizes[name])["throughput"] for name in MODELS}
    cost["pipeline"] = cost["segmenter"] + crops_per_job * cost["classifier"]
    return cost


def phase_rates(cost: dict[str, float], load: float, max_rate: float | None) -> list[dict[str, float]]:
    """Requests/s of each kind per phase: its share of the device (``PHASES``, times ``load``) over
    its cost; scaled down so that no phase offers more than ``max_rate`` in all (the smoke run)."""
    rates = [{kind: load * share / cost[kind] for kind, share in mix.items()} for _name, mix in PHASES]
    if max_rate:
        for phase in rates:
            scale = min(1.0, max_rate / sum(phase.values()))
            for kind in phase:
                phase[kind] *= scale
    return rates


def make_schedule(rates: list[dict[str, float]], seconds: float, seed: int) -> dict[str, np.ndarray]:
    """Poisson arrivals per kind and phase, merged: ``arrival`` (s from the start), ``kind`` (index
    into ``KINDS``), ``pool_index`` (which image of its pool)."""
    rng = np.random.default_rng(seed)
    times, kinds = [], []
    for p, phase in enumerate(rates):
        for kind, rate in phase.items():
            n = rng.poisson(rate * seconds)
            times.append(p * seconds + np.sort(rng.uniform(0, seconds, n)))
            kinds.append(np.full(n, KINDS.index(kind), dtype=np.int8))
    arrival = np.concatenate(times)
    kind = np.concatenate(kinds)
    order = np.argsort(arrival, kind="stable")
    arrival, kind = arrival[order], kind[order]
    pool_size = np.array([POOL["segmenter"] if k in (0, PIPELINE) else POOL["classifier"] for k in range(len(KINDS))])
    return {"arrival": arrival, "kind": kind, "pool_index": rng.integers(0, 1 << 30, len(kind)) % pool_size[kind]}


class Monitor:
    """While dask-dynbatch runs: each Batcher's worker advice (memory cap, batch size) every 0.25 s
    and its shipment history (device batch, cap) as it grows, in epoch seconds."""

    def __init__(self, batchers: dict):
        self.batchers = batchers
        self.caps: list[tuple] = []  # (time, model, memory cap, controller size, queued)
        self.history: list[tuple] = []  # (time, model, shipment rows, device batch, cap, controller size)
        self.seen = {name: 0.0 for name in batchers}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True, name="multi-monitor")

    def run(self) -> None:
        polls = 0
        while not self.stop.wait(0.25):
            polls += 1
            self.poll(history=polls % 8 == 0)
        self.poll(history=True)

    def poll(self, history: bool) -> None:
        now = time.time()
        for name, batcher in self.batchers.items():
            stats = batcher.stats()
            for worker in stats["workers"].values():
                self.caps.append((now, name, worker.get("memory_cap"), (worker.get("controller") or {}).get("size"),
                                  stats["queued"]))
            if history:  # the Batcher keeps its last 5,000 shipments: read them before they go
                rows = [h for h in batcher.history() if h["time"] > self.seen[name]]
                self.history.extend((h["time"], name, h["size"], h["device_batch"], h["cap"], h["controller_size"])
                                    for h in rows)
                if rows:
                    self.seen[name] = max(h["time"] for h in rows)

    def __enter__(self) -> Monitor:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()


def run_dynbatch(batchers: dict, pipe: Any, schedule: dict, images: dict, drain_s: float) -> dict:
    """Submit the schedule from this client (a request's latency: from its scheduled arrival to its
    result here); after the last arrival wait up to ``drain_s``, then cancel what is left."""
    arrival, kind, pool_index = schedule["arrival"], schedule["kind"], schedule["pool_index"]
    n = len(arrival)
    done = np.full(n, np.nan)
    ok = np.zeros(n, dtype=bool)
    errors: list[str] = []
    pending: dict[int, Any] = {}
    lock = threading.Lock()

    def record(index: int, future: Any) -> None:
        t = time.perf_counter() - t0
        with lock:
            pending.pop(index, None)
            if future.cancelled():
                return
            exc = future.exception()
            done[index] = t
            ok[index] = exc is None
            if exc is not None and len(errors) < 20:
                errors.append(repr(exc)[:300])

    late = np.zeros(n)
    wall0 = time.time()
    t0 = time.perf_counter()
    for i in range(n):
        delay = t0 + arrival[i] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        late[i] = max(0.0, -delay)
        k = int(kind[i])
        if k == PIPELINE:
            future = pipe.submit(images["segmenter"][pool_index[i]])
        else:
            future = batchers[MODELS[k]].submit(images[MODELS[k]][pool_index[i]])
        with lock:
            pending[i] = future
        future.add_done_callback(functools.partial(record, i))
    deadline = time.perf_counter() + drain_s
    while time.perf_counter() < deadline:
        with lock:
            if not pending:
                break
        time.sleep(0.05)
    with lock:
        left = list(pending.values())
    for future in left:  # what still waits would run beside the next contender
        future.cancel()
    quiet = time.perf_counter() + 20
    while time.perf_counter() < quiet and any(b.stats()["in_flight"] or b.stats()["queued"] for b in batchers.values()):
        time.sleep(0.1)
    return {"wall0": wall0, "done": done, "ok": ok, "errors": errors, "cancelled_at_end": len(left),
            "feeder_late": lateness(late)}


def percentile_or_none(latencies: np.ndarray, q: float) -> float | None:
    """A latency percentile in ms; None when it falls on requests that never finished (infinite)."""
    if not len(latencies):
        return None
    value = float(np.percentile(latencies, q, method="higher"))  # no interpolation towards an infinite one
    return value * 1e3 if math.isfinite(value) else None


def summarize(schedule: dict, done: np.ndarray, ok: np.ndarray, seconds: float, cost: dict[str, float]) -> dict:
    """Per phase and kind: offered and served rates, p50/p99 latency (of the phase's arrivals;
    unfinished ones count as infinitely late), failed and unfinished requests; per phase the device
    work served per second (requests weighted by their cost alone) and whether it kept up."""
    arrival, kind = schedule["arrival"], schedule["kind"]
    finished = ~np.isnan(done)
    served = finished & ok
    latency = np.where(served, done - arrival, np.inf)
    phases = []
    for p, (name, _mix) in enumerate(PHASES):
        start, end = p * seconds, (p + 1) * seconds
        here = (arrival >= start) & (arrival < end)
        kinds: dict[str, Any] = {}
        work, offered_work = 0.0, 0.0
        for k, kind_name in enumerate(KINDS):
            mine = here & (kind == k)
            if not mine.any():
                continue
            lat = latency[mine & (served | ~finished)]  # failed requests have no latency
            completed = int((served & (kind == k) & (done >= start) & (done < end)).sum())
            kinds[kind_name] = {
                "offered_per_s": int(mine.sum()) / seconds, "served_per_s": completed / seconds,
                "p50_ms": percentile_or_none(lat, 50), "p99_ms": percentile_or_none(lat, 99),
                "failed": int((mine & finished & ~ok).sum()), "unfinished": int((mine & ~finished).sum()),
                "requests": int(mine.sum()),
            }
            work += completed / seconds * cost[kind_name]
            offered_work += int(mine.sum()) / seconds * cost[kind_name]
        served_rate = sum(v["served_per_s"] for v in kinds.values())
        phases.append({"phase": name, "kinds": kinds, "served_per_s": served_rate,
                       "offered_per_s": sum(v["offered_per_s"] for v in kinds.values()),
                       "work_per_s": work, "offered_work_per_s": offered_work, "kept_up": work >= 0.9 * offered_work,
                       "failed": sum(v["failed"] for v in kinds.values()),
                       "unfinished": sum(v["unfinished"] for v in kinds.values())})
    end = len(PHASES) * seconds
    in_run = served & (done < end)
    return {"phases": phases,
            "served_per_s": int(in_run.sum()) / end,
            "work_per_s": float(sum(int((in_run & (kind == k)).sum()) * cost[name] for k, name in enumerate(KINDS))) / end,
            "failed": int((finished & ~ok).sum()), "unfinished": int((~finished).sum()), "requests": len(arrival)}


def batch_rows(rows: list[tuple], seconds: float) -> list[dict]:
    """Per phase and model, the rows of the device batches that ran (``rows``: (time from the start,
    model, rows, memory cap or None)): mean, largest, the mean memory cap, batches."""
    out = []
    for p in range(len(PHASES)):
        phase = {}
        for name in MODELS:
            mine = [r for r in rows if r[1] == name and p * seconds <= r[0] < (p + 1) * seconds]
            caps = [r[3] for r in mine if r[3]]
            if mine:
                phase[name] = {"mean": float(np.mean([r[2] for r in mine])), "max": int(max(r[2] for r in mine)),
                               "batches": len(mine), "mean_cap": float(np.mean(caps)) if caps else None}
        out.append(phase)
    return out


def thin(rows: list, most: int) -> list:
    """Every k-th row, so that at most about ``most`` are kept (the JSON stays small)."""
    step = max(1, math.ceil(len(rows) / most))
    return rows[::step]


def targets(result: dict) -> dict:
    """The targets and whether this run met them. The throughput ratio is against the best static
    contender that failed no request in the run (``throughput_baseline`` names it): sizes that
    failed were not safe, whatever their check said (``static_safe_was_safe``; the ratio against
    them is kept apart as ``throughput_ratio_vs_failing_static_safe``). Only ``static_safe`` as the
    baseline tests the target (``throughput_valid``); against another, ``throughput_met`` is False
    when even that ratio misses 1.2, else None."""
    summaries = {key: c["summary"] for key, c in result["contenders"].items() if c.get("summary")}
    dyn = summaries.get("dynbatch")
    static = {key: v for key, v in summaries.items() if key != "dynbatch"}
    clean = {key: v for key, v in static.items() if v["failed"] == 0}
    out: dict[str, Any] = {"dynbatch_failed": 0, "throughput_vs_best_safe_static": 1.2, "p99_within_x_target": 2.0,
                           "failed": {key: v["failed"] for key, v in summaries.items()},
                           "unfinished": {key: v["unfinished"] for key, v in summaries.items()}}
    if "static_safe" in static:
        out["static_safe_failed"] = static["static_safe"]["failed"]
        out["static_safe_was_safe"] = static["static_safe"]["failed"] == 0
    if dyn:
        out["dynbatch_failed_met"] = dyn["failed"] == 0
        late = []
        for phase in dyn["phases"]:
            if not phase["kept_up"]:
                continue
            for kind, v in phase["kinds"].items():
                limit = 2.0 * LATENCY_TARGET[kind] * 1e3
                if v["p99_ms"] is None or v["p99_ms"] > limit:
                    late.append({"phase": phase["phase"], "kind": kind, "p99_ms": v["p99_ms"], "limit_ms": limit})
        out["p99_late"] = late
        out["p99_met"] = not late
        out["phases_kept_up"] = [p["phase"] for p in dyn["phases"] if p["kept_up"]]
    if dyn and clean:
        best = max(clean, key=lambda key: clean[key]["served_per_s"])
        out["throughput_baseline"] = best
        out["throughput_ratio"] = dyn["served_per_s"] / max(clean[best]["served_per_s"], 1e-9)
        out["work_ratio"] = dyn["work_per_s"] / max(clean[best]["work_per_s"], 1e-9)
        # only the sweep's safe sizes are the target's baseline; against a lesser static contender
        # the ratio overstates dask-dynbatch's lead: it can show the target missed, never met
        out["throughput_valid"] = best == "static_safe"
        met = out["throughput_ratio"] >= 1.2
        out["throughput_met"] = met if out["throughput_valid"] else (False if not met else None)
        if not out["throughput_valid"]:
            out["throughput_note"] = (f"static_safe failed {out.get('static_safe_failed')} requests, so its sizes were "
                                      f"not safe: the ratio is against {best}, the best static contender that failed "
                                      "none, and is not a valid test of the target")
    elif dyn and static:
        out["throughput_baseline"] = None  # every static contender failed requests: no safe one to compare with
        out["throughput_valid"] = False
    if dyn and static.get("static_safe", {}).get("failed"):
        out["throughput_ratio_vs_failing_static_safe"] = dyn["served_per_s"] / max(static["static_safe"]["served_per_s"], 1e-9)
    return out


def plot(path: Path, result: dict) -> None:
    """dask-dynbatch's device batches and memory caps per model over time (static sizes dashed: safe,
    dotted: average mix), each contender's GPU memory, and the served rates per phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = result["phase_seconds"]
    contenders = result["contenders"]
    fig, axes = plt.subplots(3, 1, figsize=(11, 11))

    def phases(ax) -> None:
        for p, (name, _mix) in enumerate(PHASES):
            ax.axvspan(p * seconds, (p + 1) * seconds, color="0.93" if p % 2 else "0.86", zorder=0)
            ax.text((p + 0.5) * seconds, 0.98, name, transform=ax.get_xaxis_transform(), ha="center", va="top",
                    fontsize=8)

    ax = axes[0]
    phases(ax)
    dyn = contenders.get("dynbatch", {})
    for name in MODELS:
        color = COLORS[name]
        hist = [h for h in dyn.get("history", []) if h[1] == name]
        if hist:
            ax.scatter([h[0] for h in hist], [h[3] for h in hist], s=4, color=color, alpha=0.35)
        caps = [c for c in dyn.get("caps", []) if c[1] == name and c[2]]
        if caps:
            ax.step([c[0] for c in caps], [c[2] for c in caps], where="post", color=color, lw=1.2,
                    label=f"{name}: memory cap (device batches: dots)")
        for key, style in (("static_safe", "--"), ("static_average", ":")):
            sizes = contenders.get(key, {}).get("sizes")
            if sizes:
                ax.axhline(sizes[name], color=color, ls=style, lw=1)
    ax.set_yscale("log")
    ax.set_ylabel("rows")
    ax.set_xlabel("s")
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("dask-dynbatch: device batches and memory caps per model (dashed: best safe static sizes, "
                 "dotted: average-mix static sizes)", fontsize=9)

    ax = axes[1]
    phases(ax)
    for key, contender in contenders.items():
        memory = contender.get("memory") or []
        if memory:
            column = 2 if memory[0][2] is not None else 1  # the allocator's reservation (RSS on a CPU)
            ax.plot([m[0] for m in memory], [m[column] / 2**30 for m in memory], lw=1, label=key)
    if result.get("limit_bytes"):
        ax.axhline(result["limit_bytes"] / 2**30, color="k", ls="--", lw=1, label="limit")
    ax.set_ylabel("GiB held by the worker")
    ax.set_xlabel("s")
    ax.legend(fontsize=7)

    ax = axes[2]
    labels = [name for name, _mix in PHASES] + ["whole run"]
    width = 0.8 / max(1, len(contenders))
    for i, (key, contender) in enumerate(contenders.items()):
        summary = contender.get("summary")
        if not summary:
            continue
        values = [p["served_per_s"] for p in summary["phases"]] + [summary["served_per_s"]]
        fails = [p["failed"] for p in summary["phases"]] + [summary["failed"]]
        xs = [j + i * width for j in range(len(labels))]
        ax.bar(xs, values, width=width, label=key)
        for x, v, f in zip(xs, values, fails):
            if f:
                ax.text(x, v, f"{f} failed", rotation=90, fontsize=6, ha="center", va="bottom")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels)
    ax.set_ylabel("requests served / s")
    ax.legend(fontsize=7)
    fig.suptitle(f"three models on one device, memory limited ({result.get('device')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def worker_call(client, fn, *args) -> Any:
    """Run ``fn`` as a task on the one worker (in its thread, not on its event loop)."""
    return client.submit(fn, *args, pure=False).result(timeout=600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--name", default=None, help="result file name (default multi_model_case[_smoke])")
    parser.add_argument("--smoke", action="store_true", help="tiny models and sizes, for a CPU")
    parser.add_argument("--phase-seconds", type=float, default=None, help="length of each phase (default 20; smoke 3)")
    parser.add_argument("--drain", type=float, default=None, help="seconds allowed after the last arrival (default 8; smoke 2)")
    parser.add_argument("--warmup", type=float, default=None, help="dask-dynbatch's untimed burst first (default 8 s; smoke 2)")
    parser.add_argument("--sweep-seconds", type=float, default=None, help="per model and size (default 0.25; smoke 0.03)")
    parser.add_argument("--verify-seconds", type=float, default=None,
                        help="each phase of the static sizes' rehearsal, and its worst-mix flood (default 4; smoke 1)")
    parser.add_argument("--pressure", type=float, default=0.6,
                        help="the limit's room over what the three models need together where their throughput levels off")
    parser.add_argument("--budget-gib", type=float, default=None, help="the worker's GPU memory limit instead")
    parser.add_argument("--load", type=float, default=1.3,
                        help="scales every phase's arrival rates (1: the shares of PHASES of the safe static sizes' capacity)")
    parser.add_argument("--contenders", default="dynbatch,static_safe,static_average,no_batching")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    size = "smoke" if args.smoke else "full"
    defaults = {"phase_seconds": 3.0, "drain": 2.0, "warmup": 2.0, "sweep_seconds": 0.03, "verify_seconds": 1.0} \
        if args.smoke else {"phase_seconds": 20.0, "drain": 8.0, "warmup": 8.0, "sweep_seconds": 0.25, "verify_seconds": 4.0}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("multi_model_case_smoke" if args.smoke else "multi_model_case")
    started = time.perf_counter()

    def progress(*what: Any) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s]", *what, flush=True)

    result: dict[str, Any] = {"machine": machine_stamp(), "size": size, "args": vars(args),
                              "phases": PHASES, "phase_seconds": args.phase_seconds, "latency_target_s": LATENCY_TARGET,
                              "contenders": {}}
    images = pools(size)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        setup = worker_call(client, worker_setup, size)
        result["device"] = setup["device"]
        progress("static models built", setup)
        specs = {m: ddb.ModelSpec(f"multi-{m}", load=functools.partial(BUILDERS[m], size=size),
                                  latency_target=LATENCY_TARGET[m]) for m in MODELS}
        batchers = {m: ddb.Batcher(client, spec) for m, spec in specs.items()}
        for m, batcher in batchers.items():  # dask-dynbatch's copies too: every contender runs beside both
            [f.result(timeout=300) for f in batcher.map(list(images[m][:4]))]
        resident = next(iter(client.run(memory_now).values()))
        result["resident"] = resident
        progress("dask-dynbatch's models loaded; resident", resident)

        table = worker_call(client, sweep, args.sweep_seconds)
        crops_per_job = table.pop("crops_per_job")
        result["sweep"] = table
        result["crops_per_job"] = crops_per_job
        progress("sweep", {m: [(r["rows"], round(r["throughput"]), round(r["peak_bytes"] / 2**20)) for r in rows]
                           for m, rows in table.items()}, "crops per job", crops_per_job)

        # the limit: resident weights plus room for `pressure` of what the models need at saturation
        level = {m: saturation_rows(table[m]) for m in MODELS}
        resident_bytes = resident["allocated"] if setup["device"].startswith("cuda") else 0
        if args.budget_gib:
            limit = int(args.budget_gib * 2**30)
        else:
            limit = int(resident_bytes + args.pressure * sum(r["peak_bytes"] for r in level.values()) / SLACK)
        room = (limit - resident_bytes) * SLACK
        cuda = setup["device"].startswith("cuda")
        ledger = None if cuda else int(room)  # on a CPU the static contenders' limit is emulated
        result.update(limit_bytes=limit, static_room_bytes=room, level_rows={m: r["rows"] for m, r in level.items()})
        if cuda:
            result["memory_limit"] = next(iter(client.run(set_memory_limit, limit).values()))
        progress(f"limit {limit / 2**30:.2f} GiB (room for static batches {room / 2**30:.2f} GiB{'' if cuda else ', emulated'});",
                 "throughput levels off at", result["level_rows"])

        max_rate = 250.0 if args.smoke else None

        def rehearse(sizes: dict[str, int], rates_cost: dict[str, float] | None = None) -> dict:
            """The run's three phases at ``sizes``, ``--verify-seconds`` each (another seed than the
            run's: a user does not know the arrivals to come), at the rates the run would offer with
            them (from ``rates_cost``, default their own costs), then every model's queue filled at
            once with full batches for ``--verify-seconds`` of it alone: the three models' full
            batches run together (the worst mix), however seldom the arrivals before gave them;
            through the static server."""
            rates_here = phase_rates(rates_cost or request_cost(table, sizes, crops_per_job), args.load, max_rate)
            plan = make_schedule(rates_here, args.verify_seconds, args.seed + 2)
            flood = {m: sizes[m] * math.ceil(args.verify_seconds / row_at(table, m, sizes[m])["batch_s"]) for m in MODELS}
            order = np.argsort(np.concatenate([np.arange(n) / n for n in flood.values()]), kind="stable")  # interleaved
            kinds = np.concatenate([np.full(n, k, dtype=np.int8) for k, n in enumerate(flood.values())])[order]
            pool = np.concatenate([np.arange(n) % POOL["segmenter" if m == "segmenter" else "classifier"]
                                   for m, n in flood.items()])[order]
            arrival = np.concatenate([plan["arrival"], np.full(len(kinds), len(PHASES) * args.verify_seconds)])
            check = worker_call(client, check_static, sizes, arrival, np.concatenate([plan["kind"], kinds]),
                                np.concatenate([plan["pool_index"], pool]), 3 * args.verify_seconds, ledger)
            return {**check, "flood": flood}

        def settle(sizes: dict[str, int], rates_cost: dict[str, float] | None = None) -> tuple[dict, list, bool]:
            """A careful user's sizes: rehearse, and while any batch fails lower the batch that needs
            the most memory one step, up to 6 rehearsals. Returns the sizes, the rehearsals, and
            whether the last one ran without a failure."""
            sizes, checks = dict(sizes), []
            for attempt in range(6):
                check = rehearse(sizes, rates_cost)
                checks.append({"sizes": dict(sizes), **check})
                progress("check", sizes, "failed batches", check["failures"], "of", check["batches"],
                         "errors", check["errors"][:2])
                if not any(check["failures"].values()):
                    return sizes, checks, True
                if attempt == 5 or all(sizes[m] == 1 for m in MODELS):
                    break
                heaviest = max(MODELS, key=lambda m: row_at(table, m, sizes[m])["peak_bytes"] if sizes[m] > 1 else -1)
                ladder = [r["rows"] for r in table[heaviest]]
                sizes[heaviest] = ladder[max(0, ladder.index(sizes[heaviest]) - 1)]
            return sizes, checks, False

        safe, checks, held = settle(choose_static(table, room))
        cost = request_cost(table, safe, crops_per_job)
        busy = average_busy(cost, crops_per_job)
        average = choose_static(table, room, busy)
        # the same rehearsal of the average-mix sizes at the run's rates, for the record: not lowered
        average_check = rehearse(average, cost)
        result.update(static_checks=checks, static_safe_checked=held, average_busy=busy,
                      average_check={"sizes": average, **average_check})
        progress("static sizes: safe", safe, "(held in the check)" if held else "(STILL FAILED in the check)",
                 "average mix", average, "(busy shares", busy, ") average sizes' failed batches",
                 average_check["failures"])

        rates = phase_rates(cost, args.load, max_rate)
        schedule = make_schedule(rates, args.phase_seconds, args.seed)
        result.update(cost_s=cost, rates=[{k: round(v, 2) for k, v in r.items()} for r in rates],
                      requests=len(schedule["arrival"]))
        progress("rates per phase", result["rates"], "requests", result["requests"])

        pipe = ddb.Pipeline(client, [ddb.model(batchers["segmenter"]),
                                     ddb.cpu(functools.partial(crop_regions, side=SIDES[size]["classifier"]), name="crop"),
                                     ddb.fan_out(ddb.model(batchers["classifier"]))])
        # the burst's mix at about the device's capacity: every model's shapes are set up and its
        # batch size climbs, without a backlog to drain
        warm = make_schedule([{k: v * 0.6 for k, v in rates[-1].items()}], args.warmup, args.seed + 1)
        warmed = run_dynbatch(batchers, pipe, warm, images, min(args.drain, 4.0))
        result["dynbatch_warmup"] = {"requests": len(warm["arrival"]), "served": int(warmed["ok"].sum())}
        progress("dask-dynbatch warmed up", result["dynbatch_warmup"])
        worker_call(client, free_cache)

        sizes_of = {"static_safe": safe, "static_average": average, "no_batching": {m: 1 for m in MODELS}}
        for key in args.contenders.split(","):
            progress("contender", key)
            entry: dict[str, Any] = {}
            try:
                if key == "static_safe":
                    # checked again from the state this run starts in (after the contenders before
                    # it), at the run's own rates: what stays allocated between runs is not freed by
                    # emptying the cache, and the first check ran before any contender
                    rechecked, entry["recheck"], entry["checked_safe"] = settle(safe, cost)
                    if rechecked != safe:
                        entry["lowered_from"] = dict(safe)
                        sizes_of[key] = rechecked
                entry["memory_at_start"] = next(iter(client.run(memory_now).values()))
                if key == "dynbatch":
                    with Monitor(batchers) as monitor:
                        run = run_dynbatch(batchers, pipe, schedule, images, args.drain)
                    wall0 = run["wall0"]
                    history = [(h[0] - wall0, *h[1:]) for h in monitor.history if h[0] >= wall0]
                    # per shipment, the device batch it ran in (one shared by shipments counts once each)
                    ran = [(h[0], h[1], h[3], h[4]) for h in history]
                    entry.update(caps=thin([(c[0] - wall0, *c[1:]) for c in monitor.caps], 2000),
                                 history=thin(history, 4000),
                                 batch_rows=batch_rows(ran, args.phase_seconds),
                                 cancelled_at_end=run["cancelled_at_end"],
                                 stats={m: {k: v for k, v in b.stats().items() if k != "workers"} | {
                                     "workers": {a: {k: w.get(k) for k in ("memory_cap", "batches", "samples", "throughput")}
                                                 | {"controller_size": (w.get("controller") or {}).get("size")}
                                                 for a, w in b.stats()["workers"].items()}}
                                        for m, b in batchers.items()},
                                 pipeline=pipe.stats())
                else:
                    entry["sizes"] = sizes_of[key]
                    run = worker_call(client, serve_static, sizes_of[key], schedule["arrival"], schedule["kind"],
                                      schedule["pool_index"], args.drain, ledger)
                    wall0 = run["wall0"]
                    entry["batch_rows"] = batch_rows([(b[0], b[1], b[2], None) for b in run["batches"] if b[4]],
                                                     args.phase_seconds)
                    entry["failed_batches"] = {m: sum(1 for b in run["batches"] if b[1] == m and not b[4]) for m in MODELS}
                    entry["batches"] = thin(run["batches"], 2000)
                end = wall0 + len(PHASES) * args.phase_seconds + args.drain + 25
                entry["memory"] = [(s[0] - wall0, *s[1:]) for s in
                                   next(iter(client.run(memory_between, wall0, end).values()))]
                entry["errors"] = run["errors"]
                entry["feeder_late"] = run["feeder_late"]
                entry["summary"] = summarize(schedule, run["done"], run["ok"], args.phase_seconds, cost)
            except Exception:
                entry["error"] = traceback.format_exc()[-3000:]
            worker_call(client, free_cache)
            result["contenders"][key] = entry
            summary = entry.get("summary") or {}
            progress(key, {k: summary.get(k) for k in ("served_per_s", "work_per_s", "failed", "unfinished")},
                     "per phase", [(p["phase"], round(p["served_per_s"]), p["failed"], p["unfinished"], p["kept_up"])
                                   for p in summary.get("phases", [])], entry.get("error", ""))
            result["targets"] = targets(result)
            save(name, result, out)  # a timeout later still leaves what ran, and its plot
            try:
                plot(out / f"{name}.png", result)
            except Exception:
                result["plot_error"] = traceback.format_exc()[-2000:]
        pipe.close()
        for batcher in batchers.values():
            batcher.close()
    result["targets"] = targets(result)
    result["seconds"] = time.perf_counter() - started
    save(name, result, out)
    progress("targets", json.dumps(result["targets"], default=float))


if __name__ == "__main__":
    # run as the module of its own name: the worker then imports it by name, and its state
    # (the static models, the memory samples) lives in one module there
    import multi_model_case

    multi_model_case.main()
