"""Tests for dask_dynbatch.benchmark: load-performance tables, the timing loop, lazy tables."""

from __future__ import annotations

import builtins
import json

import pytest

from dask_dynbatch.benchmark import (
    STATUS_OOM,
    STATUS_SKIPPED_AFTER_OOM,
    STATUS_SKIPPED_BUDGET,
    LazyModelTable,
    LoadPerformanceRow,
    LoadPerformanceTable,
    benchmark_device,
    looks_like_oom,
    measure_table,
    reference_model,
    size_bucket,
    small_cnn,
)


class FakeDevice:
    """A fake clock plus a fake ``run_batch``: a batch of n takes fixed + n * per_sample s."""

    def __init__(self, fixed_s: float = 0.01, per_sample_s: float = 0.001, oom_above: int | None = None):
        self.now = 100.0
        self.fixed_s = fixed_s
        self.per_sample_s = per_sample_s
        self.oom_above = oom_above
        self.calls: list[int] = []

    def clock(self) -> float:
        return self.now

    def run_batch(self, n: int) -> None:
        self.calls.append(n)
        if self.oom_above is not None and n > self.oom_above:
            self.now += 0.001
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.now += self.fixed_s + self.per_sample_s * n


# ----------------------------------------------------------------------------------------------
# measure_table
# ----------------------------------------------------------------------------------------------


def test_measure_table_deterministic_rows():
    fake = FakeDevice()
    table = measure_table(
        fake.run_batch, (1, 8, 32), time_budget_s=10.0, warmup=1, clock=fake.clock, max_runs=3,
        device="fake", model_name="m",
    )
    assert [r.batch_size for r in table.rows] == [1, 8, 32]
    for row in table.rows:
        assert row.ran and row.status == "ok"
        expected_latency = 0.01 + 0.001 * row.batch_size
        assert row.latency_s == pytest.approx(expected_latency)
        assert row.samples_per_s == pytest.approx(row.batch_size / expected_latency)
        assert row.runs == 3
    # one warm-up + three timed calls per size
    assert fake.calls == [1] * 4 + [8] * 4 + [32] * 4
    assert table.largest_batch == 32
    assert table.best_throughput == pytest.approx(32 / 0.042)
    assert table.best_batch_size == 32
    assert table.device == "fake" and table.model_name == "m"
    assert table.elapsed_s == pytest.approx(fake.now - 100.0)


def test_measure_table_respects_budget():
    fake = FakeDevice(fixed_s=0.01, per_sample_s=0.001)
    budget = 0.5
    sizes = (1, 8, 32, 128, 512)
    table = measure_table(fake.run_batch, sizes, time_budget_s=budget, warmup=1, clock=fake.clock)
    assert table.elapsed_s <= budget + 1e-9
    ran = [r.batch_size for r in table.rows if r.ran]
    assert ran and ran == sorted(ran)
    assert 512 not in ran  # one call of 512 takes 0.522 s: predicted not to fit
    skipped = [r for r in table.rows if not r.ran]
    assert skipped and all(r.status == STATUS_SKIPPED_BUDGET for r in skipped)
    # rows for every size, sorted
    assert [r.batch_size for r in table.rows] == list(sizes)


def test_measure_table_tiny_budget_still_measures_first_size():
    fake = FakeDevice()
    table = measure_table(fake.run_batch, (4, 1, 16), time_budget_s=0.0, clock=fake.clock)
    assert [r.batch_size for r in table.rows] == [1, 4, 16]
    assert table.rows[0].ran
    assert [r.status for r in table.rows[1:]] == [STATUS_SKIPPED_BUDGET] * 2
    # the first size ran once after warm-up
    assert fake.calls == [1, 1]


def test_measure_table_budget_split_gives_repeats():
    fake = FakeDevice(fixed_s=0.001, per_sample_s=0.0)
    table = measure_table(fake.run_batch, (1, 2), time_budget_s=1.0, clock=fake.clock, max_runs=1000)
    assert all(r.runs > 100 for r in table.rows)
    assert table.elapsed_s <= 1.0 + 0.002


def test_measure_table_oom_stops_growth():
    fake = FakeDevice(oom_above=32)
    table = measure_table(fake.run_batch, (1, 8, 32, 128, 256), time_budget_s=100.0, clock=fake.clock)
    statuses = {r.batch_size: (r.ran, r.status) for r in table.rows}
    assert statuses[32] == (True, "ok")
    assert statuses[128] == (False, STATUS_OOM)
    assert statuses[256] == (False, STATUS_SKIPPED_AFTER_OOM)
    assert 256 not in fake.calls
    assert fake.calls.count(128) == 1  # failed during warm-up, not retried
    assert table.largest_batch == 32


def test_measure_table_other_errors_propagate():
    def broken(n: int) -> None:
        raise ValueError("bad model")

    with pytest.raises(ValueError, match="bad model"):
        measure_table(broken, (1,), time_budget_s=1.0)


def test_measure_table_custom_is_oom():
    class Full(Exception):
        pass

    def run(n: int) -> None:
        if n > 1:
            raise Full()

    table = measure_table(run, (1, 2, 4), time_budget_s=5.0, is_oom=lambda e: isinstance(e, Full))
    assert [r.status for r in table.rows] == ["ok", STATUS_OOM, STATUS_SKIPPED_AFTER_OOM]


def test_measure_table_validates_sizes():
    with pytest.raises(ValueError):
        measure_table(lambda n: None, ())
    with pytest.raises(ValueError):
        measure_table(lambda n: None, (0, 1))


def test_looks_like_oom():
    class OutOfMemoryError(RuntimeError):
        pass

    assert looks_like_oom(MemoryError())
    assert looks_like_oom(OutOfMemoryError("x"))
    assert looks_like_oom(RuntimeError("CUDA out of memory. Tried to allocate"))
    assert not looks_like_oom(ValueError("shape mismatch"))


# ----------------------------------------------------------------------------------------------
# The table: interpolation and serialisation
# ----------------------------------------------------------------------------------------------


def _affine_table() -> LoadPerformanceTable:
    # latency = 0.01 + 0.001 n at n = 4, 16, 64; size 256 failed.
    rows = [
        LoadPerformanceRow(n, samples_per_s=n / (0.01 + 0.001 * n), latency_s=0.01 + 0.001 * n, ran=True, runs=1)
        for n in (4, 16, 64)
    ]
    rows.append(LoadPerformanceRow(256, status=STATUS_OOM))
    return LoadPerformanceTable(device="cpu", model_name="m", rows=rows)


def test_throughput_interpolation():
    table = _affine_table()
    for n in (4, 10, 16, 40, 64):
        assert table.latency_at(n) == pytest.approx(0.01 + 0.001 * n)
        assert table.throughput_at(n) == pytest.approx(n / (0.01 + 0.001 * n))
    # below the smallest size: the affine line extends (clamped)
    assert table.latency_at(1) == pytest.approx(0.011)
    # above the largest that ran: as if split into batches of 64
    assert table.throughput_at(1000) == pytest.approx(table.throughput_at(64))
    assert table.largest_batch == 64
    assert table.row(256).status == STATUS_OOM
    assert table.row(3) is None
    empty = LoadPerformanceTable(device="cpu", model_name="m")
    assert empty.throughput_at(8) is None and empty.best_throughput is None and empty.largest_batch is None


def test_latency_extrapolation_is_clamped():
    rows = [
        LoadPerformanceRow(8, samples_per_s=8 / 0.008, latency_s=0.008, ran=True),
        LoadPerformanceRow(16, samples_per_s=16 / 0.032, latency_s=0.032, ran=True),  # superlinear
    ]
    table = LoadPerformanceTable(device="cpu", model_name="m", rows=rows)
    # the line would go negative at n=1: clamp to the same per-sample time as size 8
    assert table.latency_at(1) == pytest.approx(0.001)
    single = LoadPerformanceTable(device="cpu", model_name="m", rows=rows[:1])
    assert single.latency_at(2) == pytest.approx(0.008)


def test_table_round_trip():
    table = _affine_table()
    table.device_name = "fake"
    data = table.to_dict()
    assert data["largest_batch"] == 64
    assert data["best_throughput"] == pytest.approx(table.best_throughput)
    restored = LoadPerformanceTable.from_dict(json.loads(json.dumps(data)))
    assert restored == table


# ----------------------------------------------------------------------------------------------
# The real reference model on CPU
# ----------------------------------------------------------------------------------------------


def test_small_cnn_shapes():
    import torch

    model = small_cnn().eval()
    with torch.inference_mode():
        out = model(torch.zeros(2, 3, 64, 64))
    assert tuple(out.shape) == (2, 10)


def test_reference_model_without_torchvision(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("torchvision"):
            raise ImportError("no torchvision here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    reference = reference_model("cpu")
    assert reference.name == "small_cnn"
    assert reference.sample_shape == (3, 64, 64)
    assert reference.dtype == "float32" and not reference.channels_last
    with pytest.raises(ImportError):
        reference_model("cpu", prefer="resnet50")
    with pytest.raises(ValueError):
        reference_model("cpu", prefer="vgg")


def test_benchmark_device_cpu_small_cnn():
    reference = reference_model("cpu", prefer="small_cnn")
    table = benchmark_device("cpu", time_budget_s=0.5, model=reference, batch_sizes=(1, 4, 16))
    assert table.device == "cpu"
    assert table.model_name == "small_cnn"
    assert table.dtype == "float32"
    ran = table.ran_rows
    assert ran, table
    for row in ran:
        assert row.samples_per_s > 0 and row.latency_s > 0 and row.runs >= 1
    assert table.best_throughput > 0
    assert table.largest_batch in (1, 4, 16)
    assert table.elapsed_s < 10  # budget 0.5 s; generous bound for slow CI machines
    LoadPerformanceTable.from_dict(table.to_dict())


def test_benchmark_device_bare_module():
    table = benchmark_device("cpu", time_budget_s=0.3, model=small_cnn(), batch_sizes=(1, 2), sample_shape=(3, 64, 64))
    assert table.model_name == "Sequential"
    assert table.ran_rows and table.best_throughput > 0


# ----------------------------------------------------------------------------------------------
# LazyModelTable
# ----------------------------------------------------------------------------------------------


def test_size_bucket():
    assert [size_bucket(n) for n in (1, 2, 3, 4, 7, 8, 15, 16, 100)] == [1, 2, 2, 4, 4, 8, 8, 16, 64]
    with pytest.raises(ValueError):
        size_bucket(0)


def test_lazy_table_ewma_math():
    table = LazyModelTable("m", "cpu", alpha=0.5)
    assert table.throughput() is None
    assert table.observe(8, 0.1)
    assert table.throughput() == pytest.approx(80.0)
    table.observe(8, 0.2)  # mean seconds 0.15
    assert table.throughput(8) == pytest.approx(8 / 0.15)
    table.observe(12, 0.15)  # same bucket: mean size 10, mean seconds 0.15
    assert table.bucket_throughputs() == {8: pytest.approx(10 / 0.15)}
    table.observe(32, 0.1)  # 320 samples/s in bucket 32
    assert table.throughput() == pytest.approx(320.0)  # best bucket
    assert table.throughput(8) == pytest.approx(10 / 0.15)
    assert table.throughput(16) == pytest.approx(320.0)  # equidistant: the larger bucket
    assert table.throughput(1) == pytest.approx(10 / 0.15)  # nearest observed
    assert table.throughput(1000) == pytest.approx(320.0)
    assert table.observations == 4


def test_lazy_table_ignores_bad_durations_and_uses_prior():
    table = LazyModelTable(prior_throughput=42.0)
    assert table.throughput() == 42.0
    assert not table.observe(4, 0.0)
    assert not table.observe(4, float("nan"))
    assert table.throughput() == 42.0
    with pytest.raises(ValueError):
        table.observe(0, 1.0)
    with pytest.raises(ValueError):
        LazyModelTable(alpha=0.0)


def test_lazy_table_tracks_a_change():
    table = LazyModelTable(alpha=0.3)
    for _ in range(5):
        table.observe(16, 0.016)  # 1000/s
    for _ in range(20):
        table.observe(16, 0.032)  # slowed to 500/s
    assert table.throughput() == pytest.approx(500.0, rel=0.01)


def test_lazy_table_export_and_round_trip():
    table = LazyModelTable("m", "cuda:0", alpha=0.25)
    table.observe(4, 0.01)
    table.observe(64, 0.05)
    exported = table.to_table()
    assert [r.batch_size for r in exported.rows] == [4, 64]
    assert exported.throughput_at(64) == pytest.approx(64 / 0.05)
    assert exported.best_throughput == pytest.approx(64 / 0.05)
    data = json.loads(json.dumps(table.to_dict()))
    restored = LazyModelTable.from_dict(data)
    assert restored.bucket_throughputs() == pytest.approx(table.bucket_throughputs())
    assert restored.alpha == 0.25 and restored.device == "cuda:0"


def test_rerun_benchmark_on_request_from_a_client():
    """The reference benchmark runs again on request, and the new table reaches the scheduler."""
    import asyncio

    from distributed.utils_test import gen_cluster

    import dask_dynbatch as ddb

    @gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
    async def check(c, s, a):
        with pytest.raises(ddb.PluginNotRegisteredError):
            await ddb.rerun_benchmark(c)
        await c.register_plugin(ddb.DynBatchPlugin())
        plugin = a.extensions["dynbatch"]
        while plugin.benchmark is None:  # the one measured when the plugin started
            await asyncio.sleep(0.05)
        first = plugin.benchmark
        tables = await ddb.rerun_benchmark(c)
        assert list(tables) == [a.address]
        table = tables[a.address]
        assert plugin.benchmark is not first  # measured again ...
        assert table.get("best_throughput") == plugin.benchmark.get("best_throughput")  # ... and returned
        assert ("rows" in table and table["best_throughput"] > 0) or "error" in table
        await a.heartbeat()
        sent = s.workers[a.address].metrics["dynbatch"]["benchmark"]
        assert sent.get("best_throughput") == table.get("best_throughput")

    check()
