"""Figures from one released confusion matrix (protocol/dp_figures.py): over many noise draws
they always read one non-negative matrix adding up to the released n, and the 95 % intervals
cover the true value in about 95 % of simulated releases (measured here, printed with -s)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from protocol import dp_figures
from protocol.dp_figures import TOO_FEW, block, confusion_figures, project, project_binary, show, shown, union


def _from_cells(c: np.ndarray) -> dict[str, float]:
    tn, fp, fn, tp = c
    n = c.sum()
    out = {"accuracy": (tn + tp) / n, "prevalence": (tp + fn) / n, "predicted_positive_share": (tp + fp) / n,
           "f1": 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 0.0}
    if tp + fn:
        out["sensitivity"] = tp / (tp + fn)
    if tn + fp:
        out["specificity"] = tn / (tn + fp)
    return out


def test_projection_lands_on_non_negative_cells_adding_up_to_the_total():
    rng = np.random.default_rng(7)
    v = rng.normal(5, 20, size=(5000, 4))
    total = rng.integers(0, 80, size=5000).astype(float)
    c = project(v, total)
    assert (c >= 0).all() and np.allclose(c.sum(-1), total)
    inside = np.array([[3.0, 4.0, 0.0, 1.0]])  # already on the set: unchanged
    assert np.allclose(project(inside, 8.0), inside)
    # the least-squares point: no other point of the set is closer (random feasible points)
    for row, t in zip(v[:200], total[:200]):
        best = np.linalg.norm(project(row, t) - row)
        other = rng.dirichlet(np.ones(4), size=200) * t
        assert (np.linalg.norm(other - row, axis=1) >= best - 1e-9).all()


def test_every_release_reads_one_consistent_matrix_over_many_noise_draws():
    """The property: whatever the draw, the figures are those of one non-negative matrix adding
    up to the released n; impossible combinations (accuracy 1 with specificity < 1, the
    one-class flag beside two predicted classes) never appear; each interval holds its figure."""
    rng = np.random.default_rng(11)
    for _ in range(800):
        n = int(rng.integers(1, 60))
        truth = rng.multinomial(n, rng.dirichlet(np.ones(4)))
        sd = float(rng.choice([0.0, 0.5, 2.0, 8.66]))
        v = truth + rng.normal(0, sd, 4)
        rows = int(rng.integers(n, 2 * n + 1))
        m = confusion_figures(v, sd, rows=rows, draws=100)
        assert 1 <= m["n"] <= rows
        c = project_binary(v, m["n"], sd)
        assert (c >= 0).all() and c.sum() == pytest.approx(m["n"])
        for k, want in _from_cells(c).items():
            assert m[k] == pytest.approx(want, abs=1e-12), k
            assert m[k + "_lo"] - 1e-12 <= m[k] <= m[k + "_hi"] + 1e-12 and 0 <= m[k + "_lo"] <= m[k + "_hi"] <= 1
        if m["accuracy"] == 1.0:
            assert m.get("sensitivity", 1.0) == 1.0 and m.get("specificity", 1.0) == 1.0
        if m.get("predicts_one_class") == 1.0:
            assert m["predicted_positive_share"] in (0.0, 1.0)
        elif m.get("predicts_one_class") == 0.0:
            assert 0.0 < m["predicted_positive_share"] < 1.0
        if sd == 0.0:  # exact counts stay exact
            assert np.allclose(c, truth) and m["n"] == n


SCENARIOS = [  # population [tn, fp, fn, tp] shares, test rows, noise SD per cell (σ·√3)
    ((0.45, 0.10, 0.15, 0.30), 40, 5.0 * math.sqrt(3)),  # the default policy on a small split
    ((0.60, 0.05, 0.10, 0.25), 200, 2.0 * math.sqrt(3)),
    ((0.30, 0.20, 0.10, 0.40), 30, 0.0),  # exact metrics: the test split's size alone
]


@pytest.mark.parametrize("pi, n, sd", SCENARIOS)
def test_intervals_cover_the_true_value_in_about_95_percent_of_releases(pi, n, sd, capsys):
    rng = np.random.default_rng(2024)
    p = np.array(pi)
    truth = {"accuracy": p[0] + p[3], "sensitivity": p[3] / (p[2] + p[3]), "specificity": p[0] / (p[0] + p[1]),
             "f1": 2 * p[3] / (2 * p[3] + p[1] + p[2])}
    hits = {k: 0 for k in truth}
    test_hits = 0
    releases = 400
    for _ in range(releases):
        cells = rng.multinomial(n, p)
        m = confusion_figures(cells + rng.normal(0, sd, 4), sd, rows=n, draws=1000)
        for k, t in truth.items():
            hits[k] += m[k + "_lo"] <= t <= m[k + "_hi"]
        test_hits += m["accuracy_lo"] <= (cells[0] + cells[3]) / n <= m["accuracy_hi"]  # the split's own accuracy
    coverage = {k: h / releases for k, h in hits.items()}
    with capsys.disabled():
        print(f"\ncoverage n={n} sd={sd:.2f}: " + ", ".join(f"{k} {v:.3f}" for k, v in coverage.items())
              + f", test-split accuracy {test_hits / releases:.3f}")
    for k, c in coverage.items():
        assert 0.91 <= c <= 0.995, (k, c)
    assert test_hits / releases >= 0.93


def test_a_figure_whose_interval_spans_the_range_is_withheld_at_the_edge():
    just_inside = {"accuracy": 0.5, "accuracy_lo": 0.0, "accuracy_hi": 0.8999}
    just_outside = {"accuracy": 0.5, "accuracy_lo": 0.0, "accuracy_hi": 0.9}  # 90 % of [0, 1]
    b = block(just_inside)
    assert b["accuracy"] == 0.5 and b["ci"]["accuracy"] == [0.0, 0.8999] and "withheld" not in b
    b = block(just_outside)
    assert b["accuracy"] is None and b["withheld"] == {"accuracy": TOO_FEW}
    assert shown(b, "accuracy", percent=True) == TOO_FEW
    # the default policy (σ = 5) on a 12-row split: nothing but "too few test rows"
    m = confusion_figures(np.array([5.0, 1.0, 2.0, 4.0]), 5.0 * math.sqrt(3), rows=12)
    assert block(m)["withheld"]["accuracy"] == TOO_FEW


def test_figures_are_shown_with_their_interval():
    assert show(0.7273, [0.51, 0.89], percent=True) == "72.7 % (51–89)"
    assert show(0.7391, [0.612, 0.851]) == "0.74 (0.61–0.85)"
    assert show(None) == "–" and show(0.5) == "0.50"


def test_the_union_sums_the_sites_cells_and_noise_variances():
    a = {"cm_tn": 10.0, "cm_fp": 2.0, "cm_fn": 3.0, "cm_tp": 5.0, "noise_sd": 3.0, "n": 20.0}
    b = {"cm_tn": 20.0, "cm_fp": 1.0, "cm_fn": 4.0, "cm_tp": 15.0, "noise_sd": 4.0, "n": 40.0}
    u = union([a, b])
    want = confusion_figures(np.array([30.0, 3.0, 7.0, 20.0]), 5.0, rows=60)
    assert u == want and u["accuracy"] == pytest.approx(50 / 60)
    assert union([a, {k: v for k, v in b.items() if k != "cm_tp"}]) is None  # a site without cells: no pooled matrix


def test_auc_comes_only_from_the_histogram_with_its_interval():
    neg = np.array([8, 6, 4, 2, 1, 1, 0, 0, 0, 0], dtype=float)
    pos = np.array([0, 0, 1, 1, 2, 3, 4, 5, 6, 8], dtype=float)
    m = dp_figures.auc_figure(np.concatenate([neg, pos]), 0.0, n=float(neg.sum() + pos.sum()))
    assert 0.9 < m["auc"] < 1.0 and m["auc_lo"] <= m["auc"] <= m["auc_hi"]
    assert dp_figures.auc_figure(np.concatenate([neg, np.zeros(10)]), 0.0, n=float(neg.sum())) == {}  # one class


def test_auc_and_its_interval_stay_in_0_1_on_separated_fractional_histograms() -> None:
    """A projected noisy histogram holds fractional counts; perfectly separated ones summed in float
    landed one ulp past 1 (a run page read AUC 1.0000000000000002). Over many such histograms the
    point and both ends stay inside [0, 1], and a perfect separation reads 1."""
    rng = np.random.default_rng(7)
    for _ in range(300):
        k = int(rng.integers(1, 9))
        neg, pos = np.zeros(10), np.zeros(10)
        neg[:k] = rng.random(k) * rng.integers(1, 50)
        pos[k:] = rng.random(10 - k) * rng.integers(1, 50)
        m = dp_figures.auc_figure(np.concatenate([neg, pos]), 0.0, n=float(neg.sum() + pos.sum()))
        assert m["auc"] == pytest.approx(1.0, abs=1e-12) and 0.0 <= m["auc_lo"] <= m["auc"] <= m["auc_hi"] <= 1.0, m
