"""Site liveness between runs (issue 24, Build 7): the dashboard watches heartbeats itself.

With no run running, ``coordinator serve --broker`` consumes ``fedbus.liveness.<federation>``
(a copy of every control message; coordinator/liveness_monitor.py) and records verified beats:
a beating site reads "online", a site whose beats stop reads "offline" within its three missed
intervals (3 s at ``alive_every_s = 1``), a forged beat is dead-lettered and changes nothing,
and the hellos still wait in the coordinator's control queue for the next run. The page believes
a monitor for three of its ticks, no longer: a crashed monitor does not claim "monitored".
Both buses; the SIGKILL of a real ``fedbus site run`` process is in
tests/dashboard/test_liveness_kill_between_runs.py.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from pathlib import Path

import pytest

from coordinator import liveness
from coordinator.liveness_monitor import LivenessMonitor
from coordinator.state import StateStore
from fedbus.dashboard.data import StateReader
from fedbus.dashboard.server import BackgroundServer, ServeOptions
from fedbus.dashboard.views import sites_doc
from protocol.codec import new_envelope, open_frame, seal
from protocol.messages import Heartbeat, SiteHello
from protocol.signing import Signer, TrustStore, generate_keypair
from protocol.transport import open_bus
from protocol.transport.base import Topology
from protocol.transport.dead_letters import DeadLetterError, DeadLetters
from protocol.transport.topology import CONTROL, control_queue, liveness_queue

POLL_S = 0.05
NOW = 1_000_000.0


def wait_for(pred, timeout_s: float, what: str):
    """``pred()``'s first truthy value, polled every POLL_S; fails after ``timeout_s``."""
    step = threading.Event()
    deadline = time.monotonic() + timeout_s
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        step.wait(POLL_S)


def states(state: Path) -> tuple[dict[str, str], bool]:
    doc = sites_doc(StateReader(state))
    return {s["site_id"]: s["liveness"] for s in doc["sites"]}, doc["monitored"]


def _site_worker(tmp: Path, url: str, site_id: str, fed: str, store: StateStore):
    from site_worker.config import load_site_config
    from site_worker.daemon import SiteWorker
    from tests.site_worker.support import heart_failure_csv, make_keys, site_toml

    keys = make_keys(tmp, site_id)
    store.enroll(site_id, keys.site_pub.read_bytes())
    cfg = load_site_config(site_toml(tmp, site_id=site_id, federation=fed, broker_url=url, keys=keys,
                                     datasets={"hf": {"path": str(heart_failure_csv(tmp / "hf.csv")),
                                                      "target": "DEATH_EVENT"}},
                                     extra={"alive_every_s": 1}))
    return SiteWorker(cfg, bus=open_bus(url)), keys


def _hellos_in_control_queue(url: str, fed: str, trust: TrustStore, n: int) -> list[SiteHello]:
    """What the next coordinator run will read from its control queue: ``n`` hellos, taken off it."""
    got: queue.Queue = queue.Queue()

    def take(d):
        payload = open_frame(d.body, trust).envelope.payload
        if isinstance(payload, SiteHello):
            got.put(payload)
        d.ack()

    bus = open_bus(url)
    consumer = bus.consume(control_queue(fed), take, prefetch=50)
    try:
        return [got.get(timeout=15) for _ in range(n)]
    finally:
        consumer.cancel()
        bus.close()


def test_between_runs_a_beating_site_is_online_then_offline_and_its_hello_stays_for_the_run(
        tmp_path: Path, bus_url: str) -> None:
    """No run in the state: the dashboard (``--broker``, its monitor ticking every 0.5 s) shows
    the site online by its 1 s beats, "offline" within 3 s (+ the poll) of its last beat once it
    stops, and the coordinator's control queue still holds the site's hello."""
    fed, site_id = f"fed-{uuid.uuid4().hex[:8]}", f"h-{uuid.uuid4().hex[:6]}"
    state = tmp_path / "state"
    store = StateStore(state)
    admin = open_bus(bus_url)
    admin.declare(Topology(sites=[site_id], federations=[fed]))  # `fedbus broker provision`
    worker, keys = _site_worker(tmp_path, bus_url, site_id, fed, store)
    assert states(state) == ({site_id: "not monitored"}, False)  # nobody listens yet
    server = BackgroundServer(ServeOptions(state=state, port=0, broker=bus_url, federation=fed, liveness=True,
                                           liveness_tick_s=0.5)).start()
    try:
        assert wait_for(lambda: states(state) == ({site_id: "offline"}, True), 15, "the monitor ticking")
        worker.start()
        wait_for(lambda: states(state) == ({site_id: "online"}, True), 30, "the site online by its beats")
        assert not StateReader(state).runs()  # between runs: no coordinator recorded that
        worker.stop(grace_s=1)
        last = StateReader(state).liveness()[site_id]["seen_at"]
        wait_for(lambda: states(state)[0][site_id] == "offline", 30, "the stopped site offline")
        after = time.time() - last
        assert after <= liveness.offline_after_s(1.0) + 2 * POLL_S + 0.5, after  # 3 s after its last beat
        trust = TrustStore()
        trust.add(site_id, keys.site_pub.read_bytes())
        [hello] = _hellos_in_control_queue(bus_url, fed, trust, 1)
        assert hello.site_id == site_id
    finally:
        server.stop()
        admin.close()
        store.close()
    assert states(state)[1] is False  # a clean stop takes the monitor's row out at once


def _forge(bus, fed: str, signer: Signer, *, names: str, sender: str) -> str:
    env = new_envelope(Heartbeat(site_id=names, seq=0, every_s=1.0), federation=fed, run_id="", round=0,
                       sender=sender, recipient="coordinator", sent_at=time.time())
    bus.publish(CONTROL, fed, seal(env, signer), message_id=env.message_id)
    return env.message_id


def test_a_forged_beat_is_dead_lettered_with_its_reason_and_counts_for_nobody(tmp_path: Path, bus_url: str) -> None:
    """Enrolled site A signs a beat naming B (refused: bad_heartbeat), an unenrolled key beats as
    itself (refused: unknown signer); both land in ``fedbus.dead`` from the liveness queue and
    neither site is recorded, while A's own beat is."""
    fed = f"fed-{uuid.uuid4().hex[:8]}"
    store = StateStore(tmp_path / "state")
    a, b, stranger = (f"{n}-{uuid.uuid4().hex[:6]}" for n in ("a", "b", "x"))
    keys = {}
    for s in (a, b, stranger):
        k, pub = generate_keypair(s, tmp_path / "keys")
        keys[s] = Signer.from_file(k)
        if s != stranger:
            store.enroll(s, pub.read_bytes())
    bus = open_bus(bus_url)
    monitor = LivenessMonitor(bus, store, fed, tick_s=0.5).start()
    try:
        wait_for(lambda: monitor.consumer is not None and monitor.consumer.live, 15, "the monitor subscribed")
        forged = _forge(bus, fed, keys[a], names=b, sender=a)
        unknown = _forge(bus, fed, keys[stranger], names=stranger, sender=stranger)
        _forge(bus, fed, keys[a], names=a, sender=a)
        wait_for(lambda: a in store.liveness(), 15, "A's own beat recorded")

        def letters():
            got = {d.message_id: d for d in DeadLetters(bus, fed).list() if d.message_id in (forged, unknown)}
            return got if len(got) == 2 else None

        dead = wait_for(letters, 15, "both forged beats dead-lettered")
        assert dead[forged].reason.startswith("bad_heartbeat") and dead[forged].queue == liveness_queue(fed)
        assert "unknown" in dead[unknown].reason.lower() and dead[unknown].queue == liveness_queue(fed)
        assert set(store.liveness()) == {a}
        assert monitor.beats == 1
        with pytest.raises(DeadLetterError, match="liveness monitor"):  # the control queue had its own copy
            DeadLetters(bus, fed).requeue([forged])
    finally:
        monitor.stop()
        bus.close()
        store.close()


def test_a_monitor_is_believed_for_three_ticks_and_not_after_it_stops(tmp_path: Path) -> None:
    """The edges: a tick every 2 s says "monitored" up to 6 s later and not a millisecond more
    (a killed monitor leaves its row, which goes stale); a cancelled consumer ticks no more; a
    clean stop removes the row."""
    url = f"memory://live-{uuid.uuid4().hex[:8]}"
    store = StateStore(tmp_path / "state")
    store.enroll("h1", generate_keypair("h1", tmp_path / "keys")[1].read_bytes())
    bus = open_bus(url)
    monitor = LivenessMonitor(bus, store, "fed", tick_s=2.0)
    try:
        monitor.subscribe()
        assert monitor.tick(now=NOW) is True
        reader = StateReader(tmp_path / "state")
        assert reader.listening(NOW + 6.0) is True
        assert reader.listening(NOW + 6.001) is False  # crashed monitor: no longer claims
        doc = sites_doc(reader, now=NOW + 6.001)
        assert doc["monitored"] is False and doc["sites"][0]["liveness"] == "not monitored"
        assert sites_doc(reader, now=NOW + 6.0)["sites"][0]["liveness"] == "offline"
        monitor.consumer.cancel()
        assert monitor.tick(now=NOW + 10) is False  # not subscribed: claims nothing
        assert reader.listening(NOW + 10) is False
        monitor.consumer = bus.consume(liveness_queue("fed"), monitor.on_delivery)
        assert monitor.tick() is True and reader.listening() is True
        monitor.stop()
        assert reader.listening() is False
    finally:
        bus.close()
        store.close()


def test_the_liveness_queue_is_bounded_and_drops_its_oldest(tmp_path: Path) -> None:
    """Unwatched, the liveness queue keeps at most LIVENESS_MAX_LENGTH messages (the oldest go,
    and not to ``fedbus.dead``), while the control queue keeps every one for the coordinator."""
    from protocol.transport.memory import drop_broker, get_broker
    from protocol.transport.topology import LIVENESS_MAX_LENGTH

    name = f"bound-{uuid.uuid4().hex[:8]}"
    bus = open_bus(f"memory://{name}")
    try:
        bus.declare(Topology(federations=["fed"]))
        broker = get_broker(name)
        for i in range(LIVENESS_MAX_LENGTH):
            bus.publish(CONTROL, "fed", b"x", message_id=f"m{i}")
        assert broker.queue_depth(liveness_queue("fed")) == LIVENESS_MAX_LENGTH  # just inside: all kept
        bus.publish(CONTROL, "fed", b"x", message_id="last")
        assert broker.queue_depth(liveness_queue("fed")) == LIVENESS_MAX_LENGTH  # just outside: one dropped
        with broker.cond:
            ids = [m.message_id for m in broker.queues[liveness_queue("fed")].ready]
        assert ids[0] == "m1" and ids[-1] == "last"
        assert broker.queue_depth(control_queue("fed")) == LIVENESS_MAX_LENGTH + 1
        assert broker.dead_letters() == []
    finally:
        bus.close()
        drop_broker(name)


def test_the_coordinator_may_read_the_liveness_queue_and_a_site_may_not() -> None:
    import re

    from protocol.transport.provision import coordinator_permissions, site_permissions

    coord, site = coordinator_permissions("fed"), site_permissions("h1")
    assert re.match(coord.read, liveness_queue("fed")) and re.match(coord.configure, liveness_queue("fed"))
    assert not re.match(coord.read, liveness_queue("other"))  # its federation's only
    assert not re.match(site.read, liveness_queue("fed")) and not re.match(site.read, control_queue("fed"))


@pytest.mark.broker
def test_rabbitmq_bounds_the_liveness_queue_as_declared(amqp_url: str) -> None:
    """On RabbitMQ: the liveness queue carries its bounds (TTL, max length, drop-head, no
    dead-letter exchange) and the broker enforces them: one message past the bound, the queue
    still holds LIVENESS_MAX_LENGTH and the control queue holds every one."""
    import pika

    from protocol.transport.layout import plan
    from protocol.transport.topology import LIVENESS_MAX_LENGTH, LIVENESS_TTL_MS, updates_queue

    fed = f"fed-{uuid.uuid4().hex[:8]}"
    [qp] = [q for q in plan(Topology(federations=[fed])) if q.name == liveness_queue(fed)]
    assert qp.arguments["x-message-ttl"] == LIVENESS_TTL_MS == 300_000
    assert qp.arguments["x-max-length"] == LIVENESS_MAX_LENGTH and qp.arguments["x-overflow"] == "drop-head"
    assert "x-dead-letter-exchange" not in qp.arguments
    bus = open_bus(amqp_url)
    bus.declare(Topology(federations=[fed]))
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        ch = conn.channel()
        for i in range(LIVENESS_MAX_LENGTH + 1):  # unconfirmed raw publishes: fast; the passive declare orders after them
            ch.basic_publish(CONTROL, fed, b"x", pika.BasicProperties(message_id=f"m{i}"))

        def depth(name: str) -> int:
            return ch.queue_declare(name, passive=True).method.message_count

        wait_for(lambda: depth(control_queue(fed)) == LIVENESS_MAX_LENGTH + 1, 30, "every message in the control queue")
        assert depth(liveness_queue(fed)) == LIVENESS_MAX_LENGTH
        got = ch.basic_get(liveness_queue(fed), auto_ack=True)
        assert got[1].message_id == "m1"  # the oldest went
    finally:
        conn.close()
        for name in (liveness_queue(fed), control_queue(fed), updates_queue(fed)):
            bus.delete_queue(name)  # type: ignore[attr-defined]
        bus.close()
