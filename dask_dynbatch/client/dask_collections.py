"""Inference over Dask collections where their data lives: ``Batcher.predict(collection)``.

The result is an ordinary lazy collection of the same kind (Array -> Array with the row chunks of
the input, Bag -> Bag, DataFrame/Series -> DataFrame or Series with the index kept). Each of its
tasks takes one block or partition on the worker that holds it and sends the rows, as requests of
that worker's own Batcher of the model (:func:`worker_batcher`, one per worker process and model),
to the model servers: rows of every block, from every worker, meet in the same device batches, and
no row passes through the client. A task waits, holding its worker thread, until the model's
queue in this process holds fewer rows than the model servers take next
(:meth:`~dask_dynbatch.client.dispatcher.Dispatcher.rows_ahead`; not while no server is known, nor
past the rows' ``timeout``, which counts this wait) and its rows fit under the worker's budget of
bytes in flight (``dynbatch.collections.bytes-in-flight``; a block larger than it goes alone), then
leaves the thread to the next task (``secede``) while its rows run: rows of several blocks are in
flight at once, about as many as keep the servers fed (a block per worker thread more at most), and
their bytes stay under the budget (back-pressure: a collection of any length runs in bounded
memory).

A row that fails fails its task, with an error naming the row's position, unless
``on_error="missing"``: its output is then missing (NaN in arrays and frames, None in bags), and
the task logs the failed rows (position and error) as a Dask event of topic :data:`ROW_ERRORS`,
which ``Batcher.row_errors()`` reads. A task that Dask runs again (its worker died) sends its rows
again.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import RowError

if TYPE_CHECKING:
    from .batcher import Batcher

ON_ERROR = ("raise", "missing")
#: the Dask event topic of rows that failed under ``on_error="missing"`` (``client.get_events``)
ROW_ERRORS = "dynbatch-row-errors"

#: the least timeout rows get after their task waited for room (a request's timeout must be positive)
MIN_TIMEOUT_S = 0.001

_batchers: dict[tuple[str, str], Batcher] = {}
_batchers_lock = threading.Lock()


class InFlight:
    """Bytes of rows sent and not yet back, on this worker, under a budget."""

    def __init__(self) -> None:
        self.bytes = 0
        self._room = threading.Condition()

    def acquire(self, nbytes: int, budget: int) -> None:
        """Wait until ``nbytes`` fit under ``budget`` (at once when nothing is in flight)."""
        with self._room:
            self._room.wait_for(lambda: self.bytes == 0 or self.bytes + nbytes <= budget)
            self.bytes += nbytes

    def release(self, nbytes: int) -> None:
        with self._room:
            self.bytes -= nbytes
            self._room.notify_all()


_in_flight = InFlight()


def worker_batcher(name: str) -> Batcher:
    """This worker's Batcher of the model registered as ``name`` (made once per worker process and
    client connection): the tasks of every collection on this worker share its queue."""
    from distributed import get_client

    from .batcher import Batcher

    client = get_client()
    key = (client.id, name)
    with _batchers_lock:
        batcher = _batchers.get(key)
        if batcher is None or batcher._closed:
            batcher = _batchers[key] = Batcher.from_name(client, name)
    return batcher


@dataclass(frozen=True)
class ModelRows:
    """What a block's task runs its rows through: the model registered as ``name``, by this worker's
    Batcher (it travels with the tasks)."""

    name: str
    priority: int = 0
    timeout: float | None = None

    @property
    def label(self) -> str:
        return f"model {self.name!r}"

    def block(self, block: np.ndarray) -> np.ndarray | None:
        """The outputs of an array block's rows as one array, through the bulk path (``predict``:
        the block checked once); None when a row failed (the caller runs the rows one by one)."""
        from .bulk import predict

        batcher = worker_batcher(self.name)
        with _room(block.nbytes, batcher, self.timeout) as timeout:
            try:
                return predict(batcher, block, priority=self.priority, timeout=timeout)
            except Exception:  # a row failed: the rows again, one by one, find which
                return None

    def rows(self, values: list[Any]) -> list[tuple[bool, Any]]:
        """Per row ``(True, output)`` or ``(False, error)``, in order."""
        batcher = worker_batcher(self.name)
        with _room(sum(_nbytes(v) for v in values), batcher, self.timeout) as timeout:
            futures = batcher.map(values, priority=self.priority, timeout=timeout)
            concurrent.futures.wait(futures)
        return [(False, f.exception()) if f.exception() is not None else (True, f.result()) for f in futures]


def collect(runner: Any, values: list[Any], where: Any, on_error: str) -> list[Any]:
    """``runner``'s outputs of ``values``; a failed row raises :class:`RowError` naming its position
    (``where(i)``), or is None with ``on_error="missing"``."""
    if not values:
        return []
    out: list[Any] = []
    failed: list[dict[str, str]] = []
    for i, (ok, value) in enumerate(runner.rows(values)):
        if not ok:
            if on_error == "raise":
                raise RowError(f"{runner.label}: {where(i)} failed: {value!r}") from value
            failed.append({"row": where(i), "error": repr(value)})
            out.append(None)
            continue
        out.append(value)
    if failed:
        log_row_errors(runner.label, failed)
    return out


#: failed rows one task's event lists in full (the rest are counted): the scheduler keeps its
#: events in memory
ROW_ERRORS_PER_EVENT = 100


def log_row_errors(label: str, failed: list[dict[str, str]]) -> None:
    """Record rows that failed under ``on_error="missing"`` as an event on the scheduler (the first
    :data:`ROW_ERRORS_PER_EVENT` of them, and how many failed), from the worker task that ran them;
    outside a worker, as the event of a synchronous client."""
    from distributed import get_client, get_worker

    msg: dict[str, Any] = {"source": label, "rows": failed[:ROW_ERRORS_PER_EVENT], "failed": len(failed)}
    try:
        worker = get_worker()
    except ValueError:  # not in a worker task
        client = get_client()
        if not client.asynchronous:
            client.log_event(ROW_ERRORS, msg)
        return
    msg["task"] = str(worker.get_current_task())
    worker.log_event(ROW_ERRORS, msg)


class _room:
    """Wait until the model's queue in this process runs short of what its workers take next and
    the rows fit under the worker's bytes-in-flight budget, then leave the worker thread to the next
    task while the rows run (``secede``; ``rejoin`` after)."""

    def __init__(self, nbytes: int, batcher: Batcher, timeout: float | None):
        self.nbytes = nbytes
        self.batcher = batcher
        self.timeout = timeout
        self.started = time.monotonic()

    def __enter__(self) -> float | None:
        """The rows' timeout, less the time spent waiting here (the wait is part of their queueing)."""
        import dask.config
        from distributed import secede

        deadline = None if self.timeout is None else self.started + self.timeout
        # every seceded task waits in a thread of its own, and the worker's profiler walks each of
        # them on its event loop every 10 ms: tasks beyond what keeps the servers fed cost time
        self.batcher._wait_for_backlog_room(deadline)
        _in_flight.acquire(self.nbytes, int(dask.config.get("dynbatch.collections.bytes-in-flight", 256 * 2**20)))
        secede()
        return None if deadline is None else max(MIN_TIMEOUT_S, deadline - time.monotonic())

    def __exit__(self, *exc: Any) -> None:
        from distributed import rejoin

        # room first: a task holding a worker thread may wait for it, and rejoining waits for a thread
        _in_flight.release(self.nbytes)
        rejoin()


def _nbytes(row: Any) -> int:
    if isinstance(row, dict):
        return sum(_nbytes(v) for v in row.values())
    if isinstance(row, (tuple, list)):
        return sum(_nbytes(v) for v in row)
    return int(getattr(row, "nbytes", 8))


# -- arrays ----------------------------------------------------------------------------------------


def _array_block(block: np.ndarray, runner: Any, out_shape: tuple, out_dtype: str, on_error: str,
                 block_info: dict | None = None) -> np.ndarray:
    start = block_info[0]["array-location"][0][0] if block_info else 0
    outputs = runner.block(block) if hasattr(runner, "block") else None
    if isinstance(outputs, np.ndarray) and outputs.shape == (len(block), *out_shape):
        return outputs.astype(out_dtype, copy=False)
    outputs = collect(runner, list(block), lambda i: f"row {start + i} of the array", on_error)
    result = np.empty((len(block), *out_shape), dtype=out_dtype)
    for i, value in enumerate(outputs):
        if value is None:
            result[i] = np.nan
        else:
            result[i] = np.asarray(value)
    return result


def predict_array(runner: Any, first: Any, x: Any, on_error: str) -> Any:
    import dask.array as da

    example = first(x[:1].compute()[0])
    if not isinstance(example, np.ndarray):
        raise TypeError(f"{runner.label} returns a {type(example).__name__} per row: predict() of a dask Array needs "
                        "array outputs; use x.to_delayed() or a Bag for other outputs")
    dtype = example.dtype
    if on_error == "missing" and dtype.kind not in "fc":
        dtype = np.result_type(dtype, np.float32)  # a missing row is NaN
    if x.ndim > 1 and any(len(c) > 1 for c in x.chunks[1:]):
        x = x.rechunk({axis: -1 for axis in range(1, x.ndim)})  # whole rows per block
    new_axes = list(range(1, 1 + example.ndim))
    return da.map_blocks(
        _array_block, x, runner=runner, out_shape=example.shape, out_dtype=dtype.str, on_error=on_error, dtype=dtype,
        chunks=(x.chunks[0], *((n,) for n in example.shape)),
        drop_axis=list(range(1, x.ndim)) if x.ndim > 1 else [],
        new_axis=new_axes or None,
        meta=np.empty((0,) * (1 + example.ndim), dtype=dtype),
    )


# -- bags -------------------------------------------------------------------------------------------


def _bag_partition(items: Any, number: Any, runner: Any, on_error: str) -> list[Any]:
    (index,) = list(number)
    return collect(runner, list(items), lambda i: f"item {i} of partition {index} of the bag", on_error)


def predict_bag(runner: Any, x: Any, on_error: str) -> Any:
    import dask.bag as db

    numbers = db.range(x.npartitions, npartitions=x.npartitions)  # each partition's own number
    return x.map_partitions(_bag_partition, numbers, runner=runner, on_error=on_error)


# -- data frames ------------------------------------------------------------------------------------


def frame_samples(part: Any) -> list[Any]:
    """Rows of a pandas DataFrame as dict samples keyed by column; of a Series, its values (a number
    as an array of one element, the smallest sample a model learns)."""
    import pandas as pd

    if isinstance(part, pd.Series):
        return [np.atleast_1d(np.asarray(v)) if isinstance(v, (list, tuple, int, float, np.generic)) else v
                for v in part.tolist()]
    columns = list(part.columns)
    arrays = [part[c].to_numpy() for c in columns]
    return [{c: _leaf(a[i]) for c, a in zip(columns, arrays)} for i in range(len(part))]


def _leaf(value: Any) -> Any:
    return np.asarray(value) if isinstance(value, (list, tuple)) else value


def frame_outputs(outputs: list[Any], index: Any, columns: list[str] | None) -> Any:
    """Per-row outputs as a pandas DataFrame (dict outputs, or arrays of several values) or Series."""
    import pandas as pd

    if columns is None:
        return pd.Series([np.nan if o is None else _scalar(o) for o in outputs], index=index)
    rows = []
    for o in outputs:
        if o is None:
            rows.append({c: np.nan for c in columns})
        elif isinstance(o, dict):
            rows.append({c: _scalar(o[c]) for c in columns})
        else:
            values = np.asarray(o).reshape(-1)
            rows.append(dict(zip(columns, values.tolist())))
    return pd.DataFrame(rows, index=index, columns=columns)


def _scalar(value: Any) -> Any:
    array = np.asarray(value)
    return array.item() if array.size == 1 else array


def _frame_partition(part: Any, runner: Any, columns: list[str] | None, on_error: str,
                     partition_info: dict | None = None) -> Any:
    number = partition_info["number"] if partition_info else "?"
    labels = part.index
    outputs = collect(runner, frame_samples(part), lambda i: f"the row at index {labels[i]} (partition {number})",
                      on_error)
    return frame_outputs(outputs, part.index, columns)


def predict_frame(runner: Any, first: Any, x: Any, on_error: str) -> Any:
    head = x.head(1, npartitions=-1)
    if len(head) == 0:
        raise ValueError("predict() of an empty frame: no row to learn the output from")
    example = first(frame_samples(head)[0])
    columns: list[str] | None
    if isinstance(example, dict):
        columns = list(example)
    else:
        size = np.asarray(example).size
        columns = None if size == 1 else [str(i) for i in range(size)]
    meta = frame_outputs([example], head.index, columns).iloc[:0]
    return x.map_partitions(_frame_partition, runner=runner, columns=columns, on_error=on_error, meta=meta)


def predict_collection(batcher: Batcher, x: Any, *, on_error: str = "raise", priority: int = 0,
                       timeout: float | str | None = None) -> Any:
    """See :meth:`Batcher.predict <dask_dynbatch.Batcher.predict>`."""
    from ..spec import parse_seconds

    seconds = None if timeout is None else parse_seconds(timeout, "timeout")
    runner = ModelRows(batcher.spec.name, priority, seconds)
    # one row runs from here: what the collection's outputs look like
    return run_collection(runner, lambda sample: batcher.submit(sample).result(), x, on_error=on_error)


def run_collection(runner: Any, first: Any, x: Any, *, on_error: str = "raise") -> Any:
    """``x`` (a dask Array, Bag, DataFrame or Series) with every row run through ``runner`` in the
    collection's own tasks; ``first(sample)`` runs one row from the client (the output's shape)."""
    import dask.array as da
    import dask.bag as db

    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, not {on_error!r}")
    if isinstance(x, da.Array):
        return predict_array(runner, first, x, on_error)
    if isinstance(x, db.Bag):
        return predict_bag(runner, x, on_error)
    if type(x).__module__.startswith("dask.dataframe"):  # dask.dataframe needs pandas: imported only for frames
        import dask.dataframe as dd

        if isinstance(x, (dd.DataFrame, dd.Series)):
            return predict_frame(runner, first, x, on_error)
    raise TypeError(f"predict() takes a dask Array, Bag, DataFrame or Series (or an in-memory array), not a "
                    f"{type(x).__name__}")
