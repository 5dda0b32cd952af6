"""A request's sample, checked against the model's input signature before it is queued.

The signature is declared in the spec (``input_shape`` and ``input_dtype``) or learned from the
first sample: an array of numbers or booleans, at least one dimension, at least one element. A
sample that does not match is refused at ``submit`` with an :class:`~dask_dynbatch.InputSignatureError`
that says what the model takes and what it got; it never reaches a worker.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.rows import as_numpy_sample
from ..errors import InputSignatureError
from .registration import RegisteredModel

#: dtype kinds a learned input signature accepts: booleans, integers, floats, complex numbers
_NUMERIC_KINDS = "biufc"


def check_sample(x: Any, model: RegisteredModel) -> np.ndarray:
    """``x`` as a NumPy sample that matches ``model``'s input signature (learning it from ``x`` when
    there is none yet), or a clear error."""
    name = model.name
    signature = model.signature
    try:
        sample = as_numpy_sample(x)
    except TypeError:
        raise
    except Exception as exc:  # ragged nested lists, objects whose __array__ fails
        if signature is not None:
            takes = f"model {name!r} expects one sample of shape {signature[0]} and dtype {signature[1]}"
        else:
            takes = f"model {name!r} takes one sample as an array"
        raise InputSignatureError(f"{takes}; could not make an array of the {type(x).__name__} given ({exc})") from None
    if signature is not None:  # the hot path: one comparison per request, no string formatting
        shape, dtype = signature
        if sample.shape == shape and sample.dtype == dtype:
            return sample
        raise InputSignatureError(
            f"model {name!r} expects one sample of shape {shape} and dtype {dtype} "
            f"(no batch dimension); {_received(x, sample)}"
        )
    received = _received(x, sample)
    if sample.dtype.kind not in _NUMERIC_KINDS:
        raise InputSignatureError(
            f"model {name!r} takes arrays of numbers or booleans; {received}. To send other values, "
            "declare ModelSpec(input_shape=..., input_dtype=...)"
        )
    if sample.ndim == 0:
        raise InputSignatureError(
            f"model {name!r}: a sample must be an array with at least one dimension, not a scalar; {received}. "
            "For scalar samples declare ModelSpec(input_shape=(), input_dtype=...)"
        )
    if sample.size == 0:
        raise InputSignatureError(f"model {name!r}: a sample must not be empty; {received}")
    model.signature = (sample.shape, sample.dtype)
    return sample


def _received(x: Any, sample: np.ndarray) -> str:
    text = f"received shape {sample.shape} and dtype {sample.dtype}"
    return text if isinstance(x, np.ndarray) else f"{text} (from a {type(x).__name__})"
