"""The site's cache of model chunks, by content hash (docs/design.md "Models: publish once").

A model chunk arrives on the site's own queue as a plain message whose header claims its
sha256 (``protocol.model_blob.MODEL_CHUNK_HEADER``). ``put`` hashes the bytes and refuses a
chunk that does not match its claim (the caller dead-letters it); a matching chunk is
written durably under its *computed* hash (never a wire-chosen name) before the message is
acked, so a site killed mid-transfer either has the chunk or gets it again.

``resolve`` assembles a task's model from its signed ``ModelRef`` fields into one buffer,
checks every chunk's hash and the whole blob's sha256 *before* decoding a byte of it, and
only then hands the tensors (views of that buffer) to training. A chunk that is not here
means the version is gone (evicted, tampered and dead-lettered, or never sent):
``ModelUnavailable``, which the site answers with ``Declined(model_unavailable)``. Bytes that
do not hash to the signed value: ``ModelMismatch``, and the task is dead-lettered unrun.

The cache is bounded by bytes (``max_bytes``); the least recently used chunks go first.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from pathlib import Path

from protocol.codec import decode_tensors
from protocol.durable import write_atomic
from protocol.errors import ProtocolError
from protocol.limits import DEFAULT_LIMITS, Limits
from protocol.messages import EvalTask, PersonalizeTask, Tensors, TrainTask

__all__ = ["ModelCache", "ModelUnavailable", "ModelMismatch", "ChunkRefused", "MAX_CACHE_BYTES"]

MAX_CACHE_BYTES = 2 * 2**30  # a few versions of a 100 M-parameter model
_HEX64 = re.compile(r"[0-9a-f]{64}")


class ModelUnavailable(Exception):
    """A chunk of the task's model is not in the cache: the version is gone for this site."""


class ModelMismatch(Exception):
    """The assembled bytes do not hash to what the signed task names: never used."""


class ChunkRefused(Exception):
    """A model chunk whose bytes do not match its claimed hash (or that is too large)."""


class ModelCache:
    def __init__(self, state_dir: Path, *, max_bytes: int = MAX_CACHE_BYTES, limits: Limits = DEFAULT_LIMITS) -> None:
        self.dir = Path(state_dir) / "models"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.limits = limits
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ chunks in
    def put(self, claimed: str | bytes, data: bytes | memoryview) -> str:
        """Store one chunk under its computed sha256 if it matches ``claimed``; its hash."""
        claim = claimed.decode("ascii", "replace") if isinstance(claimed, bytes) else str(claimed)
        if not _HEX64.fullmatch(claim):
            raise ChunkRefused(f"model chunk header {claim[:80]!r} is not a sha256 (64 lowercase hex digits)")
        if len(data) > self.max_bytes or len(data) > self.limits.max_frame_bytes:
            raise ChunkRefused(f"model chunk of {len(data)} bytes is over the cache's bound "
                               f"({min(self.max_bytes, self.limits.max_frame_bytes)} bytes)")
        digest = hashlib.sha256(data).hexdigest()
        if digest != claim:
            raise ChunkRefused(f"model chunk hashes to {digest}, not the claimed {claim}: tampered or corrupted")
        path = self.dir / digest
        with self._lock:
            if path.exists():
                os.utime(path)
                return digest
            write_atomic(path, data)
            self._evict(keep=path)
        return digest

    def _evict(self, *, keep: Path) -> None:
        files = [(p.stat().st_mtime, p.stat().st_size, p) for p in self.dir.iterdir()
                 if _HEX64.fullmatch(p.name)]
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= self.max_bytes:
                break
            if p != keep:
                p.unlink(missing_ok=True)
                total -= size

    def has(self, digest: str) -> bool:
        return bool(_HEX64.fullmatch(digest)) and (self.dir / digest).exists()

    # ------------------------------------------------------------------ models out
    def resolve(self, task: TrainTask | EvalTask | PersonalizeTask) -> Tensors:
        """The task's model, verified against its signed sha256 before anything decodes it."""
        want, size, chunks = task.model_sha256 or "", task.model_size, task.model_chunks
        short = want[:12]
        if size > self.limits.max_frame_bytes:
            raise ModelMismatch(f"model {short} declares {size} bytes, over Limits.max_frame_bytes="
                                f"{self.limits.max_frame_bytes}")
        buf = bytearray(size)
        view = memoryview(buf)
        pos = 0
        whole = _WholeHash()  # the blob's sha256, fed chunk by chunk in a thread beside the chunk checks
        with self._lock, whole:
            for i, digest in enumerate(chunks):
                path = self.dir / digest  # digest matched [0-9a-f]{64} in protocol/bounds.py
                try:
                    with open(path, "rb") as f:
                        n_here = os.fstat(f.fileno()).st_size
                        if pos + n_here > size:
                            raise ModelMismatch(f"model {short}: chunk {i} brings the blob past its {size} bytes")
                        got = f.readinto(view[pos:pos + n_here])
                    os.utime(path)
                except FileNotFoundError:
                    raise ModelUnavailable(
                        f"model {short} chunk {i} of {len(chunks)} ({digest[:12]}) is not in this site's cache "
                        "(evicted, refused as tampered, or never delivered); the coordinator re-sends it with "
                        "the next task") from None
                whole.feed(view[pos:pos + got])
                if hashlib.sha256(view[pos:pos + got]).hexdigest() != digest:
                    raise ModelMismatch(f"model {short}: cached chunk {i} no longer hashes to {digest[:12]}")
                pos += got
        if pos != size:
            raise ModelMismatch(f"model {short}: chunks hold {pos} bytes, the task says {size}")
        got_sha = whole.hexdigest()
        if got_sha != want:
            raise ModelMismatch(f"model hashes to {got_sha[:12]}, the signed task names {short}: refused unused")
        try:
            return decode_tensors(buf, limits=self.limits)
        except ProtocolError as e:
            raise ModelMismatch(f"model {short}: {e}") from None


class _WholeHash:
    """sha256 of the pieces ``feed`` gives, in order, computed in a thread of its own (hashlib releases
    the GIL): resolving a 400 MB model costs about one hash pass of wall time, not two. Used as a
    context manager: leaving it stops the thread; ``hexdigest`` after that is the pieces' hash."""

    def __init__(self) -> None:
        import queue
        import threading

        self._h = hashlib.sha256()
        self._q: queue.Queue[memoryview | None] = queue.Queue(maxsize=4)
        self._t = threading.Thread(target=self._run, name="fedbus-model-sha256", daemon=True)

    def _run(self) -> None:
        while (piece := self._q.get()) is not None:
            self._h.update(piece)

    def __enter__(self) -> _WholeHash:
        self._t.start()
        return self

    def feed(self, piece: memoryview) -> None:
        self._q.put(piece)

    def __exit__(self, *exc: object) -> None:
        self._q.put(None)
        self._t.join()

    def hexdigest(self) -> str:
        return self._h.hexdigest()
