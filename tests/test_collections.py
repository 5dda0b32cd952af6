"""``Batcher.predict`` over Dask collections, on a real multi-process cluster: Array -> Array (row
chunks kept, order kept), Bag -> Bag, DataFrame -> DataFrame / Series (index kept), structured
samples, a failing row (named, or missing), the traffic through the client while a reduction of
the predictions is computed, and a worker killed while computing."""

from __future__ import annotations

import os
import threading
import time

import dask
import dask.array as da
import dask.bag as db
import numpy as np
import pytest
from distributed import Client, LocalCluster
from models import build_gated, worker_addresses

import dask_dynbatch as ddb
from dask_dynbatch.examples import build_affine

dd = pytest.importorskip("dask.dataframe")
pd = pytest.importorskip("pandas")

WAIT = 120


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        yield client


def build_poisoned_affine():
    """``2x + 1``, raising on rows whose first value is -1."""

    def model(batch):
        if (batch[:, 0] == -1).any():
            raise ValueError("poison row")
        return 2 * batch + 1

    return model


def build_dict_model():
    return lambda a, b: {"sum": a + b, "diff": a - b}


def build_token_model():
    """Padded dict samples: per-token outputs and a per-request total."""
    return lambda input_ids, attention_mask: {"total": (input_ids * attention_mask).sum(1),
                                               "twice": 2 * input_ids}


def test_array_to_array_keeps_row_chunks_and_order(client):
    with ddb.Batcher(client, ddb.ModelSpec("coll-affine", load=build_affine)) as batcher:
        x = da.random.random((2_000, 6), chunks=(173, 4))  # chunked along both axes
        predictions = batcher.predict(x)
        assert isinstance(predictions, da.Array)
        assert predictions.chunks[0] == x.chunks[0] and predictions.shape == (2_000, 6)
        np.testing.assert_allclose(predictions.compute(), 2 * x.compute() + 1)
        # rows of every block reached the servers from the workers: this client sent one row only
        assert batcher.stats()["submitted"] == 1


def test_bag_and_frames(client):
    with ddb.Batcher(client, ddb.ModelSpec("coll-affine-bag", load=build_affine)) as batcher:
        items = [np.full(3, float(i)) for i in range(90)]
        out = batcher.predict(db.from_sequence(items, npartitions=7)).compute()
        np.testing.assert_allclose(np.stack(out), 2 * np.stack(items) + 1)
    with ddb.Batcher(client, ddb.ModelSpec("coll-affine-series", load=build_affine)) as batcher:
        series = dd.from_pandas(pd.Series(np.arange(40.0), index=np.arange(100, 140)), npartitions=3)
        got = batcher.predict(series).compute()
        assert isinstance(got, pd.Series) and list(got.index) == list(range(100, 140))
        np.testing.assert_allclose(got.to_numpy(), 2 * np.arange(40.0) + 1)
    with ddb.Batcher(client, ddb.ModelSpec("coll-dict", load=build_dict_model)) as batcher:
        frame = pd.DataFrame({"a": np.arange(30.0), "b": np.arange(30.0) ** 2}, index=[f"r{i}" for i in range(30)])
        got = batcher.predict(dd.from_pandas(frame, npartitions=4, sort=False)).compute()
        assert list(got.columns) == ["sum", "diff"] and list(got.index) == list(frame.index)
        np.testing.assert_allclose(got["sum"], frame.a + frame.b)
        np.testing.assert_allclose(got["diff"], frame.a - frame.b)


def test_structured_padded_samples_in_a_bag(client):
    rng = np.random.default_rng(0)
    ids = [rng.integers(1, 50, int(n)) for n in rng.integers(2, 30, 120)]
    samples = [{"input_ids": i, "attention_mask": np.ones_like(i)} for i in ids]
    with ddb.Batcher(client, ddb.ModelSpec("coll-tokens", load=build_token_model, pad_value=0)) as batcher:
        out = batcher.predict(db.from_sequence(samples, npartitions=5)).compute()
    for i, o in zip(ids, out):
        assert int(o["total"]) == int(i.sum())
        np.testing.assert_array_equal(o["twice"], 2 * i)


def test_a_failing_row_is_named_or_missing(client):
    data = np.ones((300, 2))
    data[217, 0] = -1
    x = da.from_array(data, chunks=(50, 2))
    with ddb.Batcher(client, ddb.ModelSpec("coll-poison", load=build_poisoned_affine)) as batcher:
        with pytest.raises(ddb.RowError, match=r"row 217 of the array failed: ValueError\('poison row'\)"):
            batcher.predict(x).compute()
        got = batcher.predict(x, on_error="missing").compute()
        assert np.isnan(got[217]).all() and np.isfinite(np.delete(got, 217, axis=0)).all()
        (record,) = batcher.row_errors()
        assert record["row"] == "row 217 of the array" and "poison row" in record["error"]
        assert record["task"] and record["task"] != "None"  # the key of the block's task
        with pytest.raises(ValueError, match="on_error"):
            batcher.predict(x, on_error="ignore")


def _count_comm_bytes():
    """Count the bytes every TCP comm of this process reads and writes (the client, and the
    scheduler that LocalCluster runs here: an upper bound on the client's own traffic)."""
    import distributed.comm.tcp as tcp

    counted = {"bytes": 0}
    original_from_frames, original_write = tcp.from_frames, tcp.TCP.write

    async def from_frames(frames, *args, **kwargs):
        counted["bytes"] += sum(len(f) if isinstance(f, (bytes, bytearray)) else memoryview(f).nbytes for f in frames)
        return await original_from_frames(frames, *args, **kwargs)

    async def write(self, msg, *args, **kwargs):
        n = await original_write(self, msg, *args, **kwargs)
        counted["bytes"] += n
        return n

    tcp.from_frames, tcp.TCP.write = from_frames, write

    def undo():
        tcp.from_frames, tcp.TCP.write = original_from_frames, original_write

    return counted, undo


def test_a_reduction_of_predictions_moves_little_through_the_client(client):
    x = da.random.random((20_000, 256), chunks=(1_000, 256)).astype(np.float32)  # 20 MB made on the workers
    payload = x.nbytes * 2  # rows there, outputs back
    with ddb.Batcher(client, ddb.ModelSpec("coll-traffic", load=build_affine)) as batcher:
        predictions = batcher.predict(x)  # one row runs from here to learn the outputs
        counted, undo = _count_comm_bytes()
        try:
            total = predictions.sum().compute()
        finally:
            undo()
    assert total == pytest.approx(float((2 * x + 1).sum().compute()), rel=1e-4)
    assert counted["bytes"] < 0.1 * payload, (counted["bytes"], payload)


def test_a_worker_killed_while_computing(client):
    x = da.arange(40_000, chunks=1_000).astype(np.float64)[:, None] * np.ones((1, 4))
    with ddb.Batcher(client, ddb.ModelSpec("coll-kill", load=build_affine, max_batch_size=256)) as batcher:
        predictions = batcher.predict(x)
        future = client.compute(predictions)
        workers = sorted(worker_addresses(client))
        victim = client.run(os.getpid, workers=[workers[0]])[workers[0]]

        def kill_when_started():
            while not any(ts for ts in client.processing().values()):
                threading.Event().wait(0.01)
            os.kill(victim, 9)

        killer = threading.Thread(target=kill_when_started)
        killer.start()
        got = future.result(timeout=WAIT)
        killer.join()
    np.testing.assert_allclose(got, 2 * x.compute() + 1)
    client.wait_for_workers(2, timeout=WAIT)


@pytest.mark.timeout(120)
def test_one_thread_and_a_small_budget_do_not_deadlock():
    """Tasks wait for room holding their thread; the rows in flight free it before rejoining."""
    with dask.config.set({"dynbatch.collections.bytes-in-flight": 4096}):
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            client.register_plugin(ddb.DynBatchPlugin())
            with ddb.Batcher(client, ddb.ModelSpec("coll-small-budget", load=build_affine)) as batcher:
                x = da.ones((3_000, 8), chunks=(100, 8))  # 6,400 bytes a block: one block in flight at a time
                assert float(batcher.predict(x).sum().compute()) == 3_000 * 8 * 3.0


def test_closing_the_cluster_after_predict_logs_no_critical_error():
    """The workers' own clients (their tasks' Batchers listen to the scheduler's dynbatch events)
    close with their workers; events published meanwhile (a worker removed, a model unloaded) go
    to the clients still connected only, instead of making the scheduler log a CRITICAL error."""
    import logging

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep(logging.CRITICAL)
    scheduler_log = logging.getLogger("distributed.scheduler")
    scheduler_log.addHandler(keep)
    try:
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            client.register_plugin(ddb.DynBatchPlugin())
            with ddb.Batcher(client, ddb.ModelSpec("coll-close", load=build_affine)) as batcher:
                x = da.ones((2_000, 4), chunks=(500, 4))
                assert float(batcher.predict(x).sum().compute()) == 2_000 * 4 * 3.0
    finally:
        scheduler_log.removeHandler(keep)
    assert [r.getMessage()[:200] for r in records] == []


def test_predict_refuses_other_collections(client):
    with ddb.Batcher(client, ddb.ModelSpec("coll-affine-other", load=build_affine)) as batcher:
        with pytest.raises(TypeError, match="dask Array, Bag, DataFrame or Series"):
            batcher.predict(dask.delayed(np.ones)(3))


def square(x):
    return x * x


def crop_rows(x):
    """A list of 0, 1 or 2 pieces of a row (a fan-out of any size)."""
    return [x[:2] for _ in range(int(x[0]) % 3)]


def total(pieces):
    return float(sum(float(p.sum()) for p in pieces))


def test_pipeline_over_collections(client):
    affine = ddb.Batcher(client, ddb.ModelSpec("coll-pipe-affine", load=build_affine))
    halves = ddb.Batcher(client, ddb.ModelSpec("coll-pipe-halves", load=build_affine))
    try:
        data = np.arange(400 * 3, dtype=np.float64).reshape(400, 3)
        pipe = ddb.Pipeline(client, [ddb.cpu(square), ddb.model(affine)])
        got = pipe.predict(da.from_array(data, chunks=(64, 3))).compute()
        np.testing.assert_allclose(got, 2 * data * data + 1)
        # a fan-out of any size per row, each element through a model, then a CPU step over the list
        fanned = ddb.Pipeline(client, [ddb.cpu(crop_rows), ddb.fan_out(ddb.model(halves)), ddb.cpu(total)])
        rows = [np.array([float(i), 1.0, 2.0]) for i in range(60)]
        out = fanned.predict(db.from_sequence(rows, npartitions=4)).compute()
        assert out == [float((int(r[0]) % 3) * (2 * r[:2] + 1).sum()) for r in rows]
        with pytest.raises(TypeError, match="dask Array, Bag, DataFrame or Series"):
            pipe.predict([np.ones(3)])
    finally:
        affine.close()
        halves.close()


def test_a_task_logs_at_most_a_hundred_failed_rows_and_counts_them_all(client):
    from dask_dynbatch.client.dask_collections import ROW_ERRORS, ROW_ERRORS_PER_EVENT, log_row_errors

    failed = [{"row": f"row {i} of the array", "error": "ValueError('x')"} for i in range(150)]
    client.submit(log_row_errors, "model 'coll-many-errors'", failed, pure=False).result()
    with ddb.Batcher(client, ddb.ModelSpec("coll-many-errors", load=build_affine)) as batcher:
        rows = batcher.row_errors()
    assert len(rows) == ROW_ERRORS_PER_EVENT == 100 and rows[-1]["row"] == "row 99 of the array"
    (msg,) = [m for _, m in client.get_events(ROW_ERRORS) if m["source"] == "model 'coll-many-errors'"]
    assert msg["failed"] == 150



@pytest.mark.timeout(120)
def test_tasks_queue_only_what_the_servers_take_next(gate):
    """With the device held (a gated model), a long array's tasks stop sending once the worker's
    Batcher holds what the servers take next (its shipment size times ``max_inflight``): a few
    tasks in flight, not every block's (each seceded task waits in a thread of its own)."""
    from dask_dynbatch.client import dask_collections

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        spec = ddb.ModelSpec("coll-gated", load=build_gated, max_batch_size=8, initial_batch_size=8, max_inflight=1)
        with ddb.Batcher(client, spec) as batcher:
            gate.set()  # the first row runs from the client, for the output's shape
            lazy = batcher.predict(da.ones((640, 4), chunks=(4, 4)))  # 160 blocks of 4 rows
            gate.clear()
            future = client.compute(lazy.sum())
            (worker,) = cluster.workers.values()
            fed = None
            deadline = time.monotonic() + WAIT
            while fed is None or not (len(fed._queue) and any(s.inflight for s in fed._dispatcher.slots.values())):
                # until a shipment is held at the gate and rows queue behind it
                assert time.monotonic() < deadline, "no shipment reached the gated model"
                time.sleep(0.05)
                fed = next((b for (_, name), b in dask_collections._batchers.items() if name == "coll-gated"), None)
            time.sleep(1.0)  # room for more tasks to send, were they not held back
            ahead = fed._dispatcher.rows_ahead()
            assert 1 <= ahead <= 8  # one shipment in flight, of at most max_batch_size rows
            # what the servers take next, and a block or two whose task checked the queue before the
            # previous task's rows were in it
            assert len(fed._queue) < ahead + 3 * 4, (len(fed._queue), ahead)
            assert len(worker.state.long_running) <= 8, len(worker.state.long_running)  # of 160 blocks
            gate.set()
            assert float(future.result(timeout=WAIT)) == 640 * 4 * 3.0


def test_a_task_waits_for_the_queue_to_run_short_until_its_deadline():
    """``Batcher._wait_for_backlog_room``: it returns once the queue holds fewer rows than the
    workers take next, when no worker is known, when the Batcher closes, and at the deadline."""
    from types import SimpleNamespace

    from dask_dynbatch.client.batcher import Batcher

    room = threading.Condition()
    fake = SimpleNamespace(_ledger=SimpleNamespace(room=room), _queue=[0] * 10, _closed=False,
                           _dispatcher=SimpleNamespace(rows_ahead=lambda: 8))
    started = time.monotonic()
    Batcher._wait_for_backlog_room(fake, deadline=started + 0.2)  # 10 queued, 8 taken next: until the deadline
    assert time.monotonic() - started >= 0.2
    fake._dispatcher.rows_ahead = lambda: 0  # no worker known: nothing to pace by
    Batcher._wait_for_backlog_room(fake)
    fake._dispatcher.rows_ahead = lambda: 8

    def drain():
        with room:
            fake._queue = [0] * 7
            room.notify_all()

    timer = threading.Timer(0.1, drain)
    timer.start()
    Batcher._wait_for_backlog_room(fake)  # no deadline: returns when the queue ran short
    assert len(fake._queue) == 7
    timer.join()
    fake._queue, fake._closed = [0] * 10, True
    Batcher._wait_for_backlog_room(fake)  # closed: nothing waits for it
