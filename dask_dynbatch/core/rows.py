"""A batch's rows: one sample as a NumPy array, rows stacked for the wire and joined again, and
outputs split back into per-request rows (pure: NumPy only)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def as_numpy_sample(sample: Any) -> np.ndarray:
    """One request's sample as a NumPy array (CPU torch tensors without a copy)."""
    if isinstance(sample, np.ndarray):
        return sample
    if type(sample).__module__.startswith("torch"):
        if getattr(sample, "device", None) is not None and sample.device.type != "cpu":
            raise TypeError("submit() takes CPU tensors; move the sample to the CPU first (tensor.cpu())")
        return sample.detach().numpy()
    return np.asarray(sample)


def stack_in_chunks(samples: Sequence[np.ndarray], chunk_bytes: int) -> np.ndarray | list[np.ndarray]:
    """The batch as one stacked array when it fits in ``chunk_bytes``, else as a list of stacked
    chunks of at most ``chunk_bytes`` each (at least one sample per chunk).

    Why chunks: a receiving Dask comm allocates one buffer per frame, and glibc serves a buffer
    above 32 MiB (its largest mmap threshold) with a fresh mmap that is page-faulted on every
    message; buffers below it are reused from the heap. One frame per sample would cost a read
    call per sample instead. The worker takes the chunks as they are: they join in the copy to the device (or into one array)."""
    if not samples:
        return np.stack(samples)
    per_sample = max(1, samples[0].nbytes)
    rows = max(1, int(chunk_bytes) // per_sample)
    if rows >= len(samples):
        return np.stack(samples)
    return [np.stack(samples[i : i + rows]) for i in range(0, len(samples), rows)]


def join_in_chunks(blocks: Sequence[np.ndarray], chunk_bytes: int) -> np.ndarray | list[np.ndarray]:
    """What :func:`stack_in_chunks` is to single rows, for blocks of rows (their first axis): joined
    into one array when the rows fit in ``chunk_bytes``, else into chunks of at most ``chunk_bytes``
    (at least one row each). A chunk that lies within one block is a view of it, not a copy."""
    per_row = max(1, blocks[0][:1].nbytes)
    step = max(1, int(chunk_bytes) // per_row)
    bounds = np.cumsum([0] + [len(b) for b in blocks])
    total = int(bounds[-1])
    chunks = [_join(rows_between(blocks, bounds, lo, min(lo + step, total))) for lo in range(0, total, step)]
    return chunks[0] if len(chunks) == 1 else chunks


def rows_between(blocks: Sequence[np.ndarray], bounds: np.ndarray, lo: int, hi: int) -> list[np.ndarray]:
    """Rows ``lo:hi`` of the blocks joined end to end (``bounds``: where each block starts, and the
    total), as views of the blocks they lie in."""
    out = []
    i = int(np.searchsorted(bounds, lo, side="right")) - 1
    while lo < hi:
        stop = min(hi, int(bounds[i + 1]))
        out.append(blocks[i][lo - bounds[i] : stop - bounds[i]])
        lo = stop
        i += 1
    return out


def _join(blocks: list[np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(blocks[0]) if len(blocks) == 1 else np.concatenate(blocks)


class TrimmedRows:
    """Outputs of rows of padded samples that travel as one piece, still padded to the batch's
    ``length``: :func:`split_rows` cuts each row back to its own length (``owns[i]``), as
    :func:`~dask_dynbatch.core.tree.trim_output_row` does, sparing the output paths in ``fixed``.
    One piece for a shipment's rows of a device batch costs one serialisation, not one per row."""

    __slots__ = ("outputs", "length", "owns", "fixed")

    def __init__(self, outputs: Any, length: int, owns: Sequence[int], fixed: frozenset[str]):
        self.outputs = outputs
        self.length = length
        self.owns = list(owns)
        self.fixed = fixed

    def __getstate__(self) -> tuple:
        return self.outputs, self.length, self.owns, self.fixed

    def __setstate__(self, state: tuple) -> None:
        self.outputs, self.length, self.owns, self.fixed = state

    def split(self, n: int) -> list[Any]:
        from .tree import trim_output_row

        if len(self.owns) != n:
            raise ValueError(f"{len(self.owns)} trimmed rows for {n} requests")
        return [split_rows(trim_output_row(slice_rows(self.outputs, i, i + 1, n), self.length, own, self.fixed), 1)[0]
                for i, own in enumerate(self.owns)]


def take_rows(outputs: Any, index: Sequence[int], n: int) -> Any:
    """Rows ``index`` of a batch's outputs of ``n`` rows (arrays, tuples and dicts of them, a list
    of one element per row), in that order; a ``ValueError`` when an output lacks the batch
    dimension. A run of consecutive rows is a view; other rows are copied."""
    if len(index) and index[-1] - index[0] == len(index) - 1 and all(b - a == 1 for a, b in zip(index, index[1:])):
        return slice_rows(outputs, index[0], index[-1] + 1, n)
    return _select(outputs, np.asarray(index, dtype=np.intp), n)


def _check_rows(outputs: Any, n: int) -> None:
    """Raise the ``ValueError`` of an output (a list, or an array or tensor) that does not hold one
    row per request of a batch of ``n``."""
    if isinstance(outputs, list):
        if len(outputs) != n:
            raise ValueError(f"the model returned a list of {len(outputs)} for a batch of {n}: a list output "
                             "must hold one element per row")
        return
    rows = len(outputs) if getattr(outputs, "ndim", 1) > 0 and hasattr(outputs, "__len__") else None
    if rows != n:
        got = f"{rows} rows" if rows is not None else f"a {type(outputs).__name__} without rows"
        raise ValueError(f"the model returned {got} for a batch of {n}: outputs must keep the batch dimension")


def _select(outputs: Any, key: slice | np.ndarray, n: int) -> Any:
    """Rows ``key`` (a slice, or an array of row numbers) of every output of a batch of ``n``."""
    if isinstance(outputs, dict):
        return {k: _select(v, key, n) for k, v in outputs.items()}
    if isinstance(outputs, tuple):
        return tuple(_select(v, key, n) for v in outputs)
    _check_rows(outputs, n)
    if isinstance(outputs, list) and not isinstance(key, slice):  # one element per row
        return [outputs[i] for i in key.tolist()]
    return outputs[key]


def split_rows(outputs: Any, n: int) -> list[Any]:
    """Per-row results of a batched output: array rows, tuples/dicts of them, or a list that holds
    one element per row (or a :class:`TrimmedRows`)."""
    if isinstance(outputs, TrimmedRows):
        return outputs.split(n)
    if isinstance(outputs, dict):
        parts = {k: split_rows(v, n) for k, v in outputs.items()}
        return [{k: parts[k][i] for k in parts} for i in range(n)]
    if isinstance(outputs, tuple):
        parts = [split_rows(v, n) for v in outputs]
        return [tuple(p[i] for p in parts) for i in range(n)]
    _check_rows(outputs, n)
    if isinstance(outputs, list):  # one element per row (labels, detections of any number...)
        return outputs
    return list(outputs)


def slice_rows(outputs: Any, start: int, stop: int, n: int) -> Any:
    """Rows ``start:stop`` of a batch's outputs (arrays; tuples, lists and dicts of them) of ``n``
    rows; a ``ValueError`` when an output does not keep the batch dimension."""
    if isinstance(outputs, TrimmedRows):
        return TrimmedRows(slice_rows(outputs.outputs, start, stop, n), outputs.length, outputs.owns[start:stop],
                           outputs.fixed)
    return _select(outputs, slice(start, stop), n)
