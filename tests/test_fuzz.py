"""Property-based tests: random payloads through real Batchers on one in-process cluster.

Whatever is thrown at ``submit`` (random shapes, dtypes and sizes, empty and large arrays, values
that are not arrays, Dask Futures holding any of these): ``submit`` either raises a clear
:class:`~dask_dynbatch.InputSignatureError` or returns a future that resolves, nothing hangs
(every wait has a timeout), and the scheduler and workers keep serving.
"""

from __future__ import annotations

import concurrent.futures
import itertools

import numpy as np
import pytest
from distributed import Client, LocalCluster
from models import worker_addresses

import dask_dynbatch as ddb
from dask_dynbatch.client.samples import is_structured
from dask_dynbatch.examples import build_affine

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

WAIT = 60  # seconds a single result may take before it counts as a hang
N_WORKERS = 2
# deterministic (fixed seed, no example database), few examples: the whole module runs in CI
FUZZ = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DTYPES = ["bool", "int8", "uint8", "int16", "int32", "int64", "uint64", "float16", "float32", "float64", "complex64"]
_names = itertools.count()


@pytest.fixture(scope="module")
def client():
    """One cluster for the whole module: two in-process workers, a synchronous client."""
    with LocalCluster(n_workers=N_WORKERS, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            client.register_plugin(ddb.DynBatchPlugin())
            yield client


def new_batcher(client, **spec) -> ddb.Batcher:
    """A Batcher for a fresh model: each example learns its own input signature."""
    return ddb.Batcher(client, ddb.ModelSpec(f"fuzz-{next(_names)}", load=build_affine, **spec))


def expected(sample: np.ndarray) -> np.ndarray:
    return build_affine()(sample[None])[0]


def random_samples(dtype: str, shape: tuple[int, ...], n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    values = rng.integers(-100, 100, size=(n, *shape))
    if dtype.startswith(("float", "complex")):
        values = values * rng.random(size=values.shape)
    return list(values.astype(dtype))


def assert_cluster_serving(client) -> None:
    """Nothing crashed: every worker is still there and a plain request still gets its answer."""
    assert len(worker_addresses(client)) == N_WORKERS
    with new_batcher(client) as batcher:
        assert batcher.submit(np.arange(3.0)).result(timeout=WAIT).tolist() == [1.0, 3.0, 5.0]


# values that are not one numeric sample
NOT_ARRAYS = st.one_of(
    st.none(),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=3),
    st.integers(),
    st.floats(allow_nan=True),
    st.lists(st.lists(st.integers(), max_size=3), min_size=2, max_size=3),  # often ragged
    st.lists(st.one_of(st.integers(), st.text(max_size=2), st.none()), min_size=1, max_size=4),
    st.builds(lambda n: np.empty(n, dtype=object), st.integers(1, 3)),
    st.builds(lambda shape, dtype: np.zeros(shape, dtype=dtype),
              st.sampled_from([(0,), (0, 3), (3, 0), ()]), st.sampled_from(["float32", "int64"])),
    st.builds(np.array, st.lists(st.text(max_size=3), min_size=1, max_size=3)),
)


@FUZZ
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
    n=st.integers(1, 60),
    seed=st.integers(0, 2**32 - 1),
    wrong=st.lists(st.one_of(NOT_ARRAYS, st.sampled_from(["shape", "dtype", "batch"])), max_size=4),
)
def test_random_signatures_resolve_or_are_refused(client, dtype, shape, n, seed, wrong):
    samples = random_samples(dtype, shape, n, seed)
    with new_batcher(client, max_batch_size=16) as batcher:
        futures = batcher.map(samples)  # the first one sets the signature
        for bad in wrong:
            if isinstance(bad, str) and bad == "shape":
                bad = np.zeros(shape + (2,), dtype=dtype)
            elif isinstance(bad, str) and bad == "dtype":
                bad = samples[0].astype("float32" if dtype != "float32" else "float64")
            elif isinstance(bad, str) and bad == "batch":
                bad = np.stack(samples[:1] * 2)
            try:
                future = batcher.submit(bad)
            except ddb.InputSignatureError as exc:
                assert f"expects one sample of shape {shape} and dtype {np.dtype(dtype)}" in str(exc)
                assert "received shape" in str(exc) or "could not make an array" in str(exc)
            else:  # a list of numbers that happens to match the signature: served like the others
                samples.append(np.asarray(bad))
                futures.append(future)
        for sample, future in zip(samples, futures):
            result = future.result(timeout=WAIT)
            np.testing.assert_array_equal(result, expected(sample))
            assert result.dtype == expected(sample).dtype
        stats = batcher.stats()
        assert stats["delivered"] == len(samples) and stats["queued"] == 0


@FUZZ
@given(value=NOT_ARRAYS)
def test_values_that_are_not_arrays_are_refused_or_served(client, value):
    with new_batcher(client) as batcher:
        try:
            future = batcher.submit(value)
        except ddb.InputSignatureError as exc:
            assert str(batcher.spec.name) in str(exc)
        else:
            if is_structured(value):  # a structured sample: the array model raises on it, or serves it
                concurrent.futures.wait([future], timeout=WAIT)
                assert future.done()
            else:  # e.g. a list of numbers: an array after all
                sample = np.asarray(value)
                np.testing.assert_array_equal(future.result(timeout=WAIT), expected(sample))
        assert batcher.stats()["queued"] == 0


@settings(FUZZ, max_examples=8)
@given(
    megabytes=st.integers(1, 24),
    dtype=st.sampled_from(["uint8", "float32"]),
    n=st.integers(1, 3),
)
def test_large_samples(client, megabytes, dtype, n):
    itemsize = np.dtype(dtype).itemsize
    length = megabytes * 2**20 // itemsize
    samples = [np.full(length, i + 1, dtype=dtype) for i in range(n)]
    with new_batcher(client, max_batch_size=2) as batcher:
        futures = batcher.map(samples)
        for sample, future in zip(samples, futures):
            result = future.result(timeout=WAIT)
            assert result.shape == sample.shape and result[0] == expected(sample[:1])[0] and result[-1] == result[0]


@FUZZ
@given(values=st.lists(st.one_of(NOT_ARRAYS, st.sampled_from(["good", "shape", "dtype"])), min_size=1, max_size=6))
def test_dask_future_inputs_of_any_kind_resolve(client, values):
    """Inputs computed on the cluster are checked on the worker: a bad one fails alone."""
    good = np.arange(4.0)
    with new_batcher(client) as batcher:
        assert batcher.submit(good).result(timeout=WAIT).tolist() == expected(good).tolist()
        payloads = [{"good": good, "shape": np.arange(5.0), "dtype": good.astype("int32")}.get(v, v)
                    if isinstance(v, str) else v for v in values]
        inputs = client.scatter(payloads, hash=False)
        futures = batcher.map(inputs)
        for value, future in zip(values, futures):
            if isinstance(value, str) and value == "good":
                assert future.result(timeout=WAIT).tolist() == expected(good).tolist()
            else:
                with pytest.raises(ddb.InputSignatureError, match=r"input from Dask Future .* expects shape \(4,\) and dtype float64"):
                    future.result(timeout=WAIT)


def test_cluster_still_serving(client):
    """After everything above: no worker died, the scheduler answers, requests are served."""
    assert_cluster_serving(client)
