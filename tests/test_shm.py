"""Same-host shared-memory transport of batches (dask_dynbatch/shm.py): slots, fallbacks, no leaks."""

from __future__ import annotations

import asyncio
import os
import time

import dask
import numpy as np
import pytest
from distributed import Client, LocalCluster
from distributed.utils_test import gen_cluster

import dask_dynbatch as ddb
from dask_dynbatch.core.rows import TrimmedRows
from dask_dynbatch.examples import build_affine, build_tiny_text_encoder
from dask_dynbatch.shm import (
    ALIGN,
    SHM_DIR,
    ReplyFiles,
    ReplyUnavailable,
    ShmAttachments,
    ShmRing,
    ShmUnavailable,
    read_reply,
    shm_supported,
    sweep_orphans,
)

pytestmark = pytest.mark.skipif(not shm_supported(), reason="no writable /dev/shm")

# 24 KiB per sample: a batch of 4 or more crosses the 64 KiB shared-memory threshold
SAMPLE = (32, 32, 6)


def samples(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SAMPLE)).astype(np.float32)


def our_files() -> set[str]:
    return {f for f in os.listdir(SHM_DIR) if f.startswith(f"dynbatch-{os.getpid()}-")}


def test_ring_reuses_grows_and_retires(tmp_path):
    ring = ShmRing(keep=2, directory=str(tmp_path))
    a = ring.acquire(1000)
    a.array((10, 100), np.uint8)[:] = 7
    ring.release(a)
    assert ring.acquire(500) is a  # reused: big enough
    b = ring.acquire(800)  # a is busy: a second slot
    assert b is not a
    a.mark_attached()  # the worker maps it: the name is gone, the memory stays
    assert not (tmp_path / a.name).exists()
    assert a.array((10, 100), np.uint8)[3, 5] == 7
    ring.release(a)
    ring.release(b)
    big = ring.acquire(5 * 2**20)  # larger than both: the smaller free slot is retired to make room
    assert big.capacity >= 5 * 2**20
    assert ring.take_retired() in ([], [a.name])  # only attached slots need the worker to drop them
    assert ring.take_retired() == []  # handed out once
    names = ring.close()
    ring.release(big)  # busy at close: closed on release
    assert set(os.listdir(tmp_path)) == set()
    assert all(isinstance(n, str) for n in names)
    assert ring.acquire(10) is None  # closed


def test_slot_writes_rows_in_calls_of_iov_max_and_falls_back_where_it_must(tmp_path, monkeypatch):
    from dask_dynbatch import shm as shm_module

    monkeypatch.setattr(shm_module, "_IOV_MAX", 3)  # 10 rows: four pwritev calls
    calls = []
    real_pwritev = os.pwritev

    def short_once(fd, buffers, offset):  # the second call writes half a row short
        calls.append(len(buffers))
        if len(calls) == 2:
            return real_pwritev(fd, [memoryview(buffers[0]).cast("B")[:100]], offset)
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(shm_module.os, "pwritev", short_once)
    ring = ShmRing(directory=str(tmp_path))
    slot = ring.acquire(2**20)
    xs = samples(10)
    slot.write_rows(list(xs))
    assert calls == [3, 3, 3, 1]
    np.testing.assert_array_equal(slot.array(xs.shape, xs.dtype), xs)
    slot.mark_attached()  # unlinked: the kept descriptor still writes the same pages
    strided = [x[:, ::2] for x in samples(10, seed=1)]  # not contiguous: NumPy stacks them
    slot.write_rows(strided)
    assert len(calls) == 4
    np.testing.assert_array_equal(slot.array((10, 32, 16, 6), np.float32), np.stack(strided))
    slot.write_rows(list(samples(2, seed=2)))
    np.testing.assert_array_equal(slot.array((2, *SAMPLE), np.float32), samples(2, seed=2))
    ring.release(slot)
    ring.close()
    assert slot._fd == -1


def test_ring_without_room_falls_back(tmp_path, monkeypatch):
    ring = ShmRing(directory=str(tmp_path))

    def no_space(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    assert ring.acquire(1 << 20) is None
    assert os.listdir(tmp_path) == []  # the failed file is removed
    monkeypatch.undo()
    assert ring.acquire(2 << 20) is None  # no retry at that size or larger
    assert ring.acquire(1 << 10) is not None  # smaller batches still may
    ring.close()


def test_attachments_map_validate_and_drop(tmp_path):
    ring = ShmRing(directory=str(tmp_path))
    slot = ring.acquire(4096)
    slot.array((4, 8), np.float64)[:] = np.arange(32).reshape(4, 8)
    worker = ShmAttachments(directory=str(tmp_path), max_mappings=2)
    got = worker.array("client-1", slot.name, (4, 8), "<f8")
    assert np.array_equal(got, np.arange(32).reshape(4, 8))
    del got
    slot.mark_attached()
    assert worker.array("client-1", slot.name, (2, 8), "<f8").shape == (2, 8)  # mapped: no file needed
    with pytest.raises(ShmUnavailable, match="less than the batch"):
        worker.array("client-1", slot.name, (200_000, 8), "<f8")
    with pytest.raises(ShmUnavailable, match="not a dask-dynbatch"):
        worker.array("client-1", "../../etc/passwd", (1,), "u1")
    with pytest.raises(ShmUnavailable, match="another host"):
        worker.array("client-2", "dynbatch-1-0123456789abcdef", (1,), "u1")
    assert worker.summary()["mappings"] == 1
    assert worker.drop("client-1") == 1
    with pytest.raises(ShmUnavailable):  # unlinked and unmapped: gone for good
        worker.array("client-1", slot.name, (4, 8), "<f8")
    ring.close()


def test_attachments_page_lock_once_and_undo_before_unmapping(tmp_path):
    ring = ShmRing(directory=str(tmp_path))
    slots = [ring.acquire(8192), ring.acquire(8192)]
    worker = ShmAttachments(directory=str(tmp_path), max_mappings=1)
    calls, undone = [], []

    def pinner(address, nbytes):
        calls.append((address, nbytes))
        return lambda: undone.append(address)

    assert not worker.pin("client-1", slots[0].name, pinner)  # not mapped yet: nothing to lock
    view = worker.array("client-1", slots[0].name, (8, 8), "<f8")
    assert worker.pin("client-1", slots[0].name, pinner)
    assert worker.pin("client-1", slots[0].name, pinner)  # once per mapping
    assert len(calls) == 1 and calls[0][1] >= 8192 and calls[0][0] == view.__array_interface__["data"][0]
    assert worker.summary()["page_locked"] == 1
    del view
    worker.array("client-1", slots[1].name, (8, 8), "<f8")  # evicts the first mapping (max 1)
    assert undone == [calls[0][0]] and worker.summary()["page_locked"] == 0
    assert not worker.pin("client-1", slots[1].name, lambda address, nbytes: None)  # refused: not locked
    assert worker.summary()["page_locked"] == 0
    assert worker.pin("client-1", slots[1].name, pinner)
    worker.close()
    assert len(undone) == 2
    ring.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_large_batches_travel_through_shared_memory(c, s, a):
    await c.register_plugin(ddb.DynBatchPlugin())
    xs = samples(500)
    batcher = await ddb.Batcher(c, ddb.ModelSpec("affine-shm", load=build_affine, max_batch_size=64))
    results = await asyncio.gather(*batcher.map(list(xs)))
    np.testing.assert_array_equal(np.stack(results), xs * 2 + 1)
    (worker,) = batcher.stats()["workers"].values()
    assert worker["transport"] == "shared-memory"
    plugin = a.extensions["dynbatch"]
    assert plugin.shm.summary()["mappings"] >= 1  # the worker mapped the client's slots
    assert not our_files()  # mapped on both sides: the names are unlinked already
    batcher.close()
    while plugin.shm.summary()["mappings"]:  # closing the Batcher drops the worker's mappings
        await asyncio.sleep(0.01)


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_slot_writes_give_the_same_results(c, s, a):
    await c.register_plugin(ddb.DynBatchPlugin())
    xs = samples(300, seed=5)
    from dask_dynbatch import shm as shm_module

    written, original = [], shm_module.ShmSlot.write_rows
    shm_module.ShmSlot.write_rows = lambda self, rows: written.append(len(rows)) or original(self, rows)
    try:
        with dask.config.set({"dynbatch.transport.shared-memory-copy": "write"}):
            batcher = await ddb.Batcher(c, ddb.ModelSpec("affine-write", load=build_affine, max_batch_size=200))
            results = await asyncio.gather(*batcher.map(list(xs)))
    finally:
        shm_module.ShmSlot.write_rows = original
    assert written and sum(written) == sum(h["size"] for h in batcher.history() if h["size"] >= 3)  # 64 KiB and up
    np.testing.assert_array_equal(np.stack(results), xs * 2 + 1)
    (worker,) = batcher.stats()["workers"].values()
    assert worker["transport"] == "shared-memory"
    batcher.close()


def test_copy_mode_writes_while_a_map_is_making_requests():
    from dask_dynbatch.client import transport

    assert transport.copy_mode() == "numpy"
    with transport.producing():
        assert transport.copy_mode() == "write"
        with dask.config.set({"dynbatch.transport.shared-memory-copy": "numpy"}):
            assert transport.copy_mode() == "numpy"
    assert transport.copy_mode() == "numpy"
    with dask.config.set({"dynbatch.transport.shared-memory-copy": "write"}):
        assert transport.copy_mode() == "write"
    with dask.config.set({"dynbatch.transport.shared-memory-copy": "memcpy"}), pytest.raises(ValueError, match="memcpy"):
        transport.copy_mode()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_shipments_formed_while_producing_are_written(c, s, a, monkeypatch):
    # a map() of more than one chunk made outside the event loop marks the process as producing;
    # shipments formed meanwhile are written into their slots by pwritev, with the same results
    await c.register_plugin(ddb.DynBatchPlugin())
    from dask_dynbatch import shm as shm_module
    from dask_dynbatch.client import batcher as batcher_module
    from dask_dynbatch.client import transport
    from dask_dynbatch.client.batcher import MAP_CHUNK

    marked = []

    def recording_producing():
        marked.append(True)
        return transport.producing()

    monkeypatch.setattr(batcher_module, "producing", recording_producing)
    written, original = [], shm_module.ShmSlot.write_rows
    monkeypatch.setattr(shm_module.ShmSlot, "write_rows", lambda self, rows: written.append(len(rows)) or original(self, rows))
    batcher = await ddb.Batcher(c, ddb.ModelSpec("affine-auto", load=build_affine, max_batch_size=256))
    xs = samples(MAP_CHUNK + 1, seed=7)
    futures = await asyncio.get_running_loop().run_in_executor(None, batcher.map, list(xs))
    assert marked == [True]
    np.testing.assert_array_equal(np.stack(await asyncio.gather(*futures)), xs * 2 + 1)
    await asyncio.gather(*batcher.map(list(xs[:10])))  # on the loop's thread, or small: not marked
    assert marked == [True]
    before, shipped_before = len(written), len(batcher.history())
    with transport.producing():
        ys = samples(600, seed=8)
        results = await asyncio.gather(*batcher.map(list(ys)))
    np.testing.assert_array_equal(np.stack(results), ys * 2 + 1)
    shipped = [h["size"] for h in batcher.history()[shipped_before:]]
    assert sum(shipped) == 600
    assert sum(written[before:]) == sum(n for n in shipped if n >= 3)  # 64 KiB and up go by shared memory
    batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_worker_that_cannot_map_gets_batches_over_the_comm(c, s, a, tmp_path_factory):
    await c.register_plugin(ddb.DynBatchPlugin())
    # the worker looks for slots elsewhere: as if the client were on another host
    a.extensions["dynbatch"].shm.directory = str(tmp_path_factory.mktemp("elsewhere"))
    xs = samples(300, seed=1)
    batcher = await ddb.Batcher(c, ddb.ModelSpec("affine-far", load=build_affine, max_batch_size=32))
    results = await asyncio.gather(*batcher.map(list(xs)))
    np.testing.assert_array_equal(np.stack(results), xs * 2 + 1)
    stats = batcher.stats()
    assert stats["delivered"] == 300 and stats["failed"] == 0 and stats["requeued"] == 0
    (worker,) = stats["workers"].values()
    assert worker["transport"] == "comm"
    assert sum(w["samples"] for w in stats["workers"].values()) == 300  # nothing ran twice
    assert not our_files()
    batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_slot_the_worker_lost_is_replaced(c, s, a):
    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec("affine-stale", load=build_affine, max_batch_size=16))
    xs = samples(64, seed=2)
    await asyncio.gather(*batcher.map(list(xs)))
    a.extensions["dynbatch"].drop_shm(c.id)  # e.g. the worker restarted at the same address
    ys = samples(64, seed=3)
    results = await asyncio.gather(*batcher.map(list(ys)))
    np.testing.assert_array_equal(np.stack(results), ys * 2 + 1)
    (worker,) = batcher.stats()["workers"].values()
    assert worker["transport"] == "shared-memory"  # a stale slot is no reason to give up
    assert batcher.stats()["failed"] == 0
    batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_shared_memory_can_be_turned_off(c, s, a):
    await c.register_plugin(ddb.DynBatchPlugin())
    with dask.config.set({"dynbatch.transport.shared-memory": False}):
        batcher = await ddb.Batcher(c, ddb.ModelSpec("affine-off", load=build_affine, max_batch_size=32))
    xs = samples(100, seed=4)
    results = await asyncio.gather(*batcher.map(list(xs)))
    np.testing.assert_array_equal(np.stack(results), xs * 2 + 1)
    (worker,) = batcher.stats()["workers"].values()
    assert worker["transport"] == "comm"
    assert a.extensions["dynbatch"].shm.summary()["mappings"] == 0
    batcher.close()


@pytest.mark.slow
def test_client_that_leaves_frees_its_slots_on_worker_processes():
    """Process workers: batches through shared memory are correct, and a client that disconnects
    without closing its Batcher leaves nothing mapped or on /dev/shm."""
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            client.register_plugin(ddb.DynBatchPlugin())
            xs = samples(400, seed=5)
            batcher = ddb.Batcher(client, ddb.ModelSpec("affine-proc", load=build_affine, max_batch_size=64))
            results = [f.result(timeout=60) for f in batcher.map(list(xs))]
            np.testing.assert_array_equal(np.stack(results), xs * 2 + 1)
            assert next(iter(batcher.stats()["workers"].values()))["transport"] == "shared-memory"
            mapped = client.run(lambda dask_worker: dask_worker.extensions["dynbatch"].shm.summary()["mappings"])
            assert list(mapped.values())[0] >= 1
        # that client is gone (its Batcher never closed): the scheduler plugin drops its mappings
        with Client(cluster) as other:
            def mappings():
                return list(other.run(lambda dask_worker: dask_worker.extensions["dynbatch"].shm.summary()["mappings"]).values())[0]

            for _ in range(200):
                if mappings() == 0:
                    break
                time.sleep(0.05)
            assert mappings() == 0
    assert not our_files()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_first_batch_through_each_new_slot_is_not_shown_to_the_controller(c, s, a):
    """A slot's first shipment pays one-time costs (the client's first writes fault its pages in,
    the worker maps and on a GPU page-locks it): its device batch is slower than its size says, which
    the server's controller would take for a throughput fall at that size. Every later shipment
    through the same slot is shown to the controller."""
    from dask_dynbatch import shm as shm_module
    from dask_dynbatch.core.pacing import BusyForecast

    created, forecast_rows = [], []
    original_init, original_observe = shm_module.ShmSlot.__init__, BusyForecast.observe

    def counting_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        created.append(self.name)

    def recording_observe(self, rows, compute_s, lead_s=None):
        forecast_rows.append(rows)
        original_observe(self, rows, compute_s, lead_s)

    shm_module.ShmSlot.__init__ = counting_init
    BusyForecast.observe = recording_observe
    try:
        await c.register_plugin(ddb.DynBatchPlugin())
        spec = ddb.ModelSpec("affine-fresh-slots", load=build_affine, max_batch_size=16, initial_batch_size=16)
        batcher = await ddb.Batcher(c, spec)
        # load the model with a batch too small for shared memory (2 x 24 KiB): the batches below
        # are then neither cold nor, after the first, of a new shape
        await asyncio.gather(*batcher.map(list(samples(2, seed=6))))
        assert not created
        xs = samples(16 * 20, seed=5)
        results = await asyncio.gather(*batcher.map(list(xs)))
    finally:
        shm_module.ShmSlot.__init__ = original_init
        BusyForecast.observe = original_observe
    np.testing.assert_array_equal(np.stack(results), xs * 2 + 1)
    history = batcher.history()[1:]
    assert [h["size"] for h in history] == [16] * 20
    (worker,) = batcher.stats()["workers"].values()
    assert worker["transport"] == "shared-memory"
    # full batches go up to max_inflight (3) at a time, each in its own slot
    assert 2 <= len(created) <= 4
    # hidden: the first batch of 16 (a new shape, and the first through its slot) and the first
    # batch through every other new slot; shown: all the rest (the cold batch of 2 is hidden too)
    (server,) = a.extensions["dynbatch"].servers.values()
    observations = server.controller.state()["observations"]
    assert observations == len(history) - len(created)
    hidden = [h["reason"] for h in history if h["decision"] == "not shown"]
    assert hidden == ["new_shape"] + ["new_slot"] * (len(created) - 1)
    # the pacing forecast learns from the same batches as the controller, and only from them
    assert len(forecast_rows) == observations
    assert all(h["reason"] for h in history)  # every batch says what the controller made of it
    batcher.close()


# -- replies through shared memory ----------------------------------------------------------------
def test_reply_files_come_back_in_place_and_leave_nothing(tmp_path):
    files = ReplyFiles(str(tmp_path))
    big = np.arange(100_000, dtype=np.float32).reshape(1000, 100)
    reply = [{"hidden": big, "strided": big[:, ::7]},
             (big[:10], [np.ones(3), np.zeros((2, 2), np.int64)], 5),
             TrimmedRows({"x": big.reshape(10, 100, 100)}, 100, [5] * 10, frozenset())]
    info = files.write(reply, min_bytes=1)
    assert info is not None and os.listdir(tmp_path) == [info["name"]]
    assert all(start % ALIGN == 0 for start, _ in info["buffers"])
    back = read_reply(info, str(tmp_path))
    assert os.listdir(tmp_path) == []  # the client unlinked it: the mapping holds the memory
    np.testing.assert_array_equal(back[0]["hidden"], big)
    np.testing.assert_array_equal(back[0]["strided"], big[:, ::7])
    np.testing.assert_array_equal(back[1][0], big[:10])
    assert [a.tolist() for a in back[1][1]] == [[1.0, 1.0, 1.0], [[0, 0], [0, 0]]] and back[1][2] == 5
    assert back[2].owns == [5] * 10 and back[2].split(10)[3]["x"].shape == (5, 100)
    back[0]["hidden"][0, 0] = -1.0  # writable, and private to the client
    assert big[0, 0] == 0.0
    assert files.summary() == {"reply_files": 1, "reply_bytes": info["size"]}
    with pytest.raises(ReplyUnavailable, match="cannot open"):
        read_reply(info, str(tmp_path))  # read once only
    with pytest.raises(ReplyUnavailable, match="not a dask-dynbatch reply file"):
        read_reply({**info, "name": "../dynbatch-r-1-0123456789abcdef"}, str(tmp_path))


def test_small_replies_and_replies_without_room_stay_on_the_comm(tmp_path, monkeypatch):
    files = ReplyFiles(str(tmp_path))
    assert files.write([np.ones(100)], min_bytes=1 << 20) is None
    assert files.write([{"label": "cat"}], min_bytes=0) is None  # nothing out of band
    from dask_dynbatch import shm as shm_module

    def full(fd, iov):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shm_module, "_pwrite_all", full)
    assert files.write([np.ones(100_000)], min_bytes=1) is None
    assert os.listdir(tmp_path) == [] and files.summary()["reply_files"] == 0


def test_reply_files_survive_short_writes(tmp_path, monkeypatch):
    from dask_dynbatch import shm as shm_module

    real_pwrite = os.pwrite

    def first_buffer_only(fd, buffers, offset):  # a short write: only the first buffer lands
        return real_pwrite(fd, buffers[0], offset)

    def one_byte_less(fd, data, offset):
        return real_pwrite(fd, data[: max(1, len(data) - 1)], offset)

    monkeypatch.setattr(shm_module.os, "pwritev", first_buffer_only)
    monkeypatch.setattr(shm_module.os, "pwrite", one_byte_less)
    files = ReplyFiles(str(tmp_path))
    arrays = [np.arange(1000, dtype=np.int64), np.arange(777, dtype=np.uint8), np.arange(50, dtype=np.float32)]
    back = read_reply(files.write(arrays, min_bytes=1), str(tmp_path))
    for got, want in zip(back, arrays):
        np.testing.assert_array_equal(got, want)


def test_reply_files_nobody_read_are_unlinked_after_their_ttl_and_on_close(tmp_path):
    now = [0.0]
    files = ReplyFiles(str(tmp_path), ttl=60.0, clock=lambda: now[0])
    unread = files.write([np.ones(1000)], min_bytes=1)
    now[0] = 30.0
    read = files.write([np.ones(1000)], min_bytes=1)
    read_reply(read, str(tmp_path))
    assert files.sweep() == 0 and os.listdir(tmp_path) == [unread["name"]]
    now[0] = 61.0
    assert files.sweep() == 1 and os.listdir(tmp_path) == []
    now[0] = 100.0  # the read one's turn: already gone
    assert files.sweep() == 0
    files.write([np.ones(1000)], min_bytes=1)
    assert files.close() == 1 and os.listdir(tmp_path) == []


def text_samples(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for length in rng.integers(5, 60, n):
        ids = rng.integers(1, 1000, int(length))
        out.append({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    return out


def our_reply_files() -> list[str]:
    return [f for f in os.listdir(SHM_DIR) if f.startswith(f"dynbatch-r-{os.getpid()}-")]


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_large_replies_come_back_through_shared_memory(c, s, a):
    pytest.importorskip("torch")  # (the tiny text encoder)
    await c.register_plugin(ddb.DynBatchPlugin())
    xs = text_samples(300)
    # (small shipments of ids: slots from 1 KiB, so that the worker maps one and shows it shares the host)
    with dask.config.set({"dynbatch.transport.shared-memory-replies": True,
                          "dynbatch.transport.shared-memory-min-bytes": 1024}):
        batcher = await ddb.Batcher(c, ddb.ModelSpec("text-reply-shm", load=build_tiny_text_encoder, pad_value=0))
        out = await asyncio.gather(*batcher.map(xs))
    replies = a.extensions["dynbatch"].replies
    written = replies.summary()["reply_files"]
    assert written >= 1  # per-token features of a shipment: far over 64 KiB
    assert not our_reply_files()
    # (the default: replies over the comm)
    over_comm = await ddb.Batcher(c, ddb.ModelSpec("text-reply-comm", load=build_tiny_text_encoder, pad_value=0))
    expected = await asyncio.gather(*over_comm.map(xs))
    assert replies.summary()["reply_files"] == written
    assert [next(iter(b.stats()["workers"].values()))["replies"] for b in (batcher, over_comm)] == ["shared-memory", "comm"]
    for got, want, x in zip(out, expected, xs):
        assert got["last_hidden_state"].shape == (len(x["input_ids"]), 64)
        np.testing.assert_allclose(got["last_hidden_state"], want["last_hidden_state"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got["pooler_output"], want["pooler_output"], rtol=1e-4, atol=1e-4)
    batcher.close()
    over_comm.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_a_client_that_cannot_read_replies_gets_them_again_over_the_comm(c, s, a, monkeypatch):
    pytest.importorskip("torch")  # (the tiny text encoder)
    from dask_dynbatch.client import transport

    refused = []

    def refuse(info, directory=SHM_DIR):
        refused.append(info["name"])
        raise ReplyUnavailable("as if another user wrote it")

    monkeypatch.setattr(transport, "read_reply", refuse)
    await c.register_plugin(ddb.DynBatchPlugin())
    xs = text_samples(200, seed=1)
    with dask.config.set({"dynbatch.transport.shared-memory-replies": True,
                          "dynbatch.transport.shared-memory-min-bytes": 1024}):
        batcher = await ddb.Batcher(c, ddb.ModelSpec("text-reply-refused", load=build_tiny_text_encoder, pad_value=0))
        out = await asyncio.gather(*batcher.map(xs))
    assert [o["last_hidden_state"].shape[0] for o in out] == [len(x["input_ids"]) for x in xs]
    stats = batcher.stats()
    assert stats["delivered"] == 200 and stats["failed"] == 0
    (worker,) = stats["workers"].values()
    assert worker["replies"] == "comm"
    replies = a.extensions["dynbatch"].replies
    # only shipments sent before the first refusal came back asked for files (each was run again)
    assert 1 <= len(refused) == replies.summary()["reply_files"]
    assert replies.close() == len(refused)  # left to the worker, which unlinks them
    assert not our_reply_files()
    batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_no_reply_files_from_a_worker_that_never_mapped_a_slot(c, s, a, tmp_path_factory):
    pytest.importorskip("torch")  # (the tiny text encoder: small inputs, which never use a slot, large outputs)
    await c.register_plugin(ddb.DynBatchPlugin())
    plugin = a.extensions["dynbatch"]
    plugin.replies.directory = str(tmp_path_factory.mktemp("elsewhere"))  # files the client could not read
    xs = text_samples(200, seed=2)
    with dask.config.set({"dynbatch.transport.shared-memory-replies": True}):
        batcher = await ddb.Batcher(c, ddb.ModelSpec("text-reply-far", load=build_tiny_text_encoder, pad_value=0))
        out = await asyncio.gather(*batcher.map(xs))
    assert [o["last_hidden_state"].shape[0] for o in out] == [len(x["input_ids"]) for x in xs]
    assert plugin.replies.summary()["reply_files"] == 0  # never asked for: nothing ran twice
    assert sum(w["samples"] for w in batcher.stats()["workers"].values()) == 200
    batcher.close()


def test_a_reply_written_after_close_unlinks_itself(tmp_path):
    files = ReplyFiles(str(tmp_path))
    files.write([np.ones(1000)], min_bytes=1)
    assert files.close() == 1
    assert files.write([np.ones(1000)], min_bytes=1) is None  # (a write still running at teardown)
    assert os.listdir(tmp_path) == []


def test_reply_files_of_workers_that_are_gone_are_unlinked_once_old(tmp_path):
    """A reply file written just before its worker was killed is unlinked by another worker's sweep;
    reply files of live processes, young ones, client slots and names that are not ours are kept."""
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    now = time.time()

    def make(name: str, age: float) -> str:
        path = tmp_path / name
        path.write_bytes(b"x")
        os.utime(path, (now - age, now - age))
        return name

    try:
        orphan = make(f"dynbatch-r-{gone.pid}-{'a' * 16}", 120)
        kept = {
            make(f"dynbatch-r-{gone.pid}-{'c' * 16}", 5),  # young: its client may be reading it now
            make(f"dynbatch-r-{os.getpid()}-{'d' * 16}", 120),  # this process's
            make(f"dynbatch-r-{alive.pid}-{'e' * 16}", 120),  # a live process's
            make(f"dynbatch-{gone.pid}-{'b' * 16}", 120),  # a client's slot: an idle client may still use it
            make(f"dynbatch-r-{'9' * 20}-{'f' * 16}", 120),  # too large for a process number: kept
            make(f"dynbatch-r-{'9' * 10}-{'f' * 16}", 120),  # (the same, below 2**63)
            make(f"other-r-{gone.pid}-{'f' * 16}", 120),  # not ours
        }
        assert sweep_orphans(str(tmp_path), min_age=60.0, now=now) == 1
        assert set(os.listdir(tmp_path)) == kept and orphan not in os.listdir(tmp_path)
        # a worker's reply files look at the first sweep and then every ttl
        clock = [0.0]
        files = ReplyFiles(str(tmp_path), ttl=60.0, clock=lambda: clock[0])
        make(f"dynbatch-r-{gone.pid}-{'9' * 16}", 120)
        files.sweep()
        assert set(os.listdir(tmp_path)) == kept
        later = make(f"dynbatch-r-{gone.pid}-{'8' * 16}", 120)
        clock[0] = 30.0
        files.sweep()
        assert later in os.listdir(tmp_path)  # not looked for yet
        clock[0] = 61.0
        files.sweep()
        assert set(os.listdir(tmp_path)) == kept
    finally:
        alive.kill()
        alive.wait()
