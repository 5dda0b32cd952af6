"""The scheduler half: the model registry, the workers' dynbatch state, the Batchers' reports.

Register it once per cluster::

    client.register_plugin(dask_dynbatch.DynBatchPlugin())

or start the scheduler with ``dask scheduler --preload dask_dynbatch``. Its ``start`` installs
:class:`~dask_dynbatch.worker.plugin.DynBatchWorkerPlugin` on every current and future worker and
adds the dashboard page and the Prometheus series; :meth:`DynBatchPlugin.close` undoes all of it.
Registering twice is harmless (the plugin is idempotent: the first one stays).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from typing import TYPE_CHECKING, Any

import dask
from distributed import SchedulerPlugin
from distributed.protocol.pickle import dumps

from .. import protocol
from .._compat import clients_gone
from ..errors import ModelConflictError, UnknownModelError
from ..protocol import ModelSuperseded, Registration, WorkerView, error_reply
from ..worker.plugin import DynBatchWorkerPlugin
from .registry import ModelRegistry

if TYPE_CHECKING:
    from distributed import Scheduler
    from distributed.scheduler import WorkerState

logger = logging.getLogger(__name__)


class DynBatchPlugin(SchedulerPlugin):
    """Scheduler plugin of dask-dynbatch.

    Parameters
    ----------
    tune_malloc
        Let the worker half raise glibc's malloc thresholds in nanny-started workers (see
        :func:`dask_dynbatch.worker.staging.tune_malloc_for_inference`). Default ``True``.
    memory_budget
        Use at most this much of each device: a fraction (``0.6``) or bytes. A worker's own
        ``dynbatch.memory-budget`` config (``DASK_DYNBATCH__MEMORY_BUDGET``) overrides it.
    safety_margin
        Fraction of device memory always left free ...
    safety_margin_max
        ... but at most this much (bytes or a string like ``"1 GiB"``; None: no limit). Default 1 GiB.
    min_change
        Fraction of device memory that free memory must move by to count as a re-plan event.
    """

    name = protocol.PLUGIN_NAME
    idempotent = True

    def __init__(self, tune_malloc: bool = True, memory_budget: float | int | None = None,
                 safety_margin: float = 0.1, min_change: float = 0.05,
                 safety_margin_max: int | str | None = "1 GiB"):
        if safety_margin_max is not None:
            dask.utils.parse_bytes(safety_margin_max)  # a bad value fails here, not on every worker
        self.worker_options = {"tune_malloc": tune_malloc, "memory_budget": memory_budget,
                               "safety_margin": safety_margin, "min_change": min_change,
                               "safety_margin_max": safety_margin_max}
        self.scheduler: Scheduler | None = None
        self.registry = ModelRegistry()
        self.workers: dict[str, dict[str, Any]] = {}  # address -> the worker half's last heartbeat
        self.ready: set[str] = set()  # workers whose worker half has started
        self.batchers: dict[str, dict[str, Any]] = {}  # batcher id -> its last report
        self.restarting: set[str] = set()  # workers restarted because a batch was stuck there
        self.stuck_batches: Counter[str] = Counter()  # per model
        self.restarts: deque[dict[str, Any]] = deque(maxlen=100)  # the latest, newest last
        self._tasks: set[asyncio.Task] = set()
        self._handlers = {
            protocol.REGISTER: self.register_model,
            protocol.GET_MODEL: self.get_model,
            protocol.WORKERS: self.workers_for,
            protocol.REPORT: self.report,
            protocol.STATE: self.state,
            protocol.RESTART_WORKER: self.restart_worker,
        }

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        scheduler.handlers.update(self._handlers)
        scheduler.extensions[protocol.PLUGIN_NAME] = self  # heartbeat(ws, data) is called on extensions
        from . import dashboard, metrics  # here, not at the top: bokeh stays off clients and workers

        dashboard.add_dashboard_pages(scheduler)
        metrics.register_collector(scheduler)
        responses = await scheduler.register_worker_plugin(
            None, dumps(DynBatchWorkerPlugin(**self.worker_options)), name=protocol.PLUGIN_NAME, idempotent=True
        )
        # their worker half has started (set up in the plugin-add call answered here)
        self.ready.update(a for a, r in (responses or {}).items() if isinstance(r, dict) and r.get("status") == "OK")

    async def close(self) -> None:
        """Undo :meth:`start`: handlers, extension, dashboard sampling, metrics and the worker half."""
        scheduler = self.scheduler
        if scheduler is None:
            return
        self.scheduler = None
        for op, handler in self._handlers.items():
            if scheduler.handlers.get(op) == handler:
                del scheduler.handlers[op]
        if scheduler.extensions.get(protocol.PLUGIN_NAME) is self:
            del scheduler.extensions[protocol.PLUGIN_NAME]
        from . import dashboard, metrics

        dashboard.stop_recording(scheduler)
        metrics.unregister_collector(scheduler)
        for task in list(self._tasks):
            task.cancel()
        if scheduler.status.name == "running" and protocol.PLUGIN_NAME in scheduler.worker_plugins:
            # workers would otherwise keep sending heartbeat data to an extension that is gone
            await scheduler.unregister_worker_plugin(None, protocol.PLUGIN_NAME)

    # -- cluster events -----------------------------------------------------------------------------
    def log_event(self, topic: str, msg: Any) -> None:
        """A worker half announced itself ready (its handlers are in place): clients may use it now."""
        if topic == protocol.CLUSTER_TOPIC and isinstance(msg, dict) and msg.get("action") == "ready":
            self.ready.add(msg["worker"])
            self.workers.setdefault(msg["worker"], {"device": msg.get("device", "cpu")})

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        self.workers.pop(worker, None)
        self.ready.discard(worker)
        self.restarting.discard(worker)
        announce(scheduler, protocol.CLUSTER_TOPIC, {"action": "remove", "worker": worker})

    def heartbeat(self, ws: WorkerState, data: dict[str, Any]) -> None:
        """The worker half's heartbeat data (scheduler extension hook)."""
        self.workers[ws.address] = data
        self.ready.add(ws.address)

    def remove_client(self, scheduler: Scheduler, client: str) -> None:
        """A client left: drop its Batchers' reports, and every model no connected client uses any
        more (from the registry, and from the workers that loaded it)."""
        theirs = [b for b, info in self.batchers.items() if info.get("client") == client]
        for batcher_id in theirs:
            del self.batchers[batcher_id]
        had_batchers = bool(theirs) or self.registry.uses(client)
        unused = self.registry.remove_client(client)
        if unused:
            logger.info("dynbatch: no client left for models %s; unloading them from the workers", unused)
            for name in unused:
                announce(scheduler, protocol.MODEL_TOPIC, {"name": name, "version": None})
            self._in_background(self._on_workers(protocol.UNLOAD, names=unused))
        if had_batchers:
            # its shared-memory slots (same-host batches) are mapped on the workers it used
            self._in_background(self._on_workers(protocol.SHM_DROP, client=client))

    def _in_background(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_workers(self, op: str, **kwargs: Any) -> None:
        """Call handler ``op`` on every running worker (best effort: a worker that left freed it all)."""
        scheduler = self.scheduler
        if scheduler is None or scheduler.status.name != "running":
            return
        workers = [a for a, ws in scheduler.workers.items() if ws.status.name == "running"]

        async def call(address: str) -> None:
            try:
                await getattr(scheduler.rpc(address), op)(**kwargs)
            except Exception as exc:  # the worker left meanwhile: nothing to free there
                logger.debug("dynbatch: %s on %s failed: %r", op, address, exc)

        await asyncio.gather(*(call(a) for a in workers))

    # -- handlers -----------------------------------------------------------------------------------
    def register_model(self, name: str, payload: bytes, fingerprint: dict[str, str], described: dict[str, str],
                       resources: dict | None = None, device: str | None = None, client: str | None = None,
                       replace: bool = False) -> dict[str, Any]:
        """Handler: register (or attach to, or replace) a model; see :mod:`.registry`."""
        try:
            entry, attached = self.registry.register(name, payload, fingerprint, described, resources=resources,
                                                     device=device, client=client, replace=replace)
        except ModelConflictError as exc:
            return error_reply(exc)
        if not attached and entry.version > 1:
            logger.info("dynbatch: model %r replaced by version %d", name, entry.version)
            if self.scheduler is not None:  # (a handler: it runs only while the plugin is started)
                announce(self.scheduler, protocol.MODEL_TOPIC, {"name": name, "version": entry.version})
            self._in_background(self._on_workers(protocol.UNLOAD, names=[name], below=entry.version))
        return Registration(entry.version, self.workers_for(name), attached).to_msg()

    def get_model(self, name: str, version: int | None = None) -> dict[str, Any]:
        """Handler: a registered model's pickled spec and version."""
        try:
            entry = self.registry.get(name, version)
        except (UnknownModelError, ModelSuperseded) as exc:
            return error_reply(exc)
        return {"payload": entry.payload, "version": entry.version}

    def worker_view(self, address: str) -> WorkerView:
        """What a client needs to know of a worker before it ran anything there."""
        ws = self.scheduler.workers[address]
        ours = self.workers.get(address)
        if ours is not None:  # the worker half's own finding: NVML may list a GPU that CUDA_VISIBLE_DEVICES hides
            device = ours.get("device", "cpu")
        else:
            metrics = ws.metrics or {}
            device = "cuda" if ("gpu_utilization" in metrics or "gpu" in metrics) else "cpu"
        return WorkerView(address=address, name=str(ws.name), device=device, nthreads=ws.nthreads,
                          resources=dict(ws.resources), benchmark=(ours or {}).get("benchmark"))

    def workers_for(self, model: str) -> dict[str, dict[str, Any]]:
        """Handler: running workers whose worker half is ready and that can run ``model`` (its
        resources and device), with their views."""
        entry = self.registry.models.get(model)
        if entry is None:
            return {}
        out = {}
        for address, ws in self.scheduler.workers.items():
            if ws.status.name != "running" or (address not in self.ready and address not in self.workers):
                continue
            if address in self.restarting:
                continue
            if any(ws.resources.get(k, 0) < v for k, v in entry.resources.items()):
                continue
            view = self.worker_view(address)
            if entry.device == "cuda" and view.device != "cuda":
                continue
            out[address] = view.to_msg()
        return out

    def restart_worker(self, worker: str, model: str, version: int, rows: int, seconds: float, limit: float,
                       handed_back: int = 0) -> None:
        """Handler: a worker's batch of ``model`` is stuck (it handed every row back): restart the
        worker through its nanny (``Scheduler.restart_workers``; a worker without one is closed).
        Clients stop sending to it at once (topic ``dynbatch-cluster``, action ``restarting``)."""
        if self.scheduler is None or worker in self.restarting:
            return
        self.restarting.add(worker)
        self.stuck_batches[model] += 1
        event = {"time": time.time(), "worker": worker, "model": model, "version": version, "rows": rows,
                 "seconds": seconds, "limit": limit, "handed_back": handed_back}
        self.restarts.append(event)
        logger.warning("dynbatch: restarting worker %s: a batch of %d rows of model %r ran %.1f s (limit %.1f s)",
                       worker, rows, model, seconds, limit)
        announce(self.scheduler, protocol.CLUSTER_TOPIC, {"action": "restarting", **event})
        self._in_background(self._restart(worker))

    async def _restart(self, worker: str) -> None:
        scheduler = self.scheduler
        if scheduler is None:
            return
        try:
            result = await scheduler.restart_workers([worker], wait_for_workers=False, on_error="return",
                                                     stimulus_id=f"dynbatch-stuck-{time.time()}")
            logger.info("dynbatch: restart of %s: %s", worker, result.get(worker))
        except Exception:  # the worker may be gone already; nothing else can free its device
            logger.exception("dynbatch: restarting worker %s failed", worker)

    def report(self, batcher: str, stats: dict[str, Any], client: str | None = None) -> None:
        """Handler: a Batcher's counts and latencies, for the dashboard and ``/metrics``."""
        self.batchers[batcher] = {"client": client, "time": time.time(), **stats}

    def state(self) -> dict[str, Any]:
        """Handler and dashboard source: the whole dynbatch view of the cluster, JSON-able.

        ``models``: the registry (name -> version, clients, ...); ``workers``: address -> the
        worker's view plus its worker half's heartbeat (``servers``: each model server's state,
        controller included; ``devices``: memory readings; ``shared_memory``); ``batchers``: each
        Batcher's last report (counts, latency percentiles, per-worker placement view);
        ``stuck_batches``: per model, batches the workers' watchdogs declared stuck; ``restarts``:
        the latest worker restarts for them (worker, model, rows, seconds run, limit)."""
        workers = {}
        for address in self.scheduler.workers:
            workers[address] = {**self.worker_view(address).to_msg(), **self.workers.get(address, {})}
        return {"models": self.registry.state(), "workers": workers, "batchers": dict(self.batchers),
                "stuck_batches": dict(self.stuck_batches), "restarts": list(self.restarts)}


def announce(scheduler: Scheduler, topic: str, msg: dict[str, Any]) -> None:
    """Publish ``msg`` to the clients listening to ``topic``, except those whose connection has
    closed: a worker's own client (its tasks' Batchers listen too) closes with its worker, and the
    scheduler would log a CRITICAL error for each event sent to it before it removes the client."""
    for client in clients_gone(scheduler):
        scheduler.unsubscribe_topic(topic, client)
    scheduler.log_event(topic, msg)
