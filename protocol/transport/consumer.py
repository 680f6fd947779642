"""Consuming from RabbitMQ: one connection and I/O thread per consumer, handlers on a worker.

* The I/O thread only moves bytes: deliveries go to a worker thread that reassembles
  chunks and runs the handler (never on pika's thread, so a long handler does not stop
  heartbeats); acks go back through ``add_callback_threadsafe``, a burst of them in one
  wake-up.
* Prefetch counts whole messages: while a chunked transfer is in progress the channel's
  prefetch is raised by its chunk count, so a 60 MB frame passes a ``prefetch=1``
  consumer. Only a transfer whose header is valid and within its broker user's chunk cap
  (``chunking.window_chunks``; what is not counted is refused or requeued by reassembly)
  raises it, by at most ``max_user_chunks`` per user, and each transfer's raise is given
  back exactly once (by key), so a flood of bogus chunks cannot fill the window. The chunks stay unacked until the whole frame is acked, so a consumer that
  dies mid-transfer loses nothing.
* Credit: the broker may send at most ``BACKLOG_CHUNKS`` chunk sizes past what the worker has
  spilled; a transfer refused for capacity waits without its bytes (``backlog.py``).
* Lost connections are re-established with backoff (through the bus's connector, so
  across a cluster's nodes); unacked messages are redelivered by the broker, and what a
  lost connection delivered is never settled on the new one.
* A consumer the broker cancels (its queue deleted, e.g. and declared again) consumes
  again on the same channel once the queue is back, so what it holds is acked once, not
  redelivered.
* Refusals (403/404/406, bad credentials) stop the consumer with a
  :class:`BusPermissionError`; they are never retried.
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
from typing import TYPE_CHECKING, Any, Callable

import pika
import pika.exceptions as px
import structlog

from protocol.chunking import MAX_USER_CHUNKS, Reassembler, SpilledChunk, window_chunks
from protocol.errors import ChunkCapacity, ChunkError
from protocol.transport.backlog import (MAX_REFUSALS_KEPT, Deferred, Returning, capacity_backoff_s, due_to_requeue,
                                        lookahead, until_due)
from protocol.transport.base import (
    BrokerRefused,
    BrokerUnreachable,
    BusError,
    BusPermissionError,
    Consumer,
    Handler,
    call_handler,
)
from protocol.transport.connector import TRANSIENT, backoff, permission_error, refusal_of
from protocol.transport.delivery import AmqpDelivery, Raw
from protocol.transport.layout import QUEUE_HEADER, USER_HEADER, chunk_header_from_amqp, orphan_chunk_headers
from protocol.transport.receive import tune_receive
from protocol.transport.topology import DLX, REASON_HEADER

if TYPE_CHECKING:
    from protocol.transport.amqp import AmqpBus

log = structlog.get_logger(__name__)

_MAX_PREFETCH = 65535


def transfer_key(user: str | None, chunk: dict[str, Any]) -> tuple[str, str]:
    """Which transfer a chunk belongs to: ids are chosen by senders, so per broker user."""
    return (user or "", str(chunk.get("transfer_id")))


@dataclass
class TransferHold:
    """The chunks of one transfer received so far (acked or dead-lettered together)."""

    raws: list[Raw] = field(default_factory=list)


_STOP = object()


class AmqpConsumer(Consumer):
    """One queue's subscription: its own connection, an I/O thread and a worker thread."""

    _ids = itertools.count(1)

    def __init__(self, bus: AmqpBus, queue: str, handler: Handler, prefetch: int) -> None:
        self.bus = bus
        self.queue = queue
        self.handler = handler
        self.prefetch = prefetch
        self.error: BusPermissionError | None = None
        self.reconnects = 0  # connections re-established after a loss (monitoring, tests)
        self.recv_tuned = False  # whether the current connection reads RECV_BYTES per recv (receive.py)
        self.broker_cancels = 0  # basic.cancel notifications received (queue deleted)
        self.resubscribes = 0  # consumes renewed after a broker cancel
        self._connected_once = False
        self._consuming = False  # basic.consume made on the current connection (``live``)
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
        self._counted: dict[tuple[str, str], int] = {}  # (user, transfer id) -> its share of _extra (I/O thread)
        self._user_counted: dict[str, int] = {}  # user -> the sum of its transfers' shares (I/O thread)
        # Credit (``_window``): delivered and settled (I/O thread), processed (worker, under the lock).
        self._delivered = self._settled = self._processed = 0
        self._backlog = 0
        self._backlog_lock = threading.Lock()
        self._size = float(bus.chunk_size)  # recent message size, biased to the largest (I/O thread)
        self._applied = 0  # the prefetch count last sent to the broker (I/O thread)
        self.backlog_peak = 0  # the largest backlog seen, bytes (monitoring, tests)
        self.capacity_refusals = 0  # transfers refused for reassembly capacity (each waits, then is requeued)
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
                self.recv_tuned = tune_receive(self._conn)  # frames in one or two reads, not 32 (receive.py)
                self._ch = self._conn.channel()
                self._gen += 1
                with self._ops_lock:  # operations for the old connection are void
                    self._ops.clear()
                    self._flush_scheduled = False
                self._extra = 0
                self._counted.clear()
                self._user_counted.clear()
                with self._backlog_lock:
                    self._delivered = self._settled = self._processed = self._backlog = self._applied = 0
                self._work.put(("reset", self._gen))
                what = f"setting prefetch on queue {self.queue!r}"
                self._apply_qos()
                what = f"consuming from queue {self.queue!r}"
                self._ch.add_on_cancel_callback(self._on_broker_cancel)
                self._ch.basic_consume(self.queue, self._on_message)
                self._consuming = True
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
                if not isinstance(e, TRANSIENT + (px.ChannelClosedByBroker,)):
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
        self._consuming = False

    def _resubscribe(self) -> None:
        """Consume again on the *same* channel after a broker cancel, so deliveries still
        unacked stay ours and are acked once (no redelivery, no duplicate work).

        RabbitMQ cancels a consumer whose queue is deleted (also a quorum queue: its
        leader moving is not a cancel), e.g. a re-provision that deletes and declares it
        again. The queue is looked for on a side channel, whose 404 would close this one,
        for up to ``resubscribe_timeout_s`` while acks and heartbeats go on; then the
        consume is made anyway, and its refusal (404: gone for good) stops us as before.
        A quorum queue can exist before its Raft member runs: RabbitMQ 3.10 then crashes the
        channel on this consume (541, ``rabbit_quorum_queue:consume`` noproc) and the
        connection is lost; the reconnect below consumes again, as after any loss.
        """
        deadline = time.monotonic() + self.bus.resubscribe_timeout_s
        waits = 0
        while not self._stop.is_set() and time.monotonic() < deadline and not self._queue_exists():
            self._conn.process_data_events(time_limit=backoff(waits, cap=1.0))
            waits += 1
        if self._stop.is_set():
            return
        self._ch.basic_consume(self.queue, self._on_message)
        self._consuming = True
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

    @property
    def live(self) -> bool:
        return self._consuming and not self._stop.is_set() and self.error is None

    def _close_conn(self) -> None:
        self._consuming = False
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
            count = self._window()
            if count != self._applied:
                self._ch.basic_qos(prefetch_count=count, global_qos=True)
                self._applied = count

    def _window(self) -> int:
        """``prefetch + _extra``, and never more than the lookahead past what the worker finished with
        (``protocol/transport/backlog.py``; the worker always drains, so this cannot deadlock)."""
        credit = self._processed - self._settled + lookahead(chunk_size=self.bus.chunk_size, prefetch=self.prefetch,
                                                             message_size=self._size)
        return max(1, min(_MAX_PREFETCH, self.prefetch + self._extra, credit))

    def _on_message(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        chunk = chunk_header_from_amqp(props.headers)
        if chunk is not None:
            key = transfer_key(props.user_id, chunk)
            if key not in self._counted:
                cap = self.bus.reassembly.get("max_user_chunks", MAX_USER_CHUNKS)
                n = window_chunks(chunk, cap) - 1
                if self._user_counted.get(key[0], 0) + n > cap:
                    n = 0  # over its user's cap: reassembly requeues it, and it is counted when it comes back
                self._counted[key] = n
                if n:
                    self._user_counted[key[0]] = self._user_counted.get(key[0], 0) + n
                    self._extra += n
                    if not self.bus.quorum:
                        self._apply_qos()
        self._delivered += 1
        self._size = max(float(len(body)), 0.9 * self._size)
        with self._backlog_lock:
            self._backlog += len(body)
            self.backlog_peak = max(self.backlog_peak, self._backlog)
        self._work.put(Raw(self._gen, method.delivery_tag, method.routing_key, method.redelivered, props, body, chunk))

    def _drained(self, gen: int, n: int) -> None:
        """Worker thread: one message of ``n`` bytes is spilled or handed on; its credit goes back to
        the broker with the I/O thread's next flush (never waited for here)."""
        with self._backlog_lock:
            if gen != self._gen:
                return
            self._processed += 1
            self._backlog -= n
        self._threadsafe(gen, lambda: None)  # the flush re-applies the window

    def _release(self, key: tuple[str, str] | None) -> None:
        """Give back the prefetch room counted for transfer ``key`` (once; later calls do nothing)."""
        n = self._counted.pop(key, 0) if key is not None else 0
        if n > 0:
            self._extra = max(0, self._extra - n)
            left = self._user_counted.get(key[0], 0) - n  # type: ignore[index]
            if left > 0:
                self._user_counted[key[0]] = left  # type: ignore[index]
            else:
                self._user_counted.pop(key[0], None)  # type: ignore[index]
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
        if ops and not self.bus.quorum and self._ch is not None and self._ch.is_open:
            self._apply_qos()  # settled and processed messages moved the credit

    def is_live(self, gen: int) -> bool:
        """Whether connection ``gen`` is the live one (tags of another are void on it)."""
        return gen == self._gen

    def settle(self, gen: int, tags: list[int], action: str, *, key: tuple[str, str] | None) -> None:
        """Ack or requeue (``action``) the messages ``tags`` of connection ``gen``, on the I/O thread."""
        def do() -> None:
            ch = self._ch
            if ch is None or not ch.is_open:
                return
            self._settled += len(tags)
            if not self.bus.quorum:
                self._apply_qos()  # the window shrinks first: the room these free is not the broker's to fill
            for t in tags:
                if action == "ack":
                    ch.basic_ack(t)
                else:
                    ch.basic_nack(t, requeue=True)
            self._release(key)

        self._threadsafe(gen, do)

    def dead_letter(
        self, gen: int, raws: list[Raw], body: bytes, headers: dict[str, Any], reason: str, *,
        message_id: str, routing_key: str, user_id: str | None, key: tuple[str, str] | None,
    ) -> None:
        """Publish a copy of the frame to the dead-letter exchange with ``reason``, then ack
        ``raws``; without write permission there, reject them to the queue's own DLX."""
        dl_headers = {**headers, REASON_HEADER: reason, QUEUE_HEADER: self.queue}
        if user_id:
            dl_headers[USER_HEADER] = user_id
        try:
            self.bus.publisher.publish(DLX, routing_key, body, message_id=message_id, headers=dl_headers)
        except BusPermissionError as e:
            # No write permission on fedbus.dlx: let the queue dead-letter it (the broker
            # needs no permission for that), losing only the reason header.
            log.error("cannot publish to the dead-letter exchange; rejecting without reason header",
                      reason=reason, message_id=message_id, error=str(e))

            def reject() -> None:
                ch = self._ch
                if ch is not None and ch.is_open:
                    self._settled += len(raws)
                    if not self.bus.quorum:
                        self._apply_qos()
                    for r in raws:
                        ch.basic_reject(r.tag, requeue=False)
                    self._release(key)

            self._threadsafe(gen, reject)
            return
        self.settle(gen, [r.tag for r in raws], "ack", key=key)

    # -- worker thread ----------------------------------------------------------------------
    def _work_loop(self) -> None:
        reasm = Reassembler(**self.bus.reassembly, spill=True)
        holds: dict[tuple[str, str], TransferHold] = {}  # (broker-verified user, transfer id) -> chunks
        deferred: dict[tuple[str, str], Deferred] = {}  # refused for capacity: requeued once due
        refusals: dict[tuple[str, str], int] = {}  # capacity refusals per transfer (its backoff doubles)
        returning: dict[tuple[str, str], Returning] = {}  # requeued with room kept for them, not yet back
        gen = 0
        taken: tuple[int, int] | None = None  # (connection, bytes) of the message handled last
        while True:
            if taken is not None:
                self._drained(*taken)
                taken = None
            try:
                item = self._work.get(timeout=until_due(deferred))
            except queue_mod.Empty:
                item = None
            if item is _STOP:
                return
            if deferred:
                self._requeue_due(deferred, returning, reasm)
            if holds:
                for user, tid in reasm.expire_transfers():
                    h = holds.pop((user or "", tid), None)
                    if h:
                        self._drop_transfer(h, f"{ChunkError.reason}: transfer {tid} timed out after {reasm.timeout_s}s waiting for missing chunks")
            if item is None:
                continue
            if isinstance(item, tuple) and item[0] == "reset":
                gen = item[1]
                reasm = Reassembler(**self.bus.reassembly, spill=True)
                holds.clear()
                deferred.clear()  # their tags died with the connection: the broker redelivers them
                refusals.clear()
                returning.clear()
                continue
            raw: Raw = item
            taken = (raw.gen, len(raw.body))
            if raw.gen != gen or raw.gen != self._gen:
                continue  # from a lost connection: the broker redelivers it
            if raw.chunk is None:
                self._call(AmqpDelivery(self, [raw], raw.body))
                continue
            user = raw.props.user_id
            key = (user or "", str(raw.chunk.get("transfer_id")))
            returning.pop(key, None)  # back: admitted or refused by the reassembler from here on
            if key in deferred:  # refused for capacity: keep the tag, never the bytes, until its requeue
                raw.body = b""
                deferred[key].raws.append(raw)
                continue
            hold = holds.setdefault(key, TransferHold())
            hold.raws.append(raw)
            try:
                whole = reasm.add(raw.chunk, raw.body, user=user)
            except ChunkCapacity as e:  # no room now: give the chunks back later, the transfer is retried
                holds.pop(key, None)
                reasm.discard(key[1], user=user)
                # Never wait here: the admitted transfers' chunks queue up behind this thread (backlog.py).
                if len(refusals) > MAX_REFUSALS_KEPT:  # transfers that never came back: forget their counts
                    refusals.clear()
                n = refusals[key] = refusals.get(key, 0) + 1
                self.capacity_refusals += 1
                wait = capacity_backoff_s(n)
                log.info("chunked transfer requeued for capacity", reason=str(e), queue=self.queue, user=user,
                         retry_in_s=wait)
                for r in hold.raws:
                    r.body = b""
                deferred[key] = Deferred(due=time.monotonic() + wait, total=int(raw.chunk.get("total_size", 0)),
                                         count=int(raw.chunk.get("count", 1)), raws=hold.raws)
                continue
            except ChunkError as e:
                holds.pop(key, None)
                refusals.pop(key, None)
                reasm.discard(key[1], user=user)
                self._drop_transfer(hold, f"{e.reason}: {e}")
                continue
            if reasm.last_view is not None:
                raw.body = reasm.last_view  # the chunk's bytes now live in the transfer's one buffer
            if whole is None:
                continue
            holds.pop(key, None)
            refusals.pop(key, None)
            hold.raws.sort(key=lambda r: r.chunk["index"] if r.chunk else 0)
            delivery = AmqpDelivery(self, hold.raws, whole)
            delivery.frame_sha256 = reasm.last_sha256  # verified by ``add`` before it returned ``whole``
            self._call(delivery)
            del delivery
            whole = None  # else this thread keeps the last update's map (read: resident) while it waits

    def _requeue_due(self, deferred: dict[tuple[str, str], Deferred], returning: dict[tuple[str, str], Returning],
                     reasm: Reassembler) -> None:
        """Requeue the chunks of the deferred transfers ``due_to_requeue`` picks (``backlog.py``); the
        window room of each is counted again when it comes back."""
        for key, d in due_to_requeue(deferred, returning, reasm):
            for i, r in enumerate(d.raws):
                self.settle(r.gen, [r.tag], "requeue", key=key if i == 0 else None)

    def _drop_transfer(self, hold: TransferHold, reason: str) -> None:
        """Dead-letter every chunk held for a broken transfer, each with the reason."""
        log.warning("chunked transfer dead-lettered", reason=reason, queue=self.queue, chunks=len(hold.raws))
        first = hold.raws[0] if hold.raws else None
        key = transfer_key(first.props.user_id, first.chunk) if first is not None and first.chunk else None
        for i, r in enumerate(hold.raws):
            try:
                self.dead_letter(
                    r.gen, [r], r.body.read() if isinstance(r.body, SpilledChunk) else r.body, orphan_chunk_headers(r.props.headers, reason, self.queue), reason,
                    message_id=r.props.message_id or "", routing_key=r.routing_key, user_id=r.props.user_id,
                    key=key if i == 0 else None,
                )
            except BusError:
                log.exception("could not dead-letter a chunk; it stays unacked and is redelivered later")

    def _call(self, d: AmqpDelivery) -> None:
        call_handler(self.handler, d, queue=self.queue, log=log)

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
