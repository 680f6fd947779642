"""A DP figure without its interval is withheld where the result is made (coordinator/final.py via
``protocol.dp_figures.block``), so no table, page, report or export can show it bare: the
dashboard's own check (tests/dashboard/test_no_bare_dp_figure.py) is only the last line."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from coordinator.final import summarise
from protocol.config import load_experiment
from protocol.dp_figures import TOO_FEW, block
from protocol.messages import TaskConfig
from simulator.table import print_results


def _site(noise_sd: float) -> dict[str, float]:
    """One site's flat release: accuracy with its interval, an AUC whose interval could not be
    computed (too few finite draws), and the same for the personalised model."""
    return {"accuracy": 0.7, "accuracy_lo": 0.4, "accuracy_hi": 0.9, "auc": 0.969, "f1": 0.5,
            "f1_lo": 0.2, "f1_hi": 0.8, "n": 20.0, "noise_sd": noise_sd, "loss": 0.5,
            "personalized_accuracy": 0.6, "personalized_accuracy_lo": 0.3, "personalized_accuracy_hi": 0.8,
            "personalized_auc": 0.57, "personalized_n": 20.0, "personalized_noise_sd": noise_sd}


def test_block_withholds_a_noisy_figure_without_an_interval_and_keeps_an_exact_one() -> None:
    noisy = block({"auc": 0.969, "accuracy": 0.7, "accuracy_lo": 0.4, "accuracy_hi": 0.9, "noise_sd": 1e-9})
    assert noisy["auc"] is None and noisy["withheld"]["auc"] == TOO_FEW
    assert noisy["accuracy"] == 0.7 and "accuracy" not in noisy["withheld"]
    exact = block({"auc": 0.969, "noise_sd": 0.0})  # exact counts: the figure is a fact
    assert exact["auc"] == 0.969 and "withheld" not in exact
    assert block({"auc": 0.969})["auc"] == 0.969  # no release noise recorded: not a DP figure


def _final(noise_sd: float) -> dict:
    experiment = load_experiment(Path(__file__).parents[2] / "examples" / "heart_failure.json")
    return summarise(experiment, {"h1": _site(noise_sd), "h2": _site(noise_sd)}, config=TaskConfig(),
                     aggregator="FedAvg")


def test_the_summary_and_the_cli_table_never_show_a_bare_dp_figure() -> None:
    final = _final(8.66)
    for s in ("h1", "h2"):
        site = final["per_site"][s]
        assert site["auc"] is None and site["withheld"]["auc"] == TOO_FEW, site
        assert site["accuracy"] == 0.7 and site["ci"]["accuracy"] == [0.4, 0.9]
        assert site["personalized"]["auc"] is None, site["personalized"]
        assert site["personalized"]["accuracy"] == 0.6
    assert final["personalized"]["mean_auc"] is None and final["personalized"]["mean_accuracy"] is None
    out = io.StringIO()
    print_results({"aggregator": "FedAvg", "sites": ["h1", "h2"], "run_id": "r", "rounds": [], "final": final},
                  console=Console(file=out, width=250))
    text = out.getvalue()
    assert "0.969" not in text and "0.57" not in text, text
    assert "70.0 % (40–90)" in text, text


def test_exact_counts_keep_every_figure() -> None:
    final = _final(0.0)
    assert final["per_site"]["h1"]["auc"] == 0.969 and final["per_site"]["h1"]["personalized"]["auc"] == 0.57
    assert final["personalized"]["mean_auc"] == 0.57


def _table(width: int, *, terminal: bool) -> str:
    out = io.StringIO()
    con = Console(file=out, width=width, force_terminal=terminal, color_system=None)
    print_results({"aggregator": "FedAvg", "sites": ["h1", "h2"], "run_id": "r", "rounds": [], "final": _final(8.66)},
                  console=con)
    return out.getvalue()


def test_no_interval_is_cut_short_in_a_log_or_on_a_narrow_terminal() -> None:
    """The per-site and union tables show every interval whole: in a log (no width) on one line,
    on an 80-column terminal folded, never "(0.40–…"."""
    log = _table(80, terminal=False)
    assert "(0.20–0.80)" in log and "…" not in log, log
    narrow = _table(80, terminal=True)
    assert "…" not in narrow, narrow
