"""Per model, one view of the cluster: what the dashboard page and ``/metrics`` both show.

Each number has one source. A model's requests (counts, queue depth, latency) exist only at its
Batchers, so they are added up over every Batcher of the model. The batch size, memory cap and the
controller's decision belong to the worker's model server, which serves every client, and so do
the batches it ran: they come from the worker's heartbeat. What only a client knows of a worker
(the rows it has in flight there, its placement figure) comes from the Batchers.
"""

from __future__ import annotations

from typing import Any

#: Batcher counts of finished requests and the ``outcome`` label ``/metrics`` publishes each under
OUTCOMES = {"delivered": "served", "failed": "failed", "cancelled": "cancelled", "timed_out": "timed_out"}
#: Batcher counts of requests caught up in hangs and crashes (see ``Batcher.stats``)
CONTAINMENT = ("timed_out_running", "stuck", "isolated", "quarantined")
#: Batcher counts of how requests were answered: ``answered_early`` (of ``delivered``, results that
#: came in a part of their shipment's reply, before its last device batch finished)
ANSWERED = ("answered_early",)
#: Batcher latency percentiles and their Prometheus ``quantile`` label
QUANTILES = {"latency_p50": "0.5", "latency_p95": "0.95", "latency_p99": "0.99"}


def model_summaries(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per model, its Batchers' reports added up and, per worker, its model server's state.

    Parameters
    ----------
    state
        :meth:`DynBatchPlugin.state <dask_dynbatch.scheduler.plugin.DynBatchPlugin.state>`.

    Returns
    -------
    dict
        ``{model: {"version", "batchers", "submitted", "delivered", "failed", "cancelled",
        "timed_out", "timed_out_running", "stuck", "isolated", "quarantined", "answered_early",
        "stuck_batches", "queued", "latency_p50", "latency_p95", "latency_p99", "latency_target",
        "workers"}}``, every model that the registry, a Batcher or a worker's server knows.
        ``version`` is the registry's (None once the registry dropped the model). Counts and
        ``queued`` add up over the model's Batchers (``stuck_batches``: device batches the workers'
        watchdogs declared stuck, each restarting its worker, from the scheduler); latency percentiles are the worst Batcher's,
        because averaging percentiles of different request streams means nothing. ``workers``
        maps each worker that serves the model or that a Batcher can send it to onto
        :func:`worker_summary`.
    """
    models = state.get("models") or {}
    workers = state.get("workers") or {}
    reports = [r for r in (state.get("batchers") or {}).values() if r.get("model") is not None]
    names = set(models) | {r["model"] for r in reports}
    names |= {s["name"] for view in workers.values() for s in view.get("servers") or ()}

    out: dict[str, dict[str, Any]] = {}
    for name in sorted(names):
        theirs = [r for r in reports if r["model"] == name]
        summary: dict[str, Any] = {
            "version": (models.get(name) or {}).get("version"),
            "batchers": len(theirs),
            **{count: sum(int(r.get(count) or 0) for r in theirs)
               for count in ("submitted", *OUTCOMES, *CONTAINMENT, *ANSWERED, "queued")},
            "stuck_batches": int((state.get("stuck_batches") or {}).get(name, 0)),
        }
        for quantile in QUANTILES:
            summary[quantile] = max((r[quantile] for r in theirs if r.get(quantile) is not None), default=None)
        # a different target under the same name is a registration conflict: every Batcher has the same
        targets = [r["latency_target"] for r in theirs if r.get("latency_target") is not None]
        summary["latency_target"] = targets[0] if targets else None
        summary["workers"] = {}
        for address, view in sorted(workers.items()):
            server = server_state(view, name)
            slots = [(r, r["workers"][address]) for r in theirs if address in (r.get("workers") or {})]
            if server is not None or slots:
                summary["workers"][address] = worker_summary(server, slots)
        out[name] = summary
    return out


def server_state(view: dict[str, Any], name: str) -> dict[str, Any] | None:
    """A worker's server of model ``name`` from its heartbeat, or None: the newest version when an
    older one is still finishing its last rows, since new rows go to the newest."""
    servers = [s for s in view.get("servers") or () if s.get("name") == name]
    return max(servers, key=lambda s: s.get("version") or 0, default=None)


def worker_summary(
    server: dict[str, Any] | None, slots: list[tuple[dict[str, Any], dict[str, Any]]]
) -> dict[str, Any]:
    """One (model, worker): the model server's state, and what the model's Batchers know of it.

    Parameters
    ----------
    server
        The worker's model server (:func:`server_state`), None if the worker has not loaded it.
    slots
        ``(report, its view of this worker)`` for every Batcher of the model that knows the worker.

    Returns
    -------
    dict
        From the server: ``version``, ``device``, ``batch_size``, ``memory_cap``, ``decision``,
        ``reason``, ``phase`` (its controller's), ``batches``, ``samples``, ``shared_batches``
        (device batches with rows of more than one client), ``throughput`` (samples/s over its
        recent batches), ``compile``. From the Batchers: ``inflight_samples`` (added up) and
        ``workload`` (see below). None or 0 where the source is missing.

    The workload figure (seconds until a new shipment sent there would be done) is the largest a
    Batcher reports: each client counts only its own rows in flight while the server queues every
    client's rows together, so the largest figure is the closest to what a new shipment waits for.
    Left out are closed Batchers (their last figure is frozen) and figures of a worker whose
    throughput the Batcher has not been told yet (they rest on an assumed rate).
    """
    server = server or {}
    controller = server.get("controller") or {}
    figures = [
        slot["workload"] for report, slot in slots
        if not report.get("closed") and slot.get("throughput") is not None and slot.get("workload") is not None
    ]
    return {
        "version": server.get("version"),
        "device": server.get("device"),
        "batch_size": controller.get("size"),
        "memory_cap": server.get("memory_cap"),
        "decision": controller.get("decision"),
        "reason": controller.get("reason"),
        "phase": controller.get("phase"),
        "batches": server.get("batches") or 0,
        "samples": server.get("samples") or 0,
        "shared_batches": server.get("shared_batches") or 0,
        "throughput": server.get("recent_throughput"),
        "compile": server.get("compile"),
        "inflight_samples": sum(slot.get("inflight_samples") or 0 for _, slot in slots),
        "workload": max(figures, default=None),
    }
