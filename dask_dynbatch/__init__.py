"""dask-dynbatch: dynamic-batching inference on any Dask cluster.

>>> client.register_plugin(DynBatchPlugin())                         # doctest: +SKIP
>>> batcher = Batcher(client, ModelSpec("cnn", load=build_model))    # doctest: +SKIP
>>> y = batcher.submit(x).result()                                   # doctest: +SKIP

The package is laid out by where code runs: ``core`` (pure decision logic: requests and queues,
batch-size control, pacing, placement, memory sizing), ``client`` (the :class:`Batcher` and its
dispatcher), ``worker`` (the model servers), ``scheduler`` (the plugin, model registry, dashboard
and metrics), with ``protocol`` the messages between them. Public names are imported on first use,
so that ``import dask_dynbatch.core`` pulls in neither dask nor torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it
_PUBLIC = {
    "Batcher": ".client.batcher",
    "rerun_benchmark": ".client.batcher",
    "gather": ".client.bulk",
    "progress": ".client.progress",
    "RequestFuture": ".core.requests",
    "DeviceVariant": ".spec",
    "ModelSpec": ".spec",
    "DynBatchPlugin": ".scheduler.plugin",
    "DynBatchWorkerPlugin": ".worker.plugin",
    "JobFuture": ".pipeline",
    "Pipeline": ".pipeline",
    "cpu": ".pipeline",
    "fan_out": ".pipeline",
    "model": ".pipeline",
    **{
        name: ".errors"
        for name in (
            "BatcherClosedError",
            "CompileWarning",
            "DynBatchError",
            "ExecutionTimeoutError",
            "InputSignatureError",
            "ModelConflictError",
            "PluginNotRegisteredError",
            "QueueFullError",
            "RequestTimeoutError",
            "RowError",
            "SampleTooLargeError",
            "UnknownModelError",
            "WorkerCrashError",
        )
    },
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'dask_dynbatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


def dask_setup(service: Any) -> None:
    """``dask scheduler --preload dask_dynbatch``: register the scheduler plugin (and its dashboard
    pages) on a scheduler started from the command line.

    The scheduler plugin installs the worker half on every worker, so ``dask worker --preload
    dask_dynbatch`` (harmless) does nothing more than import the package early.
    """
    from distributed import Scheduler

    from .scheduler.plugin import DynBatchPlugin

    if isinstance(service, Scheduler):
        service.add_plugin(DynBatchPlugin())
