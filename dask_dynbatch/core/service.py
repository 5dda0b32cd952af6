"""A device batch's own time on a device that several models share (pure: no dask).

The batch-size controller and its throughput table are told how long each batch held the device.
While the device was busy when a batch's rows arrived, the rows waited for the batch before, and
that wait is queueing, not the cost of the batch's size: the batch's time starts when the device
finished its previous batch. Several models on one device run one after another on its one
thread, so "the previous batch" is the device's, whichever model it was of. Counted from a
model's own previous batch instead, each model's time would hold every other model's batches in
between, and with k busy models each controller would shrink until its size made k batches fit
the latency target, giving up throughput that the device had to give.
"""

from __future__ import annotations


class DeviceTurns:
    """When a device last finished a batch, whichever model it ran; one per device, shared by
    the model servers on it. Batches are reported in the order they finish."""

    def __init__(self) -> None:
        self.last_done: float | None = None

    def occupied_until(self, t: float) -> None:
        """The device ran something other than a batch (a model's load, a benchmark) until ``t``:
        rows that waited for it were queueing too."""
        self.last_done = t if self.last_done is None else max(self.last_done, t)

    def service_time(self, first_arrival: float, done: float, compute_s: float) -> float:
        """The time a batch whose first row arrived at ``first_arrival`` and that finished at
        ``done`` (after ``compute_s`` of device time) counts as its own: from the device's previous
        batch end if its rows arrived before that, else from their arrival; never less than
        ``compute_s``. Records ``done`` as the device's latest batch end."""
        last = self.last_done
        since = last if last is not None and first_arrival < last else first_arrival
        self.last_done = done if last is None else max(last, done)
        return max(compute_s, done - since)
