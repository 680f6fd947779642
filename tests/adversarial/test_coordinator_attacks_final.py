"""A malicious coordinator's final-model tasks against a real site worker (memory bus and RabbitMQ).

The attacker signs ``PersonalizeTask``s with the real coordinator key. A site fine-tunes
and releases test metrics only for the final model of a run it trained in, once per run,
inside its budget; every other final task loses: nothing is spent, nothing is released.
"""

from __future__ import annotations

import time

import pytest

from protocol.messages import Declined, EvalResult, PersonalizeTask, Update
from site_worker.final_model import FinalStore
from tests.adversarial.site_harness import DATASET, attack  # noqa: F401 - the fixture
from tests.site_worker.support import experiment_dict, initial_weights, uid

PERSONAL = {"training.epochs": 1, "training.personalization": {"mode": "last_layer", "epochs": 1}}


def final_task(exp, *, round: int, seed: int = 5, weights=None) -> PersonalizeTask:
    return PersonalizeTask(experiment=exp, weights=weights if weights is not None else initial_weights(exp, seed=1),
                           dataset=DATASET, base_round=round, seed=seed, deadline=time.time() + 600)


def history(site):
    return [tuple(e) for r in site.ledger.releases(DATASET) for e in r["entries"]]


def test_honest_final_task_fine_tunes_charges_and_answers_once(attack):
    # DP metrics at a small noise multiplier: at the default 5, a noisy count pair tp + fn (or
    # tn + fp) clips to 0 a few times in a hundred, and the site then rightly leaves sensitivity
    # (or specificity) out as undefined; at 0.5 (SD about 1.2 per count) that needs a ~10 SD draw
    site = attack(metrics_noise_multiplier=0.5)
    exp = experiment_dict(**PERSONAL)
    assert isinstance(site.coordinator.train(exp, round=1), Update)
    before = len(site.ledger.releases(DATASET))
    env = site.coordinator.task_envelope(final_task(exp, round=1), round=1)
    frame = site.coordinator.publish(env)
    reply = site.coordinator.reply(timeout=120).payload
    assert isinstance(reply, EvalResult) and reply.task_id == env.message_id
    assert {"accuracy", "personalized_accuracy", "sensitivity", "personalized_specificity",
            "majority_class_accuracy"} <= set(reply.metrics)
    kinds = [r["kind"] for r in site.ledger.releases(DATASET)[before:]]
    assert sorted(kinds) == ["eval", "train"]  # one test release (both models) and the fine-tune
    assert all(r["state"] == "spent" for r in site.ledger.releases(DATASET))
    assert FinalStore(site.config.state_dir).reply(site.coordinator.run_id, DATASET)["task_id"] == env.message_id
    spent = history(site)
    # a crash after the reply was sent but before the ack: the broker redelivers the same task, which
    # gets the same answer from the site's state dir, without a second fine-tune or release
    redelivered = site.worker.handler.handle(env)
    assert isinstance(redelivered, EvalResult) and redelivered.metrics == reply.metrics
    assert history(site) == spent

    # the very same frame again: the replay guard dead-letters it, no second spend, no reply
    site.coordinator.publish_frame(frame, env.message_id)
    assert site.coordinator.no_reply(timeout=3.0)
    assert site.worker.stats["rejected"] == 1
    # a fresh task id for the same run: refused, nothing spent
    again = site.coordinator.send(final_task(exp, round=1, seed=6), round=1)
    assert isinstance(again, Declined) and again.reason == "policy" and "already personalised" in again.detail
    assert history(site) == spent
    site.still_serves()


def test_final_task_for_a_run_the_site_never_joined_is_declined_and_costs_nothing(attack):
    site = attack()
    exp = experiment_dict(**PERSONAL)
    assert isinstance(site.coordinator.train(exp, round=1), Update)  # the site joined *this* run...
    spent = history(site)
    site.coordinator.run_id = uid("run")  # ...the attacker names another, to open a fresh run budget
    reply = site.coordinator.send(final_task(exp, round=1), round=1)
    assert isinstance(reply, Declined) and reply.reason == "policy" and "never trained in it" in reply.detail
    assert history(site) == spent
    assert FinalStore(site.config.state_dir).reply(site.coordinator.run_id, DATASET) is None
    site.still_serves()


def test_final_task_for_an_earlier_round_than_the_site_trained_is_declined(attack):
    site = attack()
    exp = experiment_dict(**PERSONAL)
    assert isinstance(site.coordinator.train(exp, round=1), Update)
    assert isinstance(site.coordinator.train(exp, round=2), Update)
    spent = history(site)
    reply = site.coordinator.send(final_task(exp, round=1), round=1)
    assert isinstance(reply, Declined) and reply.reason == "policy" and "not the run's final model" in reply.detail
    assert history(site) == spent
    site.still_serves()


def test_final_task_that_would_exceed_the_budget_is_declined_with_figures(attack):
    exp = experiment_dict(**{**PERSONAL, "training.personalization": {"mode": "full", "epochs": 5}})
    probe = attack(max_epsilon=1000.0)
    assert isinstance(probe.coordinator.train(exp, round=1), Update)
    after_round = probe.ledger.spent(DATASET, delta=1e-5)
    # a site whose budget covers the round but not five more epochs of fine-tuning
    site = attack(max_epsilon=after_round * 1.2)
    assert isinstance(site.coordinator.train(exp, round=1), Update)
    spent = history(site)
    reply = site.coordinator.send(final_task(exp, round=1), round=1)
    assert isinstance(reply, Declined) and reply.reason == "budget" and "max_epsilon" in reply.detail
    assert reply.figures["max_epsilon"] == pytest.approx(after_round * 1.2)
    assert history(site) == spent  # the metrics reservation was cancelled too: nothing left the site
    assert FinalStore(site.config.state_dir).reply(site.coordinator.run_id, DATASET) is None


@pytest.mark.parametrize("dp", [True, False])
def test_a_fine_tune_longer_than_the_policy_allows_is_declined_before_training(attack, dp):
    site = attack(max_epochs=5, allow_no_dp=not dp)  # without DP no budget would ever stop it
    changes = {**PERSONAL, "training.personalization": {"mode": "full", "epochs": 50}}
    if not dp:
        changes["training.optimizer.differential_privacy"] = {"enabled": False}
    exp = experiment_dict(**changes)
    assert isinstance(site.coordinator.train(exp, round=1), Update)
    spent = history(site)
    reply = site.coordinator.send(final_task(exp, round=1), round=1, timeout=60)
    assert isinstance(reply, Declined) and reply.reason == "policy" and "max_epochs" in reply.detail
    assert history(site) == spent
    site.still_serves()
