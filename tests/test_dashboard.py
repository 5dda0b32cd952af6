"""The dashboard page, its menu entries and the Prometheus series, on real in-process clusters.

Per (model, worker), what the page and ``/metrics`` show comes from the worker's model server (its
heartbeat); request counts and latency come from the model's Batchers, added up over clients.

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
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from distributed import Client
from distributed.utils_test import gen_cluster
from tornado.httpclient import AsyncHTTPClient, HTTPClientError
from tornado.websocket import websocket_connect

import dask_dynbatch as ddb
from dask_dynbatch.examples import build_affine, build_identity
from dask_dynbatch.scheduler.dashboard import (
    APPLICATIONS,
    BatchSizeTimeseries,
    DynBatchWorkers,
    ModelTimeseries,
    Summary,
    get_recorder,
)
from dask_dynbatch.scheduler.summary import model_summaries

DASHBOARD = {"dashboard": True, "dashboard_address": "127.0.0.1:0"}
CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)
GATE = threading.Event()  # the gated model waits for it: holds the device busy on purpose


def build_gated_double(device="cpu"):
    def run(batch):
        if not GATE.wait(30):
            raise TimeoutError("test gate never opened")
        return batch * 2

    return run


@pytest.fixture
def gate():
    GATE.clear()
    yield GATE
    GATE.set()


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


def servers(s, model: str) -> dict[str, dict]:
    """Per worker address, its model server of ``model`` in the last heartbeat the scheduler got."""
    out = {}
    for address, heartbeat in s.extensions["dynbatch"].workers.items():
        for server in heartbeat.get("servers") or ():
            if server["name"] == model:
                out[address] = server
    return out


def served(s, model: str) -> int:
    """Rows of ``model`` the workers' heartbeats say their model servers ran."""
    return sum(server["samples"] for server in servers(s, model).values())


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
    await until(lambda: served(s, "affine") == 300, "the workers' heartbeats count 300 samples")

    recorder = get_recorder(s)
    recorder.sample()
    assert recorder.default_model() == "affine"
    used = sorted(servers(s, "affine"))

    sizes = BatchSizeTimeseries(s)
    sizes.update()
    assert sorted(f"tcp://{w}" for w in sizes.lines.data["worker"]) == used  # one line per serving worker
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
    serving = [i for i, address in enumerate(table["address"]) if address in used]
    assert all(table["free_memory"][i] for i in serving)  # host memory left on the devices the model runs on
    assert all(table["version"][i] == "1" for i in serving)
    assert all(table["shared_batches"][i] == 0 for i in serving)  # one client: no batch is shared
    batcher.close()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)], scheduler_kwargs=DASHBOARD)
async def test_two_clients_of_one_model_show_as_one_model_served_by_the_worker(c, s, a, gate):
    await c.register_plugin(ddb.DynBatchPlugin())
    spec = ddb.ModelSpec("gated", load=build_gated_double, max_batch_size=64, initial_batch_size=64)
    c2 = await Client(s.address, asynchronous=True)
    mine, theirs = await ddb.Batcher(c, spec), await ddb.Batcher.from_name(c2, "gated")
    blocker = mine.submit(np.zeros(2))  # the device is busy with it until the gate opens
    (server,) = await until(lambda: list(a.extensions["dynbatch"].servers.values()), "the worker loaded the model")
    await until(lambda: server.stats.shipments == 1, "the first shipment reached the worker")
    filler = theirs.submit(np.ones(2))  # the device batch formed ahead, behind the running one
    await until(lambda: server.stats.shipments == 2 and not len(server.queue), "the next batch formed")
    ours = mine.map([np.full(2, float(i)) for i in range(5)])
    others = theirs.map([np.full(2, 100.0 + i) for i in range(7)])
    await until(lambda: len(server.queue) == 12, "both clients' rows wait for the device")
    gate.set()  # the 12 waiting rows of two clients run as one device batch
    await asyncio.gather(blocker, filler, *ours, *others)
    await until(lambda: reported(s, mine, 6) and reported(s, theirs, 8), "both batchers reported")
    await until(lambda: served(s, "gated") == 14, "the worker's heartbeat counts every row")

    recorder = get_recorder(s)
    recorder.sample()
    assert list(recorder.summaries) == ["gated"]  # one model, not one per client
    summary = recorder.summaries["gated"]
    assert summary["batchers"] == 2 and summary["version"] == 1
    assert summary["submitted"] == summary["delivered"] == 14  # 6 + 8: the two clients' requests add up

    (row,) = recorder.worker_rows("gated")
    (heartbeat,) = [srv for srv in recorder.state["workers"][a.address]["servers"] if srv["name"] == "gated"]
    assert row["batch_size"] == heartbeat["controller"]["size"]  # the server's controller, not a client's advice
    assert row["memory_cap"] == heartbeat["memory_cap"]
    assert row["samples"] == 14 and row["batches"] == 3
    assert row["shared_batches"] == 1  # the one device batch that carried rows of both clients

    table = DynBatchWorkers(s)
    table.update()
    assert table.source.data["shared_batches"] == [1] and table.source.data["version"] == ["1"]
    line = Summary(s)
    line.update()
    assert "<b>gated</b> v1: 2 batcher(s)" in line.root.text and "submitted 14" in line.root.text
    mine.close()
    theirs.close()
    await c2.close()


def test_worker_rows_come_from_the_newest_server_and_add_up_the_clients():
    """A worker still finishing an old version shows the new one; in-flight rows add up over
    clients, and the workload is the largest figure that rests on a measured rate (see
    ``worker_summary``)."""

    def server(version, size, samples):
        return {"name": "m", "version": version, "device": "cpu", "memory_cap": 500, "samples": samples,
                "batches": 1, "shared_batches": 0, "controller": {"size": size, "decision": "hold"}}

    def report(client, inflight, workload, throughput=100.0, closed=False):
        slot = {"inflight_samples": inflight, "workload": workload, "throughput": throughput,
                "controller": {"size": 999}}  # a client's copy of the advice: not what the page shows
        return {"model": "m", "client": client, "submitted": 10, "delivered": 8, "answered_early": 3, "queued": 2,
                "latency_p95": 0.01 * inflight, "closed": closed, "workers": {"tcp://w": slot}}

    state = {
        "models": {"m": {"name": "m", "version": 2}},
        "workers": {"tcp://w": {"address": "tcp://w", "servers": [server(1, 8, 100), server(2, 32, 5)]}},
        "batchers": {
            "b1": report("c1", 4, 0.05),
            "b2": report("c2", 6, 0.02),
            "b3": report("c3", 0, 9.0, throughput=None),  # no rate measured yet: an assumed figure
            "b4": report("c4", 0, 7.0, closed=True),  # its last figure before it closed
        },
    }
    (summary,) = model_summaries(state).values()
    assert summary["submitted"] == 40 and summary["queued"] == 8 and summary["batchers"] == 4
    assert summary["answered_early"] == 12
    assert summary["latency_p95"] == pytest.approx(0.06)  # the worst batcher's
    worker = summary["workers"]["tcp://w"]
    assert (worker["version"], worker["batch_size"], worker["samples"]) == (2, 32, 5)
    assert worker["inflight_samples"] == 10
    assert worker["workload"] == 0.05


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

    def per_worker(metrics, series: str) -> dict[str, float]:
        return {dict(labels)["worker"]: v for (name, labels), v in metrics.items() if name == series}

    metrics = await until(
        lambda: _when(scrape(), lambda m: worker_samples(m) == n), "the workers' heartbeats count every sample"
    )
    model = (("model", "identity"),)
    assert metrics[("dask_dynbatch_requests_submitted_total", model)] == n
    assert metrics[("dask_dynbatch_requests_total", (("model", "identity"), ("outcome", "served")))] == n
    assert metrics[("dask_dynbatch_requests_total", (("model", "identity"), ("outcome", "failed")))] == 0
    assert metrics[("dask_dynbatch_queue_depth", model)] == 0
    for series in ("requests_timed_out_running", "requests_quarantined", "requests_isolated", "stuck_batches"):
        assert metrics[(f"dask_dynbatch_{series}_total", model)] == 0  # nothing hung or crashed
    assert metrics[("dask_dynbatch_requests_answered_early_total", model)] == 0  # one-shot replies
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
    assert metrics[("dask_dynbatch_model_version", model)] == 1
    sizes = per_worker(metrics, "dask_dynbatch_batch_size")
    assert set(sizes) == ran and all(1 <= v <= 16 for v in sizes.values())  # from the workers' servers
    assert set(per_worker(metrics, "dask_dynbatch_shared_batches_total").values()) == {0}  # one client
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
  // Bokeh.index.find_one is newer than the lowest Bokeh supported; there, walk the views
  const find_view = (m) => {
    if (typeof Bokeh.index.find_one === "function") return Bokeh.index.find_one(m);
    const stack = [...Object.values(Bokeh.index)];
    while (stack.length) {
      const v = stack.pop();
      if (v.model === m) return v;
      stack.push(...(v.child_views ?? []));
    }
    return null;
  };
  const drawn = (name) => {
    const m = doc.get_model_by_name(name);
    const view = m == null ? null : find_view(m);
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
                    and state["batch_size_lines"] == len(servers(s, "affine")) >= 1  # one per serving worker
                    and state["batch_size_points"] >= 2 * state["batch_size_lines"]  # two samples a worker: a line
                    and state["model_rows"] >= 2
                    and state["worker_rows"] == 2
                )
                return state if ready else None

            state = await until(page_state, "the page shows the workers' batch sizes and the model's series", 90)
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
    assert state["decisions"] >= 2  # decision markers drawn (the browser's two sources may be one update apart)
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
    assert len(points["decision"]) == sum(len(ys) for ys in lines["ys"]) >= 2
