"""The dashboard's action log: one JSON line per action asked for, naming the user who asked.

``STATE/dashboard-actions.jsonl`` records each start, stop, save, approval and registry
entry, accepted or refused (with the HTTP status), with the user's name and role, so that
"who did this" never depends on a name typed into a form. Lines are appended with
``O_APPEND`` (one ``write`` each), so concurrent requests never interleave inside a line.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

FILE = "dashboard-actions.jsonl"
_lock = threading.Lock()


def record(state_dir: Path, *, user: str, role: str, action: str, target: str | None, status: int,
           detail: str | None = None) -> None:
    line = {"at": time.time(), "at_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "user": user,
            "role": role, "action": action, "target": target, "status": status,
            "outcome": "done" if status < 400 else "refused", **({"detail": detail[:500]} if detail else {})}
    data = (json.dumps(line, sort_keys=True) + "\n").encode("utf-8")
    with _lock:
        fd = os.open(Path(state_dir) / FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


def read(state_dir: Path, limit: int = 500) -> list[dict[str, Any]]:
    """The latest ``limit`` lines, oldest first (a torn or foreign line is skipped)."""
    path = Path(state_dir) / FILE
    if not path.exists():
        return []
    out = []
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines()[-limit:]:
        try:
            doc = json.loads(raw)
        except ValueError:
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out
