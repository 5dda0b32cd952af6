"""Worker-side execution: which device, how a model is loaded and called, array conversions.

GPU libraries are imported only when a model needs them.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .batching import join_chunks
from .compiled import BucketCompiler, bucket_for, floor_rung, pad_rows, trim_rows
from .spec import ModelSpec, call_load
from .telemetry import torch_cuda_allocator_stats

logger = logging.getLogger(__name__)


def visible_gpu_count() -> int:
    """GPUs this process may use, through NVML as distributed sees them (no torch import)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return 0
    try:
        from distributed.diagnostics import nvml

        return nvml.device_get_count()
    except Exception:  # no NVML, no driver
        return 0


def choose_device(spec: ModelSpec, gpu_count: int | None = None) -> str:
    """``"cuda:0"`` when the model may use a GPU and one is visible (dask-cuda pins one per worker), else ``"cpu"``."""
    if spec.device == "cpu":
        return "cpu"
    if gpu_count is None:
        gpu_count = visible_gpu_count()
    if gpu_count > 0:
        return "cuda:0"
    if spec.device == "cuda":
        raise RuntimeError(f"model {spec.name!r} needs a CUDA device, and this worker sees none")
    return "cpu"


def pin_host_memory(address: int, nbytes: int) -> Callable[[], None] | None:
    """Page-lock ``nbytes`` of host memory at ``address`` for CUDA (``cudaHostRegister``), so
    that copies to a GPU go straight out of it by DMA; returns how to undo it, or None when CUDA
    refused (the caller copies through a pinned buffer instead)."""
    import torch

    cudart = torch.cuda.cudart()
    rc = int(cudart.cudaHostRegister(address, nbytes, 0))
    if rc != 0:
        logger.info("dynbatch: cudaHostRegister of %d bytes failed (cudaError %d); copying through pinned memory",
                    nbytes, rc)
        return None

    def undo() -> None:
        err = int(cudart.cudaHostUnregister(address))
        if err != 0:
            raise RuntimeError(f"cudaHostUnregister failed (cudaError {err})")

    return undo


def _is_torch_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def to_numpy(value: Any) -> Any:
    """Model outputs (torch, CuPy, NumPy; tuples/lists/dicts of them) as host NumPy arrays."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, dict):
        return {k: to_numpy(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_numpy(v) for v in value)
    module = type(value).__module__
    if module.startswith("torch"):
        return value.detach().cpu().numpy()
    if module.startswith("cupy"):
        import cupy

        return cupy.asnumpy(value)
    return np.asarray(value)


class LoadedModel:
    """A model loaded on one worker device, ready to run batches.

    With ``ModelSpec.compile``, ``compile_submit`` (runs a callable in the worker's compile thread)
    and ``compile_reserve`` (``rows -> context manager or None``: device memory for a warm-up
    batch) let a :class:`~dask_dynbatch.compiled.BucketCompiler` compile buckets in the background;
    ``compile_warm(rows, template_row, stop=event)`` warms the compile caches in a child process first.
    """

    def __init__(self, spec: ModelSpec, device: str, token: str = "",
                 compile_submit: Callable[[Callable[[], None]], Any] | None = None,
                 compile_reserve: Callable[[int], Any] | None = None,
                 compile_warm: Callable[[int, np.ndarray], Any] | None = None):
        self.spec = spec.for_device(device)
        self.device = device
        self.token = token
        started = time.perf_counter()
        self.model = call_load(self.spec.load, device)
        self.is_torch = _is_torch_module(self.model)
        self._torch_device = None  # torch models: their device, and on CUDA a side stream to stage on
        self._copy_stream = None
        self._pinned = None  # the staging buffer (see _host_buffer)
        if self.is_torch:
            self._prepare_torch()
        self.load_seconds = time.perf_counter() - started
        self._sizes_seen: set[int] = set()
        self._shapes_warmed = False
        self.ladder = self.spec.ladder(device)
        self.compiler: BucketCompiler | None = None
        self.compile_error: str | None = None
        self._template: Any = None  # one input row, the model of warm-up batches
        mode = self.spec.compile_mode()
        if mode is not None:
            if not self.is_torch:
                self.compile_error = (
                    f"compile={self.spec.compile!r} needs load() to return a torch.nn.Module, "
                    f"not {type(self.model).__name__}; the model is served eagerly"
                )
                logger.warning("dynbatch: model %r: %s", self.spec.name, self.compile_error)
            elif compile_submit is not None:
                self.compiler = BucketCompiler(
                    self.model, mode, self.ladder, run=self._forward, example=self._example,
                    submit=compile_submit, reserve=compile_reserve,
                    warm=(lambda rows, stop: compile_warm(rows, self._host_template(), stop=stop)) if compile_warm else None,
                )
                if self.spec.input_shape is not None and self.spec.input_dtype is not None:
                    # the signature is declared: compile the first bucket before the first batch
                    row = np.zeros((1, *self.spec.input_shape), dtype=np.dtype(self.spec.input_dtype))
                    self._template = self._as_input(row)
                    first = bucket_for(self.ladder, self.spec.initial_size(device))
                    if first is not None:
                        self.compiler.want(first, force=True)

    def _prepare_torch(self) -> None:
        import torch

        self.model = self.model.to(self.device).eval()
        self._torch_device = torch.device(self.device)
        self._copy_stream = torch.cuda.Stream(self._torch_device) if self._torch_device.type == "cuda" else None

    @property
    def stages_on_device(self) -> bool:
        """Whether :meth:`stage` moves batches to the device (torch module on CUDA, default predict)."""
        return self.is_torch and self.spec.predict is None and self._copy_stream is not None

    def stage(self, batch: np.ndarray | list[np.ndarray], copy: bool = False, pinned: bool = False) -> Any:
        """Prepare a batch ahead of its turn, in a transfer thread, so that it overlaps the compute
        of the batch before: join the chunks a large batch travels in (into pinned memory when the
        batch goes to a GPU) and copy the batch to the device on a side stream. Returns what
        :meth:`__call__` takes: a device tensor, or a stacked host array. ``copy``: the batch is a
        view of memory that is not ours (a client's shared-memory slot): the result never aliases it.
        ``pinned``: that memory is page-locked already (see :func:`pin_host_memory`): the device
        copies straight out of it."""
        if not self.stages_on_device:
            joined = join_chunks(batch)
            return np.array(joined) if copy and joined is batch else joined
        import torch

        if isinstance(batch, list):
            chunks = [torch.from_numpy(chunk) for chunk in batch]
            host = self._host_buffer(sum(len(c) for c in chunks), chunks[0])
            torch.cat(chunks, out=host)  # torch copies without holding the GIL
        elif pinned:
            host = torch.from_numpy(batch)
        else:
            # also for a view of a client's shared-memory slot that could not be page-locked: copied
            # into pinned memory first. A copy straight from pageable memory makes the driver stage it
            # under its own locks, and on the H200 that slowed the batch computing meanwhile by ~40 ms in two.
            source = torch.from_numpy(batch)
            host = self._host_buffer(len(source), source)
            host.copy_(source)
        with torch.cuda.stream(self._copy_stream):
            x = host.to(self._torch_device, non_blocking=True)
        self._copy_stream.synchronize()  # blocks this transfer thread only; the buffer is free again
        return x

    def _host_buffer(self, rows: int, like: Any) -> Any:
        """``rows`` rows shaped like ``like``'s in a pinned buffer kept for the next batch (one per
        model: one transfer thread stages at a time). It grows to the next power of two: allocating
        pinned memory is slow (~0.2 s for the first batch of 1,792 ResNet images on the H200)."""
        import torch

        buf = self._pinned
        shape = tuple(like.shape[1:])
        if buf is None or buf.dtype != like.dtype or tuple(buf.shape[1:]) != shape or len(buf) < rows:
            self._pinned = None
            capacity = 1 << max(6, (rows - 1).bit_length())
            buf = self._pinned = torch.empty((capacity, *shape), dtype=like.dtype, pin_memory=True)
        return buf[:rows]

    # -- running ------------------------------------------------------------------------------
    def first_at_size(self, n: int) -> bool:
        """Whether no batch of ``n`` rows (of its bucket, with a ladder) ran here before. On a GPU
        the first batch of a shape pays one-time set-up: cuDNN picks and builds its convolution
        plans per input shape, and the allocator grows; measured ~40 ms for ResNet-50 on an H200,
        which made a controller that learnt from it shrink again after every step."""
        size = self.rows_for(n)
        if size in self._sizes_seen:
            return False
        self._sizes_seen.add(size)
        return True

    @property
    def wants_shape_warmup(self) -> bool:
        """Eager torch model on CUDA with a shape ladder whose rungs are not warmed yet."""
        return not self._shapes_warmed and self.is_torch and self.spec.pads_shapes(self.device) and bool(self.ladder)

    def warm_shapes(self, example: Any, limit: int) -> int:
        """Run each rung of the shape ladder up to ``limit`` rows once, with copies of ``example``'s
        first row, so that no served batch pays a shape's one-time set-up (cuDNN plans: ~40 ms per
        shape for ResNet-50 on an H200, ~1.5 s for the rungs up to 1,024). Called in the device
        thread before the first batch; an out-of-memory error stops it. Returns the rungs warmed."""
        self._shapes_warmed = True
        import torch

        from .sizing import is_oom_error

        row = example[:1] if isinstance(example, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(example[:1]))
        row = row.to(self._torch_device)
        warmed = 0
        for rung in self.ladder:
            if rung > limit:
                break
            if rung in self._sizes_seen:
                continue
            try:
                with torch.inference_mode():
                    self._forward(self.model, row.expand(rung, *row.shape[1:]).contiguous())
            except Exception as exc:  # the batch itself will tell
                if is_oom_error(exc):
                    self.free_cache()
                logger.info("dynbatch: warming shape %d of model %r stopped: %r", rung, self.spec.name, exc)
                break
            self._sizes_seen.add(rung)
            warmed += 1
        if self._torch_device.type == "cuda":
            torch.cuda.synchronize(self._torch_device)
        return warmed

    def rows_for(self, n: int) -> int:
        """Rows a batch of ``n`` occupies on the device (its bucket, when it is padded)."""
        bucket = bucket_for(self.ladder, n) if self.ladder else None
        if bucket is None or not self._pads(bucket):
            return n
        return bucket

    def max_rows(self, cap: int | None) -> int | None:
        """Longest piece a batch may be cut into under the memory ``cap`` (a rung, with a ladder)."""
        if cap is None or not self.ladder:
            return cap
        return floor_rung(self.ladder, cap)

    def _pads(self, bucket: int) -> bool:
        if self.compiler is not None:
            return self.compiler.ready(bucket) is not None
        if self.spec.pads_shapes(self.device):  # few shapes for cuDNN; only where rows are independent
            return self.is_torch
        return self.spec.buckets is not None and self.compile_error is None  # static shapes asked for

    def __call__(self, batch: Any, full: bool = True) -> Any:
        """Run one stacked batch (host array or device tensor); returns host NumPy outputs.
        ``full``: the batch is as large as the client's size (not the short tail of a backlog)."""
        n = len(batch)
        bucket = bucket_for(self.ladder, n) if self.ladder else None
        if bucket is None:
            return self._to_host(self._eager(batch))
        compiler = self.compiler
        if compiler is None:
            if self._pads(bucket):
                return self._to_host(trim_rows(self._eager(pad_rows(batch, bucket)), n))
            return self._to_host(self._eager(batch))
        if self._template is None:
            self._template = batch[:1].clone() if hasattr(batch, "clone") else batch[:1].copy()
        if compiler.ready(bucket) is None:
            compiler.want(bucket, n, full=full)
            compiler.eager_batches += 1
            return self._to_host(self._eager(batch))
        import torch

        from .sizing import is_oom_error

        with compiler.use(bucket) as compiled:
            if compiled is None:  # a bucket is compiling right now: torch.compile is not thread-safe
                compiler.eager_batches += 1
                return self._to_host(self._eager(batch))
            try:
                # padded outside inference mode: a tensor made in it is an "inference tensor",
                # which fails the guards of a graph warmed with an ordinary one, and dynamo then
                # recompiles in this thread, every batch waiting (1.4-3.4 s each on the H200)
                padded = pad_rows(batch, bucket)
                with torch.inference_mode():
                    result = self._to_host(trim_rows(self._forward(compiled, padded), n))
            except Exception as exc:
                if is_oom_error(exc):
                    raise
                failure = exc
            else:
                compiler.compiled_batches += 1
                compiler.padded_rows += bucket - n
                return result
        # eager decides whether the data (a poison request: it raises again) or the compiled graph
        # is at fault
        result = self._to_host(self._eager(batch))
        compiler.fail(failure)
        compiler.eager_batches += 1
        return result

    def _to_host(self, outputs: Any) -> Any:
        """``outputs`` as host NumPy arrays. On CUDA the device thread first waits for the batch's
        stream to finish, then copies: a copy to pageable host memory issued behind kernels still
        running blocks inside the driver until they end, and while it does the transfer thread's
        copy of the next batch (another stream, page-locked memory) could not start either, so the
        next batch reached the GPU only after this one ended. Measured on the H200: a 231 MB
        staging copy took 33.8 ms beside a device thread doing ``.cpu()`` right after the
        forward, 4.4 ms when that thread synchronized first (``benchmarks/gpu_case.py``'s
        ``h2dprobe``)."""
        device = self._torch_device
        if device is not None and device.type == "cuda":
            import torch

            torch.cuda.current_stream(device).synchronize()  # releases the GIL while it waits
        return to_numpy(outputs)

    def _eager(self, batch: Any) -> Any:
        if self.is_torch and self.spec.predict is None:
            import torch

            with torch.inference_mode():
                return self._forward(self.model, batch)
        return self._forward(self.model, batch)

    def _forward(self, model: Any, batch: Any) -> Any:
        """``model`` (eager or compiled) on one batch; outputs as the model returns them."""
        if self.spec.predict is not None:
            return self.spec.predict(model, batch)
        if self.is_torch:
            import torch

            x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(batch)
            if x.device != self._torch_device:
                x = x.to(self._torch_device, non_blocking=True)
            return model(x)
        if self.device.startswith("cuda"):
            try:
                import cupy
            except ImportError:
                return self.model(batch)
            return self.model(cupy.asarray(batch))
        return self.model(batch)

    def _as_input(self, rows: np.ndarray) -> Any:
        """Host rows as :meth:`__call__` receives them (on the device when batches are staged)."""
        if self.stages_on_device:
            import torch

            return torch.from_numpy(rows).to(self._torch_device)
        return rows

    def _host_template(self) -> np.ndarray:
        """The warm-up row as a host NumPy array (for a child process)."""
        template = self._template
        if not isinstance(template, np.ndarray):
            template = template.detach().cpu().numpy()
        return template

    def _example(self, rows: int) -> Any:
        """A warm-up batch of ``rows`` rows: the first row served (or a zero row), repeated."""
        template = self._template
        if hasattr(template, "repeat") and not isinstance(template, np.ndarray):
            return template.repeat(rows, *([1] * (template.dim() - 1)))
        return np.repeat(template, rows, axis=0)

    @property
    def compiling(self) -> bool:
        """Whether a bucket of this model is compiling now (its batches then say little about size)."""
        return self.compiler is not None and self.compiler.busy

    def compile_summary(self) -> dict[str, Any] | None:
        """Compile state for stats and the dashboard (None when the model does not compile)."""
        if self.compiler is not None:
            return self.compiler.summary()
        if self.compile_error is not None:
            return {"mode": self.spec.compile_mode(), "error": self.compile_error, "buckets": {}, "ready": []}
        return None

    def memory_mark(self) -> int:
        """Start measuring the peak device memory of one batch; returns the baseline."""
        if self.device.startswith("cuda"):
            torch = sys.modules.get("torch")
            if torch is not None and torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats(self.device)
                return torch_cuda_allocator_stats(self.device)["allocated"]
            cupy = sys.modules.get("cupy")
            if cupy is not None:
                return cupy.get_default_memory_pool().used_bytes()
        return 0

    def memory_peak(self, baseline: int, batch: np.ndarray, outputs: Any) -> int:
        """Bytes the batch added at its peak: measured on CUDA (torch peak statistics, CuPy pool),
        an estimate from input/output sizes and activations on CPU."""
        if self.device.startswith("cuda"):
            torch = sys.modules.get("torch")
            if torch is not None and torch.cuda.is_available():
                return max(0, torch_cuda_allocator_stats(self.device)["peak"] - baseline)
            cupy = sys.modules.get("cupy")
            if cupy is not None:
                return max(0, cupy.get_default_memory_pool().total_bytes() - baseline)
        from .sizing import estimate_bytes_per_sample

        n = max(1, len(batch))
        in_nbytes = sum(_nbytes(a) for a in _leaves(batch))
        out_nbytes = sum(_nbytes(a) for a in _leaves(outputs))
        return int(n * estimate_bytes_per_sample(in_nbytes / n, out_nbytes / n))

    def close(self) -> None:
        """The model is unloaded: compile nothing more for it."""
        if self.compiler is not None:
            self.compiler.close()

    def free_cache(self) -> None:
        """Return cached device memory after an out-of-memory error."""
        if not self.device.startswith("cuda"):
            return
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
        cupy = sys.modules.get("cupy")
        if cupy is not None:
            cupy.get_default_memory_pool().free_all_blocks()


def _leaves(value: Any) -> list:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _leaves(v)]
    if isinstance(value, (tuple, list)):
        return [x for v in value for x in _leaves(v)]
    return [value] if hasattr(value, "nbytes") or hasattr(value, "element_size") else []


def _nbytes(array: Any) -> int:
    nbytes = getattr(array, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    return array.numel() * array.element_size()  # torch tensors


# glibc mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc_for_inference(mmap_threshold: int = 32 * 2**20, trim_threshold: int = 256 * 2**20) -> bool:
    """Undo the nanny's ``MALLOC_TRIM_THRESHOLD_=65536`` for batch-sized buffers.

    Setting any malloc threshold freezes glibc's adaptive mmap threshold at 128 KiB, so every
    activation buffer of every batch is mmap-ed, page-faulted and unmapped again: measured, this
    halves a small CNN's speed on CPU. Raising both thresholds lets freed batch buffers be reused.
    Only changes anything in a process where ``MALLOC_TRIM_THRESHOLD_`` is set (Dask nanny workers);
    returns whether it did.
    """
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) and libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold))
    except (OSError, AttributeError):
        return False
    return bool(ok)


def bisect_poison(run, n: int):
    """Run rows ``[0, n)`` so that only the requests that make the model raise fail (poison requests).

    ``run(start, stop)`` returns ``[(start, stop, output, error), ...]`` for that range (the memory
    layer may already have split it, and marked a sample too large for the device with ``error``).
    When it raises, the range is bisected until the failing rows are single; those fail with the
    original exception (and its traceback), the others are delivered. No row that succeeded runs again.

    Returns ``(pieces, errors)``: ``pieces`` a list of ``(start, stop, output)`` in row order,
    ``errors`` a dict ``row -> exception``.
    """
    pieces: list[tuple[int, int, Any]] = []
    errors: dict[int, BaseException] = {}
    stack = [(0, n)]
    while stack:
        start, stop = stack.pop()
        try:
            chunks = run(start, stop)
        except Exception as exc:
            if stop - start == 1:
                errors[start] = exc
            else:
                mid = (start + stop) // 2
                stack.append((mid, stop))  # LIFO: the first half runs first
                stack.append((start, mid))
            continue
        for a, b, output, error in chunks:
            if error is not None:
                errors.update((row, error) for row in range(a, b))
            else:
                pieces.append((a, b, output))
    pieces.sort(key=lambda p: p[0])
    return pieces, errors
