"""The dead-letters twin over a real broker: what sits in fedbus.dead for the federation, with reasons."""

from __future__ import annotations

import threading
import time
import uuid
from urllib.parse import urlsplit

import pytest

from coordinator.state import StateStore
from protocol.transport import Topology, open_bus
from protocol.transport.dead_letters import DeadLetters
from protocol.transport.topology import UPDATES, updates_queue
from tests.dashboard.test_api import client


@pytest.mark.broker
def test_dead_letters_of_the_federation_with_their_reasons(tmp_path, amqp_url):
    state = tmp_path / "coordinator"
    StateStore(state).close()  # the page reads the broker, not the state: an empty one will do
    fed = f"dash-{uuid.uuid4().hex[:8]}"
    bus = open_bus(amqp_url)
    try:
        bus.declare(Topology(federations=[fed]))
        # The suite's vhost is shared: earlier tests (the chunk-jam fuzz) leave thousands of dead
        # letters, and the page browses the first MAX_BROWSE only. Start from an empty queue.
        import pika

        from protocol.transport.topology import DEAD

        conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        try:
            conn.channel().queue_purge(DEAD)
        finally:
            conn.close()
        ids = [uuid.uuid4().hex for _ in range(2)]
        for mid in ids:
            bus.publish(UPDATES, fed, b"not a frame", message_id=mid)
        reasons = iter(["bad_signature: unknown signer", "malformed: not msgpack"])
        done = threading.Event()
        seen = []

        def reject(d):
            d.nack(next(reasons))
            seen.append(d)
            if len(seen) == 2:
                done.set()

        consumer = bus.consume(updates_queue(fed), reject, prefetch=10)
        assert done.wait(30), "the broker did not deliver the two messages"
        consumer.cancel()
        # A nack publishes the dead letter (confirmed) on the connection's I/O thread, after the
        # callback returned: wait, bounded, until both have reached the dead-letter queue.
        page = client(state, broker=amqp_url, federation=fed)
        deadline = time.monotonic() + 30
        doc = page.get("/api/dead-letters").json()
        while len(doc.get("letters", [])) < 2 and time.monotonic() < deadline:
            threading.Event().wait(0.1)
            doc = page.get("/api/dead-letters").json()
        assert doc["available"] is True and doc["federation"] == fed, doc
        assert [(d["message_id"], d["reason"]) for d in doc["letters"]] == list(
            zip(ids, ["bad_signature: unknown signer", "malformed: not msgpack"])), doc
        password = urlsplit(amqp_url).password
        assert not password or f":{password}@" not in doc["broker"]  # the page never shows the broker password
        again = client(state, broker=amqp_url, federation=fed).get("/api/dead-letters").json()
        assert [d["message_id"] for d in again["letters"]] == ids, again  # looking removed nothing
    finally:
        DeadLetters(bus, fed, timeout_s=20).purge()
        bus.close()
