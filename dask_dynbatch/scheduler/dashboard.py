"""The dynbatch page of the Dask dashboard: batch sizes, latency, queue, throughput and workers.

:meth:`DynBatchPlugin.start <dask_dynbatch.DynBatchPlugin.start>` calls
:func:`add_dashboard_pages`, which adds these Bokeh applications to the scheduler's *running*
dashboard (so ``client.register_plugin(DynBatchPlugin())`` at run time is enough, and so is a
scheduler started with the plugin)::

    http://<scheduler>:8787/dynbatch                              the whole page (menu: "Dynbatch")
    http://<scheduler>:8787/individual-dynbatch-batch-size        single plots, listed in
    http://<scheduler>:8787/individual-dynbatch-latency           individual-plots.json for
    http://<scheduler>:8787/individual-dynbatch-queue             JupyterLab's Dask extension
    http://<scheduler>:8787/individual-dynbatch-throughput
    http://<scheduler>:8787/individual-dynbatch-workers

No scheduler preload is needed. A scheduler that starts with the plugin gets the pages as well,
because they are added by the plugin's ``start``: ``Scheduler(plugins=[DynBatchPlugin()])``, or
``dask scheduler --preload dynbatch_preload.py`` with a preload file holding::

    import dask_dynbatch

    def dask_setup(scheduler):
        scheduler.add_plugin(dask_dynbatch.DynBatchPlugin())

The menu link ("Dynbatch") shows on pages opened after the plugin started; the Bokeh server's
existing sessions keep their menu. The scheduler's ``/metrics`` gets the dynbatch series the same
way (:mod:`dask_dynbatch.scheduler.metrics`).

A :class:`DynBatchRecorder` samples the plugin's state (``DynBatchPlugin.state()``) every second
on the scheduler, so a page opened late still shows the last minutes; it merges the state per
model with :func:`~dask_dynbatch.scheduler.summary.model_summaries`, as ``/metrics`` does, so the
page and the series show the same numbers. The components are
:class:`~distributed.dashboard.components.DashboardComponent` s like distributed's own, drawn with
its theme and page template; each browser session updates them twice a second.

Nothing here is imported unless a scheduler starts the plugin: bokeh stays off clients and
workers.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, ClassVar

from bokeh.core.properties import without_property_validation
from bokeh.layouts import column, row
from bokeh.models import (
    ColumnDataSource,
    DataRange1d,
    DataTable,
    Div,
    FactorRange,
    HoverTool,
    Select,
    TableColumn,
)
from bokeh.palettes import Category10_10
from bokeh.plotting import figure
from bokeh.transform import factor_mark
from dask.utils import format_bytes
from distributed.dashboard.components import DashboardComponent, add_periodic_callback
from distributed.utils import log_errors

from .._compat import (
    add_bokeh_application,
    bokeh_theme_and_template,
    dashboard_bokeh_app,
    dashboard_template_variables,
)
from .summary import model_summaries, worker_summary

if TYPE_CHECKING:
    from bokeh.document import Document
    from distributed import Scheduler

logger = logging.getLogger(__name__)

#: the page's path on the dashboard, and its name in the menu
PAGE = "dynbatch"
#: seconds between two samples of the plugin's state
SAMPLE_INTERVAL = 1.0
#: samples kept per model and per (model, worker): ten minutes
HISTORY_LENGTH = 600
#: served requests/s is measured over this many seconds of samples
THROUGHPUT_WINDOW = 5.0
#: milliseconds between two updates of an open page
UPDATE_INTERVAL_MS = 500
#: the controller's decisions and how the batch-size plot marks them
DECISIONS = ["grow", "shrink", "hold"]
DECISION_MARKERS = ["triangle", "inverted_triangle", "circle"]


# ------------------------------------------------------------------------------------------------
# Recording the plugin's state over time (one recorder per scheduler, shared by all pages)
# ------------------------------------------------------------------------------------------------
class DynBatchRecorder:
    """The plugin's state, sampled every second: per model counts and latencies, per (model,
    worker) the model server's batch size, memory cap and its controller's decision.

    Parameters
    ----------
    scheduler
        The scheduler; the plugin is looked up at every sample (``extensions["dynbatch"]``),
        so a plugin registered again is picked up.
    length
        Samples kept per series.
    """

    def __init__(self, scheduler: Scheduler, length: int = HISTORY_LENGTH):
        self._scheduler = weakref.ref(scheduler)
        self.length = length
        self.models: dict[str, deque[dict[str, Any]]] = {}
        self.controllers: dict[tuple[str, str], deque[dict[str, Any]]] = {}
        self.state: dict[str, Any] = {"models": {}, "workers": {}, "batchers": {}}
        self.summaries: dict[str, dict[str, Any]] = {}
        self._colors: dict[str, str] = {}

    def color(self, worker: str) -> str:
        """A stable color per worker address."""
        if worker not in self._colors:
            self._colors[worker] = Category10_10[len(self._colors) % len(Category10_10)]
        return self._colors[worker]

    @log_errors
    def sample(self, now: float | None = None) -> None:
        """Read the plugin's state once and append one point to every series."""
        scheduler = self._scheduler()
        plugin = scheduler.extensions.get("dynbatch") if scheduler is not None else None
        if plugin is None:
            return
        now = time.time() if now is None else now
        self.state = plugin.state()
        self.summaries = model_summaries(self.state)
        for name, summary in self.summaries.items():
            history = self.models.setdefault(name, deque(maxlen=self.length))
            history.append(
                {
                    "time": now,
                    "submitted": summary["submitted"],
                    "delivered": summary["delivered"],
                    "failed": summary["failed"],
                    "queued": summary["queued"],
                    "latency_p50": summary["latency_p50"],
                    "latency_p95": summary["latency_p95"],
                    "latency_target": summary["latency_target"],
                    "served_per_s": _rate(history, now, summary["delivered"]),
                }
            )
            for address, worker in summary["workers"].items():
                if worker["batch_size"] is None:
                    continue  # the worker has not loaded the model: no server, no batch size
                self.controllers.setdefault((name, address), deque(maxlen=self.length)).append(
                    {
                        "time": now,
                        "size": worker["batch_size"],
                        "cap": worker["memory_cap"],
                        "decision": worker["decision"],
                        "reason": worker["reason"],
                        "phase": worker["phase"],
                    }
                )

    def default_model(self) -> str | None:
        """The model with the most submitted requests (else the first registered)."""
        if not self.summaries:
            return None
        return max(self.summaries, key=lambda name: self.summaries[name]["submitted"])

    def worker_rows(self, model: str | None) -> list[dict[str, Any]]:
        """One row per worker of the cluster: its device, and its part in ``model``'s work
        (:func:`~dask_dynbatch.scheduler.summary.worker_summary`; empty for a worker that has
        nothing to do with the model)."""
        merged = self.summaries[model]["workers"] if model in self.summaries else {}
        rows = []
        for address, view in sorted(self.state.get("workers", {}).items()):
            worker = merged.get(address) or worker_summary(None, [])
            free, used_fraction = device_memory(view, worker["device"])
            rows.append(
                {
                    **worker,
                    "address": address,
                    "name": str(view.get("name", address)),
                    "device": view.get("device", "cpu"),
                    "free_bytes": free,
                    "memory_used": used_fraction,
                    "benchmark_score": view.get("benchmark"),
                    "compiled": compile_text(worker["compile"]),
                    "color": self.color(address),
                }
            )
        total = sum(r["samples"] for r in rows)
        for r in rows:
            r["share"] = r["samples"] / total if total else 0.0
        return rows


def compile_text(state: dict[str, Any] | None) -> str:
    """One cell for a worker's compile state: ready buckets and compile time, what compiles now,
    or the error that made it serve eagerly ("" for a model that does not compile)."""
    if not state:
        return ""
    if state.get("error"):
        return f"eager (compile failed: {state['error'][:80]})"
    ready = state.get("ready") or []
    text = ",".join(str(b) for b in ready) if ready else "none yet"
    busy = [str(b) for b, info in (state.get("buckets") or {}).items() if info.get("state") == "compiling"]
    if busy:
        text += f"; compiling {','.join(busy)}"
    seconds = state.get("compile_seconds")
    if seconds:
        text += f" ({seconds:.1f} s)"
    return text


def _rate(history: deque[dict[str, Any]], now: float, delivered: int) -> float:
    """Requests served per second over the last ``THROUGHPUT_WINDOW`` seconds of samples."""
    before = None
    for point in reversed(history):
        before = point
        if now - point["time"] >= THROUGHPUT_WINDOW:
            break
    if before is None or now <= before["time"]:
        return math.nan
    # counts go down when a batcher's client leaves: that is not negative throughput
    return max(0, delivered - before["delivered"]) / (now - before["time"])


def device_memory(view: dict[str, Any], device: str | None = None) -> tuple[int | None, float | None]:
    """Free memory of a worker's device (bytes) and the fraction in use, from the worker half's
    readings (``devices``, see :func:`dask_dynbatch.worker.telemetry.device_telemetry`).

    ``device``: the one the model runs on; without it, the worker's fullest device, the one that
    limits it. ``(None, None)`` before the worker has read any (it reads a device once a model
    loads there).
    """
    readings = {
        name: reading
        for name, reading in (view.get("devices") or {}).items()
        if reading.get("effective_free") is not None
    }
    if not readings:
        return None, None
    if device in readings:
        reading = readings[device]
    else:
        reading = max(readings.values(), key=lambda r: r.get("used_fraction") or 0.0)
    return int(reading["effective_free"]), reading.get("used_fraction")


_recorders: weakref.WeakKeyDictionary[Scheduler, DynBatchRecorder] = weakref.WeakKeyDictionary()


def stop_recording(scheduler: Scheduler) -> None:
    """Stop sampling ``scheduler``'s state (the plugin closes); open pages keep their last data."""
    callback = scheduler.periodic_callbacks.pop("dynbatch-dashboard", None)
    if callback is not None:
        callback.stop()
    _recorders.pop(scheduler, None)


def get_recorder(scheduler: Scheduler) -> DynBatchRecorder:
    """The scheduler's recorder, sampling once a second from the first call on."""
    recorder = _recorders.get(scheduler)
    if recorder is None:
        from tornado.ioloop import PeriodicCallback

        recorder = _recorders[scheduler] = DynBatchRecorder(scheduler)
        recorder.sample()
        callback = PeriodicCallback(recorder.sample, SAMPLE_INTERVAL * 1000)
        # the scheduler stops its periodic callbacks when it closes
        scheduler.periodic_callbacks["dynbatch-dashboard"] = callback
        callback.start()
    return recorder


# ------------------------------------------------------------------------------------------------
# Components
# ------------------------------------------------------------------------------------------------
def without_validation(method):
    """``update`` methods skip Bokeh's property validation and log their errors, as distributed's do."""
    return log_errors(without_property_validation(method))


class ModelChoice:
    """The model a page shows: picked in a ``Select``, else the busiest one."""

    def __init__(self, recorder: DynBatchRecorder):
        self.recorder = recorder
        self.select = Select(title="Model", options=[], value="", width=250, name="dynbatch-model")

    @property
    def model(self) -> str | None:
        chosen = self.select.value
        return chosen if chosen in self.recorder.summaries else self.recorder.default_model()

    def update(self) -> None:
        options = sorted(self.recorder.summaries)
        if self.select.options != options:
            self.select.options = options
        if self.select.value not in options and options:
            self.select.value = self.model or options[0]


def _time_figure(title: str, x_range: DataRange1d | None, name: str, **kwargs: Any):
    fig = figure(
        title=title,
        x_axis_type="datetime",
        x_range=x_range or DataRange1d(follow="end", follow_interval=120_000, range_padding=0),
        tools="reset,xpan,xwheel_zoom,save",
        name=name,
        **kwargs,
    )
    if kwargs.get("y_axis_type") != "log":
        fig.y_range.start = 0
    fig.yaxis.minor_tick_line_alpha = 0
    fig.xgrid.visible = False
    return fig


class BatchSizeTimeseries(DashboardComponent):
    """Per worker: its model server's batch size (solid), the memory cap (dashed) and the
    controller's decisions (triangle up: grow, down: shrink, circle: hold) over time."""

    @log_errors
    def __init__(self, scheduler: Scheduler, choice: ModelChoice | None = None, x_range=None, **kwargs: Any):
        self.recorder = get_recorder(scheduler)
        self.choice = choice or ModelChoice(self.recorder)
        self.lines = ColumnDataSource({"xs": [], "ys": [], "worker": [], "color": []}, name="dynbatch-batch-size-lines")
        self.caps = ColumnDataSource({"xs": [], "ys": [], "worker": [], "color": []}, name="dynbatch-memory-cap-lines")
        self.source = ColumnDataSource(
            {"time": [], "size": [], "worker": [], "decision": [], "reason": [], "phase": [], "color": []},
            name="dynbatch-batch-size",
        )
        # log scale: a memory cap of 100,000 samples and batches of 8 are both readable
        self.root = _time_figure("Batch size", x_range, "dynbatch_batch_size", y_axis_type="log", **kwargs)
        self.root.multi_line(xs="xs", ys="ys", color="color", line_width=2, source=self.lines, legend_field="worker")
        self.root.multi_line(xs="xs", ys="ys", color="color", line_dash="dashed", line_width=2, source=self.caps)
        markers = self.root.scatter(
            x="time",
            y="size",
            color="color",
            size=8,
            marker=factor_mark("decision", DECISION_MARKERS, DECISIONS),
            source=self.source,
        )
        self.root.add_tools(
            HoverTool(
                renderers=[markers],
                tooltips=[
                    ("worker", "@worker"),
                    ("batch size", "@size"),
                    ("decision", "@decision"),
                    ("why", "@reason"),
                    ("phase", "@phase"),
                ],
            )
        )
        self.root.yaxis.axis_label = "samples per batch (dashed: memory cap)"
        self.root.legend.location = "top_left"
        self.root.legend.label_text_font_size = "8pt"

    @without_validation
    def update(self) -> None:
        model = self.choice.model
        lines: dict[str, list] = {"xs": [], "ys": [], "worker": [], "color": []}
        caps: dict[str, list] = {"xs": [], "ys": [], "worker": [], "color": []}
        points: dict[str, list] = {k: [] for k in self.source.data}
        for (name, address), history in sorted(self.recorder.controllers.items()):
            if name != model:
                continue
            color, label = self.recorder.color(address), _short(address)
            times = [p["time"] * 1000 for p in history]
            lines["xs"].append(times)
            lines["ys"].append([_num(p["size"]) for p in history])
            caps["xs"].append(times)
            caps["ys"].append([_num(p["cap"] or None) for p in history])  # 0 (nothing fits) has no log
            for target in (lines, caps):
                target["worker"].append(label)
                target["color"].append(color)
            for p, t in zip(history, times):
                points["time"].append(t)
                points["size"].append(_num(p["size"]))
                points["worker"].append(label)
                points["decision"].append(str(p["decision"] or "hold"))
                points["reason"].append(str(p["reason"] or ""))
                points["phase"].append(str(p["phase"] or ""))
                points["color"].append(color)
        self.root.title.text = f"Batch size: {model}" if model else "Batch size (no model registered yet)"
        _set_data(self.lines, lines)
        _set_data(self.caps, caps)
        _set_data(self.source, points)


class ModelTimeseries(DashboardComponent):
    """Per model over time: latency p50/p95 against the target, queue depth, requests served/s."""

    @log_errors
    def __init__(self, scheduler: Scheduler, choice: ModelChoice | None = None, x_range=None, **kwargs: Any):
        self.recorder = get_recorder(scheduler)
        self.choice = choice or ModelChoice(self.recorder)
        self.source = ColumnDataSource(
            {"time": [], "p50_ms": [], "p95_ms": [], "target_ms": [], "queued": [], "served_per_s": []},
            name="dynbatch-model-timeseries",
        )
        x_range = x_range or DataRange1d(follow="end", follow_interval=120_000, range_padding=0)

        self.latency = _time_figure("Latency", x_range, "dynbatch_latency", **kwargs)
        self.latency.line(x="time", y="p50_ms", source=self.source, color="#1f77b4", line_width=2, legend_label="p50")
        self.latency.line(x="time", y="p95_ms", source=self.source, color="#ff7f0e", line_width=2, legend_label="p95")
        self.latency.line(
            x="time", y="target_ms", source=self.source, color="#d62728", line_dash="dashed", legend_label="target"
        )
        self.latency.yaxis.axis_label = "milliseconds"
        self.latency.legend.location = "top_left"

        self.queue = _time_figure("Queue depth", x_range, "dynbatch_queue", **kwargs)
        self.queue.varea(x="time", y1=0, y2="queued", source=self.source, fill_alpha=0.4)
        self.queue.line(x="time", y="queued", source=self.source, line_width=2)
        self.queue.yaxis.axis_label = "requests waiting"

        self.throughput = _time_figure("Throughput", x_range, "dynbatch_throughput", **kwargs)
        self.throughput.line(x="time", y="served_per_s", source=self.source, line_width=2)
        self.throughput.yaxis.axis_label = "requests served / s"

        self.root = self.latency

    @without_validation
    def update(self) -> None:
        model = self.choice.model
        history = self.recorder.models.get(model, ()) if model else ()
        _set_data(
            self.source,
            {
                "time": [p["time"] * 1000 for p in history],
                "p50_ms": [_ms(p["latency_p50"]) for p in history],
                "p95_ms": [_ms(p["latency_p95"]) for p in history],
                "target_ms": [_ms(p["latency_target"]) for p in history],
                "queued": [p["queued"] for p in history],
                "served_per_s": [p["served_per_s"] for p in history],
            },
        )
        suffix = f": {model}" if model else ""
        self.latency.title.text = f"Latency p50 / p95 vs target{suffix}"
        self.queue.title.text = f"Queue depth{suffix}"
        self.throughput.title.text = f"Throughput{suffix}"


class DynBatchWorkers(DashboardComponent):
    """Per worker: device memory, benchmark score, the model server's state and counts (version,
    batch size, batches shared by clients, ...), the clients' in-flight rows and workload figure,
    and the worker's share of the model's samples."""

    COLUMNS: ClassVar[dict[str, str]] = {
        "name": "worker",
        "device": "device",
        "free_memory": "free memory",
        "memory_used": "memory used",
        "benchmark_score": "benchmark score",
        "version": "version",
        "throughput": "samples/s",
        "workload": "workload (s)",
        "inflight_samples": "in flight",
        "batch_size": "batch size",
        "memory_cap": "memory cap",
        "batches": "batches",
        "shared_batches": "shared batches",
        "samples": "samples",
        "compiled": "compiled buckets",
        "share_text": "share",
    }

    @log_errors
    def __init__(self, scheduler: Scheduler, choice: ModelChoice | None = None, **kwargs: Any):
        self.recorder = get_recorder(scheduler)
        self.choice = choice or ModelChoice(self.recorder)
        self.source = ColumnDataSource(
            {**{k: [] for k in self.COLUMNS}, "address": [], "share": [], "color": []}, name="dynbatch-workers"
        )
        table_kwargs = {k: v for k, v in kwargs.items() if k in ("width", "sizing_mode")}
        self.table = DataTable(
            source=self.source,
            columns=[TableColumn(field=k, title=v, sortable=True) for k, v in self.COLUMNS.items()],
            index_position=None,
            height=_table_height(0),
            name="dynbatch_workers_table",
            **table_kwargs,
        )
        self.share = figure(
            title="Share of work",
            y_range=FactorRange(),
            x_range=DataRange1d(start=0, end=1),
            tools="",
            toolbar_location=None,
            name="dynbatch_share",
            **kwargs,
        )
        self.share.hbar(y="name", right="share", height=0.8, color="color", source=self.source)
        self.share.xaxis.axis_label = "fraction of the model's samples"
        self.share.ygrid.visible = False
        self.root = column(self.table, self.share, sizing_mode=kwargs.get("sizing_mode", "stretch_width"))
        self._fit_height = kwargs.get("sizing_mode") != "stretch_both"

    @without_validation
    def update(self) -> None:
        model = self.choice.model
        rows = self.recorder.worker_rows(model)
        data = {
            "address": [r["address"] for r in rows],
            "name": [_short(r["address"]) for r in rows],  # as in the batch-size legend
            "device": [r["device"] for r in rows],
            "free_memory": [format_bytes(r["free_bytes"]) if r["free_bytes"] is not None else "" for r in rows],
            "memory_used": [_percent(r["memory_used"]) for r in rows],
            "benchmark_score": [_fmt(r["benchmark_score"], "{:,.1f}") for r in rows],
            "version": [_fmt(r["version"], "{}") for r in rows],
            "throughput": [_fmt(r["throughput"], "{:,.1f}") for r in rows],
            "workload": [_fmt(r["workload"], "{:.4f}") for r in rows],
            "inflight_samples": [r["inflight_samples"] for r in rows],
            "batch_size": [_fmt(r["batch_size"], "{}") for r in rows],
            "memory_cap": [_fmt(r["memory_cap"], "{}") for r in rows],
            "batches": [r["batches"] for r in rows],
            "shared_batches": [r["shared_batches"] for r in rows],
            "samples": [r["samples"] for r in rows],
            "compiled": [r["compiled"] for r in rows],
            "share_text": [_percent(r["share"]) for r in rows],
            "share": [r["share"] for r in rows],
            "color": [r["color"] for r in rows],
        }
        if list(self.share.y_range.factors) != data["name"]:
            self.share.y_range.factors = data["name"]
        if self._fit_height and self.table.height != _table_height(len(rows)):
            # as tall as the rows need: a table of 2 workers is not a page of blank space
            self.table.height = _table_height(len(rows))
            self.share.height = min(600, 80 + 30 * max(1, len(rows)))
        self.share.title.text = f"Share of work: {model}" if model else "Share of work"
        _set_data(self.source, data)


class Summary(DashboardComponent):
    """One line of totals for the chosen model."""

    def __init__(self, scheduler: Scheduler, choice: ModelChoice | None = None, **kwargs: Any):
        self.recorder = get_recorder(scheduler)
        self.choice = choice or ModelChoice(self.recorder)
        self.root = Div(text="", name="dynbatch_summary", **kwargs)

    @without_validation
    def update(self) -> None:
        model = self.choice.model
        summary = self.recorder.summaries.get(model) if model else None
        if summary is None:
            text = (
                "<b>No model yet.</b> Create a <code>dask_dynbatch.Batcher</code> on this cluster; "
                "its state shows here within a second or two."
            )
        else:
            version = f" v{summary['version']}" if summary["version"] is not None else ""
            # results that came in a part of their shipment's reply (padded or weighed samples)
            early = f" ({summary['answered_early']:,} answered early)" if summary["answered_early"] else ""
            text = (
                f"<b>{model}</b>{version}: {summary['batchers']} batcher(s) &middot; "
                f"submitted {summary['submitted']:,} &middot; "
                f"served {summary['delivered']:,}{early} &middot; failed {summary['failed']:,} &middot; "
                f"timed out {summary['timed_out']:,} ({summary['timed_out_running']:,} while running) &middot; "
                f"stuck batches {summary['stuck_batches']:,} &middot; quarantined {summary['quarantined']:,} "
                f"&middot; queued {summary['queued']:,} &middot; "
                f"latency p50 {_fmt(_ms(summary['latency_p50']), '{:.1f}')} ms, "
                f"p95 {_fmt(_ms(summary['latency_p95']), '{:.1f}')} ms "
                f"(target {_fmt(_ms(summary['latency_target']), '{:.0f}')} ms)"
            )
        if self.root.text != text:
            self.root.text = text


# ------------------------------------------------------------------------------------------------
# Documents
# ------------------------------------------------------------------------------------------------
@log_errors
def dynbatch_doc(scheduler: Scheduler, extra: dict[str, Any], doc: Document) -> None:
    """The whole page: summary, batch size, latency, queue, throughput, workers."""
    recorder = get_recorder(scheduler)
    choice = ModelChoice(recorder)
    choice.update()
    x_range = DataRange1d(follow="end", follow_interval=120_000, range_padding=0)
    summary = Summary(scheduler, choice, sizing_mode="stretch_width")
    batch_size = BatchSizeTimeseries(scheduler, choice, x_range=x_range, height=320, sizing_mode="stretch_width")
    timeseries = ModelTimeseries(scheduler, choice, x_range=x_range, height=260, sizing_mode="stretch_width")
    workers = DynBatchWorkers(scheduler, choice, height=110, sizing_mode="stretch_width")
    components = [summary, batch_size, timeseries, workers]

    def refresh() -> None:
        choice.update()
        for component in components:
            component.update()

    refresh()
    choice.select.on_change("value", lambda attr, old, new: refresh())
    for component in components:
        add_periodic_callback(doc, component, UPDATE_INTERVAL_MS)
    add_periodic_callback(doc, choice, UPDATE_INTERVAL_MS)
    doc.title = "Dask: Dynamic batching"
    doc.add_root(
        column(
            row(choice.select, summary.root, sizing_mode="stretch_width"),
            row(batch_size.root, timeseries.latency, sizing_mode="stretch_width"),
            row(timeseries.queue, timeseries.throughput, sizing_mode="stretch_width"),
            row(workers.table, sizing_mode="stretch_width"),
            row(workers.share, sizing_mode="stretch_width"),
            sizing_mode="stretch_width",
        )
    )
    theme, template = bokeh_theme_and_template()
    doc.template = template
    doc.template_variables.update(extra)
    doc.theme = theme


@log_errors
def individual_dynbatch_doc(cls, scheduler: Scheduler, extra: dict[str, Any], doc: Document, fig_attr: str = "root"):
    """One component alone (for JupyterLab's Dask extension); it follows the busiest model."""
    component = cls(scheduler, sizing_mode="stretch_both")
    component.update()
    add_periodic_callback(doc, component, UPDATE_INTERVAL_MS)
    doc.add_root(getattr(component, fig_attr))
    doc.title = "Dask: Dynamic batching"
    doc.theme = bokeh_theme_and_template()[0]


def _individual(cls, fig_attr="root"):
    return functools.partial(individual_dynbatch_doc, cls, fig_attr=fig_attr)


#: path -> (document function taking (scheduler, extra, doc), menu name)
APPLICATIONS = {
    f"/{PAGE}": (dynbatch_doc, None),
    "/individual-dynbatch-batch-size": (_individual(BatchSizeTimeseries), "Dynbatch Batch Size"),
    "/individual-dynbatch-latency": (_individual(ModelTimeseries, "latency"), "Dynbatch Latency"),
    "/individual-dynbatch-queue": (_individual(ModelTimeseries, "queue"), "Dynbatch Queue"),
    "/individual-dynbatch-throughput": (_individual(ModelTimeseries, "throughput"), "Dynbatch Throughput"),
    "/individual-dynbatch-workers": (_individual(DynBatchWorkers), "Dynbatch Workers"),
}


# ------------------------------------------------------------------------------------------------
# Adding the pages to a running dashboard
# ------------------------------------------------------------------------------------------------
def add_dashboard_pages(scheduler: Scheduler) -> bool:
    """Add the dynbatch pages to ``scheduler``'s running dashboard and to its menus.

    Idempotent. Returns ``False`` (and does nothing) when the scheduler has no Bokeh dashboard.
    """
    try:
        bokeh_app = dashboard_bokeh_app(scheduler)
        if bokeh_app is None:
            logger.debug("dynbatch: the scheduler has no Bokeh dashboard; no dynbatch page")
            return False
        get_recorder(scheduler)
        extra = _template_variables(scheduler, bokeh_app)
        for path, (make_doc, _) in APPLICATIONS.items():
            if path not in bokeh_app.applications:
                add_bokeh_application(bokeh_app, path, functools.partial(make_doc, scheduler, extra))
        return True
    except Exception:  # the page is a convenience: never fail the plugin's start for it
        logger.exception("dynbatch: could not add the dashboard page")
        return False


def _template_variables(scheduler: Scheduler, bokeh_app) -> dict[str, Any]:
    """The dashboard's template variables, with our page in its menu and "More..." list.

    distributed memoizes one dict per scheduler and the running pages hold its ``pages`` and
    ``plots`` lists, so adding to these lists shows the links on every page opened from now on.
    """
    variables = dashboard_template_variables(scheduler)
    pages = variables["pages"]
    if PAGE not in pages:
        pages.insert(pages.index("info") if "info" in pages else len(pages), PAGE)
    plots = variables["plots"]
    for path, (_, name) in APPLICATIONS.items():
        url = path.strip("/")
        if name is not None and all(p["url"] != url for p in plots):
            plots.append({"url": url, "name": name})
    plots.sort(key=lambda p: p["name"])
    prefix = bokeh_app.prefix.strip("/")
    return {**variables, "prefix": f"/{prefix}/" if prefix else "/"}


# ------------------------------------------------------------------------------------------------
# Formatting
# ------------------------------------------------------------------------------------------------
def _set_data(source: ColumnDataSource, data: dict[str, list]) -> None:
    """Replace a source's data only when it changed: an unchanged update would still travel to
    every open browser."""
    if source.data != data:
        source.data.update(data)


def _table_height(rows: int) -> int:
    return min(600, 30 + 26 * max(1, rows))


def _short(address: str) -> str:
    return address.split("://", 1)[-1]


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _ms(seconds: float | None) -> float:
    return math.nan if seconds is None else seconds * 1000.0


def _percent(fraction: float | None) -> str:
    return "" if fraction is None else f"{100 * fraction:.0f}%"


def _fmt(value: Any, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return pattern.format(value)
