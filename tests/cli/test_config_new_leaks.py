"""``fedbus config new`` knows clinical data: it leaves out columns that leak the outcome
(follow-up durations, identifiers, near-perfect single-column separators), one line per
column, ``--keep`` overrides; it sizes the model to the rows per site and the ε budget; and
what it writes for the README's demo beats the majority class."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fedbus.cli import app
from fedbus.leak_screen import SEPARATION_AUC, duration_reason, identifier_reason, separation_reason, single_column_auc
from protocol.config import load_experiment
from protocol.experiment_template import MLP_MIN_EPSILON, MLP_MIN_ROWS, size_model


def _clinical_csv(path: Path, n: int = 120) -> Path:
    rng = np.random.default_rng(3)
    died = rng.random(n) < 0.35
    pd.DataFrame({
        "patient_id": [f"P{i:04d}" for i in range(n)],
        "row": np.arange(1, n + 1),  # numbers the rows: an identifier though numeric
        "age": rng.normal(65, 10, n).round(),
        "ejection_fraction": rng.normal(38, 10, n).round(),
        "follow_up_days": np.where(died, rng.integers(5, 60, n), rng.integers(60, 280, n)),
        "ward": rng.choice(["A", "B"], n),
        "died": died.astype(int),
    }).to_csv(path, index=False)
    return path


def test_a_follow_up_column_is_left_out_with_one_line_each_and_keep_overrides(tmp_path: Path) -> None:
    csv = _clinical_csv(tmp_path / "ward.csv")
    out = tmp_path / "exp.json"
    r = CliRunner().invoke(app, ["config", "new", "--dataset", str(csv), "--target", "died", "--out", str(out)])
    assert r.exit_code == 0, r.output
    exp = load_experiment(out)
    assert exp.dataset.features == ["age", "ejection_fraction", "ward"]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("note: left out ")]
    assert len(lines) == 3, lines  # one line per column
    assert any(ln.startswith("note: left out follow_up_days: a follow-up") and "--keep follow_up_days" in ln
               for ln in lines)
    assert any(ln.startswith("note: left out patient_id: ") and "identifier" in ln for ln in lines)
    assert any(ln.startswith("note: left out row: an identifier") for ln in lines)
    doc = json.loads(out.read_text())
    assert "follow_up_days" in doc["basic_info"]["description"] and "logistic regression" in doc["basic_info"]["description"]
    kept = CliRunner().invoke(app, ["config", "new", "--dataset", str(csv), "--target", "died", "--keep", "follow_up_days",
                                    "--out", str(out), "--force"])
    assert kept.exit_code == 0, kept.output
    assert "follow_up_days" in load_experiment(out).dataset.features
    bad = CliRunner().invoke(app, ["config", "new", "--dataset", str(csv), "--target", "died", "--keep", "nope",
                                   "--out", str(out), "--force"])
    assert bad.exit_code == 2 and "--keep nope" in bad.stderr and "Traceback" not in bad.output


@pytest.mark.parametrize("name", ["time", "follow_up", "FollowUpMonths", "days_to_death", "survival_months",
                                  "duration", "time_to_event", "length_of_stay"])
def test_duration_names_are_leaks(name: str) -> None:
    assert duration_reason(name) is not None


@pytest.mark.parametrize("name", ["age", "ejection_fraction", "serum_sodium", "platelets", "smoking", "timer_x"])
def test_clinical_names_are_not_durations(name: str) -> None:
    assert duration_reason(name) is None


def test_identifier_edges() -> None:
    assert identifier_reason("MRN", None) and identifier_reason("patientId", None)
    assert identifier_reason("n", pd.Series([4.0, 5.0, 6.0, 7.0])) is not None  # consecutive, unique: numbers rows
    assert identifier_reason("n", pd.Series([4.0, 5.0, 6.0, 8.0])) is None  # a gap: a measurement may do that
    assert identifier_reason("n", pd.Series([4.0, 5.0, 5.0, 6.0])) is None  # a repeat: not unique per row
    assert identifier_reason("n", pd.Series([4.0, 5.5, 6.0, 7.0])) is None  # not integers
    assert identifier_reason("body_mass_index", pd.Series([21.0, 22.0, 23.0])) is not None  # numbers rows too
    assert identifier_reason("body_mass_index", None) is None  # the name alone is no identifier


def _separating(auc_target: float, n: int = 400) -> tuple[pd.Series, pd.Series]:
    """A column whose single-column AUC is ``auc_target`` (to 1/(n_pos*n_neg)): positives above
    every negative except ``q`` of them below all and one below ``r`` negatives (q*neg + r discordant pairs)."""
    pos = neg = n // 2
    y = pd.Series([True] * pos + [False] * neg)
    q, r = divmod(round((1 - auc_target) * pos * neg), neg)
    x = np.concatenate([np.arange(neg, neg + pos), np.arange(neg)]).astype(float)
    x[:q] = -1.0
    x[q] = neg - r - 0.5
    return pd.Series(x), y


def test_separation_at_its_edge() -> None:
    inside, y = _separating(SEPARATION_AUC)
    assert single_column_auc(inside, y) == pytest.approx(SEPARATION_AUC, abs=1e-4)
    assert separation_reason(inside, y) is not None
    outside, y = _separating(SEPARATION_AUC - 0.002)
    assert single_column_auc(outside, y) < SEPARATION_AUC
    assert separation_reason(outside, y) is None
    assert separation_reason(-inside, y) is not None  # a column that ranks the classes backwards leaks as much


def test_a_near_perfect_separator_is_left_out(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    n = 200
    died = rng.random(n) < 0.4
    pd.DataFrame({"age": rng.normal(60, 8, n), "discharge_code": np.where(died, 9, 1) + rng.normal(0, 0.1, n),
                  "died": died.astype(int)}).to_csv(tmp_path / "d.csv", index=False)
    r = CliRunner().invoke(app, ["config", "new", "--dataset", str(tmp_path / "d.csv"), "--target", "died",
                                 "--out", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    assert load_experiment(tmp_path / "e.json").dataset.features == ["age"]
    assert "left out discharge_code: alone it separates the target" in r.stderr


def test_the_model_is_sized_to_rows_per_site_and_budget() -> None:
    assert size_model(MLP_MIN_ROWS - 1, 8.0)[0] == "logistic"
    assert size_model(MLP_MIN_ROWS, 8.0)[0] == "mlp"
    assert size_model(MLP_MIN_ROWS, MLP_MIN_EPSILON * 0.99)[0] == "logistic"
    assert size_model(MLP_MIN_ROWS, MLP_MIN_EPSILON)[0] == "mlp"
    assert size_model(None, 8.0)[0] == "logistic"


def test_large_sites_get_the_mlp_and_the_description_says_why(tmp_path: Path) -> None:
    csv = _clinical_csv(tmp_path / "w.csv", n=60)
    out = tmp_path / "e.json"
    r = CliRunner().invoke(app, ["config", "new", "--dataset", str(csv), "--target", "died", "--out", str(out),
                                 "--rows-per-site", str(MLP_MIN_ROWS), "--epsilon", "4"])
    assert r.exit_code == 0, r.output
    exp = load_experiment(out)
    assert [la.params["out_features"] for la in exp.architecture.layers if la.type == "Linear"] == [64, 32, 1]
    assert exp.training.dp.total_epsilon == 4.0
    assert f"~{MLP_MIN_ROWS} rows per site under a whole-run ε 4" in json.loads(out.read_text())["basic_info"]["description"]


@pytest.mark.slow
def test_the_readme_demo_experiment_beats_the_majority_class(tmp_path: Path) -> None:
    """The README's demo (``config new`` on hospital-a.csv) through the simulator: over three
    seeds its union test accuracy beats the majority-class baseline on the same rows on average
    (bench/config_new_demo.py runs ten seeds with secret noise; figures in bench/README.md)."""
    from bench.config_new_demo import demo_experiment, run_once

    exp = demo_experiment(tmp_path, rounds=3)
    doc = json.loads(exp.read_text())
    assert "time" not in doc["dataset"]["features"] and len(doc["architecture"]["layers"]) == 3
    runs = [run_once(exp, seed, reproducible=True) for seed in (1, 2, 3)]
    assert statistics.mean(r["accuracy"] for r in runs) > statistics.mean(r["majority"] for r in runs), runs
