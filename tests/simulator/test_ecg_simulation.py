"""The ECG example (1-D CNN, DP-SGD) learns normal vs PVC on the synthetic beats."""

from pathlib import Path

import pytest

from simulator.run import simulate

ECG = Path(__file__).resolve().parents[2] / "examples" / "ecg_cnn.json"


@pytest.mark.slow
def test_ecg_cnn_reaches_a_clearly_better_than_chance_f1():
    doc = simulate(ECG, sites=3, rounds=4, rows=2400, progress=False)
    final = doc["final"]
    # Chance F1 for a 30% positive class is at most ~0.46 (always "PVC"); a majority-class model scores 0.
    assert final["f1"] > 0.8, final
    assert final["auc"] > 0.95
    assert all(0 < eps < 20 for eps in doc["epsilon"].values())  # DP on: a finite, reported budget
