"""``federated.secure_aggregation`` at ``fedbus config validate`` (issue 22): what it cannot
protect is refused in one line naming the key, exit 2; what it can passes."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fedbus.cli import app
from protocol.secagg.field import max_scale
from tests.cli.test_bad_input import _experiment, _one_line_exit_2

SA = {"min_contributors": 2, "threshold": 2}


def _with(tmp_path, name="FedAvg", sa=None, **params):
    def change(d):
        d["federated"]["name"] = name
        d["federated"]["parameters"].update(min_fit_clients=2, min_available_clients=2, **params)
        d["federated"]["secure_aggregation"] = dict(SA if sa is None else sa)
    return _experiment(tmp_path, f"{name.replace(':', '_')}{len(params)}", change)


@pytest.mark.parametrize("name,params", [("FedAvg", {}), ("FedBuff", {"buffer_size": 2}), ("FedAdam", {})])
def test_aggregators_that_work_on_sums_validate(tmp_path, name, params):
    r = CliRunner().invoke(app, ["config", "validate", str(_with(tmp_path, name, **params))])
    assert r.exit_code == 0, r.output


def test_fedasync_is_refused_naming_fedbuff(tmp_path):
    _one_line_exit_2(["config", "validate", str(_with(tmp_path, "FedAsync"))], "federated.name", "FedBuff",
                     "merges each update alone")


@pytest.mark.parametrize("strategy,why", [("flower:Krum", "each site's update"), ("flower:FedMedian", "each site's update"),
                                          ("flower:FedAdam", "individual updates")])
def test_flower_strategies_needing_individual_updates_are_refused_with_the_reason(tmp_path, strategy, why):
    _one_line_exit_2(["config", "validate", str(_with(tmp_path, strategy))], "federated.name", why)


def test_a_buffer_or_round_smaller_than_min_contributors_is_refused_at_the_edge(tmp_path):
    sa = {"min_contributors": 3, "threshold": 2}
    _one_line_exit_2(["config", "validate", str(_with(tmp_path, "FedBuff", sa, buffer_size=2))],
                     "federated.parameters.buffer_size")
    assert CliRunner().invoke(app, ["config", "validate", str(_with(tmp_path, "FedBuff", sa, buffer_size=3))]).exit_code == 0
    _one_line_exit_2(["config", "validate", str(_with(tmp_path, "FedAvg", sa))], "federated.parameters.min_fit_clients")


def test_the_bit_budget_is_checked_at_validate(tmp_path):
    edge = max_scale(1.0, 64)
    ok = _with(tmp_path, sa={**SA, "scale": edge})
    assert CliRunner().invoke(app, ["config", "validate", str(ok)]).exit_code == 0
    _one_line_exit_2(["config", "validate", str(_with(tmp_path, sa={**SA, "scale": edge + 1.0}, x=0))],
                     "federated.secure_aggregation.scale", "overflow")


def test_unknown_and_out_of_range_keys_are_named(tmp_path):
    _one_line_exit_2(["config", "validate", str(_with(tmp_path, sa={**SA, "treshold": 2}))],
                     "federated.secure_aggregation.treshold")
    _one_line_exit_2(["config", "validate", str(_with(tmp_path, sa={"min_contributors": 1, "threshold": 2}))],
                     "min_contributors")
    _one_line_exit_2(["config", "validate", str(_with(tmp_path, sa={**SA, "privacy": 2}))],
                     "federated.secure_aggregation.privacy")


def test_a_run_asking_for_secure_aggregation_is_never_run_in_the_clear(tmp_path):
    """Only the loops that mask run under the key (sync rounds, FedBuff's buffers): an experiment
    that slipped past validation with another aggregator is refused by the coordinator, not run
    unmasked (FedBuff runs under it: tests/simulator/test_secure_fedbuff.py)."""
    import json

    from coordinator.secagg import refuse_until_wired
    from protocol.config import ConfigError, load_experiment

    fedbuff = load_experiment(json.loads(_with(tmp_path, "FedBuff", buffer_size=2).read_text()))
    refuse_until_wired(fedbuff)  # wired: coordinator/rounds/secure_buffer.py
    refuse_until_wired(load_experiment(json.loads(_with(tmp_path, "FedAvg").read_text())))  # sync: wired
    fedasync = fedbuff.model_copy(update={"federated": fedbuff.federated.model_copy(update={"name": "FedAsync"})})
    with pytest.raises(ConfigError, match="federated.secure_aggregation.*FedAsync"):
        refuse_until_wired(fedasync)


def test_fedbuff_under_secure_aggregation_takes_only_the_constant_staleness(tmp_path):
    """A masked update cannot be weighted by its own staleness: constant validates, the others are refused."""
    r = CliRunner().invoke(app, ["config", "validate", str(_with(tmp_path, "FedBuff", buffer_size=2,
                                                                 staleness="constant"))])
    assert r.exit_code == 0, r.output
    for spec in ("polynomial", {"function": "hinge", "a": 10, "b": 4}):
        _one_line_exit_2(["config", "validate", str(_with(tmp_path, "FedBuff", buffer_size=2, staleness=spec))],
                         "federated.parameters.staleness")
