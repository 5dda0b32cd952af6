"""A model loaded on one worker device: which device, how it is loaded and called (eager or
compiled, padded to its rung), and its outputs brought back to host NumPy arrays (on CUDA while the
next batch computes).

GPU libraries are imported only when a model needs them.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .._compat import dynamo_tolerates_nested_tracing
from ..core.ladder import (
    Bucket,
    bucket_for,
    bucket_ladder,
    bucket_units,
    floor_rung,
    length_ladder,
    shape_ladder,
    structured_bucket,
)
from ..core.oom import is_oom_error
from ..core.profile import estimate_bytes_per_sample
from ..core.tree import Batch, Ragged, TreeRows, cut_length, leaf_paths, learn_fixed, top_keys
from ..spec import ModelSpec, call_load
from .compile import BucketCompiler
from .staging import PinnedBuffer, join_on_host, stage_on_device
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


class PendingHost:
    """Outputs on their way to page-locked host memory: the copies were issued on a side stream
    behind the batch's kernels, and :meth:`result` waits for them (in a thread of its own, so
    that the device thread launches the next batch meanwhile)."""

    __slots__ = ("outputs", "done")

    def __init__(self, outputs: Any, done: Any):
        self.outputs = outputs  # the same structure, torch leaves page-locked CPU tensors
        self.done = done  # a CUDA event recorded after the copies

    def result(self) -> Any:
        self.done.synchronize()  # releases the GIL while it waits
        return to_numpy(self.outputs)


def _copy_out(value: Any, stream: Any) -> tuple[Any, bool]:
    """``value`` with every CUDA tensor replaced by a page-locked host tensor it is copied into
    on ``stream`` (issued, not waited for); and whether anything else is on a device (a CuPy
    array, say), which the caller must wait for as before."""
    import torch

    if isinstance(value, dict):
        items = [(k, _copy_out(v, stream)) for k, v in value.items()]
        return {k: v for k, (v, _) in items}, any(other for _, (_, other) in items)
    if isinstance(value, (tuple, list)):
        pairs = [_copy_out(v, stream) for v in value]
        return type(value)(v for v, _ in pairs), any(other for _, other in pairs)
    if isinstance(value, torch.Tensor):
        if not value.is_cuda:
            return value, False
        value = value.detach()  # (an autograd graph would keep the batch's activations alive)
        value.record_stream(stream)  # its memory is not reused before the copy is done
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        host.copy_(value, non_blocking=True)
        return host, False
    return value, type(value).__module__.startswith("cupy")


def _to_cupy(leaf: Any) -> Any:
    try:
        import cupy
    except ImportError:
        return leaf
    return cupy.asarray(leaf)


def pad_rows(batch: Any, rows: int) -> Any:
    """``batch`` (NumPy array or torch tensor, or a structured batch of them) grown to ``rows``
    rows with copies of its last row."""
    n = len(batch)
    if n >= rows:
        return batch
    if isinstance(batch, Batch):
        grown = batch.map(lambda leaf: pad_rows(leaf, rows))
        if grown.lengths is not None:
            grown.lengths = np.concatenate([grown.lengths, np.repeat(grown.lengths[-1:], rows - n)])
        return grown
    if isinstance(batch, np.ndarray):
        return np.concatenate([batch, np.repeat(batch[-1:], rows - n, axis=0)])
    import torch

    return torch.cat([batch, batch[-1:].expand(rows - n, *batch.shape[1:])])


def trim_rows(outputs: Any, n: int) -> Any:
    """The first ``n`` rows of every output (arrays, tensors; tuples and dicts of them; a list of
    one element per row)."""
    if isinstance(outputs, dict):
        return {k: trim_rows(v, n) for k, v in outputs.items()}
    if isinstance(outputs, tuple):
        return type(outputs)(trim_rows(v, n) for v in outputs)
    if isinstance(outputs, list):
        return outputs[:n]
    if getattr(outputs, "ndim", 0) > 0:
        return outputs[:n]
    return outputs


def pad_length(leaf: Any, length: int, pad: Any) -> Any:
    """A padded leaf (rows on axis 0, the sequence on axis 1; NumPy or torch) padded with ``pad``
    (or cut) to ``length`` along axis 1."""
    extra = length - leaf.shape[1]
    if extra <= 0:  # a warm-up row longer than its bucket: contiguous, as served batches are
        return np.ascontiguousarray(leaf[:, :length]) if isinstance(leaf, np.ndarray) else leaf[:, :length].contiguous()
    shape = (leaf.shape[0], extra, *leaf.shape[2:])
    if isinstance(leaf, np.ndarray):
        return np.concatenate([leaf, np.full(shape, pad, dtype=leaf.dtype)], axis=1)
    import torch

    return torch.cat([leaf, leaf.new_full(shape, pad)], dim=1)


def _rows_of(bucket: Bucket) -> int:
    return bucket[0] if isinstance(bucket, tuple) else bucket


def _copy(leaf: Any) -> Any:
    return leaf.clone() if hasattr(leaf, "clone") else np.array(leaf)


def _first_row(batch: Any) -> Any:
    """A copy of a batch's first row (the model of warm-up batches)."""
    if isinstance(batch, Batch):
        return batch[:1].map(_copy)
    return _copy(batch[:1])


def _host(leaf: Any) -> Any:
    return leaf if isinstance(leaf, np.ndarray) else leaf.detach().cpu().numpy()


class LoadedModel:
    """A model loaded on one worker device, ready to run batches.

    With ``ModelSpec.compile``, ``compile_submit`` (runs a callable in the worker's compile thread)
    and ``compile_reserve`` (``rows -> context manager or None``: device memory for a warm-up
    batch) let a :class:`~dask_dynbatch.worker.compile.BucketCompiler` compile buckets in the background;
    ``compile_warm(bucket, template, stop=event)`` warms the compile caches in a child process first.
    """

    def __init__(self, spec: ModelSpec, device: str, version: int = 0,
                 compile_submit: Callable[[Callable[[], None]], Any] | None = None,
                 compile_reserve: Callable[[int], Any] | None = None,
                 compile_warm: Callable[..., Any] | None = None):
        self.spec = spec.for_device(device)
        self.device = device
        self.version = version
        started = time.perf_counter()
        self.model = call_load(self.spec.load, device)
        self.is_torch = _is_torch_module(self.model)
        self._torch_device: Any = None  # torch models: their device, and on CUDA a side stream to stage on
        self._copy_stream: Any = None
        self._out_stream: Any = None  # where outputs are copied to the host (CUDA)
        self._pinned = PinnedBuffer()  # where batches bound for a GPU are joined
        self._pad_values: dict[tuple, list[Any]] = {}  # per sample tree: each leaf's pad value
        if self.is_torch:
            self._prepare_torch()
        self.load_seconds = time.perf_counter() - started
        self._sizes_seen: set[int] = set()
        self.calls = 0  # batches (and pieces of split batches) run
        self._shapes_warmed = False
        # padded or weighed samples form batches by cost, not on rungs of rows: the controller's
        # size is free, and only compiled or static-shape batches are padded, to (rows, length) buckets
        self.ladder = None if self.spec.structured else self.spec.ladder(device)
        self.tree_ladder = self._tree_ladder()
        self._lengths = length_ladder()
        self._fixed_outputs: set[str] = set()  # padded samples: outputs seen not to follow the padded length
        self._longest = 0  # the longest padded batch the eager model ran: padded buckets go no longer
        self.compiler: BucketCompiler | None = None
        self.compile_error: str | None = None
        self._template: Any = None  # one input row (a Batch of one row for structured samples), the model of warm-up batches
        mode = self.spec.compile_mode()
        if mode is not None:
            if not self.is_torch:
                self.compile_error = (
                    f"compile={self.spec.compile!r} needs load() to return a torch.nn.Module, "
                    f"not {type(self.model).__name__}; the model is served eagerly"
                )
                logger.warning("dynbatch: model %r: %s", self.spec.name, self.compile_error)
            elif compile_submit is not None:
                import dask.config

                self.compiler = BucketCompiler(
                    self.model, mode, self.ladder or self.tree_ladder or (), run=self.forward, example=self._example,
                    submit=compile_submit, reserve=compile_reserve,
                    warm=(lambda bucket, stop: compile_warm(bucket, self._host_template(bucket), stop=stop)) if compile_warm else None,
                    max_buckets=int(dask.config.get("dynbatch.compile.max-buckets", 24)) if self.spec.structured else None,
                )
                if self.ladder and self.spec.input_shape is not None and self.spec.input_dtype is not None:
                    # the signature is declared: compile the first bucket before the first batch
                    row = np.zeros((1, *self.spec.input_shape), dtype=np.dtype(self.spec.input_dtype))
                    self._template = self.as_input(row)
                    first = bucket_for(self.ladder, self.spec.initial_size(device))
                    if first is not None:
                        self.compiler.want(first, force=True)

    def _tree_ladder(self) -> tuple[int, ...] | None:
        """Row rungs of batches of structured samples: the controller's ladder (compiled, ``buckets``
        or the shape ladder of eager CUDA models; None: free-sized), or for batches formed by cost,
        when they are compiled or ``buckets`` are asked for, ``buckets`` or the shape ladder (a
        quarter of padding at most). None: never padded."""
        spec = self.spec
        if not spec.structured:
            return self.ladder
        if spec.compile_mode() is None and spec.buckets is None:
            return None
        return bucket_ladder(spec.buckets, spec.max_batch_size) if spec.buckets is not None else shape_ladder(spec.max_batch_size)

    def _prepare_torch(self) -> None:
        import torch

        self.model = self.model.to(self.device).eval()
        self._torch_device = torch.device(self.device)
        self._copy_stream = torch.cuda.Stream(self._torch_device) if self._torch_device.type == "cuda" else None
        self._out_stream = torch.cuda.Stream(self._torch_device) if self._torch_device.type == "cuda" else None

    @property
    def stages_on_device(self) -> bool:
        """Whether :meth:`stage` moves batches to the device (torch module on CUDA, default predict)."""
        return self.is_torch and self.spec.predict is None and self._copy_stream is not None

    def stage_tree(self, parts: list[TreeRows], shared: bool) -> Batch:
        """Rows of structured samples as one :class:`~dask_dynbatch.core.tree.Batch`: leaves joined,
        ragged ones padded to the longest row (on the device when batches are staged there)."""
        rows = TreeRows.concat(parts)
        pads = self._pad_values.get(rows.tree)
        if pads is None:
            pads = self._pad_values[rows.tree] = [0 if p is None else p for p in
                                            (self.spec.pad_for(path, key) for path, key in
                                             zip(leaf_paths(rows.tree), top_keys(rows.tree)))]
        leaves, length = rows.padded(pads)
        if shared and len(parts) == 1:  # views of a client's slot: never aliased by outputs or later batches
            leaves = [np.array(leaf) for leaf in leaves]
        batch = Batch(rows.tree, leaves, length, rows.lengths() if length is not None else None,
                      tuple(isinstance(leaf, Ragged) for leaf in rows.leaves))
        if self.stages_on_device:
            import torch

            with torch.cuda.stream(self._copy_stream):
                batch = batch.map(lambda leaf: torch.from_numpy(np.ascontiguousarray(leaf)).to(self._torch_device, non_blocking=False))
            self._copy_stream.synchronize()
        return batch

    def units(self, batch: Any, padded: bool = True) -> int:
        """What a batch weighs in the memory sizer: rows (of its bucket), or for padded or weighed
        samples its cost (rows times padded length: tokens); ``padded=False``: as it is, not padded
        to its bucket."""
        if isinstance(batch, Batch):
            bucket = self._runs_in(self.bucket_of(batch)) if padded else None
            if bucket is not None:
                return bucket_units(bucket)
            if batch.length is not None:
                return len(batch) * batch.length
            return len(batch)
        return self.rows_for(len(batch))

    def stage(self, arrays: list[np.ndarray], shared: bool = False, pinned: bool = False) -> Any:
        """The rows of a device batch (host arrays) as :meth:`__call__` takes them: one tensor on
        the device (a torch module on CUDA with the default predict; called in the transfer thread,
        so that it overlaps the compute of the batch before), else one host array. ``shared``: the
        arrays are views of memory a client reuses, which the result never aliases; ``pinned``:
        that memory is page-locked, the device copies straight out of it."""
        if arrays and isinstance(arrays[0], TreeRows):
            return self.stage_tree(arrays, shared)
        if not self.stages_on_device:
            return join_on_host(arrays, shared)
        return stage_on_device(arrays, self._torch_device, self._copy_stream, self._pinned, pinned)

    # -- running ------------------------------------------------------------------------------
    def first_at_size(self, n: int) -> bool:
        """Whether no batch of ``n`` rows (of its bucket, with a ladder) ran here before. On a GPU
        the first batch of a shape pays one-time set-up: cuDNN picks and builds its convolution
        plans per input shape, and the allocator grows: a controller that learnt from that batch would
        shrink again after every step."""
        size = self.rows_for(n)
        if size in self._sizes_seen:
            return False
        self._sizes_seen.add(size)
        return True

    @property
    def wants_shape_warmup(self) -> bool:
        """Eager torch model on CUDA with a shape ladder whose rungs are not warmed yet."""
        return not self._shapes_warmed and self.is_torch and self.spec.pads_shapes(self.device) and bool(self.ladder)

    def warm_shapes(self, example: Any, limit: int, rungs: int | None = None) -> int:
        if isinstance(example, Batch):  # structured samples: their batches are not warmed ahead
            self._shapes_warmed = True
            return 0
        return self._warm_shapes(example, limit, rungs)

    def _warm_shapes(self, example: Any, limit: int, rungs: int | None = None) -> int:
        """Run each rung of the shape ladder up to ``limit`` rows once, with copies of ``example``'s
        first row, so that no served batch pays a shape's one-time set-up (cuDNN plans); ``rungs``:
        at most this many now, the rest at later calls. Called in the device thread between batches;
        an out-of-memory error stops it. Returns the rungs warmed."""
        import torch

        row = example[:1] if isinstance(example, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(example[:1]))
        row = row.to(self._torch_device)
        warmed = 0
        self._shapes_warmed = True  # unless rungs are left for a later call (below)
        for rung in self.ladder:
            if rung > limit:
                break
            if rung in self._sizes_seen:
                continue
            if rungs is not None and warmed >= rungs:
                self._shapes_warmed = False
                break
            try:
                with torch.inference_mode():
                    self.forward(self.model, row.expand(rung, *row.shape[1:]).contiguous())
            except Exception as exc:  # the batch itself will tell
                if is_oom_error(exc):
                    self.free_cache()
                logger.info("dynbatch: warming shape %d of model %r stopped: %r", rung, self.spec.name, exc)
                self._shapes_warmed = True
                break
            self._sizes_seen.add(rung)
            warmed += 1
        if self._torch_device.type == "cuda":
            torch.cuda.synchronize(self._torch_device)
        return warmed

    @property
    def row_limit(self) -> int | None:
        """Most rows of a batch formed by cost that still has a bucket (the top of ``buckets``), or
        None."""
        if self.spec.structured and self.spec.buckets is not None and self.tree_ladder:
            return self.tree_ladder[-1]
        return None

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

    def _pads(self, bucket: Bucket) -> bool:
        if self.compiler is not None:
            return self.compiler.ready(bucket) is not None
        if self.spec.pads_shapes(self.device):  # few shapes for cuDNN; only where rows are independent
            return self.is_torch
        return self.spec.buckets is not None and self.compile_error is None  # static shapes asked for

    def _runs_in(self, bucket: Bucket | None) -> Bucket | None:
        """The bucket a batch of ``bucket`` is padded to and run in now: its own when it pads
        (compiled or static), else a compiled one that covers it, else None (as it is)."""
        if bucket is None:
            return None
        if self._pads(bucket):
            return bucket
        return self.compiler.cover(bucket) if self.compiler is not None else None

    def bucket_of(self, batch: Any) -> Bucket | None:
        """The bucket a batch would be padded to: its rung of rows, or for structured samples its
        ``(rows, length)`` bucket; None when it runs as it is."""
        if isinstance(batch, Batch):
            if not self.tree_ladder:
                return None
            return structured_bucket(len(batch), batch.length, self.tree_ladder, self._lengths, self._longest)
        return bucket_for(self.ladder, len(batch)) if self.ladder else None

    def __call__(self, batch: Any, full: bool = True, pad: bool = True) -> Any:
        """Run one stacked batch (host array or device tensor, or a structured
        :class:`~dask_dynbatch.core.tree.Batch`); returns host NumPy outputs, or on CUDA a
        :class:`PendingHost` of them (see :meth:`_to_host`). ``full``: the batch
        is as large as the server's size (not the short tail of a backlog); ``pad=False``: run it
        as it is, not padded to its bucket (it would not fit the device's memory padded)."""
        self.calls += 1
        n = len(batch)
        bucket = self.bucket_of(batch) if pad else None
        if bucket is None:
            return self._to_host(self._eager(batch))
        compiler = self.compiler
        if compiler is None:
            if self._pads(bucket):
                return self._to_host(self._fit(self._eager(self._grow(batch, bucket)), batch, bucket))
            return self._to_host(self._eager(batch))
        if self._template is None:
            self._template = _first_row(batch)
        if compiler.ready(bucket) is None:
            cover = compiler.cover(bucket)
            if cover is None:
                compiler.want(bucket, n, full=full)
                compiler.count(compiled=False)
                return self._to_host(self._eager(batch))
            bucket = cover
        import torch

        with compiler.use(bucket) as compiled:
            if compiled is None:  # a bucket is compiling right now: torch.compile is not thread-safe
                compiler.count(compiled=False)
                return self._to_host(self._eager(batch))
            try:
                # padded outside inference mode: a tensor made in it is an "inference tensor",
                # which fails the guards of a graph warmed with an ordinary one, and dynamo then
                # recompiles in this thread while every batch waits
                padded = self._grow(batch, bucket)
                with torch.inference_mode(), dynamo_tolerates_nested_tracing():
                    # waited for: a graph replayed from CUDA graphs writes its outputs where the
                    # next replay writes its own, before a copy behind it would be done
                    result = self._to_host(self._fit(self.forward(compiled, padded), batch, bucket), wait=True)
            except Exception as exc:
                if is_oom_error(exc):
                    raise
                failure = exc
            else:
                extra = 0
                if isinstance(bucket, tuple) and bucket[1] is not None and isinstance(batch, Batch) and batch.length:
                    extra = (bucket[1] - batch.length) * bucket[0]
                compiler.count(compiled=True, padded_rows=_rows_of(bucket) - n,
                               padded_elements=extra)
                return result
        # eager decides whether the data (a poison request: it raises again) or the compiled graph
        # is at fault
        result = self._to_host(self._eager(batch))
        compiler.fail(failure)
        compiler.count(compiled=False)
        return result

    def _grow(self, batch: Any, bucket: Bucket) -> Any:
        """``batch`` padded to ``bucket``: rows (copies of the last), and for a ``(rows, length)``
        bucket every padded leaf to that length with its pad value."""
        if not isinstance(bucket, tuple):
            return pad_rows(batch, bucket)
        rows, length = bucket
        grown = pad_rows(batch, rows)
        if length is not None and isinstance(grown, Batch):
            grown = self._with_length(grown, length)
        return grown

    def _with_length(self, batch: Batch, length: int) -> Batch:
        """``batch`` with its padded leaves padded (or cut) to ``length`` along axis 1."""
        if batch.length == length:
            return batch
        pads = self._pad_values.get(batch.tree) or [0] * len(batch.leaves)
        leaves = [pad_length(leaf, length, pads[j]) if j < len(batch.ragged) and batch.ragged[j] else leaf
                  for j, leaf in enumerate(batch.leaves)]
        lengths = None if batch.lengths is None else np.minimum(batch.lengths, length)
        return Batch(batch.tree, leaves, length, lengths, batch.ragged)

    def _fit(self, outputs: Any, batch: Any, bucket: Bucket) -> Any:
        """Outputs of ``batch`` run padded to ``bucket``, as if it had run as it is: the padding rows
        cut, and for a ``(rows, length)`` bucket every output along the padded length cut back to the
        batch's length (except outputs seen not to follow it, :func:`~dask_dynbatch.core.tree.learn_fixed`)."""
        outputs = trim_rows(outputs, len(batch))
        if isinstance(bucket, tuple) and bucket[1] is not None and isinstance(batch, Batch) and batch.length is not None:
            outputs = cut_length(outputs, bucket[1], batch.length, self._fixed_outputs)
        return outputs

    def _to_host(self, outputs: Any, wait: bool = False) -> Any:
        """``outputs`` as host NumPy arrays, or on CUDA a :class:`PendingHost` of them: torch
        outputs are copied into page-locked memory on a side stream once the batch's kernels are
        done, and the device thread goes on to launch the next batch, which computes while they
        copy (waiting here instead left the GPU idle for every batch's copy). Other device
        outputs (CuPy) are waited for, then copied: a copy to pageable host memory issued behind
        kernels still running blocks inside the driver until they end, and the transfer thread's
        copy of the next batch could not start meanwhile. ``wait``: host arrays in any case."""
        device = self._torch_device
        if device is not None and device.type == "cuda":
            import torch

            compute = torch.cuda.current_stream(device)
            stream = self._out_stream
            stream.wait_stream(compute)
            with torch.cuda.stream(stream):
                copied, other = _copy_out(outputs, stream)
                done = torch.cuda.Event()
                done.record(stream)
            if not other and not wait:
                return PendingHost(copied, done)
            compute.synchronize()  # releases the GIL while it waits
            done.synchronize()
            return to_numpy(copied)
        return to_numpy(outputs)

    def gpu_timer(self) -> tuple[Any, Any] | None:
        """Two CUDA events to record before and after a batch on the device's current stream, which
        time it on the GPU (the device thread no longer waits for its end); None off CUDA."""
        device = self._torch_device
        if device is None or device.type != "cuda":
            return None
        import torch

        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def _eager(self, batch: Any) -> Any:
        if self.is_torch and self.spec.predict is None:
            import torch

            with torch.inference_mode():
                outputs = self.forward(self.model, batch)
        else:
            outputs = self.forward(self.model, batch)
        if self.tree_ladder and isinstance(batch, Batch) and batch.length is not None:
            learn_fixed(outputs, batch.length, self._fixed_outputs)  # for cutting the outputs of padded buckets
            self._longest = max(self._longest, batch.length)
        return outputs

    def forward(self, model: Any, batch: Any) -> Any:
        """``model`` (eager or compiled) on one batch; outputs as the model returns them. A batch
        of structured samples calls ``model(**batch)`` for a dict, ``model(*batch)`` for a tuple or
        list, ``model(batch)`` for an array (``predict`` gets the structure as it is)."""
        if isinstance(batch, Batch):
            if self.is_torch:
                batch = batch.map(self._to_torch)
            elif self.device.startswith("cuda"):
                batch = batch.map(_to_cupy)
            structure = batch.structure()
            if self.spec.predict is not None:
                return self.spec.predict(model, structure)
            if batch.tree[0] == "dict":
                return model(**structure)
            if batch.tree[0] in ("tuple", "list"):
                return model(*structure)
            return model(structure)
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

    def _to_torch(self, leaf: Any) -> Any:
        import torch

        x = leaf if isinstance(leaf, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(leaf))
        return x if x.device == self._torch_device else x.to(self._torch_device, non_blocking=True)

    def as_input(self, rows: np.ndarray) -> Any:
        """Host rows as :meth:`__call__` receives them (on the device when batches are staged)."""
        if self.stages_on_device:
            import torch

            return torch.from_numpy(rows).to(self._torch_device)
        return rows

    def _host_template(self, bucket: Bucket) -> Any:
        """What a child process warms ``bucket`` with: the warm-up row as a host NumPy array, or for
        structured samples the whole warm-up batch with host leaves."""
        if isinstance(self._template, Batch):
            return self._example(bucket).map(_host)
        return _host(self._template)

    def _example(self, bucket: Bucket) -> Any:
        """A warm-up batch of ``bucket``'s shape: the first row served (or a zero row), repeated
        (for a ``(rows, length)`` bucket, padded or cut to the length)."""
        template = self._template
        if isinstance(template, Batch):
            return self._grow(template, bucket)
        rows = _rows_of(bucket)
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
        n = max(1, self.units(batch))
        in_nbytes = sum(_nbytes(a) for a in _leaves(batch.leaves if isinstance(batch, Batch) else batch))
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
