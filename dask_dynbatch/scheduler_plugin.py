"""The scheduler half: model registry, cluster view, batcher reports.

Register it once per cluster::

    client.register_plugin(dask_dynbatch.DynBatchPlugin())

Its ``start`` installs :class:`~dask_dynbatch.worker_plugin.DynBatchWorkerPlugin` on every current
and future worker. Registering twice is harmless (the plugin is idempotent: the first one stays).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import dask
from distributed import SchedulerPlugin
from distributed.protocol.pickle import dumps

from .errors import UnknownModelError
from .worker_plugin import CLUSTER_TOPIC, PLUGIN_NAME, DynBatchWorkerPlugin

if TYPE_CHECKING:
    from distributed import Scheduler

logger = logging.getLogger(__name__)


class DynBatchPlugin(SchedulerPlugin):
    """Scheduler plugin of dask-dynbatch.

    Parameters
    ----------
    tune_malloc
        Let the worker half raise glibc's malloc thresholds in nanny-started workers (see
        :func:`dask_dynbatch.runtime.tune_malloc_for_inference`). Default ``True``.
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

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self, tune_malloc: bool = True, memory_budget: float | int | None = None,
                 safety_margin: float = 0.1, min_change: float = 0.05,
                 safety_margin_max: int | str | None = "1 GiB"):
        self.tune_malloc = tune_malloc
        if safety_margin_max is not None:
            dask.utils.parse_bytes(safety_margin_max)  # a bad value fails here, not on every worker
        self.worker_options = {"tune_malloc": tune_malloc, "memory_budget": memory_budget,
                               "safety_margin": safety_margin, "min_change": min_change,
                               "safety_margin_max": safety_margin_max}
        self.scheduler: Scheduler | None = None
        self.models: dict[str, dict[str, Any]] = {}
        self.batchers: dict[str, dict[str, Any]] = {}
        self._tasks: set[asyncio.Task] = set()

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        scheduler.handlers.update(
            {
                "dynbatch_register_model": self.register_model,
                "dynbatch_get_model": self.get_model,
                "dynbatch_workers": self.workers_for,
                "dynbatch_report": self.report,
                "dynbatch_state": self.state,
            }
        )
        scheduler.extensions["dynbatch"] = self
        from . import dashboard, metrics  # here, not at the top: bokeh stays off clients and workers

        dashboard.add_dashboard_pages(scheduler)
        metrics.register_collector(scheduler)
        await scheduler.register_worker_plugin(
            None, dumps(DynBatchWorkerPlugin(**self.worker_options)), name=PLUGIN_NAME, idempotent=True
        )

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        # re-plan event: batchers refresh their view now instead of at their next periodic refresh
        scheduler.log_event(CLUSTER_TOPIC, {"action": "add", "worker": worker})

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        scheduler.log_event(CLUSTER_TOPIC, {"action": "remove", "worker": worker})

    def remove_client(self, scheduler: Scheduler, client: str) -> None:
        """A client left: drop its batchers' reports, and every model that no connected client
        uses any more (from the registry, and from the workers that loaded it)."""
        theirs = [b for b, info in self.batchers.items() if info.get("client") == client]
        for batcher_id in theirs:
            del self.batchers[batcher_id]
        had_batchers = bool(theirs) or any(client in m["clients"] for m in self.models.values())
        unused = []
        for name, model in self.models.items():
            users = model["clients"]
            if client in users:
                users.discard(client)
                if not users:
                    unused.append(name)
        for name in unused:
            del self.models[name]
        if unused:
            self._in_background(self._unload(unused))
        if had_batchers:
            # its shared-memory slots (same-host batches) are mapped on the workers it used
            self._in_background(self._on_workers("dynbatch_shm_drop", client=client))

    def _in_background(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_workers(self, op: str, **kwargs: Any) -> None:
        """Call handler ``op`` on every running worker (best effort: a worker that left freed it all)."""
        workers = [a for a, ws in self.scheduler.workers.items() if ws.status.name == "running"]
        if not workers or self.scheduler.status.name != "running":
            return

        async def call(address: str) -> None:
            try:
                await getattr(self.scheduler.rpc(address), op)(**kwargs)
            except Exception as exc:  # the worker left meanwhile: nothing to free there
                logger.debug("dynbatch: %s on %s failed: %r", op, address, exc)

        await asyncio.gather(*(call(a) for a in workers))

    async def _unload(self, names: list[str]) -> None:
        names = [n for n in names if n not in self.models]  # not registered again meanwhile
        if not names:
            return
        logger.info("dynbatch: no client left for models %s; unloading them from the workers", names)
        await self._on_workers("dynbatch_unload", names=names)

    # -- handlers --------------------------------------------------------------------------------
    def register_model(
        self, name: str, payload: bytes, token: str, resources: dict, device: str | None, client: str | None = None
    ) -> dict[str, Any]:
        previous = self.models.get(name)
        if previous is not None and previous["token"] != token:
            logger.info("dynbatch: model %r re-registered with a new spec; workers will reload it", name)
        clients = set(previous["clients"]) if previous is not None else set()
        if client is not None:
            clients.add(client)
        self.models[name] = {
            "payload": payload,
            "token": token,
            "resources": dict(resources or {}),
            "device": device,
            "registered": time.time(),
            "client": client,
            "clients": clients,  # connected clients with a Batcher of it; the model is unloaded with the last
        }
        return {"status": "OK", "workers": self.workers_for(name)}

    def get_model(self, name: str) -> dict[str, Any]:
        try:
            model = self.models[name]
        except KeyError:
            raise UnknownModelError(name, list(self.models)) from None
        return {"payload": model["payload"], "token": model["token"]}

    def worker_view(self, address: str) -> dict[str, Any]:
        """What placement needs to know of one worker: device kind, telemetry, resources."""
        ws = self.scheduler.workers[address]
        metrics = ws.metrics or {}
        ours = metrics.get("dynbatch") or {}
        # the worker half's own finding wins: NVML may list a GPU that CUDA_VISIBLE_DEVICES hides
        if ours.get("device"):
            has_gpu = ours["device"] == "cuda"
        else:
            has_gpu = "gpu_utilization" in metrics or "gpu" in metrics
        gpu = metrics.get("gpu") or {}
        memory_total = metrics.get("gpu-memory-total") or gpu.get("memory-total")
        memory_used = metrics.get("gpu_memory_used") or gpu.get("memory-used")
        return {
            "address": address,
            "name": str(ws.name),
            "nthreads": ws.nthreads,
            "resources": dict(ws.resources),
            "device": "cuda" if has_gpu else "cpu",
            "memory_limit": ws.memory_limit,
            "memory_process": metrics.get("memory"),
            "cpu_percent": metrics.get("cpu"),
            "gpu_utilization": metrics.get("gpu_utilization") or gpu.get("utilization"),
            "gpu_memory_used": memory_used,
            "gpu_memory_total": memory_total,
            "dynbatch": ours,
        }

    def workers_for(self, model: str) -> dict[str, dict[str, Any]]:
        """Running workers able to run ``model`` (its resources and device), with their views."""
        if model not in self.models:
            raise UnknownModelError(model, list(self.models))
        info = self.models[model]
        out = {}
        for address, ws in self.scheduler.workers.items():
            if ws.status.name not in ("running",):
                continue
            if any(ws.resources.get(k, 0) < v for k, v in info["resources"].items()):
                continue
            view = self.worker_view(address)
            if info["device"] == "cuda" and view["device"] != "cuda":
                continue
            out[address] = view
        return out

    def report(self, batcher: str, stats: dict[str, Any], client: str | None = None) -> None:
        """Batcher state pushed by clients (controller, queue, counts) for ``stats()`` and the dashboard."""
        self.batchers[batcher] = {"client": client, "time": time.time(), **stats}

    def state(self) -> dict[str, Any]:
        """The whole cluster view, JSON-able (models without their payloads)."""
        return {
            "models": {
                n: {k: (sorted(v) if k == "clients" else v) for k, v in m.items() if k != "payload"}
                for n, m in self.models.items()
            },
            "workers": {a: self.worker_view(a) for a in self.scheduler.workers},
            "batchers": dict(self.batchers),
        }
