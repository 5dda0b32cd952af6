"""Structured samples: a sample that is a nested tuple/list/dict of arrays, flattened into its
structure (a hashable *tree*) and its leaves; rows of such samples stacked leaf by leaf; leaves
whose rows differ in length along their first axis kept ragged (values and offsets) until a batch
pads them to its longest row (pure: NumPy only).

The tree of a plain array is :data:`LEAF`; such samples never come here (they travel as one
stacked array, the fast path).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: the tree of a sample that is one array
LEAF: tuple = ("leaf",)


class TreeError(ValueError):
    """A value that cannot be a structured sample; ``path`` says which leaf."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path or 'the sample'}: {message}")
        self.path = path


def as_leaf(value: Any, path: str) -> np.ndarray:
    """One leaf as a NumPy array: arrays as they are, CPU torch tensors without a copy, Python and
    NumPy numbers and booleans as 0-d arrays."""
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__.startswith("torch"):
        if getattr(value, "device", None) is not None and value.device.type != "cpu":
            raise TypeError(f"{path or 'the sample'}: submit() takes CPU tensors; move it to the CPU first (tensor.cpu())")
        return value.detach().numpy()
    if isinstance(value, (bool, int, float, complex, np.generic)):
        return np.asarray(value)
    raise TreeError(path, f"a leaf must be an array, a CPU tensor or a number, not a {type(value).__name__}")


def flatten(sample: Any, path: str = "") -> tuple[tuple, list[np.ndarray]]:
    """``(tree, leaves)`` of a sample (leaves depth-first, dict keys in their order)."""
    leaves: list[np.ndarray] = []
    tree = _flatten(sample, path, leaves)
    return tree, leaves


def _flatten(x: Any, path: str, leaves: list[np.ndarray]) -> tuple:
    if isinstance(x, dict):
        keys = tuple(x)
        for k in keys:
            if not isinstance(k, (str, int)):
                raise TreeError(path, f"dict keys must be strings or integers, not {type(k).__name__}")
        return ("dict", keys, tuple(_flatten(x[k], f"{path}[{k!r}]", leaves) for k in keys))
    if isinstance(x, (tuple, list)):
        kind = "tuple" if isinstance(x, tuple) else "list"
        return (kind, tuple(_flatten(v, f"{path}[{i}]", leaves) for i, v in enumerate(x)))
    leaves.append(as_leaf(x, path))
    return LEAF


def unflatten(tree: tuple, leaves: Sequence[Any]) -> Any:
    """The structure ``tree`` with ``leaves`` in place (the inverse of :func:`flatten`)."""
    it = iter(leaves)
    out = _unflatten(tree, it)
    return out


def _unflatten(tree: tuple, it) -> Any:
    kind = tree[0]
    if kind == "leaf":
        return next(it)
    if kind == "dict":
        return {k: _unflatten(t, it) for k, t in zip(tree[1], tree[2])}
    children = [_unflatten(t, it) for t in tree[1]]
    return tuple(children) if kind == "tuple" else children


def leaf_paths(tree: tuple, path: str = "") -> list[str]:
    """The path of every leaf, in leaf order (``"['input_ids']"``, ``"[1]"``; ``""`` for a plain array)."""
    kind = tree[0]
    if kind == "leaf":
        return [path]
    if kind == "dict":
        return [p for k, t in zip(tree[1], tree[2]) for p in leaf_paths(t, f"{path}[{k!r}]")]
    return [p for i, t in enumerate(tree[1]) for p in leaf_paths(t, f"{path}[{i}]")]


def top_keys(tree: tuple) -> list[Any]:
    """For each leaf, the key of the dict sample it is directly under (None for other leaves)."""
    if tree[0] != "dict":
        return [None] * len(leaf_paths(tree))
    out: list[Any] = []
    for key, child in zip(tree[1], tree[2]):
        out.extend([key] if child == LEAF else [None] * len(leaf_paths(child)))
    return out


def describe(tree: tuple) -> str:
    """The structure in words, for error messages (``dict with keys ['a', 'b']``)."""
    kind = tree[0]
    if kind == "leaf":
        return "an array"
    if kind == "dict":
        return f"a dict with keys {list(tree[1])}"
    return f"a {kind} of {len(tree[1])}"


def shape_text(shape: tuple) -> str:
    """A leaf's shape for messages, ``L`` where its length varies."""
    return "(" + ", ".join("L" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


class Structure:
    """The input signature of a model that takes structured samples: the tree, and per leaf its
    shape (``None`` first for a padded leaf, whose length varies), dtype and pad value (None: the
    leaf keeps one shape)."""

    __slots__ = ("tree", "shapes", "dtypes", "pads", "paths")

    def __init__(self, tree: tuple, shapes: list[tuple], dtypes: list[np.dtype], pads: list[Any]):
        self.tree = tree
        self.shapes = [tuple(s) for s in shapes]
        self.dtypes = [np.dtype(d) for d in dtypes]
        self.pads = list(pads)
        self.paths = leaf_paths(tree)

    @property
    def ragged(self) -> list[bool]:
        return [pad is not None for pad in self.pads]

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Structure) and self.tree == other.tree and self.shapes == other.shapes
                and self.dtypes == other.dtypes and self.pads == other.pads)

    def __hash__(self) -> int:
        return hash((self.tree, tuple(self.shapes)))

    def __repr__(self) -> str:
        leaves = ", ".join(f"{p or 'sample'}: {shape_text(s)} {d}" for p, s, d in zip(self.paths, self.shapes, self.dtypes))
        return f"{describe(self.tree)} ({leaves})"

    def mismatch(self, tree: tuple, leaves: Sequence[np.ndarray]) -> str | None:
        """Why a sample (``tree``, ``leaves``) does not fit, naming the leaf; None when it does."""
        if tree != self.tree:
            return f"takes {self!r}; received {describe(tree)}"
        longest = 0
        for j, leaf in enumerate(leaves):
            shape, dtype, pad = self.shapes[j], self.dtypes[j], self.pads[j]
            where = self.paths[j] or "sample"
            if leaf.dtype != dtype or leaf.ndim != len(shape) or (
                    leaf.shape != shape if pad is None else leaf.shape[1:] != shape[1:]):
                return (f"leaf {where} must have shape {shape_text(shape)} and dtype {dtype} (no batch "
                        f"dimension); received shape {leaf.shape} and dtype {leaf.dtype}")
            if pad is not None:
                if leaf.shape[0] == 0:
                    return f"leaf {where} is empty"
                if longest and leaf.shape[0] != longest:
                    return (f"the padded leaves of one sample must have one length; leaf {where} has "
                            f"{leaf.shape[0]}, an earlier one {longest}")
                longest = leaf.shape[0]
        return None

    def length(self, leaves: Sequence[np.ndarray]) -> int:
        """A fitting sample's length (of its padded leaves; 0 without any)."""
        return next((len(leaf) for leaf, pad in zip(leaves, self.pads) if pad is not None), 0)


class Ragged:
    """Rows of one leaf whose first axis differs from row to row: the rows joined along that axis
    (``values``) and where each starts (``offsets``, one more than the rows)."""

    __slots__ = ("values", "offsets")

    def __init__(self, values: np.ndarray, offsets: np.ndarray):
        self.values = values
        self.offsets = offsets

    @classmethod
    def of(cls, rows: Sequence[np.ndarray]) -> Ragged:
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in rows], out=offsets[1:])
        values = np.concatenate(rows) if rows else np.zeros((0,))
        return cls(values, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.offsets.nbytes

    def __getitem__(self, key: slice) -> Ragged:
        start, stop, _ = key.indices(len(self))
        stop = max(start, stop)
        a, b = int(self.offsets[start]), int(self.offsets[stop])
        return Ragged(self.values[a:b], self.offsets[start : stop + 1] - a)

    def row(self, i: int) -> np.ndarray:
        return self.values[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def take(self, index: np.ndarray) -> Ragged:
        """Rows ``index`` in that order, their values copied into one array."""
        index = np.asarray(index, dtype=np.int64)
        starts = self.offsets[index]
        lengths = self.offsets[index + 1] - starts
        offsets = np.zeros(len(index) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # each value's source position: its row's start, plus its place within the row
        source = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return Ragged(self.values[source], offsets)

    @staticmethod
    def concat(parts: Sequence[Ragged]) -> Ragged:
        if len(parts) == 1:
            return parts[0]
        values = np.concatenate([p.values for p in parts])
        # every part's offsets start at 0: the lengths are the steps within each part's offsets
        joined = np.concatenate([p.offsets for p in parts])
        steps = np.diff(joined)
        keep = np.ones(len(steps), dtype=bool)
        keep[np.cumsum([len(p.offsets) for p in parts])[:-1] - 1] = False  # the steps between two parts
        offsets = np.zeros(len(joined) - len(parts) + 1, dtype=np.int64)
        np.cumsum(steps[keep], out=offsets[1:])
        return Ragged(values, offsets)

    def padded(self, length: int, pad: Any) -> np.ndarray:
        """The rows as one array ``(rows, length, ...)``, each row's tail filled with ``pad``."""
        n = len(self)
        out = np.full((n, length, *self.values.shape[1:]), pad, dtype=self.values.dtype)
        lengths = self.lengths
        if n and (lengths == length).all():
            return self.values.reshape(out.shape)
        # one boolean mask places every value: row i's first lengths[i] positions
        mask = np.arange(length)[None, :] < lengths[:, None]
        out[mask] = self.values
        return out


class TreeRows:
    """Rows of structured (or padded) samples: the tree, and per leaf either the rows stacked on a
    new first axis or a :class:`Ragged`. Has ``len`` and row slicing, like a stacked array."""

    __slots__ = ("tree", "leaves", "costs")

    def __init__(self, tree: tuple, leaves: list[Any], costs: np.ndarray | None = None):
        self.tree = tree
        self.leaves = leaves
        self.costs = costs  # per row, when the spec weighs requests (``ModelSpec.cost``)

    @classmethod
    def stack(cls, tree: tuple, samples: Sequence[Sequence[np.ndarray]], ragged: Sequence[bool],
              costs: Sequence[float] | None = None) -> TreeRows:
        """Rows from samples given as their leaf lists (all of ``tree``); ``ragged[j]``: leaf ``j``
        differs in length from row to row."""
        leaves: list[Any] = []
        for j, is_ragged in enumerate(ragged):
            column = [s[j] for s in samples]
            leaves.append(Ragged.of(column) if is_ragged else np.stack(column))
        return cls(tree, leaves, None if costs is None else np.asarray(costs, dtype=np.float64))

    def __len__(self) -> int:
        return len(self.leaves[0]) if self.leaves else 0

    def __getitem__(self, key: slice) -> TreeRows:
        if not isinstance(key, slice):
            raise TypeError("TreeRows take row slices only")
        return TreeRows(self.tree, [leaf[key] for leaf in self.leaves], None if self.costs is None else self.costs[key])

    @property
    def nbytes(self) -> int:
        return sum(leaf.nbytes for leaf in self.leaves)

    def take(self, index: np.ndarray) -> TreeRows:
        """Rows ``index`` in that order (copied), as :meth:`concat` of their single rows would give."""
        index = np.asarray(index, dtype=np.int64)
        return TreeRows(self.tree, [leaf.take(index) if isinstance(leaf, Ragged) else leaf[index] for leaf in self.leaves],
                        None if self.costs is None else self.costs[index])

    def lengths(self) -> np.ndarray | None:
        """Each row's length (the longest of its ragged leaves), or None without ragged leaves."""
        ragged = [leaf.lengths for leaf in self.leaves if isinstance(leaf, Ragged)]
        if not ragged:
            return None
        return np.maximum.reduce(ragged) if len(ragged) > 1 else ragged[0]

    def row(self, i: int) -> list[np.ndarray]:
        return [leaf.row(i) if isinstance(leaf, Ragged) else leaf[i] for leaf in self.leaves]

    @staticmethod
    def concat(parts: Sequence[TreeRows]) -> TreeRows:
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        leaves = []
        for j, leaf in enumerate(first.leaves):
            column = [p.leaves[j] for p in parts]
            leaves.append(Ragged.concat(column) if isinstance(leaf, Ragged) else np.concatenate(column))
        costs = None if first.costs is None else np.concatenate([p.costs for p in parts])
        return TreeRows(first.tree, leaves, costs)

    def padded(self, pads: Sequence[Any]) -> tuple[list[np.ndarray], int | None]:
        """Every leaf as one array, ragged ones padded to the longest row (``pads[j]``: leaf ``j``'s
        pad value); returns the leaves and that length (None without ragged leaves)."""
        lengths = self.lengths()
        longest = int(lengths.max()) if lengths is not None and len(lengths) else None
        leaves = [leaf.padded(longest, pads[j]) if isinstance(leaf, Ragged) and longest is not None else leaf
                  for j, leaf in enumerate(self.leaves)]
        return leaves, longest


class Batch:
    """A device batch of structured samples as the model takes it: the leaves (host arrays or device
    tensors, ragged ones padded to ``length``), the structure, and each row's own ``lengths``.
    Has ``len`` and row slicing (out-of-memory splits, bisection)."""

    __slots__ = ("tree", "leaves", "length", "lengths", "ragged")

    def __init__(self, tree: tuple, leaves: list[Any], length: int | None, lengths: np.ndarray | None,
                 ragged: tuple[bool, ...] = ()):
        self.tree = tree
        self.leaves = leaves
        self.length = length
        self.lengths = lengths
        self.ragged = ragged  # per leaf: padded to ``length`` along axis 1

    def __len__(self) -> int:
        return len(self.leaves[0]) if self.leaves else 0

    def __getitem__(self, key: slice) -> Batch:
        if not isinstance(key, slice):
            raise TypeError("a Batch takes row slices only")
        lengths = None if self.lengths is None else self.lengths[key]
        return Batch(self.tree, [leaf[key] for leaf in self.leaves], self.length, lengths, self.ragged)

    def structure(self) -> Any:
        """The batch as the sample's structure, each leaf with the batch on its first axis."""
        return unflatten(self.tree, self.leaves)

    def map(self, fn) -> Batch:
        return Batch(self.tree, [fn(leaf) for leaf in self.leaves], self.length, self.lengths, self.ragged)

    @property
    def waste(self) -> tuple[int, int]:
        """``(padded, real)`` elements of rows along the padded axis (``(0, rows)`` when nothing is padded)."""
        if self.lengths is None or self.length is None:
            return 0, len(self)
        real = int(self.lengths.sum())
        return self.length * len(self) - real, real


def learn_fixed(outputs: Any, length: int | None, fixed: set[str], path: str = "") -> None:
    """Add to ``fixed`` the paths of batch outputs whose axis 1 is not the padded ``length`` (so
    is not the sequence axis, and is never cut, also in a batch whose length happens to equal it)."""
    if length is None:
        return
    if isinstance(outputs, dict):
        for k, v in outputs.items():
            learn_fixed(v, length, fixed, f"{path}[{k!r}]")
    elif isinstance(outputs, tuple):
        for i, v in enumerate(outputs):
            learn_fixed(v, length, fixed, f"{path}[{i}]")
    elif isinstance(outputs, list):  # one element per row: its axis 0
        for v in outputs:
            shape = getattr(v, "shape", None)
            if shape is None or len(shape) < 1 or shape[0] != length:
                fixed.add(path)
                return
    else:
        shape = getattr(outputs, "shape", None)
        if shape is None or len(shape) < 2 or shape[1] != length:
            fixed.add(path)


def cut_length(outputs: Any, padded: int, length: int, fixed: set[str] = frozenset(), path: str = "") -> Any:  # type: ignore[assignment]
    """Batch outputs of a batch padded to ``padded`` along the sequence axis as if it had been
    padded to ``length`` only: every axis 1 of ``padded`` cut to ``length``, except at the paths in
    ``fixed`` (see :func:`learn_fixed`); a list of one element per row has its elements' axis 0 cut."""
    if padded == length or path in fixed:
        return outputs
    if isinstance(outputs, dict):
        return {k: cut_length(v, padded, length, fixed, f"{path}[{k!r}]") for k, v in outputs.items()}
    if isinstance(outputs, tuple):
        return tuple(cut_length(v, padded, length, fixed, f"{path}[{i}]") for i, v in enumerate(outputs))
    if isinstance(outputs, list):
        return [v[:length] if getattr(v, "ndim", 0) >= 1 and v.shape[0] == padded else v for v in outputs]
    shape = getattr(outputs, "shape", None)
    if shape is not None and len(shape) >= 2 and shape[1] == padded:
        return outputs[:, :length]
    return outputs


def follows_length(outputs: Any, length: int, fixed: set[str] | frozenset[str] = frozenset(), path: str = "") -> bool:
    """Whether :func:`trim_output_row` would cut any of these batch outputs (an axis 1, or a list
    element's axis 0, of the padded ``length``, at a path not in ``fixed``)."""
    if path in fixed:
        return False
    if isinstance(outputs, dict):
        return any(follows_length(v, length, fixed, f"{path}[{k!r}]") for k, v in outputs.items())
    if isinstance(outputs, tuple):
        return any(follows_length(v, length, fixed, f"{path}[{i}]") for i, v in enumerate(outputs))
    if isinstance(outputs, list):
        return any(getattr(v, "ndim", 0) >= 1 and v.shape[0] == length for v in outputs)
    shape = getattr(outputs, "shape", None)
    return shape is not None and len(shape) >= 2 and shape[1] == length


def trim_output_row(output: Any, length: int | None, own: int, fixed: set[str] | frozenset[str] = frozenset(), path: str = "") -> Any:
    """One row's outputs (arrays with the batch dimension of 1; tuples, dicts of them; a list of
    one element without it) with every axis 1 of the padded ``length`` cut back to the row's
    ``own`` length, except at the paths in ``fixed`` (see :func:`learn_fixed`)."""
    if length is None or own >= length or path in fixed:
        return output
    if isinstance(output, dict):
        return {k: trim_output_row(v, length, own, fixed, f"{path}[{k!r}]") for k, v in output.items()}
    if isinstance(output, tuple):
        return tuple(trim_output_row(v, length, own, fixed, f"{path}[{i}]") for i, v in enumerate(output))
    if isinstance(output, list):  # one element per row, without the batch dimension
        return [v[:own] if getattr(v, "ndim", 0) >= 1 and v.shape[0] == length else v for v in output]
    shape = getattr(output, "shape", None)
    if shape is not None and len(shape) >= 2 and shape[1] == length:
        return output[:, :own]
    return output
