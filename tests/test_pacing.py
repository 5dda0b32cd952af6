"""BusyForecast and its per-size curves: when a partial batch goes to a busy worker (pure, no clock)."""

import math

import numpy as np
import pytest

from dask_dynbatch.core.pacing import ALPHA, LEAD_FACTOR, MARGIN_S, WARM_UP, BusyForecast, size_curve


def test_nothing_measured_sends_at_once():
    f = BusyForecast()
    assert f.send_at(100) < 0.0
    f.sent(100, now=10.0)  # no device time known yet: no wait is forecast
    assert f.send_at(100) <= 10.0


def test_curve_interpolates_between_bins_and_extrapolates_within_bounds():
    c = size_curve()
    assert c.at("s", 10) is None
    c.observe(100, s=0.010)
    # one bin: in proportion to rows above it, its own time below it
    assert c.at("s", 200) == pytest.approx(0.020) and c.at("s", 50) == pytest.approx(0.010)
    c.observe(400, s=0.025)  # 5 ms + 50 us a row
    assert c.at("s", 200) == pytest.approx(0.015)  # on the line between the two bins
    assert c.at("s", 800) == pytest.approx(0.045)  # past the largest: the last two bins' slope
    assert c.at("s", 10) == pytest.approx(0.010)  # below the smallest: its time
    assert c.state("s") == {100: pytest.approx(0.010), 400: pytest.approx(0.025)}


def test_curve_extrapolation_is_clamped_between_flat_and_proportional():
    steep = size_curve()
    steep.observe(10, s=0.001)
    steep.observe(100, s=0.100)  # slope 1.1 ms a row, more than 1 ms a row at 100
    assert steep.at("s", 200) == pytest.approx(0.200)  # proportional to the largest bin, not steeper
    noisy = size_curve()
    noisy.observe(100, s=0.020)
    noisy.observe(400, s=0.015)  # a larger bin measured faster: made non-decreasing
    assert noisy.at("s", 400) == pytest.approx(0.020) and noisy.at("s", 1000) == pytest.approx(0.020)
    assert noisy.at("s", 250) == pytest.approx(0.020)


def test_curve_averages_plainly_then_smooths_and_ignores_bad_observations():
    c = size_curve()
    for s in (0.010, 0.020, 0.030, 0.040):  # WARM_UP = 4 plain
        c.observe(100, s=s)
    assert WARM_UP == 4 and c.at("s", 100) == pytest.approx(0.025)
    c.observe(100, s=0.125)
    assert c.at("s", 100) == pytest.approx(0.025 + ALPHA * 0.100)
    before = c.state("s")
    c.observe(0, s=1.0)
    c.observe(100, s=-1.0)
    c.observe(100, s=math.nan)
    assert c.state("s") == before


def test_small_batches_do_not_erase_what_large_ones_cost():
    """The failure of one average time per row (docs/decisions.md): learned at a low load from
    small batches, it put a large batch's device time 2-5x too high. Each size keeps its own."""
    def device_s(rows):  # measured shape on an H100: a fixed cost plus a cost per row
        return 0.0055 + 80e-6 * rows

    f = BusyForecast()
    for rows in (1024, 1280, 1536) * 5:  # a closed loop: large batches
        f.observe(rows, device_s(rows), 0.030)
    for i in range(500):  # then a long low load: batches of 20-60 rows
        rows = 20 + (i * 7) % 41
        f.observe(rows, device_s(rows), 0.004)
    for rows in (100, 300, 800, 1200):
        assert f.device_s(rows) == pytest.approx(device_s(rows), rel=0.25)
    one_average = sum(device_s(20 + (i * 7) % 41) / (20 + (i * 7) % 41) for i in range(500)) / 500
    assert one_average * 800 > 2 * device_s(800)  # what the single average would have said


def test_forecast_adds_batches_after_the_lead_and_pulls_in_on_replies():
    f = BusyForecast()
    f.observe(100, compute_s=0.010, lead_s=0.002)
    f.observe(400, compute_s=0.025, lead_s=0.005)  # 5 ms + 50 us a row; lead 1 ms + 10 us a row
    f.sent(200, now=1.0)  # arrives after a lead of 3 ms, runs 15 ms
    assert f.busy_until == pytest.approx(1.018)
    f.sent(100, now=1.005)  # queued behind the first: 10 ms more
    assert f.busy_until == pytest.approx(1.028)
    assert f.send_at(300) == pytest.approx(1.028 - LEAD_FACTOR * 0.004 - MARGIN_S)
    assert f.send_at(400) < f.send_at(100)  # a larger batch takes longer to get there: leaves earlier
    f.replied(200, now=1.015)  # the first came back early: the 100 rows left take 10 ms
    assert f.busy_until == pytest.approx(1.025)
    f.replied(100, now=1.022)  # all back: free now
    assert f.busy_until == pytest.approx(1.022)
    assert f.state()["in_flight"] == 0
    f.sent(50, now=2.0)  # an idle device: starts after the lead
    assert f.busy_until == pytest.approx(2.0 + 0.002 + 0.010)


def test_a_later_reply_does_not_push_the_forecast_out():
    f = BusyForecast()
    f.observe(10, compute_s=0.001, lead_s=0.0)
    f.sent(10, now=0.0)
    f.sent(10, now=0.0)
    f.replied(10, now=0.5)  # forecast said 0.002; min() keeps the earlier one
    assert f.busy_until == pytest.approx(0.002)
    f.replied(7, now=0.6)  # not a batch in flight: only the one of 10 rows is left
    assert f.state()["in_flight"] == 1 and f.busy_until == pytest.approx(0.002)


def test_a_reply_in_parts_shrinks_its_batch_and_pulls_the_end_in():
    f = BusyForecast()
    f.observe(100, compute_s=0.010, lead_s=0.0)
    f.observe(400, compute_s=0.025, lead_s=0.0)  # 5 ms + 50 us a row
    f.sent(400, now=1.0)
    assert f.busy_until == pytest.approx(1.025)
    f.shrink(400, 100, now=1.005)  # 300 of its rows came back: the 100 left take 10 ms from now
    assert f.busy_until == pytest.approx(1.015) and f.state()["in_flight"] == 1
    f.shrink(100, 0, now=1.012)  # the last ones: nothing in flight, free now
    assert f.busy_until == pytest.approx(1.012) and f.state()["in_flight"] == 0
    f.sent(100, now=2.0)
    f.shrink(250, 10, now=2.001)  # not a batch in flight: nothing changes
    assert f.busy_until == pytest.approx(2.010) and f.state()["in_flight"] == 1


def test_observations_without_a_time_are_ignored():
    f = BusyForecast()
    f.observe(100, compute_s=0.010, lead_s=0.004)
    f.observe(100, compute_s=0.0, lead_s=None)  # no compute time, no lead: nothing learned
    f.observe(0, compute_s=0.5, lead_s=-1.0)  # nothing ran; a negative lead is not a time
    assert f.device_s(100) == pytest.approx(0.010) and f.lead_s(100) == pytest.approx(0.004)
    assert set(f.state()) == {"device_s", "lead_s", "busy_until", "in_flight"}


# --- the client's pacing rule in simulated time ------------------------------------------------


class OneAveragePerRow:
    """The forecast before per-size curves: one EWMA of device time per row, one of the lead."""

    def __init__(self):
        self.per_row = self.lead_s = None
        self.busy_until, self.rows = 0.0, 0

    def observe(self, rows, compute_s, lead_s=None):
        ewma = lambda old, new: new if old is None else 0.8 * old + 0.2 * new  # noqa: E731
        self.per_row = ewma(self.per_row, compute_s / rows)
        self.lead_s = ewma(self.lead_s, lead_s)

    def sent(self, rows, now):
        start = max(now + (self.lead_s or 0.0), self.busy_until)
        self.busy_until, self.rows = start + rows * (self.per_row or 0.0), self.rows + rows

    def replied(self, rows, now):
        self.rows -= rows
        self.busy_until = now if self.rows <= 0 else min(self.busy_until, now + self.rows * self.per_row)

    def send_at(self, rows=1):
        return self.busy_until - LEAD_FACTOR * (self.lead_s or 0.0) - MARGIN_S


def simulate_open_loop(forecast, phases, *, seed=0, step=2e-4):
    """One worker, one client, Poisson arrivals at each (rate, seconds) of ``phases`` in turn; the
    client's rule for a partial batch to a busy worker (client.py ``_dispatch``: fewer than 2 in
    flight, oldest waited max_delay, not before ``send_at``). Costs shaped like the slower H100
    host (``gpu_case_open.json``): device 5.5 ms + 80 us a row; stacking 2 ms + 30 us a row (one
    batch at a time); 1 ms each way; results delivered 0.5 ms + 10 us a row after the reply.
    Returns, per phase, the p99 latency of its requests and its largest batch."""
    device, stack, deliver = (lambda n: 0.0055 + 80e-6 * n), (lambda n: 0.002 + 30e-6 * n), (lambda n: 0.0005 + 1e-5 * n)
    comm, full, max_delay, max_inflight = 0.001, 1536, 0.005, 3
    rng = np.random.default_rng(seed)
    arrivals, starts, t0 = [], [], 0.0
    for rate, seconds in phases:
        arrivals.append(np.sort(rng.uniform(t0, t0 + seconds, rng.poisson(rate * seconds))))
        starts.append(t0)
        t0 += seconds
    arrivals = np.concatenate(arrivals)
    latency = np.full(len(arrivals), np.nan)
    arrived = queued = inflight = 0
    stack_free = device_free = deliver_free = 0.0
    out, batches = [], []  # out: (delivered at, first, end, rows, lead, compute)
    for now in np.arange(0.0, t0 + 1.0, step):
        arrived = int(np.searchsorted(arrivals, now, side="right"))
        for done in [b for b in out if b[0] <= now]:
            out.remove(done)
            at, first, end, rows, lead, compute = done
            latency[first:end] = at - arrivals[first:end]
            inflight -= 1
            forecast.observe(rows, compute, lead)  # (the client's order: the reply is read, then done)
            forecast.replied(rows, at)
        while inflight < max_inflight and arrived > queued:
            size = min(arrived - queued, full)
            if size < full and inflight > 0 and (
                inflight >= 2 or now - arrivals[queued] < max_delay or now < forecast.send_at(size)
            ):
                break
            forecast.sent(size, now)
            stacked = stack_free = max(now, stack_free) + stack(size)
            device_free = max(stacked + comm, device_free) + device(size)
            deliver_free = max(device_free + comm, deliver_free) + deliver(size)
            out.append((deliver_free, queued, queued + size, size, stacked - now + comm, device(size)))
            batches.append((now, size))
            queued += size
            inflight += 1
    assert not np.isnan(latency).any()  # every request answered
    ends = starts[1:] + [t0]
    return [
        (float(np.percentile(latency[(arrivals >= a) & (arrivals < b)], 99)),
         max(n for t, n in batches if a <= t < b))
        for a, b in zip(starts, ends)
    ]


@pytest.mark.parametrize("seed", [0, 1])
def test_a_load_step_after_small_batches_keeps_partial_batches_small(seed):
    """30 % then 70 % of the capacity (~12,000 rows/s). With one average per row, learned from the
    30 % load's small batches, the forecast put the device's end far too late: each partial batch
    left only once the previous came back, stacking stopped overlapping the device and batches grew
    to several hundred rows (the start of every 70 % run on the slower GPU hosts). With per-size
    curves the batches stay near what the load needs (~140 rows) from the start."""
    phases = [(3600.0, 3.0), (8400.0, 4.0)]
    (p99_low, _), (p99, largest) = simulate_open_loop(BusyForecast(), phases, seed=seed)
    assert p99_low < 0.05 and p99 < 0.1 and largest < 400
    (_, _), (p99_old, largest_old) = simulate_open_loop(OneAveragePerRow(), phases, seed=seed)
    assert p99_old > 2 * p99 and largest_old > 2 * largest  # the scenario shows the old failure


def test_a_partial_shipment_for_a_server_of_padded_samples_leaves_while_it_holds_a_few_batches():
    from types import SimpleNamespace

    from dask_dynbatch.client.dispatcher import PARTIAL_INFLIGHT, TICK_INTERVAL, Dispatcher
    from dask_dynbatch.protocol import WEIGHED_SHIP_BATCHES

    forecast = BusyForecast()
    forecast.observe(100, compute_s=0.010, lead_s=0.0)  # 10 ms a batch of 100 rows
    for _ in range(20):
        forecast.sent(100, now=0.0)  # busy until 0.2 s
    dispatcher = SimpleNamespace(queue=SimpleNamespace(oldest_enqueued=lambda: 0.0),
                                 model=SimpleNamespace(spec=SimpleNamespace(max_delay=0.001)))

    def wait(ship, inflight, now=0.01):
        slot = SimpleNamespace(inflight=inflight, forecast=forecast, advice=SimpleNamespace(size=100, ship=ship))
        return Dispatcher._partial_wait(dispatcher, slot, 50, now)

    fixed = forecast.send_at(50)
    assert wait(None, PARTIAL_INFLIGHT) == TICK_INTERVAL  # fixed-size batches: enough in flight, wait
    assert wait(None, 1) == pytest.approx(fixed - 0.01)  # just in time for the device
    # padded samples: shipments are answered late (their rows are spread over many batches); the
    # forecast alone decides, and the rows leave while the server still holds a few batches' worth
    assert wait(400, 20) == pytest.approx(fixed - WEIGHED_SHIP_BATCHES * 0.010 - 0.01)
    assert wait(400, 20, now=0.19) is None
