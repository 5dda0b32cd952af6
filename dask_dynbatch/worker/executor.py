"""One device batch in the device thread: cut to the memory cap, split and retried on out-of-memory
errors, bisected around requests that make the model raise, so that a bad request fails alone and
no request is lost or run twice."""

from __future__ import annotations

from typing import Any

from ..core.memory import MemorySizer
from ..core.oom import run_split_on_oom
from ..core.tree import Batch
from .model import LoadedModel

#: an eager CUDA model's shape-ladder rungs up to this many rows are warmed, one before each batch
#: after its first (beside serving: the first result does not wait for the whole ladder)
SHAPE_WARMUP_ROWS = 2048


def run_device_batch(loaded: LoadedModel, sizer: MemorySizer, batch: Any, *, full: bool = True,
                     on_oom=None) -> tuple[list[tuple[int, int, Any]], dict[int, BaseException]]:
    """Run ``batch`` (staged rows) through ``loaded``; returns ``(pieces, errors)``: ``pieces`` the
    outputs of row ranges ``(start, stop, outputs)`` in row order, ``errors`` ``row -> exception``
    for rows that failed alone (the model raised on them, or one row alone did not fit).

    Each piece runs under a memory reservation of the device's sizer, which learns the model's
    memory profile from its measured peak; ``on_oom(rows)`` is told of every out-of-memory split.
    """
    name = loaded.spec.name
    if loaded.wants_shape_warmup and len(batch) and loaded.calls:
        cap = sizer.cap(name)
        loaded.warm_shapes(batch, min(SHAPE_WARMUP_ROWS, cap if cap is not None else SHAPE_WARMUP_ROWS), rungs=1)

    def run_reserved(part: Any) -> Any:
        pad, units = True, loaded.units(part)
        if isinstance(part, Batch):  # padded to its bucket only where that still fits the memory cap
            cap = sizer.cap(name)
            if cap is not None and units > cap:
                pad, units = False, loaded.units(part, padded=False)
        with sizer.reserve(name, units) as reservation:
            baseline = loaded.memory_mark()
            outputs = loaded(part, full=full, pad=pad)
            reservation.record(loaded.memory_peak(baseline, part, outputs))
        return outputs

    def max_rows(cap: int | None) -> int | None:
        if cap is not None and isinstance(batch, Batch) and len(batch):  # a cap in cost: rows of this batch's cost
            return max(1, int(cap * len(batch) // max(1, loaded.units(batch, padded=False))))
        return loaded.max_rows(cap)

    def on_split(rows: int) -> None:
        if isinstance(batch, Batch) and len(batch):  # the sizer counts cost
            rows = max(1, rows * loaded.units(batch, padded=False) // len(batch))
        sizer.on_oom(name, rows)
        if on_oom is not None:
            on_oom(rows)

    def run_range(start: int, stop: int) -> list[tuple[int, int, Any, BaseException | None]]:
        chunks = run_split_on_oom(
            lambda a, b: run_reserved(batch[start + a : start + b]),
            stop - start,
            on_oom=on_split,
            free_cache=loaded.free_cache,
            max_rows=lambda: max_rows(sizer.cap(name)),
            on_sample_too_large="collect",
        )
        return [(start + c.start, start + c.stop, c.output, c.error) for c in chunks]

    return bisect_poison(run_range, len(batch))


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
