"""Exception types a user of dask-dynbatch can meet, each with a message that says what to do."""

from __future__ import annotations


class DynBatchError(Exception):
    """Base class of every dask-dynbatch error."""


class PluginNotRegisteredError(DynBatchError, RuntimeError):
    """The scheduler has no :class:`~dask_dynbatch.DynBatchPlugin`."""

    def __init__(self, address: str | None = None):
        where = f" at {address}" if address else ""
        super().__init__(
            f"The dask-dynbatch scheduler plugin is not registered on the scheduler{where}. "
            "Call `client.register_plugin(dask_dynbatch.DynBatchPlugin())` before creating a Batcher, "
            "or start the scheduler with `dask scheduler --preload dask_dynbatch`."
        )


class UnknownModelError(DynBatchError, KeyError):
    """A model name that no Batcher registered."""

    def __init__(self, name: str, known: list[str] | None = None):
        self.name = name
        self.known = known
        known_txt = ", ".join(sorted(known)) if known else "none"
        super().__init__(
            f"Unknown model {name!r}: register it by creating `Batcher(client, ModelSpec(name={name!r}, ...))`. "
            f"Known models: {known_txt}."
        )

    def __str__(self) -> str:  # KeyError would quote the whole message
        return self.args[0]

    def __reduce__(self):
        return (type(self), (self.name, self.known))


class ModelConflictError(DynBatchError, ValueError):
    """A model of this name is registered on the cluster with a different identity (load, predict,
    variants or serving settings): two specs may share a name only if they are the same model."""

    def __init__(self, name: str, differences: dict[str, tuple[str, str]]):
        self.name = name
        self.differences = differences
        what = "; ".join(f"{field}: registered {old}, given {new}" for field, (old, new) in differences.items())
        super().__init__(
            f"Model {name!r} is already registered on this cluster with a different spec ({what}). "
            f"Use another name, attach to the registered model with `Batcher.from_name(client, {name!r})`, "
            f"or replace it for every client with `Batcher(client, spec, replace=True)`."
        )

    def __reduce__(self):
        return (type(self), (self.name, self.differences))


class BatcherClosedError(DynBatchError, RuntimeError):
    """``submit``/``map`` on a Batcher that was closed."""

    def __init__(self, name: str):
        super().__init__(f"Batcher for model {name!r} is closed; create a new Batcher to submit more requests.")


class RequestTimeoutError(DynBatchError, TimeoutError):
    """A request's deadline (``timeout=``) passed: while it waited (it was not run), or while its
    batch ran (a result that arrives later is dropped); the message says which."""


class WorkerCrashError(DynBatchError, RuntimeError):
    """The request made its worker die (a segfault in an extension, a CUDA illegal address,
    ``os._exit``): it died with its worker again once it was alone in its batch, or reached the bound
    on the restarts one request may cause (``dynbatch.quarantine.max-restarts``). Its batchmates ran."""


class ExecutionTimeoutError(DynBatchError, TimeoutError):
    """The request's batch ran far past the time batches of its size take (the model server's
    watchdog, ``ModelSpec.execution_timeout``), again once it was alone in its batch; its worker was
    restarted each time. Its batchmates ran."""



class InputSignatureError(DynBatchError, ValueError):
    """A request's shape or dtype does not match the model's input signature."""


class QueueFullError(DynBatchError, RuntimeError):
    """The Batcher's queue is full and its overload policy is ``"reject"``."""


class SampleTooLargeError(DynBatchError, MemoryError):
    """A single sample does not fit in the device memory available to the model, even alone in a
    batch of one. Only that request fails; the others of its batch ran.

    Parameters
    ----------
    row
        Index of the row in its batch (None when not known).
    detail
        Text of the out-of-memory error that the row raised.
    """

    def __init__(self, row: int | None = None, detail: str = ""):
        self.row = row
        self.detail = detail
        where = f"sample at row {row}" if row is not None else "a sample"
        super().__init__(
            f"{where} does not fit in the device memory available, even alone in a batch of 1"
            + (f" ({detail})" if detail else "")
            + ". Free memory on that device (other processes or models), reduce the size of this input, "
            "or send it to a device with more memory (for example a CPU worker)."
        )

    def __reduce__(self):
        # keep (row, detail) through pickling: errors travel back in RPC replies
        return (type(self), (self.row, self.detail))


class CompileWarning(UserWarning):
    """A model with ``ModelSpec(compile=...)`` could not be compiled on a worker: it is served
    eagerly there (results are unaffected; ``Batcher.stats()["workers"][...]["compile"]["error"]``
    says why)."""


class RowError(DynBatchError, RuntimeError):
    """A row of a Dask collection given to ``Batcher.predict`` failed; the message names its
    position (the original error is its ``__cause__``)."""
