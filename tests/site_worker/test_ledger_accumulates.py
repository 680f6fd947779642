"""Privacy loss accumulates across tasks and restarts; the budget is checked before any training.

No bus and no broker: the site's ``TaskHandler`` is called directly, so the in-memory
suite alone catches a ledger that forgets earlier history. The oracle is Opacus' own
``RDPAccountant`` stepped by hand (never ``site_worker.ledger.epsilon_of``).
"""

from __future__ import annotations

import pytest
from opacus.accountants import RDPAccountant

from protocol.codec import new_envelope
from protocol.messages import Declined, TrainTask, Update
from site_worker.config import DatasetSource, SiteConfig, SitePolicy
from site_worker.handlers import TaskHandler

from tests.site_worker.support import experiment_dict, heart_failure_csv, initial_weights

# heart failure: 239 training rows, batch 32 -> 8 Poisson batches per epoch at q = 1/8; sigma from the example
SIGMA, Q, STEPS = 1.0, 1 / 8, 8


def opacus_epsilon(steps: int, delta: float) -> float:
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=SIGMA, sample_rate=Q)
    return acc.get_epsilon(delta=delta)


def _config(tmp_path, csv, max_epsilon: float) -> SiteConfig:
    return SiteConfig(site_id="s", federation="f", broker_url="memory://x", key_path=tmp_path / "k",
                      coordinator_pub=tmp_path / "p", state_dir=tmp_path / "state",
                      datasets={"heart_failure": DatasetSource(name="heart_failure", path=csv, target="DEATH_EVENT")},
                      policy=SitePolicy(max_epsilon=max_epsilon))


def _task(handler: TaskHandler, exp, round: int):
    task = TrainTask(experiment=exp, weights=initial_weights(exp), dataset="heart_failure", base_round=round - 1,
                     seed=round, deadline=0.0, config={})
    return handler.handle(new_envelope(task, federation="f", run_id="r", round=round, sender="coordinator",
                                       recipient="s"))


def test_epsilon_accumulates_over_tasks_and_a_restart_and_the_budget_stops_before_training(tmp_path, monkeypatch):
    csv = heart_failure_csv(tmp_path / "hf.csv")
    exp = experiment_dict(**{"training.epochs": 1})
    first = _task(TaskHandler(_config(tmp_path, csv, 1e6)), exp, 1)
    assert isinstance(first, Update), first
    delta = first.delta
    assert first.epsilon == pytest.approx(opacus_epsilon(STEPS, delta), rel=1e-9)

    handler = TaskHandler(_config(tmp_path, csv, 1e6))  # a restarted site: same state directory
    second = _task(handler, exp, 2)
    assert isinstance(second, Update), second
    assert second.epsilon == pytest.approx(opacus_epsilon(2 * STEPS, delta), rel=1e-9)
    assert second.epsilon > first.epsilon

    # a budget between 2 and 3 tasks' worth: the third task is declined, and nothing is trained or charged
    cap = (opacus_epsilon(2 * STEPS, delta) + opacus_epsilon(3 * STEPS, delta)) / 2
    capped = TaskHandler(_config(tmp_path, csv, cap))
    before = capped.ledger.history("heart_failure")

    def no_training(*args, **kwargs):
        raise AssertionError("trained although the budget check must decline first")

    monkeypatch.setattr("site_worker.handlers.train", no_training)
    third = _task(capped, exp, 3)
    assert isinstance(third, Declined) and third.reason == "budget", third
    assert third.figures["epsilon_spent"] == pytest.approx(second.epsilon, rel=1e-9)
    assert third.figures["epsilon_projected"] == pytest.approx(opacus_epsilon(3 * STEPS, delta), rel=1e-9)
    assert capped.ledger.history("heart_failure") == before
