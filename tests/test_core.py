"""The core: plugin pair and Batcher, end to end on real Dask clusters."""

from __future__ import annotations

import asyncio
import pickle

import numpy as np
import pytest
from distributed import Client, LocalCluster
from distributed.utils_test import gen_cluster
from models import build_poisoned

import dask_dynbatch as ddb
from dask_dynbatch.examples import build_affine, build_identity, build_tiny_cnn, tiny_cnn_images

torch = pytest.importorskip("torch")


def expected_cnn(images: np.ndarray) -> np.ndarray:
    model = build_tiny_cnn().eval()
    with torch.inference_mode():
        return model(torch.from_numpy(images)).numpy()


def build_broken(device="cpu"):
    raise RuntimeError("weights file is missing")


def test_load_gets_the_device_when_its_signature_asks_for_it():
    from dask_dynbatch.spec import call_load

    def by_default(device="cpu"):  # e.g. examples.build_resnet50: fp16 on CUDA, fp32 on CPU
        return device

    def required(dev):
        return dev

    def keyword_only(*, device="cpu"):
        return device

    def no_device():
        return "none"

    def other_default(path="weights.pt"):  # not about the device: left alone
        return path

    assert call_load(by_default, "cuda:0") == "cuda:0"
    assert call_load(required, "cuda:0") == "cuda:0"
    assert call_load(keyword_only, "cuda:0") == "cuda:0"
    assert call_load(no_device, "cuda:0") == "none"
    assert call_load(other_default, "cuda:0") == "weights.pt"
    assert call_load(lambda: "lambda", "cuda:0") == "lambda"


def test_shape_ladder_warms_each_rung_once_and_pads_without_changing_results(monkeypatch):
    """On CUDA an eager torch module gets its batches on a shape ladder, padded to their rung, and
    the rungs are warmed once each. Exercised here on the CPU by asking for that behaviour on a CPU
    device."""
    from dask_dynbatch.worker.model import LoadedModel

    monkeypatch.setattr(ddb.ModelSpec, "pads_shapes", lambda self, device: True)
    loaded = LoadedModel(ddb.ModelSpec("cnn", load=build_tiny_cnn), "cpu")
    assert loaded.ladder[:12] == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80)
    ran = []
    forward = loaded.forward
    loaded.forward = lambda model, batch: ran.append(len(batch)) or forward(model, batch)
    images = tiny_cnn_images(3)
    assert loaded.wants_shape_warmup
    assert loaded.warm_shapes(images, 64) == len(ran)
    assert ran == [r for r in loaded.ladder if r <= 64]
    assert not loaded.wants_shape_warmup
    assert not loaded.first_at_size(48) and loaded.first_at_size(80)  # warmed, not warmed
    ran.clear()
    out = loaded(images)  # 3 rows run as 4 (the rung), the copy of the last row cut off
    assert ran == [4]
    np.testing.assert_allclose(out, expected_cnn(images), rtol=1e-4, atol=1e-5)


def test_shape_warmup_runs_beside_serving_not_before_the_first_batch(monkeypatch):
    """The first batch runs alone (the first result waits for no warm-up); each later batch warms
    one more rung of the ladder before it runs, until every rung up to the limit ran once."""
    from dask_dynbatch.core.memory import MemorySizer
    from dask_dynbatch.worker.executor import run_device_batch
    from dask_dynbatch.worker.model import LoadedModel
    from dask_dynbatch.worker.telemetry import detect_memory_source

    monkeypatch.setattr(ddb.ModelSpec, "pads_shapes", lambda self, device: True)
    monkeypatch.setattr("dask_dynbatch.worker.executor.SHAPE_WARMUP_ROWS", 16)
    loaded = LoadedModel(ddb.ModelSpec("cnn", load=build_tiny_cnn), "cpu")
    ran = []
    forward = loaded.forward
    loaded.forward = lambda model, batch: ran.append(len(batch)) or forward(model, batch)
    sizer = MemorySizer(detect_memory_source("cpu"))
    images = tiny_cnn_images(3)
    batches = []
    while loaded.wants_shape_warmup:
        ran.clear()
        loaded.first_at_size(len(images))  # as the server does when it forms a batch
        pieces, errors = run_device_batch(loaded, sizer, images)
        assert not errors and sum(b - a for a, b, _ in pieces) == 3
        batches.append(list(ran))
    assert batches[0] == [4]  # the batch alone, padded to its rung
    assert all(len(b) == 2 and b[-1] == 4 for b in batches[1:-1])  # one rung, then the batch
    assert sorted(b[0] for b in batches[1:] if len(b) == 2) == [1, 2, 8, 16]  # 4 ran as a batch


def test_a_gpu_batch_result_waits_for_its_outputs_and_is_timed_by_the_gpu():
    """On CUDA the device thread hands back outputs still being copied (``PendingHost``) and two
    timing events; the server's copy-out thread resolves them: host NumPy outputs, ``compute_s``
    the GPU's time, and every row failed if the device reports an error meanwhile."""
    torch = pytest.importorskip("torch")
    from dask_dynbatch.worker.model import PendingHost
    from dask_dynbatch.worker.server import DeviceResult

    class Event:  # a CUDA event's part the result uses
        def __init__(self, at, fails=False):
            self.at, self.fails, self.waited = at, fails, False

        def synchronize(self):
            if self.fails:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            self.waited = True

        def elapsed_time(self, end):
            return (end.at - self.at) * 1e3

    done = Event(0.0)
    outputs = {"logits": torch.arange(6.0).reshape(3, 2), "ids": [torch.ones(2), torch.zeros(1)]}
    staged = object()  # the batch's input on the device: kept until the batch is done with it
    result = DeviceResult([(0, 3, PendingHost(outputs, done))], {}, 0.001, timer=(Event(1.0), Event(1.25)),
                          staged=staged)
    assert result.pending and not DeviceResult([(0, 3, np.zeros(3))], {}, 0.1).pending
    resolved = result.resolved(3)
    assert result.staged is None and resolved.staged is None
    assert done.waited and not resolved.pending and resolved.compute_s == pytest.approx(0.25)
    (a, b, host), = resolved.pieces
    assert (a, b) == (0, 3) and isinstance(host["logits"], np.ndarray) and host["logits"].tolist()[2] == [4.0, 5.0]
    assert isinstance(host["ids"], list) and host["ids"][1].tolist() == [0.0]
    poison = ValueError("this row alone")
    failed = DeviceResult([(0, 2, PendingHost(outputs, Event(0.0, fails=True)))], {2: poison}, 0.001).resolved(3)
    assert failed.pieces == [] and sorted(failed.errors) == [0, 1, 2] and "illegal memory" in str(failed.errors[0])
    assert failed.errors[2] is poison  # a row that failed alone keeps its own error


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1), ("127.0.0.1", 1)])
async def test_results_correct_and_in_order(c, s, a, b):
    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec("tiny-cnn", load=build_tiny_cnn, max_batch_size=32))
    images = tiny_cnn_images(300)
    futures = batcher.map(list(images))
    results = await asyncio.gather(*futures)
    np.testing.assert_allclose(np.stack(results), expected_cnn(images), rtol=1e-4, atol=1e-5)
    stats = batcher.stats()
    assert stats["delivered"] == 300 and stats["failed"] == 0
    assert sum(w["samples"] for w in stats["workers"].values()) == 300
    batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_ten_thousand_requests_make_no_dask_tasks(c, s, a):
    await c.register_plugin(ddb.DynBatchPlugin())
    transitions_before = s.transition_counter
    batcher = await ddb.Batcher(c, ddb.ModelSpec("identity", load=build_identity, max_batch_size=256))
    xs = np.arange(10_000, dtype=np.float32).reshape(-1, 1)
    results = await asyncio.gather(*batcher.map(list(xs)))
    assert np.array_equal(np.stack(results), xs)
    batches = sum(w["batches"] for w in batcher.stats()["workers"].values())
    assert 10_000 / 256 <= batches < 10_000  # coalesced, never larger than the cap
    assert s.transition_counter == transitions_before  # no task ever reached the scheduler
    assert not s.tasks
    batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_batch_size_never_exceeds_max_batch_size(c, s, a):
    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec("identity", load=build_identity, max_batch_size=7))
    await asyncio.gather(*batcher.map(list(np.zeros((200, 2)))))
    sizes = [h["size"] for h in batcher.history()]
    assert max(sizes) <= 7 and sum(sizes) == 200
    batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_future_api(c, s, a):
    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec("affine", load=build_affine))
    fut = batcher.submit(np.ones(3))
    called = []
    fut.add_done_callback(called.append)
    value = await fut
    assert fut.done() and fut.exception() is None
    np.testing.assert_array_equal(value, np.full(3, 3.0))
    np.testing.assert_array_equal(fut.result(timeout=1), value)
    assert called == [fut]
    assert fut.cancel() is False  # already delivered
    batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_torch_tensor_in_torch_tensor_out(c, s, a):
    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec("affine", load=build_affine))
    out = await batcher.submit(torch.arange(4, dtype=torch.float32))
    assert isinstance(out, torch.Tensor)
    assert out.tolist() == [1.0, 3.0, 5.0, 7.0]
    batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1), ("127.0.0.1", 1)])
async def test_dask_future_inputs_are_fetched_by_the_worker(c, s, a, b):
    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec("affine", load=build_affine))
    xs = [np.full(4, float(i)) for i in range(20)]
    # inputs computed on the cluster: their data never was on the client
    remote = [c.submit(np.full, 4, float(i), pure=False) for i in range(10, 20)]
    futures = batcher.map(xs[:10] + remote)
    results = await asyncio.gather(*futures)
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r, np.full(4, 2.0 * i + 1))
    failing = c.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        await batcher.submit(failing)
    batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_poison_request_fails_alone(c, s, a):
    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec("poisoned", load=build_poisoned, max_batch_size=64))
    xs = [np.array([float(i), 0.0]) for i in range(64)]
    xs[17] = np.array([-1.0, 0.0])
    futures = batcher.map(xs)
    await asyncio.wait([asyncio.wrap_future(f) for f in futures])
    for i, f in enumerate(futures):
        if i == 17:
            assert isinstance(f.exception(), ValueError) and "poison" in str(f.exception())
        else:
            np.testing.assert_array_equal(f.result(), xs[i] * 2 + 1)
    assert batcher.stats()["failed"] == 1
    batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_model_that_fails_to_load_fails_its_requests_clearly(c, s, a):
    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec("broken", load=build_broken))
    with pytest.raises(RuntimeError, match="weights file is missing"):
        await batcher.submit(np.zeros(2))
    batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_misuse_errors(c, s, a):
    with pytest.raises(ddb.PluginNotRegisteredError, match="register_plugin"):
        await ddb.Batcher(c, ddb.ModelSpec("affine", load=build_affine))
    await c.register_plugin(ddb.DynBatchPlugin())
    await c.register_plugin(ddb.DynBatchPlugin())  # twice is harmless
    batcher = await ddb.Batcher(c, ddb.ModelSpec("affine", load=build_affine))
    assert (await batcher.submit(np.zeros(2))).tolist() == [1.0, 1.0]
    with pytest.raises(ddb.InputSignatureError, match=r"expects one sample of shape \(2,\).*received shape \(3,\)"):
        batcher.submit(np.zeros(3))
    with pytest.raises(ddb.UnknownModelError, match="nope"):
        await ddb.Batcher.from_name(c, "nope")
    attached = await ddb.Batcher.from_name(c, "affine")
    assert (await attached.submit(np.ones(2))).tolist() == [3.0, 3.0]
    batcher.close()
    with pytest.raises(ddb.BatcherClosedError):
        batcher.submit(np.zeros(2))
    attached.close()


def test_model_spec_validation():
    with pytest.raises(ValueError, match="latency_target"):
        ddb.ModelSpec("m", load=build_affine, latency_target="soon")
    with pytest.raises(ValueError, match="max_batch_size"):
        ddb.ModelSpec("m", load=build_affine, max_batch_size=0)
    with pytest.raises(TypeError, match="load must be callable"):
        ddb.ModelSpec("m", load=None)
    spec = ddb.ModelSpec("m", load=build_affine, latency_target="50ms")
    assert spec.latency_target == pytest.approx(0.05)
    assert pickle.loads(pickle.dumps(spec)) == spec


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_cancel_while_queued(c, s, a):
    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec("affine", load=build_affine, max_batch_size=4))
    futures = batcher.map([np.full(1, float(i)) for i in range(400)])
    cancelled = [f for f in futures[200:] if f.cancel()]
    await asyncio.wait([asyncio.wrap_future(f) for f in futures])
    for i, f in enumerate(futures):
        if f in cancelled:
            assert f.cancelled()
        else:
            assert f.result() == pytest.approx(2 * i + 1)
    stats = batcher.stats()
    assert stats["delivered"] + len(cancelled) == 400
    assert stats["cancelled"] == len(cancelled)
    batcher.close()


def test_multiprocess_cluster_end_to_end():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            client.register_plugin(ddb.DynBatchPlugin())
            batcher = ddb.Batcher(client, ddb.ModelSpec("tiny-cnn", load=build_tiny_cnn, max_batch_size=64))
            images = tiny_cnn_images(500, seed=1)
            futures = batcher.map(images)
            results = np.stack([f.result(timeout=60) for f in futures])
            np.testing.assert_allclose(results, expected_cnn(images), rtol=1e-4, atol=1e-5)
            stats = batcher.stats()
            assert stats["delivered"] == 500
            assert len(stats["workers"]) == 2
            # the worker half reports on the heartbeat
            state = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.extensions["dynbatch"].state())
            assert "tiny-cnn" in state["models"]
            batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_large_batches_travel_in_chunks_and_are_joined_on_the_worker(c, s, a):
    import dask_dynbatch.client.transport as transport

    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec("affine", load=build_affine, max_batch_size=16))
    xs = [np.full((160, 160, 3), float(i), dtype=np.float32) for i in range(40)]  # 300 KB each
    remote = c.submit(np.full, (160, 160, 3), 99.0, dtype=np.float32, pure=False)
    chunk_bytes = transport.SEND_CHUNK_BYTES
    transport.SEND_CHUNK_BYTES = 1_000_000  # 3 samples a chunk: shipments of 16 go as 6 chunks
    try:
        results = await asyncio.gather(*batcher.map(xs + [remote]))
    finally:
        transport.SEND_CHUNK_BYTES = chunk_bytes
    for i, r in enumerate(results[:40]):
        np.testing.assert_array_equal(r, xs[i] * 2 + 1)
    np.testing.assert_array_equal(results[40], np.full((160, 160, 3), 199.0, dtype=np.float32))
    assert max(h["size"] for h in batcher.history()) > 3  # batches were larger than one chunk
    batcher.close()


def test_stack_in_chunks_round_trip():
    from dask_dynbatch.core.rows import stack_in_chunks

    xs = [np.full((10,), i, dtype=np.float64) for i in range(7)]  # 80 bytes each
    whole = stack_in_chunks(xs, 10_000)
    assert isinstance(whole, np.ndarray) and whole.shape == (7, 10)
    chunks = stack_in_chunks(xs, 250)  # 3 samples a chunk
    assert [len(c) for c in chunks] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(chunks), whole)
    assert [len(c) for c in stack_in_chunks(xs, 10)] == [1] * 7  # a sample larger than a chunk travels alone
