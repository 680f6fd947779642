"""Privacy loss accumulates across tasks and restarts; the budget is checked before any training.

No bus and no broker: the site's ``TaskHandler`` is called directly, so the in-memory
suite alone catches a ledger that forgets earlier history. The oracle is Opacus' own
``RDPAccountant`` stepped by hand (never ``site_worker.ledger.epsilon_of``).
"""

from __future__ import annotations

import math

import pytest
from opacus.accountants import RDPAccountant

from protocol.codec import new_envelope
from protocol.messages import Declined, TrainTask, Update
from site_worker.config import DatasetSource, SiteConfig, SitePolicy
from site_worker.handlers import TaskHandler

from tests.site_worker.support import experiment_dict, heart_failure_csv, initial_weights

SIGMA, BATCH = 1.0, 32  # the example's noise multiplier and batch size, 1 local epoch


def opacus_epsilon(tasks: int, *, n_train: int, delta: float, metrics_sigma: float) -> float:
    """ε after ``tasks`` tasks: each ceil(n/32) DP-SGD steps at q = 1/ceil(n/32) (Opacus' sample rate)
    plus one Gaussian release of the metrics (q = 1), stepped through Opacus' RDPAccountant."""
    per_epoch = math.ceil(n_train / BATCH)
    acc = RDPAccountant()
    for _ in range(tasks):
        for _ in range(per_epoch):
            acc.step(noise_multiplier=SIGMA, sample_rate=1 / per_epoch)
        acc.step(noise_multiplier=metrics_sigma, sample_rate=1.0)
    return acc.get_epsilon(delta=delta)


def _config(tmp_path, csv, max_epsilon: float) -> SiteConfig:
    return SiteConfig(site_id="s", federation="f", broker_url="memory://x", key_path=tmp_path / "k",
                      coordinator_pub=tmp_path / "p", state_dir=tmp_path / "state",
                      datasets={"heart_failure": DatasetSource(name="heart_failure", path=csv, target="DEATH_EVENT")},
                      policy=SitePolicy(max_epsilon=max_epsilon))


def _task(handler: TaskHandler, exp, round: int):
    task = TrainTask(experiment=exp, weights=initial_weights(exp), dataset="heart_failure", base_round=round - 1,
                     seed=round, deadline=0.0)
    return handler.handle(new_envelope(task, federation="f", run_id="r", round=round, sender="coordinator",
                                       recipient="s"))


def test_epsilon_accumulates_over_tasks_and_a_restart_and_the_budget_stops_before_training(tmp_path, monkeypatch):
    csv = heart_failure_csv(tmp_path / "hf.csv")
    exp = experiment_dict(**{"training.epochs": 1})
    config = _config(tmp_path, csv, 1e6)
    assert config.policy.metrics == "dp"  # the default: released metrics are charged too
    first = _task(TaskHandler(config), exp, 1)
    assert isinstance(first, Update), first

    def expected(tasks: int) -> float:
        return opacus_epsilon(tasks, n_train=first.num_examples, delta=first.delta,
                              metrics_sigma=config.policy.metrics_noise_multiplier)

    assert first.epsilon == pytest.approx(expected(1), rel=1e-9)

    handler = TaskHandler(_config(tmp_path, csv, 1e6))  # a restarted site: same state directory
    second = _task(handler, exp, 2)
    assert isinstance(second, Update), second
    assert second.epsilon == pytest.approx(expected(2), rel=1e-9)
    assert second.epsilon > first.epsilon

    # a budget between 2 and 3 tasks' worth: the third task is declined, and nothing is trained or charged
    cap = (expected(2) + expected(3)) / 2
    capped = TaskHandler(_config(tmp_path, csv, cap))
    before = capped.ledger.history("heart_failure")

    def no_training(*args, **kwargs):
        raise AssertionError("trained although the budget check must decline first")

    monkeypatch.setattr("site_worker.handlers.train", no_training)
    third = _task(capped, exp, 3)
    assert isinstance(third, Declined) and third.reason == "budget", third
    assert third.figures["epsilon_spent"] == pytest.approx(second.epsilon, rel=1e-9)
    assert "epsilon_projected" not in third.figures and expected(3) > cap  # the projection stays local
    assert capped.ledger.history("heart_failure") == before
