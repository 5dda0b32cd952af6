"""Compiled execution with batch-size buckets (``ModelSpec(compile=...)``).

A compiled graph (``torch.compile`` with static shapes) serves one batch size. So batches are
formed on a *ladder* of bucket sizes (powers of two up to ``max_batch_size`` by default): the
client's controller steps from rung to rung and the memory cap is rounded down to a rung, so full
batches fill a bucket exactly; a partial batch is padded to its bucket on the worker (with copies
of its last row) and the padding is cut from the outputs before they leave the device.

Compilation never blocks a request. :class:`BucketCompiler` compiles one bucket at a time in a
background thread: a bucket once two full batches of its size have run eagerly (sixteen short
ones: the tail of every burst is short), the one that served the most rows first, then the rung
above it, where the controller goes next. Until a bucket is ready
its batches run eagerly, unpadded. torch.compile is not thread-safe, so while a bucket compiles
every batch runs eagerly (measured on the GPU: compiled calls during another thread's trace failed);
once the controller settles, nothing compiles any more and every full batch runs compiled. A model
that fails to compile is served eagerly for good, with a warning; the error shows in
``Batcher.stats()``.

The ladder helpers are pure; torch is imported only by :class:`BucketCompiler`.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import logging
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: ``ModelSpec(compile=...)`` values, as ``torch.compile(mode=...)`` takes them (True: "default")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: a bucket is compiled once this many full batches of its size have run eagerly...
MIN_EAGER_BATCHES = 2
#: ...or this many short ones (the tail of each burst is short: compiling its bucket would keep
#: the compile thread, and so every batch, off the compiled path for seconds after every burst)
MIN_SHORT_BATCHES = 16
#: the default ladder stops here when the spec sets no max_batch_size (the memory cap binds first)
LADDER_TOP = 2**16


# ------------------------------------------------------------------------------------------------
# The ladder (pure)
# ------------------------------------------------------------------------------------------------
def compile_mode(value: bool | str | None) -> str | None:
    """``ModelSpec.compile`` as a ``torch.compile`` mode, or None when off; raise on a bad value."""
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if isinstance(value, str) and value in COMPILE_MODES:
        return value
    raise ValueError(f"ModelSpec.compile must be True, False or one of {COMPILE_MODES}, not {value!r}")


def bucket_ladder(buckets: Sequence[int] | None, max_batch_size: int | None) -> tuple[int, ...]:
    """The batch sizes batches are formed in.

    ``buckets`` given: those sizes, sorted (sizes above ``max_batch_size`` are dropped). Otherwise
    powers of two from 1 up to ``max_batch_size`` (plus ``max_batch_size`` itself when it is not a
    power of two), or up to :data:`LADDER_TOP` without a ``max_batch_size``.
    """
    if buckets is not None:
        rungs = sorted({int(b) for b in buckets})
        if not rungs or rungs[0] < 1:
            raise ValueError(f"ModelSpec.buckets must be positive batch sizes, not {buckets!r}")
        if max_batch_size is not None:
            rungs = [b for b in rungs if b <= max_batch_size] or [min(rungs[0], max_batch_size)]
        return tuple(rungs)
    top = LADDER_TOP if max_batch_size is None else int(max_batch_size)
    rungs = []
    size = 1
    while size <= top:
        rungs.append(size)
        size *= 2
    if rungs[-1] != top:
        rungs.append(top)
    return tuple(rungs)


def shape_ladder(max_batch_size: int | None, per_doubling: int = 4) -> tuple[int, ...]:
    """Batch sizes of eager models on CUDA (``ModelSpec.shape_buckets``): 1, 2, 4, then multiples
    of 8 up to 64, then ``per_doubling`` evenly spaced sizes per doubling (80, 96, 112, 128, 160,
    ...), up to ``max_batch_size`` (included) or :data:`LADDER_TOP`.

    Few distinct shapes, because the first batch of each shape pays a one-time set-up on the GPU
    (cuDNN builds its convolution plans per input shape: ~40 ms for ResNet-50 on an H200), while a
    batch padded to its rung wastes at most ``1 / per_doubling`` of its rows (25 % from 65 to 80;
    full batches sit on rungs and waste nothing). Multiples of 8 also suit tensor cores.
    """
    top = LADDER_TOP if max_batch_size is None else int(max_batch_size)
    rungs = [1, 2, 4] + list(range(8, 65, 8))
    base = 64
    while rungs[-1] < top:
        step = base // per_doubling
        rungs.extend(base + step * k for k in range(1, per_doubling + 1))
        base *= 2
    rungs = [r for r in rungs if r <= top]
    if rungs[-1] != top:
        rungs.append(top)
    return tuple(rungs)


def bucket_for(ladder: Sequence[int], n: int) -> int | None:
    """Smallest rung that holds ``n`` rows, or None when ``n`` is above the ladder."""
    i = bisect.bisect_left(ladder, n)
    return ladder[i] if i < len(ladder) else None


def floor_rung(ladder: Sequence[int], n: int) -> int:
    """Largest rung not above ``n`` (``n`` itself when it is below the ladder)."""
    i = bisect.bisect_right(ladder, n)
    return ladder[i - 1] if i > 0 else n


def next_rung(ladder: Sequence[int], n: int) -> int | None:
    """Smallest rung above ``n``, or None at the top."""
    i = bisect.bisect_right(ladder, n)
    return ladder[i] if i < len(ladder) else None


def pad_rows(batch: Any, rows: int) -> Any:
    """``batch`` (NumPy array or torch tensor) grown to ``rows`` rows with copies of its last row."""
    n = len(batch)
    if n >= rows:
        return batch
    if isinstance(batch, np.ndarray):
        return np.concatenate([batch, np.repeat(batch[-1:], rows - n, axis=0)])
    import torch

    return torch.cat([batch, batch[-1:].expand(rows - n, *batch.shape[1:])])


def trim_rows(outputs: Any, n: int) -> Any:
    """The first ``n`` rows of every output (arrays, tensors; tuples, lists and dicts of them)."""
    if isinstance(outputs, dict):
        return {k: trim_rows(v, n) for k, v in outputs.items()}
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(trim_rows(v, n) for v in outputs)
    if getattr(outputs, "ndim", 0) > 0:
        return outputs[:n]
    return outputs


# ------------------------------------------------------------------------------------------------
# Background compilation
# ------------------------------------------------------------------------------------------------
def compile_static(module: Any, mode: str, shapes: int) -> Any:
    """``torch.compile(module, mode=mode, dynamic=False)``, with dynamo's recompile limit raised so
    that ``shapes`` batch sizes (a recompile of the same code object each) all compile."""
    import torch

    dynamo_config = torch._dynamo.config
    limit = shapes + 8
    for knob in ("recompile_limit", "cache_size_limit"):
        if getattr(dynamo_config, knob, limit) < limit:
            setattr(dynamo_config, knob, limit)
    return torch.compile(module, mode=mode, dynamic=False)


def compile_shape(run: Callable[[Any, Any], Any], compiled: Any, batch: Any) -> None:
    """Compile ``compiled`` for the shape of ``batch`` and warm it: ``run(compiled, batch)`` twice
    under ``torch.inference_mode`` (the first call traces and compiles, the second runs compiled;
    CUDA graphs record there), then wait for the device."""
    import torch

    with torch.inference_mode():
        run(compiled, batch)
        run(compiled, batch)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class BucketCompiler:
    """``torch.compile`` of one module, warmed bucket by bucket in the background.

    Parameters
    ----------
    module
        The loaded ``torch.nn.Module`` (already on its device, in eval mode).
    mode
        ``torch.compile`` mode.
    ladder
        Bucket sizes (see :func:`bucket_ladder`).
    run
        ``run(model, batch) -> outputs``: how a batch is run (the same call for eager and compiled,
        e.g. the user's ``predict``), called under ``torch.inference_mode``.
    example
        ``example(rows) -> batch``: a batch of ``rows`` rows shaped as the served ones, for warm-up.
    submit
        Runs a callable in the background (the worker's compile thread).
    reserve
        ``reserve(rows)``: a context manager holding device memory for a warm-up batch, or None
        when there is no room now (the bucket is tried again when a batch next asks for it).
    warm
        ``warm(rows, stop)``: compiles the bucket in a child process first (see :func:`warm_in_subprocess`),
        so that the compile in this process finds inductor's on-disk caches warm and holds the
        exclusive lock (every batch eager) for seconds instead of tens of seconds. Optional; a
        failure only makes the compile here slower.
    """

    def __init__(
        self,
        module: Any,
        mode: str,
        ladder: Sequence[int],
        run: Callable[[Any, Any], Any],
        example: Callable[[int], Any],
        submit: Callable[[Callable[[], None]], Any],
        reserve: Callable[[int], Any] | None = None,
        warm: Callable[[int, threading.Event], Any] | None = None,
    ):
        self.mode = mode
        self.ladder = tuple(ladder)
        self._module = module
        self._run = run
        self._example = example
        self._submit = submit
        self._reserve = reserve
        self._warm = warm
        self._in_process = False  # compiling in this process now (batches run eagerly meanwhile)
        self._warm_seconds: dict[int, float] = {}
        self._stop = threading.Event()  # set by close(): the model was unloaded or the worker closes
        self.compiled: Any = None  # made in the background thread (importing the compiler takes seconds)
        self._lock = threading.Lock()
        # Held while a bucket compiles, and by a batch running compiled: torch.compile is not
        # thread-safe (a compiled call during another thread's trace raised on the GPU, in two
        # different ways), so a batch that finds a compile going on runs eagerly, never waits.
        self._exclusive = threading.Lock()
        self._eager_seen: dict[tuple[int, bool], int] = {}  # (bucket, full) -> eager batches while not ready
        self._demand: dict[int, int] = {}  # bucket -> rows served eagerly while it was not ready
        self._ready: set[int] = set()
        self._state: dict[int, str] = {}  # bucket -> "queued", "compiling", "ready", "no-memory"
        GC_PAUSES.install()
        self._seconds: dict[int, float] = {}
        self._pending: list[int] = []  # buckets to compile, first first
        self._running = False
        self.error: str | None = None
        self.compiled_batches = 0
        self.eager_batches = 0
        self.padded_rows = 0

    # -- serving side (device thread) -----------------------------------------------------------
    def ready(self, bucket: int) -> Any | None:
        """The compiled module when ``bucket`` is warmed, else None (serve eagerly)."""
        return self.compiled if bucket in self._ready and self.error is None else None

    @contextlib.contextmanager
    def use(self, bucket: int):
        """The compiled module for a batch of ``bucket`` rows, held for the ``with`` block; None
        (run eagerly) when the bucket is not ready or a compile is running now."""
        compiled = self.ready(bucket)
        if compiled is None or not self._exclusive.acquire(blocking=False):
            yield None
            return
        try:
            yield compiled
        finally:
            self._exclusive.release()

    def want(self, bucket: int, rows: int = 0, force: bool = False, full: bool = True) -> None:
        """A batch of ``rows`` rows in ``bucket`` ran eagerly because the bucket is not compiled.
        From the :data:`MIN_EAGER_BATCHES`-th such ``full`` batch on (:data:`MIN_SHORT_BATCHES`-th
        short one), queue that bucket, and after full batches the rung above it too (the
        controller's next step), so that one-off short batches (the tail of a burst) cost no
        compile. The compile thread takes the queued bucket that has served the most rows eagerly
        first. ``force``: queue it now (a declared input signature, before any batch).
        Never waits."""
        if self.error is not None or self._stop.is_set():
            return
        with self._lock:
            self._demand[bucket] = self._demand.get(bucket, 0) + rows
            key = (bucket, full)
            self._eager_seen[key] = seen = self._eager_seen.get(key, 0) + 1
            if seen < (MIN_EAGER_BATCHES if full else MIN_SHORT_BATCHES) and not force:
                return
            for b in (bucket, next_rung(self.ladder, bucket) if full else None):
                if b is None or self._state.get(b) in ("queued", "compiling", "ready"):
                    continue
                self._state[b] = "queued"
                self._pending.append(b)
            start = bool(self._pending) and not self._running
            if start:
                self._running = True
        if start:
            self._submit(self._drain)

    @property
    def busy(self) -> bool:
        """Whether a bucket compiles in this process now (batches run eagerly, and slower, meanwhile)."""
        return self._in_process

    def close(self) -> None:
        """Compile nothing more: drop what is queued and stop a child process that warms a bucket
        (a compile already running in this process finishes)."""
        self._stop.set()
        with self._lock:
            for bucket in self._pending:
                self._state.pop(bucket, None)
            self._pending.clear()

    def fail(self, exc: BaseException) -> None:
        """The compiled module raised where the eager one did not: serve eagerly from now on."""
        self._give_up(exc, "running")

    # -- background side ----------------------------------------------------------------------
    def _drain(self) -> None:
        try:
            while True:
                with self._lock:
                    if not self._pending or self.error is not None or self._stop.is_set():
                        return
                    # most rows served eagerly first; among equals (prefetched rungs), the smallest
                    bucket = max(self._pending, key=lambda b: (self._demand.get(b, 0), -b))
                    self._pending.remove(bucket)
                    self._state[bucket] = "compiling"
                self._compile(bucket)
        except BaseException as exc:  # a bug here must not leave compiling stuck "running"
            self._give_up(exc, "compiling")
            raise
        finally:
            with self._lock:
                self._running = False

    def _make_compiled(self) -> None:
        import torch

        # belt and braces beside the exclusive lock: a compiled call that meets torch.fx's
        # process-wide "tracing" flag runs its eager code instead of raising
        torch._dynamo.config.error_on_nested_fx_trace = False
        self.compiled = compile_static(self._module, self.mode, len(self.ladder))

    def _compile(self, bucket: int) -> None:
        from .sizing import is_oom_error

        started = time.perf_counter()
        if self._warm is not None:
            # the long part (code generation, kernel compiles, autotuning) in a child process, while
            # the compiled buckets go on serving here; the child's memory shows in the device's free
            # memory, which the sizer reads, so nothing is reserved for it here
            try:
                if self._warm(bucket, self._stop) is not None:
                    self._warm_seconds[bucket] = time.perf_counter() - started
            except Exception:  # only makes the compile below slower
                logger.info("dynbatch: warming the compile caches for bucket %d failed", bucket, exc_info=True)
            if self._stop.is_set():
                with self._lock:
                    self._state.pop(bucket, None)
                return
        held = self._reserve(bucket) if self._reserve is not None else None
        if self._reserve is not None and held is None:
            with self._lock:
                self._state[bucket] = "no-memory"  # asked again by the next batch of this bucket
            return
        with held if held is not None else contextlib.nullcontext():
            with self._exclusive:
                self._in_process = True
                try:
                    if self.compiled is None:
                        self._make_compiled()
                    compile_shape(self._run, self.compiled, self._example(bucket))
                except Exception as exc:
                    if is_oom_error(exc):
                        with self._lock:
                            self._state[bucket] = "no-memory"
                        return
                    self._give_up(exc, f"compiling bucket {bucket}")
                    return
                finally:
                    self._in_process = False
        seconds = time.perf_counter() - started
        with self._lock:
            self._seconds[bucket] = seconds
            self._state[bucket] = "ready"
            self._ready.add(bucket)
        logger.info("dynbatch: compiled bucket %d (%s) in %.1f s", bucket, self.mode, seconds)

    def _give_up(self, exc: BaseException, when: str) -> None:
        with self._lock:
            if self.error is not None:
                return
            self.error = f"{type(exc).__name__} while {when}: {exc}"[:2000]
            self._ready.clear()
            self._pending.clear()
        logger.warning(
            "dynbatch: torch.compile(mode=%r) failed (%s); the model is served eagerly from now on",
            self.mode, self.error,
        )

    # -- reporting --------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """JSON-able: mode, per-bucket state and compile seconds, batches served each way."""
        with self._lock:
            buckets = {
                str(b): {"state": state, "seconds": self._seconds.get(b), "warm_seconds": self._warm_seconds.get(b)}
                for b, state in sorted(self._state.items())
            }
        return {
            "mode": self.mode,
            "error": self.error,
            "buckets": buckets,
            "ready": sorted(self._ready),
            "compile_seconds": float(sum(self._seconds.values())),
            "compiled_batches": self.compiled_batches,
            "eager_batches": self.eager_batches,
            "padded_rows": self.padded_rows,
            "gc": GC_PAUSES.summary(),
        }


class GcPauses:
    """Full (generation 2) garbage collections of this process: how many, the longest, the total
    seconds (``gc.callbacks``), and when the last few ended (wall clock, to line them up with slow
    batches in ``Batcher.history()``). A full collection stops every thread, the device thread
    included, and after a compile there is a lot to walk: on the H200 two of them paused compiled
    serving for 0.5 s each (``benchmarks/results/gpu_case_compiled.json``)."""

    def __init__(self) -> None:
        self.count = 0
        self.max_s = 0.0
        self.total_s = 0.0
        self.recent: deque[tuple[float, float]] = deque(maxlen=8)  # (time.time() at the end, seconds)
        self._started: float | None = None
        self._installed = False

    def install(self) -> None:
        if not self._installed:
            self._installed = True
            gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            pause = time.perf_counter() - self._started
            self._started = None
            self.count += 1
            self.total_s += pause
            self.max_s = max(self.max_s, pause)
            self.recent.append((time.time(), pause))

    def summary(self) -> dict[str, Any]:
        return {"full_collections": self.count, "max_pause_s": self.max_s, "total_s": self.total_s,
                "frozen_objects": gc.get_freeze_count(), "recent": [list(r) for r in self.recent]}


#: this process's full collections, tracked once a model is compiled here
GC_PAUSES = GcPauses()


# ------------------------------------------------------------------------------------------------
# Warming inductor's caches in a child process
# ------------------------------------------------------------------------------------------------
def warm_in_subprocess(payload: bytes, device: str, bucket: int, template: np.ndarray,
                       stop: threading.Event | None = None, timeout: float = 900.0) -> float | None:
    """Compile ``bucket`` of the model pickled in ``payload`` in a child process.

    The child loads the model on ``device``, compiles it the way the worker does and runs a batch of
    ``bucket`` copies of ``template`` (one host input row) through it. What it leaves behind is
    inductor's on-disk caches (FX graph, kernels, autotuning), so the worker's own compile of that
    bucket is mostly cache hits: measured on an H100, a ResNet-50 bucket whose shape another process
    had compiled took 2-3 s in the worker, against 18-30 s cold. The child competes for no lock and
    no GIL of the worker. ``stop`` set: the child is killed. Returns the child's seconds, or None
    when it failed, timed out or was stopped (the worker then compiles from cold, or not at all).
    """
    with tempfile.TemporaryDirectory(prefix="dynbatch-warm-") as tmp:
        job = Path(tmp) / "job.pkl"
        job.write_bytes(pickle.dumps({"payload": payload, "device": device, "bucket": int(bucket),
                                      "template": np.ascontiguousarray(template)}))
        started = time.perf_counter()
        with subprocess.Popen([sys.executable, "-m", "dask_dynbatch.compiled", str(job)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
            stderr = ""
            while True:
                try:
                    _, stderr = proc.communicate(timeout=0.25)
                    break
                except subprocess.TimeoutExpired:
                    if (stop is not None and stop.is_set()) or time.perf_counter() - started > timeout:
                        proc.kill()
                        proc.communicate()
                        logger.info("dynbatch: warming bucket %d stopped after %.0f s", bucket,
                                    time.perf_counter() - started)
                        return None
        if proc.returncode != 0:
            logger.info("dynbatch: warming bucket %d failed: %s", bucket, (stderr or "")[-2000:])
            return None
        return time.perf_counter() - started


def _warm_child(job_path: str) -> None:
    from .runtime import LoadedModel

    job = pickle.loads(Path(job_path).read_bytes())
    spec = pickle.loads(job["payload"])
    loaded = LoadedModel(spec, job["device"])  # the eager model, as the worker has it
    compiled = compile_static(loaded.model, loaded.spec.compile_mode() or "default", 1)
    rows = np.repeat(job["template"], job["bucket"], axis=0)
    compile_shape(loaded._forward, compiled, loaded._as_input(rows))


if __name__ == "__main__":
    _warm_child(sys.argv[1])
