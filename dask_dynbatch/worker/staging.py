"""Getting a device batch's rows to where the model reads them, and the host memory that serves it.

A device batch arrives as a few host arrays (the parts of one or more shipments: arrays received
over the comm, or views of a client's shared-memory slot). On a CPU they are joined into one
private array in the device thread. For a torch model on CUDA a transfer thread joins them into a
pinned buffer and copies that to the device on a side stream while the batch before computes; a
single view of a page-locked shared-memory slot goes to the device straight out of the slot.

torch is imported inside the functions that need it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def join_on_host(arrays: list[np.ndarray], shared: bool) -> np.ndarray:
    """One array of the rows: the only array as it is (a copy when ``shared``: memory a client
    reuses must not be aliased by outputs or later batches), else their concatenation."""
    if len(arrays) == 1:
        return np.array(arrays[0]) if shared else arrays[0]
    return np.concatenate(arrays)


class PinnedBuffer:
    """A page-locked host buffer kept for the next batch of one model (one transfer thread stages
    at a time). It grows to the next power of two of rows: allocating pinned memory is slow."""

    def __init__(self) -> None:
        self._buffer: Any = None

    def rows(self, n: int, like: Any) -> Any:
        """``n`` rows shaped like ``like``'s rows."""
        import torch

        buf = self._buffer
        shape = tuple(like.shape[1:])
        if buf is None or buf.dtype != like.dtype or tuple(buf.shape[1:]) != shape or len(buf) < n:
            self._buffer = None
            capacity = 1 << max(6, (n - 1).bit_length())
            buf = self._buffer = torch.empty((capacity, *shape), dtype=like.dtype, pin_memory=True)
        return buf[:n]


def stage_on_device(arrays: list[np.ndarray], device: Any, stream: Any, buffer: PinnedBuffer,
                    pinned: bool = False) -> Any:
    """The rows as one tensor on ``device``, copied on the side ``stream`` (blocks the calling
    transfer thread until the copy is done, so the buffer is free again). ``pinned``: the only
    array is page-locked already (:func:`pin_host_memory`): copied straight out of it."""
    import torch

    if pinned and len(arrays) == 1:
        host = torch.from_numpy(arrays[0])
    else:
        # through pinned memory also for one pageable array: a copy straight from pageable memory
        # is staged by the driver under its own locks and slows the batch computing meanwhile
        sources = [torch.from_numpy(a) for a in arrays]
        host = buffer.rows(sum(len(s) for s in sources), sources[0])
        if len(sources) == 1:
            host.copy_(sources[0])
        else:
            torch.cat(sources, out=host)  # torch copies without holding the GIL
    with torch.cuda.stream(stream):
        on_device = host.to(device, non_blocking=True)
    stream.synchronize()
    return on_device


def pin_host_memory(address: int, nbytes: int) -> Callable[[], None] | None:
    """Page-lock ``nbytes`` of host memory at ``address`` for CUDA (``cudaHostRegister``), so
    that copies to a GPU go straight out of it by DMA; returns how to undo it, or None when CUDA
    refused (the caller copies through a pinned buffer instead)."""
    import torch

    cudart = torch.cuda.cudart()
    rc = int(cudart.cudaHostRegister(address, nbytes, 0))
    if rc != 0:
        logger.info("dynbatch: cudaHostRegister of %d bytes failed (cudaError %d); copying through pinned memory",
                    nbytes, rc)
        return None

    def undo() -> None:
        err = int(cudart.cudaHostUnregister(address))
        if err != 0:
            raise RuntimeError(f"cudaHostUnregister failed (cudaError {err})")

    return undo


# glibc mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc_for_inference(mmap_threshold: int = 32 * 2**20, trim_threshold: int = 256 * 2**20) -> bool:
    """Undo the nanny's ``MALLOC_TRIM_THRESHOLD_=65536`` for batch-sized buffers.

    Setting any malloc threshold freezes glibc's adaptive mmap threshold at 128 KiB, so every
    activation buffer of every batch is mmap-ed, page-faulted and unmapped again, which halves a
    small CNN's speed on a CPU. Raising both thresholds lets freed batch buffers be reused.
    Only changes anything in a process where ``MALLOC_TRIM_THRESHOLD_`` is set (Dask nanny workers);
    returns whether it did.
    """
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) and libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold))
    except (OSError, AttributeError):
        return False
    return bool(ok)
