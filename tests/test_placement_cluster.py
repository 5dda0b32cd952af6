"""Placement on a real cluster: heterogeneous workers get work in proportion to their speed."""

from __future__ import annotations

import asyncio

import numpy as np
from distributed.utils_test import gen_cluster

import dask_dynbatch as ddb
from dask_dynbatch.examples import timed_model

# seconds per sample; the model sleeps (releasing the GIL) so that speeds do not depend on how
# busy this machine's cores are
SECONDS_PER_SAMPLE = {0: 0.0003, 1: 0.0009}  # by worker name: gen_cluster names them 0, 1


@gen_cluster(
    client=True,
    nthreads=[("127.0.0.1", 1), ("127.0.0.1", 1)],
    timeout=120,
)
async def test_shares_follow_throughput(c, s, fast, slow):
    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec("timed", load=timed_model(SECONDS_PER_SAMPLE), latency_target="200ms", max_batch_size=128))
    await asyncio.gather(*batcher.map([np.zeros(1)] * 200))  # warm up: both workers measured
    workers = {fast.address: fast, slow.address: slow}

    def worker_totals():  # what each worker's model server says: rows run, seconds in the model
        stats = {a: next(iter(w.extensions["dynbatch"].servers.values())).stats for a, w in workers.items()}
        return {a: (st.rows, st.compute_seconds) for a, st in stats.items()}

    before = worker_totals()
    xs = [np.full(1, float(i)) for i in range(10_000)]
    results = await asyncio.gather(*batcher.map(xs))
    assert np.array_equal(np.concatenate(results), np.arange(10_000, dtype=float))
    after = worker_totals()
    served = {a: after[a][0] - before[a][0] for a in workers}
    # each worker's throughput at the batch sizes it ran: samples / seconds in the model
    rates = {a: served[a] / (after[a][1] - before[a][1]) for a in workers}
    share_fast = served[fast.address] / 10_000
    throughput_share_fast = rates[fast.address] / sum(rates.values())
    # each worker's share of the work follows its throughput share (within 15 %) ...
    assert abs(share_fast - throughput_share_fast) <= 0.15 * throughput_share_fast, (served, rates)
    # ... and the 3x faster model shows: the fast worker is faster and served more
    assert rates[fast.address] > 1.5 * rates[slow.address]
    assert served[fast.address] > served[slow.address]
    batcher.close()


def build_identity(device="cpu"):
    return lambda batch: batch


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1), ("127.0.0.1", 1)], timeout=120)
async def test_worker_with_memory_nearly_full_gets_less_work(c, s, a, b):
    """Two workers of equal speed; b's device memory is 98 % used (a fake memory source): its model
    server says so in its advice, and placement gives b a smaller share of work that both could
    take at once (a backlog larger than both can hold keeps both busy)."""
    from dask_dynbatch.core.memory import FakeMemory, MemorySizer

    await c.register_plugin(ddb.DynBatchPlugin())
    total = 16 * 2**30
    b.extensions["dynbatch"].sizers["cpu"] = MemorySizer(FakeMemory(total=total, free=total // 50), safety_margin=0.0)
    batcher = await ddb.Batcher(c, ddb.ModelSpec("timed", load=timed_model({0: 0.0005, 1: 0.0005}),
                                                 max_batch_size=32))
    await asyncio.gather(*batcher.map([np.zeros(1)] * 200))  # both workers measured
    assert batcher.stats()["workers"][b.address]["controller"]["memory_used"] > 0.97

    def rows(worker):
        return next(iter(worker.extensions["dynbatch"].servers.values())).stats.rows

    before = {w.address: rows(w) for w in (a, b)}
    for _ in range(30):
        await asyncio.gather(*batcher.map([np.zeros(1)] * 40))
    served = {w.address: rows(w) - before[w.address] for w in (a, b)}
    assert served[b.address] < served[a.address] / 2, served
    batcher.close()
