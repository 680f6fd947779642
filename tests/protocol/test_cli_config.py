"""``fedbus config validate``: summary on stderr, one JSON document with --json, exit 2 + path on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedbus.cli import app

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "protocol" / "fixtures" / "medinet_export.json"  # byte copy of ../shared/fixtures
EXAMPLES = sorted((ROOT / "examples").glob("*.json"))


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_validate_json_on_the_medinet_fixture(runner):
    result = runner.invoke(app, ["config", "validate", str(FIXTURE), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # exactly one JSON document on stdout
    assert doc["valid"] is True
    assert doc["parameters"] == 3457
    assert [(layer["type"], layer["output_shape"]) for layer in doc["layers"]] == [
        ("input", [52]), ("Linear", [64]), ("ReLU", [64]), ("Linear", [1]), ("output", [1]),
    ]
    assert doc["training"]["loss_function"] == "bce_with_logits"
    assert doc["training"]["optimizer"]["differential_privacy"]["noise_multiplier"] == 1.0
    assert doc["federated"]["name"] == "FedAvg" and doc["federated"]["parameters"]["fraction_eval"] == 0.3
    assert doc["dataset"]["name"] == "Hearth Atack Risk" and doc["dataset"]["task"] == "binary"
    assert result.stderr == ""


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_validate_every_example(runner, path):
    result = runner.invoke(app, ["config", "validate", str(path), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["valid"] is True and doc["parameters"] > 0
    assert doc["layers"][-1]["output_shape"] == doc["output_shape"]


def test_human_output_goes_to_stderr(runner):
    result = runner.invoke(app, ["config", "validate", str(ROOT / "examples" / "ecg_cnn.json")])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    err = result.stderr
    assert "184,802" in err and "[16, 90]" in err and "[1440]" in err
    assert "cross_entropy" in err and "FedAvg" in err and "noise_multiplier=1" in err
    assert "valid" in err


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "experiment.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_invalid_chain_exits_2_with_the_path(runner, tmp_path):
    data = json.loads(FIXTURE.read_text())
    data["architecture"]["layers"][3]["params"]["in_features"] = 65
    path = _write(tmp_path, data)
    human = runner.invoke(app, ["config", "validate", str(path)])
    assert human.exit_code == 2
    assert "architecture.layers[3].params.in_features: must equal the previous layer's output (64)" in human.stderr
    machine = runner.invoke(app, ["config", "validate", str(path), "--json"])
    assert machine.exit_code == 2
    doc = json.loads(machine.stdout)
    assert doc["valid"] is False
    assert doc["error"]["path"] == "architecture.layers[3].params.in_features"
    assert doc["error"]["message"] == "must equal the previous layer's output (64)"


def test_non_whitelisted_layer_exits_2(runner, tmp_path):
    data = json.loads(FIXTURE.read_text())
    data["architecture"]["layers"][2]["type"] = "Lambda"
    result = runner.invoke(app, ["config", "validate", str(_write(tmp_path, data)), "--json"])
    assert result.exit_code == 2
    assert json.loads(result.stdout)["error"]["path"] == "architecture.layers[2].type"


def test_bad_training_field_exits_2(runner, tmp_path):
    data = json.loads(FIXTURE.read_text())
    data["training"]["batch_size"] = 0
    result = runner.invoke(app, ["config", "validate", str(_write(tmp_path, data))])
    assert result.exit_code == 2
    assert "training.batch_size: must be >= 1" in result.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "does not exist"), ("{not json", "not valid JSON"), ("[]", "must be a JSON object")],
)
def test_unreadable_input_exits_2(runner, tmp_path, content, message):
    path = tmp_path / "missing.json" if content is None else _write(tmp_path, content)
    result = runner.invoke(app, ["config", "validate", str(path)])
    assert result.exit_code == 2
    assert message in result.stderr
    machine = runner.invoke(app, ["config", "validate", str(path), "--json"])
    assert machine.exit_code == 2
    doc = json.loads(machine.stdout)
    assert doc["valid"] is False and message in doc["error"]["message"]


def test_missing_argument_is_a_usage_error(runner):
    result = runner.invoke(app, ["config", "validate"])
    assert result.exit_code == 2
