"""Site liveness from signed heartbeats (issue 24, Build 7): "offline" within 30 s of a kill.

The edges of the rule (``coordinator/liveness.py``): online while the newest beat is within
three of the site's announced intervals (at most 30 s), offline just after; a beat counts from
``min(received, sent_at)``; a backlog older than 300 s is dropped; an older beat never
overwrites a newer one. Then the coordinator's control consumer on the in-memory bus records a
real signed beat, refuses one that names another site, and drops a stale one; and the sites
page turns a killed ``fedbus site run`` process "offline" (tests/coordinator/test_liveness_kill.py).
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from coordinator import liveness
from coordinator.state import StateStore
from fedbus.dashboard.data import StateReader
from fedbus.dashboard.views import sites_doc
from protocol.codec import new_envelope, seal
from protocol.messages import Heartbeat
from protocol.transport.topology import CONTROL
from tests.adversarial.malicious_site import Federation, experiment

NOW = 1_000_000.0


def test_online_up_to_three_missed_beats_and_offline_just_after() -> None:
    beat = {"seen_at": NOW - 30.0, "every_s": 10.0}
    assert liveness.status(beat, now=NOW, monitored=True) == "online"
    assert liveness.status(beat, now=NOW + 0.001, monitored=True) == "offline"
    fast = {"seen_at": NOW - 6.0, "every_s": 2.0}  # a site beating every 2 s is offline after 6 s
    assert liveness.status(fast, now=NOW, monitored=True) == "online"
    assert liveness.status(fast, now=NOW + 0.001, monitored=True) == "offline"
    assert liveness.offline_after_s(10.0) == 30.0 and liveness.offline_after_s(1.0) == 3.0


def test_nobody_listening_is_not_monitored_and_no_beat_is_never_online() -> None:
    old = {"seen_at": NOW - 31.0, "every_s": 10.0}
    assert liveness.status(old, now=NOW, monitored=False) == "not monitored"
    assert liveness.status(None, now=NOW, monitored=True) == "offline"
    assert liveness.status(None, now=NOW, monitored=False) == "not monitored"


def test_a_beat_counts_from_its_earlier_clock_and_a_backlog_is_dropped() -> None:
    assert liveness.seen_at(NOW - 5.0, NOW) == NOW - 5.0  # waited in the queue: alive when sent
    assert liveness.seen_at(NOW + 60.0, NOW) == NOW  # a clock running ahead cannot extend it
    assert liveness.seen_at(NOW - 300.0, NOW) == NOW - 300.0  # the edge: still news
    assert liveness.seen_at(NOW - 300.001, NOW) is None


def test_the_store_keeps_the_newest_beat(tmp_path) -> None:
    store = StateStore(tmp_path)
    try:
        store.record_heartbeat("h1", seen_at=NOW, every_s=10.0, seq=5)
        store.record_heartbeat("h1", seen_at=NOW - 1.0, every_s=10.0, seq=4)  # replayed or reordered
        assert store.liveness()["h1"] == {"seen_at": NOW, "every_s": 10.0, "seq": 5}
        store.record_heartbeat("h1", seen_at=NOW + 10.0, every_s=2.0, seq=6)
        assert store.liveness()["h1"] == {"seen_at": NOW + 10.0, "every_s": 2.0, "seq": 6}
    finally:
        store.close()


def _beat(site, *, site_id: str | None = None, sent_at: float | None = None, seq: int = 0) -> str:
    env = new_envelope(Heartbeat(site_id=site_id or site.site_id, seq=seq, every_s=10.0), federation=site.federation,
                       run_id="", round=0, sender=site.site_id, recipient="coordinator",
                       sent_at=time.time() if sent_at is None else sent_at)
    site.bus.publish(CONTROL, site.federation, seal(env, site.signer), message_id=env.message_id)
    return env.message_id


def test_the_coordinator_records_signed_beats_and_refuses_a_forged_one(tmp_path) -> None:
    """During a run, site A beats (recorded), beats naming site B (refused: dead-lettered, B
    stays unseen) and sends a 400 s old beat (dropped); the sites page shows A online and B
    offline while the run is live."""
    fed = Federation(f"memory://alive-{uuid.uuid4().hex[:8]}", tmp_path / "state")
    seen: dict[str, object] = {}

    def attack(site, task_env, honest_env, frame):
        if task_env.round == 1:
            forged = _beat(site, site_id=other.site_id)
            _beat(site, sent_at=time.time() - 400.0, seq=1)
            t0 = time.time()
            _beat(site, seq=2)
            wait = threading.Event()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                beats = StateReader(fed.state_dir).liveness()
                if site.site_id in beats:
                    break
                wait.wait(0.02)
            seen["beats"], seen["t0"], seen["forged"] = StateReader(fed.state_dir).liveness(), t0, forged
            seen["page"] = sites_doc(StateReader(fed.state_dir))
        return None

    try:
        a = fed.add_site(1.0, 10, attack=attack)
        other = fed.add_site(3.0, 30)
        fed.start_sites()
        exp = experiment(rounds=1, parameters={"min_fit_clients": 2, "min_available_clients": 2})
        result = fed.coordinator(exp).run()
        assert result.ok, result.reason
        beats = seen["beats"]
        assert set(beats) == {a.site_id}, beats  # B's forged beat did not count, nor for A
        assert beats[a.site_id]["seq"] == 2 and seen["t0"] <= beats[a.site_id]["seen_at"] <= time.time()
        assert any(mid == seen["forged"] and "bad_hello" in reason for mid, reason in fed.dead_letters())
        page = {s["site_id"]: s for s in seen["page"]["sites"]}
        assert seen["page"]["monitored"] is True
        assert page[a.site_id]["liveness"] == "online" and page[a.site_id]["online"] is True
        assert page[other.site_id]["liveness"] == "offline"
    finally:
        fed.close()


@pytest.mark.parametrize("value,ok", [(0, True), (1, True), (10, True), (0.5, False), (10.5, False)])
def test_site_toml_alive_every_s_edges(tmp_path, value, ok) -> None:
    from site_worker.config import SiteConfigError, load_site_config

    (tmp_path / "k").write_bytes(b"x")
    (tmp_path / "d.csv").write_text("a,y\n1,0\n")
    toml = tmp_path / "site.toml"
    toml.write_text(f'site_id = "h1"\nfederation = "f"\nbroker_url = "memory://x"\nkey_path = "k"\n'
                    f'coordinator_pub = "k"\nstate_dir = "s"\nalive_every_s = {value}\n'
                    '[datasets.d]\npath = "d.csv"\ntarget = "y"\n')
    if ok:
        assert load_site_config(toml).alive_every_s == float(value)
    else:
        with pytest.raises(SiteConfigError, match="alive_every_s"):
            load_site_config(toml)


def test_the_site_daemon_beats_signed_every_interval_after_its_hello(tmp_path) -> None:
    """A real ``SiteWorker`` with ``alive_every_s = 1`` on the in-memory bus: its hello, then
    signed beats naming itself with rising sequence numbers and the interval it announced;
    after ``stop()`` no more."""
    import queue

    from protocol.codec import open_frame
    from protocol.messages import SiteHello
    from protocol.signing import TrustStore
    from protocol.transport import open_bus
    from protocol.transport.base import Topology
    from protocol.transport.topology import control_queue
    from site_worker.config import load_site_config
    from site_worker.daemon import SiteWorker
    from tests.site_worker.support import heart_failure_csv, make_keys, site_toml, uid

    url, site_id, fed = f"memory://{uid('alive')}", uid("site"), uid("fed")
    keys = make_keys(tmp_path, site_id)
    cfg = load_site_config(site_toml(tmp_path, site_id=site_id, federation=fed, broker_url=url, keys=keys,
                                     datasets={"hf": {"path": str(heart_failure_csv(tmp_path / "hf.csv")),
                                                      "target": "DEATH_EVENT"}},
                                     extra={"alive_every_s": 1, "declare_topology": True}))
    trust = TrustStore()
    trust.add(site_id, keys.site_pub.read_bytes())
    coord = open_bus(url)
    coord.declare(Topology(sites=[site_id], federations=[fed]))
    got: queue.Queue = queue.Queue()

    def on_control(d):
        got.put((open_frame(d.body, trust).envelope, time.monotonic()))
        d.ack()

    consumer = coord.consume(control_queue(fed), on_control)
    worker = SiteWorker(cfg, bus=open_bus(url))
    worker.start()
    try:
        first, _ = got.get(timeout=30)
        assert isinstance(first.payload, SiteHello)
        beats = [got.get(timeout=10) for _ in range(3)]
        assert [type(e.payload) for e, _ in beats] == [Heartbeat] * 3
        assert [e.payload.seq for e, _ in beats] == [0, 1, 2]
        assert all(e.payload.site_id == e.sender == site_id and e.payload.every_s == 1.0 for e, _ in beats)
        gaps = [b[1] - a[1] for a, b in zip(beats, beats[1:])]
        assert all(0.5 < g < 5.0 for g in gaps), gaps
    finally:
        worker.stop(grace_s=1)
    while not got.empty():  # what was in flight at stop
        got.get_nowait()
    with pytest.raises(queue.Empty):
        got.get(timeout=2.5)
    consumer.cancel()
    coord.close()
