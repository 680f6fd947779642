"""The site, not the experiment, owns its DP: noise nobody else can derive, epsilon at the site's delta.

``TaskHandler`` is called directly (no bus), with the coordinator's part played by the test:
it sends the very same task twice (same seed, same weights) and asks for a delta of its
choosing. Oracle: Opacus' ``RDPAccountant`` stepped by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from protocol.codec import new_envelope
from protocol.messages import TrainTask, Update
from site_worker.config import DatasetSource, SiteConfig, SitePolicy
from site_worker.handlers import TaskHandler

from tests.site_worker.support import experiment_dict, heart_failure_csv, initial_weights


@pytest.fixture
def handler(tmp_path):
    csv = heart_failure_csv(tmp_path / "hf.csv")
    cfg = SiteConfig(site_id="s", federation="f", broker_url="memory://x", key_path=tmp_path / "k",
                     coordinator_pub=tmp_path / "p", state_dir=tmp_path / "state",
                     datasets={"heart_failure": DatasetSource(name="heart_failure", path=csv, target="DEATH_EVENT")},
                     policy=SitePolicy(max_epsilon=1e6, metrics="exact"))
    return TaskHandler(cfg)


def _train(handler: TaskHandler, exp) -> Update:
    task = TrainTask(experiment=exp, weights=initial_weights(exp), dataset="heart_failure", base_round=0, seed=11,
                     deadline=0.0)
    reply = handler.handle(new_envelope(task, federation="f", run_id="r", round=1, sender="coordinator",
                                        recipient="s"))
    assert isinstance(reply, Update), reply
    return reply


def test_the_same_task_twice_gets_different_noise_and_the_site_delta(handler):
    # the coordinator chose everything in the task, and asks for a delta smaller than the site's
    exp = experiment_dict(**{"training.epochs": 1, "training.optimizer.differential_privacy.delta": 1e-7})
    a, b = _train(handler, exp), _train(handler, exp)
    differ = any(not np.array_equal(x, y) for (_, x), (_, y) in zip(a.weights, b.weights))
    assert differ, "identical updates from an identical task: the DP noise is derived from what the coordinator sent"
    assert not a.reproducible
    # reported at the site's delta (policy default for 299 rows: min(1e-5, 1/(10*299)) = 1e-5), never the experiment's
    assert a.delta == b.delta == pytest.approx(1e-5)
    per_epoch = math.ceil(a.num_examples / 32)
    acc = RDPAccountant()
    for _ in range(2 * per_epoch):  # two tasks, metrics exact (a leak this policy allows, not charged)
        acc.step(noise_multiplier=1.0, sample_rate=1 / per_epoch)
    assert b.epsilon == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)


@pytest.mark.parametrize("asked", [{}, {"training.optimizer.differential_privacy.target_epsilon": 50.0}],
                         ids=["noise-asked", "noise-derived-from-target-epsilon"])
def test_noise_below_the_site_minimum_is_declined_before_anything_is_spent(tmp_path, asked):
    from protocol.messages import Declined

    csv = heart_failure_csv(tmp_path / "hf.csv")
    cfg = SiteConfig(site_id="s", federation="f", broker_url="memory://x", key_path=tmp_path / "k",
                     coordinator_pub=tmp_path / "p", state_dir=tmp_path / "state",
                     datasets={"heart_failure": DatasetSource(name="heart_failure", path=csv, target="DEATH_EVENT")},
                     policy=SitePolicy(max_epsilon=1e6, min_noise_multiplier=2.0))
    handler = TaskHandler(cfg)
    # asks for noise multiplier 1.0, or for a target epsilon whose derived noise is far below 2
    exp = experiment_dict(**{"training.epochs": 1, **asked})
    task = TrainTask(experiment=exp, weights=initial_weights(exp), dataset="heart_failure", base_round=0, seed=11,
                     deadline=0.0)
    reply = handler.handle(new_envelope(task, federation="f", run_id="r", round=1, sender="coordinator",
                                        recipient="s"))
    assert isinstance(reply, Declined) and reply.reason == "policy", reply
    assert "min_noise_multiplier" in reply.detail
    assert handler.ledger.history("heart_failure") == []


class _HighNoise:
    """The metrics noise of one release, fixed at +``sds`` standard deviations on every coordinate."""

    def __init__(self, sds: float) -> None:
        self.sds = sds

    def standard_normal(self, n: int) -> np.ndarray:
        return np.full(n, self.sds)


def test_a_noisy_row_count_is_never_released_above_the_rows_the_site_announced(tmp_path, monkeypatch):
    """The coordinator rejects an evaluation that counts more rows than the site's SiteHello
    announced (coordinator.inbox ``num_examples_bound``). A small hospital's noisy test count
    (~6 rows + noise of SD 2·σ·√3 ≈ 17 at σ = 5) lands above its 30 rows by chance, and its honest,
    already charged, reply was then thrown away. The site clamps the released counts to the
    announced rows: post-processing with a public bound, no extra privacy cost."""
    import time

    from protocol.messages import EvalResult, EvalTask, PersonalizeTask
    from site_worker import handlers
    from site_worker.data import catalogue

    csv = heart_failure_csv(tmp_path / "hf.csv", rows=30)
    source = DatasetSource(name="heart_failure", path=csv, target="DEATH_EVENT")
    cfg = SiteConfig(site_id="s", federation="f", broker_url="memory://x", key_path=tmp_path / "k",
                     coordinator_pub=tmp_path / "p", state_dir=tmp_path / "state",
                     datasets={"heart_failure": source}, policy=SitePolicy(max_epsilon=1e6, max_sample_rate=1.0))
    handler = TaskHandler(cfg)
    announced = catalogue(source).rows
    assert announced == 30
    real = handlers.noise_source
    monkeypatch.setattr(handlers, "noise_source", lambda policy, *, task_seed, purpose, **kw: (
        _HighNoise(3.0) if purpose in ("eval", "final", "metrics") else real(policy, task_seed=task_seed, purpose=purpose,
                                                                             **kw)))
    exp = experiment_dict(**{"training.epochs": 1, "training.personalization": {"mode": "last_layer", "epochs": 1}})

    def send(task, round=1):
        return handler.handle(new_envelope(task, federation="f", run_id="r", round=round, sender="coordinator",
                                           recipient="s"))

    assert isinstance(_train(handler, exp), Update)
    replies = [send(EvalTask(experiment=exp, weights=initial_weights(exp), dataset="heart_failure", base_round=1,
                             seed=3, deadline=time.time() + 600, split=split)) for split in ("test", "validation")]
    replies.append(send(PersonalizeTask(experiment=exp, weights=initial_weights(exp), dataset="heart_failure",
                                        base_round=1, seed=5, deadline=time.time() + 600)))
    for reply in replies:
        assert isinstance(reply, EvalResult), reply
        # coordinator.inbox.check_eval: max(n, num_examples) must not exceed the announced rows
        assert max(reply.metrics["n"], reply.num_examples) <= announced, reply.metrics
        assert reply.metrics["n"] == reply.num_examples == announced  # +3 SDs on a 30-row file: clamped
        assert reply.metrics.get("personalized_n", 0) <= announced
    assert replies[-1].metrics["personalized_n"] == announced
