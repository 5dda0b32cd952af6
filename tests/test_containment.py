"""Requests that hang or kill their worker fail alone; deadlines hold while a request runs.

Pure rules first (the quarantine's groups, the watchdog's limits, isolated device batches), then
real multi-process clusters, where a worker must hang or die: a sample value makes the model sleep
far past the watchdog or call ``os._exit``. Every wait is bounded: a hang fails the test, it does
not block CI.
"""

from __future__ import annotations

import asyncio
import os
import time

import dask
import numpy as np
import pytest
from distributed import Client, LocalCluster
from distributed.utils_test import gen_cluster
from models import GATE, Deliveries, build_gated, worker_addresses

import dask_dynbatch as ddb
from dask_dynbatch.core.formation import Part, PartQueue
from dask_dynbatch.core.quarantine import Quarantine
from dask_dynbatch.core.requests import Request, RequestFuture
from dask_dynbatch.core.watchdog import ExecutionClock
from dask_dynbatch.examples import build_affine

WAIT = 90  # seconds any single result may take before the test counts it as a hang
HANG = -1.0  # a sample whose first value is this makes the model hang
CRASH = -2.0  # ... or kill its worker process
SLOW = -3.0  # ... or sleep a little (holds a batch on the device on purpose)


def build_fragile(device="cpu"):
    return _fragile


def _fragile(batch):
    """Affine; hangs, kills the process or sleeps on a sample whose first value says so."""
    first = batch[:, 0]
    if (first == CRASH).any():
        os._exit(13)
    if (first == HANG).any():
        time.sleep(120)
    if (first == SLOW).any():
        time.sleep(0.5)
    return batch * 2 + 1


def samples(n: int, width: int = 4) -> np.ndarray:
    xs = np.zeros((n, width))
    xs[:, 0] = np.arange(n)
    return xs


# -- the quarantine -----------------------------------------------------------------------------


def _requests(n):
    return [Request(np.zeros(1), RequestFuture(), seq=i) for i in range(n)]


def _hunt(q: Quarantine, reqs: list, culprit) -> tuple[list, int]:
    """Lose shipments with the culprit until it fails; its batchmates' groups run. Returns what
    failed and how many deaths the culprit caused."""
    lost, deaths = reqs, 0
    while True:
        deaths += 1
        failed = q.lost(lost)
        if failed:
            return failed, deaths
        groups = []
        while len(q):
            groups.append(q.pop())
        assert sum(map(len, groups)) == len(lost)
        for group in groups:  # the groups without the culprit run; the other dies again
            if culprit not in group:
                for r in group:
                    r.future.set_result(0)
        lost = next(g for g in groups if culprit in g)


def test_quarantine_halves_until_the_culprit_is_alone_and_fails_it_alone():
    reqs = _requests(32)
    failed, deaths = _hunt(Quarantine(max_deaths=10), reqs, reqs[19])
    assert failed == [reqs[19]] and deaths == 6  # in groups of 32, 16, 8, 4, 2, then alone
    assert sum(r.future.done() for r in reqs) == 31 and max(r.attempts for r in reqs) == 6


def test_quarantine_bounds_the_deaths_one_request_may_cause():
    reqs = _requests(100)
    # halves alone would take 8 deaths (100, 50, 25, 13, 7, 4, 2, 1): groups are cut smaller
    failed, deaths = _hunt(Quarantine(max_deaths=4), reqs, reqs[57])
    assert failed == [reqs[57]] and deaths == 4
    assert sum(r.future.done() for r in reqs) == 99 and max(r.attempts for r in reqs) <= 4


def test_one_unlucky_death_alone_is_retried_and_a_second_one_fails():
    q = Quarantine()
    (req,) = _requests(1)
    assert q.lost([req]) == [] and q.pop() == [req]  # a worker may die for other reasons
    assert q.lost([req]) == [req]


def test_quarantine_drops_requests_resolved_while_they_wait():
    q = Quarantine()
    reqs = _requests(4)
    q.lost(reqs)
    reqs[0].future.set_exception(TimeoutError())  # its deadline passed
    reqs[1].future.set_exception(TimeoutError())
    assert len(q) == 4 and q.pop() == reqs[2:]  # the first group held only those two
    q.put_back(reqs[2:])
    assert q.drain() == reqs[2:] and len(q) == 0


# -- the watchdog's limits ------------------------------------------------------------------------


def test_execution_limit_from_measured_times_with_a_floor_and_a_first_batch_allowance():
    clock = ExecutionClock(factor=10, floor=2.0, first=30.0)
    assert clock.limit(8) == 30.0  # nothing measured yet
    clock.observe(8, 0.01)
    clock.observe(64, 0.5)
    assert clock.limit(8) == 2.0  # 10 x 0.01 s is below the floor
    assert clock.limit(64) == pytest.approx(5.0)
    assert clock.limit(128) == pytest.approx(10.0)  # past the largest size: in proportion
    assert ExecutionClock(1.5).limit(10_000) == 1.5  # ModelSpec.execution_timeout wins


def test_isolated_parts_form_device_batches_of_their_own():
    queue = PartQueue()
    a, suspects, b = object(), object(), object()
    queue.push([Part(a, 0, np.zeros((3, 1))), Part(suspects, 0, np.zeros((2, 1)), alone=True),
                Part(b, 0, np.zeros((4, 1)))])
    assert [p.owner for p in queue.take(100)] == [a]
    assert [p.owner for p in queue.take(100)] == [suspects]
    assert [p.owner for p in queue.take(100)] == [b]
    queue.push([Part(suspects, 0, np.zeros((2, 1)), alone=True), Part(a, 0, np.zeros((1, 1)))])
    assert len(queue.drain()) == 2 and len(queue) == 0


def test_execution_timeout_is_part_of_the_model_and_parsed():
    assert ddb.ModelSpec("m", load=build_affine, execution_timeout="2s").execution_timeout == 2.0
    with pytest.raises(ValueError, match="execution_timeout must be"):
        ddb.ModelSpec("m", load=build_affine, execution_timeout="soon")


# -- deadlines while running ----------------------------------------------------------------------



@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_a_running_request_fails_at_its_deadline_and_its_late_result_is_dropped(c, s, a):
    GATE.clear()
    try:
        await c.register_plugin(ddb.DynBatchPlugin())
        batcher = await ddb.Batcher(c, ddb.ModelSpec("gated", load=build_gated, max_batch_size=4))
        started = time.monotonic()
        timed = batcher.submit(np.zeros(2), timeout=0.5)
        patient = batcher.submit(np.ones(2))
        with pytest.raises(ddb.RequestTimeoutError, match="after it was sent to a worker"):
            await asyncio.wait_for(timed, WAIT)
        assert time.monotonic() - started < 5  # at its deadline, not when the worker answers
        assert not patient.done()
        GATE.set()
        assert (await asyncio.wait_for(patient, WAIT)).tolist() == [3.0, 3.0]
        while batcher.stats()["in_flight"]:
            await asyncio.sleep(0.01)
        stats = batcher.stats()
        assert stats["timed_out"] == 1 and stats["timed_out_running"] == 1
        assert stats["delivered"] == 1 and stats["failed"] == 0  # the late result was dropped
        with pytest.raises(ddb.RequestTimeoutError):
            timed.result()
        batcher.close()
    finally:
        GATE.set()


# -- real processes: hangs and crashes --------------------------------------------------------------


def _cluster(n_workers: int, **config) -> LocalCluster:
    # the start-up reference benchmark (placement only) would hold each new worker's device thread
    with dask.config.set({"dynbatch.benchmark.on-start": False, **config}):
        return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0")


def _warm(batcher, n=64):
    """Batches of the sizes the test uses ran: the watchdog knows their time."""
    xs = samples(n) + 1000
    for f in batcher.map(list(xs)):
        f.result(timeout=WAIT)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_hang_one_worker_request_fails_by_its_deadline_others_and_a_second_model_complete():
    """One worker: a request hangs its batch. It fails at its deadline; its batchmates, the rows
    queued behind them and a second model on the same device all complete after the restart."""
    with _cluster(1) as cluster, Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        spec = ddb.ModelSpec("fragile", load=build_fragile, max_batch_size=32, initial_batch_size=32,
                             latency_target="10s")
        batcher = ddb.Batcher(client, spec)
        other = ddb.Batcher(client, ddb.ModelSpec("other", load=build_affine, max_batch_size=8))
        _warm(batcher)
        assert other.submit(np.zeros(4)).result(timeout=WAIT).tolist() == [1.0] * 4
        (worker_before,) = worker_addresses(client)

        xs = samples(32)
        xs[9, 0] = HANG
        deliveries = Deliveries()
        started = time.monotonic()
        futures = deliveries.watch([batcher.submit(x, timeout="5s" if i == 9 else None) for i, x in enumerate(xs)])
        time.sleep(0.5)  # the batch hangs on the device; the second model's requests queue behind it
        others = deliveries.watch(other.map(list(samples(40, 4) + 500)))
        with pytest.raises(ddb.RequestTimeoutError, match="after it was sent to a worker"):
            futures[9].result(timeout=WAIT)
        assert time.monotonic() - started < 8  # its deadline (5 s), not the model's 120 s
        results = [f.result(timeout=WAIT) for i, f in enumerate(futures) if i != 9]
        other_results = [f.result(timeout=WAIT) for f in others]
        elapsed = time.monotonic() - started

        np.testing.assert_array_equal(np.stack(results), 2 * np.delete(xs, 9, axis=0) + 1)
        np.testing.assert_array_equal(np.stack(other_results), 2 * (samples(40, 4) + 500) + 1)
        assert elapsed < 45, elapsed  # deadline + restart + retries: about 10 s on a 2-core machine
        assert deliveries.exactly_once() and len(deliveries.watched) == 72
        stats = batcher.stats()
        assert stats["timed_out_running"] == 1 and stats["stuck"] >= 1 and stats["failed"] == 0
        assert stats["delivered"] == 64 + 31
        state = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.extensions["dynbatch"].state())
        assert state["stuck_batches"] == {"fragile": 1}
        assert [r["worker"] for r in state["restarts"]] == [worker_before]
        assert worker_before not in worker_addresses(client)  # a new process serves
        assert any(h["outcome"] == "stuck" for h in batcher.history())

        def summary():  # what the dashboard page and /metrics show, once the Batchers reported
            from dask_dynbatch.scheduler.summary import model_summaries

            return model_summaries(client.run_on_scheduler(
                lambda dask_scheduler: dask_scheduler.extensions["dynbatch"].state()))["fragile"]

        for _ in range(WAIT * 10):
            if summary()["delivered"] == 95:
                break
            time.sleep(0.1)
        shown = summary()
        assert shown["stuck_batches"] == 1 and shown["timed_out_running"] == 1 and shown["stuck"] >= 1
        assert shown["quarantined"] == 0
        batcher.close()
        other.close()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_hang_two_workers_the_watchdog_isolates_the_request_that_hangs():
    """Two workers, no deadline: the watchdog (``execution_timeout``) declares the batch stuck
    each time; its requests are retried in halves until the one that hangs is alone, and it fails
    with ExecutionTimeoutError. Every other request, streamed meanwhile, is delivered once."""
    with _cluster(2) as cluster, Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        spec = ddb.ModelSpec("fragile", load=build_fragile, max_batch_size=16, initial_batch_size=16,
                             latency_target="10s", execution_timeout="1s")
        batcher = ddb.Batcher(client, spec)
        _warm(batcher)
        xs = samples(16)
        xs[5, 0] = HANG
        stream = samples(400) + 2000
        deliveries = Deliveries()
        started = time.monotonic()
        futures = deliveries.watch(batcher.map(list(xs)))
        more = deliveries.watch(batcher.map(list(stream)))
        with pytest.raises(ddb.ExecutionTimeoutError, match=r"ran past the execution timeout \(1.0 s\)") as info:
            futures[5].result(timeout=WAIT)
        assert "the last time alone in its batch" in str(info.value)
        results = [f.result(timeout=WAIT) for i, f in enumerate(futures) if i != 5]
        np.testing.assert_array_equal(np.stack(results), 2 * np.delete(xs, 5, axis=0) + 1)
        np.testing.assert_array_equal(np.stack([f.result(timeout=WAIT) for f in more]), 2 * stream + 1)
        elapsed = time.monotonic() - started
        assert elapsed < 60, elapsed
        assert deliveries.exactly_once()
        stats = batcher.stats()
        assert stats["failed"] == stats["quarantined"] == 1 and stats["delivered"] == 64 + 15 + 400
        assert stats["isolated"] > 0 and stats["quarantine"] == 0
        state = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.extensions["dynbatch"].state())
        assert state["stuck_batches"]["fragile"] == len(state["restarts"]) >= 2
        batcher.close()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_sample_that_kills_its_worker_fails_alone_and_its_31_batchmates_are_delivered():
    with _cluster(1) as cluster, Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        spec = ddb.ModelSpec("fragile", load=build_fragile, max_batch_size=32, initial_batch_size=32,
                             latency_target="10s")
        batcher = ddb.Batcher(client, spec)
        _warm(batcher)
        xs = samples(32)
        xs[0, 0] = SLOW  # holds the device while the batch of 32 gathers behind it
        xs[21, 0] = CRASH
        deliveries = Deliveries()
        started = time.monotonic()
        slow = deliveries.watch([batcher.submit(xs[0])])
        time.sleep(0.1)
        futures = deliveries.watch(batcher.map(list(xs[1:])))
        assert slow[0].result(timeout=WAIT).tolist() == (2 * xs[0] + 1).tolist()
        with pytest.raises(ddb.WorkerCrashError, match="made its worker die") as info:
            futures[20].result(timeout=WAIT)
        assert "the last time alone in its batch" in str(info.value)
        results = [f.result(timeout=WAIT) for i, f in enumerate(futures) if i != 20]
        np.testing.assert_array_equal(np.stack(results), 2 * np.delete(xs[1:], 20, axis=0) + 1)
        elapsed = time.monotonic() - started
        assert elapsed < 60, elapsed
        assert deliveries.exactly_once()
        stats = batcher.stats()
        assert stats["failed"] == stats["quarantined"] == 1 and stats["delivered"] == 64 + 31
        died = [h for h in batcher.history() if h["outcome"] == "worker died"]
        # the batch of 31 died, then groups of its suspects, alone on the worker, down to one
        assert max(h["size"] for h in died if not h["isolated"]) == 31
        assert [h["size"] for h in died if h["isolated"]][-1] == 1
        batcher.close()
