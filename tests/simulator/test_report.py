"""Report files: CSV/JSON, PNG plots and one self-contained report.html."""

import base64
import csv
import json
import re

from simulator.report import write_report
from simulator.table import print_results


def _doc(n_sites: int = 3, rounds: int = 4) -> dict:
    sites = [f"site-{i + 1}" for i in range(n_sites)]
    return {
        "run_id": "r1", "aggregator": "FedAvg", "experiment": "demo", "sites": sites,
        "rounds": [
            {"round": r, "loss": 1.0 / r, "accuracy": 0.5 + 0.05 * r, "auc": 0.6 + 0.05 * r, "replies": n_sites,
             "wall_s": 1.5, "t_s": 1.5 * r, "holdout": {"accuracy": 0.5 + 0.04 * r, "auc": 0.6 + 0.04 * r, "loss": 0.9 / r},
             "per_site": {s: {"loss": 1.0 / r + i * 0.01, "accuracy": 0.5 + 0.05 * r, "auc": 0.7} for i, s in enumerate(sites)}}
            for r in range(1, rounds + 1)
        ],
        "final": {"loss": 0.3, "accuracy": 0.81, "auc": 0.88, "f1": 0.8,
                  "per_site": {s: {"accuracy": 0.8, "auc": 0.9, "f1": 0.79, "loss": 0.3, "n_test": 20} for s in sites},
                  "split": "test"},
        "holdout": {"loss": 0.35, "accuracy": 0.78, "auc": 0.85, "f1": 0.7,
                    "per_site": {s: {"accuracy": 0.77, "auc": 0.84, "n_test": 25} for s in sites}},
        "epsilon": {s: 1.0 + i for i, s in enumerate(sites)},
        "timing": {"wall_s": 10.0, "train_s": 6.0, "communication_s": 3.0, "aggregation_s": 1.0},
        "baselines": {"pooled": {"accuracy": 0.79, "auc": 0.86, "f1": 0.77, "loss": 0.4},
                      "local": {**{s: {"accuracy": 0.7, "auc": 0.75} for s in sites},
                                "_union": {"accuracy": 0.7, "auc": 0.75, "f1": 0.6, "loss": 0.6}}},
        "rejected": [{"message_id": "m1", "site": "site-2", "reason": "bad_signature: tampered"}],
    }


def test_report_files_are_written_and_consistent(tmp_path):
    doc = _doc()
    written = write_report(doc, tmp_path, experiment={"basic_info": {"name": "demo"}})
    for name in ("result.json", "experiment.json", "rounds.csv", "sites.csv", "site_rounds.csv", "loss.png",
                 "accuracy_auc.png", "epsilon.png", "baselines.png", "report.html"):
        assert name in written and (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "result.json").read_text())["run_id"] == "r1"
    rows = list(csv.DictReader((tmp_path / "rounds.csv").open()))
    assert [int(r["round"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[3]["holdout_accuracy"]) == 0.66 and "test_accuracy" not in rows[3]
    sites = list(csv.DictReader((tmp_path / "sites.csv").open()))
    assert [s["site"] for s in sites] == ["site-1", "site-2", "site-3"]
    assert [float(s["epsilon"]) for s in sites] == [1.0, 2.0, 3.0]
    assert len(list(csv.DictReader((tmp_path / "site_rounds.csv").open()))) == 12


def test_html_is_self_contained_with_every_plot_and_table(tmp_path):
    write_report(_doc(), tmp_path)
    page = (tmp_path / "report.html").read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 4
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert "src='http" not in page and "<script" not in page  # nothing fetched from anywhere
    for text in ("pooled baseline", "local only", "bad_signature: tampered", "site-3", "Rounds", "Time"):
        assert text in page, text


def test_many_sites_stay_readable(tmp_path):
    write_report(_doc(n_sites=300, rounds=2), tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert "100 more sites in sites.csv" in page  # the table shows 200, the CSV has all
    assert len(list(csv.DictReader((tmp_path / "sites.csv").open()))) == 300


def test_results_table_prints_rounds_sites_baselines_and_time():
    from rich.console import Console

    con = Console(record=True, width=140)
    print_results(_doc(), console=con)
    text = con.export_text()
    for word in ("FedAvg", "site-2", "pooled (centralized)", "local only", "aggregation", "1 message(s) rejected"):
        assert word in text, word


def test_a_dp_estimate_of_a_one_class_model_reaches_the_report_and_the_tables(tmp_path):
    """Real releases under metrics = "dp": the site whose model always predicts 0 gets the
    warning, labelled a DP estimate, in the HTML report and the CLI table; the
    site with a sensible model gets none."""
    import io

    from rich.console import Console

    from coordinator.final import summarise
    from protocol import dp_figures
    from protocol.messages import TaskConfig
    from site_worker.config import SitePolicy
    from site_worker.final_model import release_on_test
    from tests.site_worker.test_final_release import FixedNoise, _data, _tiny_classifiers

    x, y = _data(200)
    always_zero, sensible = _tiny_classifiers()
    policy = SitePolicy(metrics="dp", metrics_noise_multiplier=0.5)
    results = {site: release_on_test([model], x, y, y, loss_name="bce_with_logits", task="binary", policy=policy,
                                     rng=FixedNoise(0.5))[0]
               for site, model in (("site-1", always_zero), ("site-2", sensible))}
    doc = _doc(n_sites=2)
    doc["final"] = summarise(None, results, config=TaskConfig(), aggregator="FedAvg")  # type: ignore[arg-type]
    assert doc["final"]["per_site"]["site-1"]["one_class_estimate"] == "dp"
    # every figure beside its 95 % interval, in the JSON, the report and the CLI table
    s1 = doc["final"]["per_site"]["site-1"]
    assert s1["ci"]["accuracy"][0] <= s1["accuracy"] <= s1["ci"]["accuracy"][1]
    assert doc["final"]["ci"]["accuracy"][0] <= doc["final"]["accuracy"] <= doc["final"]["ci"]["accuracy"][1]
    shown_acc = dp_figures.shown(s1, "accuracy", percent=True)
    assert re.fullmatch(r"\d+\.\d % \(\d+–\d+\)", shown_acc)
    warned = "site-1: the global model appears to predict one class (DP estimate"
    write_report(doc, tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert warned in page and "site-2: the global model" not in page
    buf = io.StringIO()
    print_results(doc, console=Console(file=buf, width=200))
    out = buf.getvalue()
    assert warned in out and "site-2: the global model" not in out
    assert shown_acc in page and shown_acc in out
    assert "predicts one class only" not in page + out  # the exact wording is for exact metrics only
