"""Record-level DP at pooled cost over the bus (``simulate``: the site daemons, the sync round loop).

Each site's daemon answers a pooled run's TrainTask with one masked pooled step
(``site_worker/pooled_task.py``), the coordinator steps on the unmasked noisy sum
(``coordinator/rounds/secure.py``). Checked: every site's ledger charges exactly the plan
(``skellam-rdp`` at the site's delta) and reports it, every round unmasks one sum of all four
hospitals, the result says what the coordinator saw; the same on RabbitMQ (site processes).
A site's policy refuses what it cannot honour (accountant, m above K, too little noise).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from protocol.config import load_experiment
from protocol.config_error import ConfigError
from protocol.model import summarize
from protocol.policy import SitePolicy
from protocol.secagg import skellam
from protocol.secagg.rules import pooled_mu
from simulator.run import simulate
from site_worker.policy import PolicyViolation, check_policy

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 3


def _exp(**sa: object) -> dict:
    e = json.loads((ROOT / "examples" / "heart_disease_dp.json").read_text())
    e["training"]["optimizer"].pop("differential_privacy")
    e["training"].pop("personalization")
    e["training"]["rounds"] = ROUNDS
    e["federated"]["parameters"].update(min_fit_clients=4, min_available_clients=4)
    e["federated"]["secure_aggregation"] = {"min_contributors": 4, "threshold": 3, "dp": "pooled", "clip": 0.5,
                                            "scale": 1024.0, "max_sites": 4, "max_batch": 512,
                                            "target_epsilon": 1.0, **sa}
    return e


def _planned(exp: dict) -> float:
    x = load_experiment(exp)
    sa = x.federated.secure_aggregation
    assert sa is not None
    l1, l2 = skellam.sensitivities(sa.clip, sa.scale, summarize(x.architecture.layers).trainable)
    return skellam.epsilon_of([skellam.SkellamEntry(pooled_mu(x), l1, l2, sa.sample_rate, ROUNDS)], delta=1e-5)


def _check(doc: dict, exp: dict) -> None:
    planned = _planned(exp)
    assert planned <= 1.0
    from protocol.privacy_plan import secure_dp_epsilon  # the planner site check shows: the same figure

    assert secure_dp_epsilon(load_experiment(exp), SitePolicy(metrics="exact"), delta=1e-5) == pytest.approx(planned)
    assert sorted(doc["epsilon"]) == ["cleveland", "hungary", "switzerland", "va-long-beach"]
    for site, eps in doc["epsilon"].items():
        assert eps == pytest.approx(planned, rel=1e-9), site
    seen = doc["privacy"]["secure_aggregation"]
    assert seen["used"] is True and seen["dp"] == "pooled"
    assert seen["sums_unmasked"] == ROUNDS and seen["fewest_contributors"] == 4
    assert "never an un-noised sum" in seen["coordinator_saw"]
    assert 0.5 < doc["holdout"]["accuracy"] <= 1.0


def test_a_pooled_run_over_the_memory_bus_charges_each_ledger_the_plan() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        exp = _exp()
        doc = simulate(exp, partition="natural:dataset", seed=1, progress=False)
    _check(doc, exp)


@pytest.mark.broker
@pytest.mark.slow
def test_a_pooled_run_on_rabbitmq_charges_each_ledger_the_plan(amqp_url: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        exp = _exp()
        doc = simulate(exp, partition="natural:dataset", seed=1, progress=False, broker=amqp_url)
    assert doc["broker"].startswith("amqp://")
    _check(doc, exp)


def test_a_sites_policy_refuses_what_it_cannot_honour() -> None:
    exp = load_experiment(_exp())
    sa = exp.federated.secure_aggregation
    assert sa is not None
    sigma = skellam.gaussian_equivalent(pooled_mu(exp), skellam.sensitivities(sa.clip, sa.scale, 26)[1])
    check_policy(SitePolicy(assume_honest_sites=4, min_noise_multiplier=sigma, max_epsilon=1.0), exp,
                 parameters=26)  # each just inside
    cases = [(SitePolicy(assume_honest_sites=5), "^assume_honest_sites: the experiment unmasks sums of 4"),
             (SitePolicy(accountant="prv"), "^accountant: pooled DP steps compose in RDP"),
             (SitePolicy(min_noise_multiplier=sigma * 1.001), "^min_noise_multiplier: noise multiplier [0-9.]+ is below"),
             (SitePolicy(max_epsilon=0.9), "^max_epsilon: target epsilon 1.0 exceeds")]
    for policy, why in cases:
        with pytest.raises(PolicyViolation, match=why):
            check_policy(policy, exp, parameters=26)


def test_a_pooled_run_steps_with_fedavg_only() -> None:
    from coordinator.secagg import refuse_until_wired

    refuse_until_wired(load_experiment(_exp()))
    adam = _exp()
    adam["federated"]["name"] = "FedAdam"
    with pytest.raises(ConfigError) as e:
        refuse_until_wired(load_experiment(adam))
    assert str(e.value).startswith("federated.secure_aggregation.dp: 'pooled' steps the model with the experiment's")


def _handler_and_task(tmp_path: Path, policy: SitePolicy):
    from protocol.codec import new_envelope
    from protocol.messages import TrainTask
    from site_worker.config import DatasetSource, SiteConfig
    from site_worker.handlers import TaskHandler
    from tests.site_worker.support import experiment_dict, heart_failure_csv, initial_weights

    exp = experiment_dict(**{"federated.parameters.min_fit_clients": 2, "federated.parameters.min_available_clients": 2})
    exp["training"]["optimizer"].pop("differential_privacy", None)
    exp["federated"]["secure_aggregation"] = {"min_contributors": 2, "threshold": 2, "dp": "pooled", "clip": 1.0,
                                              "scale": 1024.0, "max_sites": 3, "max_batch": 512, "noise_multiplier": 5.0}
    csv = heart_failure_csv(tmp_path / "hf.csv")
    cfg = SiteConfig(site_id="s", federation="f", broker_url="memory://x", key_path=tmp_path / "k",
                     coordinator_pub=tmp_path / "p", state_dir=tmp_path / "state",
                     datasets={"heart_failure": DatasetSource(name="heart_failure", path=csv, target="DEATH_EVENT")},
                     policy=policy)
    task = TrainTask(experiment=exp, weights=initial_weights(exp), dataset="heart_failure", base_round=0, seed=1,
                     deadline=0.0)
    env = new_envelope(task, federation="f", run_id="r", round=1, sender="coordinator", recipient="s")
    return TaskHandler(cfg), env


def test_the_task_handler_never_trains_a_pooled_run_without_its_noise(tmp_path: Path) -> None:
    """Only the daemon's pooled path takes a pooled run's step; the local trainer declines it."""
    from protocol.messages import Declined

    handler, env = _handler_and_task(tmp_path, SitePolicy(allow_no_dp=True))
    reply = handler.handle(env)
    assert isinstance(reply, Declined) and reply.reason == "policy"
    assert reply.detail.startswith("secure_aggregation: a pooled DP run is trained only by the daemon's pooled step")


def test_a_pooled_step_that_would_not_fit_the_sites_memory_is_declined_before_anything_is_spent(tmp_path: Path) -> None:
    from protocol.messages import Declined
    from site_worker.pooled_task import pooled_update

    handler, env = _handler_and_task(tmp_path, SitePolicy(max_train_memory_mb=0.01))
    reply = pooled_update(handler, None, env)  # type: ignore[arg-type]  (refused before any masking)
    assert isinstance(reply, Declined) and reply.reason == "policy"
    assert reply.detail.startswith("max_train_memory_mb: one training step")
    assert handler.ledger.releases("heart_failure") == []


def test_config_validate_says_the_pooled_mode_and_its_noise(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedbus.cli import app

    path = tmp_path / "pooled.json"
    path.write_text(json.dumps(_exp()))
    r = CliRunner().invoke(app, ["config", "validate", str(path)])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("privacy:"))
    assert "pooled DP under secure aggregation" in line and "accountant=skellam-rdp" in line and "DP off" not in line
