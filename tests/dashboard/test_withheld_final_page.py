"""A DP run whose final test accuracy is withheld ("too few test rows for this budget") shows no
bare figure anywhere, in Debian's chromium: the run page's headline falls back neither to an
earlier round nor to validation figures (the README walk once showed a bare "Validation AUC
0.400"), and the runs list and the compare page show each figure with its interval or withheld."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
from pathlib import Path

from tests.dashboard.chromium import served_page
from protocol.dp_figures import TOO_FEW

INTERVAL = re.compile(r"\(\d+(\.\d+)?–\d+(\.\d+)?\)")


def _withheld_copy(state: Path, dest: Path, run_id: str) -> None:
    """The conftest state with one run's stored result rewritten as a DP release whose final
    accuracy is withheld and whose AUC and F1 carry intervals."""
    shutil.copytree(state, dest)
    db = sqlite3.connect(dest / "coordinator.db")
    try:
        doc = json.loads(db.execute("SELECT result_json FROM runs WHERE run_id=?", (run_id,)).fetchone()[0])
        final = doc["final"]
        final.update(accuracy=None, auc=0.61, f1=0.44, ci={"accuracy": [0.03, 0.99], "auc": [0.40, 0.80],
                                                          "f1": [0.20, 0.66]}, withheld={"accuracy": TOO_FEW})
        for site in final["per_site"].values():
            site["noise_sd"] = 8.66
        db.execute("UPDATE runs SET result_json=? WHERE run_id=?", (json.dumps(doc), run_id))
        db.commit()
    finally:
        db.close()


def _bare(texts: list[str]) -> list[str]:
    return [t for t in texts if not (INTERVAL.search(t) or TOO_FEW in t or "ε" in t or t.strip() in ("", "–"))]


def test_a_withheld_final_accuracy_leaves_no_bare_figure(browser, state: Path, run_ids: list[str], tmp_path: Path) -> None:
    run = run_ids[0]
    copy = tmp_path / "state"
    _withheld_copy(state, copy, run)
    with served_page(browser, copy) as (server, page, errors):
        page.goto(f"{server.base}/runs/{run}")
        page.locator("#kpis").wait_for(timeout=60_000)
        labels = page.locator("#kpis .kpi .label").all_inner_texts()
        assert not any(label.startswith("Validation") for label in labels), labels
        values = page.locator("#kpis .kpi:not([data-kpi=epsilon]) .value").all_inner_texts()
        assert TOO_FEW in values[0] and "0.61 (0.40–0.80)" in values[1] and "0.44 (0.20–0.66)" in values[2], values
        assert not _bare(values), values
        page.goto(f"{server.base}/runs")
        row = page.locator(f'tr[data-run="{run}"]')
        row.wait_for(timeout=60_000)
        cells = row.locator("td.num").all_inner_texts()
        assert TOO_FEW in " ".join(cells) and "0.61 (0.40–0.80)" in cells, cells
        page.goto(f"{server.base}/compare?runs={run},{run_ids[1]}")
        page.locator("#compare-final tbody tr").first.wait_for(timeout=60_000)
        first = page.locator("#compare-final tbody tr").first.locator("td.num").all_inner_texts()
        assert TOO_FEW in first[0] and first[2] == "0.61 (0.40–0.80)", first
        assert not errors, errors
