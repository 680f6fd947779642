"""Accepted update bodies written to disk beside the run loop, durable before their commit (issue 23).

Storing a 400 MB update's body (write, fsync, rename, fsync of the folder) took the run loop about
1.2 s per update at 100 M parameters, and when a round's updates arrive together the loop does it
once per update before it can open the next. A body that came as a spilled transfer
(``protocol.chunking.spill_origin``: its bytes are in the transfer's temporary file) is copied from
that file by the kernel (``os.copy_file_range``) in one writer thread, while the loop verifies and
folds the next update: the copy reads the file, not the loop's map of it, so it holds no memory of
this process. A body that did not (a small frame, the in-memory bus) is written at once, as before.

The guarantee does not change: ``wait`` returns only once every body stored so far is durable under
its final name (temporary file, fsync, rename, fsync of the folder, as ``protocol.durable``), and
the round loop calls it before the commit that records those bodies (``RunContext.commit_round``,
the final evaluation's record). A write that failed raises there, so the commit does not happen and
the held deliveries are redelivered on ``--resume``: nothing is recorded whose body is not on disk.
"""

from __future__ import annotations

import os
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from protocol import durable
from protocol.chunking import spill_origin

__all__ = ["BodyStore"]


class BodyStore:
    """Stores bodies under their paths; ``wait`` makes every one stored so far durable."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []
        self._lock = threading.Lock()
        self.copied = 0  # bodies copied from their spill file by the writer thread (tests, monitoring)

    def store(self, path: Path, body: bytes | memoryview) -> None:
        """Write ``body`` to ``path`` durably: now, or (a spilled body) in the writer thread."""
        origin = spill_origin(body) if isinstance(body, memoryview) else None
        if origin is None:
            durable.write_atomic(path, body)
            return
        file, offset = origin
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedbus-bodies")
            # ``file`` (not the map) keeps the spill file open until the copy is done.
            self._pending.append(self._pool.submit(_copy_atomic, path, file, offset, len(body)))
            self.copied += 1

    def wait(self) -> None:
        """Block until every body stored so far is durable; raise the first write error."""
        with self._lock:
            pending, self._pending = self._pending, []
        errors = [e for e in (f.exception() for f in pending) if e is not None]
        if errors:
            raise errors[0]

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


def _copy_atomic(path: Path, file: object, offset: int, size: int) -> None:
    """``protocol.durable.write_atomic`` of ``size`` bytes of ``file`` from ``offset``, copied in the kernel."""
    src = file.fileno()  # type: ignore[attr-defined]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        at, done = offset, 0
        while done < size:
            n = _copy_range(src, fd, size - done, at)
            if n <= 0:
                raise OSError(f"copying an update body to {path}: its spill file ended after {done} of {size} bytes")
            at += n
            done += n
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    durable.fsync_dir(path.parent)


def _copy_range(src: int, dst: int, count: int, offset: int) -> int:
    """Up to ``count`` bytes of ``src`` from ``offset`` appended to ``dst``: ``copy_file_range`` where the
    kernel has it across these files, else a read and a write of at most 8 MiB."""
    try:
        return os.copy_file_range(src, dst, count, offset)
    except OSError:  # e.g. EXDEV on older kernels across file systems, or not supported
        data = os.pread(src, min(count, 8 << 20), offset)
        return os.write(dst, data) if data else 0
