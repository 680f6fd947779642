"""RabbitMQ under stress: message size limit, lost connections, a broker restart."""

from __future__ import annotations

import hashlib
import os
import re
import threading
import uuid
from collections.abc import Iterator
from urllib.parse import unquote, urlsplit

import pytest

from protocol.transport import Bus, PublishError, Topology, open_bus
from protocol.transport.topology import TASKS, control_queue, site_queue, updates_queue
from tests.conftest import rabbitmqctl
from tests.transport.conftest import Collector, ack, new_id

pytestmark = pytest.mark.broker


@pytest.fixture
def topo(amqp_url: str, local_broker: str) -> Iterator[tuple[str, str]]:
    tag = uuid.uuid4().hex[:10]
    site, fed = f"site-{tag}", f"fed-{tag}"
    admin = open_bus(amqp_url)
    admin.declare(Topology(sites=[site], federations=[fed]))
    yield site, fed
    for q in (site_queue(site), updates_queue(fed), control_queue(fed)):
        admin.delete_queue(q)  # type: ignore[attr-defined]
    admin.close()


@pytest.fixture
def max_message_16mib(local_broker: str) -> Iterator[None]:
    """Set RabbitMQ 4.x's default max_message_size (16 MiB) and restore the old value."""
    old = rabbitmqctl("eval", "application:get_env(rabbit, max_message_size).").strip()
    rabbitmqctl("eval", "application:set_env(rabbit, max_message_size, 16777216).")
    try:
        yield
    finally:
        m = re.match(r"\{ok,\s*(\d+)\}", old)
        if m:
            rabbitmqctl("eval", f"application:set_env(rabbit, max_message_size, {m.group(1)}).")
        else:
            rabbitmqctl("eval", "application:unset_env(rabbit, max_message_size).")


@pytest.mark.slow
def test_60mb_frame_crosses_a_16mib_broker(amqp_url: str, topo: tuple[str, str], max_message_16mib: None) -> None:
    site, _ = topo
    body = os.urandom(60 * 10**6)
    unchunked = open_bus(amqp_url, chunk_size=64 * 2**20)
    try:
        with pytest.raises(PublishError, match="PRECONDITION_FAILED|larger than"):
            unchunked.publish(TASKS, site, body[: 20 * 2**20], message_id=new_id())  # the limit is real
    finally:
        unchunked.close()
    bus = open_bus(amqp_url)  # default chunk size: 8 MiB
    try:
        mid = new_id()
        bus.publish(TASKS, site, body, message_id=mid)
        col = Collector(ack)
        c = bus.consume(site_queue(site), col, prefetch=1)
        assert col.wait_count(1, timeout=60)
        c.cancel()
        assert col.ids() == [mid]
        assert hashlib.sha256(col.bodies[0]).digest() == hashlib.sha256(body).digest()
        assert col.deliveries[0].chunks == 8  # type: ignore[attr-defined]
    finally:
        bus.close()


class _Run:
    """A consumer that dedupes by message id and a publisher, around a broker fault."""

    def __init__(self, url: str, site: str, n: int) -> None:
        self.url, self.site, self.n = url, site, n
        self.ids = [new_id() for _ in range(n)]
        self.seen: set[str] = set()
        self.deliveries = 0
        self.cond = threading.Condition()
        self.half = threading.Event()
        self.go_on = threading.Event()
        self.error: BaseException | None = None
        self.pub: Bus = open_bus(url, reconnect_max_s=1.0, publish_timeout_s=60)
        self.sub: Bus = open_bus(url, reconnect_max_s=1.0)

    def handle(self, d) -> None:  # type: ignore[no-untyped-def]
        with self.cond:
            self.deliveries += 1
            self.seen.add(d.message_id)
            self.cond.notify_all()
        d.ack()

    def publish_all(self) -> None:
        try:
            for i, mid in enumerate(self.ids):
                if i == self.n // 2:
                    self.half.set()
                    self.go_on.wait(60)
                self.pub.publish(TASKS, self.site, mid.encode(), message_id=mid)
        except BaseException as e:  # reported by the test
            self.error = e

    def run(self, fault) -> None:  # type: ignore[no-untyped-def]
        c = self.sub.consume(site_queue(self.site), self.handle, prefetch=8)
        t = threading.Thread(target=self.publish_all)
        t.start()
        try:
            assert self.half.wait(30)
            fault(self)
            t.join(90)
            assert not t.is_alive() and self.error is None, f"publisher failed: {self.error!r}"
            with self.cond:
                ok = self.cond.wait_for(lambda: self.seen >= set(self.ids), timeout=60)
            assert ok, f"missing {len(set(self.ids) - self.seen)} of {self.n} messages"
            assert self.seen == set(self.ids)  # every message, after de-duplication by id
            assert self.pub.reconnects >= 1 and c.reconnects >= 1  # both really lost the broker
        finally:
            self.go_on.set()
            c.cancel()
            self.pub.close()
            self.sub.close()


def _vhost(url: str) -> str:
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def test_connections_closed_by_broker_reconnect(amqp_url: str, topo: tuple[str, str]) -> None:
    site, _ = topo
    r = _Run(amqp_url, site, 200)

    def kill(run: _Run) -> None:
        # Only this session's vhost: other users of the broker keep their connections.
        rabbitmqctl("close_all_connections", "-p", _vhost(amqp_url), "test")
        run.go_on.set()  # the publisher's next publish meets a dead connection

    r.run(kill)


@pytest.mark.slow
def test_broker_restart_while_publishing_and_consuming(amqp_url: str, topo: tuple[str, str]) -> None:
    site, _ = topo
    r = _Run(amqp_url, site, 200)

    def restart(run: _Run) -> None:
        rabbitmqctl("stop_app")  # the whole node: other connections notice too
        try:
            run.go_on.set()  # publishes now wait for the broker, reconnecting with backoff
        finally:
            rabbitmqctl("start_app")

    r.run(restart)


@pytest.mark.slow
def test_quorum_queues_pass_chunked_frames_with_prefetch_one(local_broker: str) -> None:
    """Quorum queues refuse channel-wide prefetch; the per-consumer fallback must not deadlock."""
    vhost = f"fedbus-test-quorum-{uuid.uuid4().hex[:8]}"  # fedbus.dead must be quorum here too
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, urlsplit(local_broker).username or "guest", ".*", ".*", ".*")
    site = f"site-q-{uuid.uuid4().hex[:10]}"
    p = urlsplit(local_broker)
    bus = open_bus(f"{p.scheme}://{p.netloc}/{vhost}", quorum=True, chunk_size=1 << 20)
    try:
        bus.declare(Topology(sites=[site]))
        big = os.urandom(5 * (1 << 20) + 7)
        ids = [new_id(), new_id(), new_id()]
        bus.publish(TASKS, site, big, message_id=ids[0])
        bus.publish(TASKS, site, b"small", message_id=ids[1])
        bus.publish(TASKS, site, big[::-1], message_id=ids[2])
        col = Collector(ack)
        c = bus.consume(site_queue(site), col, prefetch=1)
        assert col.wait_count(3, timeout=30)
        c.cancel()
        assert col.ids() == ids and col.bodies == [big, b"small", big[::-1]]
    finally:
        bus.close()
        rabbitmqctl("delete_vhost", vhost, check=False)


def test_queue_deleted_under_consumer_stops_it_with_clear_error(amqp_url: str, topo: tuple[str, str]) -> None:
    site, _ = topo
    bus = open_bus(amqp_url, resubscribe_timeout_s=1)  # it waits this long for the queue to come back
    try:
        c = bus.consume(site_queue(site), ack)
        bus.delete_queue(site_queue(site))  # type: ignore[attr-defined]
        c._io.join(30)  # type: ignore[attr-defined]  # the consumer stops by itself
        assert not c._io.is_alive()  # type: ignore[attr-defined]
        assert "NOT_FOUND" in str(c.error) and site_queue(site) in str(c.error)  # type: ignore[attr-defined]
    finally:
        bus.close()
        admin = open_bus(amqp_url)
        admin.declare(Topology(sites=[site]))  # so the fixture's teardown finds it
        admin.close()


@pytest.mark.slow
def test_long_handler_does_not_starve_heartbeats(amqp_url: str, topo: tuple[str, str]) -> None:
    """The handler runs off pika's I/O thread: with 1 s heartbeats, a 4 s handler (and an
    idle publisher) keep their connections."""
    site, _ = topo
    bus = open_bus(amqp_url, heartbeat=1)
    try:
        first, second = new_id(), new_id()
        bus.publish(TASKS, site, b"long task", message_id=first)
        work = threading.Event()  # never set: the handler "trains" for 4 s

        def slow(d) -> None:  # type: ignore[no-untyped-def]
            if d.message_id == first:
                work.wait(4.0)
            d.ack()

        col = Collector(slow)
        c = bus.consume(site_queue(site), col)
        assert col.wait_count(1, timeout=30)
        bus.publish(TASKS, site, b"next", message_id=second)  # the publisher idled 4 s
        assert col.wait_count(2, timeout=30)
        c.cancel()
        assert col.ids() == [first, second]
        assert [d.redelivered for d in col.deliveries] == [False, False]
        assert c.reconnects == 0 and bus.reconnects == 0  # type: ignore[attr-defined]
    finally:
        bus.close()
