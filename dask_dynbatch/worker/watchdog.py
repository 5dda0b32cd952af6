"""The worker's watchdog: a device batch that runs far past its time is stuck, and the worker restarts.

A Python thread cannot be stopped, so a model call that hangs holds its device thread for good, and
every model that shares the device waits behind it. Four times a second the watchdog asks each
model server whether its running batch ran past its limit
(:class:`~dask_dynbatch.core.watchdog.ExecutionClock`). The first stuck batch found:

1. every server hands its rows back at once (:meth:`ModelServer.evacuate
   <dask_dynbatch.worker.server.ModelServer.evacuate>`): the stuck batch's rows as ``stuck`` (their
   clients retry them elsewhere in halves, see :mod:`~dask_dynbatch.core.quarantine`), every
   other row as unrun (re-sent at no cost, to other workers or to this one once it is back);
2. new shipments are answered :class:`~dask_dynbatch.protocol.WorkerRestarting` (nothing runs);
3. once the replies are out, the worker asks the scheduler to restart it
   (``dynbatch_restart_worker``, which calls ``Scheduler.restart_workers``: the nanny starts a new
   process). Device threads are daemon threads (:class:`DeviceThread`), so the stuck call does not
   hold up the process's exit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import dask.config
from dask.utils import parse_timedelta

from ..core.watchdog import ExecutionClock

if TYPE_CHECKING:
    from distributed import Worker

    from ..spec import ModelSpec
    from .server import ModelServer

logger = logging.getLogger(__name__)

#: how often the watchdog looks at the running batches (seconds)
CHECK_INTERVAL = 0.25
#: how long the watchdog waits for the replies of the shipments it handed back before the restart
REPLY_GRACE = 5.0


def execution_clock(spec: ModelSpec) -> ExecutionClock:
    """The stuck-batch limits of a model (its ``execution_timeout``, else the ``dynbatch.watchdog``
    configuration of this worker)."""
    return ExecutionClock(
        spec.execution_timeout,
        factor=float(dask.config.get("dynbatch.watchdog.factor", 10)),
        floor=parse_timedelta(dask.config.get("dynbatch.watchdog.min-timeout", "5s"), default="s"),
        first=parse_timedelta(dask.config.get("dynbatch.watchdog.first-batch-timeout", "60s"), default="s"),
    )


class Watchdog:
    """Finds a stuck batch among ``servers()`` and restarts the worker (see the module docstring).

    ``active_runs`` counts the shipments the worker is serving (the plugin's ``run`` and
    ``collect`` handlers, and shipments answered in parts until their last part), so that the
    restart waits until their replies are out."""

    def __init__(self, worker: Worker, servers: Callable[[], Iterable[ModelServer]]):
        self.worker = worker
        self.servers = servers
        self.active_runs = 0
        self.restarting: dict[str, Any] | None = None  # what was stuck, once one batch was
        self._task: asyncio.Task | None = None

    def check(self) -> None:
        """Periodic: declare the first batch that ran past its limit stuck."""
        if self.restarting is not None:
            return
        now = time.monotonic()
        for server in list(self.servers()):
            found = server.overdue(now)
            if found is not None:
                batch, limit = found
                self.declare_stuck(server, rows=batch.rows, seconds=now - (batch.started or now), limit=limit, batch=batch)
                return

    def declare_stuck(self, server: ModelServer, *, rows: int, seconds: float, limit: float, batch: Any) -> None:
        self.restarting = {"model": server.name, "version": server.version, "rows": rows, "seconds": seconds,
                           "limit": limit}
        logger.error("dynbatch: a device batch of %d rows of model %r has run for %.1f s (limit %.1f s): stuck. "
                     "Its requests are retried elsewhere; this worker restarts", rows, server.name, seconds, limit)
        handed_back = 0
        for other in list(self.servers()):
            handed_back += other.evacuate(batch if other is server else None, limit)
        self.restarting["handed_back"] = handed_back
        self._task = asyncio.ensure_future(self._restart())

    async def _restart(self) -> None:
        deadline = time.monotonic() + REPLY_GRACE
        while self.active_runs and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # the last replies are written after their handlers return
        try:
            await self.worker.scheduler.dynbatch_restart_worker(worker=self.worker.address, **(self.restarting or {}))
        except Exception as exc:  # the scheduler is gone: nothing can restart this worker
            logger.error("dynbatch: could not ask the scheduler to restart this worker: %r", exc)


class DeviceThread(concurrent.futures.Executor):
    """One daemon thread that runs submitted calls in order.

    A ``ThreadPoolExecutor``'s threads are joined when the process exits, so a model call that hangs
    would keep a worker that the nanny restarts alive until it is killed; a daemon thread is left
    behind instead."""

    def __init__(self, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._shutdown = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future: concurrent.futures.Future = concurrent.futures.Future()
            self._queue.put((future, fn, args, kwargs))
        return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._run(*item)
            del item  # a finished batch's arrays are not kept alive until the next call

    @staticmethod
    def _run(future: concurrent.futures.Future, fn, args, kwargs) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        item[0].cancel()
            self._queue.put(None)
        if wait:
            self._thread.join()
