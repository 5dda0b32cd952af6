"""When to send a partial batch to a worker that is still busy (pure logic, no Dask).

A batch smaller than the worker's size (the load is below capacity) is best sent *just in time*:
late enough that it carries every request that arrived while the worker's device was busy, early
enough that it is stacked, sent and staged before the device frees. Sent too early, it is small,
and the next batch waits behind it in the queue, grows, and is not ready when the device frees:
the device idles while it is stacked and sent, the batch after that grows again, and so on.
Measured on the H200 with ResNet-50 at 70 % load (``earlier/gpu_h200_s5run1_h2dprobe_d5dca96.json``,
the previous rule of "once its oldest request waited ``max_delay``"): batches alternated between
~80 rows (sent 5 ms after the big one, waiting behind it) and a big one that grew from 300 to
1,000 rows within a second, the device idling while each big one travelled; p99 338 ms.

:class:`BusyForecast` keeps, per worker, when its device is expected to be free: each batch sent
adds its device time, starting no earlier than the batch can arrive (the *lead*: stacking,
sending, staging). A partial batch for a busy worker is sent once ``now >= send_at(rows)``: when a
batch of that many rows formed now would arrive as the device frees, with a margin. Before
anything is measured, ``send_at(rows)`` is in the past (send as before). The forecast errs on the
early side: a reply that shows the device free sooner pulls it in, and with nothing in flight the
device is free now.

Device time and lead are both learned *per size* (:class:`SizeCurve`), not as one time per row.
A batch's device time is a fixed cost (kernel launches, the event loops) plus a cost per row; one
average of time per row, learned at 30 % load from batches of ~40 rows, said 400-800 us a row on
an H100 whose batches of 1,000 rows ran at ~85 us a row. When the load rose to 70 %, that forecast
put the device's end far too late, so each partial batch left only when the previous one came back:
stacking, sending and staging stopped overlapping the device, batches grew to 1,000-1,200 rows
within a second, and those requests waited 170-300 ms; that start alone made the p99 at 70 % load
224-256 ms (``earlier/gpu_h100_ab1_4715a18.json``, ``earlier/gpu_h100_open_1b4117e.json``); the
rest of those runs waited at most 50-110 ms. The lead grows with rows too (stacking 760 ResNet
images took 24 ms where 40 took 4). With per-size curves, the same kind of host gave p99 74-88 ms
at 70 % (``earlier/gpu_h100_s7_*.json``, session 7).
"""

from __future__ import annotations

from collections.abc import Iterable

#: weight of the newest observation once a size bin has seen WARM_UP observations (before that:
#: their plain average)
ALPHA = 0.2
WARM_UP = 4
#: a partial batch leaves this many leads (plus MARGIN_S) before the device is expected to free
LEAD_FACTOR = 1.5
MARGIN_S = 0.001


class SizeCurve:
    """A time that grows with a batch's rows, learned from what batches took.

    Observations fall into bins by rows (powers of two: 1, 2-3, 4-7, ... ); each bin keeps the
    average rows and time of its batches (plain over its first ``WARM_UP``, then an EWMA). The time
    of ``rows`` is read off the line between the neighbouring bins' averages (made non-decreasing),
    past the largest bin along the slope of the last two (clamped between flat and proportional:
    never more than the largest bin's time per row), below the smallest as the smallest's time
    (with one bin only: in proportion to rows above it). Bins are kept for good: what a batch of
    1,000 rows costs is not forgotten while the load keeps batches small.
    """

    __slots__ = ("_bins",)

    def __init__(self) -> None:
        self._bins: dict[int, list[float]] = {}  # bin -> [count, mean rows, mean seconds]

    def observe(self, rows: int, seconds: float) -> None:
        if rows <= 0 or not seconds >= 0:  # (not >= also drops NaN)
            return
        b = self._bins.setdefault(int(rows).bit_length(), [0, 0.0, 0.0])
        b[0] += 1
        w = 1.0 / b[0] if b[0] <= WARM_UP else ALPHA
        b[1] += w * (rows - b[1])
        b[2] += w * (seconds - b[2])

    def points(self) -> list[tuple[float, float]]:
        """(rows, seconds) of each bin, by rows, seconds made non-decreasing."""
        out: list[tuple[float, float]] = []
        for _, r, s in (self._bins[k] for k in sorted(self._bins)):
            out.append((r, max(s, out[-1][1]) if out else s))
        return out

    def __call__(self, rows: float) -> float | None:
        """Seconds for a batch of ``rows``; None before any observation."""
        pts = self.points()
        if not pts:
            return None
        r_last, s_last = pts[-1]
        if rows >= r_last:
            if len(pts) == 1:
                return s_last * rows / r_last
            r_prev, s_prev = pts[-2]
            slope = min(s_last / r_last, max(0.0, (s_last - s_prev) / (r_last - r_prev)))
            return s_last + slope * (rows - r_last)
        if rows <= pts[0][0]:
            return pts[0][1]
        i = next(i for i, (r, _) in enumerate(pts) if rows <= r)  # 0 < i < len(pts)
        (r0, s0), (r1, s1) = pts[i - 1], pts[i]
        return s0 + (s1 - s0) * (rows - r0) / (r1 - r0)

    def state(self) -> dict[int, float]:
        """Rows (rounded) -> seconds, one entry per bin."""
        return {round(r): s for r, s in self.points()}


class BusyForecast:
    """When one worker's device is expected to be free of the batches sent to it.

    Times are the caller's monotonic seconds. ``device``: device seconds of a batch by rows;
    ``lead``: seconds from forming a batch to its rows being ready on the worker, by rows.
    """

    __slots__ = ("device", "lead", "busy_until", "_inflight")

    def __init__(self) -> None:
        self.device = SizeCurve()
        self.lead = SizeCurve()
        self.busy_until = 0.0
        self._inflight: list[int] = []  # rows of each batch sent and not replied yet

    def observe(self, rows: int, compute_s: float, lead_s: float | None = None) -> None:
        """A reply: ``rows`` ran in ``compute_s`` on the device; the batch took ``lead_s`` to get
        there (None: not known). Batches whose time says nothing of their size (cold model, first
        batch of a shape, a compile beside it) should not be observed."""
        if compute_s > 0:
            self.device.observe(rows, compute_s)
        if lead_s is not None:
            self.lead.observe(rows, lead_s)

    def _device_s(self, rows: Iterable[int]) -> float:
        return sum(self.device(r) or 0.0 for r in rows)

    def sent(self, rows: int, now: float) -> None:
        """A batch of ``rows`` was formed at ``now`` and goes to the worker."""
        start = max(now + (self.lead(rows) or 0.0), self.busy_until)
        self.busy_until = start + self._device_s((rows,))
        self._inflight.append(rows)

    def replied(self, rows: int, now: float) -> None:
        """The batch of ``rows`` came back (or failed) at ``now``."""
        try:
            self._inflight.remove(rows)
        except ValueError:
            pass
        if not self._inflight:
            self.busy_until = now  # nothing left: the device is free
        else:
            self.busy_until = min(self.busy_until, now + self._device_s(self._inflight))

    def send_at(self, rows: int) -> float:
        """The moment from which a partial batch of ``rows`` formed then reaches the device as it
        frees."""
        return self.busy_until - LEAD_FACTOR * (self.lead(rows) or 0.0) - MARGIN_S

    def state(self) -> dict[str, object]:
        return {"device_s": self.device.state(), "lead_s": self.lead.state(), "busy_until": self.busy_until,
                "in_flight": len(self._inflight)}
