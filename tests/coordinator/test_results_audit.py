"""Audit, show/compare/export and the coordinator CLI on runs made on the memory bus."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from coordinator.audit import audit_run
from coordinator.checkpoints import load_tensors
from coordinator.state import StateStore
from fedbus.cli import app
from tests.coordinator.conftest import experiment


@pytest.fixture
def finished(federation):
    federation.add_site(1.0, 10)
    federation.add_site(2.0, 20)
    federation.start_sites()
    result = federation.coordinator(experiment(rounds=2)).run()
    assert result.ok
    return federation, result


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_audit_passes_on_a_clean_run_and_fails_after_one_checkpoint_byte_changes(finished):
    fed, result = finished
    store = StateStore(fed.state_dir)
    report = audit_run(store, result.run_id)
    assert report.ok, report.problems
    assert report.signatures == 2 * 2 + 2  # two updates per round + two test evaluations
    assert report.checkpoints == 3  # initial + two rounds
    ok = _cli("coordinator", "audit", result.run_id, "--state", fed.state_dir, "--json")
    assert ok.exit_code == 0, ok.output
    ck = fed.state_dir / store.rounds(result.run_id)[0]["checkpoint_path"]
    data = bytearray(ck.read_bytes())
    data[-1] ^= 0x01
    ck.write_bytes(bytes(data))
    bad = _cli("coordinator", "audit", result.run_id, "--state", fed.state_dir)
    assert bad.exit_code == 1
    assert "round 1 checkpoint" in bad.output and "sha256" in bad.output


def test_audit_fails_when_a_stored_update_body_is_altered(finished):
    fed, result = finished
    store = StateStore(fed.state_dir)
    body_path = fed.state_dir / store.updates(result.run_id, verdict="accepted", kind="Update")[0]["body_path"]
    data = bytearray(body_path.read_bytes())
    data[len(data) // 2] ^= 0x01
    body_path.write_bytes(bytes(data))
    report = audit_run(store, result.run_id)
    assert not report.ok
    assert any("does not match its recorded sha256" in p for p in report.problems)


def test_runs_list_show_compare_export(finished, tmp_path):
    fed, result = finished
    second = fed.coordinator(experiment(rounds=1)).run()
    listed = _cli("coordinator", "runs", "list", "--state", fed.state_dir, "--json")
    assert listed.exit_code == 0
    runs = json.loads(listed.stdout)
    assert [r["run_id"] for r in runs] == [result.run_id, second.run_id]
    shown = json.loads(_cli("coordinator", "runs", "show", result.run_id, "--state", fed.state_dir, "--json").stdout)
    assert shown["run_id"] == result.run_id and shown["status"] == "completed"
    assert set(shown["rounds"][0]["per_site"]) == {s.site_id for s in fed.sites}
    assert shown["epsilon"] == {s.site_id: pytest.approx(1.5) for s in fed.sites}
    cmp = json.loads(_cli("coordinator", "runs", "compare", result.run_id, second.run_id, "--state", fed.state_dir,
                          "--json").stdout)
    assert len(cmp["rounds"]) == 2 and cmp["rounds"][1]["loss_b"] is None
    out = tmp_path / "export"
    exp = _cli("coordinator", "runs", "export", result.run_id, "--out", out, "--state", fed.state_dir)
    assert exp.exit_code == 0, exp.output
    weights = load_tensors(out / "model.safetensors")
    for (n, a), (m, b) in zip(weights, result.weights):
        assert n == m
        np.testing.assert_array_equal(a, b)
    assert json.loads((out / "experiment.json").read_text())["architecture"] == experiment()["architecture"]
    assert json.loads((out / "model_spec.json").read_text())["parameters"] == sum(a.size for _, a in weights)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["round"] for r in rows] == ["1", "2"]
    assert float(rows[0]["validation (all sites) loss"]) == pytest.approx(result.rounds[0]["loss"])
    for png in ("loss.png", "accuracy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = _cli("coordinator", "runs", "show", "nope", "--state", fed.state_dir)
    assert missing.exit_code == 2 and "no run 'nope'" in missing.output


def test_enroll_and_sites_cli(tmp_path, federation):
    from protocol.signing import generate_keypair

    _, pub = generate_keypair("site-a", tmp_path / "keys")
    r = _cli("coordinator", "enroll", "site-a", pub, "--state", tmp_path / "st", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["site_id"] == "site-a"
    listed = json.loads(_cli("coordinator", "sites", "--state", tmp_path / "st", "--json").stdout)
    assert [(s["site_id"], s["dataset"]) for s in listed] == [("site-a", None)]
    (tmp_path / "junk.pub").write_text("not a key")
    bad = _cli("coordinator", "enroll", "site-b", tmp_path / "junk.pub", "--state", tmp_path / "st")
    assert bad.exit_code == 2 and "not an Ed25519 public key" in bad.output


def test_sites_lists_the_hello_catalogue(finished):
    fed, _ = finished
    rows = json.loads(_cli("coordinator", "sites", "--state", fed.state_dir, "--json").stdout)
    assert {(r["site_id"], r["dataset"], r["rows"]) for r in rows} == {(s.site_id, "toy", 100) for s in fed.sites}
