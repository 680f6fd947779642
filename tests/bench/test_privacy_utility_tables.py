"""bench/privacy_utility.py's per-hospital table: personalised − local paired by seed, on
hand-made runs (no training here; the bench itself trains)."""

from __future__ import annotations

import math

from bench.privacy_utility import per_hospital


def _run(seed: int, pers: tuple[float, float], local: tuple[float, float]) -> dict:
    site = {"cleveland": None}
    result = {
        "model": {"per_site": {s: {"accuracy": pers[0], "auc": pers[1]} for s in site}},
        "local": {"per_site": {s: {"accuracy": local[0], "auc": local[1]} for s in site}},
        "global_per_site": {s: {"accuracy": 0.5, "auc": 0.5} for s in site},
    }
    return {"method": "FedPer+fine-tune", "eps": math.inf, "seed": seed, "result": result}


def test_a_fedper_only_run_gets_the_paired_difference_with_its_standard_error():
    # differences by seed: accuracy +0.02, 0.00, -0.01 -> mean +0.0033, sd 0.01528, s.e. 0.00882;
    # AUC +0.03, +0.01, +0.02 -> mean +0.0200, sd 0.01, s.e. 0.00577
    runs = [_run(1, (0.82, 0.90), (0.80, 0.87)), _run(2, (0.80, 0.88), (0.80, 0.87)),
            _run(3, (0.79, 0.91), (0.80, 0.89))]
    table = per_hospital(runs)
    row = next(line for line in table.splitlines() if line.startswith("| cleveland"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == "-"  # no FedAvg series on these seeds: no local logistic model
    assert cells[9] == "2/3"  # seeds 1 and 2 (a tie counts: ≥) are at or above the local MLP on both
    assert cells[10] == "+0.0033 ± 0.0088 / +0.0200 ± 0.0058"


def test_no_fedper_run_no_table():
    run = _run(1, (0.8, 0.9), (0.8, 0.9))
    run["method"] = "FedAvg"
    assert per_hospital([run]) == ""
