"""What ``declare(topology)`` creates, as data both buses (and provisioning) share.

Keeping the plan in one place means the in-memory bus and RabbitMQ declare exactly
the same exchanges, queues, arguments and bindings (docs/design.md "Bus topology").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol.transport.base import Topology
from protocol.transport.topology import (
    CONTROL,
    DEAD,
    DLX,
    LIVENESS_MAX_LENGTH,
    LIVENESS_TTL_MS,
    TASKS,
    UPDATES,
    control_queue,
    liveness_queue,
    site_queue,
    updates_queue,
)

EXCHANGES: dict[str, str] = {TASKS: "direct", UPDATES: "direct", CONTROL: "direct", DLX: "fanout"}

QUEUE_HEADER = "x-fedbus-queue"  # on a dead letter: the queue it was rejected from
USER_HEADER = "x-fedbus-user"  # on a dead letter (AMQP bus): the broker-vouched sender of the original

# Chunk headers of docs/design.md (transfer_id, index, count, sha256, total_size) as AMQP headers.
CHUNK_HEADERS = {
    "transfer_id": "x-fedbus-chunk-transfer",
    "index": "x-fedbus-chunk-index",
    "count": "x-fedbus-chunk-count",
    "sha256": "x-fedbus-chunk-sha256",
    "total_size": "x-fedbus-chunk-size",
}


@dataclass(frozen=True)
class QueuePlan:
    name: str
    exchange: str
    routing_key: str
    arguments: dict[str, Any]


def queue_arguments(*, quorum: bool, dead_letter: bool = True) -> dict[str, Any]:
    """Arguments every fedbus queue carries.

    Single active consumer keeps all chunks of a transfer on one consumer (competing
    consumers would split a transfer and neither could reassemble it); a standby
    consumer takes over, with redelivery, when the active one goes away.
    """
    args: dict[str, Any] = {"x-single-active-consumer": True}
    if dead_letter:
        args["x-dead-letter-exchange"] = DLX
    if quorum:
        args["x-queue-type"] = "quorum"
    return args


def liveness_arguments(*, quorum: bool) -> dict[str, Any]:
    """The liveness queue's: bounded by age and count, and *not* dead-lettering what the bounds
    drop (an unwatched queue would otherwise pour every expired beat into ``fedbus.dead``).
    A consumer's ``nack(reason)`` still dead-letters: it publishes to ``fedbus.dlx`` itself."""
    args = queue_arguments(quorum=quorum, dead_letter=False)
    args.update({"x-message-ttl": LIVENESS_TTL_MS, "x-max-length": LIVENESS_MAX_LENGTH, "x-overflow": "drop-head"})
    return args


def plan(topology: Topology) -> list[QueuePlan]:
    """The queues (with their one binding each) a topology declares, dead queue first."""
    quorum = bool(topology.quorum)
    out = [QueuePlan(DEAD, DLX, "", queue_arguments(quorum=quorum, dead_letter=False))]
    for site in topology.sites:
        out.append(QueuePlan(site_queue(site), TASKS, site, queue_arguments(quorum=quorum)))
    for fed in topology.federations:
        out.append(QueuePlan(updates_queue(fed), UPDATES, fed, queue_arguments(quorum=quorum)))
        out.append(QueuePlan(control_queue(fed), CONTROL, fed, queue_arguments(quorum=quorum)))
        out.append(QueuePlan(liveness_queue(fed), CONTROL, fed, liveness_arguments(quorum=quorum)))
    return out


def chunk_header_to_amqp(header: dict[str, Any]) -> dict[str, Any]:
    return {CHUNK_HEADERS[k]: header[k] for k in CHUNK_HEADERS}


def chunk_header_from_amqp(headers: dict[str, Any] | None) -> dict[str, Any] | None:
    """The chunk header carried in message headers, or None for a whole message."""
    if not headers or CHUNK_HEADERS["transfer_id"] not in headers:
        return None
    out = {}
    for k, h in CHUNK_HEADERS.items():
        v = headers.get(h)
        out[k] = v.decode() if isinstance(v, bytes) else v
    return out


def strip_chunk_headers(headers: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (headers or {}).items() if k not in _CHUNK_HEADER_NAMES}


_CHUNK_HEADER_NAMES = frozenset(CHUNK_HEADERS.values())


def orphan_chunk_headers(headers: dict[str, Any] | None, reason: str, queue: str) -> dict[str, Any]:
    """Headers for dead-lettering one chunk of a broken transfer on its own.

    The chunk headers are replaced by a descriptive ``x-fedbus-chunk`` string, so a
    consumer of ``fedbus.dead`` sees a plain (partial) message and never tries to
    reassemble it again (which would time out and dead-letter it in a loop).
    """
    ch = chunk_header_from_amqp(headers) or {}
    out = strip_chunk_headers(headers)
    out["x-fedbus-chunk"] = f"transfer {ch.get('transfer_id')} chunk {ch.get('index')} of {ch.get('count')}"
    out["x-fedbus-reason"] = reason
    out[QUEUE_HEADER] = queue
    return out
