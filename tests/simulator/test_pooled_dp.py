"""Record-level DP at pooled cost, end to end in memory (simulator/pooled_dp.py, real masks and shares).

- the unmasked sum is exactly the sum of the sites' integer vectors (masks cancel, nothing rounds);
- the noise of the sum has SD sqrt(2 mu) when m = N sites each add Sk(mu/m, mu/m) (a statistical
  test on 20 000 coordinates with a stated 6 % tolerance: the estimate's standard error is 1 %);
- a site whose m exceeds the roster's min_contributors refuses to mask, and a request for fewer
  sites than the floor is refused by every site: the round fails naming the rule, nothing unmasked;
- each site's ledger charges exactly the plan (epsilon at delta under "skellam-rdp");
- the experiment's pooled block is validated, and the field's bit budget refused one step past its edge.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from protocol.config import load_experiment
from protocol.config_error import ConfigError
from protocol.secagg import field as F
from protocol.secagg import skellam
from simulator.pooled_dp import DATASET, RoundFailed, federation

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _data(sites: int, rows: int, dim: int, *, zero: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    out = {}
    for i in range(sites):
        x = torch.zeros(rows, dim) if zero else torch.randn(rows, dim, generator=g)
        out[f"site-{i}"] = (x, (x[:, 0] > 0).float().reshape(-1, 1))
    return out


def _fed(tmp_path: Path, sites: int = 4, *, dim: int = 5, mu: float = 1e4, honest: int | dict[str, int] = 3,
         min_contributors: int = 3, zero: bool = False, bias: bool = True, rows: int = 60):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(dim, 1, bias=bias))
    return federation(tmp_path, _data(sites, rows, dim, zero=zero), model, loss="bce_with_logits", clip=1.0,
                      scale=512.0, mu=mu, sample_rate=0.5, max_batch=rows, learning_rate=0.5, honest=honest,
                      min_contributors=min_contributors)


def test_the_unmasked_sum_is_exactly_the_sum_of_the_sites_integer_vectors(tmp_path: Path) -> None:
    fed = _fed(tmp_path)
    before = [p.detach().clone() for p in fed.model.parameters()]
    for tag in (1, 2, 3):
        total = fed.round(tag)
        assert sorted(fed.vectors) == sorted(fed.sites)
        np.testing.assert_array_equal(total, sum(fed.vectors.values()))
        # and it is not any one site's vector (each carries its own share of the noise)
        assert all(not np.array_equal(total, v) for v in fed.vectors.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, fed.model.parameters()))


def test_the_noise_of_the_sum_has_the_pooled_sd(tmp_path: Path) -> None:
    """Zero inputs and no bias: every gradient is exactly 0, so the unmasked sum is the noise alone."""
    mu, dim = 4e4, 20_000
    fed = _fed(tmp_path, dim=dim, mu=mu, honest=4, min_contributors=4, zero=True, bias=False, rows=8)
    total = fed.round(1).astype(float)
    from site_worker.pooled_dp import integer_gradient_sum

    x, y = fed.sites["site-0"].x, fed.sites["site-0"].y
    assert not integer_gradient_sum(fed.model, "bce_with_logits", x, y, clip=1.0, scale=512.0).any()
    sd = total.std()
    assert abs(sd / math.sqrt(2 * mu) - 1) < 0.06  # standard error of the SD estimate: 1/sqrt(2 d) = 0.5 %
    assert abs(total.mean()) < 6 * math.sqrt(2 * mu / dim)


def test_a_site_assuming_more_honest_sites_than_the_roster_unmasks_refuses_to_contribute(tmp_path: Path) -> None:
    fed = _fed(tmp_path, honest={"site-0": 3, "site-1": 4, "site-2": 3, "site-3": 3}, min_contributors=3)
    with pytest.raises(RoundFailed) as e:
        fed.round(1)
    assert list(e.value.reasons) == ["site-1"]
    assert e.value.reasons["site-1"].startswith("min_contributors: the roster unmasks sums of 3 site(s), fewer than the 4")
    # its reservation was cancelled: nothing left the site
    assert fed.sites["site-1"].ledger.spent(DATASET, delta=1e-5, accountant=skellam.ACCOUNTANT) == 0.0


def test_m_equal_to_min_contributors_is_just_inside(tmp_path: Path) -> None:
    fed = _fed(tmp_path, honest=3, min_contributors=3)
    fed.round(1)  # K = m: masks and unmasks


def test_fewer_contributors_than_m_fail_the_round_and_nothing_is_unmasked(tmp_path: Path) -> None:
    fed = _fed(tmp_path, honest=3, min_contributors=3)
    fed.round(1)
    with pytest.raises(RoundFailed) as e:
        fed.round(2, contributors=["site-0", "site-1"])
    assert sorted(e.value.reasons) == sorted(fed.sites)
    assert all(r.startswith("min_contributors: the request sums updates of 2 site(s)") for r in e.value.reasons.values())
    fed.round(3, contributors=["site-0", "site-1", "site-2"])  # three: just inside


def test_each_sites_ledger_charges_exactly_the_plan(tmp_path: Path) -> None:
    rounds, dim = 4, 5
    l1, l2 = skellam.sensitivities(1.0, 512.0, dim + 1)
    mu = skellam.plan_mu(target_epsilon=2.0, delta=1e-5, steps=rounds, sample_rate=0.5, l1=l1, l2=l2)
    planned = skellam.epsilon_of([skellam.SkellamEntry(mu, l1, l2, 0.5, rounds)], delta=1e-5)
    assert planned <= 2.0
    fed = _fed(tmp_path, dim=dim, mu=mu)
    for tag in range(1, rounds + 1):
        fed.round(tag)
    for site in fed.sites.values():
        spent = site.ledger.spent(DATASET, delta=1e-5, accountant=skellam.ACCOUNTANT)
        assert spent == pytest.approx(planned, rel=1e-12)
        rel = site.ledger.releases(DATASET)
        assert len(rel) == rounds and all(r["state"] == "spent" and r["skellam"][0][0] == mu for r in rel)


def _pooled_exp(**sa: object) -> dict:
    e = json_load(ROOT / "examples" / "heart_disease_dp.json")
    e["training"]["optimizer"].pop("differential_privacy")
    e["training"].pop("personalization")
    e["federated"]["parameters"].update(min_fit_clients=3, min_available_clients=4)
    e["federated"]["secure_aggregation"] = {"min_contributors": 3, "threshold": 3, "dp": "pooled", "clip": 0.5,
                                            "scale": 1024.0, "max_sites": 4, "max_batch": 512, "noise_multiplier": 10.0,
                                            **sa}
    return e


def json_load(p: Path) -> dict:
    import json

    return json.loads(p.read_text())


def test_the_pooled_block_is_validated_with_one_line_errors() -> None:
    load_experiment(_pooled_exp())
    cases = [({"dp": "user"}, "federated.secure_aggregation.dp", "one of off, pooled, central"),
             ({"target_epsilon": 1.0}, "federated.secure_aggregation.dp", "exactly one"),
             ({"noise_multiplier": 0}, "federated.secure_aggregation.noise_multiplier", ""),
             ({"sample_rate": 1.5}, "federated.secure_aggregation.sample_rate", ""),
             ({"max_batch": 0}, "federated.secure_aggregation.max_batch", "")]
    for change, key, text in cases:
        with pytest.raises(ConfigError) as e:
            load_experiment(_pooled_exp(**change))
        assert str(e.value).startswith(key) and text in str(e.value) and "\n" not in str(e.value)
    with_dp = _pooled_exp()
    with_dp["training"]["optimizer"]["differential_privacy"] = {"noise_multiplier": 1.0, "max_grad_norm": 1.0}
    with pytest.raises(ConfigError, match="disable training.optimizer.differential_privacy"):
        load_experiment(with_dp)
    buff = _pooled_exp()
    buff["federated"]["name"] = "FedBuff"
    buff["federated"]["parameters"]["buffer_size"] = 4  # = max_sites: just inside (one update per site a buffer)
    load_experiment(buff)
    buff["federated"]["parameters"]["buffer_size"] = 5
    with pytest.raises(ConfigError, match="^federated.parameters.buffer_size: 5 exceeds secure_aggregation.max_sites"):
        load_experiment(buff)
    buff["federated"]["name"] = "FedAsync"
    with pytest.raises(ConfigError, match="^federated.name: FedAsync merges each update alone"):
        load_experiment(buff)


def test_the_field_budget_is_refused_one_row_past_its_edge() -> None:
    """max_sites x max_batch x round(C s) + 10 SDs of the sum's noise must fit 2**30 - 1."""
    exp = load_experiment(_pooled_exp())
    from protocol.secagg.rules import pooled_mu

    mu = pooled_mu(exp)
    per = math.floor(1024.0 * 0.5 + 0.5)
    noise = math.ceil(skellam.NOISE_TAIL_SDS * math.sqrt(2 * mu * 4))
    edge = (F.HALF - noise) // (4 * per)  # the largest max_batch that fits
    load_experiment(_pooled_exp(max_batch=edge))
    with pytest.raises(ConfigError) as e:
        load_experiment(_pooled_exp(max_batch=edge + 1))
    assert str(e.value).startswith("federated.secure_aggregation.scale:") and "10 SDs of the noise" in str(e.value)


def test_a_site_refuses_to_mask_a_vector_past_its_stated_bound(tmp_path: Path) -> None:
    from site_worker.secagg import SecAggRefused

    fed = _fed(tmp_path)
    site = fed.sites["site-0"]
    b = fed.bound(site)
    ok = np.zeros(6, dtype=np.int64)
    ok[0] = b
    site.secagg.mask_integers("run-pooled-dp", 1, ok, assume_honest_sites=3, bound=b)
    bad = copy.copy(ok)
    bad[0] = -(b + 1)
    with pytest.raises(SecAggRefused, match="field_budget"):
        site.secagg.mask_integers("run-pooled-dp", 2, bad, assume_honest_sites=3, bound=b)
