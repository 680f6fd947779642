"""Counting exactly once on the in-memory bus: a second answer, a crash before the commit, a late update.

Each test plays the party that breaks the count (a site answering twice, a coordinator
dying with updates held but not committed, a site answering a closed round) and checks
the model against hand-computed FedAvg numbers, so the in-memory suite alone catches
a missing duplicate check, an ack before the commit, or a late update folded in.
"""

from __future__ import annotations

import threading

import numpy as np

from coordinator.checkpoints import load_tensors
from coordinator.state import StateStore
from protocol.codec import decode_envelope, decode_frame
from tests.coordinator.conftest import experiment
from tests.coordinator.fakesites import offset_weights


class Crash(BaseException):
    """Stands in for kill -9 inside the run loop: nothing after it runs, no commit, no ack."""


def _initial(fed, run_id: str):
    store = StateStore(fed.state_dir)
    return load_tensors(fed.state_dir / store.run(run_id)["initial_checkpoint"])


def _sent_ids(site, kind: str = "Update") -> list[str]:
    """Message ids of the ``kind`` frames a fake site published, in order."""
    envs = [decode_envelope(decode_frame(f)[2]) for f in site.sent]
    return [e.message_id for e in envs if e.type == kind]


def _open_after(site, kind: str, round: int, gate: threading.Event) -> threading.Thread:
    t = threading.Thread(target=lambda: site.wait_replied(kind, round, timeout=60) and gate.set(), daemon=True)
    t.start()
    return t


def test_a_site_answering_the_same_round_twice_is_counted_once(federation):
    from protocol.messages import Update

    def twice(site, task_env, honest_env, honest_frame):
        task = task_env.payload
        again = Update(task_id=task_env.message_id, weights=offset_weights(task.weights, 5.0), num_examples=10,
                       metrics={}, epsilon=None, delta=None, base_round=task.base_round)
        env, frame = site.reply(task_env, again)  # a fresh, validly signed second answer to the same task
        return [(honest_frame, honest_env.message_id), (frame, env.message_id)]

    gate = threading.Event()
    a = federation.add_site(1.0, 10, tamper=twice)
    federation.add_site(3.0, 10, gate={1: gate})  # answers only once both of a's answers are queued
    opener = _open_after(a, "Update", 1, gate)
    federation.start_sites()
    result = federation.coordinator(experiment(rounds=1)).run()
    opener.join()
    assert result.ok, result.reason
    first, second = _sent_ids(a)
    store = StateStore(federation.state_dir)
    rows = {u["message_id"]: u for u in store.updates(result.run_id, kind="Update")}
    assert rows[first]["verdict"] == "accepted"
    assert rows[second]["verdict"] == "duplicate" and rows[second]["reason"] == f"{a.site_id} already answered round 1"
    assert result.rounds[0]["replies"] == 2
    w0 = _initial(federation, result.run_id)
    for (name, w), (_, x) in zip(result.weights, w0):  # (10*1 + 10*3) / 20 = 2; counting the 5 twice gives 3
        np.testing.assert_allclose(w, x + 2.0, rtol=1e-5, err_msg=name)


def test_a_coordinator_dying_before_the_commit_loses_no_held_update(federation):
    gate = threading.Event()
    a = federation.add_site(1.0, 10)
    b = federation.add_site(3.0, 30, gate={1: gate})  # round 1 stays open: a's update is held, not committed
    federation.start_sites()
    exp = experiment(rounds=1)
    coord = federation.coordinator(exp, run_id="r-crash")
    real_next, handled = coord.inbox.next, []

    def next_then_crash(deadline):
        if handled:  # a's update went through validation and aggregation: die before anything else
            raise Crash()
        item = real_next(deadline)
        if item is not None:
            handled.append(item)
        return item

    coord.inbox.next = next_then_crash
    try:
        coord.run()
    except Crash:
        pass
    else:
        raise AssertionError("the coordinator did not reach the crash point")
    store = StateStore(federation.state_dir)
    assert store.rounds("r-crash") == [] and store.run("r-crash")["status"] == "running"
    (held_id,) = _sent_ids(a)

    gate.set()
    resumed = federation.coordinator(exp, run_id="r-crash", resume=True).run()
    assert resumed.ok, resumed.reason
    rows = {u["message_id"]: u for u in store.updates("r-crash", kind="Update")}
    # the update held at the crash came back (redelivered) and is the one counted: nothing lost
    assert held_id in rows, "the update held when the coordinator died was lost (acked before its commit?)"
    assert rows[held_id]["verdict"] == "accepted"
    accepted = sorted((u["round"], u["site"]) for u in rows.values() if u["verdict"] == "accepted")
    assert accepted == sorted([(1, a.site_id), (1, b.site_id)])
    assert {u["verdict"] for u in rows.values() if u["message_id"] != held_id} <= {"accepted", "duplicate", "late"}
    w0 = _initial(federation, "r-crash")
    np.testing.assert_allclose(resumed.weights[0][1], w0[0][1] + (10 * 1 + 30 * 3) / 40, rtol=1e-5)


def test_a_late_update_is_dropped_from_the_model_not_only_logged(federation):
    gate = threading.Event()
    a = federation.add_site(1.0, 10)
    federation.add_site(1.0, 10)
    late = federation.add_site(50.0, 10, gate={1: gate})  # its round-1 answer comes after round 1 closed

    def open_when_round_2_started():
        with a._cond:
            a._cond.wait_for(lambda: any(e.round == 2 for e in a.tasks), timeout=60)
        gate.set()

    opener = threading.Thread(target=open_when_round_2_started, daemon=True)
    opener.start()
    federation.start_sites()
    # round 1 must close at its deadline without the gated site; round 2 then waits for all three
    result = federation.coordinator(experiment(rounds=2), round_timeout_s=3.0).run()
    opener.join()
    assert result.ok, result.reason
    assert [r["replies"] for r in result.rounds] == [2, 3]
    rows = StateStore(federation.state_dir).updates(result.run_id, verdict="late")
    assert [(u["site"], u["round"]) for u in rows] == [(late.site_id, 1)]
    # round 1: +1 (two sites at offset 1); round 2: (10*1 + 10*1 + 10*50) / 30 on top
    w0 = _initial(federation, result.run_id)
    for (name, w), (_, x) in zip(result.weights, w0):
        np.testing.assert_allclose(w, x + 1.0 + 520.0 / 30, rtol=1e-5, err_msg=name)


def test_fedasync_merges_a_task_answered_twice_once(federation):
    from protocol.messages import Update

    def twice_at_first(site, task_env, honest_env, honest_frame):
        if task_env.round != 0:
            return None
        task = task_env.payload
        again = Update(task_id=task_env.message_id, weights=offset_weights(task.weights, 5.0), num_examples=10,
                       metrics={}, epsilon=None, delta=None, base_round=task.base_round)
        env, frame = site.reply(task_env, again)
        return [(honest_frame, honest_env.message_id), (frame, env.message_id)]

    a = federation.add_site(1.0, 10, tamper=twice_at_first)
    federation.start_sites()
    exp = experiment(rounds=2, name="FedAsync", parameters={"alpha": 0.5, "min_fit_clients": 1,
                                                            "min_available_clients": 1, "max_staleness": 10})
    result = federation.coordinator(exp).run()
    assert result.ok, result.reason
    first, second = _sent_ids(a)[:2]
    rows = {u["message_id"]: u for u in StateStore(federation.state_dir).updates(result.run_id, kind="Update")}
    assert rows[first]["verdict"] == "accepted" and rows[second]["verdict"] == "duplicate"
    # v1 = w0 + 0.5 * 1; v2 from the next task's honest answer: v1 + 0.5 * 1 = w0 + 1
    # (merging the second answer to the first task instead would give w0 + 2.75)
    w0 = _initial(federation, result.run_id)
    for (name, w), (_, x) in zip(result.weights, w0):
        np.testing.assert_allclose(w, x + 1.0, rtol=1e-5, err_msg=name)
