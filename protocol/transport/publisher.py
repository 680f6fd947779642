"""Publishing on RabbitMQ: one confirm-mode channel per bus, retried across failovers.

Publish returns only after *its own* confirm, with ``mandatory`` set (unroutable ->
:class:`PublishRefused`) and ``user_id`` = the connection's user (the broker refuses a
forged one). The channel is shared by the bus's publishing threads, serialised by a
lock. On connection loss, or a broker nack (a quorum queue electing a leader after its
node died), it reconnects through the bus's connector (another node of a cluster when
that one is gone) with capped, jittered backoff and republishes what was not confirmed
with the same ``message_id`` (at-least-once; consumers dedupe by message id), until
``publish_timeout_s``, then :class:`PublishError`. A chunked body is sent again whole,
under a fresh transfer id. Refusals are never retried. A keepalive thread services
heartbeats while the publisher is idle (``BlockingConnection`` only does I/O inside calls).
"""
from __future__ import annotations

import itertools
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import pika
import pika.exceptions as px
import structlog

from protocol.chunking import split_body
from protocol.transport.base import (
    BrokerUnreachable,
    BusError,
    BusPermissionError,
    PublishError,
    PublishRefused,
)
from protocol.transport.connector import TRANSIENT, backoff, permission_error, refusal_of
from protocol.transport.layout import chunk_header_to_amqp

if TYPE_CHECKING:
    from protocol.transport.amqp import AmqpBus

log = structlog.get_logger(__name__)


class _Nacked(Exception):
    """The broker nacked a publish: transient on a cluster (a quorum queue electing a
    leader after its node died), so it is retried like a lost connection, with the same
    message id, until ``publish_timeout_s``."""


_TRANSIENT = (_Nacked, *TRANSIENT)


class Publisher:
    """One confirm-mode channel shared by the bus's publishing threads."""

    def __init__(self, bus: AmqpBus) -> None:
        self.bus = bus
        self._lock = threading.Lock()
        self._conn: pika.BlockingConnection | None = None
        self._ch: Any = None
        self._stop = threading.Event()
        self._keepalive: threading.Thread | None = None
        self.reconnects = 0  # connections re-established after a loss (monitoring, tests)
        self._connected_once = False

    def _ensure(self) -> Any:
        if self._conn is None or not self._conn.is_open:
            self._drop()
            self._conn, idx = self.bus.connector.open("connecting to publish")
            if self._connected_once:
                self.reconnects += 1
                log.info("publisher reconnected", node=self.bus.endpoints.nodes[idx].where)
            self._connected_once = True
        if self._ch is None or not self._ch.is_open:
            self._ch = self._conn.channel()
            self._ch.confirm_delivery()
        if self._keepalive is None:
            self._keepalive = threading.Thread(target=self._keep_alive, name="fedbus-amqp-keepalive", daemon=True)
            self._keepalive.start()
        return self._ch

    def _drop(self) -> None:
        conn, self._conn, self._ch = self._conn, None, None
        if conn is not None:
            try:
                if conn.is_open:
                    conn.close()
            except Exception:  # already broken; nothing to save
                pass

    def _keep_alive(self) -> None:
        """Service heartbeats while no publish is running (BlockingConnection only does
        I/O inside calls)."""
        interval = max(0.25, (self.bus.params.heartbeat or 30) / 4)
        while not self._stop.wait(interval):
            if not self._lock.acquire(blocking=False):
                continue
            try:
                if self._conn is not None and self._conn.is_open:
                    self._conn.process_data_events(0)
            except Exception as e:
                log.info("publisher connection lost while idle; will reconnect on next publish", error=repr(e))
                self._drop()
            finally:
                self._lock.release()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._drop()

    def run_on_channel(self, fn: Callable[[Any], Any], *, what: Callable[[], str]) -> Any:
        """Run ``fn(channel)`` with reconnects on transient errors; refusals raise."""
        return self._retrying(lambda: fn(self._ensure()), what=what)

    def _retrying(
        self, op: Callable[[], Any], *, what: Callable[[], str], refusal: type[BusPermissionError] = BusPermissionError
    ) -> Any:
        deadline = time.monotonic() + self.bus.publish_timeout_s
        with self._lock:
            for attempt in itertools.count():
                try:
                    return op()
                except (PublishError, BusPermissionError, BrokerUnreachable):
                    raise
                except Exception as e:
                    refused = refusal_of(e)
                    if isinstance(e, px.ChannelClosedByBroker):
                        self._ch = None
                    if refused:
                        raise permission_error(*refused, user=self.bus.user, what=what(), cls=refusal,
                                                external=self.bus.endpoints.nodes[0].external) from e
                    if not isinstance(e, _TRANSIENT + (px.ChannelClosedByBroker,)):
                        raise
                    self._drop()
                    delay = self.bus.connector.cap_delay(backoff(attempt, cap=self.bus.reconnect_max_s))
                    if time.monotonic() + delay > deadline and isinstance(e, _Nacked):
                        raise PublishError(
                            f"{what()}: the broker nacked it for {self.bus.publish_timeout_s}s (a queue over its "
                            "length limit, or a quorum queue without a majority of its nodes)"
                        ) from e
                    if time.monotonic() + delay > deadline:
                        raise PublishError(
                            f"{what()}: broker unreachable for {self.bus.publish_timeout_s}s "
                            f"({type(e).__name__}: {e}); is RabbitMQ up at {self.bus.endpoints.where}?"
                        ) from e
                    # Before the first connection these are retries of the start-up, not losses:
                    # quiet (the outcome is one line, below); afterwards a warning each.
                    (log.warning if self.bus.connector.connected.is_set() else log.info)(
                        "broker connection problem; reconnecting", what=what(), error=repr(e), retry_in_s=round(delay, 2))
                    if self._stop.wait(delay):
                        raise BusError("bus closed while reconnecting") from e
        raise AssertionError("unreachable")

    def publish(
        self, exchange: str, routing_key: str, body: bytes | memoryview, *, message_id: str,
        headers: dict[str, Any] | None,
    ) -> None:
        base = dict(headers or {})
        user = self.bus.user

        def props(h: dict[str, Any]) -> pika.BasicProperties:
            return pika.BasicProperties(delivery_mode=2, message_id=message_id, user_id=user, headers=h)

        what = f"publishing {message_id} to exchange {exchange!r} key {routing_key!r}"

        def send_one(ch: Any, h: dict[str, Any], data: bytes | memoryview) -> None:
            try:
                ch.basic_publish(exchange, routing_key, data, properties=props(h), mandatory=True)
            except px.UnroutableError as e:
                raise PublishRefused(
                    f"{what}: unroutable (no queue bound for that key: unknown site or federation?)"
                ) from e
            except px.NackError as e:
                raise _Nacked(f"{what}: the broker nacked the message") from e

        if len(body) <= self.bus.chunk_size:
            data = body if isinstance(body, bytes) else bytes(body)
            self._retrying(lambda: send_one(self._ensure(), base, data), what=lambda: what, refusal=PublishRefused)
            return

        def send_chunks() -> None:
            # A fresh transfer id per attempt: chunks of a broken attempt never mix with
            # the retry's (the consumer expires and dead-letters the orphan partial).
            for h, piece in split_body(body, chunk_size=self.bus.chunk_size):
                send_one(self._ensure(), {**base, **chunk_header_to_amqp(h)}, bytes(piece))  # pika needs bytes

        self._retrying(send_chunks, what=lambda: what, refusal=PublishRefused)
