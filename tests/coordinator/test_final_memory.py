"""The coordinator's end of a run with fake sites: who gets a PersonalizeTask, what is recorded,
and a site's bad answer to it dead-lettered while the run completes."""

from __future__ import annotations

import math

import pytest

from coordinator.state import StateStore
from protocol.transport.memory import get_broker
from tests.coordinator.conftest import experiment


def personalised(rounds: int = 1, **kw) -> dict:
    exp = experiment(rounds=rounds, **kw)
    exp["training"]["personalization"] = {"mode": "last_layer", "epochs": 1}
    return exp


def test_sites_that_trained_get_the_final_model_the_others_a_test_evaluation(federation):
    a = federation.add_site(1.0, 10, personal_metrics={"accuracy": 0.9, "auc": 0.8, "f1": 0.7, "loss": 0.3})
    b = federation.add_site(1.0, 30, personal_metrics={"accuracy": 0.5, "auc": 0.6, "f1": 0.4, "loss": 0.7})
    c = federation.add_site(1.0, 20, decline="no budget left")  # never trains in this run
    federation.start_sites()
    result = federation.coordinator(personalised()).run()
    assert result.ok, result.reason
    final_tasks = {s.site_id: [e for e in s.tasks if e.type in ("PersonalizeTask", "EvalTask")] for s in (a, b, c)}
    assert [e.type for e in final_tasks[a.site_id]] == ["PersonalizeTask"]
    assert [e.type for e in final_tasks[b.site_id]] == ["PersonalizeTask"]
    assert [(e.type, e.payload.split) for e in final_tasks[c.site_id]] == [("EvalTask", "test")]
    task = final_tasks[a.site_id][0]
    assert task.payload.base_round == task.round == 1
    assert [w.tobytes() for _, w in task.payload.weights] == [w.tobytes() for _, w in result.weights]
    final = result.final
    assert final["split"] == "test" and final["n_test"] == 60
    assert final["per_site"][a.site_id]["personalized"]["accuracy"] == 0.9
    assert final["per_site"][b.site_id]["personalized"]["n_test"] == 30
    assert "personalized" not in final["per_site"][c.site_id]
    assert final["personalized"]["accuracy"] == pytest.approx((10 * 0.9 + 30 * 0.5) / 40)
    assert final["personalized"]["mean_accuracy"] == pytest.approx(0.7)
    assert "fine-tune last_layer 1 epoch(s)" in final["personalized"]["method"]
    # the answers are recorded as accepted test results of the run
    store = StateStore(federation.state_dir)
    rows = [u for u in store.updates(result.run_id, verdict="accepted", kind="EvalResult") if u["split"] == "test"]
    assert sorted(u["site"] for u in rows) == sorted(s.site_id for s in (a, b, c))


@pytest.mark.parametrize("lie,reason", [
    ({"accuracy": math.inf}, "out_of_bounds"),  # not a number the wire carries: refused at decode
    ({"accuracy": 0.9, "n": 1e9}, "count_bound"),  # a well-formed number, more test rows than it announced
])
def test_a_lying_answer_to_the_final_task_is_dead_lettered_and_the_run_completes(federation, lie, reason):
    honest = federation.add_site(1.0, 10)
    # A lying site runs its own code: it seals without codec.seal's sender-side checks.
    liar = federation.add_site(1.0, 30, personal_metrics=lie, unchecked=True)
    federation.start_sites()
    result = federation.coordinator(personalised(), round_timeout_s=5).run()
    assert result.ok, result.reason
    assert [e.type for e in liar.tasks if e.type != "TrainTask"] == ["PersonalizeTask"]  # it did answer the final task
    assert set(result.final["per_site"]) == {honest.site_id}
    bad = [r for r in result.rejected if r["site"] == liar.site_id]
    assert len(bad) == 1 and bad[0]["reason"].startswith(reason), bad
    dead = get_broker(federation.bus_url.split("://")[1]).dead_letters()
    assert [d.reason.split(":")[0] for d in dead if d.queue == f"fedbus.updates.{federation.federation}"] == [reason]
