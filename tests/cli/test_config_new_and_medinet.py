"""Bring your own data: ``config new`` from a CSV (then ``simulate`` on it), from a site's
catalogue, and the MediNet export run unchanged with ``--dataset`` on a CSV of its shape."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from fedbus.cli import app
from protocol.config import load_experiment

ROOT = Path(__file__).resolve().parents[2]
MEDINET = ROOT / "tests" / "protocol" / "fixtures" / "medinet_export.json"  # byte copy of ../shared/fixtures


def _csv(path: Path, *, numeric: int, cats: dict[str, list[str]], target: str, n: int = 240) -> Path:
    rng = np.random.default_rng(7)
    d: dict[str, object] = {f"x{i}": rng.normal(size=n) for i in range(numeric)}
    for c, values in cats.items():
        d[c] = rng.choice(values, size=n)
    d["record id"] = [f"R{i:05d}" for i in range(n)]  # an identifier: must be left out
    d[target] = (np.asarray(d["x0"]) + rng.normal(scale=0.5, size=n) > 0).astype(int)
    pd.DataFrame(d).to_csv(path, index=False)
    return path


def test_config_new_from_a_csv_then_simulate(tmp_path: Path) -> None:
    csv = _csv(tmp_path / "my ward.csv", numeric=3, cats={"smoker": ["no", "yes"], "ward": ["A", "B", "C"]},
               target="died")
    out = tmp_path / "exp.json"
    r = CliRunner().invoke(app, ["config", "new", "--dataset", str(csv), "--target", "died", "--out", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    exp = load_experiment(doc)
    assert exp.dataset.features == ["x0", "x1", "x2", "smoker", "ward"]
    assert exp.dataset.categorical == {"smoker": ["no", "yes"], "ward": ["A", "B", "C"]}
    assert exp.input_shape == (3 + 2 + 3,)  # hand count: 3 numeric + 2 + 3 categories
    # 240 rows per site: logistic regression, full-batch, inside a whole-run ε 8 (tests/cli/test_config_new_leaks.py)
    assert [layer.params["out_features"] for layer in exp.architecture.layers if layer.type == "Linear"] == [1]
    assert exp.training.dp.total_epsilon == 8.0 and exp.training.dp.delta == 1e-5 and exp.training.batch_size >= 240
    assert "record id" in exp.dataset.exclude and "identifier" in r.stderr
    assert exp.dataset.name == "my_ward"
    again = CliRunner().invoke(app, ["config", "new", "--dataset", str(csv), "--target", "died", "--out", str(out)])
    assert again.exit_code == 2 and "--force" in again.stderr

    s = CliRunner().invoke(app, ["simulate", str(out), "--dataset", str(csv), "--target", "died", "--rounds", "1",
                                 "--sites", "2", "--json"])
    assert s.exit_code == 0, s.output
    res = json.loads(s.stdout)
    assert [r["replies"] for r in res["rounds"]] == [2] and res["final"]["accuracy"] is not None


def test_the_medinet_export_runs_unchanged_with_dataset(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["simulate", str(MEDINET), "--rounds", "1"])
    assert r.exit_code == 2
    assert f"fedbus simulate {MEDINET} --dataset FILE.csv" in r.stderr
    assert "52 encoded input columns" in r.stderr and "'Heart Attack Risk'" in r.stderr
    # 22 numeric + 10 three-valued categoricals = 52 encoded columns, as the export declares.
    csv = _csv(tmp_path / "heart.csv", numeric=22, cats={f"c{i}": ["a", "b", "c"] for i in range(10)},
               target="Heart Attack Risk")
    before = MEDINET.read_bytes()
    r = CliRunner().invoke(app, ["simulate", str(MEDINET), "--dataset", str(csv), "--rounds", "1", "--json"])
    assert r.exit_code == 0, r.output
    assert MEDINET.read_bytes() == before
    doc = json.loads(r.stdout)
    assert len(doc["rounds"]) == 1 and doc["rounds"][0]["replies"] == 3
    # A file of another shape is refused with both widths named.
    wrong = _csv(tmp_path / "wrong.csv", numeric=5, cats={}, target="Heart Attack Risk")
    r = CliRunner().invoke(app, ["simulate", str(MEDINET), "--dataset", str(wrong), "--rounds", "1"])
    assert r.exit_code == 2 and "encodes to 5 input columns" in r.stderr and "takes 52" in r.stderr


def test_config_new_from_a_sites_catalogue(tmp_path: Path) -> None:
    from coordinator.state import StateStore
    from protocol.signing import Signer

    store = StateStore(tmp_path / "state")
    store.enroll("site-a", Signer.generate().public_pem())
    store.record_hello("site-a", {"site_id": "site-a", "software_version": "x", "datasets": [{
        "name": "hf", "rows": 100, "columns": ["age", "sex", "ef", "DEATH_EVENT"],
        "feature_types": {"age": "numeric", "sex": "categorical", "ef": "numeric"}, "target": "DEATH_EVENT"}]})
    store.close()
    out = tmp_path / "exp.json"
    r = CliRunner().invoke(app, ["config", "new", "--from-site", "site-a", "--dataset", "hf", "--state",
                                 str(tmp_path / "state"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    exp = load_experiment(out)
    assert exp.dataset.features == ["age", "ef"] and exp.dataset.target == "DEATH_EVENT" and exp.input_shape == (2,)
    assert "left out sex" in r.stderr
    r = CliRunner().invoke(app, ["config", "new", "--from-site", "site-a", "--dataset", "nope", "--state",
                                 str(tmp_path / "state"), "--out", str(tmp_path / "x.json")])
    assert r.exit_code == 2 and "announced no dataset 'nope'" in r.stderr
