"""User-level central DP under FedBuff's buffers (``dp = "central"``, ``federated.name = "FedBuff"``), in memory.

No coordinator sampling in async, so no amplification: each masked update is an un-subsampled
Skellam release (q = 1), charged as the site masks it, at most T = ``training.rounds`` of them.
Three sites, K = buffer_size = 3, each assuming m = 3 honest sites (Sk(mu/3, mu/3) each):

- every buffer holds one update of each of the three sites, its unmasked sum is exactly the sum
  of their noisy integer vectors (the coordinator adds nothing) and the step divides by s x 3;
- each site's ledger after the run equals the plan (``protocol.privacy_plan.secure_dp_epsilon``,
  the figure ``fedbus site check`` shows) and equals T un-subsampled steps computed here by hand;
- a coordinator that asks for a (T+1)-th update is refused by every site (rule ``rounds``);
- the experiment's edges: FedBuff accepted under central only, buffer_size at max_sites.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import coordinator.rounds.secure as secure_mod
from protocol.config import load_experiment
from protocol.config_error import ConfigError
from protocol.policy import SitePolicy
from protocol.privacy_plan import secure_dp_epsilon, secure_dp_plan, metrics_entries
from protocol.secagg import skellam
from protocol.secagg.rules import central_dim, central_entry, central_sample_rate, pooled_mu
from simulator.run import SimulationFailed, simulate
from site_worker.central_dp import CentralShare
from site_worker.secagg import SiteSecAgg

ROOT = Path(__file__).resolve().parents[2]
N = M = 3  # sites, buffer_size = min_contributors, and each site's assume_honest_sites
DATASET = "heart_failure"


def _exp(rounds: int = 3, **sa: object) -> dict[str, Any]:
    e = json.loads((ROOT / "examples" / "heart_failure.json").read_text())
    e["training"]["optimizer"].pop("differential_privacy")
    e["training"]["rounds"] = rounds
    e["federated"]["name"] = "FedBuff"
    e["federated"]["parameters"].update(min_fit_clients=N, min_available_clients=N, fraction_eval=0.0, buffer_size=N)
    e["federated"]["secure_aggregation"] = {"min_contributors": N, "threshold": 2, "dp": "central", "clip": 0.5,
                                            "scale": 1024.0, "max_sites": N, "noise_multiplier": 0.5, **sa}
    e["federated"]["round_timeout_s"] = 30.0
    return e


def _honest_sites(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every simulated site assumes m = 3 honest sites in each sum (its share is Sk(mu/3, mu/3))."""
    from simulator import workspace

    real = workspace.site_toml
    monkeypatch.setattr(workspace, "site_toml", lambda **kw: real(**kw).replace(
        "[policy]\n", f"[policy]\nassume_honest_sites = {M}\n", 1))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("central-fedbuff")
    rec: dict[str, Any] = {"shares": [], "masked": {}, "sums": [], "path": tmp / "exp.json"}
    rec["path"].write_text(json.dumps(_exp()))
    contribution, mask_integers, mean = CentralShare.contribution, SiteSecAgg.mask_integers, secure_mod.central_mean

    def rec_contribution(share: CentralShare, delta: np.ndarray, rng: Any) -> np.ndarray:
        out = contribution(share, delta, rng)
        rec["shares"].append(share)
        return out

    def rec_mask(sec: SiteSecAgg, run_id: str, tag: int, values: np.ndarray, **kw: Any) -> Any:
        rec["masked"][(sec.site_id, int(tag))] = np.asarray(values, dtype=np.int64).copy()
        return mask_integers(sec, run_id, tag, values, **kw)

    def rec_mean(total: np.ndarray, *, scale: float, sampled: int) -> np.ndarray:
        rec["sums"].append((np.asarray(total, dtype=np.int64).copy(), sampled))
        return mean(total, scale=scale, sampled=sampled)

    with pytest.MonkeyPatch.context() as mp:
        _honest_sites(mp)
        mp.setattr(CentralShare, "contribution", rec_contribution)
        mp.setattr(SiteSecAgg, "mask_integers", rec_mask)
        mp.setattr(secure_mod, "central_mean", rec_mean)
        rec["doc"] = simulate(rec["path"], sites=N, seed=1, progress=False, site_metrics="dp", keep_work=True)
    return rec


def test_each_buffer_sums_one_noisy_update_per_site_and_divides_by_buffer_size(run):
    doc = run["doc"]
    assert doc["status"] == "completed" and doc["rejected"] == [] and doc["declined"] == [], (doc["status"], doc.get("gaps"))
    assert len(doc["rounds"]) == 3 and len(run["sums"]) == 3
    for row, (total, sampled) in zip(doc["rounds"], run["sums"]):
        seen = row["secure_aggregation"]
        buffer = [tuple(b.rsplit("#", 1)) for b in seen["buffer"]]
        assert sorted(s for s, _ in buffer) == ["site-1", "site-2", "site-3"]  # one update of each site
        assert seen["denominator"] == sampled == N  # buffer_size: public, fixed before any update
        # the unmasked sum is exactly the three masked integer vectors (update + noise share), nothing added
        want = sum(run["masked"][(s, int(t))] for s, t in buffer)
        np.testing.assert_array_equal(total, want[:total.size])
    seen = doc["privacy"]["secure_aggregation"]
    assert seen["dp"] == "central" and seen["fewest_contributors"] == N and "each buffer's" in seen["coordinator_saw"]


def test_each_update_carries_a_noise_share_of_mu_over_m_uncharged_by_sampling(run):
    x = load_experiment(json.loads(run["path"].read_text()))
    assert len(run["shares"]) == N * 3  # T = 3 updates per site, no more
    for share in run["shares"]:
        assert share.assume_honest_sites == M and share.mu == pytest.approx(pooled_mu(x))
        assert share.sample_rate == 1.0 and share.rounds == 3
    # noise_multiplier 0.5: 2 mu = (0.5 Delta2)^2, the m = 3 shares of one sum add to Sk(mu, mu)
    _, l2 = skellam.sensitivities(0.5, 1024.0, central_dim(x))
    assert 2 * pooled_mu(x) == pytest.approx((0.5 * l2) ** 2)


def test_each_ledger_equals_the_plan_and_t_unsubsampled_steps(run, tmp_path):
    from fedbus.site_check import _check_experiment
    from protocol.accounting import rdp_of
    from site_worker.config import load_site_config
    from site_worker.ledger import PrivacyLedger

    x = load_experiment(json.loads(run["path"].read_text()))
    l1, l2 = skellam.sensitivities(0.5, 1024.0, central_dim(x))
    sites = sorted((Path(run["doc"]["work_dir"]) / "sites").iterdir())
    assert len(sites) == N
    for home in sites:
        cfg = load_site_config(home / "site.toml")
        assert cfg.policy.assume_honest_sites == M
        ledger = PrivacyLedger(cfg.state_dir)
        steps = [skellam.SkellamEntry.from_list(e) for r in ledger.releases(DATASET) for e in r.get("skellam", ())]
        assert [(e.sample_rate, e.steps) for e in steps] == [(1.0, 1)] * 3  # one un-subsampled step per update
        # fedbus site check on the state as before the run (no ledger): its figure, at the site's delta
        before = tmp_path / home.name
        shutil.copytree(cfg.state_dir, before, ignore=shutil.ignore_patterns("privacy"))
        check = {c.name: c for c in _check_experiment(replace(cfg, state_dir=before), run["path"])}["privacy"]
        assert check.ok and "q = 1" in check.detail, check.detail
        delta = float(re.search(r"at δ ([0-9.e+-]+)", check.detail).group(1))
        assert delta == 1e-5  # the simulated sites' policy: min(1e-5, 1 / (10 rows))
        spent = ledger.spent(DATASET, delta=delta, accountant="rdp")
        assert float(re.search(r"cost ε ([0-9.e+-]+)", check.detail).group(1)) == pytest.approx(spent, rel=1e-3)
        # by hand: T = 3 steps of Sk(mu, mu) at q = 1, plus the final test's own metrics release
        final = metrics_entries(cfg.policy)
        assert len(final) == 1 and secure_dp_plan(x, cfg.policy)[0] == final  # no union: this roster is too coarse
        by_hand = skellam.epsilon_of([skellam.SkellamEntry(pooled_mu(x), l1, l2, 1.0, 3)], delta=delta,
                                     gaussian_rdp=rdp_of(final))
        assert spent == pytest.approx(by_hand, rel=1e-9)
        assert spent == pytest.approx(secure_dp_epsilon(x, cfg.policy, delta=delta), rel=1e-9)  # the planner's


def test_a_coordinator_asking_for_a_t_plus_first_update_is_refused(monkeypatch):
    """The coordinator runs one version more than the experiment's T = 2 the ledgers planned: every
    site masks its T updates and declines the (T+1)-th naming the rule; nothing more is charged."""
    from coordinator.rounds.secure_buffer import SecureBufferRounds

    run_ = SecureBufferRounds.run

    def one_more(self: SecureBufferRounds, weights: Any, first: int, sites: list[str]) -> Any:
        self.ctx.rounds_planned += 1
        return run_(self, weights, first, sites)

    masked: list[tuple[str, int]] = []
    mask_integers = SiteSecAgg.mask_integers

    def rec_mask(sec: SiteSecAgg, run_id: str, tag: int, values: np.ndarray, **kw: Any) -> Any:
        masked.append((sec.site_id, int(tag)))
        return mask_integers(sec, run_id, tag, values, **kw)

    monkeypatch.setattr(SecureBufferRounds, "run", one_more)
    monkeypatch.setattr(SiteSecAgg, "mask_integers", rec_mask)
    _honest_sites(monkeypatch)
    exp = _exp(rounds=2)
    exp["federated"]["round_timeout_s"] = 3.0
    exp["federated"]["max_round_retries"] = 0
    with pytest.raises(SimulationFailed) as e:
        simulate(exp, sites=N, seed=1, progress=False)
    doc = e.value.document
    assert doc is not None and len(doc["rounds"]) == 2  # T versions committed, the (T+1)-th never closes
    assert sorted(s for s, _ in masked) == sorted(["site-1", "site-2", "site-3"] * 2)  # T = 2 each, no more
    refused = {d["site"] for d in doc["declined"] if "rounds: this site already masked 2 update" in d["reason"]}
    assert refused == {"site-1", "site-2", "site-3"}, doc["declined"]


# ------------------------------------------------------------------ config


def _refused(exp: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as e:
        load_experiment(exp)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_config_edges_under_fedbuff_name_the_key() -> None:
    from coordinator.secagg import refuse_until_wired

    refuse_until_wired(load_experiment(_exp()))  # central under FedBuff: wired
    assert _refused(_exp(max_sites=N - 1)).startswith(f"federated.parameters.buffer_size: {N} exceeds secure_"
                                                      f"aggregation.max_sites ({N - 1})")
    inside = _exp(max_sites=N)  # buffer_size = max_sites: just inside
    load_experiment(inside)
    small = _exp()
    small["federated"]["parameters"]["buffer_size"] = N - 1  # below min_contributors: never unmasked
    assert _refused(small).startswith("federated.parameters.buffer_size: 2 is below secure_aggregation.min_contrib")
    adam = _exp()
    adam["federated"]["name"] = "FedAdam"  # a server optimiser: validated, but the coordinator refuses it
    with pytest.raises(ConfigError, match="^federated.secure_aggregation.dp: 'central' applies the noisy mean update "
                                          "as FedAvg or FedBuff does; run it under FedAvg or FedBuff, not 'FedAdam'"):
        refuse_until_wired(load_experiment(adam))
    central = _exp()
    central["federated"]["name"] = "FedAsync"
    assert _refused(central).startswith("federated.name: FedAsync merges each update alone")


def test_a_target_epsilon_under_fedbuff_is_planned_at_q_1() -> None:
    """No sampling in async: the least mu meeting the target over T un-subsampled updates (more noise
    than the sync loop's plan at fraction_fit 0.5, which counts on amplification)."""
    buff = _exp(noise_multiplier=None, target_epsilon=8.0)
    buff["federated"]["parameters"]["fraction_fit"] = 0.5
    x = load_experiment(buff)
    l1, l2 = skellam.sensitivities(0.5, 1024.0, central_dim(x))
    mu = pooled_mu(x)
    assert skellam.epsilon_of([skellam.SkellamEntry(mu, l1, l2, 1.0, 3)], delta=1e-5) <= 8.0 + 1e-6
    assert skellam.epsilon_of([skellam.SkellamEntry(mu * 0.98, l1, l2, 1.0, 3)], delta=1e-5) > 8.0
    sync = dict(buff, federated=dict(buff["federated"], name="FedAvg"))
    assert pooled_mu(load_experiment(sync)) < mu
    assert secure_dp_epsilon(x, SitePolicy(metrics="exact"), delta=1e-5) == pytest.approx(
        skellam.epsilon_of([skellam.SkellamEntry(mu, l1, l2, 1.0, 3)], delta=1e-5), rel=1e-9)
    # a roster of 8: the sync loop would sample 4 (q = 1/2); FedBuff samples no one, so q = 1 whatever N
    assert central_sample_rate(load_experiment(sync), 8) == 0.5
    assert central_sample_rate(x, 8) == 1.0 and central_entry(x, 8) == skellam.SkellamEntry(mu, l1, l2, 1.0, 3)
    assert secure_dp_epsilon(x, SitePolicy(metrics="exact"), delta=1e-5, sites=8) == pytest.approx(
        secure_dp_epsilon(x, SitePolicy(metrics="exact"), delta=1e-5), rel=1e-12)


@pytest.mark.broker
@pytest.mark.slow
def test_a_central_fedbuff_run_on_rabbitmq_charges_each_ledger_the_plan(monkeypatch, amqp_url):
    """The same mode with one site process per site on RabbitMQ: every buffer one update of each site,
    denominator 3, and each site's epsilon (exact metrics: nothing else released) the planner's figure."""
    import uuid

    _honest_sites(monkeypatch)
    exp = _exp(rounds=2)
    doc = simulate(exp, sites=N, seed=1, progress=False, broker=amqp_url, site_suffix=f"-{uuid.uuid4().hex[:6]}")
    assert doc["broker"].startswith("amqp://") and doc["rejected"] == [] and doc["declined"] == []
    assert len(doc["rounds"]) == 2
    for row in doc["rounds"]:
        seen = row["secure_aggregation"]
        assert seen["denominator"] == N and len({b.rsplit("#", 1)[0] for b in seen["buffer"]}) == len(seen["buffer"]) == N
    planned = secure_dp_epsilon(load_experiment(exp), SitePolicy(metrics="exact"), delta=1e-5)
    assert len(doc["epsilon"]) == N
    assert all(eps == pytest.approx(planned, rel=1e-9) for eps in doc["epsilon"].values()), (doc["epsilon"], planned)


def test_config_validate_says_fedbuff_samples_no_site(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedbus.cli import app

    path = tmp_path / "central-fedbuff.json"
    path.write_text(json.dumps(_exp()))
    r = CliRunner().invoke(app, ["config", "validate", str(path)])
    assert r.exit_code == 0, r.output
    line = " ".join(r.output.split())
    assert "user-level (central) DP under secure aggregation" in line and "no site sampling (FedBuff" in line
    assert "fraction_fit=" not in line.split("privacy:")[1].split("federated:")[0]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_exp(max_sites=N - 1)))
    r = CliRunner().invoke(app, ["config", "validate", str(bad)])
    assert r.exit_code == 2 and "federated.parameters.buffer_size: 3 exceeds" in r.output


def test_with_more_sites_than_the_buffer_each_site_pays_for_the_updates_it_masked(monkeypatch) -> None:
    """Four sites, buffers of three, T = 4: a site left out of a buffer masks fewer updates and its
    ledger charges exactly those (one un-subsampled step each), never more than the planned T."""
    from site_worker.config import load_site_config
    from site_worker.ledger import PrivacyLedger

    masked: list[str] = []
    mask_integers = SiteSecAgg.mask_integers

    def rec_mask(sec: SiteSecAgg, run_id: str, tag: int, values: np.ndarray, **kw: Any) -> Any:
        masked.append(sec.site_id)
        return mask_integers(sec, run_id, tag, values, **kw)

    monkeypatch.setattr(SiteSecAgg, "mask_integers", rec_mask)
    _honest_sites(monkeypatch)
    exp = _exp(rounds=4, max_sites=4, threshold=3)
    exp["federated"]["parameters"].update(min_available_clients=4, min_fit_clients=4)
    doc = simulate(exp, sites=4, seed=2, progress=False, keep_work=True)
    assert doc["rejected"] == [] and doc["declined"] == [] and len(doc["rounds"]) == 4
    for row in doc["rounds"]:
        assert len({b.rsplit("#", 1)[0] for b in row["secure_aggregation"]["buffer"]}) == N  # 3 distinct sites
    x = load_experiment(exp)
    one = central_entry(x, 4, steps=1)
    plan = secure_dp_epsilon(x, SitePolicy(metrics="exact"), delta=1e-5)
    counts = {s: masked.count(s) for s in doc["epsilon"]}
    assert sorted(counts) == ["site-1", "site-2", "site-3", "site-4"] and max(counts.values()) <= 4
    assert min(counts.values()) < 4, counts  # a site out of some buffer (4 sites, buffers of 3)
    for home in sorted((Path(doc["work_dir"]) / "sites").iterdir()):  # an update still in flight at the end counts
        eps = PrivacyLedger(load_site_config(home / "site.toml").state_dir).spent(DATASET, delta=1e-5)
        assert eps == pytest.approx(skellam.epsilon_of([one] * counts[home.name], delta=1e-5), rel=1e-9), counts
        assert eps <= plan + 1e-9
