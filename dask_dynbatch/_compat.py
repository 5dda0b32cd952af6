"""The only uses of private APIs in dask-dynbatch, each with the reason no public one serves.

``tests/test_layout.py`` lists them (:data:`PRIVATE_USES`) and checks that nothing else in the
package reaches into a private name of distributed, bokeh or CPython.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distributed import Scheduler, Worker

logger = logging.getLogger(__name__)

#: what the package uses, and why (checked by tests/test_layout.py); all but the last live here
PRIVATE_USES = {
    "distributed.worker._worker_cvar": (
        "the model's load and predict run in the worker's device thread, not in a task; setting the "
        "context variable makes distributed.get_worker() work there as it does in a task"
    ),
    "bokeh.server internals (BokehTornado.applications, per_app_patterns, WSHandler)": (
        "distributed reads its table of dashboard applications once, when the dashboard starts; a "
        "plugin registered later by a client (client.register_plugin) can add its page only to the "
        "running Bokeh server"
    ),
    "torch._dynamo.config.recompile_limit (cache_size_limit in older torch)": (
        "a compiled model serves one graph per bucket size, each a recompile of the same code; "
        "dynamo's default limit would stop at a handful of buckets"
    ),
    "torch._dynamo.config.error_on_nested_fx_trace": (
        "a compiled call that meets torch.fx's process-wide 'tracing' flag (another thread tracing) "
        "must run its eager code instead of raising; set only around compiled calls"
    ),
    "distributed.dashboard.scheduler.template_variables": (
        "the dashboard's menus are built from this memoized per-scheduler dict; adding to it is the "
        "only way to list a page added at run time"
    ),
    "distributed.dashboard.components.scheduler.BOKEH_THEME, env": (
        "undocumented names of distributed's dashboard: the page uses its theme and page template, so "
        "that it looks like its neighbours"
    ),
    "distributed.core.send_recv, with client.rpc's connect() and reuse()": (
        "a shipment connects, then sends, as two steps (client.rpc(address).op() does both in one), so "
        "that a worker that cannot be reached costs its requests no attempt: nothing was sent"
    ),
    "Scheduler.client_comms, BatchedSend.closed()": (
        "a worker's own client closes with its worker before the scheduler has removed it; an event "
        "published to it meanwhile (the worker's removal, a model unloaded) makes distributed log a "
        "CRITICAL error with a traceback, so the scheduler plugin takes such clients off its topics first"
    ),
    "concurrent.futures.Future protocol (_state, _condition, _waiters, _invoke_callbacks), in core/requests.py": (
        "RequestFuture creates its lock and lists only when a thread waits on it: about 1.7 us a request "
        "instead of 7.5 for a plain Future, which the front end's rate of 100k requests/s cannot spare; "
        "concurrent.futures.wait() and as_completed() still work with it (tests/test_robustness.py)"
    ),
}


def clients_gone(scheduler: Scheduler) -> list[str]:
    """Clients whose connection to ``scheduler`` has closed and that it has not removed yet (see
    :data:`PRIVATE_USES`)."""
    return [client for client, comm in list(scheduler.client_comms.items()) if comm.closed()]


async def send_recv_on(pool: Any, comm: Any, op: str, **message: Any) -> Any:
    """One request ``op`` and its reply on ``comm``, a connection of the connection pool ``pool``
    (see :data:`PRIVATE_USES`)."""
    from distributed.core import send_recv

    return await send_recv(comm=comm, op=op, serializers=pool.serializers, deserializers=pool.deserializers,
                           **message)


@contextlib.contextmanager
def as_worker(worker: Worker) -> Iterator[None]:
    """``distributed.get_worker()`` returns ``worker`` inside the block (in any thread)."""
    from distributed.worker import _worker_cvar

    token = _worker_cvar.set(worker)
    try:
        yield
    finally:
        _worker_cvar.reset(token)


def call_as_worker(worker: Worker, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with ``distributed.get_worker()`` returning ``worker``."""
    with as_worker(worker):
        return fn(*args, **kwargs)


def allow_recompiles(limit: int) -> None:
    """Let dynamo compile at least ``limit`` graphs of one piece of code (one per bucket size)."""
    import torch._dynamo

    config = torch._dynamo.config
    for knob in ("recompile_limit", "cache_size_limit"):
        if getattr(config, knob, limit) < limit:
            setattr(config, knob, limit)


def dynamo_tolerates_nested_tracing() -> contextlib.AbstractContextManager:
    """Within the block, a compiled call during another thread's fx tracing runs eagerly."""
    import torch._dynamo

    return torch._dynamo.config.patch(error_on_nested_fx_trace=False)


def dashboard_bokeh_app(scheduler: Scheduler) -> Any:
    """The Bokeh server application of the scheduler's dashboard, or None (no dashboard)."""
    from bokeh.server.tornado import BokehTornado

    http_application = getattr(scheduler, "http_application", None)
    for app in getattr(http_application, "applications", ()):
        if isinstance(app, BokehTornado):
            return app
    return None


def add_bokeh_application(bokeh_app: Any, path: str, make_doc: Callable[[Any], None]) -> None:
    """Serve ``make_doc`` at ``path`` on a running Bokeh server (what ``BokehTornado.__init__``
    does for the applications it is started with)."""
    from bokeh.application import Application
    from bokeh.application.handlers.document_lifecycle import DocumentLifecycleHandler
    from bokeh.application.handlers.function import FunctionHandler
    from bokeh.server.contexts import ApplicationContext
    from bokeh.server.tornado import create_static_handler
    from bokeh.server.urls import per_app_patterns
    from bokeh.server.views.ws import WSHandler

    application = Application(FunctionHandler(make_doc), DocumentLifecycleHandler())
    context = ApplicationContext(application, io_loop=bokeh_app.io_loop, url=path)
    routes = []
    for pattern, handler in per_app_patterns:
        route_context: dict[str, Any] = {"application_context": context}
        if issubclass(handler, WSHandler):
            route_context.update(compression_level=None, mem_level=None)
        routes.append((bokeh_app.prefix + path + pattern, handler, route_context))
    websocket_path = next(r[0] for r in routes if r[0].endswith("/ws"))
    for route in routes:
        route[2]["bokeh_websocket_path"] = websocket_path
    routes.append(create_static_handler(bokeh_app.prefix, path, application))
    bokeh_app.applications[path] = context  # the dict BokehTornado looks sessions up in
    bokeh_app.add_handlers(r".*", routes)
    bokeh_app.io_loop.add_callback(context.run_load_hook)


def dashboard_template_variables(scheduler: Scheduler) -> dict[str, Any]:
    """The dashboard's memoized template variables of ``scheduler`` (menus: ``pages``, ``plots``)."""
    from distributed.dashboard.scheduler import template_variables

    return template_variables(scheduler)


@functools.cache
def bokeh_theme_and_template() -> tuple[Any, Any]:
    """distributed's dashboard theme and page template, so the page looks like its neighbours."""
    from distributed.dashboard.components.scheduler import BOKEH_THEME, env

    return BOKEH_THEME, env.get_template("simple.html")
