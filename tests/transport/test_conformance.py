"""The Bus contract, run against the in-memory bus and RabbitMQ (``bus_url`` fixture)."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from protocol.errors import ChunkError
from protocol.transport import BusPermissionError, Delivery, PublishError, open_bus
from protocol.transport.layout import CHUNK_HEADERS, QUEUE_HEADER
from protocol.transport.topology import CONTROL, DEAD, REASON_HEADER, TASKS, UPDATES, site_queue, updates_queue
from tests.transport.conftest import Collector, Net, ack, new_id


def read_dead_letter(net: Net, message_id: str, timeout: float = 20.0) -> Delivery:
    """Wait for ``message_id`` in fedbus.dead, ack it, leave every other dead letter there."""
    found = threading.Event()
    box: list[Delivery] = []

    def handler(d: Delivery) -> None:
        if d.message_id == message_id and not found.is_set():
            box.append(d)
            d.ack()
            found.set()
        # others: left unsettled; cancelling the consumer gives them back

    bus = net.open()
    c = bus.consume(DEAD, handler, prefetch=1000)
    try:
        assert found.wait(timeout), f"{message_id} did not reach {DEAD}"
    finally:
        c.cancel()
    return box[0]


def test_publish_consume_ack(net: Net) -> None:
    ids = [new_id() for _ in range(5)]
    for i, mid in enumerate(ids):
        net.bus.publish(TASKS, net.site, f"frame-{i}".encode(), message_id=mid, headers={"k": i})
    col = Collector(ack)
    c = net.bus.consume(site_queue(net.site), col, prefetch=2)
    assert col.wait_count(5)
    c.cancel()
    assert col.ids() == ids  # FIFO
    assert col.bodies == [f"frame-{i}".encode() for i in range(5)]
    d = col.deliveries[0]
    assert d.routing_key == net.site and d.queue == site_queue(net.site)
    assert d.headers.get("k") == 0 and d.redelivered is False
    if net.url.startswith("amqp"):
        assert d.user_id == "guest"  # the broker-vouched sender

    # Acked messages are gone: a new consumer sees only what is published next.
    sentinel = new_id()
    net.bus.publish(TASKS, net.site, b"next", message_id=sentinel)
    col2 = Collector(ack)
    c2 = net.bus.consume(site_queue(net.site), col2)
    assert col2.wait_count(1)
    c2.cancel()
    assert col2.ids() == [sentinel]


def test_routing_by_key(net: Net) -> None:
    other = net.open()
    mid_u, mid_c = new_id(), new_id()
    other.publish(UPDATES, net.fed, b"update", message_id=mid_u)
    other.publish(CONTROL, net.fed, b"hello", message_id=mid_c)
    col = Collector(ack)
    c = net.bus.consume(updates_queue(net.fed), col)
    assert col.wait_count(1)
    c.cancel()
    assert col.ids() == [mid_u] and col.bodies == [b"update"]


def test_nack_dead_letters_with_reason(net: Net) -> None:
    mid = new_id()
    net.bus.publish(TASKS, net.site, b"bad frame", message_id=mid, headers={"app": "x"})
    col = Collector(lambda d: d.nack("bad_signature: frame signed by unknown key"))
    c = net.bus.consume(site_queue(net.site), col)
    assert col.wait_count(1)
    c.cancel()
    dead = read_dead_letter(net, mid)
    assert bytes(dead.body) == b"bad frame"
    assert dead.headers[REASON_HEADER] == "bad_signature: frame signed by unknown key"
    assert dead.headers[QUEUE_HEADER] == site_queue(net.site)
    assert dead.headers["app"] == "x"


def test_handler_exception_dead_letters(net: Net) -> None:
    mid = new_id()
    net.bus.publish(TASKS, net.site, b"boom", message_id=mid)

    def explode(d: Delivery) -> None:
        raise ValueError("cannot parse")

    col = Collector(explode)
    c = net.bus.consume(site_queue(net.site), col)
    dead = read_dead_letter(net, mid)
    c.cancel()
    assert dead.headers[REASON_HEADER].startswith("handler_error: ValueError: cannot parse")


def test_requeue_redelivers(net: Net) -> None:
    mid = new_id()
    net.bus.publish(TASKS, net.site, b"again", message_id=mid)
    col = Collector(lambda d: d.requeue() if not d.redelivered else d.ack())
    c = net.bus.consume(site_queue(net.site), col)
    assert col.wait_count(2)
    c.cancel()
    assert col.ids() == [mid, mid]
    assert [d.redelivered for d in col.deliveries] == [False, True]


@pytest.mark.parametrize("how", ["cancel", "close_bus"])
def test_consumer_dies_before_ack_redelivered_to_next(net: Net, how: str) -> None:
    mid = new_id()
    net.bus.publish(TASKS, net.site, b"task", message_id=mid)
    dying_bus = net.open()
    first = Collector()  # never acks
    c1 = dying_bus.consume(site_queue(net.site), first)
    assert first.wait_count(1)
    second = Collector(ack)
    c2 = net.bus.consume(site_queue(net.site), second)  # standby until the first goes away
    if how == "cancel":
        c1.cancel()
    else:
        dying_bus.close()
    assert second.wait_count(1)
    c2.cancel()
    assert second.ids() == [mid] and second.bodies == [b"task"]
    assert second.deliveries[0].redelivered is True
    assert first.deliveries[0].redelivered is False


def test_publish_to_missing_exchange_is_refused(net: Net) -> None:
    with pytest.raises(PublishError, match="does not exist|NOT_FOUND"):
        net.bus.publish(f"no.such.exchange.{new_id()}", "x", b"x", message_id=new_id())
    # The bus stays usable after a refusal.
    net.bus.publish(TASKS, net.site, b"ok", message_id=new_id())


def test_unroutable_publish_is_refused(net: Net) -> None:
    with pytest.raises(PublishError, match="unroutable|NO_ROUTE|no queue"):
        net.bus.publish(TASKS, f"unknown-site-{new_id()}", b"x", message_id=new_id())


def test_consume_missing_queue_is_a_permission_error(net: Net) -> None:
    with pytest.raises(BusPermissionError, match="NOT_FOUND"):
        net.bus.consume(f"fedbus.site.nobody-{new_id()}", ack)


def test_chunked_frame_through_prefetch_one(net: Net) -> None:
    """A frame of 6 chunks and small frames around it pass a prefetch=1 consumer whole."""
    bus = net.open(chunk_size=1 << 20)
    big = os.urandom(5 * (1 << 20) + 123)
    ids = [new_id() for _ in range(3)]
    bus.publish(TASKS, net.site, b"small-1", message_id=ids[0])
    bus.publish(TASKS, net.site, big, message_id=ids[1])
    bus.publish(TASKS, net.site, b"small-2", message_id=ids[2])
    col = Collector(ack)
    c = bus.consume(site_queue(net.site), col, prefetch=1)
    assert col.wait_count(3, timeout=30)
    c.cancel()
    assert col.ids() == ids
    assert hashlib.sha256(col.bodies[1]).digest() == hashlib.sha256(big).digest()
    assert not any(k in col.deliveries[1].headers for k in CHUNK_HEADERS.values())
    # The reassembled frame carries the sha256 its bus verified as the chunks came; a frame that
    # travelled whole carries none (its receiver hashes it, as it is small).
    assert col.deliveries[1].frame_sha256 == hashlib.sha256(big).hexdigest()
    assert col.deliveries[0].frame_sha256 is None
    if net.url.startswith("amqp"):  # each read takes up to two frames, not pika's 4 KiB (transport/receive.py)
        assert getattr(c, "recv_tuned", None) is True


def test_consumer_dies_mid_transfer_loses_nothing(net: Net) -> None:
    """Chunks stay unacked until the whole frame is acked, so they are redelivered."""
    bus = net.open(chunk_size=256 * 1024)
    big = os.urandom(2 * (1 << 20))
    mid = new_id()
    bus.publish(TASKS, net.site, big, message_id=mid)
    dying = net.open(chunk_size=256 * 1024)
    first = Collector()  # gets the whole frame, never acks
    dying.consume(site_queue(net.site), first)
    assert first.wait_count(1)
    dying.close()
    second = Collector(ack)
    c2 = bus.consume(site_queue(net.site), second)
    assert second.wait_count(1)
    c2.cancel()
    assert second.bodies == [big] and second.deliveries[0].redelivered is True


def test_nack_of_chunked_frame_dead_letters_whole_body(net: Net) -> None:
    bus = net.open(chunk_size=128 * 1024)
    big = os.urandom(600 * 1024)
    mid = new_id()
    bus.publish(TASKS, net.site, big, message_id=mid)
    col = Collector(lambda d: d.nack("limit_exceeded: too many arrays"))
    c = bus.consume(site_queue(net.site), col)
    assert col.wait_count(1)
    c.cancel()
    dead = read_dead_letter(net, mid)
    assert bytes(dead.body) == big
    assert dead.headers[REASON_HEADER] == "limit_exceeded: too many arrays"


def test_corrupt_chunk_is_dead_lettered_with_reason(net: Net) -> None:
    """Chunks whose reassembled sha256 does not match never reach the handler."""
    mid, tid = new_id(), new_id()
    header = {
        CHUNK_HEADERS["transfer_id"]: tid,
        CHUNK_HEADERS["count"]: 2,
        CHUNK_HEADERS["sha256"]: hashlib.sha256(b"hello world").hexdigest(),
        CHUNK_HEADERS["total_size"]: 11,
    }
    net.bus.publish(TASKS, net.site, b"hello ", message_id=mid, headers={**header, CHUNK_HEADERS["index"]: 0})
    net.bus.publish(TASKS, net.site, b"wXrld", message_id=mid, headers={**header, CHUNK_HEADERS["index"]: 1})
    ok = new_id()
    net.bus.publish(TASKS, net.site, b"fine", message_id=ok)
    col = Collector(ack)
    c = net.bus.consume(site_queue(net.site), col)
    assert col.wait_count(1)
    c.cancel()
    assert col.ids() == [ok]
    dead = read_dead_letter(net, mid)
    assert dead.headers[REASON_HEADER].startswith(f"{ChunkError.reason}: ")
    assert "sha256 mismatch" in dead.headers[REASON_HEADER]
    assert not any(k in dead.headers for k in CHUNK_HEADERS.values())  # never reassembled again


def test_many_messages_prefetch_many(net: Net) -> None:
    n = 300
    ids = [new_id() for _ in range(n)]
    for mid in ids:
        net.bus.publish(TASKS, net.site, mid.encode(), message_id=mid)
    col = Collector(ack)
    c = net.bus.consume(site_queue(net.site), col, prefetch=16)
    assert col.wait_count(n)
    c.cancel()
    assert col.ids() == ids


def test_closed_bus_refuses_use(bus_url: str) -> None:
    bus = open_bus(bus_url)
    bus.close()
    with pytest.raises(Exception, match="closed"):
        bus.publish(TASKS, "x", b"x", message_id=new_id())


def test_incomplete_transfer_expires_to_dead_letters(net: Net) -> None:
    """A transfer whose other chunks never come (publisher died) is dead-lettered on timeout."""
    bus = net.open(reassembly_timeout_s=0.5)
    mid = new_id()
    header = {
        CHUNK_HEADERS["transfer_id"]: new_id(),
        CHUNK_HEADERS["index"]: 0,
        CHUNK_HEADERS["count"]: 3,
        CHUNK_HEADERS["sha256"]: "0" * 64,
        CHUNK_HEADERS["total_size"]: 30,
    }
    net.bus.publish(TASKS, net.site, b"x" * 10, message_id=mid, headers=header)
    col = Collector(ack)
    c = bus.consume(site_queue(net.site), col)
    dead = read_dead_letter(net, mid)
    later = new_id()
    net.bus.publish(TASKS, net.site, b"after", message_id=later)
    assert col.wait_count(1)
    c.cancel()
    assert col.ids() == [later]  # the consumer went on
    assert "timed out" in dead.headers[REASON_HEADER] and dead.headers["x-fedbus-chunk"].endswith("chunk 0 of 3")
