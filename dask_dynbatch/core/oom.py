"""What to do when a batch runs out of memory: recognise the error, split the batch and retry.

Pure: imports no GPU library and no dask (only :mod:`dask_dynbatch.errors`).
"""

from __future__ import annotations

import sys
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

from ..errors import SampleTooLargeError

__all__ = ["OutputChunk", "is_oom_error", "run_split_on_oom"]

_OOM_CLASS_NAMES = frozenset({"OutOfMemoryError", "OutOfMemory", "ResourceExhaustedError"})
_OOM_MESSAGES = (
    "out of memory",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "cudnn_status_not_enough_workspace",
    "cufft_alloc_failed",
    "cusolver_status_alloc_failed",
    "cusparse_status_alloc_failed",
    "curand_status_allocation_failed",
    "cuda_error_out_of_memory",
    "cudaerrormemoryallocation",
    "can't allocate memory",
    "failed to allocate memory",
    "resource_exhausted",
)


def is_oom_error(exc: BaseException) -> bool:
    """Whether an exception means a memory allocation failed.

    True for torch's and CuPy's ``OutOfMemoryError``, any other ``MemoryError``, and a
    ``RuntimeError`` whose text reports an allocation failure (the CUDA libraries'
    ``*_ALLOC_FAILED``, ``CUDNN_STATUS_NOT_ENOUGH_WORKSPACE``, torch's CPU allocator's
    ``can't allocate memory``, ...); explicit causes (``raise X from oom``) are followed. A
    :class:`SampleTooLargeError` is not one: it is the verdict after splitting. Never imports
    torch or CuPy.
    """
    seen = 0
    while exc is not None and seen < 8:
        seen += 1
        if isinstance(exc, SampleTooLargeError):
            return False
        if isinstance(exc, MemoryError):
            return True
        if any(cls.__name__ in _OOM_CLASS_NAMES for cls in type(exc).__mro__):
            return True
        torch = sys.modules.get("torch")
        torch_oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
        if isinstance(torch_oom, type) and isinstance(exc, torch_oom):
            return True
        if isinstance(exc, RuntimeError):
            text = str(exc).lower()
            if any(pattern in text for pattern in _OOM_MESSAGES):
                return True
        exc = exc.__cause__
    return False


def _drop_exception_references(exc: BaseException) -> None:
    """Release what a caught exception keeps alive (the frames of its traceback and of its
    cause/context, and so the tensors of the failed attempt)."""
    pending = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if current.__traceback__ is not None:
            traceback.clear_frames(current.__traceback__)
            current.__traceback__ = None
        pending.extend([current.__cause__, current.__context__])
        current.__cause__ = None
        current.__context__ = None


class OutputChunk(NamedTuple):
    """Output of rows ``start:stop`` (``stop`` exclusive) of a batch, or the error of one row:
    ``error`` is set (and ``output`` None, ``stop == start + 1``) when that row did not fit alone."""

    start: int
    stop: int
    output: Any
    error: SampleTooLargeError | None = None


def run_split_on_oom(
    run: Callable[[int, int], Any],
    n: int,
    *,
    on_oom: Callable[[int], Any] | None = None,
    free_cache: Callable[[], Any] | None = None,
    max_rows: Callable[[], int | None] | None = None,
    on_sample_too_large: Literal["raise", "collect"] = "raise",
) -> list[OutputChunk]:
    """Run rows ``0:n`` through ``run(start, stop) -> output``, splitting ranges that run out of memory.

    A range that fails with an out-of-memory error is split in two halves, retried first half
    first. Before the retry the exception and its traceback are released (so the failed attempt's
    tensors can be freed), then ``free_cache()`` (e.g. ``torch.cuda.empty_cache``) and
    ``on_oom(rows_that_failed)`` (e.g. ``sizer.on_oom``) run. ``max_rows()`` (e.g. ``sizer.cap``)
    is consulted before each range not yet tried and cuts longer ones, so a cap lowered by an OOM
    also applies to the rest of the batch; halves of a failed range run as they are. A single row
    that runs out of memory raises :class:`SampleTooLargeError`, or with
    ``on_sample_too_large="collect"`` becomes an error chunk and fails alone. Any other exception
    of ``run`` propagates unchanged.

    Returns contiguous chunks covering ``0:n`` in row order, each row run successfully exactly
    once: concatenate ``chunk.output`` in list order.
    """
    if on_sample_too_large not in ("raise", "collect"):
        raise ValueError("on_sample_too_large must be 'raise' or 'collect'")
    n = int(n)
    chunks: list[OutputChunk] = []
    # (start, stop, is_half_of_failed_range)
    pending: deque[tuple[int, int, bool]] = deque([(0, n, False)] if n > 0 else [])
    while pending:
        start, stop, is_half = pending.popleft()
        if not is_half and max_rows is not None:
            limit = max_rows()
            if limit is not None and 1 <= limit < stop - start:
                pending.appendleft((start + limit, stop, False))
                stop = start + limit
        failure_text: str | None = None
        try:
            output = run(start, stop)
        except Exception as exc:
            if not is_oom_error(exc):
                raise
            failure_text = f"{type(exc).__name__}: {exc}"[:500]
            _drop_exception_references(exc)
        # leaving the except block unbinds ``exc``: nothing holds the failed attempt
        if failure_text is None:
            chunks.append(OutputChunk(start, stop, output))
            continue
        if free_cache is not None:
            free_cache()
        if on_oom is not None:
            on_oom(stop - start)
        if stop - start == 1:
            error = SampleTooLargeError(start, failure_text)
            if on_sample_too_large == "raise":
                raise error
            chunks.append(OutputChunk(start, stop, None, error))
            continue
        middle = start + (stop - start) // 2
        pending.appendleft((middle, stop, True))
        pending.appendleft((start, middle, True))
    return chunks
