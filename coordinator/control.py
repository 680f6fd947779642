"""The control queue of a run: each site's signed ``SiteHello`` and its heartbeats.

A hello records what the site announced (coordinator/registry.py); a heartbeat records that it
is alive (coordinator/liveness.py). Either must be signed by the site it names, with an
enrolled key; anything else is dead-lettered with a reason. Runs on the bus's worker thread:
it only verifies and writes one row, never waits.
"""

from __future__ import annotations

import time

from structlog.typing import FilteringBoundLogger

from coordinator import liveness
from coordinator.inbox import Inbox
from coordinator.registry import SiteRegistry
from coordinator.state import StateStore
from coordinator.validation import Rejected
from protocol.codec import open_frame
from protocol.errors import ProtocolError, UnknownSigner
from protocol.messages import Heartbeat, SiteHello
from protocol.transport.base import Delivery


def on_control(delivery: Delivery, *, inbox: Inbox, store: StateStore, registry: SiteRegistry,
               log: FilteringBoundLogger) -> None:
    """Record a verified hello or heartbeat and ack it; dead-letter anything else."""
    try:
        try:
            opened = open_frame(delivery.body, inbox.trust)
        except UnknownSigner:  # enrolled after the run started: refresh once from the store
            inbox.refresh_trust()
            opened = open_frame(delivery.body, inbox.trust)
        hello = opened.envelope.payload
        if isinstance(hello, Heartbeat) and hello.site_id == opened.signer:  # coordinator/liveness.py
            liveness.record(store, opened.signer, hello, sent_at=opened.envelope.sent_at, received_at=time.time())
            delivery.ack()
            return
        if not isinstance(hello, SiteHello) or hello.site_id != opened.signer:
            raise Rejected("bad_hello", f"control message from {opened.signer} is not its own SiteHello")
    except (ProtocolError, Rejected) as e:
        delivery.nack(e.header())
        log.warning("hello rejected", reason=e.header())
        return
    registry.record_hello(opened.signer, hello)
    delivery.ack()
