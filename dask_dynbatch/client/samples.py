"""A request's sample, checked against the model's input signature before it is queued.

The signature is declared in the spec (``input_shape`` and ``input_dtype``) or learned from the
first sample: an array of numbers or booleans, at least one dimension, at least one element. A
structured sample (a nested tuple/list/dict of arrays, CPU tensors and numbers) has a signature
over its structure and every leaf; a leaf the spec pads (``pad_value``) may differ in length along
its first axis. A sample that does not match is refused at ``submit`` with an
:class:`~dask_dynbatch.InputSignatureError` that says what the model takes and what it got (for a
structured sample, at which leaf); it never reaches a worker.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.rows import as_numpy_sample
from ..core.tree import Structure, TreeError, describe, flatten, leaf_paths, top_keys
from ..errors import InputSignatureError
from .registration import RegisteredModel

#: dtype kinds a learned input signature accepts: booleans, integers, floats, complex numbers
_NUMERIC_KINDS = "biufc"


def check_sample(x: Any, model: RegisteredModel) -> np.ndarray:
    """``x`` as a NumPy sample that matches ``model``'s input signature (learning it from ``x`` when
    there is none yet), or a clear error."""
    name = model.name
    signature = model.signature
    assert not isinstance(signature, Structure)  # check_any sends structured samples elsewhere
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


class Sample:
    """A structured (or padded, or weighed) sample: its tree, its leaves, and its cost."""

    __slots__ = ("tree", "leaves", "cost")

    def __init__(self, tree: tuple, leaves: list[np.ndarray], cost: float):
        self.tree = tree
        self.leaves = leaves
        self.cost = cost

    @property
    def nbytes(self) -> int:
        return sum(leaf.nbytes for leaf in self.leaves)


def is_structured(x: Any) -> bool:
    """Whether ``x`` is a structured sample when the model has no signature yet: a dict, or a
    tuple/list holding anything but numbers (a flat list of numbers is an array, as NumPy makes it)."""
    if isinstance(x, dict):
        return True
    if isinstance(x, (tuple, list)):
        return any(not isinstance(v, (bool, int, float, complex, np.generic)) for v in x)
    return False


def check_structured(x: Any, model: RegisteredModel) -> Sample:
    """``x`` as a :class:`Sample` that matches ``model``'s structure (learning it from ``x`` when
    there is none yet), or a clear error naming the leaf."""
    spec = model.spec
    name = model.name
    try:
        tree, leaves = flatten(x)
    except TreeError as exc:
        raise InputSignatureError(f"model {name!r}: {exc}") from None
    if not leaves:
        raise InputSignatureError(f"model {name!r}: a sample must hold at least one array or number; received "
                                  f"{describe(tree)}")
    structure = model.signature if isinstance(model.signature, Structure) else None
    if structure is None:
        structure = _learn(tree, leaves, model)
    problem = structure.mismatch(tree, leaves)
    if problem is not None:
        raise InputSignatureError(f"model {name!r}: {problem}")
    longest = structure.length(leaves)
    if spec.cost is not None:
        try:
            cost = float(spec.cost(x))
        except Exception as exc:
            raise InputSignatureError(f"model {name!r}: ModelSpec.cost failed on this sample: {exc!r}") from exc
        if not cost > 0:
            raise InputSignatureError(f"model {name!r}: ModelSpec.cost must be positive, not {cost!r}")
    else:
        cost = float(longest or 1)
    return Sample(tree, leaves, cost)


def _learn(tree: tuple, leaves: list[np.ndarray], model: RegisteredModel) -> Structure:
    spec = model.spec
    paths = leaf_paths(tree)
    keys = top_keys(tree)
    pads, shapes = [], []
    for j, leaf in enumerate(leaves):
        where = paths[j] or "sample"
        if leaf.dtype.kind not in _NUMERIC_KINDS:
            raise InputSignatureError(
                f"model {model.name!r}: leaf {where} must be an array of numbers or booleans; received dtype {leaf.dtype}")
        pad = spec.pad_for(paths[j], keys[j])
        if pad is not None and leaf.ndim == 0:
            pad = None  # a scalar leaf has no length to pad
        if pad is not None and leaf.shape[0] == 0:
            raise InputSignatureError(f"model {model.name!r}: leaf {where} is empty")
        pads.append(pad)
        shapes.append((None, *leaf.shape[1:]) if pad is not None else leaf.shape)
    if isinstance(spec.pad_value, dict):
        missing = [k for k in spec.pad_value if k not in keys and k not in paths]
        if missing:
            raise InputSignatureError(f"model {model.name!r}: pad_value names {missing}, which are not leaves "
                                      f"of the sample ({describe(tree)}; leaves {paths})")
    structure = Structure(tree, shapes, [leaf.dtype for leaf in leaves], pads)
    model.signature = structure
    return structure


def check_any(x: Any, model: RegisteredModel) -> np.ndarray | Sample:
    """``x`` checked as a plain array (the fast path) or as a structured :class:`Sample`, by what
    the model takes (or, before it knows, by what ``x`` is)."""
    signature = model.signature
    if type(signature) is tuple and not model.spec.structured:
        return check_sample(x, model)
    if model.spec.structured or isinstance(signature, Structure) or (signature is None and is_structured(x)):
        return check_structured(x, model)
    return check_sample(x, model)
