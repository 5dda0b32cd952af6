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


@dataclass(eq=False)
class Part:
    """Rows ``[offset, offset + len(rows))`` of the shipment ``owner`` (positions among its rows
    that run), as the array ``rows`` (anything with ``len`` and row slicing)."""

    owner: Any
    offset: int
    rows: Any
    priority: int = 0
    arrived: float = 0.0
    alone: bool = False  # runs in a device batch with rows of its own shipment only

    def __len__(self) -> int:
        return len(self.rows)

    def split(self, n: int) -> tuple[Part, Part]:
        """The first ``n`` rows and the rest, as two parts (views, no copy)."""
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


class CostQueue:
    """Rows of padded or weighed samples waiting for a device batch, taken so that a batch holds
    rows of similar length: the oldest row of the highest priority anchors the batch, and the
    waiting rows of that priority whose lengths are closest to its length join it while the batch's
    cost stays within the budget. A padded batch costs its rows times its longest row (what the
    device holds); a weighed one the sum of its rows' costs. Lengths are the traffic's own: no
    buckets are fixed in advance, and a batch of similar lengths wastes little padding.

    Rows are held one part each (``Part.rows``: rows with ``len``, slicing, ``lengths()`` and
    ``costs``). A batch anchored by an ``alone`` part holds rows of that part's shipment only, and
    other batches none of them. Only the :data:`LOOKAHEAD` oldest rows of a priority are considered, which bounds
    the work per batch. Not thread-safe: the model server touches it from its event loop only.
    """

    #: rows of a priority considered for one batch
    LOOKAHEAD = 8192

    def __init__(self, padded: bool) -> None:
        self.padded = padded
        self._by_priority: dict[int, deque[tuple[Part, float, float]]] = {}  # (part, length, cost)
        self._rows = 0
        self._cost = 0.0

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
            rows = part.rows
            lengths = rows.lengths()
            costs = getattr(rows, "costs", None)
            singles = rows.singles() if hasattr(rows, "singles") else [rows[i : i + 1] for i in range(n)]
            lengths_f = lengths.tolist() if lengths is not None else [1.0] * n
            costs_f = costs.tolist() if costs is not None else lengths_f
            owner, offset, priority, arrived, alone = part.owner, part.offset, part.priority, part.arrived, part.alone
            self._by_priority.setdefault(priority, deque()).extend(
                (Part(owner, offset + i, singles[i], priority, arrived, alone), float(lengths_f[i]), float(costs_f[i]))
                for i in range(n))
            self._cost += float(sum(costs_f))
            self._rows += n

    def _choose(self, window: list[tuple[Part, float, float]], budget: float, limit: int) -> list[int]:
        """Indices into ``window`` of the rows of one batch; always the anchor (index 0)."""
        if not self.padded:  # weighed: oldest first while the costs fit
            chosen, total = [0], window[0][2]
            for i in range(1, len(window)):
                if len(chosen) >= limit or total + window[i][2] > budget:
                    break
                chosen.append(i)
                total += window[i][2]
            return chosen
        # padded: rows sorted by length; a batch is a run of that order holding the anchor, as many
        # rows as the budget allows at its longest row
        lengths = np.fromiter((w[1] for w in window), dtype=np.float64, count=len(window))
        order = np.argsort(lengths, kind="stable")
        ordered = lengths[order]
        at = int(np.flatnonzero(order == 0)[0])
        prefix = np.concatenate([[0.0], np.cumsum(ordered)])
        ends = np.arange(at, len(order))
        rows = np.minimum(limit, np.maximum(1, budget // ordered[ends])).astype(np.int64)
        starts = np.maximum(0, ends - rows + 1)
        ok = starts <= at  # the run holds the anchor
        ends, starts = ends[ok], starts[ok]
        real = prefix[ends + 1] - prefix[starts]
        padding = (ends - starts + 1) * ordered[ends] - real
        # real elements less twice the padding: among runs that fill the budget, the one that wastes least;
        # when the budget holds more than waits, the longest run
        best = int(np.argmax(real - 2 * padding))
        return order[starts[best] : ends[best] + 1].tolist()

    def drain(self) -> list[Part]:
        """Every row, highest priority first."""
        out = [entry[0] for priority in sorted(self._by_priority, reverse=True) for entry in self._by_priority[priority]]
        self._by_priority.clear()
        self._rows = 0
        self._cost = 0.0
        return out

    def _head(self) -> tuple[int, deque, list[tuple[Part, float, float]]]:
        """The highest priority waiting, its rows, and the first ``LOOKAHEAD`` of them."""
        priority = max(self._by_priority)
        dq = self._by_priority[priority]
        return priority, dq, list(islice(dq, self.LOOKAHEAD))  # indexing a deque's middle is not O(1)

    def another_fits(self, budget: float, lengths: list[float], costs: list[float]) -> bool:
        """Whether a row waiting at the head of the queue (its highest priority, within the look-ahead)
        would still fit a batch of these rows within ``budget``: if none would, the batch stopped
        at its budget, not for want of rows."""
        if not self._rows:
            return False
        _, _, window = self._head()
        if self.padded:
            n, longest = len(lengths), max(lengths, default=0.0)
            return any((n + 1) * max(longest, length) <= budget for _, length, _ in window)
        total = sum(costs)
        return any(total + cost <= budget for _, _, cost in window)

    def batch_cost(self, lengths: list[float], costs: list[float]) -> float:
        if self.padded:
            return len(lengths) * max(lengths, default=0.0)
        return sum(costs)

    def take(self, budget: float, max_rows: int | None = None) -> list[Part]:
        """Rows for one batch of at most ``budget`` cost (and ``max_rows`` rows); at least one row."""
        return self.take_weighed(budget, max_rows)[0]

    def take_weighed(self, budget: float, max_rows: int | None = None) -> tuple[list[Part], list[float], list[float]]:
        """:meth:`take`, with each row's length and cost as the queue weighed them."""
        if not self._rows:
            return [], [], []
        priority, dq, window = self._head()
        limit = max(1, max_rows) if max_rows is not None else len(window)
        head = window[0][0]
        # an ``alone`` part (a client's suspects) shares its batch with rows of its shipment only
        eligible = [i for i, (part, _, _) in enumerate(window)
                    if (part.owner is head.owner if head.alone else not part.alone)]
        chosen = [eligible[i] for i in self._choose([window[i] for i in eligible], budget, limit)]
        taken = set(chosen)
        chosen.sort()
        out = [window[i][0] for i in chosen]
        keep = [window[i] for i in range(len(window)) if i not in taken]
        for _ in range(len(window)):
            dq.popleft()
        dq.extendleft(reversed(keep))
        if not dq:
            del self._by_priority[priority]
        self._rows -= len(out)
        costs = [window[i][2] for i in chosen]
        self._cost -= sum(costs)
        return out, [window[i][1] for i in chosen], costs
