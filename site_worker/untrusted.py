"""Tell the coordinator, signed, that its tasks are not signed by the key this site trusts.

A coordinator started with the wrong key (or a site holding an old ``coordinator.pub``)
otherwise sees only silence. The site reads the rejected task's envelope *unverified*,
only to address the notice (federation, run, round, task id), and sends at most one
``Declined(untrusted_task)`` per run: a flood of forged tasks cannot make it chatty, and
the notice carries nothing but key ids.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from protocol.codec import decode_envelope, decode_frame, new_envelope
from protocol.messages import Declined, Envelope, EvalTask, PersonalizeTask, TrainTask

_MAX_RUNS = 256


class UntrustedNotices:
    """Decides which rejected tasks earn a notice (one per run) and builds it."""

    def __init__(self, *, site_id: str, federation: str, trusted_kid: str) -> None:
        self.site_id = site_id
        self.federation = federation
        self.trusted_kid = trusted_kid
        self._sent: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

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
            if claimed.run_id in self._sent:
                return None
            self._sent[claimed.run_id] = None
            while len(self._sent) > _MAX_RUNS:
                self._sent.popitem(last=False)
        detail = (f"unknown signer: the task is signed by key id {str(kid)[:64]}, this site runs only tasks signed "
                  f"by key id {self.trusted_kid} (its coordinator.pub); run the coordinator with that key, or give "
                  "this site the coordinator's public key")
        return new_envelope(Declined(task_id=claimed.message_id, reason="untrusted_task", detail=detail),
                            federation=claimed.federation, run_id=claimed.run_id, round=claimed.round,
                            sender=self.site_id, recipient="coordinator", sent_at=sent_at)
