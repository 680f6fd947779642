"""Site liveness from signed heartbeats (issue 24: "offline" within 30 s of a kill).

Each site daemon publishes a signed ``Heartbeat`` on the control exchange every ``every_s``
seconds (1-10, ``protocol/bounds.py``). A coordinator consuming the control queue (every
``coordinator run``) verifies it like a hello (enrolled key, signer = ``site_id``) and keeps
the newest beat per site: ``seen_at = min(received, sent_at)``, so neither a site whose clock
runs ahead nor a beat that waited in the queue makes a site look alive later than it was. A
beat older than ``STALE_S`` (a backlog queued while no coordinator listened) is dropped. A
replayed beat carries its old ``sent_at`` and changes nothing, so no replay guard is needed.

``status`` is what the sites page shows: "online" while the newest beat is within
``MISSED`` intervals (≤ 30 s at the 10 s maximum), "offline" after that, and, when nobody is
listening for beats, "not monitored" rather than a guess. Someone listens while a run in this
state is running (its control queue), or while a monitor (``coordinator serve --broker``:
coordinator/liveness_monitor.py, on the federation's liveness queue, between runs too) ticks in
the state's ``monitors`` table: a monitor is believed for ``MISSED`` of its ticks, so a crashed
one stops claiming within ``offline_after_s`` of its last tick.
"""

from __future__ import annotations

from typing import Any, Mapping

from protocol.messages import Heartbeat

MISSED = 3  # beats missed before a site is offline: 3 x at most 10 s = 30 s
MAX_OFFLINE_AFTER_S = 30.0
STALE_S = 300.0  # the replay guard's clock skew: a beat older than this is a backlog, not news


def offline_after_s(every_s: float) -> float:
    """Seconds without a beat after which a site that beats every ``every_s`` is offline."""
    return min(MISSED * float(every_s), MAX_OFFLINE_AFTER_S)


def seen_at(beat_sent_at: float, received_at: float) -> float | None:
    """When the beat shows the site alive, or None for a stale one."""
    if received_at - beat_sent_at > STALE_S:
        return None
    return min(received_at, beat_sent_at)


def record(store: Any, signer: str, beat: Heartbeat, *, sent_at: float, received_at: float) -> bool:
    """Keep ``beat`` (already verified as signed by ``signer``) in the store; False if it is stale."""
    at = seen_at(sent_at, received_at)
    if at is None:
        return False
    store.record_heartbeat(signer, seen_at=at, every_s=float(beat.every_s), seq=int(beat.seq))
    return True


def fresh(tick: Mapping[str, Any], *, now: float) -> bool:
    """A newest beat or monitor tick (``seen_at``, ``every_s``) still counts: at most ``MISSED`` intervals old.
    One rule for a site's liveness and a monitor's."""
    return now - float(tick["seen_at"]) <= offline_after_s(float(tick["every_s"]))


def status(beat: Mapping[str, Any] | None, *, now: float, monitored: bool) -> str:
    """"online" | "offline" | "not monitored" for one site's newest beat."""
    if beat is not None and fresh(beat, now=now):
        return "online"
    return "offline" if monitored else "not monitored"
