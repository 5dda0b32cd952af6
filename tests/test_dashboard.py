"""The dashboard page, its menu entries and the Prometheus series, on real in-process clusters.

The browser test drives Debian's ``chromium`` through the DevTools protocol: it opens the page
while requests flow, waits until BokehJS holds rows in the page's data sources and has drawn the
plots, and saves a screenshot. It is skipped when chromium is not installed (ci/test.sh installs
it).
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from distributed.utils_test import gen_cluster
from tornado.httpclient import AsyncHTTPClient, HTTPClientError
from tornado.websocket import websocket_connect

import dask_dynbatch as ddb
from dask_dynbatch.dashboard import (
    APPLICATIONS,
    BatchSizeTimeseries,
    DynBatchWorkers,
    ModelTimeseries,
    get_recorder,
)
from dask_dynbatch.examples import build_affine, build_identity

DASHBOARD = {"dashboard": True, "dashboard_address": "127.0.0.1:0"}
CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)


async def until(condition, what: str, deadline_s: float = 60.0, interval: float = 0.05):
    """Poll ``condition`` (sync or async) until it is truthy; fail with ``what`` after the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting: {what}")
        await asyncio.sleep(interval)


async def fetch(s, path: str) -> str:
    response = await AsyncHTTPClient().fetch(f"http://127.0.0.1:{s.http_server.port}{path}")
    return response.body.decode()


def reported(s, batcher, n: int) -> bool:
    """The batcher's report at the scheduler says that ``n`` requests were delivered."""
    report = s.extensions["dynbatch"].batchers.get(batcher.id) or {}
    return report.get("delivered") == n


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)], scheduler_kwargs=DASHBOARD)
async def test_page_is_added_to_the_running_dashboard_and_its_menus(c, s, a):
    with pytest.raises(HTTPClientError) as missing:
        await fetch(s, "/dynbatch")
    assert missing.value.code == 404

    await c.register_plugin(ddb.DynBatchPlugin())  # at run time: the dashboard is already serving

    page = await fetch(s, "/dynbatch")
    assert "Bokeh" in page and 'href="dynbatch"' in page  # distributed's page template and menu
    plots = json.loads(await fetch(s, "/individual-plots.json"))  # what JupyterLab's extension lists
    for path in APPLICATIONS:
        if path.startswith("/individual-"):
            assert path in plots.values()
            assert "<html" in (await fetch(s, path)).lower()
    status = await fetch(s, "/status")  # a page opened now has the link in its menu
    assert 'href="dynbatch"' in status
    assert 'href="individual-dynbatch-batch-size"' in status  # "More..." list

    await c.register_plugin(ddb.DynBatchPlugin())  # registering again adds nothing twice
    assert (await fetch(s, "/status")).count('href="dynbatch"') == 1


@gen_cluster(
    client=True, nthreads=[("127.0.0.1", 1)], scheduler_kwargs={**DASHBOARD, "plugins": [ddb.DynBatchPlugin()]}
)
async def test_page_exists_when_the_scheduler_starts_with_the_plugin(c, s, a):
    # what a scheduler preload or Scheduler(plugins=[...]) does: the plugin starts with the scheduler
    assert 'href="dynbatch"' in await fetch(s, "/dynbatch")
    assert "/individual-dynbatch-workers" in json.loads(await fetch(s, "/individual-plots.json")).values()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1), ("127.0.0.1", 1)], scheduler_kwargs=DASHBOARD)
async def test_components_show_the_work_done(c, s, a, b):
    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec("affine", load=build_affine, latency_target="50ms"))
    await asyncio.gather(*batcher.map([np.full(2, float(i)) for i in range(300)]))
    await until(lambda: reported(s, batcher, 300), "the batcher's report reached the scheduler")

    def workers_ran() -> int:
        return sum(
            ((ws.metrics.get("dynbatch") or {}).get("models") or {}).get("affine", {}).get("samples", 0)
            for ws in s.workers.values()
        )

    await until(lambda: workers_ran() == 300, "the workers' heartbeats count 300 samples")

    recorder = get_recorder(s)
    recorder.sample()
    assert recorder.default_model() == "affine"
    used = sorted(batcher.stats()["workers"])

    sizes = BatchSizeTimeseries(s)
    sizes.update()
    assert sorted(f"tcp://{w}" for w in sizes.lines.data["worker"]) == used  # one line per worker
    assert all(len(ys) >= 1 and all(y >= 1 for y in ys) for ys in sizes.lines.data["ys"])
    assert set(sizes.source.data["decision"]) <= {"grow", "shrink", "hold"}
    assert "affine" in sizes.root.title.text

    series = ModelTimeseries(s)
    series.update()
    assert len(series.source.data["time"]) >= 1
    assert series.source.data["target_ms"][-1] == pytest.approx(50.0)
    assert series.source.data["queued"][-1] == 0
    assert series.source.data["p95_ms"][-1] > 0

    workers = DynBatchWorkers(s)
    workers.update()
    table = workers.source.data
    assert sorted(table["address"]) == sorted(s.workers)
    assert sum(table["samples"]) == 300
    assert sum(table["share"]) == pytest.approx(1.0)
    assert all(free for free in table["free_memory"])  # host memory left under the worker's limit
    batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1), ("127.0.0.1", 1)], scheduler_kwargs=DASHBOARD)
async def test_metrics_endpoint_counts_the_work_done(c, s, a, b):
    parser = pytest.importorskip("prometheus_client.parser", reason="prometheus_client is not installed")
    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec("identity", load=build_identity, max_batch_size=16))
    n = 250
    await asyncio.gather(*batcher.map([np.full(3, float(i)) for i in range(n)]))
    with pytest.raises(ddb.InputSignatureError):
        batcher.submit(np.zeros(4))  # rejected at submit: counts as nothing
    await until(lambda: reported(s, batcher, n), "the batcher's report reached the scheduler")

    async def scrape() -> dict[tuple, float]:
        text = await fetch(s, "/metrics")
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in parser.text_string_to_metric_families(text)
            if family.name.startswith("dask_dynbatch")
            for sample in family.samples
        }

    def worker_samples(metrics) -> float:
        return sum(v for (name, _), v in metrics.items() if name == "dask_dynbatch_worker_samples_total")

    metrics = await until(
        lambda: _when(scrape(), lambda m: worker_samples(m) == n), "the workers' heartbeats count every sample"
    )
    model = (("model", "identity"),)
    assert metrics[("dask_dynbatch_requests_submitted_total", model)] == n
    assert metrics[("dask_dynbatch_requests_total", (("model", "identity"), ("outcome", "served")))] == n
    assert metrics[("dask_dynbatch_requests_total", (("model", "identity"), ("outcome", "failed")))] == 0
    assert metrics[("dask_dynbatch_queue_depth", model)] == 0
    assert metrics[("dask_dynbatch_batchers", model)] == 1
    assert metrics[("dask_dynbatch_latency_seconds", (("model", "identity"), ("quantile", "0.95")))] > 0
    batches = sum(v for (name, _), v in metrics.items() if name == "dask_dynbatch_worker_batches_total")
    assert n / 16 <= batches <= n
    ran = {
        dict(labels)["worker"] for (name, labels), v in metrics.items() if name.endswith("worker_samples_total") and v
    }
    free = {
        dict(labels)["worker"] for (name, labels), v in metrics.items() if name.endswith("device_free_bytes") and v > 0
    }
    assert ran and ran <= free  # every worker that ran the model reports its device's free memory
    sizes = {dict(labels)["worker"]: v for (name, labels), v in metrics.items() if name == "dask_dynbatch_batch_size"}
    assert set(sizes) == set(batcher.stats()["workers"]) and all(1 <= v <= 16 for v in sizes.values())
    batcher.close()


async def _when(coroutine, predicate):
    value = await coroutine
    return value if predicate(value) else None


# ------------------------------------------------------------------------------------------------
# The page in a real browser
# ------------------------------------------------------------------------------------------------
class DevTools:
    """A headless chromium and one page, driven over the DevTools protocol (tornado websocket)."""

    def __init__(self, profile_dir):
        self.profile_dir = profile_dir
        self.process: subprocess.Popen | None = None
        self.ws = None
        self._id = 0
        self.exceptions: list[str] = []

    async def __aenter__(self) -> DevTools:
        # Popen, not asyncio's subprocesses: those start a watcher thread that gen_cluster counts as leaked
        self.process = subprocess.Popen(  # noqa: ASYNC220
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",  # CI runs as root
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
                f"--user-data-dir={self.profile_dir}",
                "--window-size=1600,1500",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = Path(self.profile_dir) / "DevToolsActivePort"  # chromium writes its port here
        await until(lambda: port_file.exists() and port_file.read_text().count("\n") >= 1, "chromium started")
        port = int(port_file.read_text().split()[0])

        async def page_target():
            targets = json.loads((await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/json/list")).body)
            return next((t for t in targets if t["type"] == "page"), None)

        target = await until(page_target, "chromium has a page")
        self.ws = await websocket_connect(target["webSocketDebuggerUrl"], max_message_size=256 << 20)
        await self.call("Runtime.enable")
        await self.call("Page.enable")
        return self

    async def __aexit__(self, *exc) -> None:
        if self.ws is not None:
            self.ws.close()
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    async def call(self, method: str, **params):
        self._id += 1
        call_id = self._id
        await self.ws.write_message(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = await self.ws.read_message()
            if message is None:
                raise ConnectionError("chromium closed the DevTools connection")
            message = json.loads(message)
            if message.get("method") == "Runtime.exceptionThrown":
                self.exceptions.append(message["params"]["exceptionDetails"].get("text", ""))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"javascript failed: {result['exceptionDetails']}")
        return result["result"].get("value")


#: what BokehJS holds in the page: rows per data source, and whether each plot's view has drawn
PAGE_STATE_JS = """
(() => {
  if (!window.Bokeh || !Bokeh.documents.length) return null;
  const doc = Bokeh.documents[0];
  const rows = (name) => { const m = doc.get_model_by_name(name); return m == null ? -1 : m.get_length(); };
  const drawn = (name) => {
    const m = doc.get_model_by_name(name);
    const view = m == null ? null : Bokeh.index.find_one(m);
    return view != null && view.has_finished();
  };
  const plots = ["dynbatch_batch_size", "dynbatch_latency", "dynbatch_queue", "dynbatch_throughput",
                 "dynbatch_share", "dynbatch_workers_table"];
  const lines = doc.get_model_by_name("dynbatch-batch-size-lines");
  return {
    menu_link: document.querySelector('a[href="dynbatch"]') != null,
    batch_size_lines: rows("dynbatch-batch-size-lines"),
    batch_size_points: lines == null ? 0 : lines.data.ys.reduce((n, ys) => n + ys.length, 0),
    decisions: rows("dynbatch-batch-size"),
    model_rows: rows("dynbatch-model-timeseries"),
    worker_rows: rows("dynbatch-workers"),
    drawn: Object.fromEntries(plots.map((p) => [p, drawn(p)])),
    summary: (doc.get_model_by_name("dynbatch_summary") || {text: ""}).text,
  };
})()
"""


@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); ci/test.sh installs it"
)
@gen_cluster(client=True, nthreads=[("127.0.0.1", 1), ("127.0.0.1", 1)], scheduler_kwargs=DASHBOARD, timeout=180)
async def test_page_renders_with_data_in_chromium(c, s, a, b, tmp_path):
    await c.register_plugin(ddb.DynBatchPlugin())
    batcher = await ddb.Batcher(c, ddb.ModelSpec("affine", load=build_affine, latency_target="20ms"))
    served = 0
    flowing = True

    async def traffic():  # requests keep flowing while the browser looks
        nonlocal served
        while flowing:
            await asyncio.gather(*batcher.map([np.full(8, float(i)) for i in range(200)]))
            served += 200

    traffic_task = asyncio.ensure_future(traffic())
    try:

        def delivered() -> int:
            return (s.extensions["dynbatch"].batchers.get(batcher.id) or {}).get("delivered", 0)

        await until(lambda: delivered() >= 400, "requests were served and reported")
        async with DevTools(str(tmp_path / "chromium-profile")) as browser:
            await browser.call("Page.navigate", url=f"http://127.0.0.1:{s.http_server.port}/dynbatch")

            async def page_state():
                state = await browser.evaluate(PAGE_STATE_JS)
                ready = (
                    state
                    and all(state["drawn"].values())
                    and state["batch_size_lines"] == 2
                    and state["batch_size_points"] >= 4  # at least two samples per worker: a line
                    and state["model_rows"] >= 2
                    and state["worker_rows"] == 2
                )
                return state if ready else None

            state = await until(page_state, "the page shows both workers' batch sizes and the model's series", 90)
            # let the periodic updates draw once more before the picture
            await asyncio.sleep(1.0)
            shot = await browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            (tmp_path / "dynbatch-page.png").write_bytes(base64.b64decode(shot["data"]))
            assert not browser.exceptions, browser.exceptions
    finally:
        flowing = False
        await traffic_task
        batcher.close()

    assert state["menu_link"]  # the dashboard's menu, rendered by distributed's template
    assert state["decisions"] >= 4  # decision markers drawn (the browser's two sources may be one update apart)
    assert "affine" in state["summary"] and "served" in state["summary"]
    assert (tmp_path / "dynbatch-page.png").stat().st_size > 10_000
    # the server side of the same page: a session that Chromium opened, in which every batch-size
    # point carries its controller decision (both sources are set in one update there)
    bokeh_app = next(app for app in s.http_application.applications if "/dynbatch" in getattr(app, "applications", {}))
    sessions = bokeh_app.get_sessions("/dynbatch")
    assert sessions
    doc = sessions[0].document
    points = doc.get_model_by_name("dynbatch-batch-size").data
    lines = doc.get_model_by_name("dynbatch-batch-size-lines").data
    assert len(points["decision"]) == sum(len(ys) for ys in lines["ys"]) >= 4
