"""What waits in ``fedbus.dead``: list, show, requeue and purge it, per federation.

Works through the plain :class:`~protocol.transport.base.Bus` interface, so the same
code runs on the in-memory bus and on RabbitMQ (and serves the CLI and the dashboard).

Peeking never loses a message: a browse consumes ``fedbus.dead`` *without acking*
until a marker it published itself comes back (so it knows it has seen everything that
was there when it started), then acks only what it was asked to drop or requeue and
cancels; the broker redelivers everything else, in order. A requeue publishes the frame
back to the exchange and routing key it came from (with confirm) *before* acking the
dead copy, so there is no window where it is in neither place.

``fedbus.dead`` is shared by every federation on the vhost: a letter belongs to
federation F when it was rejected from F's coordinator queues, or its envelope (read
without verifying, for display only) names F.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal

from protocol.transport.base import Bus, BusError, Delivery
from protocol.transport.layout import QUEUE_HEADER, USER_HEADER
from protocol.transport.topology import (
    CONTROL,
    DEAD,
    DLX,
    REASON_HEADER,
    TASKS,
    UPDATES,
    control_queue,
    liveness_queue,
    site_queue,
    updates_queue,
)

MARKER_HEADER = "x-fedbus-dead-marker"  # our own end-of-browse marker (never listed)
REQUEUED_HEADER = "x-fedbus-requeued"  # on a requeued frame: the reason it had been dead-lettered
_DROP_HEADERS = {REASON_HEADER, QUEUE_HEADER, USER_HEADER, MARKER_HEADER}
MAX_BROWSE = 999  # letters one browse can hold unacked (+1 for the marker: the AMQP bus's prefetch limit)

Action = Literal["keep", "drop", "requeue"]


class DeadLetterError(BusError):
    """A dead-letter operation could not be done; the message says why and what to do."""


@dataclass(frozen=True)
class DeadLetter:
    """One frame in ``fedbus.dead`` with why it was rejected and what it claims to be."""

    message_id: str
    reason: str | None
    queue: str | None  # the queue it was rejected from
    routing_key: str
    user: str | None  # the broker-vouched sender of the original, where known
    size: int
    redelivered: bool
    envelope: dict[str, Any] | None  # type/sender/federation/run_id/round (unverified), None if undecodable
    headers: dict[str, Any] = field(repr=False, default_factory=dict)
    body: bytes = field(repr=False, default=b"")

    def to_json(self) -> dict[str, Any]:
        """Everything but the body (which can be large and is binary)."""
        return {
            "message_id": self.message_id, "reason": self.reason, "queue": self.queue,
            "routing_key": self.routing_key, "user": self.user, "size": self.size,
            "redelivered": self.redelivered, "envelope": self.envelope,
            "headers": {k: _plain(v) for k, v in self.headers.items()},
        }


def _plain(v: Any) -> Any:
    return v.decode(errors="replace") if isinstance(v, (bytes, bytearray)) else v


def _envelope_summary(body: bytes) -> dict[str, Any] | None:
    """What the frame claims (not verified: the signer may be unknown; display only)."""
    try:
        from protocol.codec import decode_envelope, decode_frame

        _, kid, env_body, _ = decode_frame(body)
        env = decode_envelope(env_body)
    except Exception:  # noqa: BLE001 - garbage is a legitimate dead letter
        return None
    return {"type": env.type, "sender": env.sender, "recipient": env.recipient, "federation": env.federation,
            "run_id": env.run_id, "round": env.round, "sent_at": env.sent_at, "kid": kid}


def _letter(d: Delivery) -> DeadLetter:
    h = {k: _plain(v) for k, v in (d.headers or {}).items()}
    body = bytes(d.body)
    return DeadLetter(
        message_id=d.message_id, reason=h.get(REASON_HEADER), queue=h.get(QUEUE_HEADER),
        routing_key=d.routing_key, user=h.get(USER_HEADER) or d.user_id, size=len(body),
        redelivered=bool(d.redelivered), envelope=_envelope_summary(body), headers=h, body=body,
    )


def belongs_to(letter: DeadLetter, federation: str | None) -> bool:
    """Whether ``letter`` is ``federation``'s (every letter when ``federation`` is None)."""
    if federation is None:
        return True
    if letter.queue in (updates_queue(federation), control_queue(federation), liveness_queue(federation)):
        return True
    return bool(letter.envelope and letter.envelope.get("federation") == federation)


def origin(letter: DeadLetter) -> tuple[str, str]:
    """The (exchange, routing key) that feeds the queue ``letter`` was rejected from."""
    q = letter.queue or ""
    if q.startswith(liveness_queue("")):
        raise DeadLetterError(
            f"dead letter {letter.message_id} was refused by the liveness monitor ({q}), which reads a copy of the "
            "control messages: the coordinator's control queue had its own copy, so it is not requeued; purge it"
        )
    for prefix, exchange in ((site_queue(""), TASKS), (updates_queue(""), UPDATES), (control_queue(""), CONTROL)):
        if q.startswith(prefix) and len(q) > len(prefix):
            return exchange, q[len(prefix):]
    raise DeadLetterError(
        f"dead letter {letter.message_id} came from queue {q or '(unknown)'!r}, which is not a fedbus queue: "
        "it cannot be requeued; purge it"
    )


class DeadLetters:
    """``fedbus.dead`` seen by one federation (or all, with ``federation=None``)."""

    def __init__(self, bus: Bus, federation: str | None, *, timeout_s: float = 30.0, limit: int = MAX_BROWSE) -> None:
        if not 1 <= limit <= MAX_BROWSE:
            raise ValueError(f"limit must be in 1..{MAX_BROWSE}, got {limit}")
        self.bus = bus
        self.federation = federation
        self.timeout_s = timeout_s
        self.limit = limit
        self.truncated = False  # the last browse stopped at ``limit`` before seeing the whole queue

    # -- the four operations -------------------------------------------------------------
    def list(self) -> list[DeadLetter]:
        """The federation's dead letters, oldest first; nothing is removed."""
        return [letter for letter, _ in self._browse(lambda _: "keep")]

    def show(self, message_id: str) -> DeadLetter:
        """One dead letter (with its body); ``DeadLetterError`` if it is not there."""
        for letter in self.list():
            if letter.message_id == message_id:
                return letter
        raise DeadLetterError(self._missing(message_id))

    def requeue(self, message_ids: Iterable[str] | None = None) -> list[DeadLetter]:
        """Send letters (all of the federation's when ``message_ids`` is None) back where they came from."""
        return self._select(message_ids, "requeue")

    def purge(self, message_ids: Iterable[str] | None = None) -> list[DeadLetter]:
        """Remove letters for good (all of the federation's when ``message_ids`` is None)."""
        return self._select(message_ids, "drop")

    # -- machinery -------------------------------------------------------------------------
    def _missing(self, message_id: str) -> str:
        where = f"federation {self.federation!r}" if self.federation else "the vhost"
        more = f" (only the first {self.limit} letters were looked at)" if self.truncated else ""
        return f"no dead letter {message_id!r} for {where} in {DEAD}{more}; `dead-letters list` shows what is there"

    def _select(self, message_ids: Iterable[str] | None, action: Action) -> list[DeadLetter]:
        wanted = None if message_ids is None else set(message_ids)
        if wanted is not None and not wanted:
            return []
        self._check(wanted, requeue=action == "requeue")
        seen = self._browse(lambda letter: action if wanted is None or letter.message_id in wanted else "keep")
        return [letter for letter, did in seen if did != "keep"]

    def _check(self, wanted: set[str] | None, *, requeue: bool) -> None:
        """Refuse before touching anything if a chosen letter is missing or cannot go back."""
        present = self.list()
        if wanted is not None:
            missing = wanted - {d.message_id for d in present}
            if missing:
                raise DeadLetterError(self._missing(sorted(missing)[0]) + f"; did nothing (missing: {sorted(missing)})")
        for letter in present:
            if requeue and (wanted is None or letter.message_id in wanted):
                if "x-fedbus-chunk" in letter.headers:
                    raise DeadLetterError(
                        f"dead letter {letter.message_id} is one chunk of a broken transfer "
                        f"({letter.headers['x-fedbus-chunk']}): it cannot be requeued on its own; purge it"
                    )
                origin(letter)

    def _browse(self, decide: Callable[[DeadLetter], Action]) -> list[tuple[DeadLetter, Action]]:
        """Hold every letter up to our marker and apply ``decide`` to the federation's;
        returns them with what was done, oldest first."""
        marker = f"fedbus-dead-marker-{uuid.uuid4().hex}"
        self.bus.publish(DLX, "", b"", message_id=marker, headers={MARKER_HEADER: marker})
        held: list[Delivery] = []
        cond = threading.Condition()
        state = {"done": False}

        def on_dead(d: Delivery) -> None:
            with cond:
                held.append(d)
                if d.message_id == marker or len(held) >= self.limit + 1:
                    state["done"] = True
                cond.notify_all()

        consumer = self.bus.consume(DEAD, on_dead, prefetch=self.limit + 1)
        try:
            with cond:
                if not cond.wait_for(lambda: state["done"], timeout=self.timeout_s):
                    raise DeadLetterError(
                        f"{DEAD}: our marker did not come back within {self.timeout_s:.0f}s; another consumer may "
                        f"hold the queue (it is single-active-consumer), or it holds over {self.limit} letters "
                        "ahead of it; nothing was changed"
                    )
                batch = list(held)
            self.truncated = not any(d.message_id == marker for d in batch)
            out: list[tuple[DeadLetter, Action]] = []
            for d in batch:
                if d.message_id == marker or (d.headers or {}).get(MARKER_HEADER):
                    d.ack()  # ours, or a marker a browse that stopped early left behind
                    continue
                letter = _letter(d)
                if not belongs_to(letter, self.federation):
                    continue
                action = decide(letter)
                if action == "requeue":
                    self._republish(letter)
                    d.ack()
                elif action == "drop":
                    d.ack()
                out.append((letter, action))
            return out
        finally:
            consumer.cancel()  # every letter not acked goes back, in order

    def _republish(self, letter: DeadLetter) -> None:
        exchange, key = origin(letter)
        headers = {k: v for k, v in letter.headers.items() if k not in _DROP_HEADERS}
        headers[REQUEUED_HEADER] = letter.reason or ""
        try:
            self.bus.publish(exchange, key, letter.body, message_id=letter.message_id, headers=headers)
        except BusError as e:
            raise DeadLetterError(
                f"cannot requeue {letter.message_id} to {exchange!r} key {key!r}: {e}. Requeueing into a "
                f"coordinator queue needs a broker user that may write to {exchange!r} (the admin user "
                "you provisioned with); the coordinator's own user may requeue tasks only"
            ) from e

