"""Same-host transport of batches through shared memory (``/dev/shm``).

A batch of ResNet-sized images is tens of megabytes. Sent through a Dask comm (TCP, even on
localhost), it is copied by the kernel twice and received into a fresh buffer per frame, which can
cap the whole data path below what a GPU runs. When the client and the worker share a host,
dask-dynbatch instead stacks the batch straight into a shared-memory slot and sends only the slot's name, shape
and dtype over the comm; the worker maps the slot once and copies the batch out of it (into pinned
memory and on to the GPU, or into a private array on a CPU). Triton's "system shared memory" and
Ray's object store do the same for clients on the same host.

How a slot lives (nothing is left behind once a worker has mapped it, whatever dies):

- The client creates a file ``/dev/shm/dynbatch-<pid>-<random>`` and reserves its space with
  ``posix_fallocate`` (a tmpfs that is full would otherwise kill the writer with SIGBUS); no room
  means the batch goes over the comm as before.
- The worker maps the file by name on the first batch that uses it, and keeps the mapping.
- Once a reply shows that the worker has it mapped, the client unlinks the file: from then on the
  memory lives exactly as long as the two mappings, so a client or worker that dies frees it (a
  client killed between making a slot and that reply leaves the file until the host restarts).
- A slot is reused for the next batch to the same worker once the reply to its batch arrived (the
  worker copied the batch out before replying). A slot too small for a larger batch is retired:
  the client closes it and tells the worker to drop its mapping with the next batch
  (``shm_drop``); a client that leaves has its mappings dropped by the scheduler plugin.
- A worker that cannot open the name (another host, another container, no ``/dev/shm``) says so
  in its reply, and the client sends that batch, and every later one to that worker, over the comm.

Replies can come back the same way when they are large (per-token features of a text model are
megabytes a shipment, which the client's event loop otherwise reads from a socket;
``dynbatch.transport.shared-memory-replies``, off by default): the worker writes a reply's arrays
into a file of its own (``dynbatch-r-<pid>-<random>``, :class:`ReplyFiles`) and sends its name;
the client maps it, unlinks it at once and reads the arrays in place (:func:`read_reply`). A
reply file whose client never came for it (a client that died with the reply on its way) is
unlinked by the worker after :data:`REPLY_TTL` seconds, or when the worker closes; one written
just before its worker was killed, by any worker of the host once it is that old and its writer
is gone (each worker looks every :data:`REPLY_TTL` seconds, :func:`sweep_orphans`). The
client asks for them only from a worker that has mapped one of its slots (same host). All the
outputs of one reply share one mapping: a request's result kept alive keeps its shipment's memory
(in ``/dev/shm``) alive too.

Off with ``dynbatch.transport.shared-memory: false``; batches and replies smaller than
``dynbatch.transport.shared-memory-min-bytes`` always travel over the comm.
"""

from __future__ import annotations

import logging
import mmap
import os
import pickle
import re
import stat
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
PREFIX = "dynbatch-"
#: the smallest slot; a slot is created at the next power of two above the batch, so that a batch
#: size that grows step by step retires (and re-maps) a slot once per doubling, not at every step
GRANULE = 1 << 20
#: rows per pwritev call (the system's limit on buffers per call)
try:
    _IOV_MAX = max(1, min(1024, os.sysconf("SC_IOV_MAX")))
except (AttributeError, ValueError, OSError):
    _IOV_MAX = 16
#: names a worker accepts: ours, nothing with a path in it
_NAME = re.compile(r"^dynbatch-[0-9]+-[0-9a-f]{16}$")
#: names of reply files a client accepts (the group: the process id of the worker that wrote it)
_REPLY_NAME = re.compile(r"^dynbatch-r-([0-9]+)-[0-9a-f]{16}$")
#: seconds a reply file waits for its client before the worker unlinks it (a client reads it as
#: soon as the reply arrives; one that has not in this long is gone)
REPLY_TTL = 60.0
#: where each array of a reply file starts (a multiple of this many bytes)
ALIGN = 64


class ShmUnavailable(Exception):
    """The worker could not map the shared-memory slot a batch names."""


def shm_supported(directory: str = SHM_DIR) -> bool:
    """Whether this process can create shared-memory slots (a writable ``/dev/shm``)."""
    return os.path.isdir(directory) and os.access(directory, os.W_OK | os.X_OK)


class ShmSlot:
    """One shared-memory region the client stacks batches into (client side)."""

    __slots__ = ("name", "path", "capacity", "_mm", "_fd", "attached")

    def __init__(self, capacity: int, directory: str = SHM_DIR):
        self.name = f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:16]}"
        self.path = os.path.join(directory, self.name)
        self.capacity = int(capacity)
        self.attached = False  # the worker has mapped it and the file is unlinked
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, self.capacity)
            except OSError:
                os.unlink(self.path)
                raise
            self._mm = mmap.mmap(fd, self.capacity)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd  # kept for write_rows (the mapping and the file share their pages)

    def array(self, shape: tuple[int, ...], dtype: np.dtype, offset: int = 0) -> np.ndarray:
        """A writable view of the slot's bytes from ``offset`` on as an array of ``shape`` and ``dtype``."""
        return _view(self._mm, shape, dtype, offset)

    def write_rows(self, rows: list[np.ndarray]) -> None:
        """Stack ``rows`` (samples of one shape and dtype) into the slot's first bytes, as
        ``array((len(rows), *shape), dtype)`` then shows them.

        C-contiguous rows are written by ``pwritev``: one system call per 1,024 rows, the GIL
        released once for all of them. NumPy's stacking releases the GIL and takes it back for
        every row; while another thread runs Python without pause, each taking back waits up to the
        interpreter's switch interval. This is slower than NumPy alone and much faster beside a
        busy thread (``benchmarks/stack_probe.py`` measures both); the client uses it while one of its
        threads is making many requests (``dynbatch.transport.shared-memory-copy: auto``) and NumPy
        otherwise, since the event loop alone leaves the GIL often.
        Other rows (strided views) are stacked by NumPy."""
        if not rows:
            return
        first = rows[0]
        view = self.array((len(rows), *first.shape), first.dtype)
        if first.dtype.hasobject or not all(r.flags.c_contiguous for r in rows):
            np.stack(rows, out=view)
            return
        per_row = first.nbytes
        step = _IOV_MAX
        for start in range(0, len(rows), step):
            part = rows[start : start + step]
            written = os.pwritev(self._fd, part, start * per_row)
            if written < per_row * len(part):  # a short write (not seen on tmpfs): the rest by NumPy
                done = start + written // per_row
                np.stack(rows[done : start + len(part)], out=view[done : start + len(part)])

    def mark_attached(self) -> None:
        """The worker has it mapped: unlink the name (the memory lives on in the two mappings)."""
        if not self.attached:
            self.attached = True
            _unlink(self.path)

    def close(self) -> None:
        if not self.attached:
            _unlink(self.path)
            self.attached = True
        _close_map(self._mm)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        return f"<ShmSlot {self.name} {self.capacity} bytes{' attached' if self.attached else ''}>"


class ShmRing:
    """The shared-memory slots of one client for one worker on its host.

    ``acquire(nbytes)`` gives a free slot of at least ``nbytes`` (creating one when needed) or
    ``None`` when ``/dev/shm`` has no room; ``release(slot)`` returns it once its batch's reply
    arrived. At most ``keep`` slots stay around; a smaller one is retired for a larger batch, and
    :meth:`take_retired` hands the names of retired, attached slots to the next message to the
    worker, which drops its mappings.
    """

    def __init__(self, keep: int = 4, directory: str = SHM_DIR):
        self.keep = max(1, int(keep))
        self.directory = directory
        self._free: list[ShmSlot] = []
        self._busy: set[ShmSlot] = set()
        self._retired: list[str] = []
        self._lock = threading.Lock()
        self._no_room_at: int | None = None  # smallest size creation failed for
        self.closed = False
        # the worker has mapped one of these slots: it shares this host (its reply files are readable)
        self.proven = False

    def acquire(self, nbytes: int) -> ShmSlot | None:
        with self._lock:
            if self.closed:
                return None
            fitting = [s for s in self._free if s.capacity >= nbytes]
            if fitting:
                slot = min(fitting, key=lambda s: s.capacity)
                self._free.remove(slot)
                self._busy.add(slot)
                return slot
            if self._no_room_at is not None and nbytes >= self._no_room_at:
                return None
            # make room first: a smaller free slot goes when the ring is full
            while self._free and len(self._free) + len(self._busy) >= self.keep:
                self._retire(min(self._free, key=lambda s: s.capacity))
            capacity = max(GRANULE, 1 << (max(1, int(nbytes)) - 1).bit_length())
            try:
                slot = ShmSlot(capacity, self.directory)
            except OSError as exc:
                self._no_room_at = nbytes if self._no_room_at is None else min(self._no_room_at, nbytes)
                logger.info("dynbatch: no shared-memory slot of %d bytes (%s); this batch travels over the comm",
                            capacity, exc)
                return None
            self._busy.add(slot)
            return slot

    def release(self, slot: ShmSlot) -> None:
        with self._lock:
            self._busy.discard(slot)
            if self.closed:
                slot.close()
            else:
                self._free.append(slot)

    def retire(self, slot: ShmSlot) -> None:
        """Stop using ``slot`` (its batch is done with it): the worker lost or never had its mapping."""
        with self._lock:
            self._busy.discard(slot)
            self._free = [s for s in self._free if s is not slot]
            slot.close()

    def _retire(self, slot: ShmSlot) -> None:
        self._free.remove(slot)
        if slot.attached:
            self._retired.append(slot.name)
        slot.close()

    def take_retired(self) -> list[str]:
        """Names of retired slots the worker still maps (each is handed out once)."""
        with self._lock:
            names, self._retired = self._retired, []
            return names

    def close(self) -> list[str]:
        """Close every slot (busy ones when released); returns the names the worker maps."""
        with self._lock:
            self.closed = True
            names = list(self._retired)
            self._retired = []
            for slot in self._free:
                if slot.attached:
                    names.append(slot.name)
                slot.close()
            self._free = []
            names.extend(s.name for s in self._busy if s.attached)
            return names


class ReplyUnavailable(Exception):
    """The client could not read a reply file (another user, or it was gone): nothing of that
    reply reached the client."""


class ReplyFiles:
    """Large replies written into shared memory for a client on the same host (worker side).

    :meth:`write` pickles an object with its arrays out of band (pickle protocol 5), writes the
    arrays into a new file, 64-byte aligned, and returns what the client needs to read it back
    (:func:`read_reply`); the file is the client's to unlink from then on. ``clock``: for tests."""

    def __init__(self, directory: str = SHM_DIR, ttl: float = REPLY_TTL, clock: Callable[[], float] = time.monotonic):
        self.directory = directory
        self.ttl = float(ttl)
        self._clock = clock
        self._pending: deque[tuple[float, str]] = deque()  # (written at, path): unlinked after ttl
        self._next_orphans = clock()  # when to look for files of dead processes (see sweep_orphans)
        self._lock = threading.Lock()
        self.written = 0
        self.bytes = 0
        self.closed = False

    def write(self, obj: object, min_bytes: int = 0) -> dict | None:
        """Write ``obj``'s arrays to a new reply file; returns ``{"name", "size", "head", "buffers"}``
        (``buffers``: each array's offset and length), or None when its arrays hold fewer than
        ``min_bytes`` or no file could be made (the reply goes over the comm)."""
        self.sweep()
        buffers: list[pickle.PickleBuffer] = []
        try:
            head = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
            raws = [b.raw() for b in buffers]
        except (BufferError, pickle.PicklingError, TypeError, AttributeError):
            return None  # (a non-contiguous buffer, or nothing pickle can take out of band)
        total = sum(r.nbytes for r in raws)
        if not total or total < min_bytes:
            return None
        layout: list[tuple[int, int]] = []
        iov: list[bytes | memoryview] = []
        end = 0
        for raw in raws:
            start = -(-end // ALIGN) * ALIGN
            if start > end:
                iov.append(bytes(start - end))
            layout.append((start, raw.nbytes))
            iov.append(raw)
            end = start + raw.nbytes
        name = f"{PREFIX}r-{os.getpid()}-{uuid.uuid4().hex[:16]}"
        path = os.path.join(self.directory, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return None
        try:
            # (no fallocate: a write allocates the pages without zeroing them first, and a full tmpfs
            # fails it with ENOSPC; the client maps only what was written, so it never meets a hole)
            _pwrite_all(fd, iov)
        except OSError as exc:
            _unlink(path)
            logger.info("dynbatch: no shared-memory reply file of %d bytes (%s); the reply travels over the comm",
                        end, exc)
            return None
        except BaseException:
            _unlink(path)
            raise
        finally:
            os.close(fd)
        with self._lock:
            if self.closed:  # the worker closed while this was written: nobody would unlink it
                _unlink(path)
                return None
            self._pending.append((self._clock(), path))
            self.written += 1
            self.bytes += end
        return {"name": name, "size": end, "head": head, "buffers": layout}

    def sweep(self) -> int:
        """Unlink reply files older than ``ttl`` (their clients unlinked them long ago, or are
        gone); returns how many were still there. Every ``ttl`` seconds (and at the first call)
        also the reply files that workers killed on this host left behind (:func:`sweep_orphans`)."""
        now = self._clock()
        if now >= self._next_orphans:
            self._next_orphans = now + self.ttl
            try:
                sweep_orphans(self.directory, self.ttl)
            except Exception:  # housekeeping: never in the way of a reply
                logger.debug("dynbatch: files of processes that are gone not swept", exc_info=True)
        cutoff = now - self.ttl
        removed = 0
        while True:
            with self._lock:
                if not self._pending or self._pending[0][0] > cutoff:
                    return removed
                _, path = self._pending.popleft()
            removed += _unlink(path)

    def close(self) -> int:
        """Unlink every reply file not read yet (the worker closes); returns how many. A write
        that finishes later unlinks its own file."""
        with self._lock:
            self.closed = True
            paths = [p for _, p in self._pending]
            self._pending.clear()
        return sum(_unlink(p) for p in paths)

    def summary(self) -> dict:
        with self._lock:
            return {"reply_files": self.written, "reply_bytes": self.bytes}


def sweep_orphans(directory: str = SHM_DIR, min_age: float = REPLY_TTL, now: float | None = None) -> int:
    """Unlink the reply files in ``directory`` whose worker process is gone and that were last
    written at least ``min_age`` seconds before ``now`` (wall clock): replies of a worker killed
    before its client read them. Returns how many. A reply file is read within its shipment's
    round trip, and its own worker unlinks it after :data:`REPLY_TTL`: one this old is nobody's,
    also when its worker is alive in another PID namespace that shares ``/dev/shm`` (and looks
    gone from here). Client slots are left alone: an idle client keeps a slot a worker has not
    mapped yet, for as long as it likes."""
    now = time.time() if now is None else now
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    removed = 0
    for name in names:
        match = _REPLY_NAME.match(name)
        if match is None or _alive(int(match.group(1))):
            continue
        path = os.path.join(directory, name)
        try:
            if now - os.stat(path).st_mtime < min_age:
                continue
            removed += _unlink(path)
        except OSError:  # another user's (in a sticky /dev/shm)
            continue
    if removed:
        logger.info("dynbatch: unlinked %d shared-memory files of processes that are gone", removed)
    return removed


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (of any user)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    except (OSError, OverflowError, ValueError):  # cannot tell (a number no process has): keep its files
        return True
    return True


def read_reply(info: dict, directory: str = SHM_DIR) -> Any:
    """Client side of :class:`ReplyFiles`: map the file, unlink it, and unpickle the reply with its
    arrays read in place (copy-on-write: writable where they were writable on the worker; they
    live as long as any of them does, all of one reply together). Raises :class:`ReplyUnavailable`
    when the file cannot be read."""
    try:
        name, size = str(info["name"]), int(info["size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ReplyUnavailable(f"not a reply file description: {exc!r}") from None
    if not _REPLY_NAME.fullmatch(name):
        raise ReplyUnavailable(f"not a dask-dynbatch reply file name: {name!r}")
    path = os.path.join(directory, name)
    try:  # (not a link, and nothing that could block the event loop: a regular file only)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise ReplyUnavailable(f"cannot open {path} ({exc.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ReplyUnavailable(f"{path} is not a regular file")
        mm = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as exc:
        raise ReplyUnavailable(f"cannot map {path}: {exc}") from None
    finally:
        os.close(fd)
        try:
            _unlink(path)  # the mapping keeps the memory; nothing is left behind
        except OSError:
            pass
    whole = memoryview(mm)
    try:
        return pickle.loads(info["head"], buffers=[whole[start:start + n] for start, n in info["buffers"]])
    finally:
        whole.release()  # the arrays hold their own views: the mapping goes with the last of them


def _pwrite_all(fd: int, iov: list) -> None:
    """Write ``iov`` from the start of ``fd``: one system call per ``_IOV_MAX`` buffers, the GIL
    released in each."""
    offset = 0
    for start in range(0, len(iov), _IOV_MAX):
        part = [memoryview(b).cast("B") for b in iov[start : start + _IOV_MAX]]
        want = sum(len(b) for b in part)
        written = os.pwritev(fd, part, offset)
        while written < want:  # a short write (not seen on tmpfs): the rest of its buffer, then on
            skip = written
            for b in part:
                if skip >= len(b):
                    skip -= len(b)
                    continue
                n = os.pwrite(fd, b[skip:], offset + written)
                if n == 0:
                    raise OSError("short write to a reply file")
                written += n
                break
        offset += want


class ShmAttachments:
    """The shared-memory slots a worker has mapped, per client (worker side).

    At most ``max_mappings`` are kept; the least recently used goes first (a client that names it
    again is told it is unavailable, and sends over the comm).
    """

    def __init__(self, directory: str = SHM_DIR, max_mappings: int = 512):
        self.directory = directory
        self.max_mappings = int(max_mappings)
        self._maps: OrderedDict[tuple[str, str], mmap.mmap] = OrderedDict()
        self._unpin: dict[int, Callable[[], None]] = {}  # id(mapping) -> undo its page-locking
        self._lock = threading.Lock()

    def pin(self, client: str, name: str, pinner: Callable[[int, int], Callable[[], None] | None]) -> bool:
        """Page-lock slot ``name``'s mapping once, so that a device copies batches straight out of
        it: ``pinner(address, nbytes)`` returns how to undo it (called before the mapping closes),
        or None when it could not. Returns whether the mapping is page-locked."""
        key = (str(client), str(name))
        with self._lock:
            mm = self._maps.get(key)
            if mm is None:
                return False
            if id(mm) in self._unpin:
                return True
            view = np.frombuffer(mm, dtype=np.uint8)
            try:
                undo = pinner(view.ctypes.data, len(mm))
            finally:
                del view  # an exported buffer would keep the mapping from closing
            if undo is None:
                return False
            self._unpin[id(mm)] = undo
            return True

    def _close(self, mm: mmap.mmap) -> None:
        # (a mapping evicted from the LRU while a batch of it is still being staged would be
        # unlocked under that copy; with 512 mappings, four slots per Batcher of arrays and 25 per
        # Batcher of padded samples, it takes 20 padded Batchers on one worker)
        undo = self._unpin.pop(id(mm), None)
        if undo is not None:
            try:
                undo()
            except Exception as exc:  # never keep a mapping open for this
                logger.warning("dynbatch: could not unlock a shared-memory mapping's pages: %r", exc)
        _close_map(mm)

    def array(self, client: str, name: str, shape, dtype, offset: int = 0) -> np.ndarray:
        """The batch a client stacked into slot ``name`` (a view: copy it out before replying)."""
        key = (str(client), str(name))
        with self._lock:
            mm = self._maps.get(key)
            if mm is not None:
                self._maps.move_to_end(key)
        if mm is None:
            mm = self._open(name)
            with self._lock:
                self._maps[key] = mm
                while len(self._maps) > self.max_mappings:
                    _, old = self._maps.popitem(last=False)
                    self._close(old)
        shape = tuple(int(s) for s in shape)
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset + nbytes > len(mm):
            raise ShmUnavailable(f"shared-memory slot {name} holds {len(mm)} bytes, less than the batch's {offset + nbytes}")
        return _view(mm, shape, dtype, int(offset))

    def _open(self, name: str) -> mmap.mmap:
        if not _NAME.match(str(name)):
            raise ShmUnavailable(f"not a dask-dynbatch shared-memory slot name: {name!r}")
        path = os.path.join(self.directory, name)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise ShmUnavailable(f"cannot open {path} ({exc.strerror}): the client is on another host or "
                                 "in another container, or the slot is gone") from None
        try:
            return mmap.mmap(fd, 0)
        except (OSError, ValueError) as exc:
            raise ShmUnavailable(f"cannot map {path}: {exc}") from None
        finally:
            os.close(fd)

    def drop(self, client: str, names: list[str] | None = None) -> int:
        """Unmap a client's slots (``names``, or all of them); returns how many."""
        with self._lock:
            keys = [k for k in self._maps if k[0] == client and (names is None or k[1] in names)]
            maps = [self._maps.pop(k) for k in keys]
            for mm in maps:
                self._close(mm)
        return len(maps)

    def summary(self) -> dict:
        with self._lock:
            return {"mappings": len(self._maps), "bytes": int(sum(len(m) for m in self._maps.values())),
                    "clients": len({c for c, _ in self._maps}), "page_locked": len(self._unpin)}

    def close(self) -> None:
        with self._lock:
            maps = list(self._maps.values())
            self._maps.clear()
            for mm in maps:
                self._close(mm)


def _view(mm: mmap.mmap, shape: tuple[int, ...], dtype, offset: int = 0) -> np.ndarray:
    """The bytes of a mapping from ``offset`` on as an array of ``shape`` and ``dtype`` (no copy)."""
    return np.frombuffer(mm, dtype=dtype, count=int(np.prod(shape, dtype=np.int64)), offset=offset).reshape(shape)


def _close_map(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:  # a view of it is still alive: the mapping goes when that does
        pass


def _unlink(path: str) -> bool:
    """Unlink ``path``; whether it was there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
