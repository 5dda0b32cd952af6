"""The model server: one per loaded (model, version, device) on a worker, shared by every source of
requests.

Each shipment that reaches the worker (from any client and any Batcher) puts its rows into the
server's queue (:class:`~dask_dynbatch.core.formation.PartQueue`). When the device is about to
free, the server takes what waits, up to the size its controller and the memory cap allow, as one
device batch: rows of different clients share device batches. Batches form ahead of the device, so
that the next one is staged (joined, and copied to the GPU on a side stream) while one computes: full
batches up to two ahead, a partial batch (fewer rows than the size) only one ahead, so that rows
arriving while it waits for the device gather, from every client, into the batch after it.

The server owns the batch size: its :class:`~dask_dynbatch.core.controller.BatchSizeController`
sees every device batch, with the latency of its rows (the client's formation wait plus the
batch's own time on the device, from the device's previous batch end, whichever model ran it) and
its throughput; clients read its :class:`~dask_dynbatch.protocol.Advice` (the throughput there is
the model's, within the part of the device it has had lately)
from replies and from memory events. Threads: the worker's event loop runs the queue and replies;
a transfer thread stages GPU batches; the device thread (one per device, shared by its models)
runs them (:func:`~dask_dynbatch.worker.executor.run_device_batch`).

A batch that runs far past the time batches of its size take is stuck
(:class:`~dask_dynbatch.core.watchdog.ExecutionClock`, checked by the worker's
:mod:`~dask_dynbatch.worker.watchdog`): the server hands its rows back as ``stuck`` and every other
row as unrun (:meth:`ModelServer.evacuate`), and the worker is restarted.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.controller import BatchSizeController
from ..core.formation import CostQueue, DeviceBatch, Part, PartQueue
from ..core.memory import MemorySizer
from ..core.rows import TrimmedRows, slice_rows, take_rows
from ..core.service import DeviceTurns
from ..core.tree import follows_length, learn_fixed, trim_output_row
from ..core.watchdog import ExecutionClock
from ..protocol import WEIGHED_SHIP_BATCHES, Advice, DeviceBatchRecord, ModelSuperseded
from .executor import run_device_batch
from .model import LoadedModel, PendingHost

logger = logging.getLogger(__name__)

#: device batches formed ahead of the one computing: full ones up to FULL_AHEAD, so that a backlog
#: keeps the device thread fed even while the event loop is busy; a partial one only while fewer
#: than PARTIAL_AHEAD wait staged, so that rows arriving meanwhile gather into the next batch
#: rather than into many small ones
FULL_AHEAD = 2
#: a padded server's controller settles back at the best size when throughput (real tokens a
#: second) falls this far below it
PADDED_TOLERANCE = 0.05
PARTIAL_AHEAD = 1


class Shipment:
    """One message's rows on the worker, until every row has its result.

    ``rows``: the host arrays of its rows that run (in order; rows that failed on arrival are left
    out and listed in ``errors``); ``index``: their positions among the message's rows (None: all,
    in order). ``slot``: the name of the client's shared-memory slot the arrays are views of
    (``pinned`` once it is page-locked for the GPU). ``isolate``: its rows run in device batches
    of their own (the client's suspects after a worker died under them)."""

    def __init__(self, client: str, n: int, rows: list[np.ndarray], *, index: list[int] | None = None,
                 errors: dict[int, BaseException] | None = None, priorities: list[tuple[int, int]] | None = None,
                 queued_s: float = 0.0, new_slot: bool = False, slot: str | None = None, isolate: bool = False):
        self.client = client
        self.n = n
        self.rows = rows
        self.index = index
        self.errors: dict[int, BaseException] = dict(errors or {})
        runs = priorities or [(0, 0)]
        if index is not None:  # runs start at message rows; parts count the rows that run
            runs = [(bisect.bisect_left(index, start), priority) for start, priority in runs]
        self.priorities = runs
        self.queued_s = queued_s
        self.new_slot = new_slot
        self.slot = slot
        self.shared = slot is not None
        self.pinned = False
        self.unrun: list[int] = []  # rows the worker could not run: it is closing (the client re-sends them)
        self.isolate = isolate
        self.stuck: list[int] = []  # rows of a device batch declared stuck (the client isolates them)
        self.stuck_limit: float | None = None
        self.arrived = time.monotonic()
        self.pending = sum(len(a) for a in rows)
        self.pieces: list[tuple[list[int], Any]] = []
        self.records: list[DeviceBatchRecord] = []
        self.compute_s = self.stage_s = self.wait_s = 0.0
        self.cold = False
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self._news: asyncio.Future | None = None  # a waiter for the next results (replies in parts)
        if not self.pending:
            self.done.set_result(None)

    def parts(self) -> list[Part]:
        """Its rows as parts of the server's queue, cut where the priority changes."""
        out: list[Part] = []
        offset = 0
        bounds = [start for start, _ in self.priorities[1:]] + [self.pending]
        runs = list(zip([s for s, _ in self.priorities], bounds, [p for _, p in self.priorities]))
        for array in self.rows:
            stop = offset + len(array)
            for start, end, priority in runs:
                a, b = max(start, offset), min(end, stop)
                if a < b:
                    out.append(Part(self, a, array[a - offset : b - offset], priority, self.arrived, self.isolate))
            offset = stop
        return out

    def positions(self, part: Part, start: int = 0, stop: int | None = None) -> list[int]:
        """The message positions of rows ``[start, stop)`` of ``part`` (one of this shipment's)."""
        ids = part.row_ids(start, stop)
        if self.index is None:
            return ids
        index = self.index
        return [index[i] for i in ids]

    def settle(self, count: int) -> None:
        self.pending -= count
        if self.pending <= 0 and not self.done.done():
            self.done.set_result(None)
        if self._news is not None and not self._news.done():
            self._news.set_result(None)

    async def news(self) -> None:
        """Return once some rows have results not taken yet (:meth:`take`), or every row has."""
        while not (self.pieces or self.errors or self.done.done()):
            self._news = asyncio.get_running_loop().create_future()
            await self._news

    def take(self) -> tuple[list[tuple[list[int], Any]], dict[int, BaseException]]:
        """The results and errors gathered since the last take (a reply in parts sends each once)."""
        pieces, errors = self.pieces, self.errors
        self.pieces, self.errors = [], {}
        return pieces, errors


@dataclass
class DeviceResult:
    """What the device thread returns for one device batch."""

    pieces: list[tuple[int, int, Any]]
    errors: dict[int, BaseException]
    compute_s: float
    stage_s: float = 0.0
    wait_s: float = 0.0
    timer: tuple[Any, Any] | None = None  # CUDA events around the batch: its GPU time, once it is done
    # the batch's input on the device, kept until the batch is done with it: it was allocated on the
    # transfer thread's stream, which would hand its memory to the next batch's copy at once
    staged: Any = None

    @property
    def pending(self) -> bool:
        """Whether its outputs are still on their way to host memory (a GPU batch)."""
        return self.timer is not None or any(isinstance(p[2], PendingHost) for p in self.pieces)

    def resolved(self, rows: int) -> DeviceResult:
        """This result once its outputs are in host memory (blocks), with ``compute_s`` the GPU's
        time for it; if waiting fails (an error on the device), every row of the batch (``rows``)
        fails with that error."""
        try:
            pieces = [(a, b, out.result() if isinstance(out, PendingHost) else out) for a, b, out in self.pieces]
            compute_s = self.compute_s
            if self.timer is not None:
                self.timer[1].synchronize()
                compute_s = self.timer[0].elapsed_time(self.timer[1]) / 1e3
        except Exception as exc:  # rows that failed alone keep their own errors
            logger.warning("dynbatch: outputs of a device batch of %d rows could not be brought back: %r", rows, exc)
            errors: dict[int, BaseException] = {row: exc for row in range(rows)}
            errors.update(self.errors)
            return DeviceResult([], errors, self.compute_s, self.stage_s, self.wait_s)
        finally:
            self.staged = None
        return DeviceResult(pieces, self.errors, compute_s, self.stage_s, self.wait_s)


@dataclass
class ServerStats:
    """Counts of one server, for the heartbeat, the dashboard and the metrics."""

    batches: int = 0
    rows: int = 0
    failed_rows: int = 0
    shipments: int = 0
    shared_batches: int = 0  # device batches with rows from more than one client
    compute_seconds: float = 0.0
    ooms: int = 0
    stuck_batches: int = 0
    padded_elements: int = 0  # padding added to batches of padded samples
    real_elements: int = 0  # and their own elements (along the padded axis)
    # (rows, seconds since this model's previous batch ended, seconds since the device's did)
    recent: deque = field(default_factory=lambda: deque(maxlen=64))

    def device_share(self) -> float:
        """The part of this model's recent time on the device that its own batches took (1 while
        no other model ran between them)."""
        shares = sum(s for _, s, _ in self.recent)
        return min(1.0, sum(t for _, _, t in self.recent) / shares) if shares > 0 else 1.0

    def to_dict(self) -> dict[str, Any]:
        rows = sum(r for r, _, _ in self.recent)
        seconds = sum(s for _, s, _ in self.recent)
        return {
            "batches": self.batches,
            "samples": self.rows,
            "failed_samples": self.failed_rows,
            "shipments": self.shipments,
            "shared_batches": self.shared_batches,
            "compute_seconds": self.compute_seconds,
            "ooms": self.ooms,
            "stuck_batches": self.stuck_batches,
            "padding_waste": self.padded_elements / self.real_elements if self.real_elements else None,
            "recent_mean_batch": rows / len(self.recent) if self.recent else None,
            "recent_throughput": rows / seconds if seconds > 0 else None,
        }


class ModelServer:
    """Serves one loaded model version on one device (see the module docstring).

    Parameters
    ----------
    loaded
        The model.
    sizer
        The device's memory sizer (shared by every model on the device).
    device_thread
        The device's executor (one thread, shared by its models).
    stager
        The transfer thread of GPU batches.
    call_as_worker
        ``call_as_worker(fn, *args)``: runs ``fn`` so that ``distributed.get_worker()`` works in it.
    pin_slot
        ``pin_slot(shipment) -> bool``: page-lock the client slot a shipment's rows are in.
    on_retired
        Called once a retiring server has nothing left to do (the owner drops it then).
    clock
        When a running batch is stuck (default: from ``ModelSpec.execution_timeout``).
    copier
        The copy-out thread of GPU outputs (None: the event loop's default executor).
    turns
        When the device last finished a batch (shared by every model on the device; default: this
        server's own).
    """

    def __init__(self, loaded: LoadedModel, sizer: MemorySizer, device_thread: Executor, stager: Executor, *,
                 call_as_worker: Callable[..., Any] = lambda fn, *args, **kwargs: fn(*args, **kwargs),
                 pin_slot: Callable[[Shipment], bool] = lambda shipment: False,
                 on_retired: Callable[[ModelServer], None] = lambda server: None,
                 clock: ExecutionClock | None = None, copier: Executor | None = None,
                 turns: DeviceTurns | None = None):
        spec = loaded.spec
        self.loaded = loaded
        self.name = spec.name
        self.version = loaded.version
        self.device = loaded.device
        self.sizer = sizer
        self.controller = BatchSizeController(
            spec.latency_target, initial_size=spec.initial_size(loaded.device),
            max_size=spec.batch_limit(loaded.device), ladder=loaded.ladder,
        )
        # padded or weighed samples: batches are formed by cost, and the controller's size and the
        # memory cap are costs (tokens, for padded samples); clients are told rows, at the mean
        # cost of a row
        self.weighed = spec.structured
        self.queue: PartQueue | CostQueue = CostQueue(padded=spec.pad_value is not None) if self.weighed else PartQueue()
        self._row_cost: float | None = None  # mean cost of a row lately (weighed only)
        self._row_real: float | None = None  # mean real length of a padded row lately
        self._fixed_outputs: set[str] = set()  # padded samples: outputs seen not to follow the padded length
        self.stats = ServerStats()
        self.clock = clock or ExecutionClock(spec.execution_timeout)
        self.retiring = False  # a newer version replaced it, or no client uses it: finish, then close
        self.closed = False
        self._device_thread = device_thread
        self._stager = stager
        self._copier = copier  # (None: the event loop's default executor)
        self._call_as_worker = call_as_worker
        self._pin_slot = pin_slot
        self._on_retired = on_retired
        self._max_delay = float(spec.max_delay)
        # device batches formed and not finished, in the order the device runs them: the first
        # computes, the ones behind it are staged
        self._formed: deque[DeviceBatch] = deque()
        self.turns = turns or DeviceTurns()
        self._own_turns = DeviceTurns()  # this model's batches only
        self._last_rows: float = 0  # rows (or cost) of the last device batch
        self._cold = True
        self._tasks: set[asyncio.Task] = set()
        self._loop = asyncio.get_running_loop()

    def __repr__(self) -> str:
        return f"<ModelServer {self.name!r} v{self.version} on {self.device}: {len(self.queue)} rows waiting>"

    # -- serving ----------------------------------------------------------------------------------
    def start(self, shipment: Shipment) -> None:
        """Queue a shipment's rows (its ``done`` resolves once every one has its result or error)."""
        if self.closed:
            raise ModelSuperseded(self.name, None)
        self.stats.shipments += 1
        if shipment.shared and self.loaded.stages_on_device and not self.loaded.spec.structured:
            # (structured rows are gathered and padded on the host first: the slot is never copied from)
            shipment.pinned = self._pin_slot(shipment)
        self.queue.push(shipment.parts())
        self._pump()

    @property
    def idle(self) -> bool:
        return not len(self.queue) and not self._formed and not self._tasks

    def advice(self, refresh: bool = False) -> Advice:
        """What clients should know now: the batch size, the cap, the throughput at the size
        (``refresh``: read free memory for the cap first; otherwise it is the one the last device
        batch formed under)."""
        if refresh:
            self._update_cap()
        c = self.controller
        # the rate at the size batches actually run at (they are often shorter than the proposal),
        # times the part of the device this model has had lately: other models on the device take
        # theirs, and placement must not expect their time for this model
        throughput = c.throughput_at(int(self._last_rows)) if self._last_rows else None
        throughput = None if throughput is None else throughput * self.stats.device_share()
        size, cap, ship = c.size, c.cap, None
        if self.weighed and self._row_cost:  # clients count rows
            per_row = self._row_cost
            size = max(1, round(size / per_row))
            cap = None if cap is None else max(1, int(cap // per_row))
            # the controller counts a padded batch's real tokens a second: rows by their real length
            throughput = None if throughput is None else throughput / (self._row_real or per_row)
            # rows of several batches per shipment (clients keep many in flight: the queue here holds
            # lengths to choose from)
            ship = size * WEIGHED_SHIP_BATCHES
        stats = self.stats.to_dict()
        return Advice(size=size, cap=cap, throughput=throughput or stats["recent_throughput"],
                      memory_used=self.sizer.used_fraction(), decision=c.decision, reason=c.reason,
                      phase=c.phase.value, padding_waste=stats["padding_waste"], ship=ship)

    def _update_cap(self) -> None:
        self.controller.set_cap(self.sizer.cap(self.name))

    # -- forming device batches -------------------------------------------------------------------
    def _pump(self, cap_read: bool = False) -> None:
        """Form the next device batch if one may form now (see the module docstring);
        ``cap_read``: the caller read the memory cap just now."""
        if len(self._formed) >= FULL_AHEAD + 1 or not len(self.queue):
            return
        if self.weighed:
            self._form_weighed(cap_read)
            return
        if not cap_read:
            self._update_cap()
        size = self.controller.size
        if len(self.queue) < size and len(self._formed) > PARTIAL_AHEAD:
            return  # a partial batch waits here, where later rows (of any client) can join it
        parts = self.queue.take(size)
        rows = sum(len(p) for p in parts)
        batch = DeviceBatch(parts, formed=time.monotonic(), proposed=size,
                            new_shape=self.loaded.first_at_size(rows), compiling=self.loaded.compiling)
        self._launch(batch)

    def _form_weighed(self, cap_read: bool) -> None:
        """:meth:`_pump` for padded or weighed samples: a batch of at most the controller's cost."""
        queue = self.queue
        assert isinstance(queue, CostQueue)
        if self._row_cost is None:  # the first rows tell what a row costs: the controller starts there
            self._row_cost = queue.mean_cost() or 1.0
            spec = self.loaded.spec
            # padded batches: a larger one pads more, so past the size where the device stops gaining
            # throughput falls slowly, never by the usual tenth at once; a smaller fall settles it
            self.controller = BatchSizeController(
                float(spec.latency_target), initial_size=max(1, round(spec.initial_size(self.device) * self._row_cost)),
                throughput_tolerance=PADDED_TOLERANCE if queue.padded else 0.1)
        if not cap_read:
            self._update_cap()
        size = self.controller.size
        if queue.cost < size and len(self._formed) > PARTIAL_AHEAD:
            return
        max_rows = self.loaded.spec.batch_limit(self.device)
        if self.loaded.row_limit is not None:  # a batch above the top of ``buckets`` would run unpadded
            max_rows = min(max_rows or self.loaded.row_limit, self.loaded.row_limit)
        parts, lengths, costs = queue.take_weighed(size, max_rows=max_rows)
        longest = int(max(lengths)) if queue.padded else None
        cost = queue.batch_cost(lengths, costs)
        # stopped by its budget: rows were left, none would have fitted, and the row limit did not
        # stop it (a batch cut short of half its budget by a long row says little about the budget)
        at_budget = (len(queue) > 0 and cost >= 0.5 * size and (max_rows is None or len(lengths) < max_rows)
                     and not queue.another_fits(size, lengths, costs))
        # never new_shape: free-sized batches all have new shapes, none pays a set-up worth hiding
        batch = DeviceBatch(parts, formed=time.monotonic(), proposed=size, compiling=self.loaded.compiling,
                            cost=cost, length=longest, real=int(sum(lengths)) if queue.padded else None,
                            at_budget=at_budget)
        self._row_cost = 0.8 * self._row_cost + 0.2 * (cost / max(1, batch.rows))
        if batch.real is not None:
            real = batch.real / max(1, batch.rows)
            self._row_real = real if self._row_real is None else 0.8 * self._row_real + 0.2 * real
        self._launch(batch)

    def _launch(self, batch: DeviceBatch) -> None:
        self._formed.append(batch)
        task = asyncio.ensure_future(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self.check_retired()

    def retire(self) -> None:
        """Serve what is queued and in flight, then hand back to the owner (a newer version
        replaced this one, or no client uses it)."""
        self.retiring = True
        self.check_retired()

    def check_retired(self) -> None:
        if self.retiring and self.idle:
            self._on_retired(self)

    # -- running them -----------------------------------------------------------------------------
    async def _run(self, batch: DeviceBatch) -> None:
        try:
            if self.loaded.stages_on_device:
                running = await self._loop.run_in_executor(self._stager, self._stage_then_submit, batch)
                result = await asyncio.wrap_future(running)
            else:
                result = await self._loop.run_in_executor(self._device_thread, self._execute, batch, None,
                                                          (0.0, time.perf_counter()))
            if result.pending:  # the device thread went on; the outputs reach host memory here
                result = await self._loop.run_in_executor(self._copier, result.resolved, batch.rows)
        except asyncio.CancelledError:  # the worker closes: the copy-out thread dropped the call
            if not self.closed:
                raise
            self._give_back(batch)
            return
        except Exception as exc:  # the batch could not run at all
            if self.closed:  # the worker closes: nothing ran, the clients send the rows elsewhere
                self._give_back(batch)
                return
            logger.warning("dynbatch: device batch of %d rows of model %r failed: %r", batch.rows, self.name, exc)
            result = DeviceResult([], {row: exc for row in range(batch.rows)}, 0.0)
        if batch.abandoned:  # its rows were handed back meanwhile (evacuate): the result goes nowhere
            return
        try:
            self._finish(batch, result)
        except Exception as exc:  # a bug here must not leave requests waiting: their rows fail
            logger.exception("dynbatch: results of a device batch of model %r could not be delivered", self.name)
            for part in batch.parts:
                shipment = part.owner
                shipment.errors.update((row, exc) for row in shipment.positions(part))
                shipment.settle(len(part))

    def _give_back(self, batch: DeviceBatch) -> None:
        """The worker closes under ``batch``: its rows go back to their clients as unrun (unless an
        evacuation handed them back already)."""
        if batch.abandoned:
            return
        if batch in self._formed:
            self._formed.remove(batch)
        for part in batch.parts:
            self._hand_back(part)

    @staticmethod
    def _hand_back(part: Part) -> None:
        part.owner.unrun.extend(part.owner.positions(part))
        part.owner.settle(len(part))

    def _arrays(self, batch: DeviceBatch) -> tuple[list[Any], bool, bool]:
        arrays = [part.rows for part in batch.parts]
        owners = [part.owner for part in batch.parts]
        shared = any(p.owner.shared and p.ids is None for p in batch.parts)  # (gathered parts are copies)
        pinned = len(owners) == 1 and owners[0].pinned
        return arrays, shared, pinned

    def _stage_then_submit(self, batch: DeviceBatch):
        """Transfer thread: copy the batch to the device while the batch before computes, then hand
        it to the device thread directly (no turn of the event loop between the two)."""
        started = time.perf_counter()
        arrays, shared, pinned = self._arrays(batch)
        staged = self.loaded.stage(arrays, shared, pinned)
        stage_s = time.perf_counter() - started
        return self._device_thread.submit(self._execute, batch, staged, (stage_s, time.perf_counter()))

    def _execute(self, batch: DeviceBatch, staged: Any, staging: tuple[float, float]) -> DeviceResult:
        """Device thread: run one device batch (joined here for a host model)."""
        if batch.abandoned:  # handed back while it waited for the device: the worker restarts
            return DeviceResult([], {}, 0.0)
        batch.started = time.monotonic()
        started = time.perf_counter()
        if staged is None:
            arrays, shared, _ = self._arrays(batch)
            staged = self.loaded.stage(arrays, shared)
        timer = self.loaded.gpu_timer()
        if timer is not None:
            timer[0].record()
        pieces, errors = self._call_as_worker(run_device_batch, self.loaded, self.sizer, staged,
                                              full=batch.full, on_oom=self._count_oom)
        if timer is not None:
            timer[1].record()
        stage_s, ready_at = staging  # ready: staged, or handed to the device thread
        return DeviceResult(pieces, errors, time.perf_counter() - started, stage_s, started - ready_at, timer,
                            staged if timer is not None else None)

    def _count_oom(self, rows: int) -> None:
        self.stats.ooms += 1  # (an int increment: safe from the device thread)

    # -- results ----------------------------------------------------------------------------------
    def _finish(self, batch: DeviceBatch, result: DeviceResult) -> None:
        done = time.monotonic()
        if batch in self._formed:
            self._formed.remove(batch)
        if result.compute_s > 0:
            self.clock.observe(batch.rows, result.compute_s)
        self._update_cap()  # the batch taught the memory profile: the cap its shipments are told
        try:
            record = self._learn(batch, result, done)
        except Exception:  # never let bookkeeping keep results from their requests
            logger.exception("dynbatch: learning from a device batch of model %r failed", self.name)
            record = {"compute_s": result.compute_s, "stage_s": result.stage_s, "wait_s": result.wait_s,
                      "service_s": result.compute_s, "latency_s": result.compute_s, "decision": "not shown",
                      "reason": "error"}
        owners = batch.owners()
        for _, _, outputs in result.pieces:
            learn_fixed(outputs, batch.length, self._fixed_outputs)
        if self.weighed and not result.errors and len(result.pieces) == 1 and result.pieces[0][:2] == (0, batch.rows):
            self._deliver_grouped(batch, result.pieces[0][2])
        else:
            for part, start in zip(batch.parts, batch.starts):
                self._deliver(part, start, result, batch.length)
        for owner in owners:
            own = sum(len(p) for p in batch.parts if p.owner is owner)
            owner.records.append(DeviceBatchRecord(rows=batch.rows, own=own, sources=len({o.client for o in owners}),
                                                   **record))
            # its rows' share of the device: a shipment whose rows ran in many batches is not
            # charged all of them
            owner.compute_s += result.compute_s * self._share(batch, owner, own)
            owner.stage_s += result.stage_s
            owner.wait_s += result.wait_s
        for owner in owners:
            owner.settle(sum(len(p) for p in batch.parts if p.owner is owner))
        self._pump(cap_read=True)

    def _share(self, batch: DeviceBatch, owner: Shipment, own: int) -> float:
        """The part of ``batch`` that ``owner``'s ``own`` rows are: by rows (padded rows are all
        padded alike), or by their costs for weighed samples of unequal costs."""
        if batch.cost and batch.length is None:
            total = 0.0
            for part in batch.parts:
                costs = getattr(part.rows, "costs", None) if part.owner is owner else 0.0
                if costs is None:
                    return own / max(1, batch.rows)
                total += float(np.sum(costs))
            return total / batch.cost
        return own / max(1, batch.rows)

    def _cut_back(self, piece: Any, length: int, owns: list[int]) -> Any:
        """Outputs of rows padded to ``length``, cut back to each row's own length (``owns``): here
        for a single row, on the client for several (:class:`TrimmedRows`: one piece to serialise)."""
        if len(owns) == 1:
            return trim_output_row(piece, length, owns[0], self._fixed_outputs)
        if min(owns) < length and follows_length(piece, length, self._fixed_outputs):
            return TrimmedRows(piece, length, owns, frozenset(self._fixed_outputs))
        return piece

    def _deliver_grouped(self, batch: DeviceBatch, outputs: Any) -> None:
        """A weighed batch that ran whole, without failures: each shipment's rows of it as one
        piece (its rows one by one are many small pieces, each cut, serialised and sent on its
        own), padded outputs cut back to each row's length by the client (:class:`TrimmedRows`)."""
        groups: dict[int, tuple[Shipment, list[int], list[int], list[int]]] = {}
        for part, start in zip(batch.parts, batch.starts):
            shipment, k = part.owner, len(part)
            _, index, positions, owns = groups.setdefault(id(shipment), (shipment, [], [], []))
            index.extend(range(start, start + k))
            positions.extend(shipment.positions(part))
            if batch.length is not None:
                owns.extend(part.rows.lengths().tolist())
        pieces = []
        try:
            for shipment, index, positions, owns in groups.values():
                piece = take_rows(outputs, index, batch.rows)
                if batch.length is not None:
                    piece = self._cut_back(piece, batch.length, owns)
                pieces.append((shipment, positions, piece))
        except Exception:  # outputs that cannot be gathered by row: part by part, each with its own error
            for part, start in zip(batch.parts, batch.starts):
                self._deliver(part, start, DeviceResult([(0, batch.rows, outputs)], {}, 0.0, 0.0, 0.0), batch.length)
            return
        for shipment, positions, piece in pieces:
            shipment.pieces.append((positions, piece))

    def _deliver(self, part: Part, start: int, result: DeviceResult, length: int | None = None) -> None:
        """The outputs and errors of one part's rows, to its shipment (``length``: the batch's
        padded length, cut from every output back to the part's own length)."""
        shipment, stop = part.owner, start + len(part)
        owns = part.rows.lengths().tolist() if length is not None else None
        for a, b, outputs in result.pieces:
            lo, hi = max(a, start), min(b, stop)
            if lo >= hi:
                continue
            rows = shipment.positions(part, lo - start, hi - start)
            try:
                piece = outputs if lo == a and hi == b else slice_rows(outputs, lo - a, hi - a, b - a)
            except ValueError as exc:  # outputs without the batch dimension cannot be cut per request
                shipment.errors.update((r, exc) for r in rows)
                continue
            if owns is not None and length is not None:
                piece = self._cut_back(piece, length, owns[lo - start : hi - start])
            shipment.pieces.append((rows, piece))
        for row, exc in result.errors.items():
            if start <= row < stop:
                (position,) = shipment.positions(part, row - start, row - start + 1)
                shipment.errors[position] = exc

    def _learn(self, batch: DeviceBatch, result: DeviceResult, done: float) -> dict[str, Any]:
        """Feed the controller and the estimates with one finished batch; returns its record."""
        first_arrival = min(part.arrived for part in batch.parts)
        # from the device's previous batch end, whichever model's (see core/service.py): for the
        # controller, whose size must not shrink because other models use the device too
        service_s = self.turns.service_time(first_arrival, done, result.compute_s)
        # from this model's previous batch end: its share of the device, what clients can expect
        # of it here while the others keep theirs (the same as service_s for a model alone)
        share_s = self._own_turns.service_time(first_arrival, done, result.compute_s)
        self._last_rows = batch.units
        owners = batch.owners()
        formation_wait = min(max(0.0, *(o.queued_s for o in owners)), self._max_delay)
        latency = formation_wait + service_s
        failed = len(result.errors)
        stats = self.stats
        stats.batches += 1
        stats.rows += batch.rows - failed
        stats.failed_rows += failed
        stats.compute_seconds += result.compute_s
        stats.recent.append((batch.rows, share_s, service_s))
        padding = None
        if batch.length is not None and batch.real:
            stats.padded_elements += batch.length * batch.rows - batch.real
            stats.real_elements += batch.real
            padding = (batch.length * batch.rows - batch.real) / batch.real
        if len({o.client for o in owners}) > 1:
            stats.shared_batches += 1
        cold, self._cold = self._cold, False
        for o in owners:
            o.cold = o.cold or cold
        hidden = next((why for why, flag in (
            ("cold", cold), ("compiling", batch.compiling or self.loaded.compiling), ("new_shape", batch.new_shape),
            # a new slot costs a batch its mapping's first touch where the batch copies straight out of
            # it (a part that is a view of it) or pins it; gathered rows were copied as the batch formed
            ("new_slot", any(o.new_slot and (o.pinned or any(p.ids is None for p in batch.parts if p.owner is o))
                             for o in owners)),
            ("failed", failed == batch.rows),
        ) if flag), None)
        if hidden is None:
            # a weighed batch rarely meets its budget exactly: one stopped by it is full all the same
            self.controller.observe(int(batch.units), latency, service_s, proposed=batch.proposed,
                                    full=batch.at_budget if batch.cost is not None else None,
                                    work=batch.real or None)  # padded samples: real tokens, not padded ones
            decision, reason = self.controller.decision, self.controller.reason
        else:
            # a batch whose time says little about its size: the model was loaded for it, a bucket
            # compiled beside it, its shape was new on the device, a slot was mapped for it
            decision, reason = "not shown", hidden
        return {"compute_s": result.compute_s, "stage_s": result.stage_s, "wait_s": result.wait_s,
                "service_s": service_s, "latency_s": latency, "decision": decision, "reason": reason,
                "padding": padding}

    # -- stuck batches ----------------------------------------------------------------------------
    def running(self) -> DeviceBatch | None:
        """The device batch the device runs now (None: none)."""
        batch = self._formed[0] if self._formed else None
        return batch if batch is not None and batch.started is not None and not batch.abandoned else None

    def overdue(self, now: float) -> tuple[DeviceBatch, float] | None:
        """The running batch and its limit, if it ran past the limit (it is stuck)."""
        batch = self.running()
        if batch is None:
            return None
        limit = self.clock.limit(batch.rows)
        started = batch.started
        return (batch, limit) if started is not None and now - started > limit else None

    def evacuate(self, stuck: DeviceBatch | None = None, limit: float | None = None) -> int:
        """The worker restarts (a batch is stuck): hand every row back now, ``stuck``'s as stuck
        and the others as unrun; whatever the device thread still returns is dropped. Serves
        nothing more. Returns the rows handed back."""
        self.closed = True
        rows = 0
        if stuck is not None:
            self.stats.stuck_batches += 1
        for batch in list(self._formed):
            batch.abandoned = True
            for part in batch.parts:
                if batch is stuck:
                    shipment = part.owner
                    shipment.stuck.extend(shipment.positions(part))
                    shipment.stuck_limit = limit
                    shipment.settle(len(part))
                else:
                    self._hand_back(part)
                rows += len(part)
        self._formed.clear()
        for part in self.queue.drain():
            self._hand_back(part)
            rows += len(part)
        return rows

    # -- reporting --------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """JSON-able, for the heartbeat (dashboard, metrics)."""
        return {
            "name": self.name,
            "version": self.version,
            "device": self.device,
            "load_seconds": self.loaded.load_seconds,
            "queued": len(self.queue),
            "memory_cap": self.controller.cap,
            "controller": self.controller.state(),
            "compile": self.loaded.compile_summary(),
            "retiring": self.retiring,
            **self.stats.to_dict(),
        }

    def close(self) -> None:
        """The server is dropped (no client uses it, or the worker closes): compile nothing more,
        forget the model's memory profile; rows still waiting are handed back unrun."""
        self.closed = True
        for part in self.queue.drain():
            self._hand_back(part)
        self.loaded.close()
        self.sizer.forget(self.name)
        self.loaded.free_cache()
