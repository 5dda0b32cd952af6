"""Many requests at once: an array of samples in, one array of results out.

:meth:`Batcher.predict <dask_dynbatch.Batcher.predict>` checks the array's rows against the model's
input signature once (not row by row, as ``map`` checks arbitrary samples) and queues them in
blocks of :data:`BLOCK_ROWS` rows, each one request with one future (:mod:`dask_dynbatch.core.blocks`),
not a request per row. :func:`gather` joins the results of request futures into one array when
their rows share a shape and dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.blocks import join_outputs
from ..core.requests import RequestFuture
from ..core.rows import as_numpy_sample
from ..core.tree import Structure
from ..errors import InputSignatureError
from .progress import ProgressBar
from .samples import check_sample

if TYPE_CHECKING:
    from .batcher import Batcher

#: predict() queues an array in blocks of this many rows: one request, and one future, each
BLOCK_ROWS = 4096


def gather(futures: Sequence[Future], *, progress: bool = False) -> Any:
    """The results of request futures, in order: one stacked array (NumPy, or torch when the
    results are tensors) when every result is an array of the same shape and dtype, else a list.

    Raises the exception of the first request that failed. ``progress=True`` shows a progress bar
    while waiting (see :func:`dask_dynbatch.progress`).

    Examples
    --------
    >>> futures = batcher.map(samples)       # doctest: +SKIP
    >>> outputs = ddb.gather(futures)        # doctest: +SKIP
    >>> outputs.shape                        # doctest: +SKIP
    (100000, 10)
    """
    bar = ProgressBar(futures) if progress and futures else None
    try:
        results = [f.result() for f in futures]
    finally:
        if bar is not None:
            bar.wait() if all(f.done() for f in futures) else bar.stop()
    return stack_results(results)


def stack_results(results: list[Any]) -> Any:
    """``results`` as one array when they are arrays of one shape and dtype, else as they are."""
    if not results:
        return results
    first = results[0]
    if isinstance(first, np.ndarray):
        if all(isinstance(r, np.ndarray) and r.shape == first.shape and r.dtype == first.dtype for r in results):
            return np.stack(results)
        return results
    if type(first).__module__.startswith("torch"):
        import torch

        if all(isinstance(r, torch.Tensor) and r.shape == first.shape and r.dtype == first.dtype for r in results):
            return torch.stack(results)
    return results


def predict(batcher: Batcher, x: Any, *, priority: int = 0, timeout: float | str | None = None,
            progress: bool = False, on_error: str = "raise") -> Any:
    """Run the model on every row of ``x`` (an array whose first dimension indexes the samples, or
    a Dask collection); see :meth:`Batcher.predict <dask_dynbatch.Batcher.predict>`."""
    from dask import is_dask_collection

    if is_dask_collection(x):
        from .dask_collections import predict_collection

        return predict_collection(batcher, x, on_error=on_error, priority=priority, timeout=timeout)
    if on_error != "raise":
        raise ValueError("on_error applies to Dask collections; for an in-memory array use map() and each future")
    rows, as_torch = _rows(batcher, x)
    futures: list[RequestFuture] = []
    bar = None
    if batcher.spec.structured or isinstance(batcher._model.signature, Structure):
        # rows of padded or structured models are checked one by one (each row is one sample)
        bar = ProgressBar(futures, total=len(rows)) if progress and len(rows) else None  # shows the queueing too
        try:
            batcher._submit_all(list(rows), priority, timeout, raise_rejected=True, into=futures)
            out = gather(futures)
        finally:
            if bar is not None:
                bar.wait() if all(f.done() for f in futures) and len(futures) == len(rows) else bar.stop()
        return out
    sizes = batcher._submit_blocks(np.ascontiguousarray(rows), BLOCK_ROWS, priority, timeout, into=futures)
    bar = ProgressBar(futures, sizes=sizes, label="rows") if progress and futures else None
    try:
        results = [f.result() for f in futures]
    finally:
        if bar is not None:
            bar.wait() if all(f.done() for f in futures) else bar.stop()
    if not results:
        return results
    out = join_outputs(results, sizes)
    if as_torch and isinstance(out, np.ndarray):
        import torch

        out = torch.from_numpy(out)
    return out


def _rows(batcher: Batcher, x: Any) -> tuple[np.ndarray, bool]:
    """``x`` as a NumPy array of checked samples, and whether it was a torch tensor."""
    as_torch = type(x).__module__.startswith("torch")
    array = as_numpy_sample(x)
    if array.ndim == 0:
        raise InputSignatureError(f"model {batcher.spec.name!r}: predict() takes an array of samples, "
                                  "its first dimension indexing them; got a scalar")
    if len(array) == 0 or batcher.spec.structured or isinstance(batcher._model.signature, Structure):
        return array, as_torch
    signature = batcher._model.signature
    if signature is None:
        check_sample(array[0], batcher._model)  # learns the signature from the first row
        signature = batcher._model.signature
    assert signature is not None
    shape, dtype = signature
    if array.shape[1:] != shape or array.dtype != dtype:
        raise InputSignatureError(
            f"model {batcher.spec.name!r} expects samples of shape {shape} and dtype {dtype}; predict() got "
            f"an array of shape {array.shape} and dtype {array.dtype} (its first dimension indexes the samples)"
        )
    return array, as_torch
