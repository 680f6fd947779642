"""Issue 24's three-run check: the same experiment run three times with a secret noise draw, each
site releasing its test figures under DP metrics as a hospital's kit does (``metrics = "dp"``,
σ_m = 5); is every site's *true* test accuracy inside the 95 % interval the run printed?

The experiment is the README demo's (``fedbus config new --secure-aggregation 3`` on
hospital-a.csv, 3 rounds; the heart-failure records over 3 simulated sites whose kits hold
``test_fraction`` 0.4, as the demo's project sets; the union's figures from the secure sum). After each run the bench rebuilds each site's
fixed test split exactly as the site does (its own split secret from its state directory, its
own training-row statistics: ``site_worker.data.prepare``), scores the final global model on it
with exact counts, and compares that accuracy, and the union's (all test rows pooled), with the
released interval. The noise is the sites' secret draw (no ``--reproducible-dp``), so every run
differs.

    python bench/dp_interval_check.py [--runs 3] [--json]   # figures: bench/README.md
    python bench/dp_interval_check.py --smoke                # 1 run, 1 round
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _final_weights(state: Path, run_id: str) -> Any:
    """The last committed round's checkpoint: the model the sites scored at the end."""
    from coordinator.checkpoints import load_tensors
    from coordinator.state import StateStore

    store = StateStore(state)
    try:
        last = store.last_round(run_id)
    finally:
        store.close()
    assert last is not None, f"run {run_id} committed no round"
    path = Path(last.get("checkpoint") or last["checkpoint_path"])
    return load_tensors(path if path.is_absolute() else state / path, sha256=last.get("checkpoint_sha256"))


def true_test_accuracy(doc: dict[str, Any], exp_path: Path) -> dict[str, tuple[int, int]]:
    """Per site: (correct, rows) of the final global model on the site's own fixed test split."""
    import torch

    from protocol.config import load_experiment
    from simulator.scoring import input_shape, model_with
    from site_worker.config import load_site_config
    from site_worker.data import prepare
    from site_worker.splits import SplitKey

    exp = load_experiment(json.loads(Path(exp_path).read_text()))
    model = model_with(exp, _final_weights(Path(doc["coordinator_state"]), doc["run_id"]))
    model.eval()
    out = {}
    for site_toml in sorted(Path(doc["work_dir"]).glob("sites/*/site.toml")):
        cfg = load_site_config(site_toml)
        key = SplitKey.load_or_create(cfg.state_dir, test_fraction=cfg.policy.test_fraction)
        data = prepare(cfg.datasets[exp.dataset.name], exp.dataset, input_shape=input_shape(exp), key=key)
        with torch.inference_mode():
            pred = (torch.sigmoid(model(data.x_test)) >= 0.5).float()
        out[cfg.site_id] = (int((pred == data.y_test).sum()), int(len(data.y_test)))
    return out


def one_run(exp_path: Path, work: Path, *, rounds: int, seed: int) -> dict[str, Any]:
    from bench.config_new_demo import DEMO_SITES, DEMO_TEST_FRACTION
    from simulator.run import simulate

    doc = simulate(exp_path, sites=DEMO_SITES, dataset="heart_failure", rounds=rounds, seed=seed, progress=False,
                   site_metrics="dp", site_test_fraction=DEMO_TEST_FRACTION, out=work)
    truth = true_test_accuracy(doc, exp_path)
    final = doc["final"]
    rows = []
    for site, (correct, n) in sorted(truth.items()):
        m = final["per_site"][site]
        lo, hi = m["ci"]["accuracy"]
        rows.append({"site": site, "true_accuracy": correct / n, "true_n": n, "released_n": m.get("n_test"),
                     "printed": m.get("accuracy"), "ci": [lo, hi], "withheld": "accuracy" in (m.get("withheld") or {}),
                     "inside": lo <= correct / n <= hi})
    c, n = sum(t[0] for t in truth.values()), sum(t[1] for t in truth.values())
    lo, hi = final["ci"]["accuracy"]
    rows.append({"site": "union", "true_accuracy": c / n, "true_n": n, "released_n": final.get("n_test"),
                 "printed": final.get("accuracy"), "ci": [lo, hi], "withheld": "accuracy" in (final.get("withheld") or {}),
                 "inside": lo <= c / n <= hi})
    return {"run_id": doc["run_id"], "seed": seed, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="1 run, 1 round")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="the README demo's --rounds")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    runs, rounds = (1, 1) if a.smoke else (a.runs, a.rounds)
    from bench.config_new_demo import demo_experiment

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        exp = demo_experiment(Path(tmp), rounds=rounds)
        for i in range(runs):  # the same experiment and seed: only the sites' secret noise differs
            r = one_run(exp, Path(tmp) / f"run{i}", rounds=rounds, seed=1)
            out.append(r)
            if not a.json:
                for row in r["rows"]:
                    shown = "too few test rows" if row["withheld"] else f"{100 * row['printed']:.1f} %"
                    print(f"run {i + 1} {row['site']:>8}: true {100 * row['true_accuracy']:5.1f} % of {row['true_n']:3d}"
                          f" rows | printed {shown} ({100 * row['ci'][0]:.0f}–{100 * row['ci'][1]:.0f}),"
                          f" n {row['released_n']} | {'inside' if row['inside'] else 'OUTSIDE'}", flush=True)
    total = [row for r in out for row in r["rows"]]
    inside = sum(row["inside"] for row in total)
    if a.json:
        print(json.dumps({"runs": out, "inside": inside, "checked": len(total)}, indent=2))
    else:
        print(f"{inside}/{len(total)} true test accuracies inside their printed 95 % interval")
    return 0 if inside == len(total) or a.smoke else 1


if __name__ == "__main__":
    sys.exit(main())
