"""One model server per worker, shared by every client and Batcher: identity, conflicts, replacement,
one load per worker, shared device batches (in-process clusters, and client processes where the
point is that they are separate processes)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time

import cloudpickle
import numpy as np
import pytest
from distributed import Client, LocalCluster
from distributed.utils_test import gen_cluster

import dask_dynbatch as ddb
from dask_dynbatch.core.formation import DeviceBatch, Part, PartQueue
from dask_dynbatch.scheduler.registry import ModelRegistry
from dask_dynbatch.spec import fingerprint

WAIT = 60
GATE = threading.Event()  # the gated models wait for it: holds the device busy on purpose
LOADS: list[str] = []  # every load of the counted models in this process (in-process workers)


def build_double(device="cpu"):
    return lambda batch: batch * 2


def build_negate(device="cpu"):
    return lambda batch: -batch


def build_gated_double(device="cpu"):
    def run(batch):
        if not GATE.wait(30):
            raise TimeoutError("test gate never opened")
        return batch * 2

    return run


def build_slow_counted(device="cpu"):
    LOADS.append("slow")
    time.sleep(0.5)  # a load that takes a while: shipments arriving meanwhile must wait for it
    return lambda batch: batch + 1


@pytest.fixture
def gate():
    GATE.clear()
    yield GATE
    GATE.set()


def servers(worker) -> list:
    return list(worker.extensions["dynbatch"].servers.values())


async def until(predicate, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition never became true")
        await asyncio.sleep(0.01)


# -- identity (pure) -------------------------------------------------------------------------------


def test_identity_follows_the_code_not_the_pickle():
    def make(scale):
        def load(device="cpu"):
            return lambda batch: batch * scale

        return load

    spec = ddb.ModelSpec("m", load=make(2))
    again = ddb.ModelSpec("m", load=cloudpickle.loads(cloudpickle.dumps(make(2))))  # by value, as from a notebook
    assert fingerprint(spec)[0] == fingerprint(again)[0]
    other_scale = ddb.ModelSpec("m", load=make(3))  # same code, another closure value
    assert fingerprint(spec)[0]["load"] != fingerprint(other_scale)[0]["load"]
    other_code = ddb.ModelSpec("m", load=build_negate)
    assert fingerprint(spec)[0]["load"] != fingerprint(other_code)[0]["load"]
    # each Batcher's own settings are not the model's identity; the server's settings are
    assert fingerprint(ddb.ModelSpec("m", load=make(2), max_delay="20ms"))[0] == fingerprint(spec)[0]
    tokens, words = fingerprint(ddb.ModelSpec("m", load=make(2), latency_target="20ms"))
    assert tokens["latency_target"] != fingerprint(spec)[0]["latency_target"] and words["latency_target"] == "0.02"


def test_registry_attaches_refuses_and_replaces():
    registry = ModelRegistry()
    a, words_a = fingerprint(ddb.ModelSpec("m", load=build_double))
    b, words_b = fingerprint(ddb.ModelSpec("m", load=build_negate))
    entry, attached = registry.register("m", b"a", a, words_a, client="c1")
    assert entry.version == 1 and not attached
    entry, attached = registry.register("m", b"a2", a, words_a, client="c2")
    assert entry.version == 1 and attached and entry.clients == {"c1", "c2"} and entry.payload == b"a"
    with pytest.raises(ddb.ModelConflictError) as info:
        registry.register("m", b"b", b, words_b, client="c3")
    assert info.value.differences == {"load": (words_a["load"], words_b["load"])}
    assert "build_double" in str(info.value) and "build_negate" in str(info.value) and "replace=True" in str(info.value)
    entry, attached = registry.register("m", b"b", b, words_b, client="c3", replace=True)
    assert entry.version == 2 and not attached and entry.clients == {"c1", "c2", "c3"}
    assert registry.remove_client("c1") == [] and registry.remove_client("c2") == []
    assert registry.remove_client("c3") == ["m"] and "m" not in registry.models


def test_device_batches_take_rows_by_priority_and_cut_parts():
    queue = PartQueue()
    low = Part("a", 0, np.arange(5), priority=0, arrived=1.0)
    high = Part("b", 0, np.arange(3), priority=2, arrived=2.0)
    queue.push([low, high])
    assert len(queue) == 8
    batch = DeviceBatch(queue.take(4), formed=3.0, proposed=4)
    assert [(p.owner, p.offset, len(p)) for p in batch.parts] == [("b", 0, 3), ("a", 0, 1)]
    assert batch.starts == [0, 3] and batch.rows == 4 and batch.full and batch.owners() == ["b", "a"]
    rest = queue.take(10)
    assert [(p.owner, p.offset, len(p)) for p in rest] == [("a", 1, 4)] and len(queue) == 0


# -- one cluster, several Batchers and clients -------------------------------------------------------


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1), ("127.0.0.1", 1)])
async def test_same_name_and_spec_attach_another_spec_is_a_conflict(c, s, a, b):
    await c.register_plugin(ddb.DynBatchPlugin())
    spec = ddb.ModelSpec("m", load=build_double)
    first = await ddb.Batcher(c, spec)
    second = await ddb.Batcher(c, ddb.ModelSpec("m", load=build_double, max_delay="1ms"))  # its own setting
    c2 = await Client(s.address, asynchronous=True)
    third = await ddb.Batcher.from_name(c2, "m")
    assert first.version == second.version == third.version == 1
    xs = [np.full(3, float(i)) for i in range(300)]
    results = await asyncio.gather(*first.map(xs), *second.map(xs), *third.map(xs))
    assert all(np.array_equal(r, xs[i % 300] * 2) for i, r in enumerate(results))
    loads = [w.extensions["dynbatch"].loads[("m", 1)] for w in (a, b)]
    assert loads == [1, 1]  # one load per worker, whoever sent
    with pytest.raises(ddb.ModelConflictError, match="load: registered .*build_double, given .*build_negate"):
        await ddb.Batcher(c, ddb.ModelSpec("m", load=build_negate))
    with pytest.raises(ddb.ModelConflictError, match="latency_target"):
        await ddb.Batcher(c2, ddb.ModelSpec("m", load=build_double, latency_target="10ms"))
    # the refused ones changed nothing: the model still answers as before
    assert np.array_equal(await first.submit(np.ones(3)), np.full(3, 2.0))
    for batcher in (first, second, third):
        batcher.close()
    await c2.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_concurrent_first_shipments_wait_for_one_load(c, s, a):
    LOADS.clear()
    await c.register_plugin(ddb.DynBatchPlugin())
    spec = ddb.ModelSpec("slow", load=build_slow_counted, max_batch_size=4)
    c2 = await Client(s.address, asynchronous=True)
    batchers = [await ddb.Batcher(c, spec), await ddb.Batcher(c, spec), await ddb.Batcher(c2, spec)]
    # every Batcher sends its first shipments before the model is loaded
    futures = [f for b in batchers for f in b.map([np.full(2, float(i)) for i in range(40)])]
    results = await asyncio.wait_for(asyncio.gather(*futures), WAIT)
    assert all(np.array_equal(r, np.full(2, float(i % 40) + 1)) for i, r in enumerate(results))
    assert LOADS == ["slow"] and a.extensions["dynbatch"].loads[("slow", 1)] == 1
    for batcher in batchers:
        batcher.close()
    await c2.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_rows_of_two_clients_share_a_device_batch(c, s, a, gate):
    await c.register_plugin(ddb.DynBatchPlugin())
    spec = ddb.ModelSpec("gated", load=build_gated_double, max_batch_size=64, initial_batch_size=64)
    c2 = await Client(s.address, asynchronous=True)
    mine, theirs = await ddb.Batcher(c, spec), await ddb.Batcher.from_name(c2, "gated")
    blocker = mine.submit(np.zeros(2))  # the device is busy with it until the gate opens
    await until(lambda: servers(a) and servers(a)[0].stats.shipments == 1)
    (server,) = servers(a)
    # the next shipment forms the batch that waits on the device behind the running one...
    ahead = mine.map([np.full(2, -1.0)] * 2)
    await until(lambda: server.stats.shipments == 2 and len(server.queue) == 0)
    # ...and what arrives after it waits in the server's queue, from two other clients
    c3 = await Client(s.address, asynchronous=True)
    third = await ddb.Batcher.from_name(c3, "gated")
    ours = third.map([np.full(2, float(i)) for i in range(5)])
    others = theirs.map([np.full(2, 100.0 + i) for i in range(7)])
    await until(lambda: len(server.queue) == 12)
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(blocker, *ahead, *ours, *others), WAIT)
    assert np.array_equal(results[3], np.full(2, 0.0)) and np.array_equal(results[-1], np.full(2, 212.0))
    assert server.stats.shared_batches == 1 and server.stats.batches == 3
    (record,) = theirs.history()
    assert record["device_batch"] == 12 and record["size"] == 7  # its 7 rows rode in a batch of 12
    for batcher in (mine, theirs, third):
        batcher.close()
    await c2.close()
    await c3.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_models_on_one_device_count_batch_times_from_the_devices_turns(c, s, a, gate):
    """Two models on one worker's device: a batch whose rows waited for the other model's batch
    counts its time from that batch's end for the controller (tests/test_control.py shows what
    that keeps), while the model's share of the device, which its advised throughput is scaled
    by, counts the wait."""
    await c.register_plugin(ddb.DynBatchPlugin())
    gated = await ddb.Batcher(c, ddb.ModelSpec("gated", load=build_gated_double))
    negates = await ddb.Batcher(c, ddb.ModelSpec("negate", load=build_negate))
    await negates.submit(np.ones(2))  # loaded first: a model loads on the device thread
    blocker = gated.submit(np.zeros(2))  # holds the device until the gate opens
    await until(lambda: any(server.name == "gated" and server.running() is not None for server in servers(a)))
    xs = [np.full(2, float(i)) for i in range(4)]
    waiting = negates.map(xs)  # its rows arrive while the other model's batch runs
    await until(lambda: any(server.name == "negate" and server.stats.shipments > 1 for server in servers(a)))
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(blocker, *waiting), WAIT)
    assert np.array_equal(results[0], np.zeros(2)) and all(np.array_equal(r, -x) for r, x in zip(results[1:], xs))
    gated_server, negate = sorted(servers(a), key=lambda server: server.name)
    assert gated_server.device == negate.device and gated_server.turns is negate.turns
    assert negate.turns is a.extensions["dynbatch"].device_turns[negate.device]
    # the second batch of "negate" waited for the gated batch: its share of the device counts
    # that wait, its own time (from the gated batch's end) does not
    _, (rows, share_s, turn_s), *_ = negate.stats.recent
    assert share_s > turn_s and negate.stats.device_share() < 1.0
    for batcher in (gated, negates):
        batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_replace_swaps_versions_with_nothing_lost(c, s, a, gate):
    await c.register_plugin(ddb.DynBatchPlugin())
    old = await ddb.Batcher(c, ddb.ModelSpec("m", load=build_gated_double, max_batch_size=4, max_inflight=1))
    in_flight = old.map([np.full(2, float(i)) for i in range(4)])  # one shipment, held on the device
    await until(lambda: servers(a) and servers(a)[0].stats.shipments == 1)
    queued = old.map([np.full(2, float(i)) for i in range(4, 20)])  # waits in the client meanwhile
    new = await ddb.Batcher(c, ddb.ModelSpec("m", load=build_negate, max_batch_size=4), replace=True)
    assert new.version == 2
    await until(lambda: old.version == 2)  # every Batcher of the name switches
    gate.set()
    first = await asyncio.wait_for(asyncio.gather(*in_flight), WAIT)
    rest = await asyncio.wait_for(asyncio.gather(*queued), WAIT)
    assert [r[0] for r in first] == [2.0 * i for i in range(4)]  # in flight: finished on version 1
    assert [r[0] for r in rest] == [-float(i) for i in range(4, 20)]  # then version 2, nothing lost
    assert old.stats()["delivered"] == 20 and old.stats()["failed"] == 0
    versions = [h["version"] for h in old.history()]
    assert versions[0] == 1 and set(versions[1:]) == {2}
    assert np.array_equal(await new.submit(np.ones(2)), -np.ones(2))
    await until(lambda: [(srv.name, srv.version) for srv in servers(a)] == [("m", 2)])  # version 1 unloaded
    assert old.spec.load is not build_gated_double  # the Batcher now holds the new spec
    old.close()
    new.close()


# -- client processes --------------------------------------------------------------------------------


CLIENT_SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    from distributed import Client
    import dask_dynbatch as ddb

    def build_sleepy(device="cpu"):  # defined in __main__: it pickles by value, as in a notebook
        def model(batch):
            time.sleep(0.002 + 0.0001 * len(batch))
            return batch + 1
        return model

    if __name__ == "__main__":
        address, how, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
        with Client(address) as client:
            spec = ddb.ModelSpec("sleepy", load=build_sleepy, latency_target="200ms")
            batcher = ddb.Batcher(client, spec) if how == "spec" else ddb.Batcher.from_name(client, "sleepy")
            xs = np.arange(n, dtype=np.float64)[:, None] + np.zeros((1, 4))
            results = [f.result(timeout=120) for f in batcher.map(list(xs))]
            assert np.array_equal(np.stack(results), xs + 1)
            print("ok", batcher.version, flush=True)
            batcher.close()
""")


def _server_counts(dask_worker=None):
    return [(s.name, s.version, s.stats.shared_batches) for s in dask_worker.extensions["dynbatch"].servers.values()]


def _loads(dask_worker=None):
    return dict(dask_worker.extensions["dynbatch"].loads)


@pytest.mark.slow
def test_client_processes_share_one_load_and_device_batches(tmp_path):
    """Two client processes, each defining the model's load in its own __main__ (so each pickles it
    by value): the second spec attaches to the first's, both share the worker's one load of the
    model, and their rows share device batches."""
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            client.register_plugin(ddb.DynBatchPlugin())
            procs = [subprocess.Popen([sys.executable, str(script), cluster.scheduler_address, how, "10000"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for how in ("spec", "spec")]
            shared = 0
            while any(p.poll() is None for p in procs):  # the server goes once both clients left
                counts = [n for servers in client.run(_server_counts).values() for _, _, n in servers]
                shared = max([shared, *counts])
                time.sleep(0.2)
            outs = [p.communicate(timeout=180) for p in procs]
            loads = client.run(_loads)
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0 and out.strip() == "ok 1", err[-3000:]
    assert list(loads.values()) == [{("sleepy", 1): 1}]  # two client processes, one load
    assert shared > 0  # rows of both processes ran in the same device batches
