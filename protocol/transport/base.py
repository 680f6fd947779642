"""The one small broker interface every part of fedbus talks to.

Like dramatiq's ``Broker``: declare topology, publish with confirm, consume with
ack / nack-to-dead-letter / requeue, close. Bodies are opaque frame bytes; bodies
over ``chunk_size`` are chunked and reassembled by the implementation, so callers
always see whole frames. ``protocol/transport/memory.py`` and
``protocol/transport/amqp.py`` implement it; ``open_bus(url)`` picks one by URL.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024  # below RabbitMQ 4.x's 16 MiB max_message_size


class BusError(Exception):
    """Base of all transport errors."""


class PublishError(BusError):
    """The broker did not confirm a publish (nack, unroutable, or connection lost)."""


class BusPermissionError(BusError):
    """The broker refused an operation (AMQP 403/404/406): retrying will not help."""


class BrokerRefused(BusPermissionError):
    """The broker refused us at the door: login (password or certificate) or TLS. A
    configuration problem: processes exit 2 so systemd stops restarting them."""


class BrokerUnreachable(BusError):
    """No broker node could be reached within the connect timeout (never connected).
    Transient by nature: processes exit 1 and systemd retries later."""


def exit_code(e: BusError) -> int:
    """2 for what only a configuration change fixes (refusals), 1 for the rest."""
    return 2 if isinstance(e, BusPermissionError) else 1


class PublishRefused(PublishError, BusPermissionError):
    """The broker refused a publish for good (no such exchange, access refused): both a
    ``PublishError`` (publish did not happen) and a ``BusPermissionError`` (do not retry)."""


class Delivery(abc.ABC):
    """One whole frame handed to a consumer's handler.

    Exactly one of ``ack``, ``nack`` or ``requeue`` must be called, from any thread.
    """

    body: bytes | memoryview
    message_id: str
    routing_key: str
    queue: str
    headers: dict[str, Any]
    redelivered: bool
    user_id: str | None  # the broker-vouched sender (AMQP user_id) where available
    # sha256 (hex) of ``body``, set only by a bus that verified it while reassembling a chunked
    # transfer (protocol.chunking): a receiver names the frame by it instead of hashing it again.
    frame_sha256: str | None = None

    @abc.abstractmethod
    def ack(self) -> None:
        """Done with it: the broker forgets the message."""

    @abc.abstractmethod
    def nack(self, reason: str) -> None:
        """Reject to the dead-letter queue ``fedbus.dead`` with ``reason`` in header ``x-fedbus-reason``."""

    @abc.abstractmethod
    def requeue(self) -> None:
        """Give it back to the queue for redelivery (to this or another consumer)."""

    def release_body(self) -> None:
        """Forget the frame bytes of a delivery that stays unacked for a while.

        The coordinator holds each update's delivery until the round is committed;
        ``ack``/``requeue`` need only the delivery tag, so the bytes can go and memory
        stays O(model) however many updates are held. ``nack`` after this is an error.
        """
        self.body = b""


Handler = Callable[[Delivery], None]


def call_handler(handler: Handler, d: Delivery, *, queue: str, log: Any) -> None:
    """Run ``handler`` on ``d``; a handler bug must not kill the consumer or lose the frame:
    an unsettled delivery is dead-lettered with the error as its reason (both buses)."""
    try:
        handler(d)
    except Exception as e:
        log.exception("handler failed; dead-lettering the frame", queue=queue, message_id=d.message_id)
        if not d._settled:
            try:
                d.nack(f"handler_error: {type(e).__name__}: {e}")
            except BusError:
                log.exception("could not dead-letter after handler error", message_id=d.message_id)


class Consumer(abc.ABC):
    @abc.abstractmethod
    def cancel(self) -> None:
        """Stop receiving; unacked deliveries go back to the queue."""

    @property
    def live(self) -> bool:
        """Subscribed right now: False while reconnecting, after a refusal and after ``cancel``
        (whoever says "I am watching this queue" asks this first: coordinator/liveness_monitor.py)."""
        return True


@dataclass
class Topology:
    """What to declare: site task queues and coordinator queues for federations."""

    sites: Iterable[str] = ()
    federations: Iterable[str] = ()
    quorum: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Bus(abc.ABC):
    @abc.abstractmethod
    def declare(self, topology: Topology) -> None:
        """Declare exchanges, queues and bindings of docs/design.md (idempotent)."""

    @abc.abstractmethod
    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str,
        headers: dict[str, Any] | None = None,
    ) -> None:
        """Publish persistently and return once the broker confirmed; else raise ``PublishError``."""

    @abc.abstractmethod
    def consume(self, queue: str, handler: Handler, *, prefetch: int = 1) -> Consumer:
        """Call ``handler`` on a worker thread for each whole frame from ``queue``."""

    @abc.abstractmethod
    def close(self) -> None:
        """Cancel consumers, close connections; unacked deliveries are redelivered."""
