"""When to send a partial batch to a worker that is still busy (pure logic, no Dask).

A batch smaller than the worker's size (the load is below capacity) is best sent *just in time*:
late enough that it carries every request that arrived while the worker's device was busy, early
enough that it is stacked, sent and staged before the device frees. Sent too early, it is small,
and the next batch waits behind it in the queue, grows, and is not ready when the device frees:
the device idles while it is stacked and sent, the batch after that grows again, and so on.
Measured on the H200 with ResNet-50 at 70 % load (``benchmarks/results/gpu_case.json``, session 5,
the previous rule of "once its oldest request waited ``max_delay``"): batches alternated between
~80 rows (sent 5 ms after the big one, waiting behind it) and a big one that grew from 300 to
1,000 rows within a second, the device idling while each big one travelled; p99 338 ms.

:class:`BusyForecast` keeps, per worker, when its device is expected to be free: each batch sent
adds its rows times the device time per row (an EWMA of what replies reported), starting no earlier
than the batch can arrive (the *lead*: stacking, sending, staging; an EWMA too). A partial batch for
a busy worker is sent once ``now >= send_at()``: when a batch formed now would arrive as the device
frees, with a margin. Before anything is measured, ``send_at()`` is in the past (send as before).
The forecast errs on the early side: a reply that shows the device free sooner pulls it in, and
with nothing in flight the device is free now.
"""

from __future__ import annotations

#: weight of the newest observation in the EWMAs
ALPHA = 0.2
#: a partial batch leaves this many leads (plus MARGIN_S) before the device is expected to free
LEAD_FACTOR = 1.5
MARGIN_S = 0.001


class BusyForecast:
    """When one worker's device is expected to be free of the batches sent to it.

    Times are the caller's monotonic seconds. ``per_row``: device seconds per row; ``lead``:
    seconds from forming a batch to its rows being ready on the worker; both None until observed.
    """

    __slots__ = ("per_row", "lead", "busy_until")

    def __init__(self) -> None:
        self.per_row: float | None = None
        self.lead: float | None = None
        self.busy_until = 0.0

    def observe(self, rows: int, compute_s: float, lead_s: float | None = None) -> None:
        """A reply: ``rows`` ran in ``compute_s`` on the device; the batch took ``lead_s`` to get
        there (None: not known). Batches whose time says nothing of their size (cold model, first
        batch of a shape, a compile beside it) should not be observed."""
        if rows > 0 and compute_s > 0:
            per_row = compute_s / rows
            self.per_row = per_row if self.per_row is None else (1 - ALPHA) * self.per_row + ALPHA * per_row
        if lead_s is not None and lead_s >= 0:
            self.lead = lead_s if self.lead is None else (1 - ALPHA) * self.lead + ALPHA * lead_s

    def sent(self, rows: int, now: float) -> None:
        """A batch of ``rows`` was formed at ``now`` and goes to the worker."""
        start = max(now + (self.lead or 0.0), self.busy_until)
        self.busy_until = start + rows * (self.per_row or 0.0)

    def replied(self, now: float, rows_in_flight: int) -> None:
        """A batch came back at ``now``; ``rows_in_flight`` rows are still out on the worker."""
        if rows_in_flight <= 0:
            self.busy_until = now  # nothing left: the device is free
        elif self.per_row is not None:
            self.busy_until = min(self.busy_until, now + rows_in_flight * self.per_row)

    def send_at(self) -> float:
        """The moment from which a partial batch formed then reaches the device as it frees."""
        return self.busy_until - LEAD_FACTOR * (self.lead or 0.0) - MARGIN_S

    def state(self) -> dict[str, float | None]:
        return {"per_row_s": self.per_row, "lead_s": self.lead, "busy_until": self.busy_until}
