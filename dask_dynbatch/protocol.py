"""The messages between the three halves: operation and topic names, and typed messages.

Client -> worker, ``dynbatch_run`` (one *shipment*: many requests' rows for one model version; its
keyword arguments are :meth:`DynBatchWorkerPlugin.run <dask_dynbatch.worker.plugin.DynBatchWorkerPlugin.run>`'s
parameters) -> :class:`ShipmentReply`. A reply is either that, or an error message
(:func:`error_reply`) that :func:`raise_if_error` raises on the other side: errors travel as errors.

Client -> scheduler: ``dynbatch_register_model`` -> :class:`Registration`, ``dynbatch_get_model``,
``dynbatch_workers`` -> ``{address: WorkerView}``, ``dynbatch_report`` (a Batcher's counts for the
dashboard and ``/metrics``).

Pushed events (``client.subscribe_topic``): :data:`CLUSTER_TOPIC` (a worker's half became ready, or
a worker left), :data:`ADVICE_TOPIC` (a worker's free memory moved: new advice for its models),
:data:`MODEL_TOPIC` (a model was replaced or dropped).

Worker -> scheduler: the worker extension's ``heartbeat()`` (its servers, devices, shared memory),
read by the scheduler extension's ``heartbeat(ws, data)``.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from distributed.core import clean_exception, error_message
from distributed.protocol import Serialize

#: name of the scheduler extension, the worker extension and the worker plugin
PLUGIN_NAME = "dynbatch"

# worker handlers
RUN = "dynbatch_run"
COLLECT = "dynbatch_collect"
UNLOAD = "dynbatch_unload"
SHM_DROP = "dynbatch_shm_drop"
BENCHMARK = "dynbatch_benchmark"
SERVER_STATE = "dynbatch_server_state"
# scheduler handlers
REGISTER = "dynbatch_register_model"
GET_MODEL = "dynbatch_get_model"
WORKERS = "dynbatch_workers"
REPORT = "dynbatch_report"
STATE = "dynbatch_state"
RESTART_WORKER = "dynbatch_restart_worker"

#: padded or weighed samples: a shipment holds this many device batches' worth of rows, and a client
#: keeps ``ModelSpec.max_inflight`` times :data:`WEIGHED_INFLIGHT` of them in flight per worker, so
#: that the server's queue holds lengths to choose from (several dozen batches' worth) while each
#: shipment's results come back a few batches after its rows arrived
WEIGHED_SHIP_BATCHES = 4
WEIGHED_INFLIGHT = 8

#: a worker's half ready (it started: ``{"action": "ready", "worker", "device"}``), a worker about to
#: be restarted for a stuck batch (``{"action": "restarting", "worker", "model", ...}``) or a worker
#: gone (``{"action": "remove", "worker"}``)
CLUSTER_TOPIC = "dynbatch-cluster"
#: a worker's free memory moved: ``{"worker", "advice": {model: {version: Advice}}}``
ADVICE_TOPIC = "dynbatch-advice"
#: a model was replaced (``{"name", "version"}``) or dropped (``version`` None)
MODEL_TOPIC = "dynbatch-model"


class ModelSuperseded(Exception):
    """A shipment named a model version that a newer one replaced; the client re-sends its rows with
    the newer version (nothing ran)."""

    def __init__(self, name: str, version: int | None):
        self.name = name
        self.version = version
        super().__init__(f"model {name!r} was replaced by version {version}")

    def __reduce__(self):
        return (type(self), (self.name, self.version))


class WorkerRestarting(Exception):
    """The worker found a stuck batch and is about to be restarted: the shipment did not run (the
    client sends it elsewhere, or here once the worker is back)."""

    def __init__(self, address: str):
        self.address = address
        super().__init__(f"worker {address} is restarting (a device batch was stuck)")

    def __reduce__(self):
        return (type(self), (self.address,))


class PartsLost(Exception):
    """The worker holds no shipment answered in parts by that token for that client: it was dropped
    unclaimed (the rows without results go back to the queue), or ``restarted``: the token is of an
    earlier process at the same address, which died (the rows ran there, and are suspects)."""

    def __init__(self, address: str, token: str, restarted: bool = False):
        self.address = address
        self.token = token
        self.restarted = restarted
        why = "it restarted since" if restarted else "dropped or never held"
        super().__init__(f"worker {address} holds no shipment answered in parts with token {token} ({why})")

    def __reduce__(self):
        return (type(self), (self.address, self.token, self.restarted))


def unwrap(value: Any) -> Any:
    """The value inside a ``to_serialize`` wrapper: the in-process comm passes messages without
    serialising them, so the wrapper arrives as it was sent."""
    return value.data if isinstance(value, Serialize) else value


def error_reply(exc: BaseException) -> dict[str, Any]:
    """An error as a reply (distributed's error message: the exception and its traceback)."""
    return error_message(exc)


def exception_from(message: dict[str, Any]) -> BaseException:
    """The exception an error message carries, with the remote traceback (an exception that cannot
    be rebuilt here becomes an ``Exception`` with its text, and the remote traceback as a note)."""
    err = {k: unwrap(v) for k, v in message.items()}
    try:
        _, exc, tb = clean_exception(**err)
    except Exception:
        exc, tb = None, None
    if exc is None or (type(exc) is Exception and exc.args and isinstance(exc.args[0], (bytes, bytearray))):
        exc = Exception(err.get("exception_text") or "the remote side sent an exception that could not be read")
        tb = None
        tb_text = err.get("traceback_text")
        if tb_text and hasattr(exc, "add_note"):
            exc.add_note(f"remote traceback:\n{tb_text}")
    return exc.with_traceback(tb) if tb is not None else exc


def raise_if_error(message: Any) -> Any:
    """``message`` itself, unless it is an error reply: then the exception it carries is raised."""
    if isinstance(message, dict) and message.get("status") == "error":
        raise exception_from(message)
    return message


class _Message:
    """A dataclass that travels as a plain dict (msgpack), and back (once per shipment: cheap)."""

    def to_msg(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_msg(cls, message: dict[str, Any]):
        names = _field_names(cls)
        return cls(**{k: v for k, v in message.items() if k in names})


@functools.cache
def _field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls))


@dataclass
class Advice(_Message):
    """What a model server tells its clients: the size of its device batches and what they cost.

    ``size``: rows a device batch takes now (the controller's size within the memory cap);
    ``cap``: the memory cap (None: none known yet); ``throughput``: rows/s it measured at
    ``size`` (None: not yet); ``memory_used``: fraction of the device's memory in use; the
    controller's ``decision``, ``reason`` and ``phase``; for padded samples ``padding_waste``
    (padded elements per real one, over every batch so far)."""

    size: int
    cap: int | None = None
    throughput: float | None = None
    memory_used: float | None = None
    decision: str = "hold"
    reason: str = ""
    phase: str = ""
    padding_waste: float | None = None  # padded samples: padded elements per real one, so far
    ship: int | None = None  # rows a shipment should carry, when not ``size`` (padded or weighed samples)


@dataclass
class DeviceBatchRecord(_Message):
    """One device batch a shipment's rows ran in: its ``rows`` (from every source), the shipment's
    ``own`` rows in it, where the time went on the worker and what the controller made of it
    (``decision``: grow, shrink, hold, or "not shown" with ``reason`` saying why)."""

    rows: int
    own: int
    compute_s: float
    stage_s: float
    wait_s: float
    service_s: float
    latency_s: float
    decision: str
    reason: str
    sources: int = 1
    padding: float | None = None  # padded elements per real one, for a batch of padded samples


@dataclass
class ShipmentReply(_Message):
    """The worker's answer to one shipment: ``pieces`` (``(rows, outputs)``: the outputs of those
    shipment rows, batch dimension first), ``errors`` (``(row, error message)`` of rows that failed
    alone), the device batches it ran in, the server's advice after them, and timings (seconds):
    ``compute_s`` on the device (its rows' share of each device batch they ran in), ``stage_s`` copying in, ``wait_s`` for the device thread,
    ``worker_s`` from arrival to reply. ``unrun``: rows the worker did not run because it is
    closing or restarting (the client sends them elsewhere). ``stuck``: rows of a device batch that
    ran past ``stuck_limit`` seconds (the worker restarts; the client retries them in halves).
    ``reply_file``: the pieces' outputs were written to shared memory (``shm.read_reply``), and each
    piece's own is None. ``more``: this is a part (asked for with ``parts``), with the results
    gathered so far and nothing else; the client calls ``dynbatch_collect`` with this token for the
    next one, until one comes without it."""

    pieces: list[tuple[list[int], Any]]
    errors: list[tuple[int, Any]]
    batches: list[dict[str, Any]]
    advice: dict[str, Any]
    version: int
    device: str
    compute_s: float = 0.0
    stage_s: float = 0.0
    wait_s: float = 0.0
    worker_s: float = 0.0
    cold: bool = False
    compile: dict[str, Any] | None = None
    unrun: list[int] = field(default_factory=list)
    stuck: list[int] = field(default_factory=list)
    stuck_limit: float | None = None
    reply_file: dict[str, Any] | None = None
    more: str | None = None


@dataclass
class Registration(_Message):
    """The scheduler's answer to a registration: the model's ``version`` (new, or the one the spec
    attached to) and the workers able to run it."""

    version: int
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)
    attached: bool = False


@dataclass
class WorkerView(_Message):
    """What a client knows of a worker before it ran anything there."""

    address: str
    name: str
    device: str
    nthreads: int
    resources: dict[str, float]
    benchmark: float | None = None


@dataclass
class HistoryRecord:
    """One row of ``Batcher.history()``: a shipment and what became of it."""

    time: float
    worker: str
    version: int
    size: int
    device_batch: int
    latency: float
    cap: int | None
    controller_size: int | None
    compute_s: float
    wait_s: float
    stage_s: float
    queued_s: float
    stack_s: float
    round_trip_s: float
    worker_s: float
    service_s: float | None
    decision: str
    reason: str
    outcome: str = "served"  # or "stuck", "worker died": the shipment's rows were retried in halves
    isolated: bool = False  # a group of suspects after a worker died, run in device batches of its own
    padding: float | None = None  # padded elements per real one in the device batch (padded samples)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
