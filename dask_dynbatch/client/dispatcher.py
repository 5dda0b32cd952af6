"""The dispatcher: on the client's event loop, turns a Batcher's queue into shipments to workers.

Woken by requests arriving, replies, and pushed events (a worker joined, became ready or left; a
worker's free memory moved; the model was replaced), with a slow poll of the cluster view as a
fallback. Each round: expire what passed its deadline, ask :func:`~dask_dynbatch.core.placement.plan`
which workers get the next shipments and how large (each worker's size is its model server's
advice, within the memory cap), hold back a partial shipment for a busy worker until it would
reach the device as it frees (:class:`~dask_dynbatch.core.pacing.BusyForecast`), and send. A
request's deadline holds while its shipment runs too: it fails at the deadline, and a result that
arrives later is dropped. A shipment that did not run (its worker could not be reached, closes or
restarts) goes back to the front of the queue; the requests of one whose worker died under it, or
whose device batch was stuck, are retried in ever smaller groups that run alone
(:class:`~dask_dynbatch.core.quarantine.Quarantine`), so that the culprit fails alone.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import logging
import math
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import dask.config
import numpy as np

from .. import protocol
from ..core.blocks import ShipmentRows, count_rows
from ..core.pacing import BusyForecast
from ..core.placement import WorkerLoad, batch_limit, fill_unknown_throughputs, plan, workload
from ..core.quarantine import MAX_DEATHS, Quarantine
from ..core.requests import Request, RequestQueue
from ..core.rows import split_rows
from ..errors import BatcherClosedError, ExecutionTimeoutError, RequestTimeoutError, WorkerCrashError
from ..protocol import WEIGHED_INFLIGHT, Advice, HistoryRecord, ModelSuperseded, PartsLost, WorkerView
from ..shm import ShmRing
from . import feedback
from .ledger import Ledger
from .registration import RegisteredModel
from .transport import Delivery, Transport, WorkerLost, shm_wanted

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

#: a worker that a shipment was lost with gets none for this long, even if the scheduler still
#: lists it (the scheduler notices a dead worker a little later than the client)
LOST_COOLDOWN = 2.0
#: the cluster view is refreshed at least this often (events push changes; this is the fallback)
REFRESH_INTERVAL = 5.0
#: the dispatcher looks at its queue at least this often (deadlines, workers coming back)
TICK_INTERVAL = 0.5
#: how often the Batcher's counts are reported to the scheduler (dashboard, /metrics)
REPORT_INTERVAL = 1.0
#: partial shipments (fewer requests than the worker's size) are sent only while the worker has
#: fewer than this many in flight; full ones go up to ModelSpec.max_inflight (8 times as many for
#: padded or weighed samples, see ``_inflight_limit``)
PARTIAL_INFLIGHT = 2
#: the heap of deadlines of sent requests is rebuilt when it holds this many more entries than
#: requests in flight (entries of requests that finished long ago keep their samples alive)
DEADLINE_SLACK = 1024


class WorkerSlot:
    """What a dispatcher knows of one worker for its model."""

    def __init__(self, view: WorkerView, initial_size: int, shm: ShmRing | None, reply_files: bool = False):
        self.address = view.address
        self.view = view
        self.advice = Advice(size=initial_size)  # the worker's model server's, from its replies
        self.inflight = 0  # shipments sent, not answered yet
        self.inflight_rows = 0
        self.alive = True
        self.lost_until = 0.0  # monotonic time before which the worker counts as dead
        self.batches = 0
        self.samples = 0
        self.compile: dict[str, Any] | None = None  # the worker's compile state (compiled models)
        self.shm = shm  # shared-memory slots for this worker (same host), see shm.py
        # large replies may come back through shared memory too (off once the client could not read one)
        self.reply_files = reply_files
        self.forecast = BusyForecast()  # when its device frees: paces partial shipments
        self.isolating = False  # runs a group of suspects: nothing else is sent to it meanwhile

    @property
    def asks_for_reply_files(self) -> bool:
        """Whether shipments ask for large replies through shared memory: wanted, and the worker
        has mapped one of this client's slots (so it shares this host)."""
        return self.reply_files and self.shm is not None and self.shm.proven

    def close_shm(self) -> list[str]:
        """Stop sending through shared memory; returns the slot names the worker still maps."""
        ring, self.shm = self.shm, None
        return ring.close() if ring is not None else []

    def to_dict(self) -> dict[str, Any]:
        advice = self.advice
        return {
            "address": self.address,
            "device": self.view.device,
            "alive": self.alive,
            "inflight_batches": self.inflight,
            "inflight_samples": self.inflight_rows,
            "batches": self.batches,
            "samples": self.samples,
            "memory_cap": advice.cap,
            "throughput": advice.throughput,
            "controller": advice.to_msg(),
            "forecast": self.forecast.state(),
            "compile": self.compile,
            "transport": "shared-memory" if self.shm is not None else "comm",
            "replies": "shared-memory" if self.asks_for_reply_files else "comm",
            "padding_waste": advice.padding_waste,
        }


class Dispatcher:
    """Sends one Batcher's requests (see the module docstring). Everything here runs on the client's
    event loop, except :meth:`wake`."""

    def __init__(self, client: Client, model: RegisteredModel, queue: RequestQueue, ledger: Ledger,
                 transport: Transport, history: deque[HistoryRecord], report: Callable[[], dict[str, Any]]):
        self.client = client
        self.model = model
        self.queue = queue
        self.ledger = ledger
        self.transport = transport
        self.history = history
        self._report_stats = report
        self.batcher_id = ""
        self.slots: dict[str, WorkerSlot] = {}
        self.inflight: dict[int, list[Request]] = {}  # shipments sent and not answered yet
        self.quarantine = Quarantine(int(dask.config.get("dynbatch.quarantine.max-restarts", MAX_DEATHS)))
        self._running_deadlines: list[tuple[float, int, Request]] = []  # heap, of requests sent
        self._deadline_seq = itertools.count()
        self.closed = False
        self.no_worker_since: float | None = None
        self._loop = client.loop.asyncio_loop
        self._wake_event: asyncio.Event | None = None
        self._wake_pending = False
        self._wake_lock = threading.Lock()
        self._refresh_requested = False
        self._model_changed = False
        self._tasks: set[asyncio.Task] = set()
        self.task: asyncio.Task | None = None
        self.on_client_gone: Callable[[str], None] = lambda reason: None

    # -- starting, waking ---------------------------------------------------------------------------
    def start(self, views: dict[str, dict[str, Any]]) -> None:
        """On the loop: take the registration's cluster view and run."""
        self._wake_event = asyncio.Event()
        self.update_workers(views)
        _subscribe(self)
        self.task = asyncio.ensure_future(self._main())

    def wake(self) -> None:
        """From any thread: look at the queue now. Wakes already pending are not repeated: a
        request submitted at a time would otherwise write to the loop's wake-up pipe every time."""
        with self._wake_lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        try:
            self._loop.call_soon_threadsafe(self._set_wake)
        except RuntimeError:  # the client's loop is closed: nothing left to wake
            pass

    def _set_wake(self) -> None:
        if self._wake_event is not None:
            self._wake_event.set()

    def in_background(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the loop -----------------------------------------------------------------------------------
    async def _main(self) -> None:
        next_refresh = next_report = time.monotonic()
        timeout = TICK_INTERVAL
        while True:
            try:
                await asyncio.wait_for(self._wake_event.wait(), timeout)
            except asyncio.TimeoutError:
                pass
            self._wake_event.clear()
            with self._wake_lock:
                self._wake_pending = False
            if self.client.status in ("closing", "closed"):
                self.on_client_gone(f"its client is {self.client.status}")
                for slot in self.slots.values():  # the scheduler drops the workers' mappings
                    slot.close_shm()
                return
            if self.closed and not self.inflight:
                await self._report()
                await self._release_shm()
                return
            now = time.monotonic()
            try:
                if self._model_changed:
                    self._model_changed = False
                    await self._refresh_model()
                if now >= next_refresh or self._refresh_requested:
                    self._refresh_requested = False
                    next_refresh = now + REFRESH_INTERVAL
                    await self._refresh_workers()
                if now >= next_report:
                    next_report = now + REPORT_INTERVAL
                    self.in_background(self._report())
                timeout = min(self.dispatch(now), TICK_INTERVAL)
            except Exception:  # a bug must not stop the dispatcher: requests would wait forever
                logger.exception("dynbatch: dispatcher error for model %r", self.model.name)
                timeout = TICK_INTERVAL

    def rows_ahead(self) -> int:
        """Rows the live workers take next: per worker, the shipments it may have in flight, of the
        size its server advises (within its memory cap). 0 while no worker is known. Called from
        other threads (a collection's tasks): reads only."""
        return sum(self._inflight_limit(slot) * max(1, batch_limit(self._load(slot, None)))
                   for slot in list(self.slots.values()) if slot.alive)

    def dispatch(self, now: float) -> float:
        """Form and send as many shipments as workers have room for; seconds until the next try."""
        live = [s for s in self.slots.values() if s.alive and now >= s.lost_until]
        self._track_no_worker(live, now)
        retry_in = self._expire_running(now)
        expired = self.queue.expire(now)
        if expired:
            self.ledger.fail(expired, self.timeout_error(now), "timed_out")
        if not live or self.closed:
            return retry_in
        live = self._send_isolated(live, now)
        if not len(self.queue) or not live:
            return retry_in
        if all(s.inflight >= self._inflight_limit(s) for s in live):
            return retry_in
        rates = fill_unknown_throughputs({s.address: s.advice.throughput for s in live},
                                         {s.address: s.view.benchmark for s in live})
        # busy workers stay in the plan (no free slot): the split keeps their share for them
        loads = [self._load(s, rates.get(s.address)) for s in live]
        full_size = {load.address: min(load.batch_size, load.cap or load.batch_size) for load in loads}
        for address, size in plan(len(self.queue), loads):
            slot = self.slots[address]
            if size < full_size[address] and slot.inflight > 0:
                wait = self._partial_wait(slot, size, now)
                if wait is not None:
                    retry_in = min(retry_in, wait)
                    continue
            batch, expired = self.queue.pop(size, now)
            if expired:
                self.ledger.fail(expired, self.timeout_error(now), "timed_out")
            if batch:
                self._ship(slot, batch, now)
        self.ledger.notify_room()
        return retry_in

    def _ship(self, slot: WorkerSlot, batch: list[Request], now: float, isolate: bool = False) -> None:
        rows, blocks = count_rows(batch)
        slot.inflight += 1
        slot.inflight_rows += rows
        self.inflight[id(batch)] = batch
        slot.forecast.sent(rows, now)
        for req in batch:
            if req.deadline is not None:
                heapq.heappush(self._running_deadlines, (req.deadline, next(self._deadline_seq), req))
        if isolate:
            slot.isolating = True
            self.ledger.count("isolated", rows)
        # the inputs are taken now: a request that finishes (its deadline) before the send encodes
        # them lets go of its sample, and its batchmates must not fail for it
        inputs = [(r.sample, r.dask_future) for r in batch]
        self.in_background(self._send(slot, batch, now, isolate, rows, ShipmentRows(batch) if blocks else None,
                                      inputs))

    def _send_isolated(self, live: list[WorkerSlot], now: float) -> list[WorkerSlot]:
        """Send waiting groups of suspects, one per worker, each to a worker with nothing else of
        this Batcher in flight, so that a crash or a hang there is theirs alone. While groups wait,
        the least busy other worker gets nothing new (it drains for the next group). Returns the
        workers free for other shipments."""
        for slot in live:
            if not len(self.quarantine):
                break
            if not slot.isolating and slot.inflight == 0:
                group = self.quarantine.pop()
                if group:
                    self._ship(slot, group, now, isolate=True)
        free = [s for s in live if not s.isolating]
        if len(self.quarantine) and free:
            free.remove(min(free, key=lambda s: s.inflight))
        return free

    def _expire_running(self, now: float) -> float:
        """Fail sent requests whose deadline passed; seconds until the next deadline."""
        heap = self._running_deadlines
        expired = []
        while heap and heap[0][0] <= now:
            req = heapq.heappop(heap)[2]
            if not req.future.done():
                expired.append(req)
        if expired:
            error = RequestTimeoutError(
                f"request to model {self.model.name!r} timed out after it was sent to a worker: its result had not "
                "come back by its deadline (a result that arrives later is dropped)")
            self.ledger.count("timed_out_running", self.ledger.fail(expired, error, "timed_out"))
        if len(heap) > 2 * sum(s.inflight_rows for s in self.slots.values()) + DEADLINE_SLACK:
            self._running_deadlines = heap = [e for e in heap if not e[2].future.done()]
            heapq.heapify(heap)
        return min(TICK_INTERVAL, heap[0][0] - now) if heap else TICK_INTERVAL

    def _partial_wait(self, slot: WorkerSlot, size: int, now: float) -> float | None:
        """Seconds a partial shipment for a busy worker should keep filling here (None: send now).
        One may wait on the worker behind the running batch once the oldest request waited
        ``max_delay``, and not before it would reach the device as the device frees (just in time:
        it carries every request that arrives meanwhile, and the device does not wait for it)."""
        if slot.inflight >= PARTIAL_INFLIGHT and slot.advice.ship is None:
            # (a server of padded or weighed samples forms batches from every shipment it holds:
            # its shipments are answered late, and the forecast alone says when it would run dry)
            return TICK_INTERVAL
        oldest = self.queue.oldest_enqueued()
        if oldest is not None and now - oldest < self.model.spec.max_delay:
            return oldest + self.model.spec.max_delay - now
        send_at = slot.forecast.send_at(size)
        if slot.advice.ship is not None:
            # a server of padded or weighed samples chooses each batch's rows from what it holds:
            # the rest leaves while it still holds a few batches' worth (just in time, the last
            # batches before it would run dry would have few rows to choose from)
            send_at -= protocol.WEIGHED_SHIP_BATCHES * (slot.forecast.device_s(slot.advice.size) or 0.0)
        return send_at - now if now < send_at else None

    def workloads(self) -> dict[str, float | None]:
        """Each worker's placement figure now (seconds until a new shipment would be done)."""
        live = list(self.slots.values())
        rates = fill_unknown_throughputs({s.address: s.advice.throughput for s in live},
                                         {s.address: s.view.benchmark for s in live})
        out = {}
        for slot in live:
            figure = workload(self._load(slot, rates.get(slot.address)))
            out[slot.address] = figure if math.isfinite(figure) else None
        return out

    def _inflight_limit(self, slot: WorkerSlot | None) -> int:
        """Shipments a worker may have in flight: ``ModelSpec.max_inflight``, or for padded or
        weighed samples (whose shipments hold a few device batches each) that many times
        :data:`~dask_dynbatch.protocol.WEIGHED_INFLIGHT`."""
        spec = self.model.spec
        weighed = spec.structured if slot is None else slot.advice.ship is not None
        return spec.max_inflight * WEIGHED_INFLIGHT if weighed else spec.max_inflight

    def _load(self, slot: WorkerSlot, throughput: float | None) -> WorkerLoad:
        """The placement inputs for one worker, from its server's advice."""
        size, cap = slot.advice.size, slot.advice.cap
        limit = self.model.spec.batch_limit(slot.view.device)
        if slot.advice.ship is not None:  # the server forms its batches by cost from what it holds
            size, cap, limit = slot.advice.ship, None, None
        if limit is not None:
            size = min(size, limit)
        return WorkerLoad(
            address=slot.address,
            throughput=throughput,
            inflight_samples=slot.inflight_rows,
            memory_utilization=min(1.0, slot.advice.memory_used or 0.0),
            cap=cap,
            free_slots=max(0, self._inflight_limit(slot) - slot.inflight),
            batch_size=max(1, size),
        )

    # -- one shipment -------------------------------------------------------------------------------
    async def _send(self, slot: WorkerSlot, reqs: list[Request], formed: float, isolate: bool, rows: int,
                    layout: ShipmentRows | None, inputs: list[tuple[Any, Any]]) -> None:
        """Send one shipment of ``rows`` rows and deliver its results (``isolate``: a group of
        suspects; ``layout``: where each request's rows start, when some are block parts). Whatever
        happens, every request of it is resolved or back in the queue when this returns.

        A server of padded or weighed samples runs a shipment's rows over several device batches,
        choosing them by cost from every shipment it holds: it answers in parts, each request's
        result as its batch finishes, instead of the whole shipment once its last row ran (which
        kept results back until the end of a long backlog)."""
        answered: set[int] = set()  # rows whose results came in a part
        on_part = None
        if layout is None and not isolate and slot.advice.ship is not None and self.transport.parts:
            on_part = functools.partial(self._deliver_part, slot, reqs, answered)
        try:
            delivery = await self.transport.send(slot, reqs, version=self.model.version, formed=formed,
                                                 signature=self.model.signature, isolate=isolate, layout=layout,
                                                 inputs=inputs, on_part=on_part)
        except WorkerLost as exc:
            self._worker_lost(slot, _left(reqs, answered), exc.cause, sent=exc.sent, isolated=isolate)
        except ModelSuperseded:  # nothing ran: the same requests go to the new version
            self._requeue(reqs, isolate)
            self._model_changed = True
        except PartsLost as exc:
            left = _left(reqs, answered)
            if exc.restarted:  # the worker died and came back at its address: its rows ran, and may be why
                self._worker_lost(slot, left, exc, sent=True, isolated=isolate)
            else:  # the rest of a reply in parts is gone: its rows run again
                logger.info("dynbatch: %s; %d rows are sent again", exc, len(left))
                self._requeue(left, isolate)
                self.ledger.count("requeued", len(left))
        except Exception as exc:  # the shipment could not run (model failed to load, inputs lost, ...)
            logger.warning("dynbatch: shipment of %d for model %r failed: %r", rows, self.model.name, exc)
            self.ledger.fail(reqs, exc)
        else:
            try:
                if layout is None:
                    self._deliver(slot, reqs, delivery, isolate, answered)
                else:
                    self._deliver_rows(slot, layout, delivery, isolate)
            except Exception as exc:  # outputs that cannot be split per request, ...
                logger.warning("dynbatch: shipment of %d for model %r failed on the client: %r", rows,
                               self.model.name, exc)
                self.ledger.fail(reqs, exc)
        finally:
            self.inflight.pop(id(reqs), None)
            slot.inflight -= 1
            outstanding = rows - len(answered)  # (the rows answered in parts left the count as they came)
            slot.inflight_rows -= outstanding
            if isolate:
                slot.isolating = False
            slot.forecast.replied(outstanding, time.monotonic())
            self._set_wake()

    def _deliver_part(self, slot: WorkerSlot, reqs: list[Request], answered: set[int], delivery: Delivery) -> None:
        """One part of a reply in parts: its rows' results and errors (``answered`` collects their
        rows); the rows left in flight, and the forecast of the worker's device, shrink by them."""
        before = len(answered)
        try:
            self._deliver_answers(reqs, answered, delivery)
        finally:
            done = len(answered) - before
            if done:
                in_flight = len(reqs) - before
                slot.inflight_rows -= done
                slot.forecast.shrink(in_flight, in_flight - done, delivery.done)
                slot.advice = Advice.from_msg(delivery.reply.advice)
                self._set_wake()

    def _requeue_lost(self, reqs: list[Request], lost: list[int], isolated: bool) -> None:
        """Rows whose results were in a shared-memory reply this client could not read run again."""
        if lost:
            self._requeue([reqs[row] for row in lost], isolated)
            self.ledger.count("requeued", len(lost))

    def _deliver_answers(self, reqs: list[Request], answered: set[int], delivery: Delivery) -> None:
        self._requeue_lost(reqs, delivery.lost, False)
        answered.update(delivery.lost)
        for row, exc in delivery.errors:
            self.ledger.fail([reqs[row]], exc)
            answered.add(row)
        delivered = 0
        ran: list[Request] = []
        for rows, outputs in delivery.pieces:
            answered.update(rows)
            ran.extend(reqs[row] for row in rows)
            try:
                values = split_rows(outputs, len(rows))
                for row, value in zip(rows, values):
                    req = reqs[row]
                    delivered += self.ledger.deliver(req, _to_torch(value) if req.as_torch else value)
            except Exception as exc:  # outputs that cannot be split per request fail their rows, not the rest
                self.ledger.fail([reqs[row] for row in rows], exc)
        self.ledger.latency(ran, delivery.done)
        self.ledger.count("delivered", delivered)
        self.ledger.count("answered_early", delivered)

    def _deliver(self, slot: WorkerSlot, reqs: list[Request], delivery: Delivery, isolated: bool = False,
                 answered: set[int] | None = None) -> None:
        """The (last) reply to a shipment of one row per request (``answered``: rows whose results
        came in earlier parts)."""
        reply = delivery.reply
        if reply.stuck:  # the worker restarts: these ran in a stuck device batch, and are suspects
            self.ledger.count("stuck", len(reply.stuck))
            self._worker_lost(slot, [reqs[row] for row in reply.stuck], RuntimeError("a stuck device batch"),
                              sent=True, isolated=isolated, stuck_limit=reply.stuck_limit or 0.0)
        if reply.unrun:  # the worker closes or restarts: those rows go elsewhere, no attempt used
            self._worker_lost(slot, [reqs[row] for row in reply.unrun],
                              RuntimeError("the worker is closing or restarting"), sent=False, isolated=isolated)
        skip = set(reply.stuck) | set(reply.unrun)
        # every row that ran, for what the reply teaches; results of the last part's rows only here
        ran = [r for i, r in enumerate(reqs) if i not in skip] if skip else reqs
        elsewhere = skip | (answered or set()) | set(delivery.lost)  # rows whose fate is not in this reply
        if answered:  # a reply in parts: every row must have had its answer in one of them
            covered = elsewhere | {row for row, _ in delivery.errors}
            covered.update(row for rows, _ in delivery.pieces for row in rows)
            missing = [r for i, r in enumerate(reqs) if i not in covered]
            if missing:  # (never seen; a part lost on the way must not leave its requests waiting)
                logger.warning("dynbatch: %d rows of a reply in parts from %s came without results; they are "
                               "sent again", len(missing), slot.address)
                self._requeue(missing, isolated)
                self.ledger.count("requeued", len(missing))
        self._requeue_lost(reqs, delivery.lost, isolated)
        if not ran:
            return
        last = [r for i, r in enumerate(reqs) if i not in elsewhere] if elsewhere else reqs
        self.ledger.latency(last, delivery.done)
        for row, exc in delivery.errors:
            self.ledger.fail([reqs[row]], exc)
        delivered = 0
        for rows, outputs in delivery.pieces:
            for row, value in zip(rows, split_rows(outputs, len(rows))):
                req = reqs[row]
                delivered += self.ledger.deliver(req, _to_torch(value) if req.as_torch else value)
        self.ledger.count("delivered", delivered)
        self._learn(slot, delivery, len(ran), ran, isolated)

    def _learn(self, slot: WorkerSlot, delivery: Delivery, rows: int, ran: Sequence[Request], isolated: bool) -> None:
        """The worker's advice and the pacing forecast from a reply whose ``ran`` requests (``rows``
        rows) ran; its history row."""
        oldest = min(r.enqueued for r in ran)
        self.history.append(feedback.learn(slot, delivery, rows, oldest, self.model.spec.max_delay,
                                           self.model.name, isolated))

    def _deliver_rows(self, slot: WorkerSlot, layout: ShipmentRows, delivery: Delivery, isolated: bool) -> None:
        """:meth:`_deliver` for a shipment that holds block parts: the reply's rows are found in the
        requests that hold them; a part whose rows come back in several pieces (or only some of
        them: the others stuck or not run) is delivered, retried or sent again row range by range."""
        reqs, reply = layout.reqs, delivery.reply
        if reply.stuck:
            self.ledger.count("stuck", len(reply.stuck))
            self._worker_lost(slot, layout.requests_at(sorted(reply.stuck)), RuntimeError("a stuck device batch"),
                              sent=True, isolated=isolated, stuck_limit=reply.stuck_limit or 0.0)
        if reply.unrun:
            self._worker_lost(slot, layout.requests_at(sorted(reply.unrun)),
                              RuntimeError("the worker is closing or restarting"), sent=False, isolated=isolated)
        ran, ran_rows = reqs, layout.rows
        if reply.stuck or reply.unrun:
            skip = sorted(set(reply.stuck) | set(reply.unrun))
            skipped: Counter[int] = Counter()
            for k, a, b, _ in layout.spans(skip):
                skipped[k] += b - a
            ran = [r for k, r in enumerate(reqs) if skipped[k] < r.rows]
            ran_rows -= len(skip)
            if not ran:
                return
        self.ledger.latency(ran, delivery.done, rows=True)
        for row, exc in delivery.errors:  # a row of a block fails its block
            self.ledger.fail([reqs[layout.spans([row])[0][0]]], exc)
        delivered = 0
        for positions, outputs in delivery.pieces:
            for req, start, stop, rows in layout.pieces(positions, outputs):
                if req.block is None:
                    (value,) = split_rows(rows, 1)
                    delivered += self.ledger.deliver(req, _to_torch(value) if req.as_torch else value)
                else:
                    delivered += self.ledger.deliver_rows(req, start, stop, rows)  # type: ignore[arg-type]
        self.ledger.count("delivered", delivered)
        self._learn(slot, delivery, ran_rows, ran, isolated)

    def _worker_lost(self, slot: WorkerSlot, reqs: list[Request], exc: BaseException, *, sent: bool,
                     isolated: bool = False, stuck_limit: float | None = None) -> None:
        """The shipment's worker died, could not be reached, closes or restarts, or its device batch
        was stuck (``stuck_limit``: the limit it ran past). Not ``sent`` (nothing ran): the requests
        go back to the front of the queue, or of the quarantine for a group of suspects. Otherwise
        any of them may be the culprit: they are retried in smaller groups (:class:`Quarantine`),
        and one that died alone again fails."""
        slot.alive = False
        slot.lost_until = time.monotonic() + LOST_COOLDOWN
        if self.closed:
            self.ledger.fail(reqs, closed_error(self.model.name, f"its worker {slot.address} was lost ({exc}) after the close"))
            return
        rows = count_rows(reqs)[0]
        if not sent:
            logger.info("dynbatch: %s did not run %d rows (%s); they are sent again", slot.address, rows, exc)
            self._requeue(reqs, isolated)
            self.ledger.count("requeued", rows)
            return
        outcome = "worker died" if stuck_limit is None else "stuck"
        logger.warning("dynbatch: %d rows of model %r were in a shipment whose %s (%s, %s); they are retried "
                       "in smaller groups", rows, self.model.name,
                       "worker died" if stuck_limit is None else "device batch was stuck", slot.address, exc)
        self.history.append(feedback.lost(slot, rows, self.model.version, outcome, isolated))
        failed = self.quarantine.lost(reqs)
        for req in failed:
            n = self.ledger.fail([req], self._quarantine_error(req, slot, exc, stuck_limit))
            self.ledger.count("quarantined", n)
        self.ledger.count("requeued", rows - count_rows(failed)[0])

    def _requeue(self, reqs: list[Request], isolated: bool) -> None:
        if self.closed:  # nothing reads the queue any more
            self.ledger.fail(reqs, closed_error(self.model.name, "the request was to run again after the close"))
            return
        if isolated:
            self.quarantine.put_back(reqs)
        else:
            self.queue.push(reqs, front=True)

    def _quarantine_error(self, req: Request, slot: WorkerSlot, exc: BaseException,
                          stuck_limit: float | None) -> Exception:
        bound = self.quarantine.max_deaths
        why = (f"the most one request may cause (dynbatch.quarantine.max-restarts={bound})" if req.attempts >= bound
               else "the last time alone in its batch")
        if stuck_limit is not None:
            return ExecutionTimeoutError(
                f"request to model {self.model.name!r}: its device batch ran past the execution timeout "
                f"({stuck_limit:.1f} s) and its worker was restarted, {req.attempts} times, {why} (last: "
                f"{slot.address}); it is not tried again. Its batchmates were retried without it. If the model "
                "needs longer for it, raise ModelSpec.execution_timeout")
        return WorkerCrashError(
            f"request to model {self.model.name!r} made its worker die {req.attempts} times, {why} (last: "
            f"{slot.address}: {exc!r}); it is not tried again. Its batchmates were retried without it; a request "
            f"causes at most {bound} worker restarts")

    # -- the cluster view ---------------------------------------------------------------------------
    async def _refresh_workers(self) -> None:
        try:
            views = await self.client.scheduler.dynbatch_workers(model=self.model.name)
            if not views and not await self._model_known():
                views = await self.model.register(self.client)
        except Exception as exc:  # scheduler unreachable for now (or the client closing): keep the last view
            logger.debug("dynbatch: cluster view not refreshed: %r", exc)
            return
        self.update_workers(views)

    async def _model_known(self) -> bool:
        reply = await self.client.scheduler.dynbatch_get_model(name=self.model.name)
        return isinstance(reply, dict) and reply.get("status") != "error"

    async def _refresh_model(self) -> None:
        """The model was replaced (event, or a worker said so): take the new version."""
        try:
            if await self.model.refresh(self.client):
                logger.info("dynbatch: model %r is now version %d", self.model.name, self.model.version)
                self._refresh_requested = True
        except Exception as exc:
            logger.debug("dynbatch: model %r not refreshed: %r", self.model.name, exc)
            self._model_changed = True
        self._set_wake()

    def update_workers(self, views: dict[str, dict[str, Any]]) -> None:
        now = time.monotonic()
        spec = self.model.spec
        for address, view in views.items():
            view = WorkerView.from_msg(view)
            slot = self.slots.get(address)
            if slot is None:
                ring = ShmRing(keep=self._inflight_limit(None) + 1) if shm_wanted(address) else None
                self.slots[address] = WorkerSlot(view, spec.initial_size(view.device), ring,
                                                 reply_files=self.transport.reply_files)
            else:
                slot.view = view
                slot.alive = now >= slot.lost_until
        for address in list(self.slots):
            if address not in views:
                slot = self.slots[address]
                slot.alive = False
                if not slot.inflight:
                    slot.close_shm()  # the worker is gone, and its mappings with it
                    del self.slots[address]

    # pushed events (on the client loop)
    def on_cluster_event(self, message: dict[str, Any]) -> None:
        self._refresh_requested = True
        self._set_wake()

    def on_advice(self, message: dict[str, Any]) -> None:
        slot = self.slots.get(message.get("worker"))
        if slot is None:
            return
        for advice in message.get("advice", ()):
            if advice.get("name") == self.model.name and advice.get("version") == self.model.version:
                slot.advice = Advice.from_msg(advice)
                self._set_wake()

    def on_model_event(self, message: dict[str, Any]) -> None:
        if message.get("name") == self.model.name and message.get("version") != self.model.version:
            self._model_changed = True
            self._set_wake()

    # -- closing, reporting -------------------------------------------------------------------------
    async def _release_shm(self) -> None:
        """Closed: free the shared-memory slots, and the workers' mappings of them."""

        async def drop(address: str, names: list[str]) -> None:
            try:
                await self.client.rpc(address).dynbatch_shm_drop(client=self.client.id, names=names)
            except Exception as exc:  # the worker left: its mappings went with it
                logger.debug("dynbatch: shared-memory drop on %s failed: %r", address, exc)

        drops = [(a, s.close_shm()) for a, s in self.slots.items()]
        await asyncio.gather(*(drop(a, names) for a, names in drops if names))

    async def _report(self) -> None:
        try:
            await self.client.scheduler.dynbatch_report(batcher=self.batcher_id, stats=self._report_stats(),
                                                        client=self.client.id)
        except Exception:  # the dashboard view is best effort; the next report repeats it
            logger.debug("dynbatch: report failed", exc_info=True)

    def _track_no_worker(self, live: list[WorkerSlot], now: float) -> None:
        if not live and len(self.queue):
            if self.no_worker_since is None:
                self.no_worker_since = now
                logger.warning(
                    "dynbatch: no worker can run model %r (%s); %d requests wait for one to join "
                    "(or fail at their timeout)", self.model.name, self.worker_requirements(), len(self.queue)
                )
        elif live and self.no_worker_since is not None:
            logger.info("dynbatch: workers for model %r are back after %.1f s", self.model.name,
                        now - self.no_worker_since)
            self.no_worker_since = None

    def timeout_error(self, now: float) -> RequestTimeoutError:
        message = f"request to model {self.model.name!r} timed out before its batch started"
        if self.no_worker_since is not None:
            message += (f": no worker able to run the model for the last {now - self.no_worker_since:.1f} s "
                        f"({self.worker_requirements()})")
        return RequestTimeoutError(message)

    def worker_requirements(self) -> str:
        spec = self.model.spec
        needs = ["the DynBatchPlugin's worker half"]
        if spec.resources:
            needs.append(f"resources {dict(spec.resources)}")
        if spec.device == "cuda":
            needs.append("a CUDA device")
        return "a worker needs " + ", ".join(needs)


def _left(reqs: list[Request], answered: set[int]) -> list[Request]:
    """The requests of a shipment whose results did not come in a part of its reply."""
    return [r for i, r in enumerate(reqs) if i not in answered] if answered else reqs


def closed_error(model: str, detail: str) -> BatcherClosedError:
    error = BatcherClosedError(model)
    error.args = (f"{error.args[0]} ({detail})",)
    return error


def _to_torch(value: Any) -> Any:
    import torch

    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, dict):
        return {k: _to_torch(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to_torch(v) for v in value)
    return value


# One topic handler per client and topic (a client keeps one per topic), fanned out to its
# dispatchers; the registry lets go of a client once it is collected.
_listeners: weakref.WeakKeyDictionary[Any, weakref.WeakSet[Dispatcher]] = weakref.WeakKeyDictionary()


def _subscribe(dispatcher: Dispatcher) -> None:
    client = dispatcher.client
    listeners = _listeners.get(client)
    if listeners is None:
        listeners = _listeners[client] = weakref.WeakSet()

        def fan_out(method: str) -> Callable[[tuple[float, dict]], None]:
            def handler(event: tuple[float, dict], listeners=listeners) -> None:
                _, message = event
                for d in list(listeners):
                    getattr(d, method)(message)

            return handler

        client.subscribe_topic(protocol.CLUSTER_TOPIC, fan_out("on_cluster_event"))
        client.subscribe_topic(protocol.ADVICE_TOPIC, fan_out("on_advice"))
        client.subscribe_topic(protocol.MODEL_TOPIC, fan_out("on_model_event"))
    listeners.add(dispatcher)
