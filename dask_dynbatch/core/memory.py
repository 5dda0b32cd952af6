"""Batch sizes from the memory a device has free now.

One :class:`MemorySizer` per device, shared by every model loaded on it. For each model it keeps a
:class:`~dask_dynbatch.core.profile.MemoryProfile` (fixed bytes plus bytes per sample, fitted from
measured peaks and out-of-memory errors) and turns the device's free memory into a *cap*: the
largest batch that fits now. Batches reserve their memory while they run so that concurrent
batches of several models jointly fit. An out-of-memory error splits the batch and retries it
(:mod:`dask_dynbatch.core.oom`) and corrects the profile (:mod:`dask_dynbatch.core.profile`).

Pure: no GPU library, no dask. Readings come from a :class:`MemorySource` (anything with
``read() -> DeviceMemory``; the real ones are in :mod:`dask_dynbatch.worker.telemetry`,
:class:`FakeMemory` is for tests).

Policies
--------
Available memory
    ``available = effective_free - margin - reserved``, ``margin = min(safety_margin * capacity,
    safety_margin_max)``, where ``reserved`` sums the reservations of all batches in flight on the
    device; with a ``budget``, also at most ``budget_bytes - framework_used - reserved``. A batch
    in flight may show up in ``effective_free`` *and* be subtracted as a reservation: the double
    count is deliberate, it errs towards smaller batches (an OOM costs a split and a retry, a
    smaller batch a little throughput).
Cap
    ``profile.max_samples(available)``, at least 1 (a model is never told it may not run a single
    sample; whether that sample fits is found out by running it). ``None`` while the model has no
    profile: the caller uses its own conservative default.
Fair share
    While other models are active on the device (holding a reservation or waiting for one), a
    model's cap and partial grants are also limited to ``(available + reserved) / k -
    own_reserved`` for ``k`` active models, this one included, but never below one sample when
    one sample fits in ``available``.
Admission
    First come, first served across all models on a device: a request waits while an older
    request of any model waits, so no model is starved by another's stream of batches. A request
    is granted when its memory fits ``available`` (``partial=True``: when one sample does, and it
    gets as many rows as fit), or when nothing else is in flight on the device (waiting cannot
    make more memory appear; an OOM is then handled by splitting).
Change detection
    :meth:`MemorySizer.poll` reports a re-plan event when the memory not held by this process
    (``effective_free + framework_used``) moved by more than ``min_change`` of the capacity since
    the last reported change, so our own batches starting and finishing are not events, while slow
    drifts add up.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

# MemoryProfile is used below; the rest is re-exported so that imports from this module keep working
from .profile import MemoryProfile

__all__ = [
    "DeviceMemory",
    "FakeMemory",
    "MemorySource",
    "MemorySizer",
    "Reservation",
]


@dataclass
class DeviceMemory:
    """One reading of a device's memory, in bytes."""

    total: int  # physical memory of the device (GPU memory, or host RAM)
    #: free as the driver / operating system sees it, other processes included; clipped to what
    #: ``limit`` leaves
    free: int
    #: held unused in our framework's allocator cache (torch reserved - allocated, CuPy pool
    #: total - used): other processes cannot use it, we can
    framework_reserved_unused: int = 0
    #: explicit budget of this process on this device (a Dask worker's ``memory_limit`` on CPU,
    #: torch's per-process memory fraction, a CuPy pool limit)
    limit: int | None = None
    #: bytes this process holds in live allocations (None: the source cannot tell); for budgets
    #: and to tell other processes' memory changes from our own
    framework_used: int | None = None
    nvml_free: int | None = None  # free memory as NVML reports it, when the source read NVML
    source: str = ""  # name of the source that produced the reading

    @property
    def capacity(self) -> int:
        """Memory this process may use at most: ``total``, or ``limit`` if smaller."""
        if self.limit is not None:
            return max(0, min(self.total, self.limit))
        return self.total

    @property
    def effective_free(self) -> int:
        """Memory a new allocation of ours can get now: free plus our unused cache."""
        return max(0, self.free) + max(0, self.framework_reserved_unused)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict, with ``capacity`` and ``effective_free`` added."""
        out = asdict(self)
        out["capacity"] = self.capacity
        out["effective_free"] = self.effective_free
        return out


@runtime_checkable
class MemorySource(Protocol):
    """Anything that can say how much memory a device has free now."""

    def read(self) -> DeviceMemory:
        """Return a fresh :class:`DeviceMemory` reading."""
        ...


class FakeMemory:
    """A memory source with numbers set by hand, for deterministic tests (set ``fake.free = ...``
    to simulate other jobs); ``reads`` counts the calls of :meth:`read`."""

    name = "fake"

    def __init__(
        self,
        total: int,
        free: int,
        *,
        framework_reserved_unused: int = 0,
        limit: int | None = None,
        framework_used: int | None = None,
    ):
        self.total = int(total)
        self.free = int(free)
        self.framework_reserved_unused = int(framework_reserved_unused)
        self.limit = limit
        self.framework_used = framework_used
        self.reads = 0
        self._lock = threading.Lock()

    def read(self) -> DeviceMemory:
        """Return the numbers currently set, and count the read."""
        with self._lock:
            self.reads += 1
            return DeviceMemory(
                total=self.total,
                free=self.free,
                framework_reserved_unused=self.framework_reserved_unused,
                limit=self.limit,
                framework_used=self.framework_used,
                source=self.name,
            )

    def __repr__(self) -> str:
        return f"FakeMemory(total={self.total}, free={self.free})"


class Reservation:
    """Memory held for one batch in flight; a context manager that releases it on exit.

    ``n`` rows are granted out of ``requested`` (fewer only with ``partial=True``): run at most
    ``n`` under the reservation. ``bytes`` is what counts against the device (0 when the model has
    no profile); ``available_bytes`` what was available to the batch when it was granted (other
    batches' reservations and the safety margin already taken off).
    """

    def __init__(self, sizer: MemorySizer, model: str, requested: int, n: int, nbytes: int, available_bytes: int):
        self._sizer = sizer
        self.model = model
        self.requested = requested
        self.n = n
        self.bytes = nbytes
        self.available_bytes = available_bytes
        self.released = False

    def release(self) -> None:
        """Give the memory back (idempotent)."""
        self._sizer._release(self)

    def record(self, peak_bytes: int) -> None:
        """Record the batch's measured peak (see :meth:`MemorySizer.record`)."""
        self._sizer.record(self.model, self.n, peak_bytes, available_bytes=self.available_bytes)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def __repr__(self) -> str:
        return (
            f"Reservation(model={self.model!r}, n={self.n}, bytes={self.bytes}, "
            f"released={self.released})"
        )


class _Ticket:
    __slots__ = ("model", "n")

    def __init__(self, model: str, n: int):
        self.model = model
        self.n = n


def _rows(n: int) -> int:
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return n


class MemorySizer:
    """Batch-size caps for every model on one device, from its free memory now (policies: see the
    module docstring).

    ``safety_margin``: fraction of the device capacity kept free, at most ``safety_margin_max``
    bytes (10 % of a 140 GiB card is 14 GiB: with a neighbour holding the rest, a pure fraction would
    leave a model no room at all). ``budget``: an explicit per-device budget of this process, a
    fraction ``0 < b <= 1`` of the capacity or bytes (``> 1``). ``min_change``: fraction of the
    capacity that free memory must move by for :meth:`poll` to report a change.
    ``warmup_batches``: first :meth:`record` calls per model that are ignored. ``recheck_interval``:
    seconds between re-reads of the source while a reservation waits (other processes may free
    memory without telling us).

    Thread-safe: batches run in executor threads, so every method takes the sizer's lock.
    """

    def __init__(
        self,
        source: MemorySource,
        *,
        safety_margin: float = 0.1,
        safety_margin_max: int | None = None,
        budget: float | int | None = None,
        min_change: float = 0.05,
        warmup_batches: int = 1,
        recheck_interval: float = 0.05,
    ):
        if not 0 <= safety_margin < 1:
            raise ValueError(f"safety_margin must be in [0, 1), got {safety_margin}")
        if safety_margin_max is not None and safety_margin_max < 0:
            raise ValueError(f"safety_margin_max must be >= 0 bytes, got {safety_margin_max}")
        if budget is not None and not budget > 0:
            raise ValueError(f"budget must be a fraction in (0, 1] or bytes > 1, got {budget}")
        if min_change < 0:
            raise ValueError(f"min_change must be >= 0, got {min_change}")
        if warmup_batches < 0:
            raise ValueError("warmup_batches must be >= 0")
        self.source = source
        self.safety_margin = float(safety_margin)
        self.safety_margin_max = None if safety_margin_max is None else int(safety_margin_max)
        self.budget = budget
        self.min_change = float(min_change)
        self.warmup_batches = int(warmup_batches)
        self.recheck_interval = float(recheck_interval)
        self._lock = threading.RLock()
        self._condition = threading.Condition(self._lock)
        self._profiles: dict[str, MemoryProfile] = {}
        self._reservations: dict[int, Reservation] = {}
        self._queue: deque[_Ticket] = deque()
        self._latest: DeviceMemory | None = None
        self._reference_outside: int | None = None
        self._reference_capacity: int | None = None
        self._last_cap: dict[str, int | None] = {}
        self._last_available: dict[str, int] = {}
        self._thread_grants = threading.local()
        self._oom_counts: dict[str, int] = {}
        self._waits = 0

    # ---- profiles
    def profile(self, model: str) -> MemoryProfile:
        """The model's profile (created empty on first use)."""
        with self._lock:
            profile = self._profiles.get(model)
            if profile is None:
                profile = self._profiles[model] = MemoryProfile(warmup=self.warmup_batches)
            return profile

    def forget(self, model: str) -> None:
        """Drop a model's profile (e.g. when it is unloaded)."""
        with self._condition:
            self._profiles.pop(model, None)
            self._last_cap.pop(model, None)
            self._last_available.pop(model, None)
            self._condition.notify_all()

    # ---- readings
    def read(self) -> DeviceMemory:
        """Read the source now (the last good reading if it fails)."""
        with self._lock:
            try:
                self._latest = self.source.read()
            except Exception:
                if self._latest is None:
                    raise
            if self._reference_outside is None:  # first reading: the reference for changes
                self._reference_outside = self._outside_free(self._latest)
                self._reference_capacity = self._latest.capacity
            return self._latest

    def _budget_bytes(self, reading: DeviceMemory) -> float | None:
        if self.budget is None:
            return None
        if self.budget <= 1:
            return float(self.budget) * reading.capacity
        return float(self.budget)

    def margin_bytes(self, reading: DeviceMemory) -> float:
        """Bytes kept free on the device: ``safety_margin`` of its capacity, at most ``safety_margin_max``."""
        margin = self.safety_margin * reading.capacity
        return margin if self.safety_margin_max is None else min(margin, self.safety_margin_max)

    def reserved_bytes(self, model: str | None = None) -> int:
        """Bytes reserved by batches in flight (of one model, or of all)."""
        with self._lock:
            return sum(
                r.bytes for r in self._reservations.values() if model is None or r.model == model
            )

    def available_bytes(self, reading: DeviceMemory | None = None) -> int:
        """Memory a new batch may use now (see the module docstring)."""
        with self._lock:
            reading = self.read() if reading is None else reading
            reserved = self.reserved_bytes()
            available = reading.effective_free - self.margin_bytes(reading) - reserved
            budget = self._budget_bytes(reading)
            if budget is not None:
                available = min(available, budget - (reading.framework_used or 0) - reserved)
            return int(max(0, available))

    def _fair_share_limit(self, model: str, profile: MemoryProfile, available: int) -> int | None:
        """Rows ``model`` may take under the fair-share rule, or None when it does not apply."""
        others = {r.model for r in self._reservations.values()} | {t.model for t in self._queue}
        others.discard(model)
        if not others:
            return None
        pool = available + self.reserved_bytes()
        share = pool / (len(others) + 1) - self.reserved_bytes(model)
        return profile.max_samples(share) if share > 0 else 0

    def _limit(self, model: str, available: int) -> int | None:
        """Rows that fit now for ``model`` (may be 0), or None without a profile."""
        profile = self._profiles.get(model)
        if profile is None or not profile.known:
            return None
        fit = profile.max_samples(available)
        share = self._fair_share_limit(model, profile, available)
        if share is not None and share < fit:
            fit = max(share, 1 if fit >= 1 else 0)
        return fit

    # ---- caps
    def cap(self, model: str) -> int | None:
        """Largest batch of ``model`` that fits in the device's memory now: at least 1, or None
        while the model has no profile (the caller then uses a conservative default size)."""
        with self._lock:
            available = self.available_bytes()
            self._last_available[model] = available
            limit = self._limit(model, available)
            cap = None if limit is None else max(1, limit)
            self._last_cap[model] = cap
            return cap

    # ---- reservations
    def _try_grant(self, model: str, n: int, partial: bool) -> Reservation | None:
        available = self.available_bytes()
        self._last_available[model] = available
        profile = self._profiles.get(model)
        limit = self._limit(model, available)
        nothing_in_flight = not self._reservations
        if limit is None:  # no profile: cost unknown, counted as 0 bytes
            granted = n
        elif partial:
            if limit >= 1:
                granted = min(n, limit)
            elif nothing_in_flight:
                granted = 1
            else:
                return None
        elif n <= limit or nothing_in_flight:
            granted = n
        else:
            return None
        nbytes = 0 if profile is None or not profile.known else profile.bytes_for(granted)
        reservation = Reservation(self, model, n, granted, int(nbytes or 0), available)
        self._reservations[id(reservation)] = reservation
        grants = getattr(self._thread_grants, "available", None)
        if grants is None:
            grants = self._thread_grants.available = {}
        grants[model] = available
        if limit is not None:
            self._last_cap[model] = max(1, limit)
        return reservation

    def reserve(
        self,
        model: str,
        n: int,
        *,
        partial: bool = False,
        timeout: float | None = None,
    ) -> Reservation:
        """Reserve memory for a batch of ``n`` rows of ``model`` (policy: "Admission" in the module
        docstring); wait at most ``timeout`` seconds, else raise ``TimeoutError``.

        ``partial=True`` grants fewer rows (at least 1) when not all fit: ``Reservation.n`` says how
        many. While a request waits the source is re-read every ``recheck_interval`` seconds, and
        at once when a reservation is released, a profile changes or :meth:`poll` sees a change.
        Do not ask for a second full reservation from a thread that holds one and waits on it: it
        could wait for memory that only the caller can release (use ``partial=True`` or ``timeout``).
        """
        n = _rows(n)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            if not self._queue:
                granted = self._try_grant(model, n, partial)
                if granted is not None:
                    return granted
            ticket = _Ticket(model, n)
            self._queue.append(ticket)
            self._waits += 1
            try:
                return self._wait_for_turn(ticket, partial, deadline, timeout)
            except BaseException:
                try:
                    self._queue.remove(ticket)
                except ValueError:
                    pass
                self._condition.notify_all()
                raise

    def _wait_for_turn(
        self, ticket: _Ticket, partial: bool, deadline: float | None, timeout: float | None
    ) -> Reservation:
        """With the lock held: wait until ``ticket`` is first in line and its request is granted."""
        while True:
            if self._queue[0] is ticket:
                granted = self._try_grant(ticket.model, ticket.n, partial)
                if granted is not None:
                    self._queue.popleft()
                    self._condition.notify_all()
                    return granted
            wait = self.recheck_interval
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no memory for {ticket.n} rows of {ticket.model!r} within {timeout} s")
                wait = min(wait, remaining)
            self._condition.wait(wait)

    def try_reserve(self, model: str, n: int, *, partial: bool = False) -> Reservation | None:
        """Like :meth:`reserve` but never waits: None when it cannot be granted now."""
        n = _rows(n)
        with self._lock:
            if self._queue:
                return None
            return self._try_grant(model, n, partial)

    def _release(self, reservation: Reservation) -> None:
        with self._condition:
            if reservation.released:
                return
            reservation.released = True
            self._reservations.pop(id(reservation), None)
            self._condition.notify_all()

    # ---- learning
    def _grant_available(self, model: str) -> int | None:
        grants = getattr(self._thread_grants, "available", None) or {}
        if model in grants:
            return grants[model]
        return self._last_available.get(model)

    def record(
        self,
        model: str,
        n: int,
        peak_bytes: int,
        *,
        available_bytes: int | None = None,
    ) -> None:
        """Record a successful batch of ``n`` rows and the peak memory it added (see
        :mod:`~dask_dynbatch.core.profile`); ``available_bytes``: what was available when it started
        (``Reservation.available_bytes``)."""
        with self._condition:
            if available_bytes is None:
                available_bytes = self._grant_available(model)
            profile = self.profile(model)
            profile.update(n, peak_bytes, available_bytes)
            self._condition.notify_all()

    def on_oom(self, model: str, n: int, *, available_bytes: int | None = None) -> None:
        """A batch of ``n`` rows of ``model`` ran out of memory: lower its cap below ``n``.

        ``available_bytes`` (memory available when that batch was granted) defaults to what this
        thread's last reservation for the model was granted with, else the last value computed for
        the model, else now.
        """
        with self._condition:
            available_now = self.available_bytes()
            available = available_bytes if available_bytes is not None else self._grant_available(model)
            if available is None:
                available = available_now
            profile = self.profile(model)
            needed = profile.bytes_for(n)
            explained = needed is not None and needed > available_now
            profile.on_oom(n, available, explained=explained)
            self._oom_counts[model] = self._oom_counts.get(model, 0) + 1
            self._condition.notify_all()

    # ---- change detection
    @staticmethod
    def _outside_free(reading: DeviceMemory) -> int:
        return reading.effective_free + (reading.framework_used or 0)

    def changed_since_last(self, threshold: float | None = None) -> bool:
        """Whether the latest reading moved by more than ``threshold`` (default ``min_change``) of
        the capacity since the last reported change ("Change detection" in the module docstring);
        False when nothing was read before (the first reading is the reference)."""
        threshold = self.min_change if threshold is None else threshold
        with self._lock:
            reading = self._latest
            if reading is None:
                return False
            outside = self._outside_free(reading)
            capacity = reading.capacity
            if self._reference_outside is None:
                self._reference_outside, self._reference_capacity = outside, capacity
                return False
            moved = abs(outside - self._reference_outside) > threshold * max(capacity, 1)
            if moved or capacity != self._reference_capacity:
                self._reference_outside, self._reference_capacity = outside, capacity
                return True
            return False

    def poll(self) -> bool:
        """Read the source; True when free memory moved by more than ``min_change`` (a re-plan event)."""
        with self._condition:
            self.read()
            changed = self.changed_since_last()
            if changed:
                self._condition.notify_all()
            return changed

    # ---- reporting
    def used_fraction(self) -> float | None:
        """Fraction of the device's capacity not free to a new batch, from the latest reading (our
        own allocator's unused cache counts as free); None before any reading."""
        with self._lock:
            reading = self._latest
        if reading is None or reading.capacity <= 0:
            return None
        return min(1.0, max(0.0, 1.0 - reading.effective_free / reading.capacity))

    def state(self) -> dict[str, Any]:
        """JSON-able summary: latest reading, reservations, per-model caps and profiles."""
        with self._lock:
            reading = self._latest
            models = {}
            for model, profile in self._profiles.items():
                models[model] = {
                    "cap": self._last_cap.get(model),
                    "reserved_bytes": self.reserved_bytes(model),
                    "ooms": self._oom_counts.get(model, 0),
                    "profile": profile.state(),
                }
            return {
                "memory": None if reading is None else reading.to_dict(),
                "safety_margin": self.safety_margin,
                "safety_margin_max": self.safety_margin_max,
                "budget": self.budget,
                "reserved_bytes": self.reserved_bytes(),
                "in_flight": len(self._reservations),
                "waiting": len(self._queue),
                "waits": self._waits,
                "models": models,
            }

    def __repr__(self) -> str:
        return (f"MemorySizer(source={self.source!r}, safety_margin={self.safety_margin}, "
                f"safety_margin_max={self.safety_margin_max}, budget={self.budget})")
