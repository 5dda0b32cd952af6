"""The batch sizes device batches are formed in: the bucket ladder of compiled models and the shape
ladder of eager CUDA models (pure: no torch).

A compiled graph (``torch.compile`` with static shapes) serves one batch size, so batches of a
compiled model are formed on a *ladder* of bucket sizes (powers of two up to ``max_batch_size`` by
default): the controller steps from rung to rung and the memory cap is rounded down to a rung, so
full batches fill a bucket exactly; a partial batch is padded to its bucket and the padding is cut
from the outputs. Eager torch models on CUDA use the shape ladder for the same reason: each new
input shape pays a one-time set-up on the GPU (cuDNN plans).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

#: ``ModelSpec(compile=...)`` values, as ``torch.compile(mode=...)`` takes them (True: "default")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

#: a compiled bucket: a batch size, or for structured samples ``(rows, length)`` (length None when
#: no leaf is padded)
Bucket = int | tuple[int, int | None]

#: the default ladder stops here when the spec sets no max_batch_size (the memory cap binds first)
LADDER_TOP = 2**16


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
    (cuDNN builds its convolution plans per input shape), while a
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



def length_ladder(top: int = LADDER_TOP) -> tuple[int, ...]:
    """Lengths a compiled model's padded batches are padded to (the same spacing as
    :func:`shape_ladder`: at most a quarter of padding above 64, multiples of 8 below)."""
    return shape_ladder(top)


def structured_bucket(rows: int, length: int | None, row_ladder: Sequence[int],
                      lengths: Sequence[int], longest: int = 0) -> Bucket | None:
    """The bucket a batch of structured samples is padded to: without padded leaves (``length``
    None) its rung of rows, else ``(rows, length)``, each the rung of its ladder that holds it, the
    length never above ``max(longest, length)`` (``longest``: the longest batch the model ran, so
    that a model with a maximum length, such as its position embeddings, never gets more). None
    when either is above its ladder (the batch then runs as it is)."""
    r = bucket_for(row_ladder, rows)
    if r is None:
        return None
    if length is None:
        return r
    padded = bucket_for(lengths, length)
    return None if padded is None else (r, min(padded, max(longest, length)))


def bucket_units(bucket: Bucket) -> int:
    """What a bucket weighs in the memory sizer: rows, or rows times length (tokens)."""
    if isinstance(bucket, tuple):
        rows, length = bucket
        return rows * (length if length is not None else 1)
    return int(bucket)


def bucket_label(bucket: Bucket) -> str:
    """A bucket as stats and the dashboard show it: ``"64"``, or ``"64x128"`` (rows x length)."""
    if isinstance(bucket, tuple):
        rows, length = bucket
        return str(rows) if length is None else f"{rows}x{length}"
    return str(bucket)
