"""Compiled execution with batch-size buckets: the ladder, padding, the controller on a
ladder, background compilation with eager serving meanwhile, and the fallback when compiling fails.

Compilation runs for real (``torch.compile``, inductor on this CPU) on a small MLP. Where a test must
know when a bucket compiles, the compile thread is replaced by a list of jobs that the test runs
itself, so nothing depends on timing.
"""

from __future__ import annotations

import asyncio
import warnings

import numpy as np
import pytest
from distributed.utils_test import gen_cluster

import dask_dynbatch as ddb
from dask_dynbatch.core.controller import BatchSizeController
from dask_dynbatch.core.ladder import bucket_for, bucket_ladder, compile_mode, floor_rung, next_rung
from dask_dynbatch.examples import build_affine, build_torch_mlp
from dask_dynbatch.scheduler.dashboard import compile_text
from dask_dynbatch.worker.model import LoadedModel, pad_rows, trim_rows

torch = pytest.importorskip("torch")
try:  # inductor's progress bars start tqdm's monitor thread, which gen_cluster reports as leaked
    import tqdm

    tqdm.tqdm.monitor_interval = 0
except ImportError:
    pass


def eager_mlp(xs: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return build_torch_mlp()(torch.from_numpy(xs)).numpy()


def vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# The ladder (pure)
# ------------------------------------------------------------------------------------------------
def test_default_ladder_is_powers_of_two_up_to_the_limit():
    assert bucket_ladder(None, 64) == (1, 2, 4, 8, 16, 32, 64)
    assert bucket_ladder(None, 100) == (1, 2, 4, 8, 16, 32, 64, 100)
    assert bucket_ladder(None, None)[-1] == 2**16
    assert bucket_ladder([48, 8, 16, 8], None) == (8, 16, 48)
    assert bucket_ladder([8, 16, 512], 100) == (8, 16)


def test_rung_lookups():
    ladder = (4, 8, 16)
    assert [bucket_for(ladder, n) for n in (1, 4, 5, 16, 17)] == [4, 4, 8, 16, None]
    assert [floor_rung(ladder, n) for n in (2, 4, 9, 100)] == [2, 4, 8, 16]
    assert [next_rung(ladder, n) for n in (1, 4, 15, 16)] == [4, 8, 16, None]


def test_padding_repeats_the_last_row_and_trimming_removes_it():
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    padded = pad_rows(x, 8)
    assert padded.shape == (8, 2)
    np.testing.assert_array_equal(padded[:3], x)
    np.testing.assert_array_equal(padded[3:], np.repeat(x[-1:], 5, axis=0))
    t = pad_rows(torch.from_numpy(x), 4)
    assert tuple(t.shape) == (4, 2) and torch.equal(t[3], t[2])
    outputs = {"a": padded, "b": (padded * 2, [f"row {i}" for i in range(8)])}  # a list: one element per row
    trimmed = trim_rows(outputs, 3)
    np.testing.assert_array_equal(trimmed["a"], x)
    np.testing.assert_array_equal(trimmed["b"][0], x * 2)
    assert trimmed["b"][1] == ["row 0", "row 1", "row 2"]


def test_dashboard_cell_for_the_compile_state():
    state = {"ready": [64, 128], "buckets": {"64": {"state": "ready"}, "256": {"state": "compiling"}},
             "compile_seconds": 12.34, "error": None}
    assert compile_text(state) == "64,128; compiling 256 (12.3 s)"
    assert compile_text(None) == ""  # a model that does not compile
    assert compile_text({"ready": [], "buckets": {}}) == "none yet"


def test_spec_validates_compile_and_buckets():
    load = build_torch_mlp
    assert compile_mode(True) == "default" and compile_mode(False) is None
    assert ddb.ModelSpec("m", load=load, compile="reduce-overhead").compile_mode() == "reduce-overhead"
    with pytest.raises(ValueError, match="compile must be"):
        ddb.ModelSpec("m", load=load, compile="fastest")
    with pytest.raises(ValueError, match="compile must be"):
        ddb.ModelSpec("m", load=load, variants={"cuda": ddb.DeviceVariant(compile="nope")})
    for bad in ([], [0, 4], "8", [2.5]):
        with pytest.raises(ValueError, match="buckets"):
            ddb.ModelSpec("m", load=load, buckets=bad)
    plain = ddb.ModelSpec("m", load=load)
    assert plain.ladder() is None  # no compile, no buckets: batches of any size
    spec = ddb.ModelSpec("m", load=load, compile=True, max_batch_size=32,
                         variants={"cpu": ddb.DeviceVariant(compile=False)})
    assert spec.ladder("cuda:0") == (1, 2, 4, 8, 16, 32)
    assert spec.ladder("cpu") is None and spec.compile_mode("cpu") is None


# ------------------------------------------------------------------------------------------------
# The controller on a ladder
# ------------------------------------------------------------------------------------------------
def test_controller_steps_between_rungs_and_rounds_bounds_down():
    ladder = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    c = BatchSizeController(0.11, initial_size=8, ladder=ladder)
    seen = []
    for _ in range(200):  # latency 10 ms + 1 ms per sample: 64 (74 ms) is the largest rung on time
        size = c.size
        latency = 0.01 + 0.001 * size
        c.observe(size, latency, latency)
        seen.append(c.size)
    assert set(seen) <= set(ladder)
    assert seen[-50:].count(64) >= 45  # settles on the best rung; late probes to 128 are undone
    c.set_cap(100)
    assert c.size == 64
    c.set_cap(40)
    assert c.size == 32  # a memory cap is rounded down to a rung
    assert c.state()["ladder"] == list(ladder)


# ------------------------------------------------------------------------------------------------
# LoadedModel with a compile thread the test drives
# ------------------------------------------------------------------------------------------------
class Jobs(list):
    """Stands in for the worker's compile thread: holds jobs until the test runs them."""

    def run_all(self):
        while self:
            self.pop(0)()


def compiled_mlp(max_batch_size: int, **kwargs) -> tuple[LoadedModel, Jobs]:
    """The MLP loaded with ``compile=True`` on this CPU; its compile thread is a :class:`Jobs`."""
    jobs = Jobs()
    spec = ddb.ModelSpec("mlp", load=build_torch_mlp, compile=True, max_batch_size=max_batch_size)
    return LoadedModel(spec, "cpu", compile_submit=jobs.append, **kwargs), jobs


def compile_bucket_of(loaded: LoadedModel, jobs: Jobs, batch: np.ndarray) -> None:
    """Two eager batches queue the batch's bucket (and the rung above); then compile them."""
    loaded(batch)
    loaded(batch)
    jobs.run_all()


def test_no_batch_waits_for_a_compile_and_every_bucket_agrees_with_eager():
    loaded, jobs = compiled_mlp(16)
    xs = vectors(16)
    # batches run eagerly at once; a one-off batch of a size queues nothing, the second queues
    # the compile of its bucket (and of the rung above), and does not wait for it
    np.testing.assert_array_equal(loaded(xs[:8]), eager_mlp(xs[:8]))
    assert not jobs and loaded.compiler.summary()["buckets"] == {}
    np.testing.assert_array_equal(loaded(xs[:8]), eager_mlp(xs[:8]))
    assert len(jobs) == 1 and loaded.compiler.summary()["buckets"]["8"]["state"] == "queued"
    assert loaded.compiler.eager_batches == 2 and loaded.compiler.compiled_batches == 0
    assert not loaded.compiling  # queued: nothing compiles in this process yet
    during = []
    run = loaded.compiler._run
    loaded.compiler._run = lambda model, batch: (during.append(loaded.compiling), run(model, batch))[1]
    jobs.run_all()  # compiles 8, then the rung above (16)
    # while it compiled, the worker would have told the client: these batches say little about size
    assert during and all(during) and not loaded.compiling
    assert loaded.compiler.summary()["ready"] == [8, 16]
    for n in range(1, 17):  # every size, so every bucket and every amount of padding
        loaded(xs[:n])  # the batches of a bucket not compiled yet queue it
        loaded(xs[:n])
        jobs.run_all()
        out = loaded(xs[:n])
        assert out.shape == (n, 4)  # padding never leaks into results
        np.testing.assert_allclose(out, eager_mlp(xs[:n]), rtol=1e-4, atol=1e-5)
    summary = loaded.compiler.summary()
    assert summary["ready"] == [1, 2, 4, 8, 16] and summary["error"] is None
    assert summary["compiled_batches"] >= 16 and summary["padded_rows"] > 0
    assert all(info["seconds"] > 0 for info in summary["buckets"].values())


def test_padded_rows_do_not_change_the_real_rows():
    """A model whose rows depend on the whole batch would show padding: here each row is scaled by
    the batch's row count, so a leak of padding into the model's view changes the results."""

    def load():
        class CountsRows(torch.nn.Module):
            def forward(self, x):
                return x * x.shape[0]

        return CountsRows()

    jobs = Jobs()
    loaded = LoadedModel(ddb.ModelSpec("rows", load=load, compile=True, max_batch_size=8), "cpu",
                         compile_submit=jobs.append)
    xs = vectors(5)
    compile_bucket_of(loaded, jobs, xs)  # two eager batches (rows scaled by 5), then bucket 8 compiles
    out = loaded(xs)  # compiled bucket 8: padded to 8 rows, trimmed back to 5
    assert out.shape == (5, 16)
    np.testing.assert_allclose(out, xs * 8)  # the model saw the padded batch...
    assert loaded.compiler.padded_rows == 3  # ...and the 3 padding rows never left the worker


def test_serving_full_and_padded_tensor_batches_compiles_nothing_more():
    """On a GPU batches arrive as device tensors (staged in the transfer thread). A padded one made
    under inference mode is an inference tensor; the graph was warmed with an ordinary one, and
    dynamo recompiled for it while every batch waited."""
    import torch._dynamo.utils

    loaded, jobs = compiled_mlp(8)
    xs = torch.from_numpy(vectors(8))
    compile_bucket_of(loaded, jobs, xs)  # bucket 8 compiled and warmed
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for n in (8, 5, 8, 6):  # full, then padded to the bucket
        out = loaded(xs[:n])
        np.testing.assert_allclose(out, eager_mlp(vectors(8)[:n]), rtol=1e-4, atol=1e-5)
    assert loaded.compiler.compiled_batches == 4 and loaded.compiler.padded_rows == 3 + 2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_buckets_without_compile_pad_for_the_eager_model():
    seen = []

    def load():
        def model(batch):
            seen.append(len(batch))
            return batch * 2

        return model

    loaded = LoadedModel(ddb.ModelSpec("static", load=load, buckets=(4, 8)), "cpu")
    out = loaded(np.ones((3, 2), dtype=np.float32))
    assert seen == [4] and out.shape == (3, 2)
    assert loaded.rows_for(3) == 4 and loaded.max_rows(7) == 4


def test_a_model_that_is_not_a_torch_module_is_served_eagerly():
    loaded = LoadedModel(ddb.ModelSpec("affine", load=build_affine, compile=True), "cpu", compile_submit=list().append)
    out = loaded(np.ones((3, 2)))
    np.testing.assert_array_equal(out, np.full((3, 2), 3.0))
    assert loaded.compiler is None and "torch.nn.Module" in loaded.compile_summary()["error"]


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken_compile(module, **kwargs):
        def compiled(x):
            raise RuntimeError("inductor: no C compiler")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    loaded, jobs = compiled_mlp(8)
    xs = vectors(8)
    compile_bucket_of(loaded, jobs, xs)
    summary = loaded.compiler.summary()
    assert "no C compiler" in summary["error"] and summary["ready"] == []
    np.testing.assert_array_equal(loaded(xs), eager_mlp(xs))  # served eagerly from now on
    loaded(xs[:3])
    assert not jobs  # nothing more is queued for compiling
    assert compile_text(summary).startswith("eager (compile failed")


def test_compiled_graph_failing_at_run_time_falls_back_to_eager_and_poison_still_fails_alone():
    loaded, jobs = compiled_mlp(4)
    xs = vectors(4)
    compile_bucket_of(loaded, jobs, xs)
    # a poison batch (wrong width) fails in the compiled graph and in the eager model alike: the
    # error is the model's, and the compiled graph stays in service
    with pytest.raises(RuntimeError):
        loaded(np.ones((4, 3), dtype=np.float32))
    assert loaded.compiler.error is None

    def fails_only_compiled(x):
        raise RuntimeError("graph broke")

    loaded.compiler.compiled = fails_only_compiled
    np.testing.assert_array_equal(loaded(xs), eager_mlp(xs))
    assert "graph broke" in loaded.compiler.error


# ------------------------------------------------------------------------------------------------
# On a cluster
# ------------------------------------------------------------------------------------------------
@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)], timeout=300)
async def test_compiled_model_on_a_cluster(c, s, a):
    await c.register_plugin(ddb.DynBatchPlugin())
    spec = ddb.ModelSpec("mlp", load=build_torch_mlp, compile=True, max_batch_size=16, initial_batch_size=8)
    batcher = await ddb.Batcher(c, spec)
    xs = vectors(1_000)
    expected = eager_mlp(xs)
    state = None
    for _ in range(600):  # until a bucket has compiled in the background and served batches
        results = await asyncio.gather(*batcher.map(list(xs)))
        np.testing.assert_allclose(np.stack(results), expected, rtol=1e-4, atol=1e-5)
        (state,) = [w["compile"] for w in batcher.stats()["workers"].values()]
        if state and state["compiled_batches"] > 0:
            break
        await asyncio.sleep(0.1)
    assert state["error"] is None and state["ready"], state
    assert state["eager_batches"] > 0  # batches ran eagerly while the first bucket compiled
    sizes = {h["controller_size"] for h in batcher.history()}
    assert sizes <= {1, 2, 4, 8, 16}  # the controller proposes rungs only
    # the worker's heartbeat carries it too (the dashboard's source)
    await a.heartbeat()
    (server,) = s.extensions["dynbatch"].workers[a.address]["servers"]
    assert server["compile"]["mode"] == "default" and server["compile"]["ready"]
    batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_client_warns_once_when_a_worker_cannot_compile(c, s, a):
    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec("affine", load=build_affine, compile=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = await asyncio.gather(*batcher.map([np.ones(3)] * 50))
    np.testing.assert_array_equal(results[0], np.full(3, 3.0))
    compile_warnings = [w for w in caught if issubclass(w.category, ddb.CompileWarning)]
    assert len(compile_warnings) == 1 and "served eagerly" in str(compile_warnings[0].message)
    batcher.close()


def test_buckets_that_served_most_rows_eagerly_compile_first():
    loaded, jobs = compiled_mlp(16)
    compiler = loaded.compiler
    order = []
    compile_one = compiler._compile
    compiler._compile = lambda bucket: (order.append(bucket), compile_one(bucket))
    xs = vectors(16)
    loaded(xs[:1])  # short tail batches first...
    loaded(xs[:1])
    loaded(xs[:3])  # (a one-off size compiles nothing)
    for _ in range(3):
        loaded(xs[:16])  # ...then the batches the controller forms
    jobs.run_all()
    assert order[0] == 16  # 48 rows served eagerly in bucket 16, 2 rows in bucket 1
    assert set(order) == {1, 2, 16}  # and the rung above the tail's bucket, prefetched


def test_a_batch_never_waits_for_a_compile_in_progress():
    import threading

    loaded, jobs = compiled_mlp(8)
    xs = vectors(8)
    compile_bucket_of(loaded, jobs, xs)  # 8 ready
    compiler = loaded.compiler
    tracing, release = threading.Event(), threading.Event()
    compile_one = compiler._compile

    def slow_compile(bucket):  # a compile that is in progress until the test lets it finish
        with compiler._exclusive:
            tracing.set()
            release.wait(60)
        compile_one(bucket)

    compiler._compile = slow_compile
    loaded(xs[:2])
    loaded(xs[:2])  # queues bucket 2
    worker = threading.Thread(target=jobs.run_all)
    worker.start()
    assert tracing.wait(60)
    before = compiler.compiled_batches, compiler.eager_batches
    np.testing.assert_allclose(loaded(xs), eager_mlp(xs), rtol=1e-4, atol=1e-5)
    # it ran eagerly at once rather than wait for the compile (torch.compile is not thread-safe)
    assert (compiler.compiled_batches, compiler.eager_batches) == (before[0], before[1] + 1)
    release.set()
    worker.join(60)
    assert 2 in compiler.summary()["ready"]
    loaded(xs)
    assert compiler.compiled_batches == before[0] + 1  # and compiled again once it finished


def test_a_compiled_call_during_another_threads_tracing_runs_eagerly(monkeypatch):
    """What a compile in the background thread looks like to the device thread: torch.fx's
    process-wide tracing flag is set. The call must not fail (it did on the GPU before the fix)."""
    import torch.fx._symbolic_trace as symbolic_trace

    loaded, jobs = compiled_mlp(8)
    xs = vectors(8)
    compile_bucket_of(loaded, jobs, xs)
    monkeypatch.setattr(symbolic_trace, "_is_fx_tracing_flag", True)
    np.testing.assert_allclose(loaded(xs), eager_mlp(xs), rtol=1e-4, atol=1e-5)
    assert loaded.compiler.error is None


def test_short_batches_compile_their_bucket_only_when_they_keep_coming():
    from dask_dynbatch.worker.compile import MIN_SHORT_BATCHES

    loaded, jobs = compiled_mlp(16)
    xs = vectors(16)
    for _ in range(MIN_SHORT_BATCHES - 1):
        loaded(xs[:3], full=False)  # tails of bursts: bucket 4
    assert not jobs and loaded.compiler.summary()["buckets"] == {}
    loaded(xs[:3], full=False)
    buckets = loaded.compiler.summary()["buckets"]
    assert list(buckets) == ["4"] and buckets["4"]["state"] == "queued"  # and no prefetch


def test_warming_the_compile_caches_in_a_child_process():
    """The long part of a compile runs in a child process; the worker's own compile of the bucket
    then finds inductor's caches warm. A child that fails only costs the warm-up."""
    import functools

    from distributed.protocol.pickle import dumps

    from dask_dynbatch.worker.compile import warm_in_subprocess

    spec = ddb.ModelSpec("mlp", load=build_torch_mlp, compile=True, max_batch_size=8)
    xs = vectors(8)
    for payload, warmed in ((dumps(spec), True), (b"not a pickle", False)):
        loaded, jobs = compiled_mlp(8, compile_warm=functools.partial(warm_in_subprocess, payload, "cpu", timeout=600))
        compile_bucket_of(loaded, jobs, xs)
        summary = loaded.compiler.summary()
        assert summary["error"] is None and 8 in summary["ready"]
        assert (summary["buckets"]["8"]["warm_seconds"] is not None) == warmed
        np.testing.assert_allclose(loaded(xs), eager_mlp(xs), rtol=1e-4, atol=1e-5)
        assert not loaded.compiling


def test_unloading_stops_compiling():
    import threading

    started = threading.Event()

    def warm(rows, template, stop):  # a child process that would take long
        started.set()
        stop.wait(120)
        return None

    loaded, jobs = compiled_mlp(8, compile_warm=warm)
    xs = vectors(8)
    loaded(xs)
    loaded(xs)  # queues 8 (and nothing above: 8 is the top)
    loaded(xs[:2])
    loaded(xs[:2])  # queues 2 and 4
    thread = threading.Thread(target=jobs.run_all)
    thread.start()
    assert started.wait(60)
    loaded.close()
    thread.join(60)
    assert not thread.is_alive()
    summary = loaded.compiler.summary()
    assert summary["ready"] == [] and summary["buckets"] == {}  # nothing compiled, nothing left queued
    np.testing.assert_array_equal(loaded(xs), eager_mlp(xs))  # still serves, eagerly


# ------------------------------------------------------------------------------------------------
# Structured and padded samples: (rows, length) buckets
# ------------------------------------------------------------------------------------------------
def test_structured_buckets_pure():
    from dask_dynbatch.core.ladder import bucket_label, bucket_units, length_ladder, structured_bucket

    lengths = length_ladder()
    assert lengths[:8] == (1, 2, 4, 8, 16, 24, 32, 40) and (80 in lengths and 96 in lengths)
    assert structured_bucket(5, 41, (1, 2, 4, 8), lengths, longest=100) == (8, 48)
    assert structured_bucket(5, None, (1, 2, 4, 8), lengths) == 8  # nothing padded: a rung of rows
    assert structured_bucket(5, 41, (1, 2, 4, 8), lengths, longest=44) == (8, 44)  # never longer than has run
    assert structured_bucket(5, 41, (1, 2, 4, 8), lengths, longest=30) == (8, 41)
    assert structured_bucket(9, 41, (1, 2, 4, 8), lengths) is None  # above the row ladder: as it is
    assert bucket_units((8, 48)) == 384 and bucket_units((8, None)) == 8 and bucket_units(8) == 8
    assert [bucket_label(b) for b in ((8, 48), (8, None), 8)] == ["8x48", "8", "8"]


def test_cut_length_keeps_outputs_seen_not_to_follow_the_length():
    from dask_dynbatch.core.tree import cut_length

    outputs = {"seq": np.zeros((2, 48, 3)), "pooled": np.zeros((2, 48)), "labels": [np.arange(48), np.arange(5)]}
    cut = cut_length(outputs, 48, 41, fixed={"['pooled']"})
    assert cut["seq"].shape == (2, 41, 3) and cut["pooled"].shape == (2, 48)
    assert [len(v) for v in cut["labels"]] == [41, 5]
    assert cut_length(outputs, 41, 41) is outputs


def token_batch(loaded: LoadedModel, ids_list: list[np.ndarray]):
    """Dict samples of token ids as the worker stages them for ``loaded`` (a padded Batch)."""
    from dask_dynbatch.core.tree import TreeRows, flatten

    samples = [{"input_ids": ids, "attention_mask": np.ones_like(ids)} for ids in ids_list]
    tree, _ = flatten(samples[0])
    return loaded.stage([TreeRows.stack(tree, [flatten(s)[1] for s in samples], [True, True])])


def encoder_alone(model, ids: np.ndarray) -> dict:
    with torch.inference_mode():
        out = model(input_ids=torch.from_numpy(ids)[None], attention_mask=torch.ones(1, len(ids), dtype=torch.int64))
    return {k: v[0].numpy() for k, v in out.items()}


def test_padded_batches_compile_in_rows_and_length_buckets():
    """Batches of padded dict samples stay sized by cost; compiled, each is padded to its
    (rows, length) bucket, and the padding (rows and tokens) never reaches a request's outputs."""
    from dask_dynbatch.core.tree import trim_output_row
    from dask_dynbatch.examples import build_tiny_text_encoder

    jobs = Jobs()
    spec = ddb.ModelSpec("enc", load=build_tiny_text_encoder, compile=True, pad_value=0)
    loaded = LoadedModel(spec, "cpu", compile_submit=jobs.append)
    assert loaded.ladder is None  # the controller's size is a cost: no rungs
    rng = np.random.default_rng(1)
    group = [rng.integers(1, 1000, n) for n in (35, 38, 33, 10, 20)]
    batch = token_batch(loaded, group)
    longest = max(len(i) for i in group)
    # padded no longer than the longest batch the model has run (a model may have a maximum length)
    assert batch.length == longest and loaded.bucket_of(batch) == (8, longest)
    loaded(token_batch(loaded, [rng.integers(1, 1000, 60)]))
    assert loaded.bucket_of(batch) == (8, 40)
    assert loaded.units(batch) == 5 * longest  # eager: the batch as it is
    loaded(batch)
    loaded(batch)  # the second full batch of its bucket queues it
    jobs.run_all()
    summary = loaded.compiler.summary()
    assert summary["ready"] == ["8x40"] and summary["error"] is None and summary["max_buckets"] == 24
    assert loaded.units(batch) == 8 * 40  # the memory sizer weighs the padded bucket
    assert loaded.units(batch, padded=False) == 5 * longest
    as_it_is = loaded(batch, pad=False)  # the padded bucket would not fit the memory cap: eager
    assert loaded.compiler.summary()["compiled_batches"] == 0
    out = loaded(batch)
    for key in out:
        np.testing.assert_allclose(out[key], as_it_is[key], atol=1e-4)
    summary = loaded.compiler.summary()
    assert summary["compiled_batches"] == 1 and summary["padded_rows"] == 3
    assert summary["padded_elements"] == 8 * (40 - longest)
    assert out["last_hidden_state"].shape == (5, longest, 64) and out["pooler_output"].shape == (5, 64)
    for r, row_ids in enumerate(group):  # each request's row, cut as the server cuts it, equals it alone
        row = trim_output_row({k: v[r : r + 1] for k, v in out.items()}, longest, len(row_ids), loaded._fixed_outputs)
        want = encoder_alone(loaded.model, row_ids)
        np.testing.assert_allclose(row["last_hidden_state"][0], want["last_hidden_state"], atol=1e-4)
        np.testing.assert_allclose(row["pooler_output"][0], want["pooler_output"], atol=1e-4)


def test_dict_samples_of_one_shape_compile_on_the_ladder():
    """Structured samples without padding: batches on the ladder's rungs, compiled per rung."""

    def load():
        class Pair(torch.nn.Module):
            def forward(self, x, y):
                return x.sum(1) * x.shape[0] + y

        return Pair()

    jobs = Jobs()
    loaded = LoadedModel(ddb.ModelSpec("pair", load=load, compile=True, max_batch_size=8), "cpu",
                         compile_submit=jobs.append)
    from dask_dynbatch.core.tree import TreeRows, flatten

    samples = [(np.full(3, float(i), dtype=np.float32), np.float32(i)) for i in range(5)]
    tree, _ = flatten(samples[0])
    batch = loaded.stage([TreeRows.stack(tree, [flatten(s)[1] for s in samples], [False, False])])
    assert loaded.bucket_of(batch) == 8
    np.testing.assert_allclose(loaded(batch), [3 * i * 5 + i for i in range(5)])  # eager: 5 rows
    loaded(batch)
    jobs.run_all()
    assert loaded.compiler.summary()["ready"] == [8]
    np.testing.assert_allclose(loaded(batch), [3 * i * 8 + i for i in range(5)])  # compiled: padded to 8
    assert loaded.compiler.compiled_batches == 1 and loaded.compiler.padded_rows == 3
    # static shapes without compile: the eager model gets the batch padded to its bucket
    static = LoadedModel(ddb.ModelSpec("pair", load=load, buckets=[8]), "cpu")
    batch = static.stage([TreeRows.stack(tree, [flatten(s)[1] for s in samples], [False, False])])
    np.testing.assert_allclose(static(batch), [3 * i * 8 + i for i in range(5)])


def test_buckets_pad_variable_lengths_for_the_eager_model_and_bound_the_rows():
    from dask_dynbatch.core.tree import trim_output_row
    from dask_dynbatch.examples import build_tiny_text_encoder

    spec = ddb.ModelSpec("enc", load=build_tiny_text_encoder, buckets=[4, 8], pad_value=0)
    loaded = LoadedModel(spec, "cpu")
    assert loaded.row_limit == 8  # batches formed by cost stop at the top bucket
    rng = np.random.default_rng(2)
    loaded(token_batch(loaded, [rng.integers(1, 1000, 50)]))  # the longest batch run so far: 50
    group = [rng.integers(1, 1000, n) for n in (30, 7, 19)]
    batch = token_batch(loaded, group)
    assert loaded.bucket_of(batch) == (4, 32) and loaded.units(batch) == 4 * 32
    out = loaded(batch)  # run padded to 4 rows of 32 tokens, cut back to 3 of 30
    assert out["last_hidden_state"].shape == (3, 30, 64)
    for r, row_ids in enumerate(group):
        row = trim_output_row({k: v[r : r + 1] for k, v in out.items()}, 30, len(row_ids), loaded._fixed_outputs)
        want = encoder_alone(loaded.model, row_ids)
        np.testing.assert_allclose(row["last_hidden_state"][0], want["last_hidden_state"], atol=1e-4)
        np.testing.assert_allclose(row["pooler_output"][0], want["pooler_output"], atol=1e-4)


def test_at_most_max_buckets_compile_those_of_the_traffic_lately_first():
    from dask_dynbatch.worker import compile as compile_module
    from dask_dynbatch.worker.compile import BucketCompiler

    jobs = Jobs()
    compiler = BucketCompiler(object(), "default", (), run=None, example=None, submit=jobs.append, max_buckets=2)
    order: list = []
    compiler._compile = lambda bucket: (order.append(bucket), compiler._mark_ready(bucket, 1.0))
    for _ in range(3):  # while the controller climbed: many rows in small-budget buckets
        compiler.want((4, 160), 4)
        compiler.want((8, 80), 8)
    for _ in range(compile_module.RECENT_BATCHES):  # then the traffic settles on two other buckets
        compiler.want((16, 96), 16)
        compiler.want((32, 48), 32)
    jobs.run_all()
    assert order == [(32, 48), (16, 96)]  # the budget goes to the buckets of the traffic now
    summary = compiler.summary()
    assert summary["ready"] == ["16x96", "32x48"]
    assert {summary["buckets"][b]["state"] for b in ("4x160", "8x80")} == {"over-limit"}
    compiler.want((2, 320), 2)
    compiler.want((2, 320), 2)
    assert not jobs and "2x320" not in compiler.summary()["buckets"]  # full: nothing more is queued


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)], timeout=300,
             config={"dynbatch.compile.max-buckets": 2})
async def test_padded_compiled_model_on_a_cluster(c, s, a):
    """Variable-length dict samples through a compiled model: each request's outputs equal it
    alone, whether its batch ran eagerly or compiled (bucket warmed in a child process first)."""
    from dask_dynbatch.examples import build_tiny_text_encoder, token_ids

    await c.register_plugin(ddb.DynBatchPlugin())
    spec = ddb.ModelSpec("enc", load=build_tiny_text_encoder, compile=True, pad_value=0)
    batcher = await ddb.Batcher(c, spec)
    model = build_tiny_text_encoder()
    ids = token_ids(60, seed=3, median=12, longest=30)
    wanted = [encoder_alone(model, i) for i in ids]
    state = None
    for _ in range(600):  # until a bucket has compiled in the background and served batches
        outs = await asyncio.gather(*batcher.map([{"input_ids": i, "attention_mask": np.ones_like(i)} for i in ids]))
        for i, out, want in zip(ids, outs, wanted):
            assert out["last_hidden_state"].shape == (len(i), 64)
            np.testing.assert_allclose(out["last_hidden_state"], want["last_hidden_state"], atol=1e-4)
            np.testing.assert_allclose(out["pooler_output"], want["pooler_output"], atol=1e-4)
        (state,) = [w["compile"] for w in batcher.stats()["workers"].values()]
        if state and state["compiled_batches"] > 0:
            break
        await asyncio.sleep(0.1)
    assert state["error"] is None and state["compiled_batches"] > 0, state
    assert 1 <= len(state["ready"]) <= 2, state
    assert all("x" in label for label in state["ready"])  # (rows, length) buckets
    assert any(b["warm_seconds"] is not None for b in state["buckets"].values())  # warmed in a child first
    batcher.close()


def test_a_compiled_bucket_covers_smaller_batches_within_its_slack():
    from dask_dynbatch.worker.compile import COVER_SLACK, BucketCompiler

    compiler = BucketCompiler(object(), "default", (), run=None, example=None, submit=None, max_buckets=4)
    compiler.compiled = object()
    for bucket in ((32, 48), (16, 96), (8, None)):
        compiler._mark_ready(bucket, 1.0)
    assert COVER_SLACK == 1.25
    assert compiler.cover((32, 40)) == (32, 48)  # 1,536 tokens for 1,280: within the slack
    assert compiler.cover((24, 48)) is None  # 1,536 for 1,152: more than a quarter more
    assert compiler.cover((16, 80)) == (16, 96)
    assert compiler.cover((40, 40)) is None  # more rows than any compiled bucket holds
    assert compiler.cover((8, 40)) is None and compiler.cover((4, None)) is None  # (8, None): 4 rows is half
    assert compiler.cover((7, None)) == (8, None)
    assert compiler.cover(7) is None  # rungs of a ladder are never covered: the controller steps on them
