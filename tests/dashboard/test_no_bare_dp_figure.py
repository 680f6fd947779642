"""Under DP metrics no figure is shown without its interval (issue 24, Build 1: AUC "otherwise
not shown"): a union AUC or F1 that is only a mean of the sites' noisy figures is left out,
by the coordinator's summary and by the run page; without DP (exact counts) the mean stays."""

from __future__ import annotations

from coordinator.final import _pooled
from fedbus.dashboard import results


def _site(noise_sd: float, **extra: float) -> dict[str, float]:
    return {"accuracy": 0.7, "auc": 0.6, "f1": 0.5, "n": 20.0, "noise_sd": noise_sd, **extra}


def test_a_mean_of_noisy_figures_is_not_shown_and_exact_means_are() -> None:
    means = {"accuracy": 0.7, "auc": 0.6, "f1": 0.5, "loss": 0.4, "majority_class_accuracy": 0.66}
    noisy = _pooled(means, [_site(8.66), _site(8.66)])  # no cells: nothing to pool
    assert "accuracy" not in noisy and "auc" not in noisy and "f1" not in noisy, noisy
    assert noisy["loss"] == 0.4 and noisy["majority_class_accuracy"] == 0.66
    exact = _pooled(means, [{**_site(0.0)}, {**_site(0.0)}])
    assert exact["accuracy"] == 0.7 and exact["auc"] == 0.6


def test_the_run_page_drops_a_dp_figure_that_has_no_interval() -> None:
    final = {"accuracy": 0.7, "auc": 0.21, "f1": 0.51, "ci": {"accuracy": [0.5, 0.85]},
             "per_site": {"h1": {"accuracy": 0.7, "noise_sd": 8.66, "n_test": 20, "ci": {"accuracy": [0.4, 0.9]}}}}
    doc = results.final_doc(final, None)
    assert doc["n_test_noisy"] is True  # the headline's test-patient count is a sum of noisy totals
    assert doc["test"]["accuracy"] == 0.7 and doc["test"]["ci"]["accuracy"] == [0.5, 0.85]
    assert doc["test"]["auc"] is None and doc["test"]["f1"] is None  # no interval under DP: not shown
    exact = {**final, "per_site": {"h1": {**final["per_site"]["h1"], "noise_sd": 0.0}}}
    assert results.final_doc(exact, None)["test"]["auc"] == 0.21  # exact counts: the mean is a fact
    assert results.final_doc(exact, None)["n_test_noisy"] is False


def test_a_site_figure_released_under_dp_without_its_interval_is_not_shown() -> None:
    """A site's DP release can hold a figure whose interval had too few finite draws (an AUC whose
    noisy histogram leaves a class empty): the page shows "–", not a bare number (seen in CI:
    "0.969" on the README walk's run page). With exact counts the figure stays."""
    site = {"accuracy": 0.7, "auc": 0.969, "n_test": 20, "noise_sd": 8.66, "ci": {"accuracy": [0.4, 0.9]},
            "personalized": {"accuracy": 0.6, "auc": 0.57, "ci": {"accuracy": [0.3, 0.8]}}}
    block = results.site_block(site)
    assert block["n_test_noisy"] is True  # the released total of a noisy matrix: the page marks it "≈"
    assert results.site_block({**site, "noise_sd": 0.0})["n_test_noisy"] is False
    assert block["test"]["accuracy"] == 0.7 and block["test"]["auc"] is None
    assert block["personalized"]["accuracy"] == 0.6 and block["personalized"]["auc"] is None
    exact = results.site_block({**site, "noise_sd": 0.0})
    assert exact["test"]["auc"] == 0.969 and exact["personalized"]["auc"] == 0.57
