"""A model card's cohort section comes from the cohort store (coordinator/cohort.py), pooled,
with each figure's 95 % interval; without a released cohort the section is left out."""

from __future__ import annotations

import json
from pathlib import Path

from coordinator import cohort, model_card

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart_disease.json"


def _doc(exp: dict, *, dataset: str) -> dict:
    from protocol.config import load_experiment

    table = {"n": 100.0, "noise_sd": 2.0, "columns": [
        {"name": "age", "kind": "numeric", "n": {"value": 100.0, "ci": [96.0, 104.0]},
         "mean": {"value": 54.2, "ci": [52.9, 55.6]}, "sd": {"value": 9.1, "ci": [8.0, 10.2]},
         "missing_share": {"value": 0.0, "ci": [0.0, 0.031]}},
        {"name": "num", "kind": "outcome", "prevalence": {"value": 0.46, "ci": [0.41, 0.51]},
         "missing_share": {"value": 0.01, "ci": [0.0, 0.05]}}]}
    spec = [{"name": "age", "kind": "numeric", "bounds": [0.0, 120.0], "categories": [], "task": None},
            {"name": "num", "kind": "outcome", "bounds": None, "categories": [], "task": "binary"}]
    return {"cohort_id": "c-1", "created_at": 1.0, "experiment_hash": cohort.experiment_digest(load_experiment(exp)),
            "dataset": dataset, "columns": spec, "sites": {},
            "pooled": {"sites": ["a", "b"], "n": 100.0, "noise_sd": 2.0, "table": table}}


def test_the_card_prints_the_pooled_cohort_with_intervals(tmp_path: Path) -> None:
    """The card's rows are the Cohort page's (``cohort.rows_of``): a share as a percentage, each with its interval."""
    exp = json.loads(EXAMPLE.read_text())
    cohort.save(tmp_path, _doc(exp, dataset=exp["dataset"]["name"]))
    got = model_card.load_cohort(tmp_path, {"experiment": exp})
    assert got is not None and got["sites"] == ["a", "b"] and got["cohort_id"] == "c-1"
    rows = dict(got["rows"])
    assert rows["n (announced rows)"] == "100"
    assert rows["age: mean (SD)"] == "54.2 (52.9–55.6)  SD 9.1 (8.0–10.2)"
    assert rows["age: missing"] == "0.0 % (0.0–3.1)"
    assert rows["num: prevalence"] == "46.0 % (41.0–51.0)" and rows["num: missing"] == "1.0 % (0.0–5.0)"
    md = model_card.markdown(_record(), run={"experiment": exp}, verified=True, cohort=got, trail=[])
    assert "| num: prevalence | 46.0 % (41.0–51.0) |" in md and "Pooled over a, b" in md


def _record() -> dict:
    return {"name": "m", "version": 1, "run_id": "r", "round": 2, "dataset": "heart_disease", "checkpoint_sha256": "0" * 64,
            "experiment_sha256": "1" * 64, "approved_by": "ada", "approved_at_utc": "2026-12-07T00:00:00Z",
            "coordinator_kid": "k", "sites": [], "metrics": {"overall": {}, "per_site": {}},
            "privacy": {"epsilon": {}, "secure_aggregation": False}}


def test_no_cohort_released_leaves_the_section_out(tmp_path: Path) -> None:
    exp = json.loads(EXAMPLE.read_text())
    assert model_card.load_cohort(tmp_path, {"experiment": exp}) is None
    assert model_card.load_cohort(tmp_path, None) is None
    other = dict(exp, dataset=dict(exp["dataset"], name="heart_failure"))
    cohort.save(tmp_path, _doc(other, dataset="heart_failure"))  # another dataset's cohort is not this run's
    assert model_card.load_cohort(tmp_path, {"experiment": exp}) is None
