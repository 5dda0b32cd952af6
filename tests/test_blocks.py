"""Blocks: ``Batcher.predict`` of an array queues blocks of rows, one request and one future each.

Pure rules first (the queue cuts a block where a shipment is full, a block resolves once every row
is in, a reply's rows are found in the requests that hold them), then in-process clusters (blocks
cut between shipments and workers, mixed with single requests, timed out, cancelled by a close)
and one multi-process cluster whose worker is killed mid-block.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections import deque
from concurrent.futures import CancelledError

import dask
import numpy as np
import pytest
from distributed import Client, LocalCluster
from distributed.utils_test import gen_cluster
from models import build_gated

import dask_dynbatch as ddb
from dask_dynbatch.client.bulk import BLOCK_ROWS
from dask_dynbatch.core.blocks import Block, BlockPart, ShipmentRows, count_rows, join_outputs
from dask_dynbatch.core.quarantine import Quarantine
from dask_dynbatch.core.requests import Request, RequestFuture, RequestQueue
from dask_dynbatch.core.rows import join_in_chunks
from dask_dynbatch.examples import build_affine

WAIT = 60  # seconds any single result may take before the test counts it as a hang


def build_slow_affine(device="cpu"):
    """Affine, and a few milliseconds per batch: a run of many batches lasts long enough to kill a
    worker in the middle of it."""

    def model(batch):
        time.sleep(0.004)
        return batch * 2 + 1

    return model


def block(rows: int, width: int = 2, start: float = 0.0, **kwargs) -> BlockPart:
    data = np.arange(start, start + rows * width, dtype=np.float64).reshape(rows, width)
    return BlockPart(Block(rows), data, **kwargs)


def single(value: float = 0.0, **kwargs) -> Request:
    return Request(np.full(2, value), RequestFuture(), **kwargs)


# -- the queue ----------------------------------------------------------------------------------


def test_the_queue_counts_rows_and_cuts_a_block_where_a_shipment_is_full():
    queue = RequestQueue()
    first, second, row = block(10), block(3), single()
    rows = first.sample
    assert queue.push([first, second, row]) == 14  # rows, not requests
    taken, expired = queue.pop(4, now=0.0)
    assert expired == [] and [r.rows for r in taken] == [4] and len(queue) == 10
    head = taken[0]
    assert head.block is first.block and head.offset == 0 and head.sample.tolist() == rows[:4].tolist()
    assert first.offset == 4 and first.rows == 6  # the rest keeps its place
    assert first.future.running() and not first.future.cancel()  # a block that started runs to its end
    taken, _ = queue.pop(8, now=0.0)  # the rest of the first block, then a cut of the second
    assert [(r.block is first.block, r.offset, r.rows) for r in taken] == [(True, 4, 6), (False, 0, 2)]
    taken, _ = queue.pop(100, now=0.0)
    assert [r.rows for r in taken] == [1, 1] and taken[1] is row and len(queue) == 0
    assert count_rows([head, *taken]) == (6, True) and count_rows([row, single()]) == (2, False)


def test_priorities_and_deadlines_hold_for_blocks():
    queue = RequestQueue()
    low, urgent, late = block(6), single(priority=5), block(4, deadline=1.0)
    queue.push([late, low, urgent])
    taken, expired = queue.pop(3, now=2.0)  # the urgent row first; the late block expires whole
    assert taken[0] is urgent and [(r.block is low.block, r.rows) for r in taken[1:]] == [(True, 2)]
    assert expired == [late] and len(queue) == 4
    assert queue.expire(now=3.0) == [] and len(queue) == 4


def test_a_queued_block_cancels_whole_and_counts_its_rows():
    queue = RequestQueue()
    part = block(7)
    queue.push([part, single()])
    assert part.future.cancel()
    assert len(queue) == 1 and queue.cancelled == 7
    taken, _ = queue.pop(10, now=0.0)
    assert [r.rows for r in taken] == [1]


def test_a_block_part_is_one_suspect_in_the_quarantine():
    q = Quarantine()
    parts = [block(100), block(50), single()]
    assert q.lost(parts) == [] and len(q) == 151  # rows
    groups = [q.pop(), q.pop()]
    assert [len(g) for g in groups] == [2, 1]  # halves by requests: a part is not cut into rows
    assert q.lost(groups[0]) == [] and [q.pop(), q.pop()] == [[parts[0]], [parts[1]]]  # died again: alone next
    assert q.lost([parts[0]]) == [parts[0]]  # died alone, having died before: the part fails as a unit


# -- a block's rows coming back -----------------------------------------------------------------


def test_a_block_resolves_once_every_row_is_in_in_row_order():
    b = Block(5)
    assert not b.put(3, 2, np.array([[3.0], [4.0]]))
    assert b.put(0, 3, np.array([[0.0], [1.0], [2.0]]))  # the last rows: complete
    result = b.join()
    assert result.ravel().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    b.future.set_result(result)
    assert not b.put(0, 1, np.zeros((1, 1)))  # resolved: late rows are dropped
    twice = Block(2)
    twice.put(0, 1, np.zeros((1, 1)))
    twice.put(0, 1, np.zeros((1, 1)))
    with pytest.raises(RuntimeError, match="came back"):  # never a wrong result
        twice.join()


def test_outputs_join_into_one_array_or_per_row_results():
    arrays = [np.zeros((2, 3)), np.ones((1, 3))]
    assert join_outputs(arrays, [2, 1]).shape == (3, 3)
    tuples = join_outputs([(np.zeros((2, 1)), np.ones(2))], [2])
    assert len(tuples) == 2 and isinstance(tuples[0], tuple)
    assert len(join_outputs([np.zeros((1, 2)), np.zeros((1, 3))], [1, 1])) == 2  # shapes differ: per row


def test_shipment_rows_find_the_requests_that_hold_reply_rows():
    row0, part, row6 = single(0.0), block(5, start=10.0), single(6.0)
    part.offset = 20  # rows 20:25 of its block
    layout = ShipmentRows([row0, part, row6])
    assert layout.rows == 7 and layout.first_rows() == [0, 1, 6]
    assert layout.spans([0, 1, 2, 4, 5, 6]) == [(0, 0, 1, 0), (1, 0, 2, 1), (1, 3, 5, 3), (2, 0, 1, 5)]
    whole, cut = layout.requests_at([1, 2, 3, 4, 5]), layout.requests_at([3, 4])
    assert whole == [part]
    assert cut[0].block is part.block and (cut[0].offset, cut[0].rows) == (22, 2)
    assert cut[0].sample.tolist() == part.sample[2:4].tolist()
    pieces = layout.pieces([4, 5, 6], np.arange(3.0)[:, None])
    assert [(r is part, a, b, o.ravel().tolist()) for r, a, b, o in pieces] == [(True, 3, 5, [0.0, 1.0]),
                                                                                (False, 0, 1, [2.0])]


def test_a_reply_with_some_rows_of_a_part_run_stuck_and_unrun_delivers_each_row_once():
    """The dispatcher's side of a reply (no cluster): of a part of 10 rows, 5 came back, 2 were in
    a stuck device batch and 3 did not run. Each range goes its way; the block resolves once all
    ten are in, in order."""
    from types import SimpleNamespace

    from dask_dynbatch.client.dispatcher import Dispatcher, WorkerSlot
    from dask_dynbatch.client.ledger import Ledger
    from dask_dynbatch.client.registration import RegisteredModel
    from dask_dynbatch.client.transport import Delivery
    from dask_dynbatch.protocol import Advice, ShipmentReply, WorkerView

    queue, ledger = RequestQueue(), Ledger()
    client = SimpleNamespace(loop=SimpleNamespace(asyncio_loop=None))
    dispatcher = Dispatcher(client, RegisteredModel(ddb.ModelSpec("m", load=build_affine)), queue, ledger,
                            transport=None, history=deque(), report=dict)
    slot = WorkerSlot(WorkerView("tcp://w", "w", "cpu", 1, {}), 8, None)
    row, part = single(1.0), block(10)
    rows = part.sample
    row.future.set_running_or_notify_cancel()
    part.future.set_running_or_notify_cancel()
    layout = ShipmentRows([row, part])
    outputs = 2 * np.concatenate([row.sample[None], part.sample[:5]]) + 1
    reply = ShipmentReply(pieces=[([0, 1, 2, 3, 4, 5], outputs)], errors=[], batches=[],
                          advice=Advice(size=8).to_msg(), version=0, device="cpu", stuck=[6, 7], unrun=[8, 9, 10],
                          stuck_limit=5.0)
    dispatcher._deliver_rows(slot, layout, Delivery(reply, reply.pieces, [], 0.0, 0.0, 0.0, False), False)
    assert row.future.result().tolist() == [3.0, 3.0] and not part.future.done()
    suspects = dispatcher.quarantine.pop()
    again, _ = queue.pop(100, now=0.0)
    assert [(p.offset, p.rows, p.attempts) for p in suspects] == [(5, 2, 1)]  # retried alone
    assert [(p.offset, p.rows, p.attempts) for p in again] == [(7, 3, 0)]  # sent again, no attempt used
    assert [ledger.deliver_rows(p, 0, p.rows, 2 * p.sample + 1) for p in [*again, *suspects]] == [0, 10]
    np.testing.assert_array_equal(part.future.result(), 2 * rows + 1)
    counts = ledger.counts()
    assert counts["delivered"] == 1 and counts["stuck"] == 2 and counts["requeued"] == 2 + 3


def test_blocks_join_into_chunks_as_views_where_a_chunk_lies_in_one_block():
    blocks = [np.arange(10.0).reshape(5, 2), np.arange(10.0, 16.0).reshape(3, 2)]
    whole = join_in_chunks(blocks, 1 << 20)
    assert isinstance(whole, np.ndarray) and whole.ravel().tolist() == list(np.arange(16.0))
    chunks = join_in_chunks(blocks, 3 * 16)  # 3 rows a chunk
    assert [len(c) for c in chunks] == [3, 3, 2]
    assert np.shares_memory(chunks[0], blocks[0]) and not np.shares_memory(chunks[1], blocks[0])
    assert np.concatenate(chunks).ravel().tolist() == list(np.arange(16.0))


# -- clusters -----------------------------------------------------------------------------------


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1), ("127.0.0.1", 1)])
async def test_blocks_cut_between_shipments_and_workers_deliver_each_row_once_in_order(c, s, a, b):
    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec("affine-blocks", load=build_affine, max_batch_size=300))
    x = np.arange((3 * BLOCK_ROWS + 77) * 3, dtype=np.float64).reshape(-1, 3)
    singles = batcher.map([np.full(3, -float(i)) for i in range(500)])  # single rows share the shipments
    y = await asyncio.wait_for(asyncio.to_thread(batcher.predict, x), WAIT)
    np.testing.assert_array_equal(y, 2 * x + 1)
    assert [(await f).tolist() for f in singles] == [[1.0 - 2 * i] * 3 for i in range(500)]
    stats = batcher.stats()
    assert stats["submitted"] == stats["delivered"] == len(x) + 500 and stats["failed"] == 0
    history = batcher.history()
    assert sum(h["size"] for h in history) == len(x) + 500  # every row shipped once
    assert {h["worker"] for h in history} == {a.address, b.address}
    assert max(h["size"] for h in history) < BLOCK_ROWS  # so every block was cut
    batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_a_shipment_of_single_rows_and_block_parts_keeps_each_row_its_own_result(c, s, a, gate):
    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec("gated-mixed", load=build_gated, max_batch_size=64,
                                                 initial_batch_size=64, max_inflight=1))
    first = batcher.submit(np.zeros(2))
    await _until(lambda: batcher.stats()["in_flight"] == 1)  # the worker holds it: the rest queue up
    before = batcher.map([np.full(2, float(i)) for i in range(10)])
    x = np.arange(200.0).reshape(100, 2)
    predicted = asyncio.ensure_future(asyncio.to_thread(batcher.predict, x))
    await _until(lambda: batcher.stats()["queued"] == 110)
    after = batcher.submit(np.full(2, 7.0), priority=1)  # ahead of everything queued
    gate.set()
    y = await asyncio.wait_for(predicted, WAIT)
    np.testing.assert_array_equal(y, 2 * x + 1)
    assert [(await f).tolist() for f in before] == [[2.0 * i + 1] * 2 for i in range(10)]
    assert (await after).tolist() == [15.0, 15.0] and (await first).tolist() == [1.0, 1.0]
    sizes = [h["size"] for h in batcher.history()]
    # the urgent row, the 10 single rows and the first rows of the block shared the second shipment
    assert sizes[0] == 1 and sizes[1] > 11 and sum(sizes) == 112
    batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_a_block_times_out_whole_and_a_close_cancels_queued_blocks(c, s, a, gate):
    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec("gated-blocks", load=build_gated, max_batch_size=8,
                                                 max_inflight=1))
    first = batcher.submit(np.zeros(2))
    await _until(lambda: batcher.stats()["in_flight"] == 1)
    with pytest.raises(ddb.RequestTimeoutError, match="before its batch started"):
        await asyncio.wait_for(asyncio.to_thread(batcher.predict, np.ones((50, 2)), timeout=0.3), WAIT)
    await _until(lambda: batcher.stats()["timed_out"] == 50)  # counted in rows
    waiting = asyncio.ensure_future(asyncio.to_thread(_outcome, batcher.predict, np.ones((2 * BLOCK_ROWS, 2))))
    await _until(lambda: batcher.stats()["queued"] == 2 * BLOCK_ROWS)
    batcher.close()  # queued blocks are cancelled; what was sent is delivered
    assert isinstance(await asyncio.wait_for(waiting, WAIT), CancelledError)
    gate.set()
    assert (await asyncio.wait_for(first, WAIT)).tolist() == [1.0, 1.0]
    stats = batcher.stats()
    assert stats["cancelled"] == 2 * BLOCK_ROWS and stats["queued"] == 0
    assert stats["delivered"] == 1 and stats["submitted"] == 1 + 50 + 2 * BLOCK_ROWS


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1), ("127.0.0.1", 1)])
async def test_a_worker_leaving_mid_block_hands_its_rows_back_and_they_run_elsewhere(c, s, a, b):
    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec("slow-affine-leave", load=build_slow_affine, max_batch_size=64))
    x = np.arange(3 * BLOCK_ROWS * 2, dtype=np.float64).reshape(-1, 2)
    predicted = asyncio.ensure_future(asyncio.to_thread(batcher.predict, x))
    await _until(lambda: batcher.stats()["delivered"] >= BLOCK_ROWS)
    assert batcher.stats()["workers"][a.address]["inflight_batches"] > 0
    await a.close()  # leaves with shipments of block parts in flight
    y = await asyncio.wait_for(predicted, WAIT)
    np.testing.assert_array_equal(y, 2 * x + 1)
    stats = batcher.stats()
    assert stats["delivered"] == len(x) and stats["failed"] == 0 and stats["requeued"] > 0
    batcher.close()


def _outcome(fn, *args):
    """What ``fn(*args)`` returned or raised (asyncio would turn a cancelled future's error into
    its own cancellation of the awaiting task)."""
    try:
        return fn(*args)
    except BaseException as exc:
        return exc


async def _until(predicate, timeout: float = WAIT) -> None:
    """Wait (on the event loop) until ``predicate()`` holds."""
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never became true")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_worker_killed_mid_block_its_rows_run_elsewhere_each_once():
    """SIGKILL one of two worker processes while parts of the same blocks run on both."""
    x = np.arange(40 * BLOCK_ROWS * 2, dtype=np.float64).reshape(-1, 2)
    # the start-up reference benchmark (placement only) would hold each new worker's device thread
    with dask.config.set({"dynbatch.benchmark.on-start": False}), LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        batcher = ddb.Batcher(client, ddb.ModelSpec("slow-affine-kill", load=build_slow_affine,
                                                    max_batch_size=256, latency_target="10s"))
        batcher.predict(x[:1000])  # both models loaded, the signature learned
        pids = client.run(os.getpid)
        victim = pids[sorted(pids)[0]]
        result: dict = {}
        run = threading.Thread(target=lambda: result.update(y=batcher.predict(x)))
        run.start()
        deadline = time.monotonic() + WAIT
        while batcher.stats()["delivered"] < 1000 + 2 * BLOCK_ROWS and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(victim, signal.SIGKILL)  # mid-run: shipments of block parts in flight on both workers
        run.join(WAIT)
        assert not run.is_alive()
        np.testing.assert_array_equal(result["y"], 2 * x + 1)  # every row its own value, none lost
        stats = batcher.stats()
        assert stats["delivered"] == stats["submitted"] == 1000 + len(x) and stats["failed"] == 0
        assert stats["requeued"] > 0  # the kill did hit shipments in flight: they ran elsewhere
        served = sum(h["size"] for h in batcher.history() if h["outcome"] == "served")
        assert served == 1000 + len(x)  # each row ran (and came back) once
        batcher.close()
