"""Trainer, privacy ledger and policy: ε as Opacus accounts it, persisted, projected, enforced."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from opacus.accountants import RDPAccountant

from protocol.config import load_experiment
from protocol.dp_plan import plan_dp
from protocol.model import build_model, summarize
from protocol.train_spec import TrainSpec
from site_worker.config import DatasetSource, SitePolicy
from site_worker.data import prepare
from site_worker.ledger import BudgetExceeded, PrivacyLedger
from site_worker.policy import PolicyViolation, check_policy
from site_worker.trainer import TrainingAborted, train

from tests.site_worker.support import ECG_CNN, HEART_FAILURE, ecg_arrays, experiment_dict, heart_failure_csv


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    return DatasetSource(name="hf", path=heart_failure_csv(tmp / "hf.csv"), target="DEATH_EVENT")


def _setup(hf, **changes):
    exp = load_experiment(experiment_dict(**changes))
    data = prepare(hf, exp.dataset, seed=3, input_shape=(12,))
    model = build_model(exp.architecture.layers, seed=0)
    return exp, data, model


def test_dp_training_epsilon_equals_opacus_accountant_on_same_steps(hf):
    exp, data, model = _setup(hf, **{"training.epochs": 2})
    spec = TrainSpec.from_experiment(exp, seed=3)
    plan = plan_dp(spec, len(data.x_train))
    per_epoch = -(-len(data.x_train) // 32)
    assert plan.sample_rate == 1 / per_epoch and plan.steps == 2 * per_epoch
    prior = [(2.0, 0.05, 100)]  # earlier spending on this dataset
    before = [p.detach().clone() for p in model.parameters()]
    res = train(model, data, spec, history=prior, plan=plan)
    acc = RDPAccountant()
    acc.history = list(prior)
    for _ in range(2 * per_epoch):
        acc.step(noise_multiplier=1.0, sample_rate=1 / per_epoch)
    assert res.epsilon == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-12)
    assert res.history == [(2.0, 0.05, 100), (1.0, 1 / per_epoch, 2 * per_epoch)]
    assert res.metrics["steps"] == 2 * per_epoch and res.num_examples == len(data.x_train)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for k in ("before_loss", "before_accuracy", "before_auc", "before_f1", "after_loss", "after_auc", "train_s",
              "samples_per_s"):
        assert k in res.metrics
    assert [k for k, _ in model.state_dict().items()] == ["1.weight", "1.bias", "3.weight", "3.bias", "5.weight",
                                                          "5.bias"]


def _weights_after(hf, changes, *, seed=11, rng_factory=None):
    exp, data, model = _setup(hf, **changes)
    spec = TrainSpec.from_experiment(exp, seed=seed)
    train(model, data, spec, rng=rng_factory() if rng_factory else None)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_without_dp_training_is_seeded(hf):
    off = {"training.epochs": 1, "training.optimizer.differential_privacy": {"enabled": False}}
    assert torch.equal(_weights_after(hf, off), _weights_after(hf, off))


def test_dp_noise_is_secret_unless_the_site_seeds_it(hf):
    from site_worker.secure_rng import SecureRandom

    on = {"training.epochs": 1}
    a, b = _weights_after(hf, on), _weights_after(hf, on)  # same task seed, same data, same start
    assert not torch.equal(a, b)
    again = [_weights_after(hf, on, rng_factory=lambda: SecureRandom.reproducible_from(99, 11, "train", b""))
             for _ in range(2)]
    assert torch.equal(again[0], again[1])
    other = _weights_after(hf, on, rng_factory=lambda: SecureRandom.reproducible_from(98, 11, "train", b""))
    assert not torch.equal(other, again[0])


def test_dp_off_reports_no_epsilon_and_target_epsilon_sets_noise(hf):
    exp, data, model = _setup(hf, **{"training.epochs": 1, "training.optimizer.differential_privacy": {"enabled": False},
                                     "training.optimizer.type": "sgd", "training.loss_function": "mse",
                                     "dataset.task": "regression"})
    res = train(model, data, TrainSpec.from_experiment(exp, seed=1))
    assert res.epsilon is None and res.history == [] and "after_mse" in res.metrics
    exp = load_experiment(experiment_dict(**{"training.optimizer.differential_privacy": {"target_epsilon": 2.0},
                                             "training.epochs": 3}))
    spec = TrainSpec.from_experiment(exp, seed=1)
    plan = plan_dp(spec, 239)
    acc = RDPAccountant()
    acc.history = [(plan.noise_multiplier, plan.sample_rate, plan.steps)]
    assert acc.get_epsilon(1e-5) == pytest.approx(2.0, abs=0.05)


def test_stop_event_aborts_between_batches(hf):
    exp, data, model = _setup(hf, **{"training.epochs": 50})
    stop = threading.Event()
    seen = []

    def on_batch(step, total):
        seen.append(step)
        if step == 3:
            stop.set()

    with pytest.raises(TrainingAborted, match=f"after 3 of {50 * -(-len(data.x_train) // 32)}"):
        train(model, data, TrainSpec.from_experiment(exp, seed=1), stop=stop, on_batch=on_batch)
    assert seen == [1, 2, 3]


def test_ecg_cnn_cross_entropy_on_signals(tmp_path):
    xp, yp = ecg_arrays(tmp_path, n=128)
    exp = load_experiment(ECG_CNN)
    src = DatasetSource(name="ecg", path=xp, target="pvc", format="npy", labels_path=yp)
    data = prepare(src, exp.dataset, seed=0, input_shape=tuple(summarize(exp.architecture.layers).input_shape))
    model = build_model(exp.architecture.layers, seed=0)
    res = train(model, data, TrainSpec.from_experiment(exp, seed=0, overrides={"epochs": 1}))
    assert res.epsilon is not None and {"after_accuracy", "after_auc", "after_f1"} <= set(res.metrics)


def test_ledger_reserves_commits_cancels_and_persists(tmp_path):
    led = PrivacyLedger(tmp_path)
    assert led.history("hf") == [] and led.spent("hf", delta=1e-5) == 0.0
    acc = RDPAccountant()
    for _ in range(10):
        acc.step(noise_multiplier=1.1, sample_rate=0.1)
    proj = led.project("hf", noise_multiplier=1.1, sample_rate=0.1, steps=10, delta=1e-5)
    assert proj == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    assert led.history("hf") == []  # projecting records nothing
    spent, projected = led.reserve("hf", release_id="t1", kind="train", entries=[(1.1, 0.1, 10)], delta=1e-5,
                                   accountant="rdp", max_epsilon=None, run_id="r")
    assert spent == 0.0 and projected == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    again = PrivacyLedger(tmp_path)  # a restarted daemon (or a crash before commit): the reservation counts
    assert again.history("hf") == [(1.1, 0.1, 10)]
    again.commit("hf", "t1")
    fresh = RDPAccountant()
    fresh.load_state_dict(again.state_dict("hf"))
    assert fresh.get_epsilon(1e-5) == pytest.approx(acc.get_epsilon(1e-5))
    led.reserve("hf", release_id="t2", kind="train", entries=[(1.1, 0.1, 5)], delta=1e-5, accountant="rdp",
                max_epsilon=None, run_id="r")
    led.cancel("hf", "t2")  # aborted before anything left the site
    led.cancel("hf", "t1")  # a spent release cannot be cancelled
    assert led.history("hf") == [(1.1, 0.1, 10)]
    with pytest.raises(BudgetExceeded, match="max_epsilon") as e:
        led.reserve("hf", release_id="t3", kind="train", entries=[(1.1, 0.1, 10)], delta=1e-5, accountant="rdp",
                    max_epsilon=acc.get_epsilon(1e-5) + 0.01, run_id="r")
    assert e.value.figures["epsilon_spent"] == pytest.approx(acc.get_epsilon(1e-5))
    assert led.history("hf") == [(1.1, 0.1, 10)]  # a refused reservation records nothing
    led.reserve("hf", release_id="e1", kind="eval", entries=[], delta=1e-5, accountant="rdp", max_epsilon=None,
                run_id="r", max_count=(1, "max_evaluations_per_run"))
    with pytest.raises(BudgetExceeded, match="max_evaluations_per_run"):
        led.reserve("hf", release_id="e2", kind="eval", entries=[], delta=1e-5, accountant="rdp", max_epsilon=None,
                    run_id="r", max_count=(1, "max_evaluations_per_run"))
    files = sorted(p.name for p in (tmp_path / "privacy").iterdir())
    assert files == ["hf.json", "hf.lock"]  # no temp files left behind
    assert [r["id"] for r in json.loads((tmp_path / "privacy" / "hf.json").read_text())["releases"]] == ["t1", "e1"]
    assert again.history("other") == []  # per dataset


def test_policy_rules():
    exp = load_experiment(HEART_FAILURE)
    n = summarize(exp.architecture.layers).parameters
    check_policy(SitePolicy(allowed_layers=("Linear", "ReLU"), max_parameters=n, min_noise_multiplier=1.0,
                            max_epsilon=10, allowed_aggregators=("FedAvg",)), exp, parameters=n)
    cases = [
        (SitePolicy(allowed_layers=("Linear",)), "allowed_layers: .*ReLU"),
        (SitePolicy(max_parameters=n - 1), f"max_parameters: model has {n} parameters"),
        (SitePolicy(min_noise_multiplier=1.5), "min_noise_multiplier: .*below .*1.5"),
        (SitePolicy(allowed_aggregators=("FedBuff",)), "allowed_aggregators: .*FedAvg"),
        (SitePolicy(accountant="prv"), "accountant: .*'rdp'.*'prv'"),
    ]
    for pol, text in cases:
        with pytest.raises(PolicyViolation, match=text):
            check_policy(pol, exp, parameters=n)
    no_dp = load_experiment(experiment_dict(**{"training.optimizer.differential_privacy": {"enabled": False}}))
    with pytest.raises(PolicyViolation, match="allow_no_dp: differential privacy is off"):
        check_policy(SitePolicy(), no_dp, parameters=n)
    check_policy(SitePolicy(allow_no_dp=True), no_dp, parameters=n)


def test_batchnorm_fix_that_changes_the_weight_layout_is_refused():
    from site_worker.handlers import _fix_for_dp

    layers = [{"type": "input", "params": {"features": 12}},
              {"type": "Linear", "params": {"in_features": 12, "out_features": 8}},
              {"type": "BatchNorm1d", "params": {"num_features": 8}},
              {"type": "Linear", "params": {"in_features": 8, "out_features": 1}}]
    with pytest.raises(PolicyViolation, match="GroupNorm"):
        _fix_for_dp(build_model(layers, seed=0))
    plain = build_model([layers[0], layers[1], layers[3]], seed=0)
    assert _fix_for_dp(plain) is plain


def test_numpy_auc_and_f1_equal_sklearn_with_ties_and_one_class():
    import numpy as np
    from sklearn.metrics import f1_score, roc_auc_score

    from site_worker.metrics import _f1, binary_auc

    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(2, 120))
        y = rng.integers(0, 2, n)
        score = rng.integers(0, 4, n) / 3.0 if trial % 2 else rng.random(n)  # ties half the time
        pred = (score >= 0.5).astype(np.int64)
        assert _f1(y, pred, 1) == pytest.approx(f1_score(y, pred, zero_division=0), abs=1e-12)
        if len(np.unique(y)) == 2:
            assert binary_auc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
        else:
            assert binary_auc(y, score) is None


def test_handler_reuses_the_model_skeleton_without_leaking_state_between_tasks(tmp_path):
    import numpy as np

    from protocol.codec import new_envelope
    from protocol.messages import TrainTask, Update
    from site_worker.config import SiteConfig
    from site_worker.handlers import TaskHandler

    from tests.site_worker.support import experiment_dict, heart_failure_csv, initial_weights

    csv = heart_failure_csv(tmp_path / "hf.csv")
    cfg = SiteConfig(site_id="s", federation="f", broker_url="memory://x", key_path=tmp_path / "k",
                     coordinator_pub=tmp_path / "p", state_dir=tmp_path / "state",
                     datasets={"heart_failure": DatasetSource(name="heart_failure", path=csv, target="DEATH_EVENT")},
                     policy=SitePolicy(max_epsilon=1e6, metrics="exact", reproducible_dp=True, dp_seed=1))
    handler = TaskHandler(cfg)
    exp = experiment_dict(**{"training.epochs": 1})

    def run(weights_seed: int) -> Update:
        task = TrainTask(experiment=exp, weights=initial_weights(exp, seed=weights_seed), dataset="heart_failure",
                         base_round=0, seed=5, deadline=0.0)
        reply = handler.handle(new_envelope(task, federation="f", run_id="r", round=1, sender="coordinator",
                                            recipient="s"))
        assert isinstance(reply, Update), reply
        return reply

    first, other, again = run(0), run(1), run(0)
    same = all(np.array_equal(a, b) for (_, a), (_, b) in zip(first.weights, again.weights))
    assert same and first.metrics["before_loss"] == again.metrics["before_loss"]
    assert not all(np.array_equal(a, b) for (_, a), (_, b) in zip(first.weights, other.weights))
    assert first.reproducible and again.reproducible
