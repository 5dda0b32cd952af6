"""Blocks: many rows of one array as one request, with one future (pure: NumPy only).

:meth:`Batcher.predict <dask_dynbatch.Batcher.predict>` of an array does not make a request per
row. Each block of its rows (already checked against the input signature, already stacked) is one
:class:`BlockPart` in the client's queue, and one future that resolves to the block's outputs as
one array. The queue, shipment sizes and counts are in rows, so a block is cut where a shipment
is full: its first rows leave as a part of their own and the rest keep their place in the queue.
Parts of one block may thus travel in several shipments, to several workers; the worker sees rows
as it always does. :class:`Block` collects what comes back and resolves the future once every row
is in; the first row that fails fails it (the whole block shares one fate).

A part is one suspect for the :class:`~dask_dynbatch.core.quarantine.Quarantine`: it is not cut
into rows when its worker dies, because its rows share one future: finding the one row that kills
workers would cost more worker deaths and change nothing for that future.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .requests import Request, RequestFuture
from .rows import slice_rows, split_rows


class Block:
    """The outputs of one block's rows, as they come back; its future resolves once all are in."""

    __slots__ = ("future", "rows", "pending", "_pieces")

    def __init__(self, rows: int, future: RequestFuture | None = None):
        self.future = RequestFuture() if future is None else future
        self.rows = rows
        self.pending = rows  # rows not back yet
        self._pieces: list[tuple[int, int, Any]] = []

    def put(self, offset: int, n: int, outputs: Any) -> bool:
        """The outputs of rows ``offset:offset + n``; ``True`` when they were the last ones."""
        if self.future.done():  # failed or timed out meanwhile: late rows are dropped
            return False
        self._pieces.append((offset, n, outputs))
        self.pending -= n
        return self.pending == 0

    def join(self) -> Any:
        """The outputs in row order: one array when every piece is an array of one row shape and
        dtype, else a list of per-row outputs. The pieces are let go: they are copied into it."""
        pieces, self._pieces = sorted(self._pieces, key=lambda p: p[0]), []
        at = 0
        for offset, n, _ in pieces:
            if offset != at:  # a row twice or missing: a bug, never a wrong result
                raise RuntimeError(f"block of {self.rows} rows: rows from {at} came back as rows from {offset}")
            at += n
        outputs = [p[2] for p in pieces]
        return join_outputs(outputs, [p[1] for p in pieces])


def join_outputs(outputs: Sequence[Any], counts: Sequence[int]) -> Any:
    """Batched outputs of consecutive rows (``counts`` rows each) as one array when they are arrays
    of one row shape and dtype, else as a list of per-row outputs."""
    first = outputs[0]
    if all(isinstance(o, np.ndarray) and o.shape[1:] == first.shape[1:] and o.dtype == first.dtype
           for o in outputs):
        return first if len(outputs) == 1 else np.concatenate(outputs)
    return [row for o, n in zip(outputs, counts) for row in split_rows(o, n)]


class BlockPart(Request):
    """Rows ``offset:offset + rows`` of a :class:`Block`, as one request of the queue and of a
    shipment (``sample``: those rows, stacked). Its future is the block's."""

    __slots__ = ("block", "offset", "rows")
    block: Block
    rows: int

    def __init__(self, block: Block, rows: np.ndarray, offset: int = 0, *, priority: int = 0,
                 deadline: float | None = None, enqueued: float = 0.0):
        super().__init__(rows, block.future, priority=priority, deadline=deadline, enqueued=enqueued)
        self.block = block
        self.offset = offset
        self.rows = len(rows)

    def cut(self, start: int, stop: int) -> BlockPart:
        """Its rows ``start:stop`` as a part of their own, with this part's history (attempts, turn)."""
        part = BlockPart(self.block, self.sample[start:stop], self.offset + start, priority=self.priority,
                         deadline=self.deadline, enqueued=self.enqueued)
        part.attempts = self.attempts
        part.seq = self.seq
        return part

    def take(self, n: int) -> BlockPart:
        """Cut off its first ``n`` rows (returned); this part keeps the rest, and its place in the queue."""
        head = self.cut(0, n)
        self.sample = self.sample[n:]
        self.offset += n
        self.rows -= n
        return head


def count_rows(reqs: Sequence[Request]) -> tuple[int, bool]:
    """The rows of ``reqs``, and whether any of them is a block part."""
    sizes = [r.rows for r in reqs if r.block is not None]
    return len(reqs) - len(sizes) + sum(sizes), bool(sizes)


class ShipmentRows:
    """Which request holds which row of a shipment that holds block parts (its rows are the
    requests' rows, end to end)."""

    def __init__(self, reqs: Sequence[Request]):
        self.reqs = reqs
        self.starts = np.cumsum([0] + [r.rows for r in reqs])  # and the total, last
        self.rows = int(self.starts[-1])

    def first_rows(self) -> list[int]:
        """Each request's first row."""
        return self.starts[:-1].tolist()

    def spans(self, positions: Sequence[int]) -> list[tuple[int, int, int, int]]:
        """``positions`` (increasing rows of the shipment) as ``(request index, its first row,
        its stop, index in positions)`` runs: each run is consecutive rows of one request."""
        out: list[tuple[int, int, int, int]] = []
        if not len(positions):
            return out
        pos = np.asarray(positions)
        breaks = np.flatnonzero(np.diff(pos) != 1) + 1
        for at, stop_at in zip([0, *breaks.tolist()], [*breaks.tolist(), len(pos)]):
            lo, hi = int(pos[at]), int(pos[stop_at - 1]) + 1
            k = int(np.searchsorted(self.starts, lo, side="right")) - 1
            while lo < hi:
                start = int(self.starts[k])
                stop = min(hi, int(self.starts[k + 1]))
                out.append((k, lo - start, stop - start, at))
                at += stop - lo
                lo = stop
                k += 1
        return out

    def requests_at(self, positions: Sequence[int]) -> list[Request]:
        """The requests that hold these rows: a row request itself, a block part whole when all its
        rows are among them, else each run of its rows among them as a part of its own."""
        out: list[Request] = []
        for k, a, b, _ in self.spans(positions):
            req = self.reqs[k]
            if req.block is None or (a == 0 and b == req.rows):
                out.append(req)
            else:
                out.append(req.cut(a, b))  # type: ignore[attr-defined]  # req.block is set: a BlockPart
        return out

    def pieces(self, positions: Sequence[int], outputs: Any) -> list[tuple[Request, int, int, Any]]:
        """A reply's piece (the outputs of the rows at ``positions``) cut per request:
        ``(request, its first row, its stop, their outputs)``."""
        n = len(positions)
        out: list[tuple[Request, int, int, Any]] = []
        for k, a, b, at in self.spans(positions):
            rows = outputs if at == 0 and b - a == n else slice_rows(outputs, at, at + b - a, n)
            out.append((self.reqs[k], a, b, rows))
        return out
