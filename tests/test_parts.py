"""Replies in parts: a model server of padded samples runs a shipment's rows over several device
batches, and each request's result goes back as its batch finishes, not once the shipment's last
row ran."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import dask
import numpy as np
import pytest
from distributed import Client, LocalCluster
from distributed.utils_test import gen_cluster
from models import Deliveries, build_gated_encoder, build_slow_encoder

import dask_dynbatch as ddb
from dask_dynbatch.protocol import COLLECT, PartsLost, exception_from
from dask_dynbatch.worker.plugin import PARTS_TTL, _Parts


def _sample(ids: np.ndarray) -> dict:
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def _expected(ids: np.ndarray) -> np.ndarray:
    return ids[:, None] * np.arange(1.0, 4.0) + 1.0


async def _rows_before_the_gated_one(c, a, gate, name: str) -> tuple[ddb.Batcher, list, list[np.ndarray]]:
    """A padded Batcher that has learnt its server forms batches by cost (so that it asks for
    parts), and one shipment of six rows in batches of at most two: five short rows, then a long
    one whose batch waits for ``gate``."""
    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec(name, load=build_gated_encoder, pad_value=0, max_batch_size=2))
    await asyncio.gather(*batcher.map([_sample(np.arange(1, 5)) for _ in range(4)]))
    (slot,) = batcher._dispatcher.slots.values()
    assert slot.advice.ship is not None  # (what makes the client ask for parts)
    ids = [np.arange(1, 5) + 10 * i for i in range(5)] + [np.r_[999, np.arange(1, 12)]]
    return batcher, batcher.map([_sample(i) for i in ids]), ids


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)], timeout=60)
async def test_rows_come_back_as_their_batches_finish(c, s, a, gate):
    batcher, futures, ids = await _rows_before_the_gated_one(c, a, gate, "parts")
    # the first four rows ran in batches of their own: their results come while the long row's
    # batch still waits (answered only at the shipment's end, they would wait for the gate)
    first = await asyncio.wait_for(asyncio.gather(*futures[:4]), 30)
    assert not futures[5].done()
    assert batcher.stats()["answered_early"] >= 4
    gate.set()
    out = first + await asyncio.gather(*futures[4:])
    for got, i in zip(out, ids):
        np.testing.assert_allclose(got["last_hidden_state"], _expected(i))
        np.testing.assert_allclose(got["pooler_output"], _expected(i).sum(axis=0))
    stats = batcher.stats()
    assert stats["delivered"] == 10 and stats["failed"] == 0 and stats.get("requeued", 0) == 0
    assert sum(w["samples"] for w in stats["workers"].values()) == 10  # every row ran once
    plugin = a.extensions["dynbatch"]
    assert plugin.parts == {} and plugin.watchdog.active_runs == 0  # the last part was collected
    # the dashboard page and /metrics count them too, once the Batcher has reported
    deadline = time.monotonic() + 30
    while (early := _shown(s, "parts").get("answered_early", 0)) != stats["answered_early"]:
        assert time.monotonic() < deadline, f"the scheduler shows {early} answered early"
        await asyncio.sleep(0.05)
    batcher.close()


def _shown(scheduler, model: str) -> dict:
    """What the scheduler shows of ``model`` (the dashboard page's and /metrics' source)."""
    from dask_dynbatch.scheduler.summary import model_summaries

    return model_summaries(scheduler.extensions["dynbatch"].state()).get(model, {})


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)], timeout=60)
async def test_parts_through_shared_memory_replies(c, s, a, gate):
    with dask.config.set({"dynbatch.transport.shared-memory-replies": True,
                          "dynbatch.transport.shared-memory-min-bytes": 1}):
        batcher, futures, ids = await _rows_before_the_gated_one(c, a, gate, "parts-shm")
        written = a.extensions["dynbatch"].replies.summary()["reply_files"]
        await asyncio.wait_for(asyncio.gather(*futures[:4]), 30)
        gate.set()
        out = await asyncio.gather(*futures)
    for got, i in zip(out, ids):
        np.testing.assert_allclose(got["last_hidden_state"], _expected(i))
    (worker,) = batcher.stats()["workers"].values()
    assert worker["replies"] == "shared-memory" and batcher.stats()["answered_early"] >= 4
    assert a.extensions["dynbatch"].replies.summary()["reply_files"] >= written + 2  # a part, and the rest
    batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)], timeout=60)
async def test_rows_of_a_shipment_the_worker_dropped_are_sent_again(c, s, a, gate):
    await c.register_plugin(ddb.DynBatchPlugin())
    asked = asyncio.Event()
    release = asyncio.Event()
    batcher = await ddb.Batcher(c, ddb.ModelSpec("parts-lost", load=build_gated_encoder, pad_value=0,
                                                 max_batch_size=2))
    transport = batcher._dispatcher.transport
    collect = transport._collect

    async def held(*args, **kwargs):  # the client's next call for a part waits until the test says
        asked.set()
        await release.wait()
        return await collect(*args, **kwargs)

    await asyncio.gather(*batcher.map([_sample(np.arange(1, 5)) for _ in range(4)]))
    transport._collect = held
    ids = [np.arange(1, 5) + 10 * i for i in range(5)] + [np.r_[999, np.arange(1, 12)]]
    futures = batcher.map([_sample(i) for i in ids])
    await asyncio.wait_for(asked.wait(), 30)  # a first part came; the call for the next waits
    plugin = a.extensions["dynbatch"]
    (token,) = plugin.parts
    # as if the worker had dropped it: that call learns so (PartsLost) and the client sends the rows
    # without results again; the old shipment runs on here, unclaimed
    del plugin.parts[token]
    plugin.watchdog.active_runs -= 1
    answered = batcher.stats()["answered_early"]
    assert 1 <= answered < 6
    gate.set()
    release.set()
    out = await asyncio.wait_for(asyncio.gather(*futures), 30)
    for got, i in zip(out, ids):
        np.testing.assert_allclose(got["last_hidden_state"], _expected(i))
    stats = batcher.stats()
    assert stats["delivered"] == 10 and stats["failed"] == 0 and stats["requeued"] == 6 - answered
    batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_a_call_for_a_part_the_worker_does_not_hold_is_answered_parts_lost(c, s, a):
    await c.register_plugin(ddb.DynBatchPlugin())
    plugin = a.extensions["dynbatch"]

    async def collect(token: str, client: str) -> PartsLost:
        error = exception_from(await a.handlers[COLLECT](token=token, client=client))
        assert isinstance(error, PartsLost) and error.token == token and a.address in str(error)
        return error

    assert not (await collect(f"{plugin._part_prefix}12345", c.id)).restarted  # dropped, or never given
    # a token of an earlier process at this address: that one died with the shipment (its rows ran)
    assert (await collect("0123456789ab-1", c.id)).restarted
    running = type("Running", (), {"done": asyncio.get_running_loop().create_future(), "client": "someone-else"})
    token = f"{plugin._part_prefix}7"
    plugin.parts[token] = _Parts(None, running, 0.0)  # type: ignore[arg-type]
    assert not (await collect(token, c.id)).restarted  # another client's shipment: not ours to collect
    del plugin.parts[token]


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_a_shipment_whose_client_never_collects_is_dropped(c, s, a):
    await c.register_plugin(ddb.DynBatchPlugin())
    plugin = a.extensions["dynbatch"]

    class Done:  # a shipment whose rows all ran
        done = asyncio.get_running_loop().create_future()

    Done.done.set_result(None)
    running = type("Running", (), {"done": asyncio.get_running_loop().create_future()})
    plugin.parts.update({"t-1": _Parts(None, Done, 0.0), "t-2": _Parts(None, running, 0.0)})  # type: ignore[arg-type]
    plugin.watchdog.active_runs += 2
    now = time.monotonic()
    plugin._expire_parts(now + PARTS_TTL / 2)
    assert set(plugin.parts) == {"t-1", "t-2"}  # not yet
    plugin._expire_parts(now + PARTS_TTL + 1)
    assert set(plugin.parts) == {"t-2"}  # still running: its client may yet come
    assert plugin.watchdog.active_runs == 1
    del plugin.parts["t-2"]
    plugin.watchdog.active_runs -= 1


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)], timeout=60)
async def test_replies_in_parts_can_be_switched_off(c, s, a, gate):
    with dask.config.set({"dynbatch.transport.replies-in-parts": False}):
        batcher, futures, ids = await _rows_before_the_gated_one(c, a, gate, "parts-off")
    gate.set()
    out = await asyncio.wait_for(asyncio.gather(*futures), 30)
    for got, i in zip(out, ids):
        np.testing.assert_allclose(got["last_hidden_state"], _expected(i))
    assert batcher.stats()["answered_early"] == 0  # every shipment answered once its last row ran
    batcher.close()


@pytest.mark.slow
def test_a_worker_killed_while_its_replies_come_in_parts_loses_no_request():
    """SIGKILL one of two worker processes while padded requests come back in parts: the rows
    without results run again elsewhere, each request resolved exactly once."""
    rng = np.random.default_rng(0)
    ids = [rng.integers(1, 50, int(n)) for n in rng.integers(4, 40, 3_000)]
    with dask.config.set({"dynbatch.benchmark.on-start": False}), LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        batcher = ddb.Batcher(client, ddb.ModelSpec("parts-kill", load=build_slow_encoder, pad_value=0))
        [f.result(timeout=60) for f in batcher.map([_sample(i) for i in ids[:200]])]  # loaded on both, advice known
        pids = client.run(os.getpid)
        victim = sorted(pids)[0]
        deliveries = Deliveries(at=500, then=lambda: os.kill(pids[victim], signal.SIGKILL))
        futures = deliveries.watch(batcher.map([_sample(i) for i in ids]))
        out = [f.result(timeout=120) for f in futures]
        assert deliveries.fired.is_set()
        for got, i in zip(out, ids):
            np.testing.assert_allclose(got["last_hidden_state"], _expected(i))
        assert len(deliveries.counts) == len(ids) and deliveries.exactly_once()
        stats = batcher.stats()
        assert stats["delivered"] == len(ids) + 200 and stats["failed"] == 0 and stats["answered_early"] > 0
        assert stats["requeued"] > 0  # the kill did hit shipments in flight: their rows ran elsewhere
        batcher.close()


HANG = 777  # a request whose first token is this makes the model hang


def build_fragile_encoder(device="cpu"):
    """A dict model of padded token ids that hangs on a request whose first token is HANG."""

    def model(input_ids, attention_mask):
        if (input_ids[:, 0] == HANG).any():
            time.sleep(120)
        return {"last_hidden_state": input_ids[..., None] * np.arange(1.0, 4.0) + attention_mask[..., None]}

    return model


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_stuck_batch_in_a_shipment_answered_in_parts_fails_its_culprit_alone():
    """One worker; the watchdog declares the batch that hangs stuck and restarts the worker: rows
    answered in parts before it stay delivered, the stuck batch's rows are retried in halves until
    the one that hangs is alone and fails, every other request is delivered exactly once."""
    with dask.config.set({"dynbatch.benchmark.on-start": False}), LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        client.register_plugin(ddb.DynBatchPlugin())
        spec = ddb.ModelSpec("parts-fragile", load=build_fragile_encoder, pad_value=0, max_batch_size=4,
                             latency_target="10s", execution_timeout="1s")
        batcher = ddb.Batcher(client, spec)
        [f.result(timeout=60) for f in batcher.map([_sample(np.arange(1, 5)) for _ in range(8)])]
        ids = [np.arange(1, 5) + 10 * i for i in range(20)] + [np.r_[HANG, np.arange(1, 12)]]
        deliveries = Deliveries()
        futures = deliveries.watch(batcher.map([_sample(i) for i in ids]))
        with pytest.raises(ddb.ExecutionTimeoutError, match="the last time alone in its batch"):
            futures[-1].result(timeout=150)
        out = [f.result(timeout=60) for f in futures[:-1]]
        for got, i in zip(out, ids):
            np.testing.assert_allclose(got["last_hidden_state"], _expected(i))
        assert len(deliveries.counts) == len(ids) and deliveries.exactly_once()
        stats = batcher.stats()
        assert stats["delivered"] == 8 + 20 and stats["failed"] == stats["quarantined"] == 1
        assert stats["answered_early"] > 0 and stats["stuck"] > 0
        batcher.close()
