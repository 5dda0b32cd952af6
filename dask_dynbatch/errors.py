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
            "Call `client.register_plugin(dask_dynbatch.DynBatchPlugin())` before creating a Batcher "
            "(or start the scheduler with `--preload dask_dynbatch`)."
        )


class UnknownModelError(DynBatchError, KeyError):
    """A model name that no Batcher registered."""

    def __init__(self, name: str, known: list[str] | None = None):
        self.name = name
        known_txt = ", ".join(sorted(known)) if known else "none"
        super().__init__(
            f"Unknown model {name!r}: register it by creating `Batcher(client, ModelSpec(name={name!r}, ...))`. "
            f"Known models: {known_txt}."
        )

    def __str__(self) -> str:  # KeyError would quote the whole message
        return self.args[0]


class BatcherClosedError(DynBatchError, RuntimeError):
    """``submit``/``map`` on a Batcher that was closed."""

    def __init__(self, name: str):
        super().__init__(f"Batcher for model {name!r} is closed; create a new Batcher to submit more requests.")


class RequestTimeoutError(DynBatchError, TimeoutError):
    """A request's deadline passed before its batch started; it was not run."""


class InputSignatureError(DynBatchError, ValueError):
    """A request's shape or dtype does not match the model's input signature."""


class QueueFullError(DynBatchError, RuntimeError):
    """The Batcher's queue is full and its overload policy is ``"reject"``."""


class SampleTooLargeError(DynBatchError, MemoryError):
    """A single sample does not fit in the device memory available to the model."""


class CompileWarning(UserWarning):
    """A model with ``ModelSpec(compile=...)`` could not be compiled on a worker: it is served
    eagerly there (results are unaffected; ``Batcher.stats()["workers"][...]["compile"]["error"]``
    says why)."""
