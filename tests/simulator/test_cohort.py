"""The cohort table of a simulated federation (issue 25): production sites and coordinator, DP by default.

``simulate(..., cohort_only=True)`` on the four UCI heart-disease hospitals (natural partition),
on the in-memory bus and on RabbitMQ (one OS process per site). Oracles: pandas on the sites'
own files, each site's ledger on disk, Opacus' RDP accountant. The coverage check uses the
production site handler on the four hospitals' full files (``bench/cohort_coverage.py``; its
20-draw figure is in the report).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pandas as pd
import pytest
from opacus.accountants import RDPAccountant

from coordinator.cohort import latest_cohort
from protocol.config import load_experiment
from simulator.run import simulate

ROOT = Path(__file__).resolve().parents[2]
HEART_DISEASE = ROOT / "examples" / "heart_disease.json"


def one_release_epsilon(sigma: float = 2.0, delta: float = 1e-5) -> float:
    acc = RDPAccountant()
    acc.step(noise_multiplier=sigma, sample_rate=1.0)
    return acc.get_epsilon(delta=delta)


def check_document(doc: dict, out: Path) -> None:
    sites = doc["sites"]
    assert len(sites) == 4 and all(v["status"] == "released" and v["mode"] == "dp" for v in sites.values())
    work = next((out / "work").iterdir()) / "sites"
    truth_rows = 0
    for site, v in sites.items():
        data = sorted(p for p in (work / site / "data").iterdir() if p.suffix == ".csv")
        files = pd.read_csv(data[0]) if len(data) == 1 else None
        ledger = json.loads(next((work / site / "state").rglob("heart_disease.json")).read_text())
        assert [(r["kind"], r["entries"]) for r in ledger["releases"]] == [("stats", [[2.0, 1.0, 1]])]
        assert v["epsilon"] == pytest.approx(one_release_epsilon(), rel=1e-9) and v["accountant"] == "rdp"
        truth_rows += v["n"] if files is None else len(files)
    pooled = doc["pooled"]
    assert pooled["n"] == sum(v["n"] for v in sites.values()) == truth_rows
    assert pooled["noise_sd"] == pytest.approx(sum(v["noise_sd"] ** 2 for v in sites.values()) ** 0.5)
    kept = latest_cohort(out / "coordinator", load_experiment(HEART_DISEASE))
    assert kept is not None and kept["cohort_id"] == doc["cohort_id"]


def test_cohort_only_on_the_memory_bus_releases_and_pools_every_hospital(tmp_path):
    doc = simulate(HEART_DISEASE, partition="natural:dataset", out=tmp_path / "out", progress=False, cohort_only=True,
                   bins=10)
    check_document(doc, tmp_path / "out")
    assert doc["bins"] == 10 and len(doc["pooled"]["table"]["columns"][0]["histogram"]["counts"]) == 10


@pytest.mark.broker
@pytest.mark.slow
def test_cohort_only_over_rabbitmq_site_processes(amqp_url, tmp_path):
    doc = simulate(HEART_DISEASE, partition="natural:dataset", out=tmp_path / "out", progress=False, cohort_only=True,
                   broker=amqp_url, site_suffix=f"-{uuid.uuid4().hex[:6]}")
    check_document(doc, tmp_path / "out")


def test_pooled_mean_age_and_prevalence_cover_the_truth(tmp_path):
    """10 secret draws (the bench runs 20): each figure's interval must cover the truth in at least 7
    (at a true 95 % coverage, fewer than 7 of 10 happens with probability about 1e-4)."""
    spec = importlib.util.spec_from_file_location("cohort_coverage", ROOT / "bench" / "cohort_coverage.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.draws(10, tmp_path)
    assert out["ledger_as_planned"], out
    assert out["covered"]["age"] >= 7 and out["covered"]["prevalence"] >= 7, out


def test_cohort_cli_refuses_bad_input_in_one_line(tmp_path):
    bad = json.loads(HEART_DISEASE.read_text())
    bad["dataset"]["bounds"] = {"age": [100, 0]}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    for args in (["coordinator", "cohort", str(path), "--broker", "amqp://127.0.0.1:1/%2F", "--state", str(tmp_path),
                  "--federation", "f"],
                 ["simulate", str(path), "--cohort-only"]):
        r = subprocess.run([sys.executable, "-m", "fedbus.cli", *args], capture_output=True, text=True, timeout=120,
                           cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        assert r.returncode == 2, r.stderr
        assert "dataset.bounds.age" in r.stderr and "Traceback" not in r.stderr
        assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, r.stderr


def test_cohort_cli_names_a_missing_option_and_never_makes_a_key(tmp_path):
    """``coordinator cohort`` takes ``coordinator run``'s live-federation options (fedbus/cli_federation.py):
    a missing one is named, and without --key it refuses as run does rather than make a key."""
    base = ["coordinator", "cohort", str(HEART_DISEASE), "--broker", "amqp://127.0.0.1:1/%2F", "--state", str(tmp_path / "s")]
    for args, words in ((base, "--federation NAME is required"), ([*base, "--federation", "f"], "no coordinator key")):
        r = subprocess.run([sys.executable, "-m", "fedbus.cli", *args], capture_output=True, text=True, timeout=120,
                           cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and words in lines[0], r.stderr
    assert not (tmp_path / "s" / "coordinator.key").exists()
