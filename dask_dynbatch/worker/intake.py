"""What a shipment brings to a worker, made into the rows of a :class:`~dask_dynbatch.worker.server.Shipment`.

Rows arrive inline (stacked, or as stacked chunks when large: no copy, each chunk becomes a part),
in a client's shared-memory slot on the same host (a view: copied out before the reply), or as
Dask Futures whose values live on the cluster (fetched from this worker or its peers, then
checked against the model's input signature: a row that does not fit fails alone).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from ..core.tree import Ragged, Structure, TreeError, TreeRows, flatten
from ..errors import InputSignatureError
from ..protocol import unwrap


def inline_arrays(batch: Any) -> list[np.ndarray]:
    """The arrays of rows a shipment carries (one stacked array, or a list of stacked chunks)."""
    batch = unwrap(batch)
    if batch is None:
        return []
    if isinstance(batch, list):
        return [unwrap(chunk) for chunk in batch]
    return [batch]


def assemble_keyed(n: int, inline: list[np.ndarray], keyed: list[tuple[int, Any]], data: dict,
                   signature: tuple[tuple[int, ...], str] | None = None
                   ) -> tuple[np.ndarray, list[int], dict[int, BaseException]]:
    """Rows given inline and rows given as Dask Futures (``keyed``: ``(row, key)``, values in
    ``data``), in order, as one array of the rows that can run, their positions among the
    shipment's ``n`` rows, and ``row -> error`` for the others.

    Rows must match ``signature`` (the client's), else the inline rows, else the most common shape
    and dtype among the fetched rows."""
    joined = np.concatenate(inline) if len(inline) > 1 else (inline[0] if inline else None)
    values: dict[int, np.ndarray] = {}
    errors: dict[int, BaseException] = {}
    not_arrays: dict[int, str] = {}
    for row, key in keyed:
        try:
            values[row] = np.asarray(data[key])
        except Exception as exc:  # e.g. a ragged list
            not_arrays[row] = str(exc)
    if signature is not None:
        shape, dtype = tuple(signature[0]), np.dtype(signature[1])
    elif joined is not None and len(joined):
        shape, dtype = joined[0].shape, joined[0].dtype
    elif values:
        shape, dtype = Counter((v.shape, v.dtype) for v in values.values()).most_common(1)[0][0]
    else:
        shape, dtype = (), np.dtype(float)  # every row failed
    full = np.zeros((n, *shape), dtype=dtype)
    keyed_rows = {row for row, _ in keyed}
    inline_rows = [r for r in range(n) if r not in keyed_rows]
    if inline_rows:
        full[inline_rows] = joined
    for row, key in keyed:
        if row in not_arrays:
            errors[row] = InputSignatureError(
                f"input from Dask Future {key!r} is not an array ({not_arrays[row]}); "
                f"the model expects shape {shape} and dtype {dtype}"
            )
            continue
        value = values[row]
        if value.shape != shape or value.dtype != dtype:
            errors[row] = InputSignatureError(
                f"input from Dask Future {key!r} has shape {value.shape} and dtype {value.dtype}; "
                f"the model expects shape {shape} and dtype {dtype}"
            )
        else:
            full[row] = value
    good = [r for r in range(n) if r not in errors]
    return (full if len(good) == n else full[good]), good, errors


def as_tree(value: Any) -> Any:
    """A tree that travelled as msgpack lists, as the tuples it was made of."""
    if isinstance(value, list):
        return tuple(as_tree(v) for v in value)
    return value


def tree_from_slot(read: Any, client: str, shm: dict[str, Any], rows: int) -> TreeRows:
    """The ``rows`` structured rows a client laid out in its slot (``read(client, name, shape,
    dtype, offset)`` gives views); see :func:`~dask_dynbatch.client.transport.tree_into_slot`."""
    name = shm["name"]
    leaves: list[Any] = []
    for entry in shm["leaves"]:
        kind, start, shape, dtype = entry[:4]
        values = read(client, name, tuple(shape), dtype, offset=start)
        if kind == "r":
            offsets = read(client, name, (rows + 1,), "<i8", offset=entry[4])
            leaves.append(Ragged(values, offsets))
        else:
            leaves.append(values)
    costs = shm.get("costs")
    return TreeRows(as_tree(shm["tree"]), leaves, None if costs is None else np.asarray(costs, dtype=np.float64))


def assemble_keyed_tree(n: int, inline: list[TreeRows], keyed: list[tuple[int, Any]], data: dict,
                        structure: Structure) -> tuple[TreeRows | None, list[int], dict[int, BaseException]]:
    """:func:`assemble_keyed` for structured samples: the fetched values are checked against
    ``structure`` leaf by leaf; inline rows keep their order among them."""
    joined = TreeRows.concat(inline) if inline else None
    keyed_rows = dict(keyed)
    samples: list[list[np.ndarray]] = []
    good: list[int] = []
    errors: dict[int, BaseException] = {}
    at = 0
    for row in range(n):
        if row not in keyed_rows:
            assert joined is not None  # rows not fetched came inline
            samples.append(joined.row(at))
            at += 1
            good.append(row)
            continue
        key = keyed_rows[row]
        try:
            tree, leaves = flatten(data[key])
            problem = structure.mismatch(tree, leaves)
        except (TreeError, TypeError) as exc:
            problem = str(exc)
        if problem is not None:
            errors[row] = InputSignatureError(f"input from Dask Future {key!r}: {problem}")
            continue
        samples.append(leaves)
        good.append(row)
    if not samples:
        return None, good, errors
    # rows fetched here were not weighed by the client: the shipment is weighed by the default
    rows = TreeRows.stack(structure.tree, samples, structure.ragged)
    return rows, good, errors
