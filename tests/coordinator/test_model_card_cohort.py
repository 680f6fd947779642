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
         "mean": {"value": 54.2, "ci": [52.9, 55.6]}},
        {"name": "num", "kind": "outcome", "prevalence": {"value": 0.46, "ci": [0.41, 0.51]}}]}
    return {"cohort_id": "c-1", "created_at": 1.0, "experiment_hash": cohort.experiment_digest(load_experiment(exp)),
            "dataset": dataset, "sites": {}, "pooled": {"sites": ["a", "b"], "n": 100.0, "noise_sd": 2.0, "table": table}}


def test_the_card_prints_the_pooled_cohort_with_intervals(tmp_path: Path) -> None:
    exp = json.loads(EXAMPLE.read_text())
    cohort.save(tmp_path, _doc(exp, dataset=exp["dataset"]["name"]))
    got = model_card.load_cohort(tmp_path, {"experiment": exp})
    assert got is not None
    rows = {c["column"]: c for c in got["columns"]}
    assert rows["age"]["mean"] == "54.2 (52.9–55.6)" and rows["age"]["sites"] == "a, b"
    assert rows["num"]["prevalence"] == "0.46 (0.41–0.51)"


def test_no_cohort_released_leaves_the_section_out(tmp_path: Path) -> None:
    exp = json.loads(EXAMPLE.read_text())
    assert model_card.load_cohort(tmp_path, {"experiment": exp}) is None
    assert model_card.load_cohort(tmp_path, None) is None
    other = dict(exp, dataset=dict(exp["dataset"], name="heart_failure"))
    cohort.save(tmp_path, _doc(other, dataset="heart_failure"))  # another dataset's cohort is not this run's
    assert model_card.load_cohort(tmp_path, {"experiment": exp}) is None
