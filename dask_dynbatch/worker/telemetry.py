"""Memory sources: how much device memory is free *now*.

Every source answers :meth:`~dask_dynbatch.core.memory.MemorySource.read` with a
:class:`~dask_dynbatch.core.memory.DeviceMemory` snapshot; the sizer
(:mod:`dask_dynbatch.core.memory`) turns snapshots into batch-size caps, and the worker plugin
reports them on the heartbeat (:func:`device_telemetry`). Sources: :class:`TorchCudaMemory`,
:class:`CupyMemory`, :class:`NvmlMemory` (GPUs) and :class:`HostMemory` (CPU workers);
:func:`detect_memory_source` picks one.

GPU libraries (torch.cuda, cupy, pynvml) are imported inside functions only, so this module
imports on a CPU-only machine without them.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from typing import Any

from ..core.memory import DeviceMemory, MemorySource


def parse_device(device: str) -> tuple[str, int]:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"gpu:0"`` -> ``("cpu", 0)`` or ``("cuda", index)``;
    ValueError for any other device string."""
    text = str(device).strip().lower()
    kind, _, index_text = text.partition(":")
    if kind == "gpu":
        kind = "cuda"
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    try:
        index = int(index_text) if index_text else 0
    except ValueError:
        raise ValueError(f"bad device index in {device!r}") from None
    if index < 0:
        raise ValueError(f"bad device index in {device!r}")
    return kind, index


# --------------------------------------------------------------------- NVML
def _nvml_ready() -> bool:
    """Initialise NVML once per process; True when it can be queried."""
    try:
        from distributed.diagnostics import nvml as dask_nvml  # lazy

        dask_nvml.init_once()
        if dask_nvml.is_initialized():
            return True
        # distributed declined (config off, no library): try NVML ourselves only
        # if the reason was the config switch, never when the library is missing.
        if dask_nvml.NVML_STATE != dask_nvml.NVMLState.DISABLED_CONFIG:
            return False
    except Exception:
        pass
    try:
        import pynvml  # lazy

        pynvml.nvmlInit()  # idempotent: NVML reference-counts init calls
        return True
    except Exception:
        return False


def _nvml_handle(device_index: int):
    """NVML handle of the CUDA device that has logical index ``device_index``.

    CUDA indices are relative to ``CUDA_VISIBLE_DEVICES``; NVML indices are
    physical.  Entries may be integers or ``GPU-``/``MIG-`` UUIDs.
    """
    import pynvml  # lazy

    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    target: int | str = device_index
    if visible:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        if device_index >= len(entries):
            raise RuntimeError(
                f"CUDA device {device_index} not in CUDA_VISIBLE_DEVICES={visible!r}"
            )
        entry = entries[device_index]
        try:
            target = int(entry)
        except ValueError:
            target = entry
    if isinstance(target, int):
        return pynvml.nvmlDeviceGetHandleByIndex(target)
    return pynvml.nvmlDeviceGetHandleByUUID(target.encode() if isinstance(target, str) else target)


def _nvml_free_or_none(device_index: int) -> int | None:
    """NVML's free bytes for a device, or None when NVML is not usable."""
    try:
        if not _nvml_ready():
            return None
        import pynvml  # lazy

        return int(pynvml.nvmlDeviceGetMemoryInfo(_nvml_handle(device_index)).free)
    except Exception:
        return None


class NvmlMemory:
    """Device memory as NVML (``pynvml`` from ``nvidia-ml-py``, initialised the way
    ``distributed.diagnostics.nvml`` does it) sees it: every process on the GPU counted, nothing
    known about a framework's cache. ``device_index`` is the CUDA index as this process sees it
    (mapped through ``CUDA_VISIBLE_DEVICES`` to the physical device)."""

    name = "nvml"

    def __init__(self, device_index: int = 0):
        self.device_index = int(device_index)
        if not _nvml_ready():
            raise RuntimeError("NVML is not available (pynvml or the NVIDIA driver missing)")
        self._handle = _nvml_handle(self.device_index)

    def read(self) -> DeviceMemory:
        """Read NVML's total and free bytes."""
        import pynvml  # lazy

        info = pynvml.nvmlDeviceGetMemoryInfo(self._handle)
        return DeviceMemory(
            total=int(info.total),
            free=int(info.free),
            framework_used=self._own_process_bytes(),
            nvml_free=int(info.free),
            source=self.name,
        )

    def _own_process_bytes(self) -> int | None:
        """GPU memory NVML attributes to this process (context and caches included), or None."""
        try:
            import pynvml  # lazy

            query = getattr(
                pynvml,
                "nvmlDeviceGetComputeRunningProcesses_v2",
                pynvml.nvmlDeviceGetComputeRunningProcesses,
            )
            pid = os.getpid()
            for process in query(self._handle):
                if process.pid == pid and process.usedGpuMemory is not None:
                    return int(process.usedGpuMemory)
            return 0
        except Exception:
            return None

    def __repr__(self) -> str:
        return f"NvmlMemory(device_index={self.device_index})"


# -------------------------------------------------------------------- torch
def torch_cuda_allocator_stats(device: Any) -> dict[str, int]:
    """torch's caching allocator on ``device``: bytes ``allocated`` now, their ``peak`` since the
    last ``reset_peak_memory_stats``, and ``reserved`` (cached). One read of the allocator's
    statistics: ``torch.cuda.memory_allocated`` and friends each flatten the whole statistics
    dictionary in Python, a cost the device thread pays on every batch."""
    import torch  # lazy

    stats = torch.cuda.memory_stats_as_nested_dict(device)
    allocated = stats.get("allocated_bytes", {}).get("all", {})
    reserved = stats.get("reserved_bytes", {}).get("all", {})
    return {"allocated": int(allocated.get("current", 0)), "peak": int(allocated.get("peak", 0)),
            "reserved": int(reserved.get("current", 0))}


class TorchCudaMemory:
    """CUDA memory as torch sees it: driver free (``torch.cuda.mem_get_info``, other processes
    included) plus torch's unused cache, since the caching allocator keeps freed blocks reserved
    and our next batch reuses ``reserved - allocated`` of them without the driver. A per-process
    memory fraction (``torch.cuda.set_per_process_memory_fraction``) becomes ``limit``.
    ``include_nvml``: also read NVML's free bytes into ``nvml_free`` (for telemetry)."""

    name = "torch-cuda"

    def __init__(self, device_index: int = 0, *, include_nvml: bool = False):
        self.device_index = int(device_index)
        self.include_nvml = include_nvml

    def read(self) -> DeviceMemory:
        """Read free/total, torch's reserved-but-unused cache and live bytes."""
        import torch  # lazy

        device = torch.device("cuda", self.device_index)
        free, total = torch.cuda.mem_get_info(device)
        stats = torch_cuda_allocator_stats(device)
        reserved, allocated = stats["reserved"], stats["allocated"]
        limit = None
        get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        if get_fraction is not None:
            try:
                fraction = float(get_fraction(device))
            except Exception:
                fraction = 1.0
            if 0 < fraction < 1:
                limit = int(fraction * total)
                # torch refuses to reserve beyond the fraction
                free = min(int(free), max(0, limit - reserved))
        return DeviceMemory(
            total=int(total),
            free=int(free),
            framework_reserved_unused=max(0, reserved - allocated),
            limit=limit,
            framework_used=allocated,
            nvml_free=_nvml_free_or_none(self.device_index) if self.include_nvml else None,
            source=self.name,
        )

    def __repr__(self) -> str:
        return f"TorchCudaMemory(device_index={self.device_index})"


# --------------------------------------------------------------------- cupy
class CupyMemory:
    """CUDA memory as CuPy sees it: ``memGetInfo`` free plus the default pool's unused bytes
    (``total_bytes() - used_bytes()``). A limit set on the default pool becomes ``limit`` and
    clips ``free``. ``include_nvml``: also read NVML's free bytes into ``nvml_free``."""

    name = "cupy"

    def __init__(self, device_index: int = 0, *, include_nvml: bool = False):
        self.device_index = int(device_index)
        self.include_nvml = include_nvml

    def read(self) -> DeviceMemory:
        """Read memGetInfo and the default memory pool's usage."""
        import cupy  # lazy

        with cupy.cuda.Device(self.device_index):
            free, total = cupy.cuda.runtime.memGetInfo()
            pool = cupy.get_default_memory_pool()
            pool_total = int(pool.total_bytes())
            pool_used = int(pool.used_bytes())
            try:
                pool_limit = int(pool.get_limit())
            except Exception:
                pool_limit = 0
        limit = pool_limit if pool_limit > 0 else None
        if limit is not None:
            free = min(int(free), max(0, limit - pool_total))
        return DeviceMemory(
            total=int(total),
            free=int(free),
            framework_reserved_unused=max(0, pool_total - pool_used),
            limit=limit,
            framework_used=pool_used,
            nvml_free=_nvml_free_or_none(self.device_index) if self.include_nvml else None,
            source=self.name,
        )

    def __repr__(self) -> str:
        return f"CupyMemory(device_index={self.device_index})"


# --------------------------------------------------------------------- host
class HostMemory:
    """Host RAM for CPU workers: ``free = min(psutil.virtual_memory().available, limit - RSS)``
    with ``limit = memory_limit * limit_fraction`` (``memory_limit``: the Dask worker's, None or 0
    for none); ``framework_used`` is the process RSS.

    Dask pauses a worker at ``distributed.worker.memory.pause`` (0.8 by default) of its limit;
    :func:`detect_memory_source` passes that fraction as ``limit_fraction`` so that a batch never
    pushes the worker into pausing.
    """

    name = "host"

    def __init__(self, memory_limit: int | None = None, *, limit_fraction: float = 1.0):
        if not 0 < limit_fraction <= 1:
            raise ValueError(f"limit_fraction must be in (0, 1], got {limit_fraction}")
        self.memory_limit = int(memory_limit) if memory_limit else None
        self.limit_fraction = float(limit_fraction)
        self._process = None

    def read(self) -> DeviceMemory:
        """Read available RAM, and the worker limit minus RSS if a limit is set."""
        import psutil

        if self._process is None:
            self._process = psutil.Process()
        vm = psutil.virtual_memory()
        rss = int(self._process.memory_info().rss)
        free = int(vm.available)
        limit = None
        if self.memory_limit:
            limit = int(self.memory_limit * self.limit_fraction)
            free = min(free, max(0, limit - rss))
        return DeviceMemory(
            total=int(vm.total),
            free=free,
            limit=limit,
            framework_used=rss,
            source=self.name,
        )

    def __repr__(self) -> str:
        return (
            f"HostMemory(memory_limit={self.memory_limit}, "
            f"limit_fraction={self.limit_fraction})"
        )


# ---------------------------------------------------------------- detection
def _dask_pause_fraction() -> float:
    """Dask's worker pause threshold (fraction of memory_limit), or 1.0."""
    try:
        import dask  # lazy: telemetry is usable without dask

        for key in ("distributed.worker.memory.pause", "distributed.worker.memory.terminate"):
            value = dask.config.get(key, default=False)
            if value not in (False, None) and 0 < float(value) <= 1:
                return float(value)
    except Exception:
        pass
    return 1.0


def _torch_cuda_usable(device_index: int) -> bool:
    try:
        import torch  # lazy

        return bool(torch.cuda.is_available()) and device_index < torch.cuda.device_count()
    except Exception:
        return False


def _cupy_usable(device_index: int) -> bool:
    try:
        import cupy  # lazy

        return device_index < cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return False


def detect_memory_source(
    device: str,
    memory_limit: int | None = None,
    *,
    prefer: str | None = None,
    limit_fraction: float | None = None,
) -> MemorySource:
    """The memory source for ``device`` (``"cpu"``, ``"cuda"`` or ``"cuda:N"``).

    CPU: :class:`HostMemory` with ``memory_limit`` and ``limit_fraction`` (default: Dask's worker
    pause threshold). CUDA: the library ``prefer`` names (``"torch"``, ``"cupy"``, ``"nvml"``) is
    asked first; by default the one already imported in this process (torch before CuPy when both
    are), then the other, then NVML. RuntimeError when no library can see the CUDA device.
    """
    kind, index = parse_device(device)
    if kind == "cpu":
        fraction = _dask_pause_fraction() if limit_fraction is None else limit_fraction
        return HostMemory(memory_limit, limit_fraction=fraction)

    order = ["torch", "cupy", "nvml"]
    if "cupy" in sys.modules and "torch" not in sys.modules:
        order = ["cupy", "torch", "nvml"]
    if prefer is not None:
        if prefer not in order:
            raise ValueError(f"prefer must be one of {order}, got {prefer!r}")
        order.remove(prefer)
        order.insert(0, prefer)
    for name in order:
        if name == "torch" and _torch_cuda_usable(index):
            return TorchCudaMemory(index)
        if name == "cupy" and _cupy_usable(index):
            return CupyMemory(index)
        if name == "nvml":
            try:
                return NvmlMemory(index)
            except Exception:
                continue
    raise RuntimeError(
        f"no memory source can see {device!r}: neither torch.cuda, CuPy nor NVML "
        "reports that CUDA device"
    )


def device_telemetry(source: MemorySource) -> dict[str, Any]:
    """JSON-able snapshot of a source's reading, for heartbeats and dashboards: the fields of
    :class:`DeviceMemory` plus ``capacity``, ``effective_free`` and ``used_fraction``; or
    ``{"source": ..., "error": "..."}`` when reading failed (telemetry never raises)."""
    name = getattr(source, "name", type(source).__name__)
    try:
        reading = source.read()
    except Exception as exc:  # telemetry must not break a heartbeat
        return {"source": name, "error": f"{type(exc).__name__}: {exc}"}
    out = reading.to_dict()
    if not out.get("source"):
        out["source"] = name
    capacity = reading.capacity
    out["used_fraction"] = (
        min(1.0, max(0.0, 1.0 - reading.effective_free / capacity)) if capacity > 0 else None
    )
    return out


class CachedMemorySource:
    """A source whose readings are reused for ``max_age`` seconds: a batch asks for free memory
    several times (its cap, its reservation, the cap sent back), and a reading of torch's
    allocator statistics is costly, so one reading serves them all."""

    def __init__(self, source: MemorySource, max_age: float = 0.005, clock=time.monotonic):
        self.source = source
        self.max_age = max_age
        self._clock = clock
        self._reading: DeviceMemory | None = None
        self._read_at = -math.inf
        self._lock = threading.Lock()
        self.name = getattr(source, "name", type(source).__name__)

    def read(self) -> DeviceMemory:
        with self._lock:
            now = self._clock()
            if self._reading is None or now - self._read_at > self.max_age:
                self._reading = self.source.read()
                self._read_at = now
            return self._reading
