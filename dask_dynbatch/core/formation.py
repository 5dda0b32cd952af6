"""The model server's queue, and device batches formed from it (pure: no dask, no torch).

Every shipment that reaches a worker (from any client, any Batcher) puts its rows into the queue of
the model's server as *parts*: runs of consecutive rows of one priority, held as the host arrays
they arrived in (no copy). When the device is about to free, the server takes up to its batch size
of rows, highest priority first, first come first within a priority, and they become one device
batch; a part larger than what is left of the batch is cut, and its rest stays at the head of its
priority. Rows of different clients thus share device batches, and no client's rows wait behind
another's beyond the order they arrived in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np

from .tree import TreeRows


@dataclass(eq=False)
class Part:
    """Rows ``[offset, offset + len(rows))`` of the shipment ``owner`` (positions among its rows
    that run), as the array ``rows`` (anything with ``len`` and row slicing); or, with ``ids``, the
    rows ``ids`` of it in that order (gathered by a :class:`CostQueue`: rows of similar length are
    rarely neighbours)."""

    owner: Any
    offset: int
    rows: Any
    priority: int = 0
    arrived: float = 0.0
    alone: bool = False  # runs in a device batch with rows of its own shipment only
    ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def row_ids(self, start: int = 0, stop: int | None = None) -> list[int]:
        """The shipment's row numbers of rows ``[start, stop)`` of this part."""
        stop = len(self) if stop is None else stop
        if self.ids is None:
            return list(range(self.offset + start, self.offset + stop))
        return self.ids[start:stop].tolist()

    def split(self, n: int) -> tuple[Part, Part]:
        """The first ``n`` rows and the rest, as two parts (views, no copy)."""
        if self.ids is not None:
            return (Part(self.owner, self.offset, self.rows[:n], self.priority, self.arrived, self.alone, self.ids[:n]),
                    Part(self.owner, self.offset, self.rows[n:], self.priority, self.arrived, self.alone, self.ids[n:]))
        head = Part(self.owner, self.offset, self.rows[:n], self.priority, self.arrived, self.alone)
        tail = Part(self.owner, self.offset + n, self.rows[n:], self.priority, self.arrived, self.alone)
        return head, tail


@dataclass
class DeviceBatch:
    """Parts taken together for one run on the device, with where each starts in the batch."""

    parts: list[Part]
    formed: float
    proposed: int  # the batch size in force when it was formed
    new_shape: bool = False  # the first batch of its size on the device (one-time set-up)
    compiling: bool = False  # a bucket of the model compiled when it formed
    starts: list[int] = field(default_factory=list)
    started: float | None = None  # when the device began running it (the watchdog's clock)
    abandoned: bool = False  # its rows were handed back (stuck, or the worker restarts): skip it
    cost: float | None = None  # with a CostQueue: what it weighs (``proposed`` is a cost then too)
    length: int | None = None  # padded samples: its longest row, which every row is padded to
    real: int | None = None  # padded samples: the rows' own lengths together
    at_budget: bool = False  # a weighed batch that stopped at its budget: rows were left, none fitted

    def __post_init__(self) -> None:
        self.starts = []
        start = 0
        for part in self.parts:
            self.starts.append(start)
            start += len(part)
        self.rows = start

    @property
    def full(self) -> bool:
        """Whether it is as large as the size it was formed under (not the short tail of a backlog;
        a weighed batch within a quarter of its budget, which rows of other lengths rarely fill)."""
        if self.cost is not None:
            return self.cost >= 0.75 * self.proposed
        return self.rows >= self.proposed

    @property
    def units(self) -> float:
        """What the controller counts: its cost, else its rows."""
        return self.cost if self.cost is not None else self.rows

    def owners(self) -> list[Any]:
        """The shipments with rows in it, each once, in order."""
        seen: dict[int, Any] = {}
        for part in self.parts:
            seen.setdefault(id(part.owner), part.owner)
        return list(seen.values())


class PartQueue:
    """Rows waiting for a device batch: parts by priority (higher first), FIFO within a priority.

    Not thread-safe: the model server touches it from its event loop only.
    """

    def __init__(self) -> None:
        self._by_priority: dict[int, deque[Part]] = {}
        self._rows = 0

    def __len__(self) -> int:
        """Rows waiting."""
        return self._rows

    def push(self, parts: list[Part]) -> None:
        for part in parts:
            if not len(part):
                continue
            dq = self._by_priority.get(part.priority)
            if dq is None:
                dq = self._by_priority[part.priority] = deque()
            dq.append(part)
            self._rows += len(part)

    def drain(self) -> list[Part]:
        """Every part, highest priority first."""
        out = [part for priority in sorted(self._by_priority, reverse=True) for part in self._by_priority[priority]]
        self._by_priority.clear()
        self._rows = 0
        return out

    def take(self, n: int) -> list[Part]:
        """Up to ``n`` rows, highest priority first; the last part is cut to fit. A batch that
        starts with an ``alone`` part holds only its shipment's rows; other batches stop before one."""
        out: list[Part] = []
        room = int(n)
        for priority in sorted(self._by_priority, reverse=True):
            dq = self._by_priority[priority]
            while dq and room > 0:
                head = dq[0]
                if out and (head.alone or out[0].alone) and head.owner is not out[0].owner:
                    room = 0
                    break
                part = dq.popleft()
                if len(part) > room:
                    part, rest = part.split(room)
                    dq.appendleft(rest)
                out.append(part)
                room -= len(part)
                self._rows -= len(part)
            if not dq:
                del self._by_priority[priority]
            if room <= 0:
                break
        return out


class _Segment:
    """One part pushed into a :class:`CostQueue`, and which of its rows still wait (``idx``, in
    arrival order) with their lengths and costs."""

    __slots__ = ("part", "idx", "lengths", "costs")

    def __init__(self, part: Part, lengths: np.ndarray, costs: np.ndarray) -> None:
        self.part = part
        self.idx = np.arange(len(part), dtype=np.int64)
        self.lengths = lengths
        self.costs = costs

    def take(self, chosen: np.ndarray) -> Part:
        """Its waiting rows at ``chosen`` (positions into ``idx``, ascending) as one part; they
        stop waiting."""
        part, ids = self.part, self.idx[chosen]
        keep = np.ones(len(self.idx), dtype=bool)
        keep[chosen] = False
        self.idx, self.lengths, self.costs = self.idx[keep], self.lengths[keep], self.costs[keep]
        return _part_of(part, ids)


def _part_of(part: Part, ids: np.ndarray) -> Part:
    """Rows ``ids`` (ascending) of ``part`` as a part: a view when they are consecutive, else
    gathered (one copy of their data: the batch's own)."""
    first, n = int(ids[0]), len(ids)
    if int(ids[-1]) - first + 1 == n and part.ids is None:
        return Part(part.owner, part.offset + first, part.rows[first : first + n], part.priority, part.arrived,
                    part.alone)
    rows = part.rows
    taken = rows.take(ids) if isinstance(rows, TreeRows) else _concat_rows([rows[i : i + 1] for i in ids.tolist()])
    owner_ids = part.ids[ids] if part.ids is not None else ids + part.offset
    return Part(part.owner, part.offset, taken, part.priority, part.arrived, part.alone, owner_ids)


def _concat_rows(rows: list[Any]) -> Any:
    concat = getattr(type(rows[0]), "concat", None)
    return concat(rows) if concat is not None else np.concatenate(rows)


class CostQueue:
    """Rows of padded or weighed samples waiting for a device batch, taken so that a batch holds
    rows that cost alike and stays within a budget (the controller's size, in cost units).

    A batch holds rows of the highest priority waiting. A weighed batch takes them oldest first
    while their costs fit the budget. A padded batch is a run of the rows sorted by length that fits
    the budget at its longest row and wastes least; it holds one of the oldest rows (as many as
    a batch at the median length holds), and after :data:`MAX_PASSES` batches of its priority that
    passed the oldest row over, that row itself (so no row starves: one of a rare length waits a little for
    rows like it). A padded batch costs its rows times its longest row (what the device holds); a
    weighed one the sum of its rows' costs. Lengths are the traffic's own: no buckets are fixed in
    advance, and a batch of similar lengths wastes little padding.

    Parts are held as they arrived, with arrays of their rows' lengths and costs; a batch takes
    from each part the rows chosen, gathered into one part (``rows`` needs ``len``, slicing,
    ``lengths()``, ``costs`` and, to gather without a copy per row, ``take``). A batch anchored by
    an ``alone`` part holds rows of that part's shipment only, and other batches none of them.
    Only the oldest rows of a priority are considered (:data:`LOOKAHEAD`, or for large budgets
    :data:`CHOICES` batches' worth, up to :data:`MAX_LOOKAHEAD`), which bounds the work per
    batch. Not thread-safe: the model server touches it from its event loop only.
    """

    #: rows of a priority considered for one batch
    LOOKAHEAD = 8192
    #: batches' worth of rows a batch is chosen from, at most MAX_LOOKAHEAD rows (a large batch
    #: drawn from few of them spans many lengths: padding)
    CHOICES = 32
    MAX_LOOKAHEAD = 32768
    #: batches that may pass the oldest row over before one must hold it
    MAX_PASSES = 4
    #: parts a batch is chosen from, at most (shipments of a row or two each would otherwise cost
    #: a Python step per row again)
    MAX_SEGMENTS = 1024

    def __init__(self, padded: bool) -> None:
        self.padded = padded
        self._by_priority: dict[int, deque[_Segment]] = {}
        self._rows = 0
        self._cost = 0.0
        # per priority: its oldest row (segment, row) when batches passed it over, and how many did
        self._passed: dict[int, tuple[_Segment, int, int]] = {}

    def __len__(self) -> int:
        return self._rows

    @property
    def cost(self) -> float:
        """The cost of every waiting row, each alone."""
        return self._cost

    def mean_cost(self) -> float | None:
        return self._cost / self._rows if self._rows else None

    def push(self, parts: list[Part]) -> None:
        for part in parts:
            n = len(part)
            if not n:
                continue
            found = part.rows.lengths() if hasattr(part.rows, "lengths") else None
            lengths = np.ones(n) if found is None else np.asarray(found, dtype=np.float64)
            costs = getattr(part.rows, "costs", None)
            costs = lengths if costs is None else np.asarray(costs, dtype=np.float64)
            self._by_priority.setdefault(part.priority, deque()).append(_Segment(part, lengths, costs))
            self._cost += float(costs.sum())
            self._rows += n

    def _choose(self, lengths: np.ndarray, costs: np.ndarray, budget: float, limit: int,
                anchored: bool = True) -> np.ndarray:
        """Indices into the window of the rows of one batch: with the oldest (index 0) when
        ``anchored``, else with one of the oldest rows a batch holds at the window's median length."""
        if not self.padded:  # weighed: oldest first while the costs fit
            fits = int(np.searchsorted(np.cumsum(costs), budget, side="right"))
            return np.arange(max(1, min(limit, fits)))
        # padded: rows sorted by length; a batch is a run of that order holding an anchor, as many
        # rows as the budget allows at its longest row
        order = np.argsort(lengths, kind="stable")
        ordered = lengths[order]
        oldest = 1 if anchored else int(min(len(order), limit, max(1, budget // max(1.0, float(np.median(lengths))))))
        anchors = np.concatenate([[0], np.cumsum(order < oldest)])  # anchors among the first i rows in length order
        prefix = np.concatenate([[0.0], np.cumsum(ordered)])
        ends = np.arange(len(order))
        rows = np.minimum(limit, np.maximum(1, budget // np.maximum(ordered[ends], 1.0))).astype(np.int64)
        starts = np.maximum(0, ends - rows + 1)
        ok = anchors[ends + 1] > anchors[starts]  # the run holds an anchor
        ends, starts = ends[ok], starts[ok]
        real = prefix[ends + 1] - prefix[starts]
        padded = (ends - starts + 1) * ordered[ends]
        # real elements less twice the padding: among runs that fill the budget, the one that wastes least;
        # when the budget holds more than waits, the longest run. A row over the budget alone runs
        # only when it is the anchor or nothing fits (its many real elements are not a better batch).
        score = real - 2 * (padded - real)
        over = padded > budget
        if over.any() and not over.all():
            score = np.where(over, -np.inf, score)
        best = int(np.argmax(score))
        return order[starts[best] : ends[best] + 1]

    def drain(self) -> list[Part]:
        """Every row, highest priority first."""
        out = [_part_of(seg.part, seg.idx) for priority in sorted(self._by_priority, reverse=True)
               for seg in self._by_priority[priority] if len(seg.idx)]
        self._by_priority.clear()
        self._passed.clear()
        self._rows = 0
        self._cost = 0.0
        return out

    def _lookahead(self, budget: float) -> int:
        rows_per_batch = budget / (self._cost / self._rows) if self._rows and self._cost > 0 else 1.0
        return int(min(self.MAX_LOOKAHEAD, max(self.LOOKAHEAD, self.CHOICES * rows_per_batch)))

    def _window(self, lookahead: int) -> tuple[int, deque[_Segment], list[_Segment], np.ndarray, np.ndarray,
                                               np.ndarray, np.ndarray]:
        """The highest priority waiting, its segments, and of its first ``lookahead`` rows: the
        segments they are in, and per row its segment (index into those), position in it,
        length and cost."""
        priority = max(self._by_priority)
        dq = self._by_priority[priority]
        segments, counts, room = [], [], lookahead
        for seg in islice(dq, self.MAX_SEGMENTS):
            if room <= 0:
                break
            k = min(len(seg.idx), room)
            segments.append(seg)
            counts.append(k)
            room -= k
        sizes = np.asarray(counts, dtype=np.int64)
        which = np.repeat(np.arange(len(segments)), sizes)
        starts = np.cumsum(sizes) - sizes
        at = np.arange(int(sizes.sum())) - np.repeat(starts, sizes)
        lengths = np.concatenate([seg.lengths[:k] for seg, k in zip(segments, counts)])
        costs = np.concatenate([seg.costs[:k] for seg, k in zip(segments, counts)])
        return priority, dq, segments, which, at, lengths, costs

    def another_fits(self, budget: float, lengths: Any, costs: Any) -> bool:
        """Whether a row waiting at the head of the queue (its highest priority, within the look-ahead)
        would still fit a batch of these rows within ``budget``: if none would, the batch stopped
        at its budget, not for want of rows."""
        if not self._rows:
            return False
        *_, window, window_costs = self._window(self._lookahead(budget))
        if self.padded:
            n, longest = len(lengths), max(lengths, default=0.0)
            return bool(((n + 1) * np.maximum(longest, window) <= budget).any())
        return bool((sum(costs) + window_costs <= budget).any())

    def batch_cost(self, lengths: Any, costs: Any) -> float:
        if self.padded:
            return len(lengths) * max(lengths, default=0.0)
        return float(sum(costs))

    def take(self, budget: float, max_rows: int | None = None) -> list[Part]:
        """Rows for one batch of at most ``budget`` cost (and ``max_rows`` rows); at least one row."""
        return self.take_weighed(budget, max_rows)[0]

    def take_weighed(self, budget: float, max_rows: int | None = None) -> tuple[list[Part], list[float], list[float]]:
        """:meth:`take`, with each row's length and cost as the queue weighed them (in the order of
        the parts' rows)."""
        if not self._rows:
            return [], [], []
        priority, dq, segments, which, at, lengths, costs = self._window(self._lookahead(budget))
        limit = max(1, max_rows) if max_rows is not None else len(lengths)
        head = segments[0].part
        # an ``alone`` part (a client's suspects) shares its batch with rows of its shipment only
        allowed = np.array([(seg.part.owner is head.owner) if head.alone else not seg.part.alone for seg in segments])
        eligible = np.flatnonzero(allowed[which])
        # a batch holds the oldest row, or one of the oldest few and the oldest is passed over: at most
        # MAX_PASSES times (a row of a rare length waits a little for rows like it, not for ever)
        first, row = segments[0], int(segments[0].idx[0])
        passed = self._passed.get(priority)
        passes = passed[2] if passed is not None and passed[0] is first and passed[1] == row else 0
        chosen = np.sort(eligible[self._choose(lengths[eligible], costs[eligible], budget, limit,
                                               anchored=passes >= self.MAX_PASSES)])
        if chosen[0] == 0:
            self._passed.pop(priority, None)
        else:
            self._passed[priority] = (first, row, passes + 1)
        out: list[Part] = []
        touched = np.unique(which[chosen]).tolist()
        for k in touched:  # each segment's chosen rows as one part, oldest segment first
            out.append(segments[k].take(at[chosen[which[chosen] == k]]))
        if any(not len(segments[k].idx) for k in touched):  # (only the window's segments can have emptied)
            kept = [seg for seg in segments if len(seg.idx)]
            for _ in range(len(segments)):
                dq.popleft()
            dq.extendleft(reversed(kept))
        if not dq:
            del self._by_priority[priority]
            self._passed.pop(priority, None)
        taken_costs = costs[chosen]
        self._rows -= len(chosen)
        self._cost -= float(taken_costs.sum())
        return out, lengths[chosen].tolist(), taken_costs.tolist()
