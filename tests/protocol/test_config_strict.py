"""Strict experiments: unknown keys are errors with path and "did you mean"; MediNet's own
fields are accepted and reported as not used by fedbus."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedbus.cli import app
from protocol.config import ConfigError, load_experiment

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "protocol" / "fixtures" / "medinet_export.json"
HEART = json.loads((ROOT / "examples" / "heart_failure.json").read_text())


@pytest.mark.parametrize(("where", "key", "path", "suggestion"), [
    (("training", "optimizer"), "learnig_rate", "training.optimizer.learnig_rate", "learning_rate"),
    (("training",), "epoch", "training.epoch", "epochs"),
    (("dataset",), "targt", "dataset.targt", "target"),
    (("federated", "parameters"), "min_fit_client", "federated.parameters.min_fit_client", "min_fit_clients"),
    (("architecture", "layers", 1), "parms", "architecture.layers[1].parms", "params"),
    (("training", "optimizer", "differential_privacy"), "noise_multiplyer",
     "training.optimizer.differential_privacy.noise_multiplyer", "noise_multiplier"),
])
def test_a_misspelt_key_is_an_error_naming_path_and_fix(where, key, path, suggestion) -> None:
    data = copy.deepcopy(HEART)
    block = data
    for w in where:
        block = block[w]
    block[key] = 1
    with pytest.raises(ConfigError) as e:
        load_experiment(data)
    assert e.value.path == path
    assert f'did you mean "{suggestion}"' in e.value.message


def test_every_unknown_key_is_listed() -> None:
    data = copy.deepcopy(HEART)
    data["training"]["learnig_rate"] = 0.1
    data["dataset"]["nun"] = "x"
    with pytest.raises(ConfigError) as e:
        load_experiment(data)
    assert [p for p, _ in e.value.errors] == ["training.learnig_rate", "dataset.nun"]
    assert "and 1 more unknown key" in str(e.value)


def test_the_medinet_fixture_is_accepted_and_its_own_fields_reported() -> None:
    exp = load_experiment(FIXTURE)
    assert set(exp.not_used) >= {"metadata", "job_config", "training.flower_version", "training.metrics",
                                 "architecture.layers[0].readonly", "dataset.selected_datasets[0].connection"}
    assert not any(p.startswith("dataset.selected_datasets[0].target_info") for p in exp.not_used)
    r = CliRunner().invoke(app, ["config", "validate", str(FIXTURE), "--json"])
    assert r.exit_code == 0, r.output
    assert "job_config" in json.loads(r.stdout)["not_used_by_fedbus"]


def test_validate_names_the_unknown_key_and_exits_2(tmp_path: Path) -> None:
    data = copy.deepcopy(HEART)
    data["training"]["optimizer"]["learnig_rate"] = 0.1
    f = tmp_path / "exp.json"
    f.write_text(json.dumps(data))
    r = CliRunner().invoke(app, ["config", "validate", str(f)])
    assert r.exit_code == 2
    assert 'training.optimizer.learnig_rate: unknown key; did you mean "learning_rate"?' in r.stderr


def test_validate_prints_a_message_with_brackets_as_written(tmp_path: Path) -> None:
    # The terminal's markup must not eat "[channels, length]" (rich reads it as a style tag).
    data = json.loads((ROOT / "examples" / "ecg_cnn.json").read_text())
    data["dataset"]["kind"] = "tabular"
    f = tmp_path / "exp.json"
    f.write_text(json.dumps(data))
    r = CliRunner().invoke(app, ["config", "validate", str(f)])
    assert r.exit_code == 2
    assert 'set dataset.kind to "signal" for [channels, length] inputs' in r.stderr
