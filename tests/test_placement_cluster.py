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

    def worker_totals():  # what each worker's own stats say: samples run, seconds in the model
        return {a: (w.extensions["dynbatch"].stats["timed"].samples, w.extensions["dynbatch"].stats["timed"].compute_seconds)
                for a, w in workers.items()}

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
    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec("ident", load=build_identity, max_batch_size=64))
    await asyncio.gather(*batcher.map([np.zeros(1)] * 200))
    # worker b's telemetry says its device memory is 98 % used
    batcher._slots[b.address].view = dict(batcher._slots[b.address].view, dynbatch={"devices": {"cpu": {"used_fraction": 0.98}}})
    loads = {s.address: batcher._load(s, 1000.0) for s in batcher._slots.values()}
    from dask_dynbatch.placement import plan, workload

    assert workload(loads[b.address]) > workload(loads[a.address])
    # with a backlog that both could share, the full worker's share is smaller
    shares = {}
    for address, size in plan(100, list(loads.values())):
        shares[address] = shares.get(address, 0) + size
    assert shares.get(b.address, 0) < shares.get(a.address, 0)
    batcher.close()
