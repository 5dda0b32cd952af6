"""Prometheus series of dask-dynbatch on the scheduler's existing ``/metrics`` endpoint.

:class:`DynBatchMetricCollector` turns the scheduler plugin's view (the batchers' reports and the
workers' heartbeat metrics) into ``dask_dynbatch_*`` series. :func:`register_collector`, called by
:meth:`DynBatchPlugin.start <dask_dynbatch.DynBatchPlugin.start>`, adds it to
``prometheus_client``'s default registry, which the scheduler's ``/metrics`` handler serves.
Like distributed, this treats ``prometheus_client`` as optional: without it nothing is registered
and ``/metrics`` says that Prometheus is not installed.

Series (``dask`` is ``distributed.dashboard.prometheus.namespace``):

=========================================== ========= ===========================================
name                                        type      labels and meaning
=========================================== ========= ===========================================
``dask_dynbatch_requests_submitted_total``  counter   ``model``: requests submitted to batchers
``dask_dynbatch_requests_total``            counter   ``model``, ``outcome`` (``served``,
                                                      ``failed``, ``cancelled``, ``timed_out``)
``dask_dynbatch_queue_depth``               gauge     ``model``: requests waiting in the batchers
``dask_dynbatch_latency_seconds``           gauge     ``model``, ``quantile`` (0.5, 0.95, 0.99):
                                                      latency requests experienced
``dask_dynbatch_latency_target_seconds``    gauge     ``model``
``dask_dynbatch_batch_size``                gauge     ``model``, ``worker``: the controller's
                                                      current batch size
``dask_dynbatch_memory_cap``                gauge     ``model``, ``worker``: largest batch that
                                                      fits in the worker's free memory (if known)
``dask_dynbatch_inflight_samples``          gauge     ``model``, ``worker``
``dask_dynbatch_worker_batches_total``      counter   ``model``, ``worker``: batches run (worker)
``dask_dynbatch_worker_samples_total``      counter   ``model``, ``worker``: samples run (worker)
``dask_dynbatch_worker_throughput``         gauge     ``model``, ``worker``: samples/s of compute
                                                      over the worker's recent batches
``dask_dynbatch_batchers``                  gauge     ``model``: batchers attached
``dask_dynbatch_device_free_bytes``         gauge     ``worker``, ``device``: memory a new batch
                                                      can get now (the worker half's reading)
``dask_dynbatch_benchmark_score``           gauge     ``worker``: reference-model samples/s
=========================================== ========= ===========================================

Request counts come from the batchers (clients) and add up over every batcher of a model; they go
back down when a client disconnects (Prometheus treats that as a counter reset). Latency quantiles
are the worst over a model's batchers. Worker counts come from the heartbeats and survive clients.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from distributed.http.prometheus import PrometheusCollector

if TYPE_CHECKING:
    from distributed import Scheduler

logger = logging.getLogger(__name__)

#: batcher ``stats()`` counts and the ``outcome`` label each is published under
OUTCOMES = {"delivered": "served", "failed": "failed", "cancelled": "cancelled", "timed_out": "timed_out"}
QUANTILES = {"latency_p50": "0.5", "latency_p95": "0.95", "latency_p99": "0.99"}


def model_summaries(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per model, what all its batchers reported, added up.

    Parameters
    ----------
    state
        :meth:`DynBatchPlugin.state <dask_dynbatch.DynBatchPlugin.state>`.

    Returns
    -------
    dict
        ``{model: {"batchers", "submitted", "delivered", "failed", "cancelled", "timed_out",
        "queued", "latency_p50", "latency_p95", "latency_p99", "latency_target", "workers"}}``;
        ``workers`` maps a worker address to the batcher's view of it (the one that sent it
        the most samples when several batchers use the worker). Models registered without a
        batcher report appear with zero counts.
    """
    out: dict[str, dict[str, Any]] = {}

    def empty() -> dict[str, Any]:
        return {
            "batchers": 0,
            "submitted": 0,
            **{count: 0 for count in OUTCOMES},
            "queued": 0,
            **{q: None for q in QUANTILES},
            "latency_target": None,
            "workers": {},
        }

    for name in state.get("models", {}):
        out[name] = empty()
    for report in state.get("batchers", {}).values():
        name = report.get("model")
        if name is None:
            continue
        summary = out.setdefault(name, empty())
        summary["batchers"] += 1
        for count in ("submitted", *OUTCOMES, "queued"):
            summary[count] += int(report.get(count) or 0)
        for quantile in QUANTILES:
            value = report.get(quantile)
            if value is not None and (summary[quantile] is None or value > summary[quantile]):
                summary[quantile] = value
        if report.get("latency_target") is not None:
            summary["latency_target"] = report["latency_target"]
        for address, worker in (report.get("workers") or {}).items():
            known = summary["workers"].get(address)
            if known is None or (worker.get("samples") or 0) > (known.get("samples") or 0):
                summary["workers"][address] = worker
    return out


class DynBatchMetricCollector(PrometheusCollector):
    """``prometheus_client`` collector of the dynbatch series of one scheduler.

    It holds the scheduler weakly: the process-wide registry must not keep a closed scheduler alive.
    """

    def __init__(self, server: Scheduler):
        super().__init__(server)
        self.subsystem = "dynbatch"

    @property  # type: ignore[override]
    def server(self) -> Scheduler | None:
        return self._server_ref()

    @server.setter
    def server(self, scheduler: Scheduler) -> None:
        self._server_ref = weakref.ref(scheduler)

    def collect(self) -> Iterator[Any]:
        try:
            yield from self._collect()
        except Exception:  # a broken series must not take the scheduler's other metrics down
            logger.exception("dynbatch: collecting Prometheus series failed")

    def _collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        scheduler = self.server
        plugin = scheduler.extensions.get("dynbatch") if scheduler is not None else None
        if plugin is None:
            return
        state = plugin.state()
        models = model_summaries(state)

        batchers = GaugeMetricFamily(self.build_name("batchers"), "Batchers attached to a model", labels=["model"])
        submitted = CounterMetricFamily(
            self.build_name("requests_submitted"), "Requests submitted to the batchers of a model", labels=["model"]
        )
        requests = CounterMetricFamily(
            self.build_name("requests"),
            "Requests finished, by outcome (served, failed, cancelled, timed_out)",
            labels=["model", "outcome"],
        )
        queue = GaugeMetricFamily(
            self.build_name("queue_depth"), "Requests waiting in the batchers' queues", labels=["model"]
        )
        latency = GaugeMetricFamily(
            self.build_name("latency"),
            "Latency of requests from submit to result (worst batcher of the model)",
            labels=["model", "quantile"],
            unit="seconds",
        )
        target = GaugeMetricFamily(
            self.build_name("latency_target"), "Latency target of a model", labels=["model"], unit="seconds"
        )
        batch_size = GaugeMetricFamily(
            self.build_name("batch_size"), "Batch size the latency controller proposes now", labels=["model", "worker"]
        )
        memory_cap = GaugeMetricFamily(
            self.build_name("memory_cap"),
            "Largest batch that fits in the worker's free memory now",
            labels=["model", "worker"],
        )
        inflight = GaugeMetricFamily(
            self.build_name("inflight_samples"),
            "Samples sent to a worker and not yet returned",
            labels=["model", "worker"],
        )
        for name, summary in models.items():
            batchers.add_metric([name], summary["batchers"])
            submitted.add_metric([name], summary["submitted"])
            for count, outcome in OUTCOMES.items():
                requests.add_metric([name, outcome], summary[count])
            queue.add_metric([name], summary["queued"])
            for key, quantile in QUANTILES.items():
                if summary[key] is not None:
                    latency.add_metric([name, quantile], summary[key])
            if summary["latency_target"] is not None:
                target.add_metric([name], summary["latency_target"])
            for address, worker in summary["workers"].items():
                controller = worker.get("controller") or {}
                if controller.get("size") is not None:
                    batch_size.add_metric([name, address], controller["size"])
                cap = worker.get("memory_cap")
                if cap is None:
                    cap = controller.get("cap")
                if cap is not None:
                    memory_cap.add_metric([name, address], cap)
                inflight.add_metric([name, address], worker.get("inflight_samples") or 0)
        yield from (batchers, submitted, requests, queue, latency, target, batch_size, memory_cap, inflight)

        worker_batches = CounterMetricFamily(
            self.build_name("worker_batches"), "Batches a worker ran for a model", labels=["model", "worker"]
        )
        worker_samples = CounterMetricFamily(
            self.build_name("worker_samples"), "Samples a worker ran for a model", labels=["model", "worker"]
        )
        worker_throughput = GaugeMetricFamily(
            self.build_name("worker_throughput"),
            "Samples per second of compute over a worker's recent batches",
            labels=["model", "worker"],
        )
        for address, view in state.get("workers", {}).items():
            for name, stats in ((view.get("dynbatch") or {}).get("models") or {}).items():
                worker_batches.add_metric([name, address], stats.get("batches") or 0)
                worker_samples.add_metric([name, address], stats.get("samples") or 0)
                if stats.get("recent_throughput") is not None:
                    worker_throughput.add_metric([name, address], stats["recent_throughput"])
        yield from (worker_batches, worker_samples, worker_throughput)

        free_bytes = GaugeMetricFamily(
            self.build_name("device_free_bytes"),
            "Device memory a new batch can get now (free plus our allocator's unused cache)",
            labels=["worker", "device"],
        )
        score = GaugeMetricFamily(
            self.build_name("benchmark_score"), "Reference-model samples/s of the worker's device", labels=["worker"]
        )
        for address, view in state.get("workers", {}).items():
            ours = view.get("dynbatch") or {}
            for device, reading in (ours.get("devices") or {}).items():
                if reading.get("effective_free") is not None:
                    free_bytes.add_metric([address, device], reading["effective_free"])
            best = (ours.get("benchmark") or {}).get("best_throughput")
            if best is not None:
                score.add_metric([address], best)
        yield from (free_bytes, score)


# One collector per process, like distributed's own: the default registry refuses a second one
# with the same names. It serves the scheduler whose plugin started last (one per process
# outside of tests).
_collector: DynBatchMetricCollector | None = None


def register_collector(scheduler: Scheduler) -> bool:
    """Publish the dynbatch series on ``scheduler``'s ``/metrics``; ``False`` without prometheus_client."""
    global _collector
    try:
        import prometheus_client
    except ImportError:
        logger.debug("dynbatch: prometheus_client is not installed; no Prometheus series")
        return False
    if _collector is None:
        _collector = DynBatchMetricCollector(scheduler)
        prometheus_client.REGISTRY.register(_collector)
    else:
        _collector.server = scheduler
    return True


def unregister_collector(scheduler: Scheduler) -> None:
    """Stop publishing the dynbatch series of ``scheduler`` (its plugin closes)."""
    global _collector
    if _collector is not None and _collector.server is scheduler:
        import prometheus_client

        prometheus_client.REGISTRY.unregister(_collector)
        _collector = None
