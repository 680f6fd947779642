"""RabbitMQ bus over pika: publishing and consuming (with ``connector.py``, which opens
the connections, the only modules that import pika).

Sites sit behind hospital firewalls and connect outbound; connections, processes and
the broker itself come and go. Connections come from :class:`~protocol.transport.connector.Connector`
(failover between a cluster's nodes, fail-fast on a broker never reached, refusals
named). On them:

* **Publishing** uses one confirm-mode channel per bus, serialised by a lock: publish
  returns only after *its own* confirm, with ``mandatory`` set (unroutable -> error) and
  ``user_id`` = the connection's user (the broker refuses a forged one). On connection
  loss it reconnects with capped, jittered backoff and republishes the same
  ``message_id`` (at-least-once; consumers dedupe by message id). A keepalive thread
  services heartbeats while the publisher is idle.
* **Consuming** gives every consumer its own connection and I/O thread, which only
  moves bytes: deliveries go to a worker thread that reassembles chunks and runs the
  handler; acks go back through ``add_callback_threadsafe``. Prefetch counts whole
  messages: while a chunked transfer is in progress the channel's prefetch is raised by
  its chunk count, so a 60 MB frame passes a ``prefetch=1`` consumer. The chunks stay
  unacked until the whole frame is acked, so a consumer that dies mid-transfer loses
  nothing. Lost connections are re-established with backoff; unacked messages are
  redelivered by the broker. A consumer the broker cancels (its queue deleted, e.g.
  and declared again) consumes again on the same channel once the queue is back, so
  what it holds is acked once, not redelivered.
* **Refusals** (AMQP 403 ACCESS_REFUSED, 404 NOT_FOUND, 406 PRECONDITION_FAILED, bad
  credentials; classified in ``connector.py``) stop with :class:`BusPermissionError`
  naming the object and the user; they are never retried.
* ``nack(reason)`` publishes a copy of the frame with ``x-fedbus-reason`` (and
  ``x-fedbus-queue``) to ``fedbus.dlx`` with confirm, *then* acks the original, so there
  is no window where the frame is in neither place.
"""

from __future__ import annotations

import itertools
import queue as queue_mod
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pika
import pika.exceptions as px
import structlog

from protocol.chunking import Reassembler, split_body
from protocol.errors import ChunkCapacity, ChunkError
from protocol.transport.base import (
    DEFAULT_CHUNK_SIZE,
    Bus,
    BusError,
    BrokerRefused,
    BrokerUnreachable,
    BusPermissionError,
    Consumer,
    Delivery,
    Handler,
    PublishError,
    PublishRefused,
    Topology,
)
from protocol.transport.layout import (
    EXCHANGES,
    QUEUE_HEADER,
    chunk_header_from_amqp,
    chunk_header_to_amqp,
    orphan_chunk_headers,
    plan,
    strip_chunk_headers,
)
from protocol.transport.connector import (
    DEFAULT_CONNECT_TIMEOUT_S,
    TRANSIENT,
    Connector,
    backoff,
    node_parameters,
    permission_error,
    refusal_of,
)
from protocol.transport.endpoints import parse_endpoints
from protocol.transport.topology import DLX, REASON_HEADER

log = structlog.get_logger(__name__)

USER_HEADER = "x-fedbus-user"  # on a dead letter: the broker-vouched sender of the original


class _Nacked(Exception):
    """The broker nacked a publish: transient on a cluster (a quorum queue electing a
    leader after its node died), so it is retried like a lost connection, with the same
    message id, until ``publish_timeout_s``."""


_TRANSIENT = (_Nacked, *TRANSIENT)
_MAX_PREFETCH = 65535


class AmqpBus(Bus):
    """A :class:`Bus` on RabbitMQ; see the module docstring for the guarantees.

    ``url`` may list several nodes of a cluster (comma-separated): connections fail over
    between them, and queues are declared as quorum queues.
    """

    def __init__(
        self,
        url: str,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        quorum: bool = False,
        tls: dict[str, str] | None = None,
        heartbeat: int = 30,
        blocked_connection_timeout: float = 60.0,
        publish_timeout_s: float = 120.0,
        reconnect_max_s: float = 10.0,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        resubscribe_timeout_s: float = 10.0,
        connection_name: str | None = None,
        max_reassembly_bytes: int = 1 * 2**30,
        reassembly_timeout_s: float = 300.0,
        user: str | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.url = url
        self.endpoints = parse_endpoints(url, tls=tls)
        self.user = self.endpoints.user
        self.connect_timeout_s = connect_timeout_s
        plist = [
            node_parameters(n, heartbeat=heartbeat, blocked_connection_timeout=blocked_connection_timeout,
                    connection_name=connection_name, connect_timeout_s=connect_timeout_s)
            for n in self.endpoints.nodes
        ]
        self.params = plist[0]
        self.connector = Connector(self.endpoints, plist, connect_timeout_s=connect_timeout_s)
        if user is not None and user != self.user:
            raise ValueError(f"user={user!r} differs from the URL's user {self.user!r}")
        self.chunk_size = chunk_size
        self.quorum = quorum or self.endpoints.quorum
        self.publish_timeout_s = publish_timeout_s
        self.reconnect_max_s = reconnect_max_s
        self.resubscribe_timeout_s = resubscribe_timeout_s  # after a broker cancel: wait this long for the queue
        self.reassembly = {"max_bytes": max_reassembly_bytes, "timeout_s": reassembly_timeout_s}
        self._publisher = _Publisher(self)
        self._consumers: list[_AmqpConsumer] = []
        self._closed = False

    # -- Bus ------------------------------------------------------------------------------
    def declare(self, topology: Topology) -> None:
        self._check_open()
        quorum = bool(topology.quorum or self.quorum)
        topo = Topology(topology.sites, topology.federations, quorum, topology.extra)

        def work(ch: Any) -> None:
            for name, kind in EXCHANGES.items():
                self._what = f"declaring exchange {name!r}"
                ch.exchange_declare(name, exchange_type=kind, durable=True)
            for qp in plan(topo):
                self._what = f"declaring queue {qp.name!r}"
                ch.queue_declare(qp.name, durable=True, arguments=qp.arguments)
                self._what = f"binding queue {qp.name!r} to {qp.exchange!r}"
                ch.queue_bind(qp.name, qp.exchange, routing_key=qp.routing_key)

        self._what = "declaring the topology"
        self._publisher.run_on_channel(work, what=lambda: self._what)

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str,
        headers: dict[str, Any] | None = None,
    ) -> None:
        self._check_open()
        self._publisher.publish(exchange, routing_key, body, message_id=message_id, headers=headers)

    def consume(self, queue: str, handler: Handler, *, prefetch: int = 1) -> Consumer:
        self._check_open()
        if not 1 <= prefetch <= 1000:
            raise ValueError(f"prefetch must be in 1..1000, got {prefetch}")
        c = _AmqpConsumer(self, queue, handler, prefetch)
        self._consumers.append(c)
        c.start()
        return c

    def close(self) -> None:
        self._closed = True
        for c in list(self._consumers):
            c.cancel()
        self._publisher.close()

    @property
    def reconnects(self) -> int:
        """How often the publishing connection was re-established after a loss."""
        return self._publisher.reconnects

    def delete_queue(self, name: str) -> None:
        """Delete a queue (tests and de-provisioning)."""
        self._publisher.run_on_channel(lambda ch: ch.queue_delete(name), what=lambda: f"deleting queue {name!r}")

    def _check_open(self) -> None:
        if self._closed:
            raise BusError("bus is closed")

    def __enter__(self) -> "AmqpBus":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Publisher:
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
                        raise BusError("bus closed while reconnecting")
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


@dataclass
class _Raw:
    gen: int
    tag: int
    routing_key: str
    redelivered: bool
    props: Any
    body: bytes
    chunk: dict[str, Any] | None


@dataclass
class _TransferHold:
    raws: list[_Raw] = field(default_factory=list)


class AmqpDelivery(Delivery):
    def __init__(self, consumer: "_AmqpConsumer", raws: list[_Raw], body: bytes) -> None:
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

    def _claim(self, action: str) -> bool:
        with self._lock:
            if self._settled:
                raise BusError(f"delivery {self.message_id} was already acked/nacked/requeued")
            self._settled = True
        if self._gen != self._consumer._gen:
            log.warning(
                "settling a delivery from a connection that was lost; the broker redelivers it",
                message_id=self.message_id, action=action, queue=self.queue,
            )
            return False
        return True

    def ack(self) -> None:
        if self._claim("ack"):
            self._consumer._settle(self._gen, [r.tag for r in self._raws], "ack", extra=self.chunks - 1)

    def requeue(self) -> None:
        if self._claim("requeue"):
            self._consumer._settle(self._gen, [r.tag for r in self._raws], "requeue", extra=self.chunks - 1)

    def release_body(self) -> None:
        self.body = b""
        for r in self._raws:  # the chunks' bytes too: only their tags are needed to ack
            r.body = b""

    def nack(self, reason: str) -> None:
        if not self._claim("nack"):
            return
        self._consumer._dead_letter(
            self._gen, self._raws, self.body, self.headers, reason, message_id=self.message_id,
            routing_key=self.routing_key, user_id=self.user_id, extra=self.chunks - 1,
        )
        log.info("frame dead-lettered", message_id=self.message_id, reason=reason, queue=self.queue)


_STOP = object()
_CAPACITY_BACKOFF_S = 0.05  # pause before requeueing a chunk refused for reassembly capacity


class _AmqpConsumer(Consumer):
    _ids = itertools.count(1)

    def __init__(self, bus: AmqpBus, queue: str, handler: Handler, prefetch: int) -> None:
        self.bus = bus
        self.queue = queue
        self.handler = handler
        self.prefetch = prefetch
        self.error: BusPermissionError | None = None
        self.reconnects = 0  # connections re-established after a loss (monitoring, tests)
        self.broker_cancels = 0  # basic.cancel notifications received (queue deleted)
        self.resubscribes = 0  # consumes renewed after a broker cancel
        self._connected_once = False
        self._broker_cancelled = False
        self._gen = 0
        self._conn: pika.BlockingConnection | None = None
        self._ch: Any = None
        self._stop = threading.Event()
        self._first_attempt = threading.Event()
        self._work: queue_mod.SimpleQueue[Any] = queue_mod.SimpleQueue()
        self._ops_lock = threading.Lock()
        self._ops: list[tuple[int, Callable[[], None]]] = []
        self._flush_scheduled = False
        self._extra = 0  # chunks beyond one per whole message currently unacked or expected (I/O thread)
        self._seen_transfers: set[str] = set()  # transfer ids counted in _extra (I/O thread)
        n = next(self._ids)
        self._io = threading.Thread(target=self._io_loop, name=f"fedbus-amqp-io-{n}:{queue}", daemon=True)
        self._worker = threading.Thread(target=self._work_loop, name=f"fedbus-amqp-worker-{n}:{queue}", daemon=True)

    def start(self) -> None:
        self._worker.start()
        self._io.start()
        # Until the bus has reached the broker once, wait for the outcome (connected,
        # refused, or unreachable after connect_timeout_s); after that, the first attempt.
        self._first_attempt.wait(timeout=self.bus.connect_timeout_s + 30)
        if self.error is not None:
            self._work.put(_STOP)
            raise self.error

    # -- I/O thread -----------------------------------------------------------------------
    def _io_loop(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            what = f"connecting to the broker as consumer of queue {self.queue!r}"
            try:
                self._conn, _ = self.bus.connector.open(what)
                self._ch = self._conn.channel()
                self._gen += 1
                with self._ops_lock:  # operations for the old connection are void
                    self._ops.clear()
                    self._flush_scheduled = False
                self._extra = 0
                self._seen_transfers.clear()
                self._work.put(("reset", self._gen))
                what = f"setting prefetch on queue {self.queue!r}"
                self._apply_qos()
                what = f"consuming from queue {self.queue!r}"
                self._ch.add_on_cancel_callback(self._on_broker_cancel)
                self._ch.basic_consume(self.queue, self._on_message)
                if self._connected_once:
                    self.reconnects += 1
                    log.info("consumer reconnected", queue=self.queue, attempts=attempt)
                self._connected_once = True
                attempt = 0
                self._first_attempt.set()
                while not self._stop.is_set():
                    self._conn.process_data_events(time_limit=0.5)
                    if self._broker_cancelled:
                        self._broker_cancelled = False
                        what = f"consuming again from queue {self.queue!r} after the broker cancelled us"
                        self._resubscribe()
                self._flush_ops()  # acks settled just before cancel() still reach the broker
                self._close_conn()
                return
            except Exception as e:
                refused = refusal_of(e)
                self._close_conn()
                if isinstance(e, (BrokerRefused, BrokerUnreachable)) or refused:
                    self.error = e if isinstance(e, BusError) else permission_error(
                        *refused, user=self.bus.user, what=what, external=self.bus.endpoints.nodes[0].external)
                    (log.error if self._connected_once else log.info)("consumer stopped", queue=self.queue, error=str(self.error))
                    self._stop.set()
                    self._first_attempt.set()
                    self._work.put(_STOP)
                    return
                if not isinstance(e, _TRANSIENT + (px.ChannelClosedByBroker,)):
                    log.exception("consumer I/O failed unexpectedly; reconnecting", queue=self.queue)
                delay = self.bus.connector.cap_delay(backoff(attempt, cap=self.bus.reconnect_max_s))
                attempt += 1
                if self.bus.connector.connected.is_set():
                    self._first_attempt.set()
                (log.warning if self.bus.connector.connected.is_set() else log.info)(
                    "consumer lost the broker; reconnecting", queue=self.queue, error=repr(e), retry_in_s=round(delay, 2))
                self._stop.wait(delay)

    def _on_broker_cancel(self, frame: Any) -> None:
        self.broker_cancels += 1
        log.warning("broker cancelled the consumer (queue deleted?)", queue=self.queue)
        self._broker_cancelled = True

    def _resubscribe(self) -> None:
        """Consume again on the *same* channel after a broker cancel, so deliveries still
        unacked stay ours and are acked once (no redelivery, no duplicate work).

        RabbitMQ cancels a consumer whose queue is deleted (also a quorum queue: its
        leader moving is not a cancel), e.g. a re-provision that deletes and declares it
        again. The queue is looked for on a side channel, whose 404 would close this one,
        for up to ``resubscribe_timeout_s`` while acks and heartbeats go on; then the
        consume is made anyway, and its refusal (404: gone for good) stops us as before.
        """
        deadline = time.monotonic() + self.bus.resubscribe_timeout_s
        waits = 0
        while not self._stop.is_set() and time.monotonic() < deadline and not self._queue_exists():
            self._conn.process_data_events(time_limit=backoff(waits, cap=1.0))
            waits += 1
        if self._stop.is_set():
            return
        self._ch.basic_consume(self.queue, self._on_message)
        self.resubscribes += 1
        log.info("consumer resubscribed after a broker cancel", queue=self.queue, waited_for_queue=waits > 0)

    def _queue_exists(self) -> bool:
        """Whether the queue exists (passive declare on a throw-away channel); True when
        the broker does not say (e.g. 403: we may consume but not declare)."""
        side = self._conn.channel()
        try:
            side.queue_declare(self.queue, passive=True)
            return True
        except px.ChannelClosedByBroker as e:
            return e.reply_code != 404
        finally:
            if side.is_open:
                side.close()

    def _close_conn(self) -> None:
        conn, self._conn, self._ch = self._conn, None, None
        self._gen += 1  # deliveries of the old connection are now stale
        if conn is not None:
            try:
                if conn.is_open:
                    conn.close()
            except Exception:
                pass

    def _apply_qos(self) -> None:
        if self.bus.quorum:
            # Quorum queues refuse channel-wide (global) prefetch; reserve room for one
            # whole frame of the largest size reassembly accepts instead.
            room = -(-self.bus.reassembly["max_bytes"] // self.bus.chunk_size)
            self._ch.basic_qos(prefetch_count=min(_MAX_PREFETCH, self.prefetch + room))
        else:
            self._ch.basic_qos(prefetch_count=min(_MAX_PREFETCH, self.prefetch + self._extra), global_qos=True)

    def _on_message(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        chunk = chunk_header_from_amqp(props.headers)
        if chunk is not None:
            tid = str(chunk.get("transfer_id"))
            if tid not in self._seen_transfers:
                self._seen_transfers.add(tid)
                count = chunk.get("count")
                if isinstance(count, int) and count > 1:
                    self._extra += min(count, _MAX_PREFETCH) - 1
                    if not self.bus.quorum:
                        self._apply_qos()
        self._work.put(_Raw(self._gen, method.delivery_tag, method.routing_key, method.redelivered, props, body, chunk))

    def _release(self, extra: int) -> None:
        if extra > 0:
            self._extra = max(0, self._extra - extra)
            if self._extra == 0:
                self._seen_transfers.clear()  # nothing chunked in flight: forget the ids
            if not self.bus.quorum and self._ch is not None and self._ch.is_open:
                self._apply_qos()

    def _threadsafe(self, gen: int, fn: Callable[[], None]) -> bool:
        """Run ``fn`` on the I/O thread if connection ``gen`` is still the live one.

        Operations are queued and flushed by one wake-up of the I/O loop, so a burst of
        acks costs one ``add_callback_threadsafe`` rather than one each.
        """
        conn = self._conn
        if gen != self._gen or conn is None:
            return False
        with self._ops_lock:
            self._ops.append((gen, fn))
            if self._flush_scheduled:
                return True
            self._flush_scheduled = True
        try:
            conn.add_callback_threadsafe(self._flush_ops)
            return True
        except Exception as e:
            with self._ops_lock:
                self._flush_scheduled = False
            log.warning("connection gone; the broker redelivers the message", error=repr(e), queue=self.queue)
            return False

    def _flush_ops(self) -> None:
        with self._ops_lock:
            ops, self._ops = self._ops, []
            self._flush_scheduled = False
        for gen, fn in ops:
            if gen == self._gen:
                fn()

    def _settle(self, gen: int, tags: list[int], action: str, *, extra: int) -> None:
        def do() -> None:
            ch = self._ch
            if ch is None or not ch.is_open:
                return
            for t in tags:
                if action == "ack":
                    ch.basic_ack(t)
                else:
                    ch.basic_nack(t, requeue=True)
            self._release(extra)

        self._threadsafe(gen, do)

    def _dead_letter(
        self, gen: int, raws: list[_Raw], body: bytes, headers: dict[str, Any], reason: str, *,
        message_id: str, routing_key: str, user_id: str | None, extra: int,
    ) -> None:
        dl_headers = {**headers, REASON_HEADER: reason, QUEUE_HEADER: self.queue}
        if user_id:
            dl_headers[USER_HEADER] = user_id
        try:
            self.bus._publisher.publish(DLX, routing_key, body, message_id=message_id, headers=dl_headers)
        except BusPermissionError as e:
            # No write permission on fedbus.dlx: let the queue dead-letter it (the broker
            # needs no permission for that), losing only the reason header.
            log.error("cannot publish to the dead-letter exchange; rejecting without reason header",
                      reason=reason, message_id=message_id, error=str(e))

            def reject() -> None:
                ch = self._ch
                if ch is not None and ch.is_open:
                    for r in raws:
                        ch.basic_reject(r.tag, requeue=False)
                    self._release(extra)

            self._threadsafe(gen, reject)
            return
        self._settle(gen, [r.tag for r in raws], "ack", extra=extra)

    # -- worker thread ----------------------------------------------------------------------
    def _work_loop(self) -> None:
        reasm = Reassembler(**self.bus.reassembly)
        holds: dict[tuple[str, str], _TransferHold] = {}  # (broker-verified user, transfer id) -> chunks
        gen = 0
        while True:
            try:
                item = self._work.get(timeout=1.0)
            except queue_mod.Empty:
                item = None
            if item is _STOP:
                return
            if holds:
                for user, tid in reasm.expire_transfers():
                    h = holds.pop((user or "", tid), None)
                    if h:
                        self._drop_transfer(h, f"{ChunkError.reason}: transfer {tid} timed out after {reasm.timeout_s}s waiting for missing chunks")
            if item is None:
                continue
            if isinstance(item, tuple) and item[0] == "reset":
                gen = item[1]
                reasm = Reassembler(**self.bus.reassembly)
                holds.clear()
                continue
            raw: _Raw = item
            if raw.gen != gen or raw.gen != self._gen:
                continue  # from a lost connection: the broker redelivers it
            if raw.chunk is None:
                self._call(AmqpDelivery(self, [raw], raw.body))
                continue
            user = raw.props.user_id
            key = (user or "", str(raw.chunk.get("transfer_id")))
            hold = holds.setdefault(key, _TransferHold())
            hold.raws.append(raw)
            try:
                whole = reasm.add(raw.chunk, raw.body, user=user)
            except ChunkCapacity as e:  # no room now: give the chunks back, the transfer is retried later
                holds.pop(key, None)
                reasm.discard(key[1], user=user)
                log.info("chunked transfer requeued for capacity", reason=str(e), queue=self.queue, user=user)
                self._stop.wait(_CAPACITY_BACKOFF_S)  # the broker redelivers at once: do not spin on it
                for r in hold.raws:
                    self._settle(r.gen, [r.tag], "requeue", extra=0)
                continue
            except ChunkError as e:
                holds.pop(key, None)
                reasm.discard(key[1], user=user)
                self._drop_transfer(hold, f"{e.reason}: {e}")
                continue
            if whole is None:
                continue
            holds.pop(key, None)
            hold.raws.sort(key=lambda r: r.chunk["index"] if r.chunk else 0)
            self._call(AmqpDelivery(self, hold.raws, whole))

    def _drop_transfer(self, hold: _TransferHold, reason: str) -> None:
        """Dead-letter every chunk held for a broken transfer, each with the reason."""
        log.warning("chunked transfer dead-lettered", reason=reason, queue=self.queue, chunks=len(hold.raws))
        count = hold.raws[0].chunk.get("count") if hold.raws and hold.raws[0].chunk else 1
        extra = (count - 1) if isinstance(count, int) and count > 1 else 0
        for i, r in enumerate(hold.raws):
            try:
                self._dead_letter(
                    r.gen, [r], r.body, orphan_chunk_headers(r.props.headers, reason, self.queue), reason,
                    message_id=r.props.message_id or "", routing_key=r.routing_key, user_id=r.props.user_id,
                    extra=extra if i == 0 else 0,
                )
            except BusError:
                log.exception("could not dead-letter a chunk; it stays unacked and is redelivered later")

    def _call(self, d: AmqpDelivery) -> None:
        try:
            self.handler(d)
        except Exception as e:  # a handler bug must not kill the consumer or lose the frame
            log.exception("handler failed; dead-lettering the frame", queue=self.queue, message_id=d.message_id)
            if not d._settled:
                try:
                    d.nack(f"handler_error: {type(e).__name__}: {e}")
                except BusError:
                    log.exception("could not dead-letter after handler error", message_id=d.message_id)

    def cancel(self) -> None:
        """Stop; the broker redelivers everything not yet acked."""
        if self._stop.is_set() and not self._io.is_alive():
            return
        self._stop.set()
        conn = self._conn
        if conn is not None:
            try:
                conn.add_callback_threadsafe(lambda: None)  # wake the I/O loop now
            except Exception:
                pass
        if threading.current_thread() is not self._io:
            self._io.join(timeout=30)
        self._work.put(_STOP)
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout=30)
