"""What became of a Batcher's requests: counts and latencies, and resolving their futures exactly once.

Shared by the Batcher (user threads: submit, cancel, close) and its dispatcher (the client's event
loop): every count goes through one lock, every future is resolved through :meth:`Ledger.deliver`,
:meth:`Ledger.deliver_rows` or :meth:`Ledger.fail`, which count only what they resolved. Counts are
rows: a block's future counts its block's rows, all with the block's one fate.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections import deque
from collections.abc import Iterable
from itertools import repeat
from typing import Any

import numpy as np

from ..core.blocks import BlockPart
from ..core.requests import Request

#: ``timed_out_running``: of ``timed_out``, those whose deadline passed while their shipment ran;
#: ``quarantined``: of ``failed``, those that made their worker die or hang alone in their batch
#: (``WorkerCrashError``, ``ExecutionTimeoutError``); ``isolated``: requests re-sent in groups of
#: suspects after a worker died or restarted under them; ``stuck``: requests of stuck device batches;
#: ``answered_early``: of ``delivered``, those whose result came in a part of their shipment's reply
COUNTS = ("submitted", "delivered", "failed", "cancelled", "timed_out", "requeued", "timed_out_running",
          "quarantined", "isolated", "stuck", "answered_early")


class Ledger:
    """Counts (:data:`COUNTS`), per-request latencies (the last 20,000), and a condition that
    ``submit`` waits on for room in a full queue (notified whenever requests leave)."""

    def __init__(self) -> None:
        self._counts = dict.fromkeys(COUNTS, 0)
        self._lock = threading.Lock()
        self.latencies: deque[float] = deque(maxlen=20_000)
        self.room = threading.Condition()

    def count(self, key: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self._counts[key] += n

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def fail(self, reqs: Iterable[Request], exc: BaseException, counter: str = "failed") -> int:
        """Fail every request not resolved yet with ``exc``; returns how many."""
        n = 0
        for req in reqs:
            try:
                req.future.set_exception(exc)
                n += 1 if req.block is None else req.block.rows
            except concurrent.futures.InvalidStateError:
                pass
        self.count(counter, n)
        self.notify_room()
        return n

    def deliver(self, req: Request, value: Any) -> bool:
        """Resolve ``req`` with ``value`` unless it is resolved already."""
        try:
            req.future.set_result(value)
        except concurrent.futures.InvalidStateError:
            return False
        return True

    def deliver_rows(self, part: BlockPart, start: int, stop: int, outputs: Any) -> int:
        """The outputs of rows ``start:stop`` of a block part; once all its block's rows are in,
        resolve the block's future (unless resolved already). Returns the rows that resolved."""
        block = part.block
        if not block.put(part.offset + start, stop - start, outputs):
            return 0
        try:
            result = block.join()
        except Exception as exc:  # rows that cannot be joined: the block fails, not the event loop
            self.fail([part], exc)
            return 0
        try:
            block.future.set_result(result)
        except concurrent.futures.InvalidStateError:
            return 0
        return block.rows

    def latency(self, reqs: Iterable[Request], done: float, rows: bool = False) -> None:
        """``rows``: some are block parts, whose latency counts once per row."""
        if rows:
            for r in reqs:
                self.latencies.extend(repeat(done - r.enqueued, r.rows))
        else:
            self.latencies.extend(done - r.enqueued for r in reqs)

    def percentiles(self) -> dict[str, float | None]:
        # deque.copy() runs in C under the GIL: a consistent snapshot while the event loop appends
        lat = np.fromiter(self.latencies.copy(), dtype=float) if self.latencies else None
        return {f"latency_p{q}": (float(np.percentile(lat, q)) if lat is not None else None) for q in (50, 95, 99)}

    def notify_room(self) -> None:
        with self.room:
            self.room.notify_all()
