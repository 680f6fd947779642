"""Crash-safe file replacement: a crash leaves the old file or the new one, never half.

One implementation for every durable file fedbus writes (keys, replay log, privacy
ledger, checkpoints, stored update bodies).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | memoryview, *, mode: int | None = None, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` via a temporary file in the same folder.

    ``mode`` is set on the temporary file before the first byte is written, so a key is
    never readable by others, not even briefly. ``fsync=False`` skips the flushes for
    files whose loss on power failure is harmless.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)
