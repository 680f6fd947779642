"""Tell the coordinator, signed, that its tasks are not signed by the key this site trusts.

A coordinator started with the wrong key (or a site holding an old ``coordinator.pub``)
otherwise sees only silence. The site reads the rejected task's envelope *unverified*,
only to address the notice (federation, run, round, task id). Notices are rate-limited
by what a forger cannot vary for free: at most one per unknown signer (key id) per
``per_signer_s``, and at most ``burst`` in any ``window_s`` over all signers (a forger
can invent key ids). A flood of forged tasks, whatever run ids or key ids they claim,
cannot make the site sign a flood of notices (issue 20, class 8); each notice carries
nothing but key ids.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from typing import Callable

from protocol.codec import decode_envelope, decode_frame, new_envelope
from protocol.messages import Declined, Envelope, EvalTask, PersonalizeTask, TrainTask

_MAX_SIGNERS = 256  # key ids remembered (the oldest is forgotten first)
PER_SIGNER_S = 3600.0  # one notice per unknown key id per hour
BURST = 5  # notices over all key ids ...
WINDOW_S = 60.0  # ... per minute


class UntrustedNotices:
    """Decides which rejected tasks earn a notice (rate-limited per signer and overall) and builds it."""

    def __init__(self, *, site_id: str, federation: str, trusted_kid: str, per_signer_s: float = PER_SIGNER_S,
                 burst: int = BURST, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.site_id = site_id
        self.federation = federation
        self.trusted_kid = trusted_kid
        self.per_signer_s = per_signer_s
        self.burst = burst
        self.window_s = window_s
        self._clock = clock
        self._sent: OrderedDict[str, float] = OrderedDict()  # key id -> when it was last told
        self._recent: deque[float] = deque()  # when the last notices (any signer) went out
        self._lock = threading.Lock()

    def _allow(self, kid: str) -> bool:
        now = self._clock()
        last = self._sent.get(kid)
        if last is not None and now - last < self.per_signer_s:
            return False
        while self._recent and now - self._recent[0] >= self.window_s:
            self._recent.popleft()
        if len(self._recent) >= self.burst:
            return False
        self._recent.append(now)
        self._sent[kid] = now
        self._sent.move_to_end(kid)
        while len(self._sent) > _MAX_SIGNERS:
            self._sent.popitem(last=False)
        return True

    def notice(self, frame: bytes | memoryview, *, sent_at: float) -> Envelope | None:
        """The Declined envelope to sign and publish, or None (undecodable, not ours, already told)."""
        try:
            _, kid, body, _ = decode_frame(frame)
            claimed = decode_envelope(body)
        except Exception:  # noqa: BLE001 - garbage gets dead-lettered, never answered
            return None
        if (claimed.federation != self.federation or claimed.recipient != self.site_id
                or not isinstance(claimed.payload, (TrainTask, EvalTask, PersonalizeTask))):
            return None
        with self._lock:
            if not self._allow(str(kid)[:64]):
                return None
        detail = (f"unknown signer: the task is signed by key id {str(kid)[:64]}, this site runs only tasks signed "
                  f"by key id {self.trusted_kid} (its coordinator.pub); run the coordinator with that key, or give "
                  "this site the coordinator's public key")
        return new_envelope(Declined(task_id=claimed.message_id, reason="untrusted_task", detail=detail),
                            federation=claimed.federation, run_id=claimed.run_id, round=claimed.round,
                            sender=self.site_id, recipient="coordinator", sent_at=sent_at)
