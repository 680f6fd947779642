"""Split large bodies into chunks and reassemble them, transport-independent.

RabbitMQ refuses messages over ``max_message_size`` (16 MiB by default in 4.x), while
model weights can be far larger. The buses split bodies over ``chunk_size`` with
:func:`split_body` and feed received chunks to a :class:`Reassembler`, which bounds the
memory and the time a partial transfer may hold and verifies the sha256 of the whole
body before handing it back. Anything inconsistent raises :class:`ChunkError`; the
transfer is then dropped, so its chunks can be dead-lettered by the caller.

Reservations are bounded per broker-verified sender (the AMQP ``user_id``; chunks
without one share a single anonymous quota), and a transfer may declare at most the
frame limit, so one sender's 10-byte first chunk cannot reserve everyone's memory.
A refusal for capacity raises :class:`ChunkCapacity`: the caller requeues the chunk,
and the honest transfer is retried once room is free.

Chunk *counts* are bounded as well as bytes, since each unacked chunk holds a slot of the
consumer's prefetch window: a header's fields are within ``protocol.bounds.CHUNK_HEADER``,
its count matches its total size and one chunk size (every chunk but the last is exactly
that size, the last holds the rest, none is empty), and the chunks one broker user may
have in progress are capped (``max_user_chunks``, default well below the 65,535-message
prefetch window) as are all users' together (``max_chunks``). So ``total_size=0``
followed by 65,534 empty chunks is refused at its first chunk and holds nothing.
"""

from __future__ import annotations


import hashlib
import mmap
import os
import tempfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Callable

from protocol import bounds
from protocol.errors import ChunkCapacity, ChunkError, ProtocolError
from protocol.limits import DEFAULT_LIMITS

__all__ = ["split_body", "Reassembler", "SpillMap", "SpilledChunk", "spill_origin", "ChunkError", "ChunkCapacity", "HEADER_FIELDS", "MAX_CHUNKS",
           "MAX_USER_CHUNKS", "window_chunks"]

HEADER_FIELDS = ("transfer_id", "index", "count", "sha256", "total_size")
assert set(HEADER_FIELDS) == set(bounds.CHUNK_HEADER)
MAX_CHUNKS = 16_384  # chunks in progress on one consumer, all users together (prefetch window: 65,535)
MAX_USER_CHUNKS = 4_096  # ... per broker user: an honest 512 MiB frame in 8 MiB chunks is 64


def split_body(
    body: bytes | bytearray | memoryview, *, chunk_size: int, transfer_id: str | None = None
) -> list[tuple[dict[str, Any], memoryview]]:
    """Cut ``body`` into ``ceil(len/chunk_size)`` zero-copy slices with their headers.

    Each header is ``{transfer_id, index, count, sha256, total_size}``; ``sha256`` is of
    the whole body, so the receiver verifies the reassembled result, not each slice.
    An empty body is one empty chunk.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    view = memoryview(body).cast("B")
    total = len(view)
    count = max(1, -(-total // chunk_size))
    digest = hashlib.sha256(view).hexdigest()
    tid = transfer_id or uuid.uuid4().hex
    return [
        (
            {"transfer_id": tid, "index": i, "count": count, "sha256": digest, "total_size": total},
            view[i * chunk_size : (i + 1) * chunk_size],
        )
        for i in range(count)
    ]


@dataclass
class _Transfer:
    count: int
    sha256: str
    total_size: int
    started: float
    user: str = ""
    buf: bytearray = field(default_factory=bytearray)  # total_size bytes; each chunk copied to its place
    file: Any = None  # with ``spill``: an unlinked temporary file of total_size bytes instead of ``buf``
    parts: set[int] = field(default_factory=set)  # indexes received
    received: int = 0
    chunk_size: int = 0  # of every chunk but the last; 0 until a chunk tells it
    # sha256 of the body so far, fed chunk by chunk in index order as chunks arrive (an out-of-order
    # chunk is hashed once the chunks before it are in): the complete body is never read again to be
    # verified, and the hashing happens while the rest of the transfer is still on the wire.
    hasher: Any = field(default_factory=hashlib.sha256)
    hashed: int = 0  # chunks 0 .. hashed-1 are in ``hasher``


class Reassembler:
    """Collect chunks per transfer; return the whole body once every chunk arrived.

    Memory is bounded by *declared* sizes: a transfer reserves its ``total_size`` when
    its first chunk arrives. A declared size over ``max_transfer_bytes`` (the frame
    limit) is an error; a reservation over ``max_bytes`` across all transfers, over
    ``max_user_bytes`` for its sender, or beyond ``max_transfers`` /
    ``max_user_transfers`` in progress is refused for capacity (``ChunkCapacity``).
    Chunks may arrive in any order. Not thread-safe: one reassembler per consumer.
    """

    def __init__(
        self,
        *,
        max_bytes: int = 1 * 2**30,
        max_transfers: int = 64,
        timeout_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        max_transfer_bytes: int = DEFAULT_LIMITS.max_frame_bytes,
        max_user_bytes: int | None = None,
        max_user_transfers: int | None = None,
        max_chunks: int = MAX_CHUNKS,
        max_user_chunks: int | None = None,
        spill: bool = False,
    ) -> None:
        # spill: partial transfers wait in unlinked temporary files (the page cache, not this
        # process's memory); a complete body is mapped read-only, so it costs memory only while
        # it is read. A consumer that receives many large transfers at once holds none of them.
        self.spill = spill
        self.max_bytes = max_bytes
        self.max_transfers = max_transfers
        self.timeout_s = timeout_s
        self.max_transfer_bytes = max_transfer_bytes
        # One sender may hold at most half the budget: the other half stays for everyone else.
        self.max_user_bytes = max_user_bytes if max_user_bytes is not None else min(max_bytes // 2, max_transfer_bytes)
        self.max_user_transfers = max_user_transfers if max_user_transfers is not None else min(max_transfers, 8)
        self.max_chunks = max_chunks
        self.max_user_chunks = max_user_chunks if max_user_chunks is not None else min(MAX_USER_CHUNKS, max_chunks)
        self._chunks = 0
        self._user_chunks: dict[str, int] = {}
        self._clock = clock
        self._transfers: dict[str, _Transfer] = {}
        self._reserved = 0
        self._user_reserved: dict[str, int] = {}
        self._user_transfers: dict[str, int] = {}
        # The bytes of the chunk last added, as a view of its transfer's buffer (or, spilling, a
        # reference into its file): a consumer that keeps chunks for dead-lettering keeps this,
        # not a second copy of the chunk.
        self.last_view: memoryview | SpilledChunk | None = None
        # The sha256 of the body ``add`` returned last, as verified here (hex); None when it returned none.
        # It is the whole frame's hash: a receiver need not hash the body again to name it.
        self.last_sha256: str | None = None

    @property
    def reserved_bytes(self) -> int:
        """Bytes reserved by transfers in progress (sum of their declared sizes)."""
        return self._reserved

    def add(self, header: dict[str, Any], data: bytes | bytearray | memoryview, *,
            user: str | None = None) -> bytes | memoryview | None:
        """Store one chunk of ``user``'s transfer; return the verified whole body when it completes.

        Chunks are copied into one buffer of the declared size as they come (in any order), so a
        transfer holds one copy of its body, and the body handed back is a view of that buffer.

        ``user`` is the broker-verified sender (AMQP ``user_id``), None when unknown.
        Raises ``ChunkCapacity`` when there is no room now (nothing is dropped: requeue
        the chunk), ``ChunkError`` (with ``.transfer_id``) for a malformed or inconsistent
        header, a declared size over the frame limit, a duplicate index, oversize data or
        a sha256 mismatch; the transfer is then dropped.
        """
        tid, index, count, digest, total = _check_header(header)
        size = len(data)
        self.last_view = None
        self.last_sha256 = None
        if size == 0 and total > 0:
            raise _error(tid, f"transfer {tid}: chunk {index} of {count} is empty (total_size={total}); "
                              "only an empty body travels as one empty chunk")
        if count == 1:
            body = bytes(data)
            _verify(tid, body, digest, total)
            self.last_sha256 = digest
            return body
        owner = user or ""
        # Transfer ids are chosen by senders: one user's chunks never join another user's transfer.
        key = f"{owner}\x00{tid}"
        t = self._transfers.get(key)
        if t is None:
            self._reserve(tid, key, owner, count=count, digest=digest, total=total)
            t = self._transfers[key]
        elif (t.count, t.sha256, t.total_size) != (count, digest, total):
            self._drop(key)
            raise _error(
                tid,
                f"transfer {tid} chunk {index}: header (count={count}, total_size={total}) "
                f"disagrees with earlier chunks (count={t.count}, total_size={t.total_size}) "
                "or sha256 differs",
            )
        if index in t.parts:
            self._drop(key)
            raise _error(tid, f"transfer {tid}: duplicate chunk {index} of {count}")
        if t.received + size > t.total_size:
            self._drop(key)
            raise _error(
                tid,
                f"transfer {tid}: chunk {index} brings {t.received + size} bytes, "
                f"more than the declared total_size={t.total_size}",
            )
        try:
            t.chunk_size = _chunk_size(t.chunk_size, index=index, count=count, total=total, size=size)
        except ValueError as e:
            self._drop(key)
            raise _error(tid, f"transfer {tid} chunk {index} of {count}: {e}") from None
        at = index * t.chunk_size
        if self.spill:
            if t.file is None:
                t.file = tempfile.TemporaryFile(prefix="fedbus-transfer-")
            os.pwrite(t.file.fileno(), data, at)
            self.last_view = SpilledChunk(t.file, at, size)
        else:
            if not t.buf:
                t.buf = bytearray(total)
            memoryview(t.buf)[at:at + size] = data
            self.last_view = memoryview(t.buf)[at:at + size]
        t.parts.add(index)
        t.received += size
        _hash_ready(t, index, data)
        if len(t.parts) < t.count:
            return None
        self._drop(key)
        if t.received != t.total_size:
            raise _error(tid, f"transfer {tid}: got {t.received} bytes, declared {t.total_size}")
        if t.hashed != t.count:  # cannot happen (every index is in ``parts``): never hand on an unhashed body
            raise _error(tid, f"transfer {tid}: {t.count - t.hashed} chunk(s) not hashed")
        # Verified from the running hash (fed as the chunks came) before the body is handed on.
        _check_digest(tid, t.hasher.hexdigest(), digest)
        self.last_sha256 = digest
        if t.file is not None:
            # Mapped untouched: the body costs this process no memory until its reader reads it
            # (the coordinator opens one update at a time).
            whole = SpillMap(t.file.fileno(), total, prot=mmap.PROT_READ)
            whole.file = t.file  # what ``spill_origin`` finds: the bytes' file, for a copy without the map
            return memoryview(whole)
        return memoryview(t.buf)

    def _reserve(self, tid: str, key: str, owner: str, *, count: int, digest: str, total: int) -> None:
        who = f"user {owner!r}" if owner else "unauthenticated senders"
        if total > self.max_transfer_bytes:
            raise _error(
                tid,
                f"transfer {tid} declares {total} bytes, over the frame limit max_transfer_bytes="
                f"{self.max_transfer_bytes}: no frame that large can be accepted",
            )
        mine = self._user_reserved.get(owner, 0)
        if total > self.max_user_bytes - mine:
            raise _capacity(
                tid,
                f"transfer {tid} declares {total} bytes but {who} already reserve {mine} of their quota "
                f"max_user_bytes={self.max_user_bytes} (max_bytes={self.max_bytes}); requeued until theirs finish",
            )
        if total > self.max_bytes - self._reserved:
            raise _capacity(
                tid,
                f"transfer {tid} declares {total} bytes but only {self.max_bytes - self._reserved} of "
                f"max_bytes={self.max_bytes} are free; requeued until transfers in progress finish",
            )
        if self._user_transfers.get(owner, 0) >= self.max_user_transfers:
            raise _capacity(tid, f"transfer {tid} refused for now: {who} have max_user_transfers="
                                 f"{self.max_user_transfers} in progress (max_transfers={self.max_transfers})")
        if len(self._transfers) >= self.max_transfers:
            raise _capacity(tid, f"transfer {tid} refused for now: max_transfers={self.max_transfers} already in progress")
        if count > min(self.max_user_chunks, self.max_chunks):
            raise _error(tid, f"transfer {tid} declares {count} chunks, over max_user_chunks={self.max_user_chunks} "
                              f"(max_chunks={self.max_chunks}): it could never be held; send larger chunks")
        my_chunks = self._user_chunks.get(owner, 0)
        if my_chunks + count > self.max_user_chunks:
            raise _capacity(tid, f"transfer {tid} declares {count} chunks but {who} already have {my_chunks} of "
                                 f"max_user_chunks={self.max_user_chunks} in progress; requeued until theirs finish")
        if self._chunks + count > self.max_chunks:
            raise _capacity(tid, f"transfer {tid} declares {count} chunks but {self._chunks} of "
                                 f"max_chunks={self.max_chunks} are in progress; requeued until they finish")
        self._transfers[key] = _Transfer(count=count, sha256=digest, total_size=total, started=self._clock(), user=owner)
        self._reserved += total
        self._user_reserved[owner] = mine + total
        self._user_transfers[owner] = self._user_transfers.get(owner, 0) + 1
        self._chunks += count
        self._user_chunks[owner] = my_chunks + count

    def has_room(self, total: int, count: int, *, user: str | None = None,
                 ahead: Iterable[tuple[str | None, int, int]] = ()) -> bool:
        """Whether a transfer of ``total`` bytes in ``count`` chunks from ``user`` would be admitted
        now (the capacity checks of ``add``): a consumer requeues a transfer it refused only then.
        ``ahead``: ``(user, total, count)`` of transfers already requeued, admitted before it once
        they are back (two waiting transfers that each fit alone must not both be requeued)."""
        owner = user or ""
        reserved, chunks, transfers = self._reserved, self._chunks, len(self._transfers)
        mine, my_chunks = self._user_reserved.get(owner, 0), self._user_chunks.get(owner, 0)
        my_transfers = self._user_transfers.get(owner, 0)
        for u, t, c in ahead:
            reserved, chunks, transfers = reserved + t, chunks + c, transfers + 1
            if (u or "") == owner:
                mine, my_chunks, my_transfers = mine + t, my_chunks + c, my_transfers + 1
        return (total <= self.max_user_bytes - mine
                and total <= self.max_bytes - reserved
                and my_transfers < self.max_user_transfers
                and transfers < self.max_transfers
                and my_chunks + count <= self.max_user_chunks
                and chunks + count <= self.max_chunks)

    def user_reserved_bytes(self, user: str | None) -> int:
        """Bytes reserved by ``user``'s transfers in progress."""
        return self._user_reserved.get(user or "", 0)

    def expire(self) -> list[str]:
        """Drop transfers older than ``timeout_s`` (a chunk went missing); return their ids."""
        return [tid for _, tid in self.expire_transfers()]

    def expire_transfers(self) -> list[tuple[str | None, str]]:
        """Like ``expire``, as ``(user, transfer_id)`` pairs (a transfer id is unique per user only)."""
        now = self._clock()
        old = [key for key, t in self._transfers.items() if now - t.started > self.timeout_s]
        for key in old:
            self._drop(key)
        pairs = [key.split("\x00", 1) for key in old]
        return [(user or None, tid) for user, tid in pairs]

    def discard(self, transfer_id: str, *, user: str | None = None) -> None:
        """Forget a transfer (e.g. its chunks were given back to the broker)."""
        self._drop(f"{user or ''}\x00{transfer_id}")

    def missing(self, transfer_id: str, *, user: str | None = None) -> list[int]:
        """Chunk indexes not yet received for a transfer in progress."""
        t = self._transfers.get(f"{user or ''}\x00{transfer_id}")
        if t is None:
            return []
        return [i for i in range(t.count) if i not in t.parts]

    def in_progress(self) -> list[str]:
        """Transfer ids that have some but not all chunks."""
        return [key.split("\x00", 1)[1] for key in self._transfers]

    def _drop(self, key: str) -> None:
        t = self._transfers.pop(key, None)
        if t is not None:
            self._reserved -= t.total_size
            self._user_reserved[t.user] -= t.total_size
            self._user_transfers[t.user] -= 1
            self._chunks -= t.count
            self._user_chunks[t.user] -= t.count
            if not self._user_transfers[t.user]:
                del self._user_transfers[t.user], self._user_reserved[t.user], self._user_chunks[t.user]


class SpillMap(mmap.mmap):
    """The read-only map of a complete spilled transfer, knowing its file (``spill_origin``)."""

    file: Any = None


def spill_origin(view: memoryview) -> tuple[Any, int] | None:
    """``(file, offset)`` of the bytes ``view`` shows when they lie in a spilled transfer's file
    (``view`` is, or is a slice of, a body ``Reassembler(spill=True)`` returned); else None. A
    reader can then copy them from the file (in the kernel) instead of through the map."""
    base = view.obj
    if not isinstance(base, SpillMap) or base.file is None or not view.nbytes:
        return None
    import numpy as np

    at = np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0]
    start = np.frombuffer(base, dtype=np.uint8).__array_interface__["data"][0]
    offset = at - start
    if not 0 <= offset <= len(base) - view.nbytes:
        return None
    return base.file, offset


class SpilledChunk:
    """A received chunk's bytes in its transfer's spill file, read back only to dead-letter it."""

    def __init__(self, file: Any, at: int, size: int) -> None:
        self.file, self.at, self.size = file, at, size

    def read(self) -> bytes:
        return os.pread(self.file.fileno(), self.size, self.at)

    def __len__(self) -> int:
        return self.size


def _error(tid: str | None, msg: str) -> ChunkError:
    err = ChunkError(msg)
    err.transfer_id = tid  # type: ignore[attr-defined]
    return err


def _capacity(tid: str, msg: str) -> ChunkCapacity:
    err = ChunkCapacity(msg)
    err.transfer_id = tid  # type: ignore[attr-defined]
    return err


def _verify(tid: str, body: bytes | memoryview, digest: str, total: int) -> None:
    if len(body) != total:
        raise _error(tid, f"transfer {tid}: body has {len(body)} bytes, declared {total}")
    _check_digest(tid, hashlib.sha256(body).hexdigest(), digest)


def _check_digest(tid: str, got: str, digest: str) -> None:
    if got != digest:
        raise _error(tid, f"transfer {tid}: sha256 mismatch (corrupted chunk): got {got}, expected {digest}")


def _hash_ready(t: _Transfer, index: int, data: bytes | bytearray | memoryview) -> None:
    """Feed ``t.hasher`` every chunk now contiguous from its last hashed one: ``data`` when it is the
    next in order (the usual case: one publisher sends a transfer in order), then any that came early,
    read back from the transfer's buffer or spill file."""
    if index != t.hashed:
        return
    t.hasher.update(data)
    t.hashed += 1
    while t.hashed in t.parts:
        at = t.hashed * t.chunk_size
        size = min(t.chunk_size, t.total_size - at)
        if t.file is not None:
            t.hasher.update(os.pread(t.file.fileno(), size, at))
        else:
            t.hasher.update(memoryview(t.buf)[at:at + size])
        t.hashed += 1


def _chunk_size(known: int, *, index: int, count: int, total: int, size: int) -> int:
    """The transfer's chunk size, learnt from this chunk or checked against ``known``.

    Every chunk but the last has the same size ``c`` with ``ceil(total / c) == count``, and
    the last holds ``total - (count - 1) * c`` bytes (1..c): what ``split_body`` sends.
    Raises ``ValueError`` saying what does not fit.
    """
    if index < count - 1:
        c = size
    else:
        rest = total - size
        if rest <= 0 or rest % (count - 1):
            raise ValueError(f"the last chunk's {size} bytes leave {rest} for {count - 1} equal chunks")
        c = rest // (count - 1)
    if c < 1 or -(-total // c) != count or not 1 <= total - (count - 1) * c <= c:
        raise ValueError(f"{count} chunks do not split total_size={total} into chunks of {c} bytes")
    if known and c != known:
        raise ValueError(f"chunk size {c} differs from the transfer's {known}")
    return c


def _check_header(header: dict[str, Any]) -> tuple[str, int, int, str, int]:
    if not isinstance(header, dict):
        raise _error(None, f"chunk header must be a dict, got {type(header).__name__}")
    missing = [f for f in HEADER_FIELDS if f not in header]
    tid = header.get("transfer_id")
    named = tid if isinstance(tid, str) and len(tid) <= 128 else None
    if missing:
        raise _error(named, f"chunk header misses {', '.join(missing)}")
    try:
        bounds.check_record(bounds.CHUNK_HEADER, header, "chunk header")
    except ProtocolError as e:
        raise _error(named, f"transfer {named}: {e}") from None
    index, count, digest, total = (header[f] for f in HEADER_FIELDS[1:])
    if index >= count:
        raise _error(tid, f"transfer {tid}: chunk index {index} >= count {count}")
    if count > max(1, total):
        raise _error(tid, f"transfer {tid}: count {count} chunks cannot carry total_size={total} bytes "
                          "(every chunk holds at least one byte; an empty body is one chunk)")
    return str(tid), int(index), int(count), str(digest), int(total)  # each checked by CHUNK_HEADER above


def window_chunks(header: Any, max_user_chunks: int = MAX_USER_CHUNKS) -> int:
    """Prefetch slots a consumer may open for the transfer ``header`` starts: its count, when
    the header is valid and the transfer could be held; else 1 (its chunks are refused one by one)."""
    try:
        _, _, count, _, _ = _check_header(header)
    except ChunkError:
        return 1
    return count if count <= max_user_chunks else 1
