"""A consumer the broker cancels resubscribes, and no work is lost or done twice (issue 14).

What RabbitMQ actually sends (3.10, measured with pika, which presents the
``consumer_cancel_notify`` capability): deleting the queue a consumer reads sends it
``basic.cancel``, for classic and quorum queues alike; acking a delivery of the deleted
queue afterwards on the same channel is accepted. A quorum queue's leader moving is
*not* a cancel (the channel follows the new leader; see tests/cluster). So the cancel
that happens to a federation is its queue deleted and declared again (a re-provision):
the consumer must consume again once the queue is back, on the same channel, so the
delivery it holds is acked once and not redelivered.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pika
import pytest

from protocol.transport import Delivery, open_bus

pytestmark = pytest.mark.broker


class _Admin:
    """A plain pika connection that declares and deletes the test's queue."""

    def __init__(self, url: str, quorum: bool) -> None:
        self.conn = pika.BlockingConnection(pika.URLParameters(url))
        self.ch = self.conn.channel()
        self.quorum = quorum
        self.arguments = {"x-queue-type": "quorum"} if quorum else {}

    def declare(self, queue: str) -> None:
        self.ch.queue_declare(queue, durable=True, arguments=self.arguments)

    def delete(self, queue: str) -> None:
        self.ch.queue_delete(queue)

    def ready(self, queue: str) -> int:
        return int(self.ch.queue_declare(queue, passive=True).method.message_count)


@pytest.fixture(params=["classic", "quorum"])
def queue(request: pytest.FixtureRequest, amqp_url: str) -> Iterator[tuple[str, _Admin]]:
    admin = _Admin(amqp_url, quorum=request.param == "quorum")
    name = f"fedbus-test-cancel-{request.param}-{uuid.uuid4().hex[:10]}"
    admin.declare(name)
    yield name, admin
    admin.delete(name)
    admin.conn.close()


def _until(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not pred():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        tick.wait(0.05)


def test_queue_deleted_and_declared_again_under_a_consumer(amqp_url: str, queue: tuple[str, _Admin]) -> None:
    name, admin = queue
    ids = [f"m{i}-{uuid.uuid4().hex[:6]}" for i in range(10)]
    handled: list[tuple[str, bool]] = []
    lock = threading.Lock()
    in_hand, release = threading.Event(), threading.Event()

    def handler(d: Delivery) -> None:
        if d.message_id == ids[0]:  # the task in progress while the queue goes away
            in_hand.set()
            assert release.wait(60)
        with lock:
            handled.append((d.message_id, d.redelivered))
        d.ack()

    bus = open_bus(amqp_url, quorum=admin.quorum)  # quorum queues take per-consumer prefetch only
    try:
        c = bus.consume(name, handler, prefetch=1)
        bus.publish("", name, b"0", message_id=ids[0])
        assert in_hand.wait(20)
        admin.delete(name)
        _until(lambda: c.broker_cancels == 1, 20, "the broker's basic.cancel")  # type: ignore[attr-defined]
        admin.declare(name)  # back, empty: the consumer finds it and consumes again
        for i, mid in enumerate(ids[1:], 1):
            bus.publish("", name, str(i).encode(), message_id=mid)
        release.set()  # the held task finishes now and is acked on the same channel
        _until(lambda: len(handled) >= len(ids), 30, "every message handled")
        assert c.error is None  # type: ignore[attr-defined]
        # A classic queue: the consume is renewed on the same channel. A quorum queue declared
        # again can exist before its Raft member runs; RabbitMQ 3.10 then crashes the channel on
        # our consume (541 INTERNAL_ERROR, rabbit_quorum_queue:consume {error,noproc} in its log)
        # and the recovery is an ordinary reconnect. Either way nothing is lost or done twice.
        expected = {(1, 0), (0, 1)} if admin.quorum else {(1, 0)}
        assert (c.resubscribes, c.reconnects) in expected  # type: ignore[attr-defined]
    finally:
        release.set()
        bus.close()  # anything still unacked would go back to the queue now
    counts = Counter(mid for mid, _ in handled)
    assert sorted(counts) == sorted(ids) and set(counts.values()) == {1}, counts  # each exactly once
    assert not any(redelivered for _, redelivered in handled)
    assert admin.ready(name) == 0  # nothing left behind, nothing handed back unacked
