"""The site approves what it runs (issue 20, Build 2; anchor: Fed-BioMed's training-plan approval).

A provisioned kit has ``require_approval = true``: it declines an experiment nobody approved
(``Declined(policy)``, the hash in the reason), runs it after ``fedbus site approve``, and
declines it again after ``fedbus site approvals revoke``. The tasks are what a coordinator
sends (the experiment in wire form) and go through the site's real handler with the kit's own
config; the CLI is the operator's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from typer.testing import CliRunner

from fedbus.cli import app
from protocol.codec import new_envelope
from protocol.config import load_experiment
from protocol.messages import Declined, TrainTask, Update
from site_worker.config import load_site_config
from site_worker.handlers import TaskHandler

from tests.cli.test_kits import _project, _provision
from tests.site_worker.support import HEART_FAILURE, heart_failure_csv, initial_weights


def _task(exp_path: Path) -> TrainTask:
    wire = load_experiment(exp_path).to_wire()
    return TrainTask(experiment=wire, weights=initial_weights(wire), dataset="heart_failure", base_round=0, seed=5,
                     deadline=time.time() + 600)


def _send(handler: TaskHandler, task: TrainTask):
    return handler.handle(new_envelope(task, federation="cardio", run_id="r", round=1, sender="coordinator",
                                       recipient="h1"))


def test_a_provisioned_kit_runs_only_what_its_operator_approved(tmp_path):
    csv = heart_failure_csv(tmp_path / "hf.csv")
    out = tmp_path / "kits"
    assert _provision(str(_project(tmp_path, ["h1"], data=csv)), "--out", str(out), "--skip-broker").exit_code == 0
    site_toml = out / "h1" / "site.toml"
    cfg = load_site_config(site_toml)
    assert cfg.policy.require_approval  # the provisioned default
    doc = json.loads(HEART_FAILURE.read_text())
    doc["training"]["epochs"] = 1
    exp = tmp_path / "exp.json"
    exp.write_text(json.dumps(doc))
    cli = CliRunner()

    handler = TaskHandler(cfg)
    first = _send(handler, _task(exp))
    assert isinstance(first, Declined) and first.reason == "policy" and "require_approval" in first.detail
    digest = first.detail.split("experiment ")[1].split(" ")[0]
    assert digest.startswith("sha256:") and len(digest) == len("sha256:") + 64
    assert handler.ledger.releases("heart_failure") == []  # nothing ran, nothing spent

    checked = cli.invoke(app, ["site", "check", "--config", str(site_toml), "--experiment", str(exp)])
    assert f"FAIL  approval: experiment hash {digest}: not approved" in checked.stdout
    assert "ok    model:" in checked.stdout and "cost ε" in checked.stdout

    r = cli.invoke(app, ["site", "approve", str(exp), "--config", str(site_toml)])
    assert r.exit_code == 0 and digest in r.stdout, r.output
    assert digest in cli.invoke(app, ["site", "approvals", "list", "--config", str(site_toml)]).stdout
    assert isinstance(_send(handler, _task(exp)), Update)

    # another experiment (one more epoch) is another hash: not approved by the first approval
    doc["training"]["epochs"] = 2
    other = tmp_path / "other.json"
    other.write_text(json.dumps(doc))
    assert isinstance(_send(handler, _task(other)), Declined)

    r = cli.invoke(app, ["site", "approvals", "revoke", digest, "--config", str(site_toml)])
    assert r.exit_code == 0, r.output
    again = _send(handler, _task(exp))
    assert isinstance(again, Declined) and digest in again.detail
    assert digest not in cli.invoke(app, ["site", "approvals", "list", "--config", str(site_toml)]).stdout


def test_bad_approval_input_is_one_line_and_exit_2(tmp_path):
    csv = heart_failure_csv(tmp_path / "hf.csv")
    out = tmp_path / "kits"
    assert _provision(str(_project(tmp_path, ["h1"], data=csv)), "--out", str(out), "--skip-broker").exit_code == 0
    site_toml = str(out / "h1" / "site.toml")
    cli = CliRunner()
    r = cli.invoke(app, ["site", "approvals", "revoke", "sha256:" + "0" * 64, "--config", site_toml])
    assert r.exit_code == 2 and "HASH" in r.output and len(r.output.strip().splitlines()) == 1
    bad = tmp_path / "bad.json"
    doc = json.loads(HEART_FAILURE.read_text())
    doc["training"]["epochs"] = "many"
    bad.write_text(json.dumps(doc))
    r = cli.invoke(app, ["site", "approve", str(bad), "--config", site_toml])
    assert r.exit_code == 2 and "training.epochs" in r.output and len(r.output.strip().splitlines()) == 1
    doc["training"]["epochs"] = 1
    doc["dataset"]["name"] = "elsewhere"
    bad.write_text(json.dumps(doc))
    r = cli.invoke(app, ["site", "approve", str(bad), "--config", site_toml])
    assert r.exit_code == 2 and "dataset.name" in r.output and len(r.output.strip().splitlines()) == 1
    r = cli.invoke(app, ["site", "approve", str(bad), "--config", str(tmp_path / "missing.toml")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
