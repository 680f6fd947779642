"""DP metrics releases: the statistics are the exact ones, one row moves them by at most the
documented sensitivity, and the noise has the documented scale."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from protocol.dp_plan import release_entries
from protocol.policy import SitePolicy
from site_worker.metrics import evaluate
from site_worker.release import derive, release_metrics, statistics
from site_worker.secure_rng import SecureRandom


def _model(k: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, k))


def _data(n: int, k: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    return x, y


def test_noise_free_statistics_give_the_exact_metrics():
    x, y = _data(200)
    y = y.float().reshape(-1, 1)
    m = _model()
    layout, v, sens = statistics(m, x, y, loss_name="bce_with_logits", task="binary", clip=1e9)
    got = derive(layout, v, clip=1e9)
    want = evaluate(m, x, y, loss_name="bce_with_logits", task="binary")
    assert layout == "binary" and sens == pytest.approx(math.sqrt(3))
    for k in ("accuracy", "f1", "loss", "n"):
        assert got[k] == pytest.approx(want[k], rel=1e-6), k  # float32 model outputs
    assert abs(got["auc"] - want["auc"]) < 0.05  # binned into 10 score bins
    for k in ("accuracy", "f1", "auc"):  # exact counts: the interval is the test split's size alone
        assert got[k + "_lo"] <= got[k] <= got[k + "_hi"] and got[k + "_hi"] - got[k + "_lo"] < 0.3, k
    xm, ym = _data(150, k=3)
    mm = _model(3)
    layout, v, sens = statistics(mm, xm, ym, loss_name="cross_entropy", task="multiclass", clip=1e9)
    got, want = derive(layout, v, clip=1e9), evaluate(mm, xm, ym, loss_name="cross_entropy", task="multiclass")
    assert sens == pytest.approx(math.sqrt(2)) and got["accuracy"] == pytest.approx(want["accuracy"])
    assert got["f1"] == pytest.approx(want["f1"]) and got["loss"] == pytest.approx(want["loss"])


@pytest.mark.parametrize("task, loss, k", [("binary", "bce_with_logits", 1), ("multiclass", "cross_entropy", 3),
                                           ("regression", "mse", 1)])
def test_one_row_moves_the_statistics_by_at_most_the_sensitivity(task, loss, k):
    x, y = _data(60, k=max(k, 2))
    if task == "binary":
        y = y.float().reshape(-1, 1)
    elif task == "regression":
        y = torch.randn(60, 1) * 10  # large errors: the clipping must bound them
    m = _model(k)
    _, full, sens = statistics(m, x, y, loss_name=loss, task=task, clip=2.0)
    worst = 0.0
    for i in range(60):
        keep = torch.arange(60) != i
        _, less, _ = statistics(m, x[keep], y[keep], loss_name=loss, task=task, clip=2.0)
        worst = max(worst, float(np.linalg.norm(full - less)))
    assert 0 < worst <= sens + 1e-9


def test_dp_release_noise_has_the_documented_scale_and_costs_one_gaussian_entry():
    x, y = _data(300)
    y = y.float().reshape(-1, 1)
    policy = SitePolicy(metrics="dp", metrics_noise_multiplier=2.0)
    assert release_entries(policy) == [(2.0, 1.0, 1)]
    assert release_entries(SitePolicy(metrics="exact")) == [] and release_entries(SitePolicy(metrics="none")) == []
    rng = SecureRandom.secret()
    ns = [release_metrics(_model(), x, y, loss_name="bce_with_logits", task="binary", policy=policy, rng=rng)["n"]
          for _ in range(400)]
    # n is the sum of 4 confusion cells, each with N(0, (2·√3)²): sd 2·√3·2 ≈ 6.9
    assert abs(np.mean(ns) - 300) < 2.0 and 5.5 < np.std(ns) < 8.5
    assert release_metrics(_model(), x, y, loss_name="bce_with_logits", task="binary",
                           policy=SitePolicy(metrics="none"), rng=rng) == {}
