"""Reproducible DP never repeats noise on a different release (issue 20, class 6).

A site with ``reproducible_dp`` keys its noise with its dp_seed and the task's seed. The
coordinator picks the task seed, so the attack sends the same seed with different models
(or splits): with the same noise, the difference of two releases is exact. The site records
each seed's first release (a digest of what it is computed from: ``site_worker/noise_keys.py``)
and keys any other release with that seed also with its digest, so only an identical release
(same model, data, plan, policy) gets the same noise, which says nothing new; a restarted site
(same state directory) behaves the same. The first release is keyed by the seeds alone, so a
rerun whose model is one float rounding off still draws the same noise (the chaos suite).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from protocol.codec import new_envelope
from protocol.messages import EvalResult, EvalTask, TrainTask, Update
from site_worker.config import DatasetSource, SiteConfig, SitePolicy
from site_worker.handlers import TaskHandler
from site_worker.secure_rng import SecureRandom

from tests.site_worker.support import experiment_dict, heart_failure_csv, initial_weights


@pytest.fixture
def streams(monkeypatch):
    """Every reproducible stream a site opens: (purpose, its first 8 uniforms)."""
    seen: list[tuple[str, tuple[float, ...]]] = []
    real = SecureRandom.reproducible_from.__func__

    def spy(cls, *args):
        seen.append((args[2], tuple(real(cls, *args).uniform(8))))
        return real(cls, *args)

    monkeypatch.setattr(SecureRandom, "reproducible_from", classmethod(spy))
    return seen


def _handler(tmp_path) -> TaskHandler:
    csv = tmp_path / "hf.csv"
    if not csv.exists():
        heart_failure_csv(csv)
    cfg = SiteConfig(site_id="s", federation="f", broker_url="memory://x", key_path=tmp_path / "k",
                     coordinator_pub=tmp_path / "p", state_dir=tmp_path / "state",
                     datasets={"heart_failure": DatasetSource(name="heart_failure", path=csv, target="DEATH_EVENT")},
                     policy=SitePolicy(max_epsilon=1e6, reproducible_dp=True, dp_seed=7, max_sample_rate=1.0))
    return TaskHandler(cfg)


def _send(handler: TaskHandler, task) -> object:
    return handler.handle(new_envelope(task, federation="f", run_id="r", round=1, sender="coordinator",
                                       recipient="s"))


def _released(r: EvalResult) -> dict:
    return {k: v for k, v in r.metrics.items() if k != "eval_s"}  # the timing is no release


def _eval(exp, weights_seed: int, split: str = "validation", seed: int = 77) -> EvalTask:
    return EvalTask(experiment=exp, weights=initial_weights(exp, seed=weights_seed), dataset="heart_failure",
                    base_round=1, seed=seed, deadline=time.time() + 600, split=split)


def test_a_repeated_seed_gets_new_noise_unless_the_release_is_identical_also_after_a_restart(tmp_path, streams):
    exp = experiment_dict(**{"training.epochs": 1})
    site = _handler(tmp_path)
    a = _send(site, _eval(exp, 1))
    b = _send(site, _eval(exp, 2))  # the attack: same seed, another model
    c = _send(site, _eval(exp, 1, split="test"))  # same seed, another split
    again = _send(site, _eval(exp, 1))  # redelivered / re-asked: an identical release
    assert all(isinstance(r, EvalResult) for r in (a, b, c, again))
    keys = [u for p, u in streams if p == "eval"]
    assert len(keys) == 4
    assert len({keys[0], keys[1], keys[2]}) == 3, "a repeated task seed repeated the noise on a different release"
    assert keys[3] == keys[0] and _released(again) == _released(a)  # reproducible: same inputs, same answer

    restarted = _handler(tmp_path)  # same state directory, new process state
    streams.clear()
    d = _send(restarted, _eval(exp, 2))
    e = _send(restarted, _eval(exp, 3))
    assert isinstance(d, EvalResult) and isinstance(e, EvalResult)
    after = [u for p, u in streams if p == "eval"]
    assert after[0] == keys[1] and _released(d) == _released(b)  # the same release after a restart: the same answer
    assert after[1] not in keys, "a seed repeated across a restart repeated the noise"


def test_training_with_a_repeated_seed_and_other_weights_draws_other_noise(tmp_path, streams):
    exp = experiment_dict(**{"training.epochs": 1})
    site = _handler(tmp_path)

    def train(weights_seed: int) -> Update:
        task = TrainTask(experiment=exp, weights=initial_weights(exp, seed=weights_seed), dataset="heart_failure",
                         base_round=0, seed=11, deadline=time.time() + 600)
        reply = _send(site, task)
        assert isinstance(reply, Update) and reply.reproducible, reply
        return reply

    one, _two, one_again = train(1), train(2), train(1)
    train_keys = [u for p, u in streams if p == "train"]
    metric_keys = [u for p, u in streams if p == "metrics"]
    assert train_keys[0] != train_keys[1] and metric_keys[0] != metric_keys[1]
    assert train_keys[2] == train_keys[0]
    for (_, x), (_, y) in zip(one.weights, one_again.weights):
        assert np.array_equal(x, y)  # identical inputs: bit-identical release (nothing new to learn)


def _one_ulp_off(weights):
    """The same model but one weight one float32 rounding away (a FedAvg sum in another order)."""
    (name, first), *rest = weights
    nudged = first.copy()
    nudged.flat[0] = np.nextafter(nudged.flat[0], np.float32(np.inf), dtype=np.float32)
    return ((name, nudged), *rest)


def test_a_seeds_first_release_gets_the_seeds_noise_so_a_rerun_one_ulp_off_matches_and_a_second_release_does_not(
        tmp_path, streams):
    # The chaos suite's guarantee: a faulted run equals a fault-free one, though the coordinator's
    # sums (arrival order) can differ in the last bit. Stateless digest keys turned that bit into
    # entirely different noise; a seed's first release is keyed by the seeds alone.
    exp = experiment_dict(**{"training.epochs": 1})
    w = initial_weights(exp, seed=1)
    off = _one_ulp_off(w)
    assert any(not np.array_equal(a, b) for (_, a), (_, b) in zip(w, off))

    def ask(site, weights):
        streams.clear()
        task = EvalTask(experiment=exp, weights=weights, dataset="heart_failure", base_round=1, seed=77,
                        deadline=time.time() + 600)
        assert isinstance(_send(site, task), EvalResult)
        return [u for p, u in streams if p == "eval"]

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    site_a, site_b = _handler(tmp_path / "a"), _handler(tmp_path / "b")
    first_a = ask(site_a, w)
    assert ask(site_b, off) == first_a, "a model one ulp off changed the noise of the seed's first release"
    assert ask(site_a, off) != first_a, "a repeated seed repeated the noise on a different release"
    assert ask(_handler(tmp_path / "a"), w) == first_a  # the identical release, after a restart
