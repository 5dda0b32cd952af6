"""Compiled execution, bucket by bucket (``ModelSpec(compile=...)``).

A compiled graph (``torch.compile`` with static shapes) serves one batch size, so a compiled
model's batches are formed on the bucket ladder (:mod:`dask_dynbatch.core.ladder`). Compilation
never blocks a request: :class:`BucketCompiler` compiles one bucket at a time in a background
thread, a bucket once two full batches of its size have run eagerly (sixteen short ones: the tail
of every burst is short), the one that served the most rows first, then the rung above it, where
the controller goes next. Until a bucket is ready its batches run eagerly, unpadded. torch.compile
is not thread-safe, so while a bucket compiles every batch runs eagerly; once the controller
settles, nothing compiles any more and every full batch runs compiled. A model that fails to
compile is served eagerly for good, with a warning; the error shows in ``Batcher.stats()``.

torch is imported inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._compat import allow_recompiles
from ..core.ladder import Bucket, bucket_label, bucket_units, next_rung
from ..core.oom import is_oom_error

logger = logging.getLogger(__name__)

#: a bucket is compiled once this many full batches of its size have run eagerly...
MIN_EAGER_BATCHES = 2
#: ...or this many short ones (the tail of each burst is short: compiling its bucket would keep
#: the compile thread, and so every batch, off the compiled path for seconds after every burst)
MIN_SHORT_BATCHES = 16
#: a bucket's recent demand: rows of the last this many batches that ran eagerly
RECENT_BATCHES = 512
#: a batch of structured samples whose own (rows, length) bucket is not compiled runs in a compiled
#: bucket at least as large in both, if one holds at most this much more (rows times length)
COVER_SLACK = 1.25


def compile_static(module: Any, mode: str, shapes: int) -> Any:
    """``torch.compile(module, mode=mode, dynamic=False)``, with dynamo's recompile limit raised so
    that ``shapes`` batch sizes (a recompile of the same code object each) all compile."""
    import torch

    allow_recompiles(shapes + 8)
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
        Bucket sizes (see :func:`dask_dynbatch.core.ladder.bucket_ladder`). Batches of structured
        samples use ``(rows, length)`` buckets instead (:func:`~dask_dynbatch.core.ladder.structured_bucket`).
    run
        ``run(model, batch) -> outputs``: how a batch is run (the same call for eager and compiled,
        e.g. the user's ``predict``), called under ``torch.inference_mode``.
    example
        ``example(bucket) -> batch``: a batch of the bucket's shape, like the served ones, for warm-up.
    submit
        Runs a callable in the background (the worker's compile thread).
    reserve
        ``reserve(units)``: a context manager holding device memory for a warm-up batch of that
        many rows (tokens, for a ``(rows, length)`` bucket), or None
        when there is no room now (the bucket is tried again when a batch next asks for it).
    max_buckets
        Compile at most this many buckets (the rest run eagerly): ``(rows, length)`` buckets are
        many more than a ladder's rungs. Any number wait in the queue; the compile thread takes
        the one that served the most rows eagerly lately, so the budget goes to the buckets of the
        traffic as it is now, not as it was while the controller climbed. None: every rung.
    warm
        ``warm(bucket, stop)``: compiles the bucket in a child process first (see :func:`warm_in_subprocess`),
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
        example: Callable[[Bucket], Any],
        submit: Callable[[Callable[[], None]], Any],
        reserve: Callable[[int], Any] | None = None,
        warm: Callable[[Bucket, threading.Event], Any] | None = None,
        max_buckets: int | None = None,
    ):
        self.mode = mode
        self.ladder = tuple(ladder)
        self._module = module
        self._run = run
        self._example = example
        self._submit = submit
        self._reserve = reserve
        self._warm = warm
        self.max_buckets = max_buckets
        self._in_process = False  # compiling in this process now (batches run eagerly meanwhile)
        self._warm_seconds: dict[Bucket, float] = {}
        self._stop = threading.Event()  # set by close(): the model was unloaded or the worker closes
        self.compiled: Any = None  # made in the background thread (importing the compiler takes seconds)
        self._lock = threading.Lock()
        # Held while a bucket compiles, and by a batch running compiled: torch.compile is not
        # thread-safe (a compiled call during another thread's trace raised on the GPU, in two
        # different ways), so a batch that finds a compile going on runs eagerly, never waits.
        self._exclusive = threading.Lock()
        self._eager_seen: dict[tuple[Bucket, bool], int] = {}  # (bucket, full) -> eager batches while not ready
        self._demand: dict[Bucket, int] = {}  # bucket -> rows served eagerly while it was not ready
        self._recent: deque[tuple[Bucket, int]] = deque(maxlen=RECENT_BATCHES)  # (bucket, rows) of the last eager batches
        self._ready: set[Bucket] = set()
        self._ready_tuples: tuple[tuple[int, int | None], ...] = ()  # the (rows, length) ones, replaced whole: read without the lock
        self._state: dict[Bucket, str] = {}  # bucket -> "queued", "compiling", "ready", "no-memory", "over-limit"
        self._seconds: dict[Bucket, float] = {}
        self._pending: list[Bucket] = []  # buckets to compile, first first
        self._running = False
        self.error: str | None = None
        self.compiled_batches = 0
        self.eager_batches = 0
        self.padded_rows = 0
        self.padded_elements = 0  # (rows, length) buckets: padding added along the length too

    # -- serving side (device thread) -----------------------------------------------------------
    def ready(self, bucket: Bucket) -> Any | None:
        """The compiled module when ``bucket`` is warmed, else None (serve eagerly)."""
        return self.compiled if bucket in self._ready and self.error is None else None

    def cover(self, bucket: Bucket, slack: float = COVER_SLACK) -> Bucket | None:
        """The smallest compiled ``(rows, length)`` bucket that holds a batch of ``bucket`` (no
        fewer rows, no shorter) within ``slack`` times its size, or None. A few compiled buckets so
        serve batches of many shapes, and a bucket is compiled only for batches none covers."""
        if not isinstance(bucket, tuple) or self.error is not None:
            return None
        rows, length = bucket
        limit = slack * bucket_units(bucket)
        best = None
        for b in self._ready_tuples:
            if b[0] >= rows and (b[1] == length if length is None or b[1] is None else b[1] >= length):
                units = bucket_units(b)
                if units <= limit and (best is None or units < bucket_units(best)):
                    best = b
        return best

    @contextlib.contextmanager
    def use(self, bucket: Bucket):
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

    def want(self, bucket: Bucket, rows: int = 0, force: bool = False, full: bool = True) -> None:
        """A batch of ``rows`` rows in ``bucket`` ran eagerly because the bucket is not compiled.
        From the :data:`MIN_EAGER_BATCHES`-th such ``full`` batch on (:data:`MIN_SHORT_BATCHES`-th
        short one), queue that bucket, and after full batches the rung above it too (the
        controller's next step), so that one-off short batches (the tail of a burst) cost no
        compile (``(rows, length)`` buckets queue no rung above: their batches are free-sized).
        The compile thread takes the queued bucket that has served the most rows eagerly in the
        last :data:`RECENT_BATCHES` eager batches first (then the most rows in all). ``force``:
        queue it now (a declared input signature, before any batch). Never waits."""
        if self.error is not None or self._stop.is_set():
            return
        with self._lock:
            self._demand[bucket] = self._demand.get(bucket, 0) + rows
            self._recent.append((bucket, rows))
            key = (bucket, full)
            self._eager_seen[key] = seen = self._eager_seen.get(key, 0) + 1
            if (seen < (MIN_EAGER_BATCHES if full else MIN_SHORT_BATCHES) and not force) or self._full():
                return
            above = next_rung(self.ladder, bucket) if full and isinstance(bucket, int) else None
            for b in (bucket, above):
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

    def count(self, compiled: bool, padded_rows: int = 0, padded_elements: int = 0) -> None:
        """One batch was served, compiled (with ``padded_rows`` rows of padding, and for a
        ``(rows, length)`` bucket ``padded_elements`` more along the length) or eagerly."""
        if compiled:
            self.compiled_batches += 1
            self.padded_rows += padded_rows
            self.padded_elements += padded_elements
        else:
            self.eager_batches += 1

    def fail(self, exc: BaseException) -> None:
        """The compiled module raised where the eager one did not: serve eagerly from now on."""
        self._give_up(exc, "running")

    # -- background side ----------------------------------------------------------------------
    def _drain(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._full():  # what waits will not compile: its batches run eagerly
                        for b in self._pending:
                            self._state[b] = "over-limit"
                        self._pending.clear()
                    if not self._pending or self.error is not None or self._stop.is_set():
                        return
                    # most rows served eagerly lately first, then in all; among equals (prefetched
                    # rungs), the smallest
                    recent: Counter[Bucket] = Counter()
                    for b, rows in self._recent:
                        recent[b] += rows
                    bucket = max(self._pending, key=lambda b: (recent[b], self._demand.get(b, 0), -bucket_units(b)))
                    self._pending.remove(bucket)
                    self._state[bucket] = "compiling"
                self._compile(bucket)
        except BaseException as exc:  # a bug here must not leave compiling stuck "running"
            self._give_up(exc, "compiling")
            raise
        finally:
            with self._lock:
                self._running = False

    def _full(self) -> bool:
        """Whether ``max_buckets`` buckets are compiled or compiling (nothing more is then queued)."""
        if self.max_buckets is None:
            return False
        return sum(state in ("compiling", "ready") for state in self._state.values()) >= self.max_buckets

    def _make_compiled(self) -> None:
        self.compiled = compile_static(self._module, self.mode, self.max_buckets or len(self.ladder))

    def _compile(self, bucket: Bucket) -> None:
        started = time.perf_counter()
        if self._warm is not None:
            # the long part (code generation, kernel compiles, autotuning) in a child process, while
            # the compiled buckets go on serving here; the child's memory shows in the device's free
            # memory, which the sizer reads, so nothing is reserved for it here
            try:
                if self._warm(bucket, self._stop) is not None:
                    self._warm_seconds[bucket] = time.perf_counter() - started
            except Exception:  # only makes the compile below slower
                logger.info("dynbatch: warming the compile caches for bucket %s failed", bucket_label(bucket), exc_info=True)
            if self._stop.is_set():
                with self._lock:
                    self._state.pop(bucket, None)
                return
        held = self._reserve(bucket_units(bucket)) if self._reserve is not None else None
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
                    self._give_up(exc, f"compiling bucket {bucket_label(bucket)}")
                    return
                finally:
                    self._in_process = False
        seconds = time.perf_counter() - started
        self._mark_ready(bucket, seconds)
        logger.info("dynbatch: compiled bucket %s (%s) in %.1f s", bucket_label(bucket), self.mode, seconds)

    def _mark_ready(self, bucket: Bucket, seconds: float) -> None:
        with self._lock:
            self._seconds[bucket] = seconds
            self._state[bucket] = "ready"
            self._ready.add(bucket)
            if isinstance(bucket, tuple):
                self._ready_tuples = (*self._ready_tuples, bucket)

    def _give_up(self, exc: BaseException, when: str) -> None:
        with self._lock:
            if self.error is not None:
                return
            self.error = f"{type(exc).__name__} while {when}: {exc}"[:2000]
            self._ready.clear()
            self._ready_tuples = ()
            self._pending.clear()
        logger.warning(
            "dynbatch: torch.compile(mode=%r) failed (%s); the model is served eagerly from now on",
            self.mode, self.error,
        )

    # -- reporting --------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """JSON-able: mode, per-bucket state and compile seconds, batches served each way (buckets
        by :func:`~dask_dynbatch.core.ladder.bucket_label`; ``ready`` as ints for a ladder's rungs)."""
        with self._lock:
            order = sorted(self._state, key=lambda b: (bucket_units(b), bucket_label(b)))
            buckets = {
                bucket_label(b): {"state": self._state[b], "seconds": self._seconds.get(b),
                                  "warm_seconds": self._warm_seconds.get(b)}
                for b in order
            }
            ready = [b if isinstance(b, int) else bucket_label(b)
                     for b in sorted(self._ready, key=lambda b: (bucket_units(b), bucket_label(b)))]
        return {
            "mode": self.mode,
            "error": self.error,
            "buckets": buckets,
            "max_buckets": self.max_buckets,
            "ready": ready,
            "compile_seconds": float(sum(self._seconds.values())),
            "compiled_batches": self.compiled_batches,
            "eager_batches": self.eager_batches,
            "padded_rows": self.padded_rows,
            "padded_elements": self.padded_elements,
        }


# ------------------------------------------------------------------------------------------------
# Warming inductor's caches in a child process
# ------------------------------------------------------------------------------------------------
def warm_in_subprocess(payload: bytes, device: str, bucket: Bucket, template: Any,
                       stop: threading.Event | None = None, timeout: float = 900.0) -> float | None:
    """Compile ``bucket`` of the model pickled in ``payload`` in a child process.

    The child loads the model on ``device``, compiles it the way the worker does and runs a batch of
    ``bucket`` copies of ``template`` (one host input row) through it; for structured samples,
    ``template`` is the whole warm-up batch (a :class:`~dask_dynbatch.core.tree.Batch` of host
    arrays). What it leaves behind is
    inductor's on-disk caches (FX graph, kernels, autotuning), so the worker's own compile of that
    bucket is mostly cache hits, seconds instead of tens of seconds. The child competes for no lock
    and no GIL of the worker. ``stop`` set: the child is killed. Returns the child's seconds, or None
    when it failed, timed out or was stopped (the worker then compiles from cold, or not at all).
    """
    with tempfile.TemporaryDirectory(prefix="dynbatch-warm-") as tmp:
        job = Path(tmp) / "job.pkl"
        if isinstance(template, np.ndarray):
            template = np.ascontiguousarray(template)
        job.write_bytes(pickle.dumps({"payload": payload, "device": device, "bucket": bucket, "template": template}))
        started = time.perf_counter()
        with subprocess.Popen([sys.executable, "-m", "dask_dynbatch.worker._warm", str(job)],
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
                        logger.info("dynbatch: warming bucket %s stopped after %.0f s", bucket_label(bucket),
                                    time.perf_counter() - started)
                        return None
        if proc.returncode != 0:
            logger.info("dynbatch: warming bucket %s failed: %s", bucket_label(bucket), (stderr or "")[-2000:])
            return None
        return time.perf_counter() - started
