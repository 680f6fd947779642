"""How many times this site started each task, on disk: a task that crashes the site is retried
a bounded number of times, with backoff, and then declined (issue 20, class 8).

Delivery is at least once: a task whose handling kills the process (out of memory, a native
crash) comes back redelivered after the restart, and without a bound it would loop forever,
re-reserving privacy budget on every attempt. The daemon records an attempt durably before
it handles a task and forgets it once the reply is acked. A task started ``MAX_ATTEMPTS``
times without finishing is declined (``Declined(error)``) and its reservation released: an
attempt that never committed its reservation published nothing (the ledger commits before
the reply exists), so nothing it reserved had left the site.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from protocol.durable import write_atomic

MAX_ATTEMPTS = 3  # starts of one task before the site declines it
BACKOFF_S = 2.0  # wait before the 2nd start; doubles per start after
MAX_BACKOFF_S = 60.0
_MAX_TASKS = 1024  # unfinished tasks remembered (the oldest forgotten first)


def backoff_s(attempt: int) -> float:
    """Wait before start number ``attempt`` (1 = first start, no wait)."""
    if attempt <= 1:
        return 0.0
    return min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (attempt - 2))


class TaskAttempts:
    """``state_dir/task_attempts.json``: task id -> starts without a finished reply."""

    def __init__(self, state_dir: Path, *, max_attempts: int = MAX_ATTEMPTS) -> None:
        self.path = Path(state_dir) / "task_attempts.json"
        self.max_attempts = max_attempts
        self._lock = threading.Lock()

    def _read(self) -> dict[str, dict[str, float]]:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}  # unreadable: start counting again (at worst a few more retries)
        return {str(k): dict(v) for k, v in doc.items() if isinstance(v, dict)}

    def _write(self, doc: dict[str, dict[str, float]]) -> None:
        while len(doc) > _MAX_TASKS:
            doc.pop(min(doc, key=lambda k: doc[k].get("at", 0.0)))
        write_atomic(self.path, json.dumps(doc, sort_keys=True).encode("utf-8"))

    def begin(self, task_id: str) -> int:
        """Record one more start of ``task_id`` (durable before the task runs); its number."""
        with self._lock:
            doc = self._read()
            n = int(doc.get(task_id, {}).get("attempts", 0)) + 1
            doc[task_id] = {"attempts": n, "at": time.time()}
            self._write(doc)
            return n

    def started(self, task_id: str) -> int:
        """Starts of ``task_id`` so far (0 when none is recorded)."""
        with self._lock:
            return int(self._read().get(task_id, {}).get("attempts", 0))

    def done(self, task_id: str) -> None:
        """The task's reply went out (or it was settled otherwise): forget it."""
        with self._lock:
            doc = self._read()
            if doc.pop(task_id, None) is not None:
                self._write(doc)


__all__ = ["MAX_ATTEMPTS", "TaskAttempts", "backoff_s"]
