"""Memory sizing on real (in-process) workers, with an injectable memory source."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from distributed.utils_test import gen_cluster

import dask_dynbatch as ddb
from dask_dynbatch.core.memory import FakeMemory, MemorySizer
from dask_dynbatch.worker.model import LoadedModel

torch = pytest.importorskip("torch")

GiB = 2**30
OOM_ABOVE = 24


def build_oom_above(device="cpu"):
    """A model that runs out of 'device memory' on batches larger than OOM_ABOVE rows."""

    def model(batch):
        if len(batch) > OOM_ABOVE:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(batch)} rows")
        return batch + 1

    return model


def build_identity(device="cpu"):
    return lambda batch: batch


def server_of(worker, name: str):
    (server,) = [s for s in worker.extensions["dynbatch"].servers.values() if s.name == name]
    return server


def install_fake_memory(worker, total: int, free: int, **kw) -> FakeMemory:
    plugin = worker.extensions["dynbatch"]
    fake = FakeMemory(total=total, free=free)
    plugin.sizers["cpu"] = MemorySizer(fake, safety_margin=0.0, warmup_batches=0, **kw)
    return fake


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_oom_loses_no_request_and_batches_settle_below_the_failing_size(c, s, a):
    await c.register_plugin(ddb.DynBatchPlugin())
    install_fake_memory(a, total=16 * GiB, free=16 * GiB)
    batcher = await ddb.Batcher(c, ddb.ModelSpec("oom", load=build_oom_above, max_batch_size=128, initial_batch_size=100))
    xs = [np.full(3, float(i)) for i in range(3000)]
    results = await asyncio.gather(*batcher.map(xs))
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r, xs[i] + 1)
    stats = batcher.stats()
    assert stats["delivered"] == 3000 and stats["failed"] == 0
    plugin = a.extensions["dynbatch"]
    server = server_of(a, "oom")
    assert server.stats.ooms >= 1
    assert server.stats.rows == 3000  # no row ran twice successfully
    cap = plugin.sizers["cpu"].cap("oom")
    assert cap is not None and cap <= OOM_ABOVE
    batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_cap_follows_free_memory_and_reaches_the_batcher_as_an_event(c, s, a):
    await c.register_plugin(ddb.DynBatchPlugin())
    fake = install_fake_memory(a, total=16 * GiB, free=16 * GiB)
    # the "device" measures 1/8 GiB per sample at every batch (8 samples per GiB)
    original = LoadedModel.memory_peak
    LoadedModel.memory_peak = lambda self, baseline, batch, outputs: len(batch) * GiB // 8
    try:
        await _cap_follows_free_memory(c, a, fake)
    finally:
        LoadedModel.memory_peak = original


async def _cap_follows_free_memory(c, a, fake):
    batcher = await ddb.Batcher(c, ddb.ModelSpec("ident", load=build_identity, max_batch_size=1000))
    await batcher.submit(np.zeros(2))

    def advice():
        (worker,) = batcher.stats()["workers"].values()
        return worker["controller"]

    assert advice()["cap"] == 128  # 16 GiB free / (1/8 GiB per sample), from the reply
    # another process takes memory: the worker's poll pushes new advice, the batcher takes it
    fake.free = 2 * GiB
    while advice()["cap"] != 16:
        await asyncio.sleep(0.02)
    assert advice()["size"] <= 16
    # memory comes back: the cap grows again
    fake.free = 8 * GiB
    while advice()["cap"] != 64:
        await asyncio.sleep(0.02)
    results = await asyncio.gather(*batcher.map([np.full(2, float(i)) for i in range(500)]))
    assert len(results) == 500
    assert max(h["size"] for h in batcher.history()) <= 64
    batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_memory_budget_from_plugin_reaches_workers(c, s, a):
    await c.register_plugin(ddb.DynBatchPlugin(memory_budget=0.6))
    batcher = await ddb.Batcher(c, ddb.ModelSpec("ident", load=build_identity))
    await batcher.submit(np.zeros(2))
    plugin = a.extensions["dynbatch"]
    assert plugin.sizers["cpu"].budget == 0.6
    # the heartbeat carries device telemetry and every model server's state, cap included
    data = plugin.heartbeat()
    assert "cpu" in data["devices"]
    (server,) = data["servers"]
    assert server["name"] == "ident" and server["batches"] == 1
    batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)], timeout=60)
async def test_replanning_is_event_driven(c, s, a):
    """Each re-plan event wakes the batcher by itself: the periodic refresh is switched off here
    (an hour), so a test that passes saw every event act at once."""
    from distributed import Worker

    import dask_dynbatch.client.dispatcher as dispatcher

    periodic = dispatcher.REFRESH_INTERVAL
    dispatcher.REFRESH_INTERVAL = 3600.0
    try:
        await c.register_plugin(ddb.DynBatchPlugin())
        batcher = await ddb.Batcher(
            c, ddb.ModelSpec("ident", load=build_identity, max_batch_size=1, max_inflight=1)
        )
        # a request arriving at an idle batcher
        assert (await batcher.submit(np.ones(2))).tolist() == [1.0, 1.0]
        # a batch finishing: one batch of one at a time, each next one sent when the last returns
        results = await asyncio.gather(*batcher.map([np.full(2, float(i)) for i in range(5)]))
        assert [r[0] for r in results] == [0.0, 1.0, 2.0, 3.0, 4.0]
        # a worker joining, then leaving
        async with Worker(s.address, nthreads=1) as w:
            while w.address not in batcher.stats()["workers"]:
                await asyncio.sleep(0.01)
        while w.address in batcher.stats()["workers"] and batcher.stats()["workers"][w.address]["alive"]:
            await asyncio.sleep(0.01)
        # free memory changing: test_cap_follows_free_memory_and_reaches_the_batcher_as_an_event
        batcher.close()
    finally:
        dispatcher.REFRESH_INTERVAL = periodic
