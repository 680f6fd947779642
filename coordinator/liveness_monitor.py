"""Site liveness between runs: watch the federation's liveness queue and record the beats.

A running coordinator records heartbeats from its control queue (coordinator/control.py);
between runs nobody did, so the sites page could only say "not monitored". This monitor
(started by ``fedbus coordinator serve --broker``) consumes ``fedbus.liveness.<federation>``,
a second queue bound like the control queue, so it gets a *copy* of every control message and
never takes a hello from a coordinator run. Each beat is verified and kept exactly as a run
does (``control.open_control`` / ``control.record_beat``: enrolled key, signer = ``site_id``,
stale beats dropped). A verified ``SiteHello`` is acked and nothing more: the coordinator's own
copy records it (or refuses it), and dead-lettering honest hellos would bury real refusals in
``fedbus.dead``. Anything that does not verify, or is neither, is dead-lettered with a reason
(a forged frame's type cannot be trusted before its signature is).

While its consumer is subscribed (``Consumer.live``) the monitor ticks in the state's
``monitors`` table every ``tick_s``; the dashboard believes a tick for ``liveness.MISSED`` of
them, so a killed monitor stops claiming within ``offline_after_s(tick_s)`` and a clean stop
removes its row at once. The handler runs on the bus's worker thread (never pika's I/O thread)
and only verifies and writes one row.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from typing import Any

import structlog

from coordinator.control import EnrolledKeys, open_control, record_beat
from coordinator.state import StateStore
from coordinator.validation import Rejected
from protocol.errors import ProtocolError
from protocol.messages import SiteHello
from protocol.transport.base import Bus, BusError, BusPermissionError, Consumer, Delivery, Topology
from protocol.transport.topology import liveness_queue

TICK_S = 2.0  # believed for 3 ticks: "not monitored" at most 6 s after the monitor dies
RETRY_MAX_S = 30.0  # the broker not reachable yet: try again, backing off to this

log = structlog.get_logger(__name__)


class LivenessMonitor:
    """One federation's liveness queue, recorded into one state directory."""

    def __init__(self, bus: Bus, store: StateStore, federation: str, *, tick_s: float = TICK_S,
                 name: str | None = None) -> None:
        self.bus, self.store, self.federation = bus, store, federation
        self.tick_s = float(tick_s)
        self.name = name or f"dashboard:{federation}"
        self.queue = liveness_queue(federation)
        self.keys = EnrolledKeys(store)
        self.consumer: Consumer | None = None
        self.beats = 0  # recorded (tests, logs)
        self.error: BusError | None = None  # why it gave up for good (a refusal)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"fedbus-liveness:{federation}", daemon=True)

    # -- the queue ------------------------------------------------------------------------
    def on_delivery(self, delivery: Delivery) -> None:
        """Record a verified beat, ack a verified hello, dead-letter the rest (with a reason)."""
        try:
            opened = open_control(delivery.body, self.keys)
            if record_beat(self.store, opened, received_at=time.time()):
                self.beats += 1
                delivery.ack()
                return
            said = opened.envelope.payload
            if not isinstance(said, SiteHello):
                raise Rejected("bad_heartbeat", f"control message from {opened.signer} is neither its own "
                                                "Heartbeat nor a SiteHello")
        except (ProtocolError, Rejected) as e:
            delivery.nack(e.header())
            log.warning("control message refused by the liveness monitor", queue=self.queue, reason=e.header())
            return
        delivery.ack()  # a hello: the coordinator's copy on the control queue is the one that counts

    def subscribe(self) -> None:
        """Declare the federation's queues (idempotent) and consume the liveness queue; raises ``BusError``."""
        try:
            self.bus.declare(Topology(federations=[self.federation]))
        except BusPermissionError as e:  # a user that may consume but not declare: provisioned beforehand
            log.warning("liveness monitor could not declare its queue; consuming it as provisioned",
                        queue=self.queue, error=str(e))
        self.consumer = self.bus.consume(self.queue, self.on_delivery, prefetch=16)

    # -- the tick ---------------------------------------------------------------------------
    def tick(self, now: float | None = None) -> bool:
        """Say in the state that we listen, if our consumer is subscribed; re-read the keys
        (a site revoked since is refused from the next beat on)."""
        if self.consumer is None or not self.consumer.live:
            return False
        try:
            self.keys.refresh_trust()
            self.store.record_monitor(self.name, seen_at=time.time() if now is None else now, every_s=self.tick_s)
        except sqlite3.Error as e:
            log.warning("liveness monitor could not write its tick", error=str(e))
            return False
        return True

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set() and self.consumer is None:
            try:
                self.subscribe()
            except BusPermissionError as e:
                self.error = e
                log.error("liveness monitor refused by the broker; the sites page says 'not monitored'",
                          queue=self.queue, error=str(e))
                return
            except BusError as e:
                delay = min(RETRY_MAX_S, 2.0 ** attempt)
                attempt += 1
                log.warning("liveness monitor cannot reach the broker yet", error=str(e), retry_in_s=delay)
                self._stop.wait(delay)
        log.info("liveness monitor watching", queue=self.queue, state=str(self.store.dir))
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(self.tick_s)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "LivenessMonitor":
        """Subscribe and tick on a thread of its own (retrying an unreachable broker); returns at once."""
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop ticking, unsubscribe, and take our row out of the state: "not monitored" now."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self.consumer is not None:
            self.consumer.cancel()
        try:
            self.store.drop_monitor(self.name)
        except sqlite3.Error as e:
            log.warning("liveness monitor could not remove its tick (it goes stale by itself)", error=str(e))

    def __enter__(self) -> "LivenessMonitor":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
