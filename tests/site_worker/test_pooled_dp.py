"""The site's pooled-DP step (site_worker/pooled_dp.py) and its noise (site_worker/secure_rng.py).

- Poisson and Skellam draws from the secret stream have the right mean and variance (each
  checked against a stated tolerance of several standard errors);
- the batch sum rounds *per sample*: it equals sum_i round(s * clip(g_i)) computed row by row,
  and one record moves it by at most Delta2 in L2;
- the ledger charges a pooled step under "skellam-rdp" exactly what the accountant says;
- the site's ``assume_honest_sites`` is read from site.toml with bounds.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from protocol.policy import MAX_ASSUMED_HONEST, SitePolicy
from protocol.secagg import skellam
from site_worker.config import SiteConfigError, site_config_from_dict
from site_worker.ledger import PrivacyLedger
from site_worker.metrics import make_loss, prepare_target
from site_worker.pooled_dp import PooledRefused, PooledStep, check_contributors, integer_gradient_sum, noise_share
from site_worker.secure_rng import SecureRandom
from tests.site_worker.test_config import base  # noqa: F401  (fixture)

N = 200_000


@pytest.mark.parametrize("lam", [0.3, 4.0, 9.99, 10.0, 137.5, 4.2e6])
def test_poisson_draws_have_the_rate_as_mean_and_variance(lam: float) -> None:
    x = SecureRandom.secret().poisson(lam, N)
    assert x.dtype == np.int64 and x.min() >= 0
    se_mean = math.sqrt(lam / N)
    se_var = lam * math.sqrt((2 + 1 / lam) / N)  # Var of the sample variance of a Poisson
    assert abs(x.mean() - lam) < 6 * se_mean
    assert abs(x.var() - lam) < 6 * se_var


def test_poisson_refuses_a_bad_rate() -> None:
    rng = SecureRandom.secret()
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="finite rate"):
            rng.poisson(bad, 3)
    assert rng.poisson(0.0, 4).tolist() == [0, 0, 0, 0]


def test_skellam_shares_of_m_sites_sum_to_the_pooled_variance() -> None:
    mu, m = 2.5e5, 4
    total = sum(noise_share(mu, m, N, SecureRandom.secret()) for _ in range(m))
    assert abs(total.mean()) < 6 * math.sqrt(2 * mu / N)
    assert abs(total.var() / (2 * mu) - 1) < 6 * math.sqrt(2 / N)  # 1.9 %: six standard errors
    with pytest.raises(PooledRefused, match="assume_honest_sites"):
        noise_share(mu, 0, 3, SecureRandom.secret())


def _model() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))


def _data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 6, generator=g) * 3
    return x, (x[:, 0] > 0).float().reshape(-1, 1)


def _row_by_row(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float, scale: float) -> np.ndarray:
    """The reference: each row's gradient alone, clipped, scaled and rounded, then summed."""
    loss_fn = make_loss("bce_with_logits")
    total = None
    for i in range(len(x)):
        model.zero_grad()
        out = model(x[i:i + 1])
        loss_fn(out, prepare_target(y[i:i + 1], out, "bce_with_logits")).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
        g = g * min(1.0, clip / (float(g.norm()) + 1e-12))
        r = torch.round(g * scale).to(torch.int64).numpy()
        total = r if total is None else total + r
    assert total is not None
    return total


@pytest.mark.parametrize("scale", [3.0, 1000.0])
def test_the_batch_sum_rounds_each_record_separately(scale: float) -> None:
    model, (x, y) = _model(), _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        got = integer_gradient_sum(model, "bce_with_logits", x, y, clip=0.5, scale=scale)
    # the model is left as it was: no hooks, no per-sample gradients
    assert all(not hasattr(p, "grad_sample") and p.grad is None for p in model.parameters())
    assert not model._forward_hooks and not model[0]._forward_hooks
    want = _row_by_row(model, x, y, 0.5, scale)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)


def test_one_record_moves_the_sum_by_at_most_delta2() -> None:
    model, (x, y) = _model(), _data()
    clip, scale = 0.5, 50.0
    dim = sum(p.numel() for p in model.parameters())
    _, l2 = skellam.sensitivities(clip, scale, dim)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        full = integer_gradient_sum(model, "bce_with_logits", x, y, clip=clip, scale=scale)
        for i in range(0, len(x), 7):
            keep = torch.tensor([j for j in range(len(x)) if j != i])
            less = integer_gradient_sum(model, "bce_with_logits", x[keep], y[keep], clip=clip, scale=scale)
            assert np.linalg.norm((full - less).astype(float)) <= l2
    empty = integer_gradient_sum(model, "bce_with_logits", x[:0], y[:0], clip=clip, scale=scale)
    assert empty.tolist() == [0] * dim


def test_the_ledger_charges_a_pooled_step_exactly_what_the_accountant_says(tmp_path: Path) -> None:
    step = PooledStep(clip=0.5, scale=1024.0, mu=3e7, sample_rate=0.25, max_batch=128, assume_honest_sites=3)
    ledger = PrivacyLedger(tmp_path)
    entry = step.entry(26)
    for i in range(5):
        spent, projected = ledger.reserve("d", release_id=f"r{i}", kind="train", entries=[], delta=1e-5,
                                          accountant=skellam.ACCOUNTANT, max_epsilon=None, run_id="run",
                                          pooled=[entry])
        ledger.commit("d", f"r{i}")
    planned = skellam.epsilon_of([skellam.SkellamEntry(entry.mu, entry.l1, entry.l2, 0.25, 5)], delta=1e-5)
    assert ledger.spent("d", delta=1e-5, accountant=skellam.ACCOUNTANT) == pytest.approx(planned, rel=1e-12)
    assert projected == pytest.approx(planned, rel=1e-12)
    # a Gaussian release on top composes in RDP: more than either alone
    after = ledger.project_entries("d", [(1.0, 1.0, 1)], delta=1e-5, accountant="rdp")
    assert after > planned
    with pytest.raises(ValueError, match="RDP only"):
        ledger.spent("d", delta=1e-5, accountant="prv")


def test_the_ledger_refuses_a_pooled_step_past_max_epsilon(tmp_path: Path) -> None:
    from site_worker.ledger import BudgetExceeded

    entry = PooledStep(0.5, 1024.0, 3e7, 1.0, 128, 2).entry(26)
    one = skellam.epsilon_of([entry], delta=1e-5)
    ledger = PrivacyLedger(tmp_path)
    ledger.reserve("d", release_id="a", kind="train", entries=[], delta=1e-5, accountant=skellam.ACCOUNTANT,
                   max_epsilon=one * 1.0001, run_id="run", pooled=[entry])
    with pytest.raises(BudgetExceeded, match="max_epsilon"):
        ledger.reserve("d", release_id="b", kind="train", entries=[], delta=1e-5, accountant=skellam.ACCOUNTANT,
                       max_epsilon=one * 1.0001, run_id="run", pooled=[entry])


def test_fewer_contributors_than_assumed_honest_sites_are_refused() -> None:
    check_contributors(3, min_contributors=2, assume_honest_sites=3)  # just inside
    with pytest.raises(PooledRefused, match="min_contributors: a sum of 2 site"):
        check_contributors(2, min_contributors=2, assume_honest_sites=3)


def test_assume_honest_sites_is_read_from_site_toml_with_bounds(base) -> None:  # noqa: F811
    raw, tmp = base
    assert site_config_from_dict(raw, base_dir=tmp).policy.assume_honest_sites == 1  # the site's own noise
    for ok in (1, 3, MAX_ASSUMED_HONEST):
        raw["policy"]["assume_honest_sites"] = ok
        assert site_config_from_dict(raw, base_dir=tmp).policy.assume_honest_sites == ok
    for bad, why in ((0, ">= 1"), (MAX_ASSUMED_HONEST + 1, f"<= {MAX_ASSUMED_HONEST}"), ("3", "integer"), (True, "integer")):
        raw["policy"]["assume_honest_sites"] = bad
        with pytest.raises(SiteConfigError, match=why) as e:
            site_config_from_dict(raw, base_dir=tmp)
        assert e.value.key == "policy.assume_honest_sites"
    raw["policy"]["assume_honest_sites"] = 4
    summary = site_config_from_dict(raw, base_dir=tmp).policy.summary()
    assert summary["assume_honest_sites"] == 4 and SitePolicy.from_summary(summary).assume_honest_sites == 4
