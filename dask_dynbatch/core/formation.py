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
from typing import Any


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

    def __post_init__(self) -> None:
        self.starts = []
        start = 0
        for part in self.parts:
            self.starts.append(start)
            start += len(part)
        self.rows = start

    @property
    def full(self) -> bool:
        """Whether it is as large as the size it was formed under (not the short tail of a backlog)."""
        return self.rows >= self.proposed

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
