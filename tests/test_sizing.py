"""Tests of dask_dynbatch.core.memory, .profile and .oom: profiles, caps, reservations, OOM
split-and-retry.

Deterministic: memory comes from FakeMemory, nothing asserts on wall-clock time
and no GPU is needed.
"""

from __future__ import annotations

import pickle
import random
import threading
import time
import weakref

import numpy as np
import pytest

from dask_dynbatch import errors
from dask_dynbatch.core.memory import FakeMemory, MemorySizer
from dask_dynbatch.core.oom import OutputChunk, is_oom_error, run_split_on_oom
from dask_dynbatch.core.profile import MemoryProfile, estimate_bytes_per_sample
from dask_dynbatch.errors import SampleTooLargeError

MB = 1 << 20


def make_sizer(free=1000 * MB, total=1000 * MB, **kwargs):
    kwargs.setdefault("warmup_batches", 0)
    source = FakeMemory(total=total, free=free)
    return source, MemorySizer(source, **kwargs)


def teach(sizer, model, fixed, per_sample, sizes=(8, 32)):
    """Give ``model`` an exact linear profile."""
    for n in sizes:
        sizer.record(model, n, fixed + per_sample * n)


def wait_until(predicate, limit=10.0):
    """Wait for another thread to reach a state (no timing is asserted)."""
    end = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("state not reached")
        time.sleep(0.001)


def torch_oom(message="CUDA out of memory. Tried to allocate 2.00 GiB"):
    torch = pytest.importorskip("torch")
    return torch.cuda.OutOfMemoryError(message)


# ----------------------------------------------------------------- profiles
def test_profile_fit_recovers_fixed_and_per_sample():
    profile = MemoryProfile()
    assert not profile.known and profile.bytes_for(4) is None and profile.max_samples(MB) is None
    for n in (1, 4, 16, 64, 256):
        profile.update(n, 300 * MB + 3 * MB * n)
    assert profile.basis == "fit"
    assert profile.bytes_per_sample == pytest.approx(3 * MB)
    assert profile.fixed_bytes == pytest.approx(300 * MB, abs=1)
    assert profile.bytes_for(100) == pytest.approx(600 * MB, abs=2)
    assert profile.max_samples(600 * MB) in (99, 100)
    assert profile.max_samples(300 * MB) == 0


def test_profile_fit_with_noise_lies_above_every_observation():
    rng = random.Random(0)
    profile = MemoryProfile()
    points = []
    for n in (2, 8, 16, 32, 48, 64, 96, 128):
        peak = int(100 * MB + 5 * MB * n + rng.uniform(-4, 4) * MB)
        points.append((n, peak))
        profile.update(n, peak)
    assert profile.bytes_per_sample == pytest.approx(5 * MB, rel=0.05)
    assert profile.fixed_bytes == pytest.approx(100 * MB, abs=12 * MB)
    for n, peak in points:
        assert profile.bytes_for(n) >= peak


def test_profile_single_point_is_an_upper_bound_per_sample():
    profile = MemoryProfile()
    profile.update(10, 200 * MB)
    assert profile.basis == "single"
    assert profile.fixed_bytes == 0
    assert profile.bytes_per_sample == pytest.approx(20 * MB)
    # same size seen again with a larger peak: the larger one counts
    profile.update(10, 250 * MB)
    assert profile.bytes_per_sample == pytest.approx(25 * MB)


def test_profile_negative_slope_falls_back_to_envelope():
    profile = MemoryProfile()
    profile.update(4, 100 * MB)
    profile.update(8, 90 * MB)
    assert profile.basis == "envelope"
    assert profile.bytes_for(4) >= 100 * MB and profile.bytes_for(8) >= 90 * MB


def test_profile_warmup_and_prior():
    profile = MemoryProfile(warmup=1, bytes_per_sample=2 * MB, fixed_bytes=10 * MB)
    assert profile.basis == "prior" and profile.bytes_for(5) == 20 * MB
    assert profile.update(4, 999 * MB) is False  # warm-up: ignored
    assert profile.basis == "prior"
    assert profile.update(4, 40 * MB) is True
    assert profile.basis == "single" and profile.bytes_per_sample == pytest.approx(10 * MB)


def test_profile_oom_raises_estimate_below_failed_size():
    profile = MemoryProfile()
    profile.update(8, 80 * MB)  # 10 MB/sample: 100 would fit in 1000 MB
    profile.on_oom(64, 500 * MB, explained=False)  # but 64 failed with 500 MB
    assert profile.max_samples(500 * MB) < 64
    assert profile.max_samples(500 * MB) >= 8
    state = profile.state()
    assert state["oom_count"] == 1 and state["oom_constraints"] == [[64, 500 * MB]]
    # a later success of 64 rows with no more memory drops the constraint
    profile.update(64, 400 * MB, available_bytes=500 * MB)
    assert profile.state()["oom_constraints"] == []


def test_profile_oom_of_a_single_row_adds_no_constraint():
    profile = MemoryProfile()
    profile.update(8, 80 * MB)
    profile.on_oom(1, 50 * MB)
    assert profile.state()["oom_constraints"] == []
    assert profile.max_samples(500 * MB) == 50


def test_estimate_bytes_per_sample():
    assert estimate_bytes_per_sample(1000, 40, activation_factor=4.0) == 1000 + 5000 + 40
    # uint8 input computed in float32
    assert estimate_bytes_per_sample(1000, 0, 2.0, compute_itemsize_ratio=4.0) == 1000 + 12000
    with pytest.raises(ValueError):
        estimate_bytes_per_sample(-1, 0)


# --------------------------------------------------------------------- caps
def test_cap_is_none_without_profile_then_follows_free_memory_both_ways():
    source, sizer = make_sizer(safety_margin=0.1)
    assert sizer.cap("m") is None
    teach(sizer, "m", 0, 10 * MB)
    assert sizer.cap("m") == 90  # (1000 - 100 margin) / 10
    source.free = 500 * MB  # another job takes memory
    assert sizer.cap("m") == 40
    source.free = 200 * MB
    assert sizer.cap("m") == 10
    source.free = 800 * MB  # and gives it back
    assert sizer.cap("m") == 70
    source.free = 1000 * MB
    assert sizer.cap("m") == 90
    assert sizer.state()["models"]["m"]["cap"] == 90
    assert source.reads >= 5  # each cap reads the source now


def test_cap_counts_framework_cache_as_free():
    source, sizer = make_sizer(free=400 * MB, safety_margin=0.1)
    teach(sizer, "m", 0, 10 * MB)
    assert sizer.cap("m") == 30
    source.framework_reserved_unused = 200 * MB
    assert sizer.cap("m") == 50


def test_safety_margin_is_a_fraction_at_most_a_byte_count():
    source, sizer = make_sizer(safety_margin=0.1, safety_margin_max=20 * MB)
    teach(sizer, "m", 0, 10 * MB)
    assert sizer.cap("m") == 98  # (1000 - min(100, 20)) / 10
    source.free = 300 * MB  # a neighbour takes most of the device: the margin stays 20 MB
    assert sizer.cap("m") == 28
    _, sizer = make_sizer(safety_margin=0.01, safety_margin_max=20 * MB)
    teach(sizer, "m", 0, 10 * MB)
    assert sizer.cap("m") == 99  # the fraction is smaller
    with pytest.raises(ValueError):
        MemorySizer(FakeMemory(total=MB, free=MB), safety_margin_max=-1)


def test_cap_is_never_below_one():
    source, sizer = make_sizer(free=50 * MB, safety_margin=0.1)
    teach(sizer, "m", 0, 10 * MB)
    assert sizer.cap("m") == 1


def test_explicit_budget_fraction_and_bytes():
    _, sizer = make_sizer(budget=0.5, safety_margin=0.1)
    teach(sizer, "m", 0, 10 * MB)
    assert sizer.cap("m") == 50

    _, sizer = make_sizer(budget=300 * MB, safety_margin=0.1)
    teach(sizer, "m", 0, 10 * MB)
    assert sizer.cap("m") == 30

    # memory the framework already holds (weights) counts against the budget
    source, sizer = make_sizer(budget=0.5, safety_margin=0.1)
    source.framework_used = 200 * MB
    teach(sizer, "m", 0, 10 * MB)
    assert sizer.cap("m") == 30


def test_bad_arguments():
    source = FakeMemory(total=MB, free=MB)
    with pytest.raises(ValueError):
        MemorySizer(source, safety_margin=1.5)
    with pytest.raises(ValueError):
        MemorySizer(source, budget=0)
    with pytest.raises(ValueError):
        MemorySizer(source).reserve("m", 0)


def test_warmup_batches_are_not_recorded():
    _, sizer = make_sizer(warmup_batches=1)
    sizer.record("m", 8, 10_000 * MB)  # first batch: workspaces, autotuning
    assert sizer.cap("m") is None
    sizer.record("m", 8, 80 * MB)
    assert sizer.cap("m") == 90


def test_a_prior_estimate_gives_a_cap_before_measurements():
    _, sizer = make_sizer()
    sizer.profile("m").set_prior(estimate_bytes_per_sample(2 * MB, 0, activation_factor=4.0))
    assert sizer.cap("m") == 900 // 12
    sizer.forget("m")
    assert sizer.cap("m") is None


# ------------------------------------------------------------- reservations
def test_reservations_count_against_every_model_on_the_device():
    _, sizer = make_sizer(safety_margin=0.1)
    teach(sizer, "a", 0, 10 * MB)
    teach(sizer, "b", 0, 10 * MB)
    with sizer.reserve("a", 60) as reservation:
        assert reservation.n == 60 and reservation.bytes == 600 * MB
        assert reservation.available_bytes == 900 * MB
        assert sizer.reserved_bytes() == 600 * MB
        assert sizer.cap("b") == 30
        assert sizer.cap("a") == 30  # its own other batches count too
        assert sizer.state()["in_flight"] == 1
    assert reservation.released and sizer.reserved_bytes() == 0
    assert sizer.cap("b") == 90
    reservation.release()  # idempotent
    assert sizer.reserved_bytes() == 0


def test_partial_reservation_grants_what_fits():
    _, sizer = make_sizer(safety_margin=0.1)
    teach(sizer, "a", 0, 10 * MB)
    first = sizer.reserve("a", 70)
    second = sizer.reserve("a", 50, partial=True)
    assert second.requested == 50 and second.n == 20
    assert sizer.try_reserve("a", 1) is None  # nothing left, and someone in flight
    first.release()
    second.release()


def test_reservation_without_profile_is_granted_and_costs_nothing():
    _, sizer = make_sizer()
    with sizer.reserve("new", 512) as reservation:
        assert reservation.n == 512 and reservation.bytes == 0


def test_oversized_request_is_granted_when_nothing_else_is_in_flight():
    # waiting cannot make memory appear; an OOM is then handled by splitting
    _, sizer = make_sizer()
    teach(sizer, "a", 0, 10 * MB)
    with sizer.reserve("a", 500, timeout=1) as reservation:
        assert reservation.n == 500
    with sizer.reserve("a", 500, partial=True, timeout=1) as reservation:
        assert reservation.n == 90


def test_two_models_never_exceed_budget_together_under_concurrent_reservations():
    source, sizer = make_sizer(budget=0.4, safety_margin=0.1, recheck_interval=0.001)
    budget_bytes = 400 * MB
    teach(sizer, "a", 0, 10 * MB)
    teach(sizer, "b", 20 * MB, 25 * MB)
    alone = {"a": sizer.cap("a"), "b": sizer.cap("b")}
    assert alone == {"a": 40, "b": 15}

    peak_reserved = [0]
    granted_rows = {"a": 0, "b": 0}
    failures: list[BaseException] = []
    guard = threading.Lock()

    def worker(model: str, seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(150):
                n = rng.randint(1, alone[model])
                with sizer.reserve(model, n, partial=rng.random() < 0.5, timeout=30) as r:
                    total = sizer.reserved_bytes()
                    with guard:
                        peak_reserved[0] = max(peak_reserved[0], total)
                        granted_rows[model] += r.n
                    assert total <= budget_bytes
                    assert total <= source.free - 0.1 * source.total
                    if rng.random() < 0.5:
                        time.sleep(0)  # let the others interleave
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(m, i)) for i, m in enumerate("abab")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    assert 0 < peak_reserved[0] <= budget_bytes
    assert granted_rows["a"] > 0 and granted_rows["b"] > 0  # neither starved
    assert sizer.reserved_bytes() == 0 and sizer.state()["waiting"] == 0


def test_fair_share_and_first_come_first_served_between_models():
    _, sizer = make_sizer(safety_margin=0.1, recheck_interval=0.001)
    teach(sizer, "a", 0, 10 * MB)
    teach(sizer, "b", 0, 10 * MB)
    big = sizer.reserve("a", 60)
    assert sizer.cap("b") == 30

    got = {}
    b_running = threading.Event()
    b_may_finish = threading.Event()

    def want_40_rows_of_b():
        with sizer.reserve("b", 40, timeout=30) as reservation:
            got["b"] = reservation.n
            got["a_cap_while_b_runs"] = sizer.cap("a")
            b_running.set()
            b_may_finish.wait(30)

    thread = threading.Thread(target=want_40_rows_of_b)
    thread.start()
    wait_until(lambda: sizer.state()["waiting"] == 1)
    # b waits: a may not jump the queue, and its cap shrinks to one sample
    assert sizer.try_reserve("a", 5) is None
    assert sizer.cap("a") == 1
    big.release()
    assert b_running.wait(30)
    assert got["b"] == 40
    # 500 MB free after b's 400 MB, but a's fair share of 900 MB is 450 MB
    assert got["a_cap_while_b_runs"] == 45
    b_may_finish.set()
    thread.join()
    assert sizer.cap("a") == 90


def test_reserve_times_out():
    _, sizer = make_sizer(recheck_interval=0.001)
    teach(sizer, "a", 0, 10 * MB)
    with sizer.reserve("a", 90):
        with pytest.raises(TimeoutError):
            sizer.reserve("a", 10, timeout=0.01)
    assert sizer.state()["waiting"] == 0


# --------------------------------------------------------------------- OOMs
def test_on_oom_lowers_cap_below_failed_size():
    _, sizer = make_sizer()
    teach(sizer, "m", 0, 10 * MB)
    assert sizer.cap("m") == 90
    with sizer.reserve("m", 90):
        pass
    sizer.on_oom("m", 90)
    assert sizer.cap("m") < 90
    assert sizer.state()["models"]["m"]["ooms"] == 1


def test_on_oom_without_profile_gives_a_cap():
    _, sizer = make_sizer()
    with sizer.reserve("m", 256):
        pass
    sizer.on_oom("m", 256)
    assert sizer.cap("m") == 255


def test_is_oom_error_recognises_allocation_failures():
    torch = pytest.importorskip("torch")
    assert is_oom_error(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_oom_error(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_oom_error(MemoryError())
    assert is_oom_error(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert is_oom_error(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert is_oom_error(RuntimeError("cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE"))
    assert is_oom_error(RuntimeError("CUDA error: out of memory"))
    assert is_oom_error(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"))

    class OutOfMemoryError(MemoryError):  # like cupy.cuda.memory.OutOfMemoryError
        pass

    assert is_oom_error(OutOfMemoryError("Out of memory allocating 1,024 bytes"))

    class CUDARuntimeError(RuntimeError):  # like cupy's, raised from cudaMalloc
        pass

    assert is_oom_error(CUDARuntimeError("cudaErrorMemoryAllocation: out of memory"))
    wrapped = ValueError("model failed")
    wrapped.__cause__ = torch.cuda.OutOfMemoryError("CUDA out of memory")
    assert is_oom_error(wrapped)

    assert not is_oom_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_oom_error(ValueError("out of memory"))  # text only counts on RuntimeErrors
    assert not is_oom_error(KeyError("x"))
    assert not is_oom_error(SampleTooLargeError(3))
    assert not is_oom_error(SampleTooLargeError())


def test_sample_too_large_error_says_which_row_and_pickles():
    error = SampleTooLargeError(7, "OutOfMemoryError: CUDA out of memory")
    assert isinstance(error, errors.DynBatchError) and isinstance(error, MemoryError)
    assert "row 7" in str(error) and "does not fit" in str(error)
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is SampleTooLargeError
    assert clone.row == 7 and str(clone) == str(error)


# ------------------------------------------------------------ split & retry
class FakeModel:
    """Doubles its input; raises torch's OOM when a batch is larger than it can fit."""

    def __init__(self, sizer, model, *, fits, fixed=50 * MB, per_sample=8 * MB):
        self.sizer = sizer
        self.model = model
        self.fits = fits  # callable (n_rows) -> bool
        self.fixed = fixed
        self.per_sample = per_sample
        self.successes: list[tuple[int, int]] = []
        self.attempts = 0
        self.ooms = 0

    def run_rows(self, data):
        def run(start, stop):
            n = stop - start
            with self.sizer.reserve(self.model, n) as reservation:
                self.attempts += 1
                if not self.fits(n):
                    self.ooms += 1
                    raise torch_oom()
                out = data[start:stop] * 2
                self.successes.append((start, stop))
                reservation.record(self.fixed + self.per_sample * n)
                return out

        return run

    def serve(self, data, default_size=256):
        def max_rows():
            cap = self.sizer.cap(self.model)
            return default_size if cap is None else cap

        return run_split_on_oom(
            self.run_rows(data),
            len(data),
            on_oom=lambda k: self.sizer.on_oom(self.model, k),
            free_cache=lambda: None,
            max_rows=max_rows,
        )


def check_every_row_once(data, chunks, model):
    assert [c.start for c in chunks] == sorted(c.start for c in chunks)
    covered = [row for c in chunks for row in range(c.start, c.stop)]
    assert covered == list(range(len(data)))
    np.testing.assert_array_equal(np.concatenate([c.output for c in chunks]), data * 2)
    ran = [row for start, stop in model.successes for row in range(start, stop)]
    assert sorted(ran) == list(range(len(data)))  # none lost, none run twice


def test_split_on_oom_loses_nothing_and_cap_follows_memory():
    source, sizer = make_sizer()
    fake = FakeModel(
        sizer, "m", fits=lambda n: 50 * MB + 8 * MB * n <= source.free
    )  # OOM above 118 rows with 1000 MB free
    data = np.arange(300, dtype=np.float32)
    chunks = fake.serve(data)
    check_every_row_once(data, chunks, fake)
    assert fake.ooms >= 1
    assert sizer.cap("m") <= 118

    fake.successes.clear()
    ooms_before = fake.ooms
    chunks = fake.serve(data)
    check_every_row_once(data, chunks, fake)
    assert fake.ooms == ooms_before  # settled: no more OOMs
    assert sizer.cap("m") == 106  # (900 - 50) / 8: the exact fit

    source.free = 400 * MB  # another process takes memory
    assert sizer.cap("m") == 31
    fake.successes.clear()
    check_every_row_once(data, fake.serve(data), fake)
    assert fake.ooms == ooms_before
    source.free = 1000 * MB  # and releases it
    assert sizer.cap("m") == 106


def test_split_on_oom_when_memory_is_taken_mid_batch():
    source, sizer = make_sizer()
    teach(sizer, "m", 50 * MB, 8 * MB)
    calls = [0]

    def fits(n):
        calls[0] += 1
        if calls[0] == 2:  # during the second chunk another process grabs 600 MB
            source.free = 400 * MB
        return 50 * MB + 8 * MB * n <= source.free

    fake = FakeModel(sizer, "m", fits=fits)
    data = np.arange(400, dtype=np.float32)
    chunks = fake.serve(data)
    check_every_row_once(data, chunks, fake)
    assert fake.ooms >= 1
    assert sizer.cap("m") == 31
    source.free = 1000 * MB
    assert sizer.cap("m") >= 100  # the OOM was explained by the grab: the fit is kept


def test_model_failing_above_a_size_settles_below_it():
    """torch OOM above 37 rows whatever the memory readings say (the profile underestimates)."""
    limit = 37
    source, sizer = make_sizer()
    fake = FakeModel(sizer, "m", fits=lambda n: n <= limit)
    data = np.arange(256, dtype=np.float32)
    oom_history = []
    for _ in range(12):
        fake.successes.clear()
        before = fake.ooms
        check_every_row_once(data, fake.serve(data), fake)
        oom_history.append(fake.ooms - before)
    assert oom_history[-3:] == [0, 0, 0], oom_history
    assert sum(oom_history) <= 12  # bisection, not one OOM per size
    assert limit // 2 <= sizer.cap("m") <= limit


def test_run_split_on_oom_releases_the_exception_before_freeing_cache():
    class Payload:
        pass

    refs = []
    seen_alive = []

    def run(start, stop):
        payload = Payload()  # stands for the failed batch's tensors
        refs.append(weakref.ref(payload))
        if stop - start > 2:
            raise torch_oom()
        return list(range(start, stop))

    def free_cache():
        seen_alive.append(any(ref() is not None for ref in refs))

    oom_sizes = []
    chunks = run_split_on_oom(run, 8, on_oom=oom_sizes.append, free_cache=free_cache)
    assert seen_alive and not any(seen_alive)
    assert oom_sizes == [8, 4, 4]
    assert [(c.start, c.stop) for c in chunks] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert sum((c.output for c in chunks), []) == list(range(8))
    assert all(isinstance(c, OutputChunk) and c.error is None for c in chunks)


def test_run_split_on_oom_respects_max_rows():
    calls = []

    def run(start, stop):
        calls.append((start, stop))
        return stop - start

    chunks = run_split_on_oom(run, 10, max_rows=lambda: 4)
    assert calls == [(0, 4), (4, 8), (8, 10)]
    assert sum(c.output for c in chunks) == 10
    assert run_split_on_oom(run, 0) == []


def test_single_sample_too_large():
    def run(start, stop):
        if start <= 5 < stop:  # row 5 never fits
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED")
        return list(range(start, stop))

    with pytest.raises(SampleTooLargeError) as info:
        run_split_on_oom(run, 8)
    assert info.value.row == 5
    assert "CUBLAS_STATUS_ALLOC_FAILED" in str(info.value)
    assert isinstance(info.value, errors.SampleTooLargeError)

    chunks = run_split_on_oom(run, 8, on_sample_too_large="collect")
    failed = [c for c in chunks if c.error is not None]
    assert [(c.start, c.stop) for c in failed] == [(5, 6)]
    assert isinstance(failed[0].error, SampleTooLargeError) and failed[0].output is None
    assert sum((c.output for c in chunks if c.error is None), []) == [0, 1, 2, 3, 4, 6, 7]


def test_single_sample_too_large_with_sizer():
    source, sizer = make_sizer()
    teach(sizer, "m", 0, 10 * MB)
    fake = FakeModel(sizer, "m", fits=lambda n: False)
    with pytest.raises(SampleTooLargeError):
        fake.serve(np.arange(4, dtype=np.float32))
    assert sizer.cap("m") >= 1


def test_non_oom_errors_propagate_unchanged():
    def run(start, stop):
        raise KeyError("bad")

    calls = []
    with pytest.raises(KeyError):
        run_split_on_oom(run, 4, on_oom=calls.append, free_cache=lambda: calls.append("free"))
    assert calls == []
    with pytest.raises(ValueError):
        run_split_on_oom(run, 4, on_sample_too_large="ignore")


# ----------------------------------------------------------- change events
def test_poll_reports_only_changes_beyond_threshold():
    source, sizer = make_sizer(min_change=0.05)
    assert sizer.poll() is False  # first reading: nothing to compare with
    source.free -= 30 * MB  # 3 % of capacity
    assert sizer.poll() is False
    source.free -= 30 * MB  # 6 % since the last reported change: drifts add up
    assert sizer.poll() is True
    assert sizer.poll() is False  # no change since
    source.free += 40 * MB
    assert sizer.poll() is False
    source.free += 200 * MB
    assert sizer.poll() is True
    source.free -= 20 * MB
    sizer.read()
    assert sizer.changed_since_last(threshold=0.01) is True
    assert sizer.changed_since_last(threshold=0.01) is False


def test_poll_ignores_memory_moving_between_free_and_our_own_allocations():
    source, sizer = make_sizer(min_change=0.05)
    source.framework_used = 100 * MB
    assert sizer.poll() is False
    # our own batch allocates 300 MB: free drops, framework_used rises by as much
    source.free -= 300 * MB
    source.framework_used += 300 * MB
    assert sizer.poll() is False
    source.free -= 300 * MB  # someone else takes 300 MB
    assert sizer.poll() is True


def test_waiting_reservation_is_granted_when_poll_sees_memory_come_back():
    source, sizer = make_sizer(recheck_interval=60.0)
    teach(sizer, "a", 0, 10 * MB)
    held = sizer.reserve("a", 10)
    source.free = 200 * MB  # cap: (200 - 100 - 100 reserved) -> nothing fits
    assert sizer.poll() is True
    got = []
    thread = threading.Thread(target=lambda: got.append(sizer.reserve("a", 20, timeout=30)))
    thread.start()
    wait_until(lambda: sizer.state()["waiting"] == 1)
    source.free = 1000 * MB
    assert sizer.poll() is True  # wakes the waiter at once
    thread.join(30)
    assert got and got[0].n == 20
    got[0].release()
    held.release()


def test_state_is_json_able():
    import json

    source, sizer = make_sizer()
    teach(sizer, "m", 10 * MB, 5 * MB)
    sizer.cap("m")
    with sizer.reserve("m", 4):
        state = json.loads(json.dumps(sizer.state()))
    assert state["models"]["m"]["cap"] == 178
    assert state["models"]["m"]["profile"]["basis"] == "fit"
    assert state["in_flight"] == 1 and state["memory"]["free"] == 1000 * MB


