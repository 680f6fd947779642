"""The control queue of a run: each site's signed ``SiteHello`` and its heartbeats.

A hello records what the site announced (coordinator/registry.py); a heartbeat records that it
is alive (coordinator/liveness.py). Either must be signed by the site it names, with an
enrolled key; anything else is dead-lettered with a reason. Runs on the bus's worker thread:
it only verifies and writes one row, never waits. ``open_control`` and ``record_beat`` are
also what the liveness monitor between runs uses (coordinator/liveness_monitor.py), so a beat
is believed by the same rule whoever listens.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from structlog.typing import FilteringBoundLogger

from coordinator import liveness
from coordinator.inbox import Inbox
from coordinator.registry import SiteRegistry
from coordinator.state import StateStore
from coordinator.validation import Rejected
from protocol.codec import Opened, open_frame
from protocol.errors import ProtocolError, UnknownSigner
from protocol.messages import Heartbeat, SiteHello
from protocol.transport.base import Delivery


class Keys(Protocol):
    """The enrolled keys a control frame is verified against (``Inbox``, ``EnrolledKeys``)."""

    trust: Any

    def refresh_trust(self) -> None: ...


class EnrolledKeys:
    """The state's enrolled site keys, read again when a frame names a key not known yet."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.trust: Any = store.trust_store()

    def refresh_trust(self) -> None:
        self.trust = self.store.trust_store()


def open_control(body: bytes | memoryview, keys: Keys) -> Opened:
    """Verify a control frame against the enrolled keys; raises ``ProtocolError``."""
    try:
        return open_frame(body, keys.trust)
    except UnknownSigner:  # enrolled after we started: refresh once from the store
        keys.refresh_trust()
        return open_frame(body, keys.trust)


def record_beat(store: StateStore, opened: Opened, *, received_at: float) -> bool:
    """True when ``opened`` is a ``Heartbeat`` of the site that signed it: kept in the store
    (unless stale: coordinator/liveness.py). False for anything else, recorded nowhere."""
    beat = opened.envelope.payload
    if not isinstance(beat, Heartbeat) or beat.site_id != opened.signer:
        return False
    liveness.record(store, opened.signer, beat, sent_at=opened.envelope.sent_at, received_at=received_at)
    return True


def on_control(delivery: Delivery, *, inbox: Inbox, store: StateStore, registry: SiteRegistry,
               log: FilteringBoundLogger) -> None:
    """Record a verified hello or heartbeat and ack it; dead-letter anything else."""
    try:
        opened = open_control(delivery.body, inbox)
        if record_beat(store, opened, received_at=time.time()):
            delivery.ack()
            return
        hello = opened.envelope.payload
        if not isinstance(hello, SiteHello) or hello.site_id != opened.signer:
            raise Rejected("bad_hello", f"control message from {opened.signer} is not its own SiteHello")
    except (ProtocolError, Rejected) as e:
        delivery.nack(e.header())
        log.warning("hello rejected", reason=e.header())
        return
    registry.record_hello(opened.signer, hello)
    delivery.ack()
