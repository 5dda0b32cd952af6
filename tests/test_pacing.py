"""BusyForecast: when a partial batch goes to a busy worker (pure, no clock)."""

import pytest

from dask_dynbatch.pacing import LEAD_FACTOR, MARGIN_S, BusyForecast


def test_nothing_measured_sends_at_once():
    f = BusyForecast()
    assert f.send_at() < 0.0
    f.sent(100, now=10.0)  # no device time per row known yet: no wait is forecast
    assert f.send_at() <= 10.0


def test_forecast_adds_batches_after_the_lead_and_pulls_in_on_replies():
    f = BusyForecast()
    f.observe(100, compute_s=0.010, lead_s=0.002)  # 0.1 ms per row
    assert f.per_row == pytest.approx(1e-4) and f.lead == pytest.approx(0.002)
    f.sent(200, now=1.0)  # arrives at 1.002, runs 20 ms
    assert f.busy_until == pytest.approx(1.022)
    f.sent(100, now=1.005)  # queued behind the first: 10 ms more
    assert f.busy_until == pytest.approx(1.032)
    assert f.send_at() == pytest.approx(1.032 - LEAD_FACTOR * 0.002 - MARGIN_S)
    f.replied(now=1.020, rows_in_flight=100)  # the first came back early: 100 rows left
    assert f.busy_until == pytest.approx(1.030)
    f.replied(now=1.025, rows_in_flight=0)  # all back: free now
    assert f.busy_until == pytest.approx(1.025)
    f.sent(50, now=2.0)  # an idle device: starts after the lead
    assert f.busy_until == pytest.approx(2.0 + 0.002 + 0.005)


def test_a_later_reply_does_not_push_the_forecast_out():
    f = BusyForecast()
    f.observe(10, compute_s=0.001, lead_s=0.0)
    f.sent(10, now=0.0)
    f.replied(now=0.5, rows_in_flight=10)  # forecast said 0.001; min() keeps the earlier one
    assert f.busy_until == pytest.approx(0.001)


def test_observations_are_smoothed_and_bad_ones_ignored():
    f = BusyForecast()
    f.observe(100, compute_s=0.010, lead_s=0.004)
    f.observe(100, compute_s=0.020, lead_s=None)
    assert f.per_row == pytest.approx(0.8 * 1e-4 + 0.2 * 2e-4)
    assert f.lead == pytest.approx(0.004)
    f.observe(0, compute_s=0.5, lead_s=-1.0)  # nothing ran; a negative lead is not a time
    assert f.per_row == pytest.approx(0.8 * 1e-4 + 0.2 * 2e-4) and f.lead == pytest.approx(0.004)
    assert set(f.state()) == {"per_row_s", "lead_s", "busy_until"}
