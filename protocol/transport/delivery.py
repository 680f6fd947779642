"""What an AMQP consumer hands its handler: one whole frame, settled exactly once.

A frame is one broker message, or every chunk of a chunked transfer (``Raw`` each,
kept with their delivery tags). Settling acks, requeues or dead-letters all of them
together through the consumer's I/O thread, and only on the connection they came on:
a delivery from a lost connection is left to the broker, which redelivers it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from protocol.chunking import SpilledChunk
from protocol.transport.base import BusError, Delivery
from protocol.transport.layout import strip_chunk_headers

if TYPE_CHECKING:
    from protocol.transport.consumer import AmqpConsumer

log = structlog.get_logger(__name__)


@dataclass
class Raw:
    """One message as the I/O thread received it, tagged with its connection's generation."""

    gen: int
    tag: int
    routing_key: str
    redelivered: bool
    props: Any
    body: bytes | memoryview | SpilledChunk  # a chunk of a transfer in progress may wait in its spill file
    chunk: dict[str, Any] | None


class AmqpDelivery(Delivery):
    """A whole frame from ``raws`` (one message, or a transfer's chunks in index order)."""

    def __init__(self, consumer: AmqpConsumer, raws: list[Raw], body: bytes) -> None:
        first = raws[0]
        self._consumer = consumer
        self._raws = raws
        self._gen = first.gen
        self._settled = False
        self._lock = threading.Lock()
        self.body = body
        self.message_id = first.props.message_id or ""
        self.routing_key = first.routing_key
        self.queue = consumer.queue
        self.headers = strip_chunk_headers(first.props.headers)
        self.redelivered = any(r.redelivered for r in raws)
        self.user_id = first.props.user_id
        self.chunks = len(raws)
        self._key = (self.user_id or "", str(first.chunk.get("transfer_id"))) if first.chunk else None

    def _claim(self, action: str) -> bool:
        with self._lock:
            if self._settled:
                raise BusError(f"delivery {self.message_id} was already acked/nacked/requeued")
            self._settled = True
        if not self._consumer.is_live(self._gen):
            log.warning(
                "settling a delivery from a connection that was lost; the broker redelivers it",
                message_id=self.message_id, action=action, queue=self.queue,
            )
            return False
        return True

    def ack(self) -> None:
        if self._claim("ack"):
            self._consumer.settle(self._gen, [r.tag for r in self._raws], "ack", key=self._key)

    def requeue(self) -> None:
        if self._claim("requeue"):
            self._consumer.settle(self._gen, [r.tag for r in self._raws], "requeue", key=self._key)

    def release_body(self) -> None:
        self.body = b""
        for r in self._raws:  # the chunks' bytes too: only their tags are needed to ack
            r.body = b""

    def nack(self, reason: str) -> None:
        if not self._claim("nack"):
            return
        self._consumer.dead_letter(
            self._gen, self._raws, self.body, self.headers, reason, message_id=self.message_id,
            routing_key=self.routing_key, user_id=self.user_id, key=self._key,
        )
        log.info("frame dead-lettered", message_id=self.message_id, reason=reason, queue=self.queue)
