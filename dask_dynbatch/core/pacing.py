"""When to send a partial batch to a worker whose device is still busy (pure logic, no clock).

A batch smaller than the worker's size (the load is below capacity) is best sent *just in time*:
late enough that it carries every request that arrived while the device was busy, early enough
that it is stacked, sent and staged before the device frees. Sent too early, it is small and the
next batch waits behind it, grows, and is not ready when the device frees: the device idles while
it is stacked and sent, the batch after that grows again, and so on.

:class:`BusyForecast` keeps, per worker, when its device is expected to be free: each batch sent
adds its device time, starting no earlier than the batch can arrive (the *lead*: stacking,
sending, staging). A partial batch for a busy worker is sent once ``now >= send_at(rows)``: when a
batch of that many rows formed now would arrive as the device frees, with a margin. Before
anything is measured, ``send_at(rows)`` is in the past (send as before). The forecast errs on the
early side: a reply that shows the device free sooner pulls it in, and with nothing in flight the
device is free now.

Device time and lead are both learned *per size* (:class:`~dask_dynbatch.core.estimate.SizeBins`),
not as one time per row: a batch's device time is a fixed cost (kernel launches, the event loops)
plus a cost per row, and one average per row learned from small batches puts the end of a large
one far too late (``docs/decisions.md`` has the measurements).
"""

from __future__ import annotations

from collections.abc import Iterable

from .estimate import SizeBins, power_of_two_bin

#: weight of the newest observation once a size bin has seen WARM_UP observations (before that:
#: their plain average)
ALPHA = 0.2
WARM_UP = 4
#: a partial batch leaves this many leads (plus MARGIN_S) before the device is expected to free
LEAD_FACTOR = 1.5
MARGIN_S = 0.001


def size_curve() -> SizeBins:
    """The estimator of a time that grows with a batch's rows (power-of-two bins, kept for good)."""
    return SizeBins(power_of_two_bin, weight=ALPHA, warm_up=WARM_UP)


class BusyForecast:
    """When one device is expected to be free of the batches sent to it.

    Times are the caller's monotonic seconds. ``device_s(rows)``: device seconds of a batch;
    ``lead_s(rows)``: seconds from forming a batch to its rows being ready on the device.
    """

    __slots__ = ("device", "lead", "busy_until", "_inflight")

    def __init__(self) -> None:
        self.device = size_curve()
        self.lead = size_curve()
        self.busy_until = 0.0
        self._inflight: list[int] = []  # rows of each batch sent and not replied yet

    def observe(self, rows: int, compute_s: float, lead_s: float | None = None) -> None:
        """A reply: ``rows`` ran in ``compute_s`` on the device; the batch took ``lead_s`` to get
        there (None: not known). Batches whose time says nothing of their size (cold model, first
        batch of a shape, a compile beside it) should not be observed."""
        if rows <= 0:
            return
        if compute_s > 0:
            self.device.observe(rows, s=compute_s)
        if lead_s is not None and lead_s >= 0:
            self.lead.observe(rows, s=lead_s)

    def device_s(self, rows: float) -> float | None:
        return self.device.at("s", rows)

    def lead_s(self, rows: float) -> float | None:
        return self.lead.at("s", rows)

    def _device_total(self, rows: Iterable[int]) -> float:
        return sum(self.device_s(r) or 0.0 for r in rows)

    def sent(self, rows: int, now: float) -> None:
        """A batch of ``rows`` was formed at ``now`` and goes to the device."""
        start = max(now + (self.lead_s(rows) or 0.0), self.busy_until)
        self.busy_until = start + self._device_total((rows,))
        self._inflight.append(rows)

    def replied(self, rows: int, now: float) -> None:
        """The batch of ``rows`` came back (or failed) at ``now``."""
        try:
            self._inflight.remove(rows)
        except ValueError:
            pass
        self._pull_in(now)

    def _pull_in(self, now: float) -> None:
        if not self._inflight:
            self.busy_until = now  # nothing left: the device is free
        else:
            self.busy_until = min(self.busy_until, now + self._device_total(self._inflight))

    def shrink(self, rows: int, left: int, now: float) -> None:
        """Of a batch of ``rows`` sent, all but ``left`` came back at ``now`` (a reply in parts)."""
        try:
            self._inflight.remove(rows)
        except ValueError:
            return
        if left > 0:
            self._inflight.append(left)
        self._pull_in(now)

    def send_at(self, rows: int) -> float:
        """The moment from which a partial batch of ``rows`` formed then reaches the device as it
        frees."""
        return self.busy_until - LEAD_FACTOR * (self.lead_s(rows) or 0.0) - MARGIN_S

    def state(self) -> dict[str, object]:
        return {"device_s": self.device.state("s"), "lead_s": self.lead.state("s"), "busy_until": self.busy_until,
                "in_flight": len(self._inflight)}
