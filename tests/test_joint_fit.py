"""Several models on one device (dask_dynbatch.core.memory): their concurrent batches jointly fit the
free memory, none is starved, and each model's cap follows the mix of models that want memory.

Three models with very different bytes per sample (a segmenter, a classifier, a small MLP) go
through phases of a changing demand mix: segmenter-heavy, classifier-heavy, all three at once, then
the others idle. Deterministic: memory comes from FakeMemory, the requests that must wait run in
threads whose state is awaited (nothing asserts on wall-clock time), and every expected number
follows from the rules in the module docstring of ``dask_dynbatch.core.memory``.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from dask_dynbatch.core.memory import FakeMemory, MemorySizer, Reservation

MB = 1 << 20
#: model -> (fixed bytes, bytes per sample): a segmenter at 80x the classifier's cost per sample,
#: the classifier at 6x the MLP's
PROFILES = {"seg": (20 * MB, 40 * MB), "cls": (0, 3 * MB), "mlp": (0, MB // 2)}
TOTAL = 1000 * MB
MARGIN = 100 * MB  # safety_margin 0.1 of the capacity


def make_sizer(free: int = TOTAL) -> tuple[FakeMemory, MemorySizer]:
    source = FakeMemory(total=TOTAL, free=free)
    sizer = MemorySizer(source, safety_margin=0.1, warmup_batches=0, recheck_interval=0.001)
    for model, (fixed, per_sample) in PROFILES.items():
        for n in (8, 32):  # two exact points: the fit recovers fixed and per-sample bytes
            sizer.record(model, n, fixed + per_sample * n)
    return source, sizer


def rows_in(model: str, nbytes: float) -> int:
    """Rows of ``model`` that fit in ``nbytes`` by its profile (what the sizer computes)."""
    fixed, per_sample = PROFILES[model]
    return max(0, int((nbytes - fixed) // per_sample))


def wait_until(predicate, limit: float = 10.0) -> None:
    """Wait for another thread to reach a state (no timing is asserted)."""
    end = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("state not reached")
        time.sleep(0.001)


class Ask:
    """One request for up to ``rows`` rows of ``model`` (``reserve(partial=True)``, as a device
    batch cut to what fits), made in a thread of its own so that it may wait its turn."""

    def __init__(self, sizer: MemorySizer, model: str, rows: int):
        self.model = model
        self.reservation: Reservation | None = None
        self.error: BaseException | None = None
        self._done = threading.Event()
        waiting_before = sizer.state()["waiting"]
        self._thread = threading.Thread(target=self._run, args=(sizer, rows), daemon=True)
        self._thread.start()
        # granted at once, or queued behind the requests already waiting
        wait_until(lambda: self._done.is_set() or sizer.state()["waiting"] > waiting_before)

    def _run(self, sizer: MemorySizer, rows: int) -> None:
        try:
            self.reservation = sizer.reserve(self.model, rows, partial=True, timeout=30)
        except BaseException as exc:  # reported by granted()
            self.error = exc
        finally:
            self._done.set()

    @property
    def waiting(self) -> bool:
        return not self._done.is_set()

    def granted(self) -> Reservation:
        """The reservation, once granted (waits for the thread)."""
        assert self._done.wait(10), f"{self.model}: request never granted"
        if self.error is not None:
            raise self.error
        assert self.reservation is not None
        return self.reservation


class Device:
    """The sizer plus the reservations held now, with the joint-fit check run after every step."""

    def __init__(self, free: int = TOTAL):
        self.source, self.sizer = make_sizer(free)
        self.held: list[Reservation] = []
        self.grants: list[Reservation] = []

    def ask(self, model: str, rows: int) -> Ask:
        """A request; held at once when granted at once (else see :meth:`release`'s ``granting``)."""
        ask = Ask(self.sizer, model, rows)
        if not ask.waiting:
            self._hold(ask.granted())
        self.check()
        return ask

    def _hold(self, reservation: Reservation) -> None:
        assert reservation.n >= 1
        self.held.append(reservation)
        self.grants.append(reservation)

    def release(self, reservation: Reservation, granting: tuple[Ask, ...] = ()) -> None:
        """Release a batch's memory; the waiting requests in ``granting`` are granted in turn."""
        reservation.release()
        self.held.remove(reservation)
        for ask in granting:
            self._hold(ask.granted())
        self.check()

    def release_all(self, model: str | None = None) -> None:
        for reservation in [r for r in self.held if model is None or r.model == model]:
            self.release(reservation)

    def pool(self) -> int:
        """Memory the device's batches may hold together: free less the safety margin."""
        return self.source.free - MARGIN

    def check(self) -> None:
        """Joint fit: the batches in flight hold no more than the free memory (less the margin),
        and each was granted no more than what was available to it then."""
        held = sum(r.bytes for r in self.held)
        assert self.sizer.reserved_bytes() == held  # no request was granted behind our back
        assert held <= self.pool(), f"{held / MB:.1f} MB reserved > {self.pool() / MB:.1f} MB free"
        for r in self.held:
            assert r.bytes <= r.available_bytes

    def caps(self) -> dict[str, int | None]:
        return {model: self.sizer.cap(model) for model in PROFILES}


ALONE = {model: rows_in(model, TOTAL - MARGIN) for model in PROFILES}


def test_three_models_jointly_fit_none_starved_caps_follow_the_mix():
    device = Device()
    pool = device.pool()
    assert device.caps() == ALONE == {"seg": 22, "cls": 300, "mlp": 1800}

    # -- segmenter-heavy: the segmenter takes all it can, a classifier batch arrives
    seg = device.ask("seg", 100).granted()
    assert seg.n == ALONE["seg"]
    cls_wait = device.ask("cls", 50)
    assert cls_wait.waiting  # nothing free: it waits its turn ...
    assert device.caps()["seg"] == 1  # ... and while it waits, the segmenter's next batch is one row
    assert device.sizer.try_reserve("seg", 5, partial=True) is None  # first come, first served
    device.release(seg, granting=(cls_wait,))
    cls = cls_wait.granted()
    assert cls.n == 50  # alone in flight once the segmenter let go: all it asked for
    seg = device.ask("seg", 100).granted()
    # the classifier is active: the segmenter gets half the pool, less what it holds (nothing)
    assert seg.n == rows_in("seg", pool / 2) == 10
    assert device.caps()["mlp"] == rows_in("mlp", pool / 3) == 600  # an idle third model: a third
    device.release_all()

    # -- classifier-heavy: the classifier takes all it can, a segmenter batch arrives
    cls = device.ask("cls", 1000).granted()
    assert cls.n == ALONE["cls"]
    seg_wait = device.ask("seg", 5)
    assert seg_wait.waiting and device.caps()["cls"] == 1
    device.release(cls, granting=(seg_wait,))
    seg = seg_wait.granted()
    assert seg.n == 5
    cls = device.ask("cls", 1000).granted()
    assert cls.n == rows_in("cls", pool / 2) == 150  # its fair share beside the segmenter
    # the segmenter's cap: its share (half the pool) less the 220 MB it holds
    assert device.caps()["seg"] == rows_in("seg", pool / 2 - seg.bytes) == 5
    device.release_all()

    # -- all three at once: the classifier holds everything, the segmenter and the MLP queue
    cls = device.ask("cls", 1000).granted()
    assert cls.n == ALONE["cls"]
    seg_wait = device.ask("seg", 100)
    mlp_wait = device.ask("mlp", 5000)
    assert seg_wait.waiting and mlp_wait.waiting
    assert device.caps() == {"seg": 1, "cls": 1, "mlp": 1}  # nothing free, two waiting: one row each
    # first come, first served: the segmenter first, limited to half the pool while the MLP waits;
    # then the MLP, to its half
    device.release(cls, granting=(seg_wait, mlp_wait))
    seg, mlp = seg_wait.granted(), mlp_wait.granted()
    assert seg.n == rows_in("seg", pool / 2) == 10
    assert mlp.n == rows_in("mlp", pool / 2) == 900
    # the classifier comes back: a third of the pool is its share, but only 30 MB are left
    cls = device.ask("cls", 1000).granted()
    assert cls.n == rows_in("cls", pool - seg.bytes - mlp.bytes) == 10
    device.release(mlp)
    # the segmenter holds its share already; it still gets one row, never none
    assert device.caps()["seg"] == 1
    seg_more = device.ask("seg", 100).granted()
    assert seg_more.n == 1
    # the classifier, beside the segmenter: half the pool less its own 30 MB, within what is free
    cls_more = device.ask("cls", 1000).granted()
    assert cls_more.n == rows_in("cls", pool - seg.bytes - seg_more.bytes - cls.bytes) == 130
    assert device.sizer.reserved_bytes() == pool  # the memory is used to the last byte, not beyond

    # -- the others go idle: the segmenter's cap grows back step by step
    device.release(seg_more)
    device.release_all("mlp")
    capped = device.caps()["seg"]
    device.release_all("cls")
    alone_but_holding = device.caps()["seg"]
    # beside the classifier, one row; alone, all that its batch in flight leaves
    assert (capped, alone_but_holding) == (1, rows_in("seg", pool - seg.bytes)) == (1, 11)
    device.release_all()
    assert device.caps() == ALONE

    # -- a neighbour process takes 400 MB: every cap follows the free memory, grants still fit
    device.source.free = TOTAL - 400 * MB
    smaller = device.caps()
    assert smaller == {model: rows_in(model, device.pool()) for model in PROFILES} == {"seg": 12, "cls": 166, "mlp": 1000}
    seg = device.ask("seg", 10).granted()
    cls = device.ask("cls", 1000).granted()
    assert (seg.n, cls.n) == (10, 26)  # the classifier gets the 80 MB the segmenter left
    device.release_all()
    device.source.free = TOTAL
    assert device.caps() == ALONE

    # every model got memory in every phase it asked in, and the queue is empty
    assert {r.model for r in device.grants} == set(PROFILES)
    assert device.sizer.state()["waiting"] == 0 and device.sizer.reserved_bytes() == 0


#: phases of the threaded run: per model, the most rows one of its batches asks for (0: idle)
PHASES = [
    ("segmenter-heavy", {"seg": 22, "cls": 20, "mlp": 0}),
    ("classifier-heavy", {"seg": 3, "cls": 300, "mlp": 100}),
    ("all three", {"seg": 22, "cls": 300, "mlp": 1800}),
    ("segmenter alone", {"seg": 22, "cls": 0, "mlp": 0}),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_three_models_with_a_changing_mix_under_concurrent_batches(seed):
    """Each model's device loop in a thread (two for the segmenter and the classifier), asking for
    batches of random sizes up to its phase's demand, as a device batch is cut to the cap: joint
    fit on every grant, every model that asks gets rows in every phase, none waits forever."""
    source, sizer = make_sizer()
    pool = source.free - MARGIN
    guard = threading.Lock()
    failures: list[BaseException] = []
    for name, demand in PHASES:
        got = {model: 0 for model in PROFILES}
        most = {model: 0 for model in PROFILES}

        def loop(model: str, rng: random.Random) -> None:
            try:
                for _ in range(60):
                    want = rng.randint(1, demand[model])
                    with sizer.reserve(model, want, partial=True, timeout=30) as r:
                        total = sizer.reserved_bytes()
                        assert 1 <= r.n <= want
                        assert total <= pool, f"{name}: {total / MB:.1f} MB reserved > {pool / MB:.1f} MB"
                        assert r.bytes <= r.available_bytes
                        with guard:
                            got[model] += r.n
                            most[model] = max(most[model], r.n)
                        if rng.random() < 0.5:
                            time.sleep(0)  # let the others interleave
            except BaseException as exc:  # pragma: no cover - reported below
                failures.append(exc)

        threads = [
            threading.Thread(target=loop, args=(model, random.Random(f"{seed}-{name}-{model}-{copy}")))
            for model in PROFILES if demand[model]
            for copy in range(1 if model == "mlp" else 2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures, failures
        assert all(got[model] > 0 for model in PROFILES if demand[model]), (name, got)  # none starved
        assert all(most[model] <= ALONE[model] for model in PROFILES)
        assert sizer.reserved_bytes() == 0 and sizer.state()["waiting"] == 0
    # alone again, each model may have the whole pool
    assert {model: sizer.cap(model) for model in PROFILES} == ALONE
