"""The opt-in reference benchmark (dask_dynbatch.worker.reference): tables, the timing loop, the device run;
the plain-Dask baselines the benchmarks compare against."""

from __future__ import annotations

import builtins

import numpy as np
import pytest

from dask_dynbatch.worker.reference import (
    STATUS_OOM,
    STATUS_SKIPPED_AFTER_OOM,
    STATUS_SKIPPED_BUDGET,
    benchmark_device,
    measure_table,
    reference_model,
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


# ----------------------------------------------------------------------------------------------
# The table: interpolation and serialisation
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# The real reference model on CPU
# ----------------------------------------------------------------------------------------------


def test_small_cnn_shapes():
    pytest.importorskip("torch")
    import torch

    model = small_cnn().eval()
    with torch.inference_mode():
        out = model(torch.zeros(2, 3, 64, 64))
    assert tuple(out.shape) == (2, 10)


def test_reference_model_without_torchvision(monkeypatch):
    pytest.importorskip("torch")
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
    pytest.importorskip("torch")
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
    assert table.to_dict()["best_throughput"] == table.best_throughput


def test_benchmark_device_bare_module():
    pytest.importorskip("torch")
    table = benchmark_device("cpu", time_budget_s=0.3, model=small_cnn(), batch_sizes=(1, 2), sample_shape=(3, 64, 64))
    assert table.model_name == "Sequential"
    assert table.ran_rows and table.best_throughput > 0


def test_rerun_benchmark_on_request_from_a_client():
    """The reference benchmark runs on request (it is opt-in at start), and the score reaches the scheduler."""
    from distributed.utils_test import gen_cluster

    import dask_dynbatch as ddb

    @gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
    async def check(c, s, a):
        with pytest.raises(ddb.PluginNotRegisteredError):
            await ddb.rerun_benchmark(c)
        await c.register_plugin(ddb.DynBatchPlugin())
        plugin = a.extensions["dynbatch"]
        assert plugin.benchmark is None  # not measured at start unless asked for
        tables = await ddb.rerun_benchmark(c)
        assert list(tables) == [a.address]
        table = tables[a.address]
        assert table.get("best_throughput") == plugin.benchmark.get("best_throughput")  # measured and returned
        assert ("rows" in table and table["best_throughput"] > 0) or "error" in table
        await a.heartbeat()
        assert s.extensions["dynbatch"].worker_view(a.address).benchmark == table.get("best_throughput")

    check()


def test_baselines_wait_for_outputs_on_their_way_to_the_host(monkeypatch):
    """On CUDA a batch's outputs come back as a PendingHost; the plain-Dask baselines return arrays."""
    from dask_dynbatch import baselines
    from dask_dynbatch.worker.model import PendingHost

    class Done:
        def synchronize(self):
            pass

    monkeypatch.setattr(baselines, "_model", lambda load, device: (lambda batch: PendingHost(np.ones((len(batch), 2)), Done())))
    assert baselines.predict_chunk(None, np.zeros((3, 4)), "cuda:0").shape == (3, 2)
    assert baselines.predict_one(None, np.zeros(4), "cuda:0").shape == (2,)
