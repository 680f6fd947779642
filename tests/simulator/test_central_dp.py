"""User-level central DP under secure aggregation (``dp = "central"``), in memory with real masks and shares.

- the noise of an unmasked sum of m = N honest shares Sk(mu/m, mu/m) has SD sqrt(2 mu) (20 000
  coordinates, a stated 6 % tolerance; the SD estimate's standard error is under 1 %);
- a site whose update norm is huge is clipped: the unmasked sum moves by at most s*C per site, to
  the rounding (sqrt(d)/2); an update just inside C passes unchanged;
- a site refuses a roster that could unmask fewer than its m shares, and every site refuses a
  request for a sum of fewer sites than its floor: nothing is unmasked;
- the site masks at most T central updates of a run (its ledger was charged T steps);
- under the DP modes no sum may hold two updates of one site (``one_update_per_site``);
- the coordinator's step divides by the sampled count (public), never by the realised one;
- the experiment's central block is validated, one line naming the key, and the field's bit
  budget (with the noise) refused one step past its edge.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from protocol.config import load_experiment
from protocol.config_error import ConfigError
from protocol.secagg import field as F
from protocol.secagg import skellam
from site_worker.central_dp import CentralRefused, CentralShare, check_rounds
from site_worker.secagg import SecAggRefused
from site_worker.secure_rng import SecureRandom
from simulator.pooled_dp import RUN, RoundFailed, federation

ROOT = Path(__file__).resolve().parents[2]
SCALE, CLIP = 512.0, 1.0


def _fed(tmp_path: Path, *, dim: int, honest: int | dict[str, int] = 3, min_contributors: int = 3, sites: int = 3):
    model = torch.nn.Sequential(torch.nn.Linear(dim - 1, 1))  # d = dim values: the roster's length
    data = {f"site-{i}": (torch.zeros(1, dim - 1), torch.zeros(1, 1)) for i in range(sites)}
    return federation(tmp_path, data, model, loss="bce_with_logits", clip=CLIP, scale=SCALE, mu=1.0, sample_rate=1.0,
                      max_batch=1, learning_rate=1.0, honest=honest, min_contributors=min_contributors)


def _round(fed: Any, deltas: dict[str, np.ndarray], mu: float, tag: int = 1) -> np.ndarray:
    """Each site in ``deltas`` masks its central contribution; the coordinator unmasks the sum."""
    masked = fed.coordinator.new_sum()
    for name, delta in sorted(deltas.items()):
        site = fed.sites[name]
        share = CentralShare(CLIP, SCALE, mu, 1.0, 5, site.honest)
        ints = share.contribution(delta, SecureRandom.secret())
        out = site.secagg.mask_integers(RUN, tag, ints, assume_honest_sites=site.honest, bound=share.field_bound())
        for recipient, sealed in out.sealed.items():
            fed.sites[recipient].secagg.receive_share(RUN, name, tag, sealed)
        masked.add(name, tag, out.masked)
    return fed.unmask(masked)


def test_the_noise_of_the_unmasked_sum_has_variance_2mu(tmp_path: Path) -> None:
    """m = N = 3 sites with zero updates: the unmasked sum is the noise alone, Sk(mu, mu) per coordinate."""
    mu, dim = 4e4, 20_000
    fed = _fed(tmp_path, dim=dim)
    total = _round(fed, {s: np.zeros(dim) for s in fed.sites}, mu).astype(float)
    assert abs(total.std() / math.sqrt(2 * mu) - 1) < 0.06  # standard error of the SD estimate: 1/sqrt(2 d) = 0.5 %
    assert abs(total.mean()) < 6 * math.sqrt(2 * mu / dim)


def test_a_huge_update_is_clipped_the_sum_moves_by_at_most_s_times_c(tmp_path: Path) -> None:
    dim = 400
    fed = _fed(tmp_path, dim=dim)
    rng = np.random.default_rng(3)
    huge = rng.normal(size=dim) * 1e6
    inside = rng.normal(size=dim)
    inside *= CLIP * (1 - 1e-6) / np.linalg.norm(inside)  # just inside C: unchanged
    mu = 1e-12  # a noise share of 0 on every coordinate but with probability ~1e-9
    total = _round(fed, {"site-0": huge, "site-1": inside, "site-2": np.zeros(dim)}, mu).astype(float)
    np.testing.assert_array_equal(total - np.round(SCALE * inside), np.round(SCALE * CLIP * huge / np.linalg.norm(huge)))
    moved = float(np.linalg.norm(total - np.round(SCALE * inside)))
    assert moved <= SCALE * CLIP + math.sqrt(dim) / 2
    assert moved >= SCALE * CLIP - math.sqrt(dim) / 2  # clipped, not dropped


def test_a_site_refuses_a_roster_that_could_unmask_fewer_than_its_m_shares(tmp_path: Path) -> None:
    dim = 10
    fed = _fed(tmp_path, dim=dim, honest={"site-0": 3, "site-1": 4, "site-2": 3})
    share = CentralShare(CLIP, SCALE, 100.0, 1.0, 5, 4)
    with pytest.raises(SecAggRefused, match="^min_contributors: the roster unmasks sums of 3 site"):
        fed.sites["site-1"].secagg.mask_integers(RUN, 1, share.contribution(np.zeros(dim), SecureRandom.secret()),
                                                 assume_honest_sites=4, bound=share.field_bound())


def test_a_sum_of_fewer_sites_than_m_is_refused_and_m_sites_just_inside(tmp_path: Path) -> None:
    dim = 10
    fed = _fed(tmp_path, dim=dim, honest=3, min_contributors=2)  # K = 2 < m = 3: refused at the mask
    with pytest.raises(SecAggRefused, match="^min_contributors"):
        _round(fed, {"site-0": np.zeros(dim)}, 100.0)
    fed = _fed(tmp_path / "b", dim=dim, honest=2, min_contributors=2)
    with pytest.raises(RoundFailed) as e:  # one site's update: every site's floor refuses to answer
        _round(fed, {"site-0": np.zeros(dim)}, 100.0)
    assert all(r.startswith("min_contributors") for r in e.value.reasons.values())
    _round(fed, {"site-1": np.zeros(dim), "site-2": np.zeros(dim)}, 100.0, tag=2)  # m = 2 sites: unmasked


def test_the_site_masks_at_most_t_updates_of_a_run() -> None:
    check_rounds(4, 5)  # the T-th update: inside
    with pytest.raises(CentralRefused, match="^rounds: this site already masked 5 update"):
        check_rounds(5, 5)


def test_the_coordinator_divides_by_the_sampled_count_not_the_realised_one() -> None:
    from coordinator.secagg import central_mean

    total = np.array([3 * SCALE, -6 * SCALE])
    np.testing.assert_allclose(central_mean(total, scale=SCALE, sampled=3), [1.0, -2.0])
    with pytest.raises(ValueError):
        central_mean(total, scale=SCALE, sampled=0)


# ------------------------------------------------------------------ config


def _exp(**sa: object) -> dict:
    e = json.loads((ROOT / "examples" / "heart_failure.json").read_text())
    e["training"]["optimizer"].pop("differential_privacy")
    e["federated"]["parameters"].update(min_fit_clients=3, min_available_clients=3)
    e["federated"]["secure_aggregation"] = {"min_contributors": 3, "threshold": 2, "dp": "central", "clip": 0.5,
                                            "scale": 1024.0, "max_sites": 3, "noise_multiplier": 0.5, **sa}
    return e


def _refused(exp: dict) -> str:
    with pytest.raises(ConfigError) as e:
        load_experiment(exp)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_config_edges_name_the_key() -> None:
    load_experiment(_exp())
    assert _refused(_exp(target_epsilon=4.0)).startswith("federated.secure_aggregation.dp: central needs exactly one")
    assert _refused(_exp(sample_rate=0.5)).startswith("federated.secure_aggregation.sample_rate: belongs to dp")
    assert _refused(_exp(max_batch=8)).startswith("federated.secure_aggregation.max_batch: belongs to dp")
    dp = _exp()
    dp["training"]["optimizer"]["differential_privacy"] = {"noise_multiplier": 1.0, "max_grad_norm": 1.0}
    assert _refused(dp).startswith("federated.secure_aggregation.dp: central adds the noise itself")
    fedasync = _exp()
    fedasync["federated"]["name"] = "FedAsync"
    assert _refused(fedasync).startswith("federated.name: FedAsync merges each update alone")
    both = _exp()
    both["federated"]["central_dp"] = {"clip_norm": 1.0, "noise_multiplier": 1.0}
    assert 'secure_aggregation.dp = "central"' in _refused(both)
    assert _refused(_exp(dp="centrl")).startswith("federated.secure_aggregation.dp: must be one of off, pooled, central")


def test_a_central_run_steps_with_fedavg_only() -> None:
    from coordinator.secagg import refuse_until_wired

    refuse_until_wired(load_experiment(_exp()))
    adam = _exp()
    adam["federated"]["name"] = "FedAdam"
    with pytest.raises(ConfigError, match="^federated.secure_aggregation.dp: 'central' applies the noisy mean"):
        refuse_until_wired(load_experiment(adam))


def test_the_field_budget_with_the_noise_is_refused_one_step_past_its_edge() -> None:
    """max_sites x round(s C) + 10 SDs of the sum's noise (m = 1) against the field's HALF; the noise's
    mu grows with s too (2 mu = (z Delta2)^2), so the edge is found by bisection on s."""
    dim = 12  # heart_failure's logistic regression: 11 weights and a bias

    def fits(scale: float) -> bool:
        mu = 0.5 * (0.5 * (scale * 1.0 + math.sqrt(dim))) ** 2  # noise_multiplier 0.5
        return skellam.field_bound(sites=64, max_batch=1, clip=1.0, scale=scale, mu=mu, honest=1) <= F.HALF

    lo, hi = 1.0, 2.0 ** 30
    while hi - lo > 1:
        mid = float(int((lo + hi) / 2))
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    load_experiment(_exp(scale=lo, max_sites=64, clip=1.0))  # the edge: inside
    assert _refused(_exp(scale=hi, max_sites=64, clip=1.0)).startswith("federated.secure_aggregation.scale: 64 sites")


def test_the_coordinator_samples_the_roster_from_its_secret_and_fixes_the_denominator(tmp_path: Path) -> None:
    """k = max(ceil(fraction_fit x N), min_fit_clients) of the WHOLE roster (the q = k/N the ledgers charge),
    keyed from the coordinator's secret file: the same secret repeats the sample (a resumed round),
    another secret draws another; a sampled site that is not available is a dropout, k stays."""
    from types import SimpleNamespace

    from coordinator.rounds.secure import SecureSync
    from protocol.secagg.rules import central_rate

    exp = _exp()
    exp["federated"]["parameters"].update(fraction_fit=0.5, min_fit_clients=3)
    x = load_experiment(exp)
    roster = [f"site-{i}" for i in range(8)]

    def sync(state: Path) -> SecureSync:
        s = SecureSync.__new__(SecureSync)
        s.ctx = SimpleNamespace(experiment=x, store=SimpleNamespace(dir=state), run_id="run-1")  # type: ignore[assignment]
        s.agg = SimpleNamespace(roster=SimpleNamespace(sites=tuple(roster)))  # type: ignore[assignment]
        s.planned = 0
        return s

    a, b = sync(tmp_path / "a"), sync(tmp_path / "b")
    draws_a = [a.sample(r, roster) for r in range(1, 11)]
    assert all(len(d) == 4 for d in draws_a) and a.planned == 4  # ceil(0.5 x 8) = 4 >= min_fit_clients 3
    assert central_rate(0.5, 3, len(roster)) == 4 / 8
    assert [sync(tmp_path / "a").sample(r, roster) for r in range(1, 11)] == draws_a  # the secret on disk
    assert [b.sample(r, roster) for r in range(1, 11)] != draws_a  # another secret, another sample
    chosen = a.sample(1, roster)
    away = chosen[0]
    got = a.sample(1, [s for s in roster if s != away])
    assert got == chosen[1:] and a.planned == 4  # the dropout keeps the denominator


def test_config_validate_says_the_central_mode_and_its_noise(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedbus.cli import app

    path = tmp_path / "central.json"
    path.write_text(json.dumps(_exp()))
    r = CliRunner().invoke(app, ["config", "validate", str(path)])
    assert r.exit_code == 0, r.output
    line = " ".join(r.output.split())  # the console may wrap the line
    assert "user-level (central) DP under secure aggregation" in line and "noise_multiplier=0.5)" in line
    assert "accountant=skellam-rdp" in line and "DP off" not in line
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_exp(sample_rate=0.5)))
    r = CliRunner().invoke(app, ["config", "validate", str(bad)])
    assert r.exit_code == 2 and "federated.secure_aggregation.sample_rate: belongs to dp" in r.output


def test_a_sum_holding_two_updates_of_one_site_is_refused_under_the_dp_modes(tmp_path: Path) -> None:
    """Three distinct sites (K = 3) but site-0 twice: every site refuses (its ledger charged one update per
    sum); the same sites with one update each are answered."""
    dim = 10
    fed = _fed(tmp_path, dim=dim, honest=3, min_contributors=3)
    vectors = {}
    for name, tag in (("site-0", 1), ("site-1", 1), ("site-2", 1), ("site-0", 2)):
        share = CentralShare(CLIP, SCALE, 100.0, 1.0, 5, 3)
        out = fed.sites[name].secagg.mask_integers(RUN, tag, share.contribution(np.zeros(dim), SecureRandom.secret()),
                                                   assume_honest_sites=3, bound=share.field_bound())
        for recipient, sealed in out.sealed.items():
            fed.sites[recipient].secagg.receive_share(RUN, name, tag, sealed)
        vectors[(name, tag)] = out.masked

    def total(keys: list[tuple[str, int]]) -> Any:
        m = fed.coordinator.new_sum()
        for name, tag in keys:
            m.add(name, tag, vectors[(name, tag)])
        return m

    with pytest.raises(RoundFailed) as e:
        fed.unmask(total([("site-0", 1), ("site-0", 2), ("site-1", 1), ("site-2", 1)]))
    assert sorted(e.value.reasons) == sorted(fed.sites)
    assert all(r.startswith("one_update_per_site") for r in e.value.reasons.values())
    fed.unmask(total([("site-0", 2), ("site-1", 1), ("site-2", 1)]))  # one update per site: answered
