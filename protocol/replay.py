"""Replay and mix-up protection for opened frames.

``check`` refuses a frame whose ``message_id`` was handled before, that is meant
for another recipient, run or round, or whose ``sent_at`` lies outside the allowed
clock skew; ``mark_seen`` records a message once its effect is durable, so a
message whose handling failed can still be redelivered and retried.

Memory is bounded: an id is needed only while a copy of its message could still
pass the skew check, i.e. for ``2 * max_skew_s`` after it was marked (``sent_at``
may lie up to ``max_skew_s`` ahead of our clock, and is refused ``max_skew_s``
after it). Older ids are forgotten; past ``capacity`` the oldest go first, with a
warning when those were still inside the window. With ``path`` the ids survive
restarts: one ``message_id<TAB>marked_at`` line each, appended, compacted when
mostly stale.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import structlog

from protocol.durable import write_atomic
from protocol.errors import ClockSkew, ReplayedMessage, WrongRecipient, WrongRound, WrongRun
from protocol.messages import Envelope

log = structlog.get_logger(__name__)


class ReplayGuard:
    """Seen message ids plus the expectations a receiver checks against. Thread-safe."""

    def __init__(
        self,
        *,
        max_skew_s: float = 300.0,
        capacity: int = 1_000_000,
        path: Path | None = None,
        clock: Callable[[], float] = time.time,
        fsync: bool = True,
    ) -> None:
        if not max_skew_s > 0 or not math.isfinite(max_skew_s):
            raise ValueError(f"max_skew_s must be a positive number of seconds, got {max_skew_s!r}")
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity!r}")
        self.max_skew_s = float(max_skew_s)
        self.capacity = int(capacity)
        self._clock = clock
        self._fsync = fsync
        self._seen: OrderedDict[str, float] = OrderedDict()  # id -> marked_at, oldest first
        self._lock = threading.Lock()
        self._path = Path(path) if path is not None else None
        self._file = None
        self._file_lines = 0
        self._warned_eviction = False
        if self._path is not None:
            self._load()
            self._compact()

    @property
    def window_s(self) -> float:
        """How long an id must be remembered to make replays impossible."""
        return 2 * self.max_skew_s

    # -- checks ------------------------------------------------------------------

    def check(
        self,
        env: Envelope,
        *,
        recipient: str | None = None,
        run_id: str | None = None,
        round: int | None = None,
    ) -> None:
        """Raise a ``ReplayError`` subclass if ``env`` must not be handled; records nothing."""
        if self.seen(env.message_id):
            raise ReplayedMessage(
                f"message {env.message_id} from {env.sender} was already handled (replay or redelivery)"
            )
        if recipient is not None and env.recipient != recipient:
            raise WrongRecipient(f"message {env.message_id} is addressed to {env.recipient!r}, not {recipient!r}")
        if run_id is not None and env.run_id != run_id:
            raise WrongRun(f"message {env.message_id} belongs to run {env.run_id!r}, expected {run_id!r}")
        if round is not None and env.round != round:
            raise WrongRound(f"message {env.message_id} is for round {env.round}, expected round {round}")
        now = self._clock()
        offset = env.sent_at - now
        if not math.isfinite(offset) or abs(offset) > self.max_skew_s:
            direction = "ahead of" if offset > 0 else "behind"
            raise ClockSkew(
                f"message {env.message_id} from {env.sender}: sent_at is {abs(offset):.1f} s {direction} "
                f"this clock, over the allowed {self.max_skew_s:g} s (stale or replayed message, "
                "or clocks apart: check NTP on both machines)"
            )

    def seen(self, message_id: str) -> bool:
        with self._lock:
            return message_id in self._seen

    def mark_seen(self, message_id: str) -> None:
        """Record ``message_id`` as handled (call once its effect is durable)."""
        if not isinstance(message_id, str) or not message_id or any(c.isspace() for c in message_id):
            raise ValueError(f"message_id must be a non-empty str without whitespace, got {message_id!r}")
        now = self._clock()
        with self._lock:
            if message_id in self._seen:
                return
            self._seen[message_id] = now
            self._forget(now)
            if self._path is not None:
                self._append(message_id, now)

    def __len__(self) -> int:
        return len(self._seen)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    # -- memory bound ------------------------------------------------------------

    def _forget(self, now: float) -> None:
        horizon = now - self.window_s
        seen = self._seen
        while seen:
            oldest_id, marked = next(iter(seen.items()))
            if marked < horizon:
                seen.popitem(last=False)
            elif len(seen) > self.capacity:
                seen.popitem(last=False)
                if not self._warned_eviction:
                    self._warned_eviction = True
                    log.warning(
                        "replay_guard_capacity",
                        capacity=self.capacity,
                        window_s=self.window_s,
                        detail="forgetting ids still inside the skew window; raise capacity "
                        "or lower max_skew_s to keep replay protection complete",
                    )
            else:
                break

    # -- persistence ---------------------------------------------------------------

    def _load(self) -> None:
        assert self._path is not None
        try:
            text = self._path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return
        now = self._clock()
        bad = 0
        for line in text.splitlines():
            parts = line.split("\t")
            try:
                message_id, marked = parts[0], float(parts[1])
            except (IndexError, ValueError):
                bad += 1
                continue
            if not message_id or not math.isfinite(marked):
                bad += 1
                continue
            self._seen.pop(message_id, None)
            self._seen[message_id] = marked
        # The file is in append order, which is marked order; resort in case clocks jumped.
        self._seen = OrderedDict(sorted(self._seen.items(), key=lambda kv: kv[1]))
        self._forget(now)
        if bad:
            log.warning("replay_file_damaged", path=str(self._path), skipped_lines=bad)

    def _append(self, message_id: str, marked: float) -> None:
        if self._file is None:
            self._file = open(self._path, "a", encoding="utf-8")  # noqa: SIM115 (kept open)
        self._file.write(f"{message_id}\t{marked!r}\n")
        self._file.flush()
        if self._fsync:
            os.fsync(self._file.fileno())
        self._file_lines += 1
        if self._file_lines > 2 * len(self._seen) + 1024:
            self._compact()

    def _compact(self) -> None:
        """Rewrite the file with only the ids still remembered (atomic replace)."""
        assert self._path is not None
        if self._file is not None:
            self._file.close()
            self._file = None
        self._path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(f"{mid}\t{marked!r}\n" for mid, marked in self._seen.items())
        write_atomic(self._path, text.encode("utf-8"), fsync=self._fsync)
        self._file_lines = len(self._seen)


__all__ = ["ReplayGuard"]
