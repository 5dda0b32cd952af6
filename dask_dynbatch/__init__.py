"""dask-dynbatch: dynamic-batching inference on any Dask cluster.

>>> client.register_plugin(DynBatchPlugin())                         # doctest: +SKIP
>>> batcher = Batcher(client, ModelSpec("cnn", load=build_model))    # doctest: +SKIP
>>> y = batcher.submit(x).result()                                   # doctest: +SKIP
"""

from __future__ import annotations

from . import config  # noqa: F401  (registers the dynbatch config defaults)
from .batching import RequestFuture
from .client import Batcher, rerun_benchmark
from .errors import (
    BatcherClosedError,
    CompileWarning,
    DynBatchError,
    InputSignatureError,
    PluginNotRegisteredError,
    QueueFullError,
    RequestTimeoutError,
    SampleTooLargeError,
    UnknownModelError,
)
from .scheduler_plugin import DynBatchPlugin
from .spec import DeviceVariant, ModelSpec
from .worker_plugin import DynBatchWorkerPlugin

__version__ = "0.1.0"

__all__ = [
    "Batcher",
    "BatcherClosedError",
    "CompileWarning",
    "DeviceVariant",
    "DynBatchError",
    "DynBatchPlugin",
    "DynBatchWorkerPlugin",
    "InputSignatureError",
    "ModelSpec",
    "PluginNotRegisteredError",
    "QueueFullError",
    "RequestFuture",
    "RequestTimeoutError",
    "SampleTooLargeError",
    "UnknownModelError",
    "rerun_benchmark",
]
from .pipeline import JobFuture, Pipeline, cpu, fan_out, model  # noqa: E402
__all__ += ["JobFuture", "Pipeline", "cpu", "fan_out", "model"]
