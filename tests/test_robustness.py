"""Nothing lost: worker death, malformed input, poison requests, overload, lifecycle.

In-process clusters (``gen_cluster``) for most; real processes only where a process must die
(SIGKILL, nanny restart). Every test waits on futures with a timeout: a hang fails, it does not block CI.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import sys
import threading
import traceback
from collections import Counter
from pathlib import Path

import dask
import numpy as np
import pytest
from distributed import Client, LocalCluster, Worker
from distributed.utils_test import gen_cluster
from models import Deliveries, build_gated

import dask_dynbatch as ddb
from dask_dynbatch.core.requests import Request, RequestFuture, RequestQueue
from dask_dynbatch.examples import build_affine

WAIT = 60  # seconds any single result may take before the test counts it as a hang

# -- models (module level: in-process workers unpickle them by reference) -----------------------



def build_poisoned(device="cpu"):
    return _poisoned


def _poisoned(batch):
    """Affine; raises on any batch holding a sample whose first value is negative."""
    if (batch[:, 0] < 0).any():
        raise ValueError("poison sample")
    return batch * 2 + 1


class TwoArgError(Exception):
    """Pickles, but does not unpickle: ``__init__`` needs two arguments, ``args`` holds one."""

    def __init__(self, code, detail):
        super().__init__(f"code {code}: {detail}")


class LockedError(Exception):
    """Does not pickle at all: it holds a lock."""

    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


def build_awkward(device="cpu"):
    return _awkward


def _awkward(batch):
    if (batch[:, 0] == -1).any():
        raise TwoArgError(7, "bad pixel")
    if (batch[:, 0] == -2).any():
        raise LockedError("holds a lock")
    return batch * 2 + 1


def build_row_dropping(device="cpu"):
    return lambda batch: batch[:1]


def build_slow_affine(device="cpu"):
    return _slow_affine


def _slow_affine(batch):
    import time

    time.sleep(0.002)
    return batch * 2 + 1


async def _until(predicate, timeout=WAIT):
    """Wait (on the event loop) until ``predicate()`` holds."""
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never became true")


async def _settled(futures):
    """Wait until every future is done, whatever its outcome."""
    await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), WAIT)


# -- worker death --------------------------------------------------------------------------------


@pytest.mark.slow
def test_worker_killed_mid_run_every_request_delivered_exactly_once():
    """SIGKILL one of two worker processes while 5,000 requests stream through."""
    n = 5_000
    xs = np.zeros((n, 16))
    xs[:, 0] = np.arange(n)
    # the start-up reference benchmark (placement only) would hold each new worker's device thread
    with dask.config.set({"dynbatch.benchmark.on-start": False}), LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster:
        with Client(cluster) as client:
            client.register_plugin(ddb.DynBatchPlugin())
            batcher = ddb.Batcher(client, ddb.ModelSpec("affine-kill", load=build_affine, max_batch_size=32))
            assert batcher.submit(xs[0]).result(timeout=WAIT)[0] == 1.0  # model loaded, signature learned
            pids = client.run(os.getpid)
            victim = sorted(pids)[0]
            # mid-run, batches in flight on both workers
            deliveries = Deliveries(at=1_000, then=lambda: os.kill(pids[victim], signal.SIGKILL))
            futures = deliveries.watch(batcher.map(list(xs)))
            results = np.stack([f.result(timeout=WAIT) for f in futures])

            assert deliveries.fired.is_set()
            np.testing.assert_array_equal(results, 2 * xs + 1)  # each request got its own value
            assert len(deliveries.counts) == n and deliveries.exactly_once()
            stats = batcher.stats()
            assert stats["delivered"] == n + 1 and stats["failed"] == 0
            assert stats["requeued"] > 0  # the kill did hit batches in flight: they ran elsewhere
            batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_no_worker_requests_wait_time_out_clearly_and_resume_when_one_joins(c, s, a):
    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec("affine", load=build_affine))
    assert (await batcher.submit(np.zeros(2))).tolist() == [1.0, 1.0]
    await a.close()
    await _until(lambda: not batcher.stats()["workers"])

    waiting = batcher.map([np.full(2, float(i)) for i in range(10)])
    timed = batcher.submit(np.zeros(2), timeout=0.3)
    with pytest.raises(ddb.RequestTimeoutError, match="no worker able to run the model"):
        await asyncio.wait_for(timed, WAIT)
    assert not any(f.done() for f in waiting)  # they wait: no deadline, no worker
    assert batcher.stats()["no_worker"]

    async with Worker(s.address, nthreads=1):
        results = await asyncio.wait_for(asyncio.gather(*waiting), WAIT)
    assert [r.tolist() for r in results] == [[2.0 * i + 1] * 2 for i in range(10)]
    assert not batcher.stats()["no_worker"]
    batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1), ("127.0.0.1", 1)])
async def test_workers_joining_and_leaving_under_load(c, s, a, b):
    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec("slow-affine", load=build_slow_affine, max_batch_size=16))
    n = 3_000
    xs = np.zeros((n, 4))
    xs[:, 0] = np.arange(n)
    deliveries = Counter()
    events = []
    joined: list[Worker] = []

    async def join():
        joined.append(await Worker(s.address, nthreads=1))

    def on_done(future, i):
        deliveries[i] += 1
        total = sum(deliveries.values())
        if total == 500:
            events.append(asyncio.ensure_future(join()))
        elif total == 1_500:
            events.append(asyncio.ensure_future(a.close()))  # leaves with batches in flight

    futures = batcher.map(list(xs))
    for i, f in enumerate(futures):
        f.add_done_callback(lambda f, i=i: on_done(f, i))
    results = await asyncio.wait_for(asyncio.gather(*futures), WAIT)
    await asyncio.gather(*events)

    np.testing.assert_array_equal(np.stack(results), 2 * xs + 1)
    assert len(deliveries) == n and set(deliveries.values()) == {1}
    assert batcher.stats()["delivered"] == n and batcher.stats()["failed"] == 0
    # the joined worker serves the model too
    assert (await batcher.submit(xs[0])).tolist() == (2 * xs[0] + 1).tolist()
    await _until(lambda: joined[0].address in batcher.stats()["workers"])
    batcher.close()
    await joined[0].close()


def test_requeued_request_runs_again_and_keeps_its_deadline():
    """What the Batcher does with the requests of a batch whose worker died (queue level)."""
    queue = RequestQueue()
    late = Request(np.zeros(1), RequestFuture(), deadline=10.0)
    other = Request(np.zeros(1), RequestFuture())
    queue.push([late, other])
    batch, _ = queue.pop(2, now=0.0)
    assert batch == [late, other] and not late.future.cancel()  # running: no longer cancellable
    queue.push(batch, front=True)  # its worker died
    assert len(queue) == 2
    assert queue.expire(now=11.0) == [late]  # waited past its deadline for a worker
    batch, expired = queue.pop(5, now=11.0)
    assert batch == [other] and not expired and len(queue) == 0


def test_cancelled_futures_do_not_block_concurrent_futures_wait():
    queue = RequestQueue()
    reqs = [Request(np.zeros(1), RequestFuture()) for _ in range(3)]
    queue.push(reqs)
    assert reqs[0].future.cancel() and len(queue) == 2 and queue.cancelled == 1
    batch, _ = queue.pop(5, now=0.0)
    batch[0].future.set_result(1)
    batch[1].future.set_exception(ValueError("poison"))
    done, not_done = concurrent.futures.wait([r.future for r in reqs], timeout=WAIT)
    assert len(done) == 3 and not not_done
    assert len(list(concurrent.futures.as_completed([r.future for r in reqs], timeout=WAIT))) == 3


def test_deadline_heap_does_not_keep_finished_requests():
    """Requests with a long timeout that ran long ago are not kept alive (client memory)."""
    queue = RequestQueue()
    for _ in range(10):
        queue.push([Request(np.zeros(1000), RequestFuture(), deadline=1e9) for _ in range(1_000)])
        queue.pop(1_000, now=0.0)
    assert len(queue._deadlines) <= 2 * len(queue) + RequestQueue._HEAP_SLACK + 1_000


# -- malformed input ----------------------------------------------------------------------------


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_malformed_inputs_fail_at_submit_with_clear_messages(c, s, a):
    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec("affine", load=build_affine))
    # nothing learned yet: values that cannot be a sample are refused, and teach nothing
    refused = {
        "a string": ("hello", "arrays of numbers or booleans.*dtype <U5 \\(from a str\\)"),
        "a dict of text": ({"x": "text"}, r"\['x'\]: a leaf must be an array, a CPU tensor or a number, not a str"),
        "None": (None, "arrays of numbers or booleans.*from a NoneType"),
        "objects": (np.array([object(), object()]), "arrays of numbers or booleans.*dtype object"),
        "strings": (np.array(["a", "b"]), "arrays of numbers or booleans.*dtype <U1"),
        "empty": (np.zeros((0, 3)), "must not be empty.*shape \\(0, 3\\)"),
        "0-d": (np.float32(3.0), "not a scalar.*shape \\(\\)"),
        "a number": (3, "not a scalar"),
        "a list with text": ([1.0, [2.0, "a"]], r"\[1\]\[1\]: a leaf must be an array, a CPU tensor or a number, not a str"),
    }
    for _what, (value, message) in refused.items():
        with pytest.raises(ddb.InputSignatureError, match=message):
            batcher.submit(value)
    assert batcher.stats()["submitted"] == 0

    assert (await batcher.submit(np.zeros(3, dtype=np.float32))).tolist() == [1.0, 1.0, 1.0]
    mismatches = {
        "shape": (np.zeros(4, dtype=np.float32), r"shape \(3,\) and dtype float32.*received shape \(4,\) and dtype float32"),
        "dtype": (np.zeros(3), r"shape \(3,\) and dtype float32.*received shape \(3,\) and dtype float64"),
        "batch": (np.zeros((2, 3), dtype=np.float32), r"no batch dimension.*received shape \(2, 3\)"),
        "list": ([1.0, 2.0, 3.0], r"received shape \(3,\) and dtype float64 \(from a list\)"),
        "string": ("abc", r"received shape \(\) and dtype <U3 \(from a str\)"),
        "None": (None, r"received shape \(\) and dtype object \(from a NoneType\)"),
    }
    for _what, (value, message) in mismatches.items():
        with pytest.raises(ddb.InputSignatureError, match=message):
            batcher.submit(value)
    # in map, a sample that does not match fails alone, its error naming its index
    futures = batcher.map([np.zeros(3, dtype=np.float32), np.zeros(5, dtype=np.float32), "abc"])
    await _settled(futures)
    assert futures[0].result().tolist() == [1.0, 1.0, 1.0]
    for i in (1, 2):
        assert isinstance(futures[i].exception(), ddb.InputSignatureError)
        assert str(futures[i].exception()).startswith(f"sample {i} of map(): model 'affine' expects one sample of shape (3,)")
    stats = batcher.stats()
    assert stats["queued"] == 0 and stats["submitted"] == 4 and stats["failed"] == 2, stats
    # nothing is stuck: good requests still flow
    results = await asyncio.wait_for(asyncio.gather(*batcher.map([np.ones(3, dtype=np.float32)] * 5)), WAIT)
    assert all(r.tolist() == [3.0, 3.0, 3.0] for r in results)
    batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1), ("127.0.0.1", 1)])
async def test_mismatching_dask_future_inputs_fail_alone_at_batch_time(c, s, a, b):
    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec("affine", load=build_affine, max_batch_size=64))
    assert (await batcher.submit(np.zeros(4))).tolist() == [1.0] * 4  # signature: (4,) float64
    bad_values = {
        0: np.zeros(5),  # first of its batch: must not become the batch's template
        3: np.zeros(4, dtype=np.int32),
        5: "not an array",
        7: {"x": 1},
        9: [[1.0], [2.0, 3.0]],  # ragged
    }
    inputs = [c.submit(np.full, 4, float(i), pure=False) for i in range(12)]
    for i, value in bad_values.items():
        inputs[i] = c.submit(lambda v: v, value, pure=False)
    await c.gather(inputs)  # all computed: they join the queue together
    futures = batcher.map(inputs + [np.full(4, 100.0)])
    await _settled(futures)
    for i, f in enumerate(futures[:12]):
        if i in bad_values:
            assert isinstance(f.exception(), ddb.InputSignatureError), (i, f.exception())
            assert "input from Dask Future" in str(f.exception())
        else:
            assert f.result().tolist() == [2.0 * i + 1] * 4
    assert "expects shape (4,) and dtype float64" in str(futures[0].exception())
    assert "has shape (5,)" in str(futures[0].exception())
    assert futures[12].result().tolist() == [201.0] * 4
    batcher.close()


# -- poison requests --------------------------------------------------------------------------


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_several_poison_requests_in_one_batch_fail_alone(c, s, a):
    await c.register_plugin(ddb.DynBatchPlugin())
    spec = ddb.ModelSpec("poisoned", load=build_poisoned, max_batch_size=64, initial_batch_size=64)
    batcher = await ddb.Batcher(c, spec)
    poison = {0, 17, 18, 40, 63}
    xs = [np.array([float(i), 1.0]) for i in range(64)]
    for i in poison:
        xs[i] = np.array([-1.0, float(i)])
    futures = batcher.map(xs)
    await _settled(futures)
    assert [h["size"] for h in batcher.history()] == [64]  # one batch, bisected on the worker
    for i, f in enumerate(futures):
        if i in poison:
            exc = f.exception()
            assert isinstance(exc, ValueError) and str(exc) == "poison sample"
            # the original traceback: the line of the model that raised
            assert "_poisoned" in "".join(traceback.format_exception(exc))
        else:
            np.testing.assert_array_equal(f.result(), xs[i] * 2 + 1)
    stats = batcher.stats()
    assert stats["failed"] == len(poison) and stats["delivered"] == 64 - len(poison)
    batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_exceptions_that_do_not_pickle_still_reach_their_futures(c, s, a):
    await c.register_plugin(ddb.DynBatchPlugin())
    spec = ddb.ModelSpec("awkward", load=build_awkward, max_batch_size=16, initial_batch_size=16)
    batcher = await ddb.Batcher(c, spec)
    xs = [np.array([float(i), 0.0]) for i in range(16)]
    xs[3] = np.array([-1.0, 0.0])  # TwoArgError: unpickling fails
    xs[9] = np.array([-2.0, 0.0])  # LockedError: pickling fails
    futures = batcher.map(xs)
    await _settled(futures)
    assert "code 7: bad pixel" in str(futures[3].exception())
    assert "holds a lock" in str(futures[9].exception())
    for i, f in enumerate(futures):
        if i not in (3, 9):
            np.testing.assert_array_equal(f.result(), xs[i] * 2 + 1)
    batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_model_output_without_batch_dimension_fails_clearly(c, s, a):
    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec("drops-rows", load=build_row_dropping, initial_batch_size=8))
    futures = batcher.map([np.zeros(2)] * 8)
    await _settled(futures)
    for f in futures:
        assert "must keep the batch dimension" in str(f.exception())
    # the dispatcher goes on
    assert batcher.stats()["failed"] == 8 and batcher.stats()["in_flight"] == 0
    assert (await asyncio.wait_for(batcher.submit(np.zeros(2)), WAIT)).tolist() == [0.0, 0.0]
    batcher.close()


# -- overload -----------------------------------------------------------------------------------


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_overload_reject_raises_queue_full_and_bounds_the_queue(c, s, a, gate):
    await c.register_plugin(ddb.DynBatchPlugin())
    spec = ddb.ModelSpec("gated", load=build_gated, max_queue=20, overload="reject", max_batch_size=4, max_inflight=1)
    batcher = await ddb.Batcher(c, spec)
    first = batcher.submit(np.zeros(2))
    await _until(lambda: batcher.stats()["in_flight"] == 1)  # the worker holds it: nothing drains
    queued = batcher.map([np.full(2, float(i)) for i in range(20)])
    with pytest.raises(ddb.QueueFullError, match=r"holds 20 requests \(max_queue=20\).*overload='block'"):
        batcher.submit(np.zeros(2))
    with pytest.raises(ddb.QueueFullError):
        batcher.map([np.zeros(2)] * 2)
    assert batcher.stats()["queued"] == 20
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(first, *queued), WAIT)
    assert [r.tolist() for r in results[1:]] == [[2.0 * i + 1] * 2 for i in range(20)]
    assert (await batcher.submit(np.zeros(2))).tolist() == [1.0, 1.0]  # room again
    batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_overload_block_waits_for_room_without_deadlock(c, s, a, gate):
    await c.register_plugin(ddb.DynBatchPlugin())
    spec = ddb.ModelSpec("gated", load=build_gated, max_queue=10, overload="block", max_batch_size=2, max_inflight=1)
    batcher = await ddb.Batcher(c, spec)
    first = batcher.submit(np.zeros(2))
    await _until(lambda: batcher.stats()["in_flight"] == 1)
    # on the event loop itself submit() cannot wait: it says so
    with pytest.raises(ddb.QueueFullError, match="cannot block"):
        batcher.map([np.zeros(2)] * 11)
    # a user thread blocks until there is room; a request with a timeout gives up instead
    timed = await asyncio.to_thread(lambda: (batcher.map([np.zeros(2)] * 10), batcher.submit(np.zeros(2), timeout=0.2)))
    with pytest.raises(ddb.RequestTimeoutError, match="waiting for room in the queue"):
        await timed[1]
    xs = [np.full(2, float(i)) for i in range(200)]
    blocked = asyncio.ensure_future(asyncio.to_thread(batcher.map, xs))
    most_queued = 0
    for _ in range(20):  # the submitting thread is stuck while the worker is
        most_queued = max(most_queued, batcher.stats()["queued"])
        await asyncio.sleep(0.01)
    assert not blocked.done()
    gate.set()
    while not blocked.done():
        most_queued = max(most_queued, batcher.stats()["queued"])
        await asyncio.sleep(0.001)
    results = await asyncio.wait_for(asyncio.gather(*(await blocked)), WAIT)
    assert [r.tolist() for r in results] == [[2.0 * i + 1] * 2 for i in range(200)]
    assert most_queued <= 10  # the client never held more than max_queue requests
    await asyncio.wait_for(asyncio.gather(first, *timed[0]), WAIT)
    batcher.close()


# -- lifecycle ----------------------------------------------------------------------------------


def loaded(worker) -> set[str]:
    """Names of the models the worker serves now."""
    return {server.name for server in worker.extensions["dynbatch"].servers.values()}


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_registering_the_plugin_again_keeps_models_and_batchers(c, s, a):
    await c.register_plugin(ddb.DynBatchPlugin())
    plugin = s.extensions["dynbatch"]
    batcher = await ddb.Batcher(c, ddb.ModelSpec("affine", load=build_affine))
    assert (await batcher.submit(np.zeros(2))).tolist() == [1.0, 1.0]
    await c.register_plugin(ddb.DynBatchPlugin())
    await c.register_plugin(ddb.DynBatchPlugin(tune_malloc=False))
    assert s.extensions["dynbatch"] is plugin and "affine" in plugin.registry.models
    assert (await batcher.submit(np.ones(2))).tolist() == [3.0, 3.0]
    assert a.extensions["dynbatch"].loads[("affine", 1)] == 1  # not reloaded
    batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)], scheduler_kwargs={"dashboard": True, "dashboard_address": ":0"})
async def test_closing_the_plugin_undoes_what_it_started(c, s, a):
    await c.register_plugin(ddb.DynBatchPlugin())
    plugin = s.extensions["dynbatch"]
    batcher = await ddb.Batcher(c, ddb.ModelSpec("affine", load=build_affine))
    assert (await batcher.submit(np.zeros(2))).tolist() == [1.0, 1.0]
    batcher.close()
    assert "dynbatch_register_model" in s.handlers and "dynbatch-dashboard" in s.periodic_callbacks
    await plugin.close()
    assert not [op for op in s.handlers if op.startswith("dynbatch_")]
    assert "dynbatch" not in s.extensions and "dynbatch-dashboard" not in s.periodic_callbacks
    await _until(lambda: "dynbatch" not in a.extensions)  # the worker half is gone too
    assert "dynbatch_run" not in a.handlers
    await a.heartbeat()  # and heartbeats carry nothing for an extension that is gone
    with pytest.raises(ddb.PluginNotRegisteredError):
        await ddb.Batcher(c, ddb.ModelSpec("affine", load=build_affine))


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_close_cancels_queued_requests_and_delivers_sent_ones(c, s, a, gate):
    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec("gated", load=build_gated, max_batch_size=1, max_inflight=1))
    sent = batcher.submit(np.zeros(2))
    await _until(lambda: batcher.stats()["in_flight"] == 1)
    queued = batcher.map([np.zeros(2)] * 50)
    waiting_input = batcher.submit(c.submit(np.zeros, 2, pure=False))
    batcher.close()
    with pytest.raises(ddb.BatcherClosedError, match="create a new Batcher"):
        batcher.submit(np.zeros(2))
    assert all(f.cancelled() for f in queued)
    gate.set()
    assert (await asyncio.wait_for(sent, WAIT)).tolist() == [1.0, 1.0]
    await _settled([waiting_input])
    assert waiting_input.cancelled()
    stats = batcher.stats()
    assert stats["cancelled"] == 51 and stats["delivered"] == 1 and stats["queued"] == 0


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_close_with_drain_delivers_everything_first(c, s, a, gate):
    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec("gated", load=build_gated, max_batch_size=4, max_inflight=1))
    futures = batcher.map([np.full(2, float(i)) for i in range(40)])
    closing = batcher.close(drain=True)  # on the event loop: an awaitable
    assert not closing.done()
    gate.set()
    await asyncio.wait_for(closing, WAIT)
    assert [f.result().tolist() for f in futures] == [[2.0 * i + 1] * 2 for i in range(40)]
    with pytest.raises(ddb.BatcherClosedError):
        batcher.submit(np.zeros(2))

    other = await ddb.Batcher(c, ddb.ModelSpec("affine", load=build_affine))
    more = other.map([np.full(2, float(i)) for i in range(40)])
    await asyncio.to_thread(other.close, True)  # from a user thread: returns once drained
    assert [f.result().tolist() for f in more] == [[2.0 * i + 1] * 2 for i in range(40)]


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_client_disconnect_resolves_its_requests_and_frees_its_state(c, s, a, gate):
    await c.register_plugin(ddb.DynBatchPlugin())
    plugin = s.extensions["dynbatch"]
    shared = await ddb.Batcher(c, ddb.ModelSpec("affine", load=build_affine))
    assert (await shared.submit(np.zeros(2))).tolist() == [1.0, 1.0]

    c2 = await Client(s.address, asynchronous=True)
    attached = await ddb.Batcher.from_name(c2, "affine")  # used by both clients
    assert (await attached.submit(np.ones(2))).tolist() == [3.0, 3.0]
    solo = await ddb.Batcher(c2, ddb.ModelSpec("gated", load=build_gated, max_batch_size=1, max_inflight=1))
    in_flight = solo.submit(np.zeros(2))
    await _until(lambda: solo.stats()["in_flight"] == 1)
    queued = solo.map([np.zeros(2)] * 20)
    await _until(lambda: any(b.get("model") == "gated" for b in plugin.batchers.values()))
    assert "gated" in loaded(a)

    await c2.close()
    await _settled([in_flight, *queued])
    assert isinstance(in_flight.exception(), ddb.BatcherClosedError)
    assert all(f.cancelled() for f in queued)
    assert not [b for b in plugin.batchers.values() if b.get("client") == c2.id]  # reports dropped
    assert "gated" not in plugin.registry.models  # no client left for it
    gate.set()  # the worker finishes what it holds of it, then unloads it
    await _until(lambda: "gated" not in loaded(a))
    assert "affine" in plugin.registry.models and "affine" in loaded(a)  # still used by c
    assert (await shared.submit(np.ones(2))).tolist() == [3.0, 3.0]
    shared.close()


# -- load test, scaled down ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_load_scaled_down():
    """benchmarks/load_test.py at 5,000 requests: malformed, poison, cancellations, a restart."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from load_test import run_load_test  # its model must stay importable: the worker processes unpickle it
    result = run_load_test(rounds=5, per_round=1_000, n_workers=2, seed=1)
    for r in result["rounds"]:
        assert r["delivered"] + r["failed"] + r["cancelled"] == r["submitted"]
        assert r["unexpected_failures"] == 0 and r["poison_delivered"] == 0 and r["wrong_values"] == 0
        assert r["malformed_rejected"] == r["malformed"]
        assert r["queued_after"] == 0 and r["in_flight_after"] == 0 and r["worker_reservations_after"] == 0
    assert result["rounds"][0]["restarted"]
    assert result["worker_rss_growth_mib"] < 64  # no leak per request or per batch on the workers


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)], timeout=60)
async def test_a_request_that_times_out_before_its_shipment_is_encoded_fails_alone(c, s, a):
    # Two dispatch rounds before the shipment's task runs (as after a model refresh): the first
    # ships both requests, the second fails the one past its deadline. The shipment still carries
    # the inputs as they left the queue, and the other request gets its result.
    import time

    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec("affine-expire-early", load=build_affine))
    await batcher.submit(np.ones(4))  # the dispatcher knows the worker
    dispatcher = batcher._dispatcher
    late = batcher.submit(np.ones(4), timeout=0.01)
    other = batcher.submit(np.full(4, 3.0))
    now = time.monotonic()
    dispatcher.dispatch(now)
    assert not len(batcher._queue)  # both left in one shipment
    dispatcher.dispatch(now + 1.0)
    with pytest.raises(ddb.RequestTimeoutError):
        await late
    np.testing.assert_array_equal(await other, np.full(4, 7.0))
    batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_row_errors_is_awaitable_with_an_asynchronous_client(c, s, a):
    from dask_dynbatch.client.dask_collections import ROW_ERRORS

    await c.register_plugin(ddb.DynBatchPlugin())
    await c.log_event(ROW_ERRORS, {"source": "model 'row-errors-async'", "rows": [{"row": "item 3", "error": "E()"}],
                                   "failed": 1})
    batcher = await ddb.Batcher(c, ddb.ModelSpec("row-errors-async", load=build_affine))
    (row,) = await batcher.row_errors()
    assert row["row"] == "item 3"
    batcher.close()


def test_a_request_is_its_own_future_and_lets_go_of_its_sample():
    import weakref

    done, cancelled, queued = (Request(np.zeros(3)) for _ in range(3))
    assert done.future is done and isinstance(done, RequestFuture)
    sample = weakref.ref(done.sample)
    done.set_result(1.0)
    assert done.result() == 1.0 and done.sample is None and sample() is None
    queue = RequestQueue()
    queue.push([cancelled, queued])
    assert cancelled.cancel() and cancelled.sample is None  # cancelled while it waits
    batch, expired = queue.pop(10, now=0.0)
    assert batch == [queued] and not expired and queued.sample is not None
    assert not queued.cancel()  # taken for a shipment: it runs
