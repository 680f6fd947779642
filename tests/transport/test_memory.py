"""In-memory bus specifics: named brokers, inspection, option checks."""

from __future__ import annotations

import uuid

import pytest

from protocol.transport import BusPermissionError, PublishError, Topology, open_bus
from protocol.transport.memory import drop_broker, get_broker
from protocol.transport.topology import TASKS, site_queue
from tests.transport.conftest import Collector, ack, new_id


@pytest.fixture
def name() -> str:
    n = f"t-{uuid.uuid4().hex[:10]}"
    yield n
    drop_broker(n)


def test_same_name_shares_a_broker_other_names_do_not(name: str) -> None:
    a, b = open_bus(f"memory://{name}"), open_bus(f"memory://{name}")
    a.declare(Topology(sites=["s"]))
    b.publish(TASKS, "s", b"shared", message_id=new_id())
    assert get_broker(name).queue_depth(site_queue("s")) == 1
    other = open_bus(f"memory://{name}-other")
    with pytest.raises(PublishError, match="does not exist"):
        other.publish(TASKS, "s", b"x", message_id=new_id())
    drop_broker(f"{name}-other")


def test_stores_a_copy_of_the_bytes(name: str) -> None:
    bus = open_bus(f"memory://{name}", user="site-1")
    bus.declare(Topology(sites=["s"]))
    body = bytearray(b"original")
    bus.publish(TASKS, "s", body, message_id=new_id())  # type: ignore[arg-type]
    body[:] = b"mutated!"
    col = Collector(ack)
    c = bus.consume(site_queue("s"), col)
    assert col.wait_count(1)
    c.cancel()
    assert col.bodies == [b"original"] and col.deliveries[0].user_id == "site-1"


def test_dead_letters_are_inspectable(name: str) -> None:
    bus = open_bus(f"memory://{name}", chunk_size=100)
    bus.declare(Topology(sites=["s"]))
    mid = new_id()
    bus.publish(TASKS, "s", b"z" * 1000, message_id=mid)
    col = Collector(lambda d: d.nack("wrong_round: expected 3, got 2"))
    c = bus.consume(site_queue("s"), col)
    assert col.wait_count(1)
    c.cancel()
    (dead,) = get_broker(name).dead_letters()
    assert (dead.message_id, dead.reason, dead.queue, dead.body) == (
        mid, "wrong_round: expected 3, got 2", site_queue("s"), b"z" * 1000
    )


def test_redeclare_with_other_arguments_is_refused(name: str) -> None:
    bus = open_bus(f"memory://{name}")
    bus.declare(Topology(sites=["s"]))
    bus.declare(Topology(sites=["s"]))  # idempotent
    with pytest.raises(BusPermissionError, match="PRECONDITION_FAILED"):
        bus.declare(Topology(sites=["s"], quorum=True))


def test_options_are_checked() -> None:
    with pytest.raises(TypeError, match="unknown option"):
        open_bus("memory://x", chunksize=5)
    with pytest.raises(ValueError, match="chunk_size"):
        open_bus("memory://x", chunk_size=0)
    with pytest.raises(ValueError, match="unsupported broker URL"):
        open_bus("kafka://x")
    open_bus("memory://x", tls=None, heartbeat=30).close()  # AMQP-only options are ignored
    drop_broker("x")


def test_double_settle_is_an_error(name: str) -> None:
    bus = open_bus(f"memory://{name}")
    bus.declare(Topology(sites=["s"]))
    bus.publish(TASKS, "s", b"x", message_id=new_id())
    errors: list[Exception] = []

    def twice(d) -> None:  # type: ignore[no-untyped-def]
        d.ack()
        try:
            d.ack()
        except Exception as e:
            errors.append(e)

    col = Collector(twice)
    c = bus.consume(site_queue("s"), col)
    assert col.wait_count(1)
    c.cancel()
    assert len(errors) == 1 and "already" in str(errors[0])
