"""Chaos suite: a real federation (coordinator + 4 site processes + RabbitMQ) under faults.

Each test injects one kind of fault into a run of the heart-failure MLP (FedAvg, DP-SGD,
1 local epoch, a few rounds) and then checks what an operator would check:

* the run completes (exit 0, every round committed);
* every update is counted exactly once: one accepted Update per (round, site) in the
  coordinator's update log, each one an update its site logged as sent, and every update
  a site logged as sent is in the coordinator's log (nothing lost);
* rejected frames wait in ``fedbus.dead`` with an ``x-fedbus-reason``;
* ``fedbus coordinator audit RUN`` passes;
* where the faults cannot change the result (a restarted site repeats its task with the
  same seed; a resumed coordinator repeats its rounds), the final model equals a
  fault-free run of the same sites (in-process, in-memory bus, same production code).
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import numpy as np
import pytest

from tests.chaos.harness import ChaosError, Federation, experiment, reference_weights, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.broker]

START_S = 180.0  # site processes importing torch + Opacus on a busy 2-core runner
RUN_S = 240.0
RECONNECT_S = 120.0  # a process reconnects within seconds of a broker fault (capped backoff 10 s)


# ---------------------------------------------------------------------------- checks


def counted_once(fed: Federation, run_id: str, *, rounds: list[int], sites: list[str]) -> None:
    """Exactly one accepted Update per (round, site); sites' logs and the update log agree."""
    rows = fed.updates(run_id, kind="Update")
    accepted = [r for r in rows if r["verdict"] == "accepted"]
    got = sorted((r["round"], r["site"]) for r in accepted)
    want = sorted((r, s) for r in rounds for s in sites)
    assert got == want, f"accepted (round, site) pairs {got} != {want}"
    ids = [r["message_id"] for r in accepted]
    assert len(set(ids)) == len(ids), "an update was accepted twice"
    sent: dict[str, tuple[str, int]] = {}
    for site in fed.sites:
        if site.site_id in sites:
            for line in site.sent(run_id, "Update"):
                sent[line["reply_id"]] = (site.site_id, line["round"])
    logged = {r["message_id"] for r in rows}
    lost = {m: sent[m] for m in set(sent) - logged}
    assert not lost, f"updates the sites sent that the coordinator never logged: {lost}"
    unknown = set(ids) - set(sent)
    assert not unknown, f"accepted updates no site logged as sent: {unknown}"
    for r in accepted:  # the accepted one is from the site and round it claims
        assert sent[r["message_id"]] == (r["site"], r["round"])


def audit_passes(fed: Federation, run_id: str) -> dict[str, Any]:
    rc, doc = fed.audit(run_id)
    assert rc == 0 and doc.get("ok"), f"audit failed: {doc}"
    return doc


def same_model(a, b, *, what: str) -> None:
    assert [n for n, _ in a] == [n for n, _ in b]
    for (name, x), (_, y) in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=f"{what}: {name}")


def completed(fed: Federation, *, rounds: int, timeout: float = RUN_S, gaps: bool = False) -> dict[str, Any]:
    """The run ran to its end: "completed" (exit 0), or with ``gaps`` "completed_with_gaps" (exit 3)."""
    rc, doc = fed.wait_coordinator(timeout)
    assert rc == (3 if gaps else 0), f"coordinator exited {rc}\n{fed.diagnostics()}"
    assert doc is not None and doc["status"] == ("completed_with_gaps" if gaps else "completed"), doc
    assert [r["round"] for r in doc["rounds"]] == list(range(1, rounds + 1))
    return doc


def dead_reasons_ok(dead: list[dict[str, Any]]) -> None:
    missing = [d["message_id"] for d in dead if not d["reason"]]
    assert not missing, f"dead letters without x-fedbus-reason: {missing}"


# ---------------------------------------------------------------------------- tests


def test_site_killed_mid_training_restarts_and_its_update_counts_once(make_federation) -> None:
    # Site 2 holds 60x the rows, so its training lasts long enough to be interrupted.
    fed = make_federation(sites=4, data_repeat={1: 60})
    fed.start_sites(timeout=START_S)
    doc = experiment(rounds=2, sites=4, round_timeout_s=120)
    run_id = f"kill-site-{fed.tag}"
    fed.start_coordinator(fed.write_experiment(doc), run_id=run_id)
    victim = fed.site(1)
    wait_for(lambda: victim.events("training_started", run_id=run_id, round=2), timeout=RUN_S,
             interval=0.02, what="site 2 to start training round 2", on_fail=fed.diagnostics)
    assert fed.kill_site(1) == -9
    assert not victim.events("training_finished", run_id=run_id, round=2), "the kill came after training finished"
    assert not [x for x in victim.sent(run_id) if x["round"] == 2]
    assert fed.rounds_committed(run_id) == [1]  # round 2 waits for the dead site

    fed.start_site(1, timeout=START_S)  # same config and state dir: the task comes back redelivered
    out = completed(fed, rounds=2)
    assert all(r["replies"] == 4 for r in out["rounds"])
    assert victim.events("task_received", run_id=run_id, round=2, type="TrainTask", redelivered=True)
    counted_once(fed, run_id, rounds=[1, 2], sites=fed.site_ids)
    audit_passes(fed, run_id)
    dead_reasons_ok(fed.dead_letters())
    same_model(fed.final_weights(run_id), reference_weights(fed, doc).weights, what="after a site kill -9")


def test_coordinator_killed_mid_round_resumes_without_loss_or_double_count(make_federation) -> None:
    # Site 4 holds 40x the rows and is frozen (SIGSTOP) while it trains round 2: round 2 then
    # stays open with the three other updates received and folded into the running sum, but
    # not committed, when the coordinator is killed.
    fed = make_federation(sites=4, data_repeat={3: 40})
    fed.start_sites(timeout=START_S)
    doc = experiment(rounds=2, sites=4, round_timeout_s=120)
    path = fed.write_experiment(doc)
    run_id = f"kill-coord-{fed.tag}"
    fed.start_coordinator(path, run_id=run_id)
    late = fed.site(3)
    wait_for(lambda: late.events("training_started", run_id=run_id, round=2), timeout=RUN_S, interval=0.02,
             what="site 4 to start training round 2", on_fail=fed.diagnostics)
    fed.pause_site(3)
    try:
        assert not [x for x in late.sent(run_id) if x["round"] == 2], "site 4 answered round 2 before the pause"
        for i in range(3):
            wait_for(lambda i=i: [x for x in fed.site(i).sent(run_id) if x["round"] == 2], timeout=RUN_S,
                     what=f"site {i + 1}'s round-2 update", on_fail=fed.diagnostics)
        assert fed.rounds_committed(run_id) == [1]
        assert fed.kill_coordinator() == -9  # SIGKILL mid-round: no commit, no acks
    finally:
        fed.resume_site(3)
    assert fed.rounds_committed(run_id) == [1]
    store = fed.store()
    assert store.run(run_id)["status"] == "running"
    store.close()

    fed.start_coordinator(path, run_id=run_id, resume=True)
    out = completed(fed, rounds=2)
    assert all(r["replies"] == 4 for r in out["rounds"])
    counted_once(fed, run_id, rounds=[1, 2], sites=fed.site_ids)
    # the round-2 updates received before the kill came back and were counted, not lost
    extra = [u for u in fed.updates(run_id, kind="Update") if u["verdict"] != "accepted"]
    assert all(u["verdict"] in ("duplicate", "late") for u in extra), extra
    audit_passes(fed, run_id)
    dead_reasons_ok(fed.dead_letters())
    same_model(fed.final_weights(run_id), reference_weights(fed, doc).weights, what="after coordinator kill + resume")


def _hold_round(fed: Federation, run_id: str, rnd: int, site: int) -> None:
    """Freeze ``site`` (SIGSTOP) once it trains round ``rnd``: the round cannot commit until it resumes."""
    victim = fed.site(site)
    wait_for(lambda: victim.events("training_started", run_id=run_id, round=rnd), timeout=RUN_S, interval=0.02,
             what=f"site {site + 1} to start training round {rnd}", on_fail=fed.diagnostics)
    fed.pause_site(site)


def _struck_mid_round(fed: Federation, run_id: str, rnd: int, fault, *,
                      while_held=None) -> tuple[set[str], dict[str, int]]:
    """Run ``fault`` while round ``rnd`` is provably open: every site has its task, the rounds before
    it are committed and it is not (the last site is frozen mid-training). ``while_held`` runs first,
    inside the hold. Returns the broker's connections and the reconnect counts from just before."""
    last = len(fed.sites) - 1
    _hold_round(fed, run_id, rnd, last)
    try:
        if while_held is not None:
            while_held()
        wait_for(lambda: all(s.events("task_received", run_id=run_id, round=rnd) for s in fed.sites), timeout=RUN_S,
                 what=f"round {rnd} to reach every site", on_fail=fed.diagnostics)
        before, counts = fed.connections(), fed.reconnects()
        assert before, "no connection of the federation is on the broker before the fault"
        assert fed.rounds_committed(run_id) == list(range(1, rnd)), "the fault must strike with the round open"
        assert not [x for x in fed.site(last).sent(run_id) if x["round"] == rnd]
        fault()
    finally:
        fed.resume_site(last)
    return before, counts


def _fault_happened(fed: Federation, before: set[str], counts: dict[str, int], what: str,
                    processes: list[str] | None = None) -> None:
    """Every process reconnected (its own count went up) and the broker lists none of the old connections."""
    names = processes or list(counts)
    wait_for(lambda: all(fed.reconnects()[k] > counts[k] for k in names), timeout=RECONNECT_S,
             what=f"every process to reconnect after the {what}", on_fail=fed.diagnostics)
    survived = fed.connections() & before
    assert not survived, f"connections survived the {what}: {sorted(survived)}"


def test_broker_restart_and_forced_connection_close_mid_round(make_federation) -> None:
    # Site 4 holds 40x the rows, so it is still training when it is frozen: each round stays open.
    fed = make_federation(sites=4, data_repeat={3: 40})
    fed.start_sites(timeout=START_S)
    doc = experiment(rounds=3, sites=4, round_timeout_s=120)
    run_id = f"broker-{fed.tag}"
    fed.start_coordinator(fed.write_experiment(doc), run_id=run_id)

    # mid-round 2: every connection of every process drops; durable queues survive
    before, counts = _struck_mid_round(fed, run_id, 2, fed.restart_broker)
    # mid-round 3 (which every site reached, so all reconnected): close every connection of the vhost
    before2, counts2 = _struck_mid_round(
        fed, run_id, 3, lambda: fed.close_connections("chaos: all connections force-closed"),
        while_held=lambda: _fault_happened(fed, before, counts, "broker restart"))

    out = completed(fed, rounds=3)
    _fault_happened(fed, before2, counts2, "forced connection close")
    assert all(r["replies"] == 4 for r in out["rounds"])
    assert all(s.alive() for s in fed.sites), "a site process died of a broker fault"
    counted_once(fed, run_id, rounds=[1, 2, 3], sites=fed.site_ids)
    audit_passes(fed, run_id)
    dead = fed.dead_letters()
    dead_reasons_ok(dead)
    # The only frames refused are at-least-once copies of a task or an update that was handled:
    # each one's message id is a task the coordinator sent or an update it logged. (There may be
    # none: whether a copy arrives depends on what was in flight when the fault struck.)
    store = fed.store()
    try:
        tasks = {t["task_id"] for t in store.tasks(run_id)}
    finally:
        store.close()
    logged = {u["message_id"] for u in fed.updates(run_id)}
    for d in dead:
        assert d["reason"].startswith(("replayed", "duplicate")), d["reason"]
        assert d["message_id"] in tasks | logged, f"dead letter {d['message_id']} is no copy of a handled message"
    same_model(fed.final_weights(run_id), reference_weights(fed, doc).weights, what="after broker faults")


def _forged_frames(fed: Federation, run_id: str, mallory_key, honest: str) -> dict[str, tuple[str, bytes]]:
    """Three updates a hostile client sends: flipped byte, impersonation, unenrolled key."""
    from protocol.codec import decode_frame, new_envelope, seal
    from protocol.config import load_experiment
    from protocol.messages import Update
    from protocol.model import build_model, to_tensors
    from protocol.signing import Signer

    exp = load_experiment(json.loads((fed.root / "experiment.json").read_text()))
    weights = to_tensors(build_model(exp.architecture.layers, seed=1))
    mallory = Signer.from_file(mallory_key)

    def update(sender: str) -> Any:
        return new_envelope(Update(task_id=uuid.uuid4().hex, weights=weights, num_examples=60, metrics={},
                                   epsilon=None, delta=None, base_round=0),
                            federation=fed.federation, run_id=run_id, round=1, sender=sender, recipient="coordinator")

    flipped_env = update(fed.mallory)
    frame = bytearray(seal(flipped_env, mallory))
    _, _, body, _ = decode_frame(bytes(frame))
    at = bytes(frame).find(bytes(body)) + len(body) // 2  # inside the weights, so msgpack stays valid
    frame[at] ^= 0x01
    impersonation = update(honest)  # claims to be an honest hospital, signed by mallory's key
    stranger = update(fed.mallory)  # signed by a key nobody enrolled
    return {
        "flipped": (flipped_env.message_id, bytes(frame)),
        "impersonation": (impersonation.message_id, seal(impersonation, mallory)),
        "unenrolled": (stranger.message_id, seal(stranger, Signer.generate())),
    }


def test_skewed_clock_tampered_updates_and_garbage_flood_are_dead_lettered(make_federation) -> None:
    from protocol.signing import generate_keypair
    from protocol.transport.topology import UPDATES

    # Site 4's clock is 10 minutes ahead (it tolerates the coordinator's "old" tasks); the
    # coordinator allows 300 s, so every reply of site 4 must be refused as clock skew.
    fed = make_federation(sites=4, site_env={3: {"FEDBUS_CLOCK_OFFSET_S": "600"}},
                          site_extra={3: {"max_skew_s": 900.0}})
    fed.mallory = f"mallory-{fed.tag}"
    mallory_key, mallory_pub = generate_keypair(fed.mallory, fed.keys)
    store = fed.store()
    store.enroll(fed.mallory, mallory_pub.read_bytes())  # enrolled, so its signatures verify
    store.close()
    fed.start_sites(timeout=START_S)
    honest = fed.site_ids[:3]
    doc = experiment(rounds=1, sites=4, min_fit=3, round_timeout_s=float(os.environ.get("FEDBUS_CHAOS_TIMEOUT_S", 20)))
    run_id = f"hostile-{fed.tag}"
    fed.start_coordinator(fed.write_experiment(doc), run_id=run_id)
    wait_for(lambda: fed.site(0).events("task_received", run_id=run_id, round=1), timeout=RUN_S,
             what="round 1 to start", on_fail=fed.diagnostics)

    forged = _forged_frames(fed, run_id, mallory_key, honest[0])
    fed.publish_raw(UPDATES, fed.federation, [f for _, f in forged.values()],
                    message_ids=[m for m, _ in forged.values()])
    rng = np.random.default_rng(7)
    garbage_ids = [f"garbage-{fed.tag}-{i}" for i in range(1000)]
    fed.publish_raw(UPDATES, fed.federation,
                    [rng.bytes(int(rng.integers(1, 600))) for _ in garbage_ids], message_ids=garbage_ids)

    out = completed(fed, rounds=1, gaps=True)  # site 4 was sampled and every reply of it refused
    assert out["rounds"][0]["replies"] == 3
    assert {g["site"] for g in out["gaps"]} == {fed.site_ids[3]} and all(g["round"] == 1 for g in out["gaps"])
    counted_once(fed, run_id, rounds=[1], sites=honest)
    skewed = fed.site(3)
    skew_sent = {x["reply_id"] for x in skewed.sent(run_id)}
    assert skew_sent, "the skewed site never answered its task"
    rows = {r["message_id"]: r for r in fed.updates(run_id)}
    for mid in skew_sent:
        assert rows[mid]["verdict"] == "rejected" and rows[mid]["reason"].startswith("clock_skew"), rows[mid]
    audit_passes(fed, run_id)

    dead = {d["message_id"]: d for d in fed.dead_letters()}
    dead_reasons_ok(list(dead.values()))
    for mid in skew_sent:
        assert dead[mid]["reason"].startswith("clock_skew"), dead[mid]
    want = {"flipped": "bad_signature", "impersonation": "bad_signature", "unenrolled": "unknown_signer"}
    for name, (mid, _) in forged.items():
        assert mid in dead, f"{name} update not dead-lettered"
        assert dead[mid]["reason"].startswith(want[name]), (name, dead[mid]["reason"])
        assert rows[mid]["verdict"] == "rejected"
    flood = [dead.get(m) for m in garbage_ids]
    assert all(flood), f"{sum(d is None for d in flood)} of 1000 garbage frames are not in fedbus.dead"
    assert {d["reason"].split(":")[0] for d in flood} <= {"malformed", "limit_exceeded", "unsupported_version",
                                                           "unknown_type"}, {d["reason"] for d in flood}
    assert sum(1 for m in garbage_ids if rows.get(m, {}).get("verdict") == "rejected") == 1000
    # nothing hostile touched the model: it is the three honest sites' FedAvg
    same_model(fed.final_weights(run_id), reference_weights(fed, doc, sites=honest).weights,
               what="after hostile frames")


def test_harness_wait_for_reports_what_it_waited_for() -> None:
    with pytest.raises(ChaosError, match="the impossible"):
        wait_for(lambda: False, timeout=0.2, interval=0.05, what="the impossible")
    assert wait_for(lambda: 42, timeout=1, what="an answer") == 42


def test_clock_offset_hook_reads_seconds_and_names_the_variable_when_bad(monkeypatch) -> None:
    from site_worker.daemon import CLOCK_OFFSET_ENV, clock_offset_s

    monkeypatch.delenv(CLOCK_OFFSET_ENV, raising=False)
    assert clock_offset_s() == 0.0
    monkeypatch.setenv(CLOCK_OFFSET_ENV, "-600.5")
    assert clock_offset_s() == -600.5
    monkeypatch.setenv(CLOCK_OFFSET_ENV, "ten minutes")
    with pytest.raises(ValueError, match="FEDBUS_CLOCK_OFFSET_S"):
        clock_offset_s()
