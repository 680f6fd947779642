"""How far an AMQP consumer's worker may fall behind its I/O thread, and how a transfer refused
for reassembly capacity waits (issue 23: the coordinator's memory).

* **Credit.** The broker may send at most ``BACKLOG_CHUNKS`` chunk sizes of messages past those the
  worker has spilled or handed on (``lookahead``); the rest waits in the broker, not in this process.
* **Capacity.** A transfer the reassembler has no room for is refused once: its chunks already in
  the window are set aside with their tags only (``Deferred``, no bytes) and requeued together
  once the reassembler has room for it and a backoff that doubles per refusal of the same transfer
  has passed (``capacity_backoff_s``). The worker never sleeps on it: the admitted transfers'
  chunks behind it keep being spilled. Requeued chunks go back to the head of the queue, so one
  requeued before there is room would be sent again ahead of the admitted transfer's chunks, again
  and again: at 100 M parameters x 3 sites that starved the admitted transfer until it timed out.
  Likewise two waiting transfers that each fit alone are not requeued together when they do not fit
  together: the one that lost would be refused again, and every chunk of it received a third time
  (at 100 M x 10 sites the budget holds two updates, and eight waited). A requeued transfer counts
  as admitted (``Returning``) until its first chunk is back, or for ``RETURN_WAIT_S`` at most (its
  chunks may have gone to another consumer of the queue).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

BACKLOG_CHUNKS = 3  # chunk sizes of received bytes the worker may be behind (the credit's lookahead)
CAPACITY_BACKOFF_S = 0.25  # first wait before a transfer refused for capacity is requeued
CAPACITY_BACKOFF_MAX_S = 4.0  # ... doubling per refusal of the same transfer, up to this
MAX_REFUSALS_KEPT = 4096  # transfers whose refusals are counted (beyond: forgotten, backoff starts again)
RETURN_WAIT_S = 10.0  # a requeued transfer keeps its room this long for its chunks to come back

__all__ = ["BACKLOG_CHUNKS", "Deferred", "Returning", "capacity_backoff_s", "due_to_requeue", "lookahead", "until_due"]


@dataclass
class Deferred:
    """A transfer refused for capacity: its chunks' ``Raw`` (bytes dropped), requeued at ``due``."""

    due: float
    total: int  # the transfer's declared bytes and chunks: it is requeued only once they fit
    count: int
    raws: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class Returning:
    """A transfer requeued once there was room: that room is its until ``until`` or its first chunk is back."""

    user: str
    total: int
    count: int
    until: float


def lookahead(*, chunk_size: int, prefetch: int, message_size: float) -> int:
    """Messages the broker may send past what the worker finished with: ``BACKLOG_CHUNKS`` chunk
    sizes of messages of ``message_size`` bytes (at least ``BACKLOG_CHUNKS``, at most ``prefetch``)."""
    budget = BACKLOG_CHUNKS * chunk_size
    return max(BACKLOG_CHUNKS, min(prefetch, int(budget // max(1.0, message_size))))


def capacity_backoff_s(refusals: int) -> float:
    """The wait before the ``refusals``-th refusal of one transfer is requeued."""
    return min(CAPACITY_BACKOFF_MAX_S, CAPACITY_BACKOFF_S * 2 ** (refusals - 1))


def until_due(deferred: dict[Any, Deferred]) -> float:
    """How long the worker may wait for a delivery before a deferred requeue falls due (at least
    50 ms: one that is due but has no room yet is looked at again, not spun on)."""
    if not deferred:
        return 1.0
    return max(0.05, min(1.0, min(d.due for d in deferred.values()) - time.monotonic()))


class _Room(Protocol):
    def has_room(self, total: int, count: int, *, user: str | None = None,
                 ahead: Any = ()) -> bool: ...


def due_to_requeue(deferred: dict[Any, Deferred], returning: dict[Any, Returning], reasm: _Room,
                   now: float | None = None) -> list[tuple[Any, Deferred]]:
    """Take out of ``deferred`` (and return) the transfers to requeue now: those whose wait is over and
    that would be admitted, in the order they were refused, counting those requeued and not yet back
    (``returning``, which gains them; entries past their ``until`` are forgotten) as admitted."""
    now = time.monotonic() if now is None else now
    for key in [k for k, r in returning.items() if r.until <= now]:
        del returning[key]
    ahead = [(r.user, r.total, r.count) for r in returning.values()]
    out: list[tuple[Any, Deferred]] = []
    for key, d in list(deferred.items()):
        if d.due > now or not reasm.has_room(d.total, d.count, user=key[0], ahead=ahead):
            continue
        ahead.append((key[0], d.total, d.count))
        returning[key] = Returning(key[0], d.total, d.count, now + RETURN_WAIT_S)
        out.append((key, deferred.pop(key)))
    return out
