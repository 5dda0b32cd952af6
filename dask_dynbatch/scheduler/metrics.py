"""Prometheus series of dask-dynbatch on the scheduler's existing ``/metrics`` endpoint.

:class:`DynBatchMetricCollector` turns the scheduler plugin's view (the Batchers' reports and the
workers' heartbeats, merged by :func:`~dask_dynbatch.scheduler.summary.model_summaries` as for the
dashboard page) into ``dask_dynbatch_*`` series. :func:`register_collector`, called by
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
``dask_dynbatch_requests_timed_out_running_total`` counter ``model``: of ``timed_out``, requests
                                                      whose deadline passed while they ran
``dask_dynbatch_requests_quarantined_total`` counter  ``model``: of ``failed``, requests that made
                                                      their worker die or hang alone in a batch
``dask_dynbatch_requests_isolated_total``   counter   ``model``: requests re-sent in groups of
                                                      suspects after a worker died or hung
``dask_dynbatch_requests_answered_early_total`` counter ``model``: of ``served``, requests
                                                      whose result came in a part of their
                                                      shipment's reply (replies in parts)
``dask_dynbatch_stuck_batches_total``       counter   ``model``: device batches the watchdog
                                                      declared stuck (each restarted its worker)
``dask_dynbatch_queue_depth``               gauge     ``model``: requests waiting in the batchers
``dask_dynbatch_latency_seconds``           gauge     ``model``, ``quantile`` (0.5, 0.95, 0.99):
                                                      latency requests experienced (worst
                                                      batcher)
``dask_dynbatch_latency_target_seconds``    gauge     ``model``
``dask_dynbatch_batchers``                  gauge     ``model``: batchers attached
``dask_dynbatch_model_version``             gauge     ``model``: version in the model registry
                                                      (replacing a model raises it)
``dask_dynbatch_batch_size``                gauge     ``model``, ``worker``: rows the worker's
                                                      model server puts in a device batch now
                                                      (its controller's size)
``dask_dynbatch_memory_cap``                gauge     ``model``, ``worker``: largest batch that
                                                      fits in the worker's free memory (if known)
``dask_dynbatch_inflight_samples``          gauge     ``model``, ``worker``: rows the batchers
                                                      sent there and have no result for yet
``dask_dynbatch_worker_batches_total``      counter   ``model``, ``worker``: device batches the
                                                      model server ran
``dask_dynbatch_worker_samples_total``      counter   ``model``, ``worker``: rows it ran
``dask_dynbatch_shared_batches_total``      counter   ``model``, ``worker``: device batches with
                                                      rows of more than one client
``dask_dynbatch_worker_throughput``         gauge     ``model``, ``worker``: samples/s over the
                                                      model server's recent batches
``dask_dynbatch_device_free_bytes``         gauge     ``worker``, ``device``: memory a new batch
                                                      can get now (the worker half's reading)
``dask_dynbatch_benchmark_score``           gauge     ``worker``: reference-model samples/s
=========================================== ========= ===========================================

Request counts, queue depth and in-flight rows come from the batchers (clients) and add up over
every batcher of a model; counts go back down when a client disconnects (Prometheus treats that as
a counter reset). Batch size, memory cap, the ``worker_*`` series and shared batches come from the
model server on the worker (its newest loaded version of the model, through the heartbeat): they
survive clients, and restart from zero when a new version of the model is loaded there.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from distributed.http.prometheus import PrometheusCollector

from .summary import OUTCOMES, QUANTILES, model_summaries

if TYPE_CHECKING:
    from distributed import Scheduler

logger = logging.getLogger(__name__)


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

        def gauge(name: str, documentation: str, labels: list[str], **kwargs: Any) -> GaugeMetricFamily:
            return GaugeMetricFamily(self.build_name(name), documentation, labels=labels, **kwargs)

        def counter(name: str, documentation: str, labels: list[str]) -> CounterMetricFamily:
            return CounterMetricFamily(self.build_name(name), documentation, labels=labels)

        submitted = counter("requests_submitted", "Requests submitted to the batchers of a model", ["model"])
        requests = counter(
            "requests", "Requests finished, by outcome (served, failed, cancelled, timed_out)", ["model", "outcome"]
        )
        queue = gauge("queue_depth", "Requests waiting in the batchers' queues", ["model"])
        latency = gauge(
            "latency", "Latency of requests from submit to result (worst batcher of the model)",
            ["model", "quantile"], unit="seconds",
        )
        target = gauge("latency_target", "Latency target of a model", ["model"], unit="seconds")
        batchers = gauge("batchers", "Batchers attached to a model", ["model"])
        version = gauge("model_version", "Version of a model in the registry", ["model"])
        timed_out_running = counter("requests_timed_out_running",
                                    "Requests whose deadline passed while their shipment ran", ["model"])
        quarantined = counter("requests_quarantined",
                              "Requests that failed for making their worker die or hang alone in a batch", ["model"])
        isolated = counter("requests_isolated", "Requests re-sent in groups of suspects after a worker died or hung",
                           ["model"])
        answered_early = counter("requests_answered_early",
                                 "Served requests whose result came before the last device batch of their shipment",
                                 ["model"])
        stuck = counter("stuck_batches", "Device batches declared stuck by the watchdog (each restarted its worker)",
                        ["model"])
        for name, summary in models.items():
            timed_out_running.add_metric([name], summary["timed_out_running"])
            quarantined.add_metric([name], summary["quarantined"])
            isolated.add_metric([name], summary["isolated"])
            answered_early.add_metric([name], summary["answered_early"])
            stuck.add_metric([name], summary["stuck_batches"])
            submitted.add_metric([name], summary["submitted"])
            for count, outcome in OUTCOMES.items():
                requests.add_metric([name, outcome], summary[count])
            queue.add_metric([name], summary["queued"])
            for key, quantile in QUANTILES.items():
                if summary[key] is not None:
                    latency.add_metric([name, quantile], summary[key])
            if summary["latency_target"] is not None:
                target.add_metric([name], summary["latency_target"])
            batchers.add_metric([name], summary["batchers"])
            if summary["version"] is not None:
                version.add_metric([name], summary["version"])
        yield from (submitted, requests, queue, latency, target, batchers, version, timed_out_running, quarantined,
                    isolated, answered_early, stuck)

        per_worker = ["model", "worker"]
        batch_size = gauge("batch_size", "Rows the worker's model server puts in a device batch now", per_worker)
        memory_cap = gauge("memory_cap", "Largest batch that fits in the worker's free memory now", per_worker)
        inflight = gauge("inflight_samples", "Rows the batchers sent to a worker and have no result for", per_worker)
        worker_batches = counter("worker_batches", "Device batches a worker's model server ran", per_worker)
        worker_samples = counter("worker_samples", "Rows a worker's model server ran", per_worker)
        shared = counter("shared_batches", "Device batches with rows of more than one client", per_worker)
        worker_throughput = gauge(
            "worker_throughput", "Samples per second over the recent batches of a worker's model server", per_worker
        )
        for name, summary in models.items():
            for address, worker in summary["workers"].items():
                labels = [name, address]
                inflight.add_metric(labels, worker["inflight_samples"])
                if worker["version"] is None:
                    continue  # the worker has not loaded the model: it has no server to count
                if worker["batch_size"] is not None:
                    batch_size.add_metric(labels, worker["batch_size"])
                if worker["memory_cap"] is not None:
                    memory_cap.add_metric(labels, worker["memory_cap"])
                worker_batches.add_metric(labels, worker["batches"])
                worker_samples.add_metric(labels, worker["samples"])
                shared.add_metric(labels, worker["shared_batches"])
                if worker["throughput"] is not None:
                    worker_throughput.add_metric(labels, worker["throughput"])
        yield from (batch_size, memory_cap, inflight, worker_batches, worker_samples, shared, worker_throughput)

        free_bytes = gauge(
            "device_free_bytes", "Device memory a new batch can get now (free plus our allocator's unused cache)",
            ["worker", "device"],
        )
        score = gauge("benchmark_score", "Reference-model samples/s of the worker's device", ["worker"])
        for address, view in state.get("workers", {}).items():
            for device, reading in (view.get("devices") or {}).items():
                if reading.get("effective_free") is not None:
                    free_bytes.add_metric([address, device], reading["effective_free"])
            if view.get("benchmark") is not None:
                score.add_metric([address], view["benchmark"])
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
