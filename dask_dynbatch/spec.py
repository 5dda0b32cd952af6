"""What a model is: :class:`ModelSpec`, how it is loaded and run, per-device variants, and when two
specs are the same model (:func:`fingerprint`)."""

from __future__ import annotations

import functools
import hashlib
import inspect
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from dask.utils import parse_timedelta

from .core.ladder import bucket_ladder, compile_mode, shape_ladder

OVERLOAD_POLICIES = ("block", "reject")
#: where a worker's controller starts when the spec does not say (by device kind)
DEFAULT_INITIAL_BATCH = {"cpu": 8, "cuda": 64}


def parse_seconds(value: float | int | str, what: str) -> float:
    """``"50ms"`` or ``0.05`` -> ``0.05``; raise ``ValueError`` naming ``what`` on bad input."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be seconds (float) or a duration string like '50ms', not {value!r}")
    try:
        seconds = parse_timedelta(value, default="s")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{what} must be seconds (float) or a duration string like '50ms', not {value!r}") from e
    if seconds is None or seconds <= 0:
        raise ValueError(f"{what} must be positive, not {value!r}")
    return float(seconds)


@dataclass(frozen=True)
class DeviceVariant:
    """How to load and run a model on one device kind (e.g. fp16 on CUDA, fp32 on CPU).

    Any field left as ``None`` falls back to the :class:`ModelSpec`'s own value.
    """

    load: Callable[..., Any] | None = None
    predict: Callable[[Any, Any], Any] | None = None
    max_batch_size: int | None = None
    compile: bool | str | None = None


@dataclass(frozen=True)
class ModelSpec:
    """A model served by a :class:`~dask_dynbatch.Batcher`.

    Parameters
    ----------
    name
        Unique name of the model on the cluster.
    load
        Called once per worker and device, cached there. Takes no argument, or the device string
        (``"cpu"``, ``"cuda:0"``): passed when its first parameter is required or is named
        ``device`` (``def build(device="cpu")`` gets ``"cuda:0"`` on a GPU worker). Returns a ``torch.nn.Module`` or a callable on batched arrays
        (NumPy on CPU workers, CuPy on GPU workers when CuPy is installed).
    predict
        ``predict(model, batch) -> outputs`` with ``batch`` the stacked NumPy array (or, for
        structured samples, the structure of stacked leaves). Default for a torch module: forward
        pass under ``torch.inference_mode`` on the worker's device; for a callable: ``model(batch)``.
        Either way a structured batch is spread: ``model(**batch)`` for a dict, ``model(*batch)``
        for a tuple or list.
    latency_target
        Latency a request should see once its batch forms, seconds or a string such as ``"50ms"``:
        the controller keeps each device batch's formation wait plus its own time on the device
        under it. A request may also wait for the batches ahead of its own on the device (of its
        model, or of other models on the same device) while the device is busy.
    max_batch_size
        Hard cap on the batch size (optional).
    initial_batch_size
        Where each worker's batch-size controller starts, bounded by ``max_batch_size`` and the
        memory cap; the controller moves it from there. Default: 8 on CPU workers, 64 on GPU
        workers (a GPU is launch-bound below that: small batches run far below its throughput).
    max_delay
        Longest time a batch waits for more requests once a worker has free capacity and a batch is
        already running there (seconds or string).
    resources
        Dask worker resources a worker must have to run this model, e.g. ``{"GPU": 1}``.
    device
        ``"cuda"``, ``"cpu"`` or ``None`` (any: CUDA when the worker sees a GPU, else CPU).
    variants
        Per device kind (``"cuda"``, ``"cpu"``) :class:`DeviceVariant` overrides.
    max_inflight
        Batches in flight per worker (more than one overlaps transfer with compute); with
        ``pad_value`` or ``cost``, shipments of a few batches each, 8 times as many.
    max_queue
        Requests a Batcher holds before its ``overload`` policy applies (``None``: unbounded).
    overload
        ``"block"`` (``submit`` waits for room) or ``"reject"`` (raise :class:`QueueFullError`).
    input_shape, input_dtype
        Declared per-sample input signature (optional; learned from the first request otherwise).
        With ``compile``, a declared signature lets workers compile the first bucket at load time.
    compile
        ``True`` or a ``torch.compile`` mode (``"default"``, ``"reduce-overhead"``,
        ``"max-autotune"``, ``"max-autotune-no-cudagraphs"``): each worker compiles the torch
        module once per bucket size, in the background, and serves a bucket compiled once it is
        ready (eagerly until then, and for good if compiling fails). Batches are then formed in
        ``buckets``; with ``pad_value`` (or ``cost``) they stay sized by cost, and each is padded
        to a ``(rows, length)`` bucket (rows on ``buckets`` or four rungs per doubling, length on
        the same spacing), at most ``dynbatch.compile.max-buckets`` of them compiled per worker.
        Off by default.
    buckets
        Batch sizes batches are formed in (the controller steps between them; a partial batch is
        padded to its bucket on the worker and the padding cut from the outputs). Default with
        ``compile``: powers of two up to ``max_batch_size``. Given without ``compile``, batches
        are padded to them for the eager model too (for models that want static shapes; with
        ``pad_value``, to ``(rows, length)`` buckets as with ``compile``).
    pad_value
        Declares that the samples' leaves may differ in length along their first axis (token
        sequences): a number (every leaf of at least one dimension), or a dict from a dict sample's
        key (or a leaf's path, such as ``"[1]"``) to the value of that leaf. Workers batch
        requests of similar length together, pad each batch to its longest request, and cut every
        output whose axis 1 has that padded length back to each request's own length.
    cost
        ``cost(sample) -> number``: what a request weighs in a batch (the controller's size, the
        memory cap and a batch's budget are then in these units). Default with ``pad_value``: a
        batch costs its rows times its padded length (tokens); otherwise one per row.
    shape_buckets
        On CUDA workers, for a torch module with the default ``predict`` (and no ``compile`` or
        ``buckets``): form batches in a ladder of sizes, four per doubling above 64
        (:func:`~dask_dynbatch.core.ladder.shape_ladder`), and pad a partial batch to its rung (the
        padding is cut from the outputs). The first batch of every new shape pays a one-time
        set-up on the GPU (~40 ms for ResNet-50: cuDNN builds its convolution plans per shape),
        which free batch sizes would pay again and again. Default ``True``; ``False`` for a module
        whose rows affect each other's outputs.
    execution_timeout
        A device batch running longer than this (seconds or a string such as ``"30s"``) is stuck:
        its requests are retried elsewhere in halves, so that the one that hangs fails alone with
        :class:`~dask_dynbatch.ExecutionTimeoutError`, and its worker is restarted (a Python thread
        cannot be stopped). Default ``None``: 10 times the measured time of batches of its size,
        at least 5 s, and 60 s before any batch finished (``dynbatch.watchdog`` configuration).
    """

    name: str
    load: Callable[..., Any]
    predict: Callable[[Any, Any], Any] | None = None
    latency_target: float | str = 0.1
    max_batch_size: int | None = None
    initial_batch_size: int | None = None
    max_delay: float | str = "5ms"
    resources: Mapping[str, float] | None = None
    device: str | None = None
    variants: Mapping[str, DeviceVariant] = field(default_factory=dict)
    max_inflight: int = 3
    max_queue: int | None = 1_000_000
    overload: str = "block"
    input_shape: tuple[int, ...] | None = None
    input_dtype: Any = None
    compile: bool | str = False
    buckets: Sequence[int] | None = None
    shape_buckets: bool = True
    execution_timeout: float | str | None = None
    pad_value: Any = None
    cost: Callable[[Any], float] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"ModelSpec.name must be a non-empty string, not {self.name!r}")
        if not callable(self.load):
            raise TypeError(f"ModelSpec.load must be callable (it builds the model on a worker), not {self.load!r}")
        if self.predict is not None and not callable(self.predict):
            raise TypeError(f"ModelSpec.predict must be callable or None, not {self.predict!r}")
        object.__setattr__(self, "latency_target", parse_seconds(self.latency_target, "latency_target"))
        object.__setattr__(self, "max_delay", parse_seconds(self.max_delay, "max_delay"))
        if self.execution_timeout is not None:
            object.__setattr__(self, "execution_timeout", parse_seconds(self.execution_timeout, "execution_timeout"))
        for attr in ("max_batch_size", "max_queue", "initial_batch_size"):  # None allowed for each
            value = getattr(self, attr)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"ModelSpec.{attr} must be a positive integer or None, not {value!r}")
        if isinstance(self.max_inflight, bool) or not isinstance(self.max_inflight, int) or self.max_inflight < 1:
            raise ValueError(f"ModelSpec.max_inflight must be a positive integer, not {self.max_inflight!r}")
        if self.device not in (None, "cpu", "cuda"):
            raise ValueError(f"ModelSpec.device must be 'cuda', 'cpu' or None, not {self.device!r}")
        if self.overload not in OVERLOAD_POLICIES:
            raise ValueError(f"ModelSpec.overload must be one of {OVERLOAD_POLICIES}, not {self.overload!r}")
        for kind, variant in dict(self.variants).items():
            if kind not in ("cpu", "cuda") or not isinstance(variant, DeviceVariant):
                raise ValueError("ModelSpec.variants maps 'cpu'/'cuda' to DeviceVariant(...)")
        if self.input_shape is not None:
            object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        compile_mode(self.compile)  # raises on a bad value
        for variant in self.variants.values():
            compile_mode(variant.compile)
        if self.buckets is not None:
            if isinstance(self.buckets, (str, bytes)) or not all(
                isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in self.buckets
            ) or not len(self.buckets):
                raise ValueError(f"ModelSpec.buckets must be a sequence of positive batch sizes, not {self.buckets!r}")
            object.__setattr__(self, "buckets", tuple(sorted(set(self.buckets))))
        if self.pad_value is not None:
            values = self.pad_value.values() if isinstance(self.pad_value, Mapping) else [self.pad_value]
            if not all(isinstance(v, (int, float, bool, np.generic)) for v in values) or (
                    isinstance(self.pad_value, Mapping) and not self.pad_value):
                raise ValueError(f"ModelSpec.pad_value must be a number or a non-empty dict of numbers, not {self.pad_value!r}")
        if self.cost is not None and not callable(self.cost):
            raise TypeError(f"ModelSpec.cost must be callable or None, not {self.cost!r}")
        object.__setattr__(self, "resources", dict(self.resources or {}))
        object.__setattr__(self, "variants", dict(self.variants))

    def for_device(self, device: str) -> ModelSpec:
        """The spec with the variant for ``device`` (``"cpu"``, ``"cuda:0"``...) applied."""
        variant = self.variants.get(device.split(":")[0])
        if variant is None:
            return self
        changes = {k: getattr(variant, k) for k in ("load", "predict", "max_batch_size", "compile")}
        return replace(self, variants={}, **{k: v for k, v in changes.items() if v is not None})

    def batch_limit(self, device: str | None = None) -> int | None:
        """Hard batch-size limit on ``device`` (the variant's if it sets one)."""
        return self.for_device(device).max_batch_size if device else self.max_batch_size

    def initial_size(self, device: str) -> int:
        """Where the batch-size controller of a worker with ``device`` starts."""
        kind = device.split(":")[0]
        initial = self.initial_batch_size or DEFAULT_INITIAL_BATCH.get(kind, 8)
        limit = self.batch_limit(device)
        return min(initial, limit) if limit else initial

    def compile_mode(self, device: str | None = None) -> str | None:
        """The ``torch.compile`` mode on ``device`` (the variant's if it sets one), or None."""
        return compile_mode((self.for_device(device) if device else self).compile)

    def ladder(self, device: str | None = None) -> tuple[int, ...] | None:
        """Bucket sizes batches are formed in on ``device``, or None when batches are free-sized
        (no ``compile`` and no ``buckets``)."""
        spec = self.for_device(device) if device else self
        if spec.buckets is None and compile_mode(spec.compile) is None:
            if spec.pads_shapes(device):
                return shape_ladder(spec.max_batch_size)
            return None
        return bucket_ladder(spec.buckets, spec.max_batch_size)

    @property
    def structured(self) -> bool:
        """Whether samples travel leaf by leaf (padded or weighed), even a plain array."""
        return self.pad_value is not None or self.cost is not None

    def pad_for(self, path: str, top_key: Any) -> Any:
        """The pad value of the leaf at ``path`` (``top_key``: its dict sample's key), or None when
        that leaf keeps one length."""
        pad = self.pad_value
        if pad is None or not isinstance(pad, Mapping):
            return pad
        if top_key is not None and top_key in pad and path == f"[{top_key!r}]":
            return pad[top_key]
        return pad.get(path)

    def pads_shapes(self, device: str | None) -> bool:
        """Whether eager batches on ``device`` are formed in the shape ladder (``shape_buckets``)."""
        return (bool(self.shape_buckets) and device is not None and device.split(":")[0] == "cuda"
                and self.predict is None and not self.structured and self.buckets is None and compile_mode(self.compile) is None)


def call_load(load: Callable[..., Any], device: str) -> Any:
    """Call ``load(device)`` or ``load()``, whichever its signature takes.

    The device string (``"cuda:0"``, ``"cpu"``) is passed when the first positional parameter is
    required or is named ``device`` (``def build(device="cpu")`` gets it too: a default there is
    for calling it by hand), or as a keyword to a keyword-only ``device`` parameter; otherwise
    ``load()`` is called.
    """
    try:
        parameters = list(inspect.signature(load).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature
        return load()
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if positional and (positional[0].default is positional[0].empty or positional[0].name == "device"):
        return load(device)
    if any(p.kind is p.KEYWORD_ONLY and p.name == "device" for p in parameters):
        return load(device=device)
    return load()


#: the fields that make a model what it is on the workers: two specs of one name are the same model
#: when these agree (the others, max_delay, max_inflight, max_queue and overload, are each Batcher's own)
IDENTITY_FIELDS = ("load", "predict", "variants", "device", "resources", "latency_target", "max_batch_size",
                   "initial_batch_size", "input_shape", "input_dtype", "compile", "buckets", "shape_buckets",
                   "execution_timeout", "pad_value", "cost")


def fingerprint(spec: ModelSpec) -> tuple[dict[str, str], dict[str, str]]:
    """The identity of a spec: ``(tokens, words)``, each ``{field: ...}`` over :data:`IDENTITY_FIELDS`.

    Functions are known by their code, not by their pickle: the code object's instructions,
    constants and names (nested functions included), defaults, closure values, and the values of
    the module-level names they use that are plain data or functions of the same module. So the same
    ``load`` defined in two notebooks, or pickled twice, is the same model, and one that computes
    something else is not. Line numbers, comments and the function's position in its file do not
    count. Other objects are known by their type and attributes; arrays by their bytes.
    """
    tokens, words = {}, {}
    for name in IDENTITY_FIELDS:
        value = getattr(spec, name)
        if name == "input_dtype" and value is not None:
            value = np.dtype(value).str
        h = hashlib.sha1()
        _feed(h, value, getattr(value, "__module__", None), 0, set())
        tokens[name] = h.hexdigest()[:16]
        words[name] = _describe(value)
    return tokens, words


def _describe(value: Any) -> str:
    if isinstance(value, functools.partial):
        return f"partial({_describe(value.func)}, ...)"
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '?')}.{value.__qualname__}"
    if isinstance(value, dict) and value and all(isinstance(v, DeviceVariant) for v in value.values()):
        return "{" + ", ".join(f"{k}: {_describe(v.load or v.predict)}" for k, v in value.items()) + "}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_PLAIN = (str, bytes, int, float, complex, bool, type(None))


def _feed(h: Any, value: Any, home: str | None, depth: int, seen: set[int]) -> None:
    """Add ``value`` to the hash ``h`` (see :func:`fingerprint`); ``home`` is the module whose
    functions are followed into."""
    if depth > 12:
        h.update(b"<deep>")
        return
    if isinstance(value, _PLAIN):
        h.update(f"{type(value).__name__}:{value!r};".encode())
    elif isinstance(value, (tuple, list, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        h.update(f"{type(value).__name__}[".encode())
        for item in items:
            _feed(h, item, home, depth + 1, seen)
        h.update(b"]")
    elif isinstance(value, Mapping):
        h.update(b"{")
        for key in sorted(value, key=repr):
            _feed(h, key, home, depth + 1, seen)
            _feed(h, value[key], home, depth + 1, seen)
        h.update(b"}")
    elif isinstance(value, np.ndarray):
        h.update(f"ndarray:{value.dtype.str}:{value.shape};".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, functools.partial):
        h.update(b"partial(")
        for part in (value.func, value.args, value.keywords):
            _feed(h, part, home, depth + 1, seen)
        h.update(b")")
    elif isinstance(value, types.MethodType):
        _feed(h, value.__func__, home, depth + 1, seen)
        _feed(h, value.__self__, home, depth + 1, seen)
    elif isinstance(value, types.FunctionType):
        _feed_function(h, value, home, depth, seen)
    elif isinstance(value, (type, types.ModuleType, types.BuiltinFunctionType)):
        h.update(f"{type(value).__name__}:{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', value.__name__)};".encode())
    elif isinstance(value, DeviceVariant):
        h.update(b"variant(")
        for name in ("load", "predict", "max_batch_size", "compile"):
            _feed(h, getattr(value, name), home, depth + 1, seen)
        h.update(b")")
    else:  # an instance: its type and attributes (a default repr holds an address)
        h.update(f"object:{type(value).__module__}.{type(value).__qualname__};".encode())
        attributes = getattr(value, "__dict__", None)
        if isinstance(attributes, dict) and id(value) not in seen:
            seen.add(id(value))
            _feed(h, attributes, home, depth + 1, seen)


def _feed_function(h: Any, fn: types.FunctionType, home: str | None, depth: int, seen: set[int]) -> None:
    h.update(f"function:{fn.__module__}.{fn.__qualname__};".encode())
    if id(fn) in seen or (fn.__module__ != home and fn.__module__ != "__main__"):
        return  # a function of another module is known by its name: follow only our own code
    seen.add(id(fn))
    names: list[str] = []
    _feed_code(h, fn.__code__, names)
    for part in (fn.__defaults__, fn.__kwdefaults__):
        _feed(h, part, home, depth + 1, seen)
    for cell in fn.__closure__ or ():
        try:
            _feed(h, cell.cell_contents, home, depth + 1, seen)
        except ValueError:  # an empty cell
            h.update(b"<empty>")
    for name in names:
        if name in fn.__globals__:
            value = fn.__globals__[name]
            if isinstance(value, (types.FunctionType, functools.partial, *_PLAIN, tuple, list, dict, np.ndarray)):
                _feed(h, value, home, depth + 1, seen)


def _feed_code(h: Any, code: types.CodeType, names: list[str]) -> None:
    h.update(code.co_code)
    h.update(repr((code.co_names, code.co_varnames, code.co_freevars)).encode())
    names.extend(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _feed_code(h, const, names)
        else:
            h.update(f"{type(const).__name__}:{const!r};".encode())
