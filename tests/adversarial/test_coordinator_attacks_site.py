"""A malicious coordinator attacks a site; every attack must fail, and the site keeps serving.

Each test runs on the in-memory bus and on RabbitMQ (``bus_url``), against the production
``SiteWorker`` answering genuinely signed tasks (``site_harness``). Oracles are independent:
Opacus' own accountants stepped by hand, per-sample gradients recomputed here, exact
statistics computed here from the site's rows.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from protocol.config import load_experiment
from protocol.messages import Declined, EvalResult, Update
from protocol.model import build_model, load_tensors, to_tensors
from site_worker.metrics import evaluate
from site_worker.secure_rng import SecureRandom

from tests.adversarial.site_harness import HONEST, attack  # noqa: F401 - the fixture
from tests.site_worker.support import experiment_dict, initial_weights

DP = "training.optimizer.differential_privacy"


def _flat(weights) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for _, a in weights])


def _model(exp: dict, weights) -> torch.nn.Module:
    m = build_model(load_experiment(exp).architecture.layers, seed=0)
    load_tensors(m, weights, strict=True)
    return m


def _clipped_gradient_sum(exp: dict, weights, x: torch.Tensor, y: torch.Tensor, clip: float) -> np.ndarray:
    """Σ_i clip(∇ℓ_i): the un-noised DP-SGD update, recomputed row by row (not with Opacus)."""
    model = _model(exp, weights)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    total = None
    for i in range(len(x)):
        model.zero_grad()
        loss_fn(model(x[i : i + 1]), y[i : i + 1]).backward()
        g = torch.cat([p.grad.detach().double().ravel() for p in model.parameters()])
        g = g * min(1.0, clip / (float(g.norm()) + 1e-6))
        total = g if total is None else total + g
    return total.numpy()


# One full-batch DP-SGD step (q = 1) with plain SGD: w1 = w0 - lr (S + z) / n, so whoever knows
# the noise z recovers the clipped update S exactly. This is the reconstruction the issue ran.
ONE_STEP = {"training.epochs": 1, "training.batch_size": 100_000, "training.optimizer.type": "sgd",
            "training.optimizer.learning_rate": 0.1, f"{DP}.noise_multiplier": 1.0, f"{DP}.max_grad_norm": 1.0}
TASK_SEED = 4242


def _recover(site, exp, sent, update, noise_from) -> tuple[np.ndarray, np.ndarray]:
    """(S_hat, S): the attacker's reconstruction of the clipped update with the noise it
    regenerates, and the true clipped update from the site's training rows."""
    data = site.data(exp)
    n, lr, sigma_c = len(data.x_train), 0.1, 1.0
    step = (_flat(sent) - _flat(update.weights)) * n / lr  # = S + z
    z_hat = noise_from(sent, n, sigma_c)
    return step - z_hat, _clipped_gradient_sum(exp, sent, data.x_train, data.y_train, clip=1.0)


def _old_site_noise(sent, n, std) -> np.ndarray:
    """The noise the site used to draw: torch.Generator seeded from TrainTask.seed + 1, per parameter."""
    gen = torch.Generator().manual_seed(TASK_SEED + 1)
    return np.concatenate([torch.normal(0, std, a.shape, generator=gen).double().numpy().ravel() for _, a in sent])


def test_noise_cannot_be_rebuilt_from_anything_the_coordinator_knows(attack):
    site = attack(max_sample_rate=1.0)
    exp = experiment_dict(**ONE_STEP)
    sent = initial_weights(exp, seed=3)
    update = site.coordinator.train(exp, seed=TASK_SEED, weights=sent)
    assert isinstance(update, Update) and not update.reproducible
    s_hat, s = _recover(site, exp, sent, update, _old_site_noise)
    d = len(s)
    # Knowing the noise would give S to ~1e-4; the secret noise leaves a full-strength N(0, (σC)²) residual.
    assert np.linalg.norm(s_hat - s) > 0.5 * math.sqrt(d)
    z = s_hat + _old_site_noise(sent, 0, 1.0) - s  # the noise the site really added
    assert 0.9 < z.std() < 1.1  # σ·C = 1: the noise is there, at full strength
    assert abs(np.corrcoef(z, _old_site_noise(sent, 0, 1.0))[0, 1]) < 0.1  # and unrelated to the seed's noise
    site.still_serves()


def test_the_reconstruction_succeeds_only_with_the_sites_own_reproducible_seed(attack, monkeypatch):
    """Control for the test above: the same arithmetic recovers S when the noise key is known
    (a site that turned reproducible_dp on and leaked dp_seed and its key material), so the
    refusal above is real."""
    keys: list[tuple] = []
    real = SecureRandom.reproducible_from.__func__

    def spy(cls, *args):
        keys.append(args)
        return real(cls, *args)

    monkeypatch.setattr(SecureRandom, "reproducible_from", classmethod(spy))
    site = attack(max_sample_rate=1.0, reproducible_dp=True, dp_seed=5)
    exp = experiment_dict(**ONE_STEP)
    sent = initial_weights(exp, seed=3)
    update = site.coordinator.train(exp, seed=TASK_SEED, weights=sent)
    assert isinstance(update, Update) and update.reproducible  # reported in the Update

    def site_seed_noise(weights, n, std):
        (key,) = [k for k in keys if k[2] == "train"]
        assert key[:2] == (5, TASK_SEED)
        rng = real(SecureRandom, *key)
        rng.uniform(n)  # the Poisson draw of the one step
        return np.concatenate([rng.gaussian_like(torch.zeros(a.shape, dtype=torch.float64), std).numpy().ravel()
                               for _, a in weights])

    s_hat, s = _recover(site, exp, sent, update, site_seed_noise)
    assert np.linalg.norm(s_hat - s) < 1e-2 * np.linalg.norm(s)
    site.still_serves()


def test_two_dp_runs_with_the_same_seed_differ_and_without_dp_they_are_identical(attack):
    site = attack(allow_no_dp=True)
    exp = experiment_dict(**HONEST)
    sent = initial_weights(exp, seed=1)
    a, b = (site.coordinator.train(exp, seed=9, weights=sent) for _ in range(2))
    assert isinstance(a, Update) and isinstance(b, Update)
    assert not np.array_equal(_flat(a.weights), _flat(b.weights))
    plain = experiment_dict(**{**HONEST, DP: {"enabled": False}})
    c, d = (site.coordinator.train(plain, seed=9, weights=sent) for _ in range(2))
    assert c.epsilon is None and np.array_equal(_flat(c.weights), _flat(d.weights))
    site.still_serves()


@pytest.mark.parametrize("setting, changes, config", [
    ("accountant", {f"{DP}.accountant": "gdp"}, {}),
    ("delta", {f"{DP}.delta": 0.9}, {}),
    ("max_sample_rate", {"training.batch_size": 1000}, {}),
    ("max_epochs", {"training.epochs": 51}, {}),
    ("max_epochs", {}, {"epochs": 500}),  # a per-round override is a request too
    ("max_steps_per_task", {"training.batch_size": 1, "training.epochs": 10}, {}),
    ("min_noise_multiplier", {f"{DP}.noise_multiplier": 0.1}, {}),
    ("min_noise_multiplier", {f"{DP}.noise_multiplier": None, f"{DP}.target_epsilon": 40.0}, {}),
])
def test_requests_above_the_policy_are_declined_naming_the_setting(attack, setting, changes, config):
    site = attack()
    reply = site.coordinator.train(experiment_dict(**{**HONEST, **changes}), config=config)
    assert isinstance(reply, Declined) and reply.reason == "policy", reply
    assert reply.detail.startswith(f"{setting}:"), reply.detail
    assert site.ledger.history("heart_failure") == []  # nothing trained, nothing charged
    site.still_serves()


def test_epsilon_is_reported_at_the_sites_delta_with_the_sites_accountant(attack):
    site = attack()
    reply = site.coordinator.train(experiment_dict(**{**HONEST, f"{DP}.delta": 1e-9}))
    assert isinstance(reply, Update) and reply.delta == 1e-5  # min(1e-5, 1 / (10 x 299 rows))
    site.still_serves()


def _positive_rate_weights(exp: dict):
    """Crafted weights: every logit is +20, so 'accuracy' is the split's positive rate."""
    model = build_model(load_experiment(exp).architecture.layers, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        list(model.parameters())[-1].fill_(20.0)
    return to_tensors(model)


def test_evaluation_on_test_uses_fixed_rows_never_trained_on_and_is_charged(attack):
    exact = attack(metrics="exact", max_evaluations_per_run=4)
    exp = experiment_dict(**HONEST)
    w = initial_weights(exp, seed=2)
    data = exact.data(exp)
    train_rows = {r.tobytes() for r in data.x_train.numpy()}
    assert not any(r.tobytes() in train_rows for r in data.x_test.numpy())  # disjoint, by content
    first = exact.coordinator.evaluate(exp, split="test", weights=w, seed=1)
    assert isinstance(first, EvalResult) and first.num_examples == len(data.x_test)
    want = evaluate(_model(exp, w), data.x_test, data.y_test, loss_name="bce_with_logits", task="binary")
    assert first.metrics["loss"] == pytest.approx(want["loss"], rel=1e-12)
    val = exact.coordinator.evaluate(exp, split="validation", weights=w, seed=1)
    assert val.num_examples == len(data.x_val) and val.metrics["loss"] != first.metrics["loss"]
    for seed in (11, 12):  # training tasks with other seeds do not move the test split
        assert isinstance(exact.coordinator.train(exp, seed=seed), Update)
    again = exact.coordinator.evaluate(exp, split="test", weights=w, seed=99)
    assert again.metrics["loss"] == first.metrics["loss"] and again.num_examples == first.num_examples
    # every evaluation counts against the per-run cap, exact ones included
    cap = exact.coordinator.evaluate(exp, split="test", weights=w)
    assert isinstance(cap, EvalResult)
    refused = exact.coordinator.evaluate(exp, split="test", weights=w)
    assert isinstance(refused, Declined) and refused.detail.startswith("max_evaluations_per_run:")
    exact.still_serves()

    dp = attack()  # metrics = "dp", the deploy default
    reply = dp.coordinator.evaluate(exp, split="test", weights=w)
    assert isinstance(reply, EvalResult)
    assert dp.ledger.history("heart_failure") == [(5.0, 1.0, 1)]  # charged: one Gaussian release
    dp.still_serves()


def test_crafted_weights_do_not_return_the_exact_positive_rate_under_dp_metrics(attack):
    exp = experiment_dict(**HONEST)
    w = _positive_rate_weights(exp)
    dp = attack()
    rate = float(dp.data(exp).y_test.double().mean())
    answers = [dp.coordinator.evaluate(exp, split="test", weights=w).metrics["accuracy"] for _ in range(2)]
    assert all(abs(a - rate) > 1e-6 for a in answers) and answers[0] != answers[1]
    dp.still_serves()
    leak = attack(metrics="exact")  # the named leak: exact metrics reveal it to full precision
    leaked = leak.coordinator.evaluate(exp, split="test", weights=w).metrics["accuracy"]
    assert leaked == pytest.approx(float(leak.data(exp).y_test.double().mean()), abs=1e-12)
    withheld = attack(metrics="none")
    reply = withheld.coordinator.evaluate(exp, split="test", weights=w)
    assert isinstance(reply, Declined) and reply.detail.startswith("metrics:")
    update = withheld.still_serves()
    assert not any(k.startswith(("before_", "after_")) for k in update.metrics)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_ledger_epsilon_equals_an_independent_opacus_accountant_over_every_release(attack, accountant):
    site = attack(accountant=accountant)
    exp = experiment_dict(**{**HONEST, f"{DP}.accountant": accountant})
    per_epoch = -(-len(site.data(exp).x_train) // 32)
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    releases = [("train", 1), ("eval", "test"), ("train", 2), ("eval", "validation"), ("train", 1)]
    last = None
    for kind, arg in releases:
        if kind == "train":
            last = site.coordinator.train(exp, config={"epochs": arg})
            assert isinstance(last, Update), last
            for _ in range(arg * per_epoch):
                acc.step(noise_multiplier=1.0, sample_rate=1 / per_epoch)
            acc.step(noise_multiplier=5.0, sample_rate=1.0)  # its after_* metrics, one Gaussian release
        else:
            assert isinstance(site.coordinator.evaluate(exp, split=arg), EvalResult)
            acc.step(noise_multiplier=5.0, sample_rate=1.0)
    assert last.epsilon == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert site.ledger.spent("heart_failure", delta=1e-5, accountant=accountant) == pytest.approx(last.epsilon)


def test_oversized_models_are_declined_before_anything_is_allocated(attack, monkeypatch):
    site = attack(max_train_memory_mb=256)

    def no_allocation(*args, **kwargs):
        raise AssertionError("the site built the model before checking its size")

    monkeypatch.setattr("site_worker.handlers.build_model", no_allocation)
    huge = experiment_dict(**HONEST)
    layers = huge["architecture"]["layers"]
    layers[1]["params"].update(out_features=4096, features=4096)
    layers[3]["params"].update(in_features=4096, out_features=4096, features=4096)
    layers[5]["params"].update(in_features=4096)
    tiny_weights = initial_weights(experiment_dict(**HONEST))  # the attacker need not even send the weights
    reply = site.coordinator.train(huge, weights=tiny_weights)
    # No parameter cap by default (issue 23): the memory bound refuses it, weights included.
    assert isinstance(reply, Declined) and reply.detail.startswith("max_train_memory_mb:"), reply
    capped = attack(max_train_memory_mb=256, max_parameters=5_000_000)  # a site's explicit cap
    reply = capped.coordinator.train(huge, weights=tiny_weights)
    assert isinstance(reply, Declined) and reply.detail.startswith("max_parameters:"), reply
    # A ~2 M-parameter model no longer fails the bound: ghost clipping holds no per-sample
    # gradients of Linear layers (tests/site_worker/test_ghost_clipping.py has the arithmetic).
    monkeypatch.undo()
    site.still_serves()
