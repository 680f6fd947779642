"""The final test release: two models' metrics in one Gaussian mechanism, with sensitivity,
specificity and the majority-class baseline derived from the (noisy) counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from site_worker.config import SitePolicy
from site_worker.final_model import release_on_test
from site_worker.metrics import evaluate
from site_worker.release import derive, statistics


class FixedNoise:
    """Stands in for the site's secret RNG: every draw is ``value`` (so the noise is known)."""

    def __init__(self, value: float) -> None:
        self.value = value
        self.draws: list[int] = []

    def standard_normal(self, n: int) -> np.ndarray:
        self.draws.append(n)
        return np.full(n, self.value)


def _data(n: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = (x[:, :1] > 0).float()
    return x, y


def _models():
    torch.manual_seed(1)
    return torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)


def test_dp_release_is_one_mechanism_with_the_joint_sensitivity():
    x, y = _data()
    a, b = _models()
    policy = SitePolicy(metrics="dp", metrics_noise_multiplier=5.0)
    rng = FixedNoise(0.3)
    got = release_on_test([a, b], x, y, y, loss_name="bce_with_logits", task="binary", policy=policy, rng=rng)
    assert len(rng.draws) == 1  # one draw for both models: one Gaussian release
    parts = [statistics(m, x, y, loss_name="bce_with_logits", task="binary", clip=policy.metrics_loss_clip)
             for m in (a, b)]
    joint = math.sqrt(sum(s * s for _, _, s in parts))
    assert joint == pytest.approx(math.sqrt(6.0))
    for (layout, v, _), m in zip(parts, got):
        noisy = v + 0.3 * 5.0 * joint
        want = derive(layout, noisy, clip=policy.metrics_loss_clip)
        assert {k: m[k] for k in want} == pytest.approx(want)
        tn, fp, fn, tp = noisy[:4]
        assert m["sensitivity"] == pytest.approx(tp / (tp + fn))
        assert m["specificity"] == pytest.approx(tn / (tn + fp))
        assert m["majority_class_accuracy"] == pytest.approx(max(tn + fp, fn + tp) / noisy[:4].sum())


def test_exact_release_is_the_exact_metrics_with_the_training_majority():
    x, y = _data()
    a, b = _models()
    y_train = torch.ones(30, 1)  # the training rows' majority is the positive class
    got = release_on_test([a, b], x, y, y_train, loss_name="bce_with_logits", task="binary",
                          policy=SitePolicy(metrics="exact"), rng=None)
    for model, m in zip((a, b), got):
        want = evaluate(model, x, y, loss_name="bce_with_logits", task="binary")
        assert {k: m[k] for k in want} == pytest.approx(want)
        pred = (torch.sigmoid(model(x)) >= 0.5).float()
        pos, neg = y == 1, y == 0
        assert m["sensitivity"] == pytest.approx(float((pred[pos] == 1).float().mean()))
        assert m["specificity"] == pytest.approx(float((pred[neg] == 0).float().mean()))
        assert m["majority_class_accuracy"] == pytest.approx(float((y == 1).float().mean()))


def test_a_model_that_predicts_one_class_is_flagged_under_exact():
    x, y = _data()
    one = torch.nn.Linear(3, 1)
    with torch.no_grad():
        one.weight.zero_()
        one.bias.fill_(5.0)
    (m,) = release_on_test([one], x, y, y, loss_name="bce_with_logits", task="binary",
                           policy=SitePolicy(metrics="exact"), rng=None)
    assert m["predicts_one_class"] == 1.0 and m["specificity"] == 0.0 and m["sensitivity"] == 1.0


def test_metrics_none_releases_nothing():
    x, y = _data()
    a, b = _models()
    assert release_on_test([a, b], x, y, y, loss_name="bce_with_logits", task="binary",
                           policy=SitePolicy(metrics="none"), rng=None) == [{}, {}]
