"""Getting a shipment to a worker and its reply back: encode, send, decode.

How rows travel is decided before sending, here and only here: to a worker on the same host,
stacked straight into a shared-memory slot whose name is sent (:mod:`dask_dynbatch.shm`); to
others (and for small shipments) stacked into chunks of at most :data:`SEND_CHUNK_BYTES` that
travel as frames of the Dask comm. A worker that cannot map the slot says so (nothing ran); the
shipment is then encoded again for the comm and sent once more, and so is every later one to that
worker unless the slot was only stale.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import dask.config
import numpy as np
from distributed.protocol import to_serialize

from .._compat import send_recv_on
from ..core.blocks import ShipmentRows
from ..core.requests import Request
from ..core.rows import join_in_chunks, rows_between, stack_in_chunks
from ..core.tree import Structure, TreeRows
from ..protocol import COLLECT, RUN, ShipmentReply, WorkerRestarting, exception_from, raise_if_error, unwrap
from ..shm import ReplyUnavailable, ShmRing, ShmSlot, ShmUnavailable, read_reply, shm_supported
from .samples import Sample

if TYPE_CHECKING:
    from distributed import Client

    from .dispatcher import WorkerSlot

logger = logging.getLogger(__name__)

#: a shipment larger than this travels as stacked chunks of at most this many bytes, one Dask frame
#: each (see :func:`~dask_dynbatch.core.rows.stack_in_chunks`)
SEND_CHUNK_BYTES = 16 * 2**20
#: shipments at least this large are stacked in a helper thread (NumPy copies without holding the
#: GIL), so that the event loop goes on sending and receiving meanwhile
STACK_IN_THREAD_BYTES = 4 * 2**20
#: a shipment stacked into shared memory is split into parts of at least this many bytes, stacked
#: by the helper threads in parallel (one thread copies a few GB/s)
STACK_PART_BYTES = 8 * 2**20
#: helper threads that stack shipments: a quarter of the cores, 1 to 4
STACK_THREADS = max(1, min(4, (os.cpu_count() or 1) // 4))
#: seconds to connect to a worker before its shipment goes back to the queue (it was not sent)
CONNECT_TIMEOUT = 5.0

_producing = 0
_producing_lock = threading.Lock()


@contextlib.contextmanager
def producing():
    """Marks a thread of this process making many requests (``Batcher.map``): it runs Python
    without pause, so ``shared-memory-copy: auto`` copies rows by ``pwritev`` meanwhile."""
    global _producing
    with _producing_lock:
        _producing += 1
    try:
        yield
    finally:
        with _producing_lock:
            _producing -= 1


def copy_mode() -> str:
    """How rows are copied into a slot now: ``numpy`` or ``write`` (see :meth:`Transport._stack_shared`)."""
    mode = dask.config.get("dynbatch.transport.shared-memory-copy", "auto")
    if mode == "auto":
        return "write" if _producing else "numpy"
    if mode not in ("numpy", "write"):
        raise ValueError(f"dynbatch.transport.shared-memory-copy must be 'auto', 'numpy' or 'write', not {mode!r}")
    return mode


class WorkerLost(Exception):
    """The worker died or could not be reached; ``sent``: the shipment may have run there."""

    def __init__(self, cause: BaseException, sent: bool):
        super().__init__(str(cause))
        self.cause = cause
        self.sent = sent


@dataclass
class Delivery:
    """A shipment's reply (or a part of it), decoded: outputs per row range, exceptions per row, the
    rest as sent. ``lost``: rows whose results were in a shared-memory reply this client could not
    read (they go back to the queue)."""

    reply: ShipmentReply
    pieces: list[tuple[list[int], Any]]
    errors: list[tuple[int, BaseException]]
    formed: float
    sent: float
    done: float
    new_slot: bool
    lost: list[int] = field(default_factory=list)


def shm_wanted(address: str) -> bool:
    """Whether to try shared memory for shipments to ``address`` (the worker says if it cannot map
    it). Not for in-process workers: their comm passes arrays without copying them at all."""
    return (bool(dask.config.get("dynbatch.transport.shared-memory", True)) and not address.startswith("inproc://")
            and shm_supported())


class Transport:
    """Sends one Batcher's shipments (owns the helper threads that stack them)."""

    def __init__(self, client: Client, model: str, weighed: bool = False):
        self.client = client
        self.model = model
        self.weighed = weighed  # rows carry their cost (ModelSpec.cost)
        copy_mode()  # a bad dynbatch.transport.shared-memory-copy fails the Batcher, not its shipments
        # (read once: a Batcher made inside dask.config.set keeps it for every worker it meets)
        self.reply_files = bool(dask.config.get("dynbatch.transport.shared-memory-replies", False))
        self.parts = bool(dask.config.get("dynbatch.transport.replies-in-parts", True))
        self._stackers = concurrent.futures.ThreadPoolExecutor(STACK_THREADS, thread_name_prefix="dynbatch-stack")

    def close(self) -> None:
        self._stackers.shutdown(wait=False)

    async def send(self, slot: WorkerSlot, reqs: list[Request], *, version: int, formed: float,
                   signature: tuple[tuple[int, ...], np.dtype] | Structure | None, isolate: bool = False,
                   inputs: list[tuple[Any, Any]], layout: ShipmentRows | None = None,
                   on_part: Callable[[Delivery], None] | None = None) -> Delivery:
        """Send ``reqs`` to ``slot``'s worker as one shipment of ``version``; the decoded reply.
        ``isolate``: the worker runs them in device batches of their own. ``layout``: where each
        request's rows start, when some are block parts (else each request is one row).
        ``inputs``: each request's ``(sample, dask_future)`` as they were when it left the queue (a
        request finished meanwhile, by its deadline, has let go of its own). ``on_part``: the
        worker answers in parts as the rows' device batches finish, each given to ``on_part``
        before the next is collected; the last one is returned.

        Raises :class:`WorkerLost` (the requests go back to the queue; also when the worker
        answers that it is restarting), the worker's error for a shipment that could not run at
        all, :class:`~dask_dynbatch.protocol.ModelSuperseded`, or (after a part)
        :class:`~dask_dynbatch.protocol.PartsLost`."""
        if layout is None:
            inline = [sample for sample, future in inputs if future is None]
            firsts: list[int] | range = range(len(reqs))
        else:  # blocks are joined, not stacked: a row request joins them as a block of one row
            inline = [sample if r.block is not None else sample[np.newaxis]
                      for r, (sample, future) in zip(reqs, inputs) if future is None]
            firsts = layout.first_rows()
        keyed = [(firsts[i], future.key) for i, (_, future) in enumerate(inputs) if future is not None]
        message: dict[str, Any] = {"model": self.model, "version": version, "client": self.client.id,
                                   "n": len(reqs) if layout is None else layout.rows,
                                   "queued_s": max(0.0, formed - min(r.enqueued for r in reqs))}
        priorities = _priority_runs(reqs, firsts)
        if priorities is not None:
            message["priorities"] = priorities
        if isolate:
            message["isolate"] = True
        if on_part is not None:
            message["parts"] = True
        if keyed:
            message["keyed"] = keyed
            if isinstance(signature, Structure):
                message["signature"] = to_serialize(signature)
            elif signature is not None:  # lets the worker check inputs from Dask Futures
                message["signature"] = (signature[0], signature[1].str)
        while True:
            ring = slot.shm
            shm_slot = self._slot_for(ring, inline, blocks=layout is not None)
            new_slot = shm_slot is not None and not shm_slot.attached
            if slot.asks_for_reply_files:
                message["reply_shm"] = True
            else:
                message.pop("reply_shm", None)
            try:
                if inline and isinstance(inline[0], Sample):
                    rows = await self._stack_tree(inline, shm_slot, signature)
                elif layout is not None:
                    rows = await self._join(inline, shm_slot)
                else:
                    rows = await self._stack(inline, shm_slot)
                if ring is not None:
                    dropped = ring.take_retired()
                    if dropped:
                        message["shm_drop"] = dropped
                sent = time.monotonic()
                reply = await self._call(slot.address, RUN, **message, **rows, new_slot=new_slot)
                done = time.monotonic()
                try:
                    raise_if_error(reply)
                except WorkerRestarting as exc:  # nothing ran: elsewhere, or here once it is back
                    raise WorkerLost(exc, sent=False) from exc
                except ShmUnavailable as exc:
                    self._on_shm_error(slot, ring, shm_slot, exc)
                    shm_slot = None
                    continue  # nothing ran: encode again, for the comm
                if shm_slot is not None and ring is not None:  # (a slot comes from the ring)
                    shm_slot.mark_attached()  # the worker maps it: unlink the name, nothing can leak
                    ring.proven = True
                try:
                    delivery = self._decode(reply, formed, sent, done, new_slot, slot, whole=True)
                except ReplyUnavailable:  # its results never reached us: run it again, over the comm
                    continue
                while delivery.reply.more is not None:  # (the input slot stays the worker's meanwhile)
                    if on_part is None:
                        raise RuntimeError("the worker answered in parts a shipment sent without asking for them")
                    on_part(delivery)
                    delivery = await self._collect(slot, delivery.reply.more, formed, sent, new_slot)
                return delivery
            finally:
                if shm_slot is not None:
                    ring.release(shm_slot)

    def _slot_for(self, ring: ShmRing | None, inline: list[np.ndarray], blocks: bool = False) -> ShmSlot | None:
        if ring is None or not inline:
            return None
        if blocks:
            nbytes = sum(b.nbytes for b in inline)
        elif isinstance(inline[0], Sample):
            # each leaf may start up to an alignment later; a ragged one adds its offsets
            nbytes = sum(s.nbytes for s in inline) + len(inline[0].leaves) * (2 * _ALIGN + 8 * (len(inline) + 1))
        else:
            nbytes = inline[0].nbytes * len(inline)
        if nbytes < int(dask.config.get("dynbatch.transport.shared-memory-min-bytes", 65536)):
            return None
        return ring.acquire(nbytes)

    async def _stack_tree(self, inline: list[Sample], shm_slot: ShmSlot | None, structure: Any) -> dict[str, Any]:
        """Structured rows as the message carries them: stacked leaf by leaf (ragged leaves joined,
        with their offsets) over the comm, or laid out one after another in the slot."""
        ragged = structure.ragged if isinstance(structure, Structure) else [False] * len(inline[0].leaves)
        costs = [s.cost for s in inline] if self.weighed else None
        loop = asyncio.get_running_loop()
        big = sum(s.nbytes for s in inline) >= STACK_IN_THREAD_BYTES
        if shm_slot is None:
            make = lambda: TreeRows.stack(inline[0].tree, [s.leaves for s in inline], ragged, costs)  # noqa: E731
            rows = await loop.run_in_executor(self._stackers, make) if big else make()
            return {"batch": to_serialize(rows)}
        write = lambda: tree_into_slot(shm_slot, inline, ragged)  # noqa: E731
        layout = await loop.run_in_executor(self._stackers, write) if big else write()
        return {"shm": {"name": shm_slot.name, "tree": inline[0].tree, "leaves": layout, "costs": costs}}

    async def _stack(self, inline: list[np.ndarray], shm_slot: ShmSlot | None) -> dict[str, Any]:
        """The inline rows as the message carries them: a slot reference, or stacked chunks."""
        if not inline:
            return {}
        nbytes = inline[0].nbytes * len(inline)
        loop = asyncio.get_running_loop()
        if shm_slot is not None:
            return {"shm": await self._stack_shared(inline, shm_slot, nbytes)}
        if nbytes >= STACK_IN_THREAD_BYTES:
            batch = await loop.run_in_executor(self._stackers, stack_in_chunks, inline, SEND_CHUNK_BYTES)
        else:
            batch = stack_in_chunks(inline, SEND_CHUNK_BYTES)
        return {"batch": to_serialize(batch)}

    async def _stack_shared(self, inline: list[np.ndarray], shm_slot: ShmSlot, nbytes: int) -> dict[str, Any]:
        """Stack the rows into the slot; returns its reference. NumPy stacks them, large shipments
        in parallel parts from the helper threads; while a thread of this process is making many
        requests (``dynbatch.transport.shared-memory-copy: auto``, the default), or always with
        ``write``, the slot writes them (:meth:`ShmSlot.write_rows`: the GIL released once per
        call), since NumPy takes the GIL back for every row and waits for it beside a busy thread."""
        shape = (len(inline), *inline[0].shape)
        loop = asyncio.get_running_loop()
        if copy_mode() == "write":
            if nbytes >= STACK_IN_THREAD_BYTES:
                await loop.run_in_executor(self._stackers, shm_slot.write_rows, inline)
            else:
                shm_slot.write_rows(inline)
            return {"name": shm_slot.name, "shape": shape, "dtype": inline[0].dtype.str}
        view = shm_slot.array(shape, inline[0].dtype)
        if nbytes >= STACK_IN_THREAD_BYTES:
            parts = min(STACK_THREADS, max(1, nbytes // STACK_PART_BYTES), len(inline))
            bounds = np.linspace(0, len(inline), parts + 1).astype(int)
            await asyncio.gather(*(
                loop.run_in_executor(self._stackers, _stack_into, inline[a:b], view[a:b])
                for a, b in zip(bounds[:-1], bounds[1:])
            ))
        else:
            _stack_into(inline, view)
        return {"name": shm_slot.name, "shape": shape, "dtype": inline[0].dtype.str}

    async def _join(self, blocks: list[np.ndarray], shm_slot: ShmSlot | None) -> dict[str, Any]:
        """Blocks of rows as the message carries them: joined into the slot (large shipments in
        parallel parts by the helper threads), or into chunks for the comm (views of a block where
        a chunk lies within one). NumPy copies a block in one call, so the slot's ``write`` copy
        (for many single rows beside a busy thread) has nothing to add here."""
        nbytes = sum(b.nbytes for b in blocks)
        loop = asyncio.get_running_loop()
        if shm_slot is None:
            if nbytes >= STACK_IN_THREAD_BYTES:
                batch = await loop.run_in_executor(self._stackers, join_in_chunks, blocks, SEND_CHUNK_BYTES)
            else:
                batch = join_in_chunks(blocks, SEND_CHUNK_BYTES)
            return {"batch": to_serialize(batch)}
        bounds = np.cumsum([0] + [len(b) for b in blocks])
        rows = int(bounds[-1])
        shape = (rows, *blocks[0].shape[1:])
        view = shm_slot.array(shape, blocks[0].dtype)
        if nbytes >= STACK_IN_THREAD_BYTES:
            parts = min(STACK_THREADS, max(1, nbytes // STACK_PART_BYTES), rows)
            cuts = np.linspace(0, rows, parts + 1).astype(int)
            await asyncio.gather(*(
                loop.run_in_executor(self._stackers, _join_into, rows_between(blocks, bounds, a, b), view[a:b])
                for a, b in zip(cuts[:-1], cuts[1:])
            ))
        else:
            _join_into(blocks, view)
        return {"shm": {"name": shm_slot.name, "shape": shape, "dtype": blocks[0].dtype.str}}

    async def _collect(self, slot: WorkerSlot, token: str, formed: float, sent: float, new_slot: bool) -> Delivery:
        """The next part of a reply in parts (``token``: the last part's ``more``)."""
        try:
            reply = await self._call(slot.address, COLLECT, token=token, client=self.client.id,
                                     reply_shm=slot.asks_for_reply_files)
        except WorkerLost as exc:  # (also one not reached: the shipment was sent, and ran there)
            raise WorkerLost(exc.cause, sent=True) from exc
        raise_if_error(reply)
        return self._decode(reply, formed, sent, time.monotonic(), new_slot, slot, whole=False)

    async def _call(self, address: str, op: str, **message: Any) -> Any:
        """One ``op`` (``dynbatch_run``, ``dynbatch_collect``) over the client's connection pool. Connecting and sending are two
        steps here (the public ``client.rpc(address).op()`` does both in one) so that a worker that
        cannot be reached costs its requests no attempt: nothing was sent."""
        pool = self.client.rpc
        try:
            comm = await pool.connect(address, timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            raise WorkerLost(exc, sent=False) from exc
        try:
            reply = await send_recv_on(pool, comm, op, **message)
        except OSError as exc:  # the worker died or is unreachable: re-run elsewhere
            raise WorkerLost(exc, sent=True) from exc
        finally:
            pool.reuse(address, comm)
        if not isinstance(reply, dict):  # no dynbatch_run handler: the worker half is torn down
            raise WorkerLost(RuntimeError(f"the worker answered {reply!r}: it is closing"), sent=False)
        return reply

    def _decode(self, reply: dict[str, Any], formed: float, sent: float, done: float, new_slot: bool,
                slot: WorkerSlot, whole: bool) -> Delivery:
        """The reply decoded. A shared-memory reply that cannot be read turns the worker's replies
        to the comm; then ``whole`` (the first reply, with every row's result) raises
        :class:`ReplyUnavailable` (the caller sends the shipment again), while a part, or the last
        of several, reports its rows ``lost``."""
        decoded = ShipmentReply.from_msg(reply)
        lost: list[int] = []
        if decoded.reply_file is not None:
            try:
                outputs = read_reply(decoded.reply_file)
            except ReplyUnavailable as exc:
                slot.reply_files = False
                logger.info("dynbatch: cannot read worker %s's shared-memory replies (%s); they travel over "
                            "the comm", slot.address, exc)
                if whole and decoded.more is None:
                    raise
                lost = [row for rows, _ in decoded.pieces for row in rows]
                outputs = []
            pieces = [(rows, out) for (rows, _), out in zip(decoded.pieces, outputs)]
        else:
            pieces = [(rows, unwrap(outputs)) for rows, outputs in decoded.pieces]
        errors = [(row, exception_from(err)) for row, err in decoded.errors]
        return Delivery(decoded, pieces, errors, formed, sent, done, new_slot, lost)

    def _on_shm_error(self, slot: WorkerSlot, ring: ShmRing, shm_slot: ShmSlot, error: BaseException) -> None:
        """The worker could not map a slot. One it had mapped before is stale (the worker restarted
        at the same address, or dropped it): retire it and keep the ring; a new one it cannot open
        means another host or container: the comm from now on."""
        stale = shm_slot.attached  # (retiring closes the slot, which marks it so)
        ring.retire(shm_slot)
        if stale:
            logger.info("dynbatch: worker %s lost shared-memory slot %s (%s); a new one is made", slot.address,
                        shm_slot.name, error)
            return
        if slot.shm is ring:
            slot.close_shm()
        logger.info("dynbatch: worker %s cannot map this client's shared memory (%s); shipments to it travel "
                    "over the comm", slot.address, error)


#: where each leaf of a structured shipment starts in a slot: a multiple of this many bytes
_ALIGN = 64


def tree_into_slot(slot: ShmSlot, samples: list[Sample], ragged: list[bool]) -> list[list]:
    """Lay structured rows out in ``slot`` leaf after leaf (a ragged leaf: its joined values, then
    its offsets); returns the layout the worker reads them back by (:func:`~dask_dynbatch.worker.intake.tree_from_slot`)."""
    layout: list[list] = []
    at = 0

    def place(array_shape: tuple, dtype: np.dtype) -> tuple[int, np.ndarray]:
        nonlocal at
        start = -(-at // _ALIGN) * _ALIGN
        view = slot.array(array_shape, dtype, offset=start)
        at = start + view.nbytes
        return start, view

    for j, is_ragged in enumerate(ragged):
        column = [s.leaves[j] for s in samples]
        first = column[0]
        if not is_ragged:
            start, view = place((len(column), *first.shape), first.dtype)
            np.stack(column, out=view)
            layout.append(["a", start, list(view.shape), first.dtype.str])
            continue
        lengths = [len(c) for c in column]
        start, view = place((sum(lengths), *first.shape[1:]), first.dtype)
        np.concatenate(column, out=view)
        ostart, offsets = place((len(column) + 1,), np.dtype(np.int64))
        offsets[0] = 0
        np.cumsum(lengths, out=offsets[1:])
        layout.append(["r", start, list(view.shape), first.dtype.str, ostart])
    return layout


def _stack_into(samples: list[np.ndarray], out: np.ndarray) -> None:
    """Stack samples into ``out`` (a shared-memory view); NumPy copies without holding the GIL."""
    np.stack(samples, out=out)


def _join_into(blocks: list[np.ndarray], out: np.ndarray) -> None:
    """Join blocks of rows into ``out`` (a shared-memory view); NumPy copies without holding the GIL."""
    np.concatenate(blocks, out=out)


def _priority_runs(reqs: list[Request], firsts: list[int] | range) -> list[tuple[int, int]] | None:
    """``(first row, priority)`` where the priority changes (rows leave the queue highest first;
    ``firsts``: each request's first row); None when every row has priority 0."""
    runs: list[tuple[int, int]] = []
    for i, req in enumerate(reqs):
        if not runs or runs[-1][1] != req.priority:
            runs.append((firsts[i], req.priority))
    return None if runs == [(0, 0)] else runs
