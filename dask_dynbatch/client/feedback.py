"""What a reply teaches the client: the worker's advice, the pacing forecast, and a history row.

The model server owns the batch size (it sees every device batch, from every client); the client
keeps what its dispatcher needs to place and pace its own shipments: the server's advice (size,
memory cap, throughput, memory use) and, per worker, when its device is expected to free
(:class:`~dask_dynbatch.core.pacing.BusyForecast`), learned from the device time and lead of its
own shipments. A shipment whose device batches the server did not show its controller (a cold
model, a compile beside it, a new shape, a fresh shared-memory slot) teaches the forecast nothing
either: its time says little about its size.
"""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING

from ..errors import CompileWarning
from ..protocol import Advice, DeviceBatchRecord, HistoryRecord

if TYPE_CHECKING:
    from .dispatcher import WorkerSlot
    from .transport import Delivery


def learn(slot: WorkerSlot, delivery: Delivery, rows: int, oldest: float, max_delay: float, model: str,
          isolated: bool = False) -> HistoryRecord:
    """Update ``slot`` from one shipment's reply; returns its history row."""
    reply = delivery.reply
    slot.advice = Advice.from_msg(reply.advice)
    slot.batches += 1
    slot.samples += rows
    if reply.compile is not None:
        _on_compile_state(slot, reply.compile, model)
    records = [DeviceBatchRecord.from_msg(b) for b in reply.batches]
    shown = bool(records) and all(r.decision != "not shown" for r in records)
    sent, done = delivery.sent, delivery.done
    if shown and reply.compute_s > 0:
        # from forming the shipment to its rows being ready on the device: stacking, half the
        # round trip's comm, staging
        comm_s = max(0.0, (done - sent) - reply.worker_s)
        slot.forecast.observe(rows, reply.compute_s, (sent - delivery.formed) + comm_s / 2 + reply.stage_s)
    last = records[-1] if records else None
    formation_wait = min(max(0.0, sent - oldest), max_delay)
    return HistoryRecord(
        time=time.time(), worker=slot.address, version=reply.version, size=rows,
        device_batch=max((r.rows for r in records), default=rows), latency=(done - sent) + formation_wait,
        cap=slot.advice.cap, controller_size=slot.advice.size, compute_s=reply.compute_s, wait_s=reply.wait_s,
        stage_s=reply.stage_s, queued_s=sent - oldest, stack_s=sent - delivery.formed, round_trip_s=done - sent,
        worker_s=reply.worker_s, service_s=last.service_s if last else None,
        decision=last.decision if last else "not shown", reason=last.reason if last else "no device batch ran",
        isolated=isolated,
        padding=last.padding if last else None,
    )


def _on_compile_state(slot: WorkerSlot, state: dict, model: str) -> None:
    error = state.get("error")
    if error and not (slot.compile or {}).get("error"):
        warnings.warn(
            f"dask-dynbatch: model {model!r} could not be compiled on worker {slot.address} "
            f"and is served eagerly there: {error}",
            CompileWarning,
            stacklevel=2,
        )
    slot.compile = state


def lost(slot: WorkerSlot, rows: int, version: int, outcome: str, isolated: bool) -> HistoryRecord:
    """The history row of a shipment whose rows were lost with their worker (``outcome``: "worker
    died") or in a stuck device batch ("stuck"): they are retried in smaller groups."""
    return HistoryRecord(
        time=time.time(), worker=slot.address, version=version, size=rows, device_batch=rows, latency=0.0,
        cap=slot.advice.cap, controller_size=slot.advice.size, compute_s=0.0, wait_s=0.0, stage_s=0.0, queued_s=0.0,
        stack_s=0.0, round_trip_s=0.0, worker_s=0.0, service_s=None, decision="not shown", reason=outcome,
        outcome=outcome, isolated=isolated,
    )
