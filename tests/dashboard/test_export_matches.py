"""``runs export`` says what the dashboard says: the same labels ("validation", "test"), the
final test figures with their intervals, and the same numbers, compared cell by cell against
the run page's own document for real simulated runs (conftest: two runs, the second with a
test evaluation every round and personalised models)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from coordinator.results import export_run
from coordinator.state import StateStore
from fedbus.dashboard import views
from fedbus.dashboard.data import StateReader


def _f(v: str) -> float | None:
    return None if v in ("", "None") else float(v)


def _same(a: float | None, b: float | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12))


def test_the_export_matches_the_run_page(state: Path, run_ids: list[str], tmp_path: Path) -> None:
    for rid in run_ids:
        page = views.run_doc(StateReader(state), rid)
        store = StateStore(state)
        try:
            export_run(store, rid, tmp_path / rid)
        finally:
            store.close()
        rows = list(csv.DictReader(open(tmp_path / rid / "metrics.csv")))
        assert [int(r["round"]) for r in rows] == [r["round"] for r in page["rounds"]]
        checked = with_ci = 0
        for row, rnd in zip(rows, page["rounds"]):
            for k, v in rnd["validation"].items():
                assert _same(_f(row[f"validation (all sites) {k}"]), v), (rid, rnd["round"], k)
            for site, ps in rnd["per_site"].items():
                for split in ("validation", "test"):
                    shown = ps[split] or {}
                    for k, v in shown.items():
                        if k in ("ci", "withheld"):
                            continue
                        assert _same(_f(row[f"{site} {split} {k}"]), v), (rid, rnd["round"], site, split, k)
                        checked += v is not None
                        lo, hi = (shown.get("ci") or {}).get(k) or (None, None)  # the curve's interval, as drawn
                        assert _same(_f(row.get(f"{site} {split} {k}_ci_lo", "")), lo), (rid, rnd["round"], site, split, k)
                        assert _same(_f(row.get(f"{site} {split} {k}_ci_hi", "")), hi), (rid, rnd["round"], site, split, k)
                        with_ci += lo is not None
            if rnd["test_source"] == "sites":
                for k, v in rnd["test"].items():
                    assert _same(_f(row[f"test (all sites) {k}"]), v)
        assert checked > 0
        if any(r["test_source"] == "sites" for r in page["rounds"]):  # run B: the sites' per-round test releases
            assert with_ci > 0  # carry their intervals, on the curves and in the export
        assert not any(c.endswith(("validation loss", "validation accuracy")) and c.startswith("after") for c in rows[0])
        # The final test figures, each with its interval, as the page's sites table shows them.
        final = {(r["model"], r["site"]): r for r in csv.DictReader(open(tmp_path / rid / "final_test.csv"))}
        for site in page["sites"]:
            mine = final[("global", site["site"])]
            assert mine["split"] == "test" and int(mine["n_test"]) == site["n_test"]
            for k in ("accuracy", "auc", "f1", "sensitivity", "specificity"):
                assert _same(_f(mine[k]), site["test"][k]), (rid, site["site"], k)
                lo, hi = (site["test"]["ci"].get(k) or (None, None))
                assert _same(_f(mine[f"{k}_ci_lo"]), lo) and _same(_f(mine[f"{k}_ci_hi"]), hi), (rid, site["site"], k)
            assert mine["accuracy_ci_lo"] != ""  # every test accuracy carries its interval
            if site["personalized"]:
                p = final[("personalised", site["site"])]
                assert _same(_f(p["accuracy"]), site["personalized"]["accuracy"])
