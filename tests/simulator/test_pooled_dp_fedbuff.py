"""Record-level DP at pooled cost under FedBuff's buffers (``dp = "pooled"``, ``federated.name = "FedBuff"``).

The four heart-disease hospitals, K = buffer_size = 4: each buffer holds one masked DP-SGD step of
each hospital (its Poisson batch's rounded clipped gradient sum plus its Skellam share), the
coordinator unmasks exactly their sum and steps on it over the buffer's expected batch; every
site's ledger charges the plan (T steps at the records' sampling rate q: the site's own Poisson
sampling amplifies as in the sync loop). In memory, and on RabbitMQ with site processes.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import coordinator.rounds.secure as secure_mod
from protocol.config import load_experiment
from protocol.model import summarize
from protocol.policy import SitePolicy
from protocol.privacy_plan import secure_dp_epsilon
from protocol.secagg import skellam
from protocol.secagg.rules import pooled_mu
from simulator.run import simulate
from site_worker.secagg import SiteSecAgg

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 3
HOSPITALS = ["cleveland", "hungary", "switzerland", "va-long-beach"]
DATASET = "heart_disease"


def _exp() -> dict[str, Any]:
    e = json.loads((ROOT / "examples" / "heart_disease_dp.json").read_text())
    e["training"]["optimizer"].pop("differential_privacy")
    e["training"].pop("personalization")
    e["training"]["rounds"] = ROUNDS
    e["federated"]["name"] = "FedBuff"
    e["federated"]["parameters"].update(min_fit_clients=4, min_available_clients=4, fraction_eval=0.0, buffer_size=4)
    e["federated"]["secure_aggregation"] = {"min_contributors": 4, "threshold": 3, "dp": "pooled", "clip": 0.5,
                                            "scale": 1024.0, "max_sites": 4, "max_batch": 512, "target_epsilon": 1.0}
    e["federated"]["round_timeout_s"] = 30.0
    return e


def _planned(exp: dict[str, Any]) -> float:
    """T = 3 pooled steps at the records' rate q, at delta 1e-5 (the simulated sites' policy), by hand."""
    x = load_experiment(exp)
    sa = x.federated.secure_aggregation
    assert sa is not None
    l1, l2 = skellam.sensitivities(sa.clip, sa.scale, summarize(x.architecture.layers).trainable)
    return skellam.epsilon_of([skellam.SkellamEntry(pooled_mu(x), l1, l2, sa.sample_rate, ROUNDS)], delta=1e-5)


def _buffers(doc: dict[str, Any]) -> list[list[tuple[str, int]]]:
    return [[(b.rsplit("#", 1)[0], int(b.rsplit("#", 1)[1])) for b in r["secure_aggregation"]["buffer"]]
            for r in doc["rounds"]]


def _check(doc: dict[str, Any], exp: dict[str, Any]) -> None:
    assert doc["rejected"] == [] and doc["declined"] == [] and len(doc["rounds"]) == ROUNDS
    for buffer in _buffers(doc):
        assert sorted(s for s, _ in buffer) == HOSPITALS  # one step of each hospital per buffer
    planned = _planned(exp)
    assert 0 < planned <= 1.0 and sorted(doc["epsilon"]) == HOSPITALS
    assert secure_dp_epsilon(load_experiment(exp), SitePolicy(metrics="exact"), delta=1e-5) == pytest.approx(planned, rel=1e-9)
    for site, eps in doc["epsilon"].items():
        assert eps == pytest.approx(planned, rel=1e-9), site
    seen = doc["privacy"]["secure_aggregation"]
    assert seen["dp"] == "pooled" and seen["sums_unmasked"] == ROUNDS and seen["fewest_contributors"] == 4
    assert 0.5 < doc["holdout"]["accuracy"] <= 1.0


def _site_check_is_the_ledger(doc: dict[str, Any], exp: dict[str, Any], tmp: Path) -> None:
    """``fedbus site check`` on each site's state as before the run (no ledger) shows its ledger's ε after."""
    import re
    import shutil
    from dataclasses import replace

    from fedbus.site_check import _check_experiment
    from site_worker.config import load_site_config
    from site_worker.ledger import PrivacyLedger

    path = tmp / "exp.json"
    path.write_text(json.dumps(exp))
    homes = sorted((Path(doc["work_dir"]) / "sites").iterdir())
    assert [h.name for h in homes] == HOSPITALS
    for home in homes:
        cfg = load_site_config(home / "site.toml")
        before = tmp / home.name
        shutil.copytree(cfg.state_dir, before, ignore=shutil.ignore_patterns("privacy"))
        check = {c.name: c for c in _check_experiment(replace(cfg, state_dir=before), path)}["privacy"]
        assert check.ok and "record-level pooled DP" in check.detail, check.detail
        delta = float(re.search(r"at δ ([0-9.e+-]+)", check.detail).group(1))
        spent = PrivacyLedger(cfg.state_dir).spent(DATASET, delta=delta, accountant="rdp")
        assert float(re.search(r"cost ε ([0-9.e+-]+)", check.detail).group(1)) == pytest.approx(spent, rel=1e-3)


def test_a_pooled_fedbuff_run_steps_on_each_buffers_sum_and_charges_each_ledger_the_plan(monkeypatch, tmp_path) -> None:
    masked: dict[tuple[str, int], np.ndarray] = {}
    grads: list[tuple[np.ndarray, float]] = []
    mask_integers, gradient = SiteSecAgg.mask_integers, secure_mod.pooled_gradient

    def rec_mask(sec: SiteSecAgg, run_id: str, tag: int, values: np.ndarray, **kw: Any) -> Any:
        masked[(sec.site_id, int(tag))] = np.asarray(values, dtype=np.int64).copy()
        return mask_integers(sec, run_id, tag, values, **kw)

    def rec_gradient(total: np.ndarray, *, scale: float, batch: float) -> np.ndarray:
        grads.append((np.asarray(total, dtype=np.int64).copy(), batch))
        return gradient(total, scale=scale, batch=batch)

    monkeypatch.setattr(SiteSecAgg, "mask_integers", rec_mask)
    monkeypatch.setattr(secure_mod, "pooled_gradient", rec_gradient)
    exp = _exp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        doc = simulate(exp, partition="natural:dataset", seed=1, progress=False, keep_work=True)
    _check(doc, exp)
    _site_check_is_the_ledger(doc, exp, tmp_path)
    assert len(masked) == 4 * ROUNDS and len(grads) == ROUNDS  # T steps per hospital, no more
    for row, buffer, (total, batch) in zip(doc["rounds"], _buffers(doc), grads):
        # the unmasked sum is exactly the four noisy integer steps (the coordinator adds nothing)
        np.testing.assert_array_equal(total, sum(masked[c] for c in buffer)[:total.size])
        assert row["secure_aggregation"]["expected_batch"] == batch > 0


@pytest.mark.broker
@pytest.mark.slow
def test_a_pooled_fedbuff_run_on_rabbitmq_charges_each_ledger_the_plan(amqp_url: str) -> None:
    exp = _exp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        doc = simulate(exp, partition="natural:dataset", seed=1, progress=False, broker=amqp_url)
    assert doc["broker"].startswith("amqp://")
    _check(doc, exp)
