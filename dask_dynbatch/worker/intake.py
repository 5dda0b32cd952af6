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
