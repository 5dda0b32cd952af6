"""Memory sources and snapshots (dask_dynbatch.worker.telemetry; no GPU needed)."""

from __future__ import annotations

import json
import sys
import types

import pytest

from dask_dynbatch.core.memory import DeviceMemory, FakeMemory, MemorySource
from dask_dynbatch.worker import telemetry
from dask_dynbatch.worker.telemetry import (
    CupyMemory,
    HostMemory,
    NvmlMemory,
    TorchCudaMemory,
    detect_memory_source,
    device_telemetry,
    parse_device,
)

MB = 1 << 20


def test_device_memory_properties():
    reading = DeviceMemory(total=1000, free=300, framework_reserved_unused=50)
    assert reading.capacity == 1000 and reading.effective_free == 350
    limited = DeviceMemory(total=1000, free=300, limit=600)
    assert limited.capacity == 600
    out = json.loads(json.dumps(limited.to_dict()))
    assert out["capacity"] == 600 and out["effective_free"] == 300 and out["limit"] == 600


def test_fake_memory_is_settable_and_counts_reads():
    fake = FakeMemory(total=1000, free=800)
    assert isinstance(fake, MemorySource)
    assert fake.read().free == 800 and fake.reads == 1
    fake.free = 100
    fake.total = 2000
    fake.framework_reserved_unused = 10
    reading = fake.read()
    assert (reading.total, reading.free, reading.effective_free) == (2000, 100, 110)
    assert reading.source == "fake" and fake.reads == 2


def test_host_memory_on_this_machine():
    import psutil

    reading = HostMemory().read()
    assert reading.total == psutil.virtual_memory().total
    assert 0 < reading.free <= reading.total
    assert reading.limit is None and reading.framework_used > 0
    assert reading.source == "host"


def test_host_memory_with_worker_memory_limit():
    import psutil

    rss = psutil.Process().memory_info().rss
    reading = HostMemory(rss + 200 * MB).read()
    assert reading.limit == rss + 200 * MB
    assert 0 <= reading.free <= 200 * MB + MB  # the limit minus RSS, RSS moves a little
    assert reading.capacity == rss + 200 * MB
    # a limit the process already exceeds leaves nothing free
    assert HostMemory(max(1, rss // 2)).read().free == 0
    half = HostMemory(2 * (rss + 200 * MB), limit_fraction=0.5).read()
    assert half.limit == rss + 200 * MB
    with pytest.raises(ValueError):
        HostMemory(100, limit_fraction=0)


def test_detect_memory_source_cpu():
    pytest.importorskip("distributed")  # loads the distributed.* config defaults
    source = detect_memory_source("cpu")
    assert isinstance(source, HostMemory) and source.memory_limit is None
    assert source.read().free > 0

    limited = detect_memory_source("cpu", memory_limit=4_000 * MB)
    assert isinstance(limited, HostMemory)
    # by default batches may fill the worker up to Dask's pause threshold (0.8)
    import dask

    pause = dask.config.get("distributed.worker.memory.pause", default=False)
    assert limited.limit_fraction == pytest.approx(pause if pause else 1.0)
    explicit = detect_memory_source("cpu", memory_limit=4_000 * MB, limit_fraction=0.5)
    assert explicit.limit_fraction == 0.5


def test_detect_memory_source_cuda_without_gpu_raises():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    try:
        NvmlMemory(0)
    except Exception:
        pass
    else:
        pytest.skip("NVML sees a GPU here")
    with pytest.raises(RuntimeError, match="no memory source"):
        detect_memory_source("cuda:0")


def test_detect_memory_source_prefers_torch(monkeypatch):
    monkeypatch.setattr(telemetry, "_torch_cuda_usable", lambda index: True)
    monkeypatch.setattr(telemetry, "_cupy_usable", lambda index: True)
    source = detect_memory_source("cuda:1")
    assert isinstance(source, TorchCudaMemory) and source.device_index == 1
    assert isinstance(detect_memory_source("cuda", prefer="cupy"), CupyMemory)
    with pytest.raises(ValueError):
        detect_memory_source("cuda", prefer="jax")


def test_parse_device():
    assert parse_device("cpu") == ("cpu", 0)
    assert parse_device("cuda") == ("cuda", 0)
    assert parse_device("cuda:3") == ("cuda", 3)
    assert parse_device("GPU:1") == ("cuda", 1)
    for bad in ("tpu", "cuda:x", "cuda:-1"):
        with pytest.raises(ValueError):
            parse_device(bad)


def test_device_telemetry_snapshot_and_errors():
    snapshot = device_telemetry(FakeMemory(total=1000, free=250))
    assert json.loads(json.dumps(snapshot)) == snapshot
    assert snapshot["source"] == "fake" and snapshot["free"] == 250
    assert snapshot["used_fraction"] == pytest.approx(0.75)

    class Broken:
        name = "broken"

        def read(self):
            raise OSError("driver gone")

    assert device_telemetry(Broken()) == {"source": "broken", "error": "OSError: driver gone"}
    host = device_telemetry(HostMemory())
    assert host["source"] == "host" and host["free"] > 0


def test_torch_cuda_memory_adds_unused_cache(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (300 * MB, 1000 * MB))
    monkeypatch.setattr(torch.cuda, "memory_stats_as_nested_dict", lambda device=None: {
        "reserved_bytes": {"all": {"current": 500 * MB}}, "allocated_bytes": {"all": {"current": 350 * MB}}})
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 1.0, raising=False)
    reading = TorchCudaMemory(0).read()
    assert (reading.total, reading.free) == (1000 * MB, 300 * MB)
    assert reading.framework_reserved_unused == 150 * MB
    assert reading.effective_free == 450 * MB
    assert reading.framework_used == 350 * MB and reading.limit is None
    assert reading.source == "torch-cuda"

    # a per-process fraction is a limit: torch will not reserve beyond it
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 0.6, raising=False)
    reading = TorchCudaMemory(0).read()
    assert reading.limit == 600 * MB and reading.free == 100 * MB
    assert reading.effective_free == 250 * MB


def _fake_cupy(pool_total, pool_used, limit=0):
    cupy = types.ModuleType("cupy")

    class Device:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class Pool:
        def total_bytes(self):
            return pool_total

        def used_bytes(self):
            return pool_used

        def get_limit(self):
            return limit

    runtime = types.SimpleNamespace(memGetInfo=lambda: (400 * MB, 1000 * MB), getDeviceCount=lambda: 1)
    cupy.cuda = types.SimpleNamespace(Device=Device, runtime=runtime)
    cupy.get_default_memory_pool = lambda: Pool()
    return cupy


def test_cupy_memory_adds_unused_pool(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(300 * MB, 100 * MB))
    reading = CupyMemory(0).read()
    assert (reading.free, reading.framework_reserved_unused) == (400 * MB, 200 * MB)
    assert reading.effective_free == 600 * MB and reading.framework_used == 100 * MB
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(300 * MB, 100 * MB, limit=500 * MB))
    reading = CupyMemory(0).read()
    assert reading.limit == 500 * MB and reading.free == 200 * MB


def test_nvml_memory_maps_visible_devices(monkeypatch):
    asked = []
    pynvml = types.ModuleType("pynvml")
    pynvml.nvmlDeviceGetHandleByIndex = lambda i: asked.append(("index", i)) or ("h", i)
    pynvml.nvmlDeviceGetHandleByUUID = lambda u: asked.append(("uuid", u)) or ("h", u)
    pynvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=1000 * MB, free=700 * MB, used=300 * MB)
    monkeypatch.setitem(sys.modules, "pynvml", pynvml)
    monkeypatch.setattr(telemetry, "_nvml_ready", lambda: True)

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    reading = NvmlMemory(1).read()
    assert asked[-1] == ("index", 5)
    assert (reading.total, reading.free, reading.nvml_free) == (1000 * MB, 700 * MB, 700 * MB)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-abc")
    NvmlMemory(0)
    assert asked[-1] == ("uuid", b"GPU-abc")
    with pytest.raises(RuntimeError):
        NvmlMemory(2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    NvmlMemory(2)
    assert asked[-1] == ("index", 2)


def test_torch_cuda_allocator_stats_reads_the_nested_statistics_once(monkeypatch):
    pytest.importorskip("torch")
    import torch

    from dask_dynbatch.worker.telemetry import torch_cuda_allocator_stats

    calls = []

    def nested(device):
        calls.append(device)
        return {"allocated_bytes": {"all": {"current": 300, "peak": 900}, "large_pool": {"current": 1}},
                "reserved_bytes": {"all": {"current": 2048}}}

    monkeypatch.setattr(torch.cuda, "memory_stats_as_nested_dict", nested)
    assert torch_cuda_allocator_stats("cuda:0") == {"allocated": 300, "peak": 900, "reserved": 2048}
    assert calls == ["cuda:0"]
    monkeypatch.setattr(torch.cuda, "memory_stats_as_nested_dict", lambda device: {})  # allocator not started
    assert torch_cuda_allocator_stats("cuda:0") == {"allocated": 0, "peak": 0, "reserved": 0}
