"""Pipelines: chains of grouped CPU steps and batched model steps, one future per job."""

from __future__ import annotations

import asyncio
import threading
import time

import dask
import dask.array as da
import numpy as np
import pytest
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.utils_test import gen_cluster

import dask_dynbatch as ddb
from dask_dynbatch.examples import build_affine, build_identity

# -- steps and models (module level: workers of gen_cluster run in this process) -----------------
GATE = threading.Event()  # a gated model blocks its batches until the test opens the gate
SEEN: list[list[float]] = []  # the first value of every row a gated model was called with, per batch


def build_gated(device="cpu"):
    def run(batch):
        SEEN.append([float(v) for v in batch[:, 0]])
        if not GATE.wait(30):
            raise RuntimeError("test gate never opened")
        return batch

    return run


def build_rowsum(device="cpu"):
    return _rowsum


def _rowsum(batch):
    return batch.sum(axis=1)


def build_poisoned(device="cpu"):
    def run(batch):
        if (batch[:, 0] < 0).any():
            raise ValueError("poison sample")
        return batch * 2 + 1

    return run


def decode(raw):
    return raw.astype(np.float32) / 10


def crop_regions(seg):
    # a variable number of crops per job (none for some jobs)
    return [seg[i : i + 4] for i in range(0, int(seg[0] * 10) % 3 * 2, 2)]


def make_report(scores):
    return {"n": len(scores), "total": float(np.sum(scores)) if scores else 0.0}


def square(x):
    return x * x


def add_one(x):
    return x + 1


def ident(x):
    return x


def split_pair(x):
    return [x[0], x[1]]


def fail_on_3(x):
    if x[0] == 3:
        raise ValueError("bad input 3")
    if x[0] == 5:
        return -x  # poisons the model
    if x[0] == 7:
        return np.zeros(3, dtype=np.float32)  # wrong shape for the model
    return x


def check_element(v):
    if v == 2 * 9 + 1:  # job 9's first element after the model
        raise KeyError("element of job 9")
    return v


def fails():
    raise ZeroDivisionError("the input itself failed")


class TaskCounter(SchedulerPlugin):
    """Every task key the scheduler saw."""

    def __init__(self):
        self.keys = set()

    def transition(self, key, start, finish, *args, **kwargs):
        self.keys.add(key)


async def until(condition, limit=20.0):
    """Wait for a state (a guard against hanging, not a timing assertion)."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the expected state was never reached")
        await asyncio.sleep(0.01)


def by_hand(raw, seg_model, cls_model):
    seg = seg_model(decode(raw)[None])[0]
    crops = crop_regions(seg)
    return make_report([cls_model(c[None])[0] for c in crops])


# -- results -------------------------------------------------------------------------------------
@gen_cluster(client=True, nthreads=[("127.0.0.1", 1), ("127.0.0.1", 1)])
async def test_chain_results_equal_steps_by_hand(c, s, a, b):
    await c.register_plugin(ddb.DynBatchPlugin())
    seg = await ddb.Batcher(c, ddb.ModelSpec("seg", load=build_affine, max_batch_size=16))
    cls = await ddb.Batcher(c, ddb.ModelSpec("cls", load=build_rowsum, max_batch_size=16))
    pipe = ddb.Pipeline(c, [
        ddb.cpu(decode),
        ddb.model(seg),
        ddb.cpu(crop_regions),
        ddb.fan_out(ddb.model(cls)),
        ddb.cpu(make_report),
    ])
    raws = [np.arange(i, i + 8, dtype=np.int64) for i in range(60)]
    reports = await asyncio.gather(*pipe.map(raws))
    expected = [by_hand(r, build_affine(), build_rowsum()) for r in raws]
    assert {r["n"] for r in expected} == {0, 1, 2}  # fan-outs of 0, 1 and 2 elements
    for got, want in zip(reports, expected):
        assert got["n"] == want["n"]
        assert got["total"] == pytest.approx(want["total"], rel=1e-6)
    stats = pipe.stats()
    assert stats["delivered"] == 60 and stats["running"] == 0
    assert [st["kind"] for st in stats["stages"]] == ["cpu", "model", "cpu", "fan_out", "cpu"]
    assert cls.stats()["delivered"] == sum(r["n"] for r in expected)  # one request per crop


@gen_cluster(client=True, nthreads=[("127.0.0.1", 2)])
async def test_fan_out_sub_chains_and_cpu_only_fan_out(c, s, a):
    await c.register_plugin(ddb.DynBatchPlugin())
    affine = await ddb.Batcher(c, ddb.ModelSpec("affine", load=build_affine))
    pipe = ddb.Pipeline(c, [
        ddb.cpu(split_pair),
        ddb.fan_out(ddb.model(affine), ddb.cpu(square)),  # a short chain per element
        ddb.fan_out(ddb.cpu(add_one)),  # CPU-only fan-out: fused into the CPU step around it
        ddb.cpu(sum),
    ])
    assert [st["kind"] for st in pipe.stats()["stages"]] == ["cpu", "fan_out", "cpu"]
    xs = [np.array([i, -i], dtype=np.float32).reshape(2, 1) for i in range(25)]
    got = await asyncio.gather(*pipe.map(xs))
    for x, y in zip(xs, got):
        want = sum(((2 * e + 1) ** 2) + 1 for e in x)
        np.testing.assert_allclose(y, want)


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1), ("127.0.0.1", 1)])
async def test_cpu_steps_are_grouped_not_one_task_per_job(c, s, a, b):
    await c.register_plugin(ddb.DynBatchPlugin())
    counter = TaskCounter()
    s.add_plugin(counter, name="count-tasks")
    affine = await ddb.Batcher(c, ddb.ModelSpec("affine", load=build_affine))
    pipe = ddb.Pipeline(c, [ddb.cpu(decode), ddb.cpu(add_one), ddb.model(affine), ddb.cpu(square)], group_size=64)
    n = 1000
    raws = [np.full(4, i) for i in range(n)]
    got = await asyncio.gather(*pipe.map(raws))
    for raw, y in zip(raws, got):
        np.testing.assert_allclose(y, (2 * (decode(raw) + 1) + 1) ** 2, rtol=1e-6)
    tasks = {k for k in counter.keys if str(k).startswith("dynbatch-")}
    stages = pipe.stats()["stages"]
    assert stages[0]["name"] == "decode+add_one"  # adjacent CPU steps run in one task
    assert len(tasks) == stages[0]["groups"] + stages[2]["groups"]
    assert stages[0]["groups"] == -(-n // 64)  # all jobs arrived at once: full groups of 64
    assert len(tasks) <= n / 5, f"{len(tasks)} Dask tasks for {n} jobs x 2 CPU stages"


# -- inputs on the cluster -----------------------------------------------------------------------
@gen_cluster(client=True, nthreads=[("127.0.0.1", 1), ("127.0.0.1", 1)])
async def test_dask_futures_and_collections_as_inputs(c, s, a, b):
    await c.register_plugin(ddb.DynBatchPlugin())
    affine = await ddb.Batcher(c, ddb.ModelSpec("affine", load=build_affine))
    cpu_first = ddb.Pipeline(c, [ddb.cpu(square), ddb.model(affine)])
    model_first = ddb.Pipeline(c, [ddb.model(affine), ddb.cpu(square)])
    data = np.arange(30 * 4, dtype=np.float32).reshape(30, 4)
    arr = da.from_array(data, chunks=(7, 2))  # chunked along both axes: rows are re-joined

    # a dask array: one job per element along the first axis, or one per block of rows
    for pipe, f in ((cpu_first, lambda x: 2 * x * x + 1), (model_first, lambda x: (2 * x + 1) ** 2)):
        got = await asyncio.gather(*pipe.map(arr))
        np.testing.assert_allclose(np.stack(got), f(data))
    lengths = ddb.Pipeline(c, [ddb.cpu(len)])
    assert await asyncio.gather(*lengths.map(arr, per="block")) == [7, 7, 7, 7, 2]
    # Dask Futures, Delayed objects and a failing Future (fails its own job only)
    futures = await c.scatter(list(data[:5]))
    bad = c.submit(fails)
    inputs = futures + [dask.delayed(np.ones)(4, dtype=np.float32), bad]
    for pipe, f in ((cpu_first, lambda x: 2 * x * x + 1), (model_first, lambda x: (2 * x + 1) ** 2)):
        results = await asyncio.gather(*pipe.map(inputs), return_exceptions=True)
        np.testing.assert_allclose(np.stack(results[:5]), f(data[:5]))
        np.testing.assert_allclose(results[5], f(np.ones(4)))
        assert isinstance(results[6], ZeroDivisionError)
    assert cpu_first.stats()["failed"] == 1 and model_first.stats()["failed"] == 1


# -- priorities, deadlines, cancellation -----------------------------------------------------------
async def gated_pipeline(c, name, *steps_after):
    GATE.clear()
    SEEN.clear()
    await c.register_plugin(ddb.DynBatchPlugin())
    spec = ddb.ModelSpec(name, load=build_gated, max_batch_size=4, max_inflight=1)
    batcher = await ddb.Batcher(c, spec)
    return batcher, ddb.Pipeline(c, [ddb.cpu(ident), ddb.model(batcher), *steps_after])


def tagged(ids):
    return [np.array([i, 0], dtype=np.float32) for i in ids]


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_priority_high_jobs_are_batched_first(c, s, a):
    batcher, pipe = await gated_pipeline(c, "gated-priority")
    order: list[int] = []
    try:
        lows = pipe.map(tagged(range(40)), priority=0)
        await until(lambda: len(SEEN) == 1 and batcher.stats()["queued"] + len(SEEN[0]) == 40)
        highs = pipe.map(tagged(range(1000, 1010)), priority=10)  # arrive while 40 low jobs wait
        await until(lambda: batcher.stats()["queued"] + len(SEEN[0]) == 50)
        for tag, f in [(int(i), f) for i, f in zip(range(40), lows)] + [(1000 + i, f) for i, f in enumerate(highs)]:
            f.add_done_callback(lambda _, tag=tag: order.append(tag))
    finally:
        GATE.set()
    await asyncio.gather(*lows, *highs)
    in_flight = {int(v) for v in SEEN[0]}  # the low jobs whose batch had started
    rest = [t for t in order if t not in in_flight]
    assert sorted(rest[:10]) == list(range(1000, 1010))  # every high job before every waiting low job
    assert all(t < 1000 for t in rest[10:])


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_deadlines_and_cancellation_exact_counts(c, s, a):
    _, pipe = await gated_pipeline(c, "gated-deadline", ddb.cpu(add_one))
    try:
        patient = pipe.map(tagged(range(12)))  # no timeout
        hurried = pipe.map(tagged(range(100, 112)), timeout=0.5)
        started = time.monotonic()
        await until(lambda: len(SEEN) == 1)
        waiting = [i for i in range(12) if float(i) not in SEEN[0]]
        cancelled = [patient[i] for i in waiting[:3]]
        assert all(f.cancel() for f in cancelled)
        await asyncio.sleep(max(0.0, started + 0.6 - time.monotonic()))  # every deadline has passed
    finally:
        GATE.set()
    results = await asyncio.gather(*patient, *hurried, return_exceptions=True)
    delivered = [r for r in results if isinstance(r, np.ndarray)]
    timed_out = [r for r in results if isinstance(r, ddb.RequestTimeoutError)]
    was_cancelled = [r for r in results if isinstance(r, asyncio.CancelledError)]
    assert (len(delivered), len(timed_out), len(was_cancelled)) == (9, 12, 3)
    assert len(delivered) + len(timed_out) + len(was_cancelled) == 24
    stats = pipe.stats()
    assert (stats["delivered"], stats["timed_out"], stats["cancelled"], stats["failed"], stats["running"]) == (9, 12, 3, 0, 0)
    # a hurried job whose request was still queued at its deadline never ran
    later_rows = {v for batch in SEEN[1:] for v in batch}
    assert not later_rows & {float(i) for i in range(100, 112)}


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_cancelled_jobs_are_never_run_nor_delivered(c, s, a):
    batcher, pipe = await gated_pipeline(c, "gated-cancel", ddb.cpu(add_one))
    try:
        futures = pipe.map(tagged(range(20)))
        assert futures[19].cancel()  # still waiting for its CPU group: it never leaves the client
        await until(lambda: len(SEEN) == 1 and batcher.stats()["queued"] + len(SEEN[0]) == 19)
        running = [i for i in range(19) if float(i) in SEEN[0]]
        queued = [i for i in range(19) if float(i) not in SEEN[0]]
        targets = queued[:5] + running[:1]
        assert all(futures[i].cancel() for i in targets)  # a job can be cancelled until it finished
        assert batcher.stats()["queued"] == len(queued) - 5  # its queued requests left the Batcher
    finally:
        GATE.set()
    cancelled = set(targets) | {19}
    for i, f in enumerate(futures):
        if i in cancelled:
            with pytest.raises(asyncio.CancelledError):
                await f
            assert f.cancelled()
        else:
            np.testing.assert_allclose(await f, tagged([i])[0] + 1)
    seen = {v for batch in SEEN for v in batch}
    assert not seen & {float(i) for i in queued[:5] + [19]}  # cancelled while queued: never run
    stats = pipe.stats()
    assert stats["delivered"] + stats["cancelled"] == 20
    assert (stats["delivered"], stats["cancelled"], stats["failed"], stats["timed_out"]) == (13, 7, 0, 0)


# -- failures -----------------------------------------------------------------------------------
@gen_cluster(client=True, nthreads=[("127.0.0.1", 1), ("127.0.0.1", 1)])
async def test_a_failing_job_fails_alone(c, s, a, b):
    await c.register_plugin(ddb.DynBatchPlugin())
    poisoned = await ddb.Batcher(
        c, ddb.ModelSpec("poisoned", load=build_poisoned, input_shape=(2,), input_dtype="float32")
    )
    pipe = ddb.Pipeline(c, [
        ddb.cpu(fail_on_3),            # job 3 raises; job 5 becomes a poison sample; job 7 gets a wrong shape
        ddb.model(poisoned),
        ddb.fan_out(ddb.cpu(check_element)),  # job 9: one element raises
    ])
    xs = [np.array([i, i], dtype=np.float32) for i in range(20)]
    results = await asyncio.gather(*pipe.map(xs), return_exceptions=True)
    assert isinstance(results[3], ValueError) and "bad input 3" in str(results[3])
    assert isinstance(results[5], ValueError) and "poison" in str(results[5])
    assert isinstance(results[7], ddb.InputSignatureError)
    assert isinstance(results[9], KeyError)
    for i, r in enumerate(results):
        if i not in (3, 5, 7, 9):
            np.testing.assert_allclose(r, 2 * xs[i] + 1)
    stats = pipe.stats()
    assert (stats["delivered"], stats["failed"], stats["running"]) == (16, 4, 0)


def test_step_declarations_are_checked():
    with pytest.raises(TypeError, match="cpu"):
        ddb.cpu(42)
    with pytest.raises(TypeError, match="Batcher"):
        ddb.model(lambda x: x)
    with pytest.raises(ValueError, match="at least one"):
        ddb.fan_out()
    with pytest.raises(TypeError, match="wrap a plain function"):
        ddb.fan_out(square)


# -- a synchronous client, real threads ------------------------------------------------------------
def test_sync_client_submit_map_cancel():
    # tcp, not inproc: over inproc comms a Batcher reply arrives still wrapped in Serialize
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp", dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        ident_model = ddb.Batcher(client, ddb.ModelSpec("identity", load=build_identity))
        with ddb.Pipeline(client, [ddb.cpu(decode), ddb.model(ident_model), ddb.cpu(add_one)]) as pipe:
            first = pipe.submit(np.arange(5), priority=2, timeout="10s").result(30)
            np.testing.assert_allclose(first, [1.0, 1.1, 1.2, 1.3, 1.4], rtol=1e-6)
            raws = [np.full(5, i) for i in range(300)]
            futures = pipe.map(raws)
            cancelled = sum(f.cancel() for f in futures[::50])
            outcomes = [f.exception(30) if not f.cancelled() else "cancelled" for f in futures]
            assert outcomes.count(None) + outcomes.count("cancelled") == 300
            assert outcomes.count("cancelled") == cancelled
            for raw, f in zip(raws, futures):
                if not f.cancelled():
                    np.testing.assert_allclose(f.result(), decode(raw) + 1)
            stats = pipe.stats()
            assert stats["delivered"] + stats["cancelled"] == 301 and stats["running"] == 0
        ident_model.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_low_priority_groups_are_short_while_high_priority_jobs_are_about(c, s, a):
    # a running Dask task cannot be pre-empted: with a tiny group_seconds, low-priority groups
    # shrink to one job as long as higher-priority jobs were seen lately
    pipe = ddb.Pipeline(c, [ddb.cpu(ident)], group_seconds=1e-9, max_groups_in_flight=1)
    await pipe.submit(np.zeros(2))  # measures the step's time per job
    lows = pipe.map([np.zeros(2)] * 20, priority=0)
    highs = pipe.map([np.ones(2)], priority=5)
    await asyncio.gather(*lows, *highs)
    assert pipe.stats()["stages"][0]["groups"] == 1 + 1 + 20
    alone = ddb.Pipeline(c, [ddb.cpu(ident)], group_seconds=1e-9, max_groups_in_flight=1)
    await alone.submit(np.zeros(2))
    await asyncio.gather(*alone.map([np.zeros(2)] * 20, priority=0))
    assert alone.stats()["stages"][0]["groups"] == 1 + 1  # no higher priority about: one group of 20
