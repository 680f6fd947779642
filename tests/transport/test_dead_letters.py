"""fedbus.dead per federation: list/show (peeking loses nothing), requeue, purge; on both buses."""

from __future__ import annotations

import uuid

import pytest

from protocol.codec import new_envelope, seal
from protocol.messages import RunControl
from protocol.signing import Signer
from protocol.transport import Topology
from protocol.transport.dead_letters import REQUEUED_HEADER, DeadLetterError, DeadLetters
from protocol.transport.topology import TASKS, UPDATES, site_queue, updates_queue
from tests.transport.conftest import Collector, Net, ack


def _reject(net: Net, queue: str, n: int, reasons: list[str]) -> None:
    """Consume ``n`` messages from ``queue`` and nack each with the next reason."""
    it = iter(reasons)
    col = Collector(lambda d: d.nack(next(it)))
    c = net.bus.consume(queue, col, prefetch=10)
    assert col.wait_count(n)
    c.cancel()


def _ids(letters) -> list[str]:
    return [d.message_id for d in letters]


def test_list_show_requeue_purge(net: Net) -> None:
    other = f"fed-other-{uuid.uuid4().hex[:8]}"
    net.bus.declare(Topology(federations=[other]))
    a, b, c, x = (uuid.uuid4().hex for _ in range(4))
    for mid in (a, b, c):
        net.bus.publish(UPDATES, net.fed, f"update {mid}".encode(), message_id=mid)
    net.bus.publish(UPDATES, other, b"someone else's", message_id=x)
    _reject(net, updates_queue(net.fed), 3, ["bad_signature: unknown signer", "wrong_round: expected 3, got 2",
                                              "malformed: not msgpack"])
    _reject(net, updates_queue(other), 1, ["bad_signature: other federation"])
    # A task the site rejected: it belongs to the federation its envelope names.
    signer = Signer.generate()
    task = seal(new_envelope(RunControl(action="stop"), federation=net.fed, run_id="r1", round=0,
                             sender="coordinator", recipient=net.site), signer)
    t = uuid.uuid4().hex
    net.bus.publish(TASKS, net.site, task, message_id=t)
    _reject(net, site_queue(net.site), 1, ["bad_signature: task not from our coordinator"])

    dead = DeadLetters(net.bus, net.fed, timeout_s=20)
    first = dead.list()
    assert _ids(first) == [a, b, c, t]
    assert [d.reason for d in first] == ["bad_signature: unknown signer", "wrong_round: expected 3, got 2",
                                        "malformed: not msgpack", "bad_signature: task not from our coordinator"]
    assert first[0].queue == updates_queue(net.fed) and first[0].envelope is None
    assert first[3].envelope["type"] == "RunControl" and first[3].envelope["federation"] == net.fed
    assert _ids(dead.list()) == [a, b, c, t]  # peeking twice lost nothing
    assert dead.show(b).body == f"update {b}".encode()
    with pytest.raises(DeadLetterError, match="no dead letter 'nope'"):
        dead.show("nope")

    # Requeue b: it is back on the federation's updates queue, marked, and gone from fedbus.dead.
    assert _ids(dead.requeue([b])) == [b]
    back = Collector(ack)
    cons = net.bus.consume(updates_queue(net.fed), back)
    assert back.wait_count(1)
    cons.cancel()
    assert back.ids() == [b] and back.bodies == [f"update {b}".encode()]
    assert back.deliveries[0].headers[REQUEUED_HEADER] == "wrong_round: expected 3, got 2"
    assert _ids(dead.list()) == [a, c, t]

    # Purge one, then all of this federation's: the other federation's letter stays.
    with pytest.raises(DeadLetterError, match="did nothing"):
        dead.purge([a, "missing"])
    assert _ids(dead.list()) == [a, c, t]  # a refused purge removed nothing
    assert _ids(dead.purge([c])) == [c]
    assert _ids(dead.purge()) == [a, t]
    assert dead.list() == []
    theirs = DeadLetters(net.bus, other, timeout_s=20)
    assert [(d.message_id, d.reason) for d in theirs.list()] == [(x, "bad_signature: other federation")]
    assert _ids(theirs.purge()) == [x]


def test_a_broken_chunk_cannot_be_requeued(net: Net) -> None:
    """Orphan chunks carry x-fedbus-chunk; requeueing one is refused before anything changes."""
    mid = uuid.uuid4().hex
    net.bus.publish(UPDATES, net.fed, b"x", message_id=mid, headers={"x-fedbus-chunk": "transfer t chunk 0 of 3"})
    _reject(net, updates_queue(net.fed), 1, ["chunk_error: transfer t timed out"])
    dead = DeadLetters(net.bus, net.fed, timeout_s=20)
    with pytest.raises(DeadLetterError, match="chunk of a broken transfer"):
        dead.requeue()
    assert _ids(dead.list()) == [mid]
    assert _ids(dead.purge()) == [mid]
