"""The run loop on the in-memory bus with fake sites: FedAvg, FedAsync, evaluation, bad updates."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.checkpoints import load_tensors
from coordinator.state import StateStore
from tests.coordinator.conftest import experiment


def test_fedavg_three_sites_two_rounds_is_the_weighted_mean(federation):
    for offset, n in ((1.0, 10), (2.0, 30), (4.0, 60)):
        federation.add_site(offset, n)
    federation.start_sites()
    coord = federation.coordinator(experiment(rounds=2))
    result = coord.run()
    assert result.ok, result.reason
    # each round adds the weighted mean of the offsets: (10*1 + 30*2 + 60*4) / 100 = 3.1
    store = StateStore(federation.state_dir)
    run = store.run(result.run_id)
    initial = load_tensors(federation.state_dir / run["initial_checkpoint"])
    for (name, w), (_, w0) in zip(result.weights, initial):
        np.testing.assert_allclose(w, w0 + 6.2, rtol=1e-5, err_msg=name)
    doc = result.to_json()
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    assert all(r["replies"] == 3 for r in doc["rounds"])
    # round loss = after_loss of every site (1/(1+round)) weighted by n_val
    assert doc["rounds"][0]["loss"] == pytest.approx(0.5)
    assert doc["final"]["accuracy"] == pytest.approx(0.75)
    assert set(doc["final"]["per_site"]) == {s.site_id for s in federation.sites}
    assert doc["final"]["per_site"][federation.sites[2].site_id]["n_test"] == 60
    assert doc["epsilon"] == {s.site_id: pytest.approx(1.5) for s in federation.sites}
    assert doc["rejected"] == []
    assert len(store.updates(result.run_id, verdict="accepted", kind="Update")) == 6
    # every site got a task per round with the right base round, and the right seeds are deterministic
    assert sorted(e.payload.base_round for e in federation.sites[0].tasks if e.type == "TrainTask") == [0, 1]


def _frames_for_bad_updates(site, task_env, honest_env, honest_frame):
    """Before its honest update, site sends: tampered, wrong shape, NaN, wrong round; then a replay."""
    import numpy as np

    from protocol.messages import Update

    task = task_env.payload
    if task_env.round != 1:
        return None
    bad = []
    # tampered: one byte of the signed body flipped
    frame = bytearray(honest_frame)
    frame[len(frame) // 2] ^= 0x01
    bad.append((bytes(frame), honest_env.message_id + "t"))

    def update(weights, **kw):
        p = Update(task_id=task_env.message_id, weights=weights, num_examples=5, metrics={}, epsilon=None,
                   delta=None, base_round=task.base_round)
        env, f = site.reply(task_env, p, **kw)
        return f, env.message_id

    w = list(task.weights)
    name, a = w[0]
    bad.append(update(tuple([(name, np.zeros((a.shape[0], a.shape[1] + 1), np.float32))] + w[1:])))  # wrong shape
    nan = a.copy()
    nan[0, 0] = np.nan
    bad.append(update(tuple([(name, nan)] + w[1:])))  # NaN
    bad.append(update(task.weights, round=task_env.round + 5))  # wrong round
    return bad + [(honest_frame, honest_env.message_id), (honest_frame, honest_env.message_id)]  # + replay


def test_each_bad_update_is_rejected_with_its_reason_and_the_run_completes(federation):
    from protocol.codec import new_envelope, seal
    from protocol.messages import Update
    from protocol.signing import Signer
    from protocol.transport.memory import get_broker
    from protocol.transport.topology import UPDATES

    bad = federation.add_site(1.0, 10, tamper=_frames_for_bad_updates)
    federation.add_site(1.0, 10)
    intruder = federation.add_site(1.0, 10, enroll=False)  # not enrolled: its key is unknown
    federation.start_sites()
    # the intruder also forges a first-round update out of the blue
    env = new_envelope(Update(task_id="x", weights=(), num_examples=1, metrics={}, epsilon=None, delta=None,
                              base_round=0), federation=federation.federation, run_id="?", round=1,
                       sender=intruder.site_id, recipient="coordinator")
    coord = federation.coordinator(experiment(rounds=2), sites=[s.site_id for s in federation.sites[:2]])
    federation.bus.publish(UPDATES, federation.federation, seal(env, Signer.generate()), message_id=env.message_id)
    result = coord.run()
    assert result.ok, result.reason
    reasons = [r["reason"].split(":")[0] for r in result.rejected]
    assert sorted(reasons) == sorted(["bad_signature", "wrong_shape", "non_finite", "wrong_round", "replayed",
                                      "unknown_signer"])
    assert {r["round"] for r in result.rejected} <= {1, 2, 6}  # the wrong-round one claims round 6
    assert any(r["site"] == bad.site_id and r["reason"].startswith("non_finite") for r in result.rejected)
    # both rounds still aggregated both honest sites
    assert [r["replies"] for r in result.to_json()["rounds"]] == [2, 2]
    # the rejected frames wait in the dead-letter queue with the reason
    dead = get_broker(federation.bus_url.split("://")[1]).dead_letters()
    dead_reasons = sorted(d.reason.split(":")[0] for d in dead if d.queue == f"fedbus.updates.{federation.federation}")
    assert dead_reasons == sorted(reasons)
    # the intruder's hello was refused too
    assert [d.reason.split(":")[0] for d in dead if d.queue.startswith("fedbus.control.")] == ["unknown_signer"]


def test_a_declined_site_is_shown_with_its_reason(federation):
    federation.add_site(1.0, 10)
    federation.add_site(3.0, 10)
    federation.add_site(5.0, 10, decline="epsilon 3.1 would exceed max_epsilon 3.0")
    federation.start_sites()
    result = federation.coordinator(experiment(rounds=1)).run()
    assert result.ok
    assert [d["reason"] for d in result.declined] == ["budget: epsilon 3.1 would exceed max_epsilon 3.0"]
    # not "completed": the run names the site, the round and the reason, in the result and the store
    gone = federation.sites[2].site_id
    assert result.status == "completed_with_gaps"
    assert result.gaps == [{"round": 1, "site": gone,
                            "reason": "declined: budget: epsilon 3.1 would exceed max_epsilon 3.0"}]
    assert gone in result.reason and "round 1" in result.reason
    stored = StateStore(federation.state_dir).run(result.run_id)
    assert stored["status"] == "completed_with_gaps" and stored["result"]["gaps"] == result.gaps
    assert result.rounds[0]["replies"] == 2
    store = StateStore(federation.state_dir)
    w0 = load_tensors(federation.state_dir / store.run(result.run_id)["initial_checkpoint"])
    np.testing.assert_allclose(result.weights[0][1], w0[0][1] + 2.0, rtol=1e-6)  # mean of offsets 1 and 3


@pytest.mark.slow
def test_a_site_killed_mid_run_the_round_closes_at_the_deadline_with_the_others(federation):
    federation.add_site(1.0, 10)
    federation.add_site(3.0, 30)
    federation.add_site(100.0, 10, stop_after_round=1)  # answers round 1, then it is gone
    federation.start_sites()
    exp = experiment(rounds=2, parameters={"min_fit_clients": 2, "min_available_clients": 2})
    result = federation.coordinator(exp, round_timeout_s=1.5).run()
    assert result.ok, result.reason
    assert [r["replies"] for r in result.rounds] == [3, 2]
    assert result.rounds[1]["wall_s"] >= 1.4  # waited for the deadline, then closed with the two others
    store = StateStore(federation.state_dir)
    w0 = load_tensors(federation.state_dir / store.run(result.run_id)["initial_checkpoint"])
    # round 1: (10*1 + 30*3 + 10*100)/50 = 22; round 2: (10*1 + 30*3)/40 = 2.5
    np.testing.assert_allclose(result.weights[1][1], w0[1][1] + 24.5, rtol=1e-5)
    assert set(result.final["per_site"]) == {s.site_id for s in federation.sites[:2]}
    assert result.status == "completed_with_gaps"
    assert result.gaps == [{"round": 2, "site": federation.sites[2].site_id, "reason": "no reply by the round's deadline"}]


def test_too_few_replies_fails_the_run_after_the_retries_with_a_clear_reason(federation):
    federation.add_site(1.0, 10)
    federation.add_site(1.0, 10, silent=True)
    federation.start_sites()
    exp = experiment(rounds=1, max_round_retries=1)
    result = federation.coordinator(exp, round_timeout_s=0.3).run()
    assert result.status == "failed"
    assert "round 1: 1 update(s) accepted by the deadline but min_fit_clients=2, after 1 retries" in result.reason
    assert federation.sites[1].site_id in result.reason
    # the silent site was asked twice (the retry)
    assert len([e for e in federation.sites[1].tasks if e.type == "TrainTask"]) == 2
    assert StateStore(federation.state_dir).run(result.run_id)["status"] == "failed"


def test_fedasync_run_merges_each_update_and_re_tasks_the_site_at_once(federation):
    federation.add_site(1.0, 10)
    federation.add_site(1.0, 10)
    federation.start_sites()
    exp = experiment(rounds=4, name="FedAsync", parameters={"alpha": 0.5, "staleness": "polynomial", "max_staleness": 0})
    result = federation.coordinator(exp).run()
    assert result.ok, result.reason
    store = StateStore(federation.state_dir)
    assert [r["round"] for r in store.rounds(result.run_id)] == [1, 2, 3, 4]  # one committed version per merge
    accepted = store.updates(result.run_id, verdict="accepted", kind="Update")
    assert len(accepted) == 4 and all(u["staleness"] == 0 for u in accepted)
    for u in store.updates(result.run_id, verdict="stale"):
        assert "> max_staleness 0" in u["reason"]
    # every accepted merge moved the model halfway to (model + 1): w4 = w0 + (1 - 0.5^4) * ... per merge +0.5
    w0 = load_tensors(federation.state_dir / store.run(result.run_id)["initial_checkpoint"])
    np.testing.assert_allclose(result.weights[1][1], w0[1][1] + 4 * 0.5, rtol=1e-5)
    # a delivering site got its next task with the new version straight away
    tasks = sorted(e.payload.base_round for s in federation.sites for e in s.tasks if e.type == "TrainTask")
    assert tasks[:2] == [0, 0] and max(tasks) >= 3


def test_fedbuff_run_steps_every_k_updates(federation):
    for _ in range(2):
        federation.add_site(2.0, 10)
    federation.start_sites()
    exp = experiment(rounds=2, name="FedBuff", parameters={"buffer_size": 2, "server_lr": 1.0, "max_staleness": 10})
    result = federation.coordinator(exp).run()
    assert result.ok, result.reason
    store = StateStore(federation.state_dir)
    rounds = store.rounds(result.run_id)
    assert [r["replies"] for r in rounds] == [2, 2]
    assert len(store.updates(result.run_id, verdict="accepted", kind="Update")) == 4
    # every update merged: the run says "completed", not "completed with gaps" (each update is filed
    # under the version it was trained from, one before the version that merged it)
    assert result.status == "completed" and result.gaps == [], (result.status, result.gaps)


def test_per_round_metrics_come_from_evaluation_tasks_when_fraction_eval_is_set(federation):
    a = federation.add_site(1.0, 10)
    b = federation.add_site(1.0, 30)
    a.eval_metrics = {"loss": 1.0, "accuracy": 0.5, "auc": 0.5, "f1": 0.5}
    b.eval_metrics = {"loss": 0.2, "accuracy": 0.9, "auc": 0.9, "f1": 0.9}
    federation.start_sites()
    exp = experiment(rounds=1, parameters={"fraction_eval": 1.0, "min_eval_clients": 2})
    result = federation.coordinator(exp).run()
    assert result.ok
    # (10*1.0 + 30*0.2)/40 = 0.4 — not the after_loss of the updates (0.5)
    assert result.rounds[0]["loss"] == pytest.approx(0.4)
    assert result.final["accuracy"] == pytest.approx((10 * 0.5 + 30 * 0.9) / 40)
    assert result.final["per_site"][b.site_id] == pytest.approx({"accuracy": 0.9, "auc": 0.9, "f1": 0.9, "loss": 0.2,
                                                                 "n_test": 30})
    kinds = [e.payload.split for e in a.tasks if e.type == "EvalTask"]
    assert kinds == ["validation", "test"]


def test_flower_strategy_run_checkpoints_its_server_state(federation):
    federation.add_site(1.0, 10)
    federation.add_site(3.0, 10)
    federation.start_sites()
    exp = experiment(rounds=2, name="flower:FedAdam", parameters={"eta": 0.05})
    result = federation.coordinator(exp).run()
    assert result.ok, result.reason
    store = StateStore(federation.state_dir)
    last = store.last_round(result.run_id)
    state = dict(load_tensors(federation.state_dir / last["agg_state_path"], sha256=last["agg_state_sha256"]))
    assert any(k.startswith("m_t.") for k in state) and any(k.startswith("v_t.") for k in state)


def test_early_stopping_ends_the_run_when_the_loss_stops_improving(federation):
    federation.add_site(1.0, 10)
    federation.add_site(1.0, 10)
    for s in federation.sites:
        s.eval_metrics = {"loss": 0.7, "accuracy": 0.5, "auc": 0.5, "f1": 0.5}  # never improves
    federation.start_sites()
    exp = experiment(rounds=10, parameters={"fraction_eval": 1.0}, early_stopping={"patience": 2, "min_delta": 0.01})
    result = federation.coordinator(exp).run()
    assert result.ok
    assert [r["round"] for r in result.rounds] == [1, 2, 3]  # best at 1, no improvement at 2 and 3


def test_resume_in_process_continues_after_the_last_committed_round(federation):
    from coordinator.run import RunFailed  # noqa: F401  (the public failure type)

    federation.add_site(1.0, 10)
    federation.add_site(3.0, 30)
    federation.start_sites()
    first = federation.coordinator(experiment(rounds=1), run_id="r-resume").run()
    assert first.ok
    store = StateStore(federation.state_dir)
    # pretend the process died after round 1: mark the run unfinished and ask for 3 rounds
    store.finish_run("r-resume", status="running", reason=None, result=None)
    with store._tx() as db:
        db.execute("UPDATE runs SET rounds_planned=3 WHERE run_id='r-resume'")
    resumed = federation.coordinator(experiment(rounds=3), run_id="r-resume", resume=True).run()
    assert resumed.ok
    assert [r["round"] for r in resumed.rounds] == [1, 2, 3]
    w0 = load_tensors(federation.state_dir / store.run("r-resume")["initial_checkpoint"])
    np.testing.assert_allclose(resumed.weights[0][1], w0[0][1] + 3 * 2.5, rtol=1e-5)
    with pytest.raises(Exception, match="already exists"):
        federation.coordinator(experiment(rounds=3), run_id="r-resume").run()


def test_progress_goes_to_stderr(federation, capsys):
    federation.add_site(1.0, 10)
    federation.add_site(1.0, 10)
    federation.start_sites()
    result = federation.coordinator(experiment(rounds=2), progress=True).run()
    assert result.ok
    captured = capsys.readouterr()
    assert "round" in captured.err and "2/2" in captured.err
    assert "2/2" not in captured.out  # the bar never goes to stdout (the --json document does)


def test_fedasync_rejects_updates_staler_than_max_staleness_and_re_tasks_the_site(federation):
    import threading

    gate = threading.Event()
    fast = federation.add_site(1.0, 10)
    slow = federation.add_site(1.0, 10, gate={0: gate})  # answers its first task only after fast made 2 versions
    federation.start_sites()
    opener = threading.Thread(target=lambda: fast.wait_replied("Update", 1, timeout=60) and gate.set())
    opener.start()
    exp = experiment(rounds=5, name="FedAsync", parameters={"alpha": 0.5, "max_staleness": 1})
    result = federation.coordinator(exp).run()
    opener.join()
    assert result.ok, result.reason
    store = StateStore(federation.state_dir)
    stale = store.updates(result.run_id, verdict="stale")
    assert [(u["site"], u["base_round"]) for u in stale] == [(slow.site_id, 0)]
    assert stale[0]["reason"] in ("staleness 2 > max_staleness 1", "staleness 3 > max_staleness 1")
    # the stale site got a fresh task with a newer model at once
    assert any(e.payload.base_round >= 2 for e in slow.tasks if e.type == "TrainTask")
    assert all(u["staleness"] <= 1 for u in store.updates(result.run_id, verdict="accepted", kind="Update"))


def test_a_late_update_is_logged_and_dropped(federation):
    import threading

    gate = threading.Event()
    a = federation.add_site(1.0, 10)
    federation.add_site(1.0, 10)
    late = federation.add_site(50.0, 10, gate={1: gate})  # its round-1 answer comes after the deadline

    def open_when_round_2_started():
        with a._cond:
            a._cond.wait_for(lambda: any(e.round == 2 for e in a.tasks), timeout=60)
        gate.set()

    opener = threading.Thread(target=open_when_round_2_started)
    opener.start()
    federation.start_sites()
    result = federation.coordinator(experiment(rounds=2), round_timeout_s=1.0).run()
    opener.join()
    assert result.ok, result.reason
    assert [r["replies"] for r in result.rounds] == [2, 3]
    rows = StateStore(federation.state_dir).updates(result.run_id, verdict="late")
    assert [(u["site"], u["round"]) for u in rows] == [(late.site_id, 1)]
    assert rows[0]["reason"] == "for round 1, now in round 2"
