"""One coordinator per federation: an exclusive lock on ``STATE/locks/<federation>.lock``.

Two coordinators on one federation would both send tasks for the same rounds; sites
would train twice and spend ε twice. The lock is an ``flock`` (released by the kernel
when the holder dies, however it dies), and the file names the holder so the refusal
can say who it is.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO, Any


class FederationLocked(RuntimeError):
    """Another coordinator holds the federation; the message names it."""


class FederationLock:
    def __init__(self, state_dir: Path, federation: str) -> None:
        self.path = state_dir / "locks" / f"{federation}.lock"
        self.federation = federation
        self._fh: IO[str] | None = None

    def acquire(self, **about: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = _holder(fh.read())
            fh.close()
            raise FederationLocked(
                f"federation {self.federation!r} is already run by another coordinator ({holder}); "
                "stop it first (`fedbus coordinator runs stop RUN`) or wait for it to finish"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), **about}))
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh.truncate(0)
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "FederationLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(text: str) -> str:
    try:
        h = json.loads(text)
    except ValueError:
        return "holder unknown"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(h.get("since", 0)))
    extra = f", run {h['run']}" if h.get("run") else ""
    return f"pid {h.get('pid')} on {h.get('host')}, since {since}{extra}"
