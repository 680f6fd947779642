"""Sync vs async aggregation with one slow site: wall time to a test accuracy.

heart_disease, one site per hospital (``natural:dataset``); Switzerland is a straggler
(every training task starts ``--delay`` seconds late). FedAvg waits for it every round;
FedAsync merges each update on arrival (alpha 0.6, polynomial staleness a=0.5) and
FedBuff steps every K=2 updates, so the fast hospitals never wait. Every committed
global model (round or version) is scored on the union of the four held-out
splits, and we report the wall time at which each first reaches ``--target`` accuracy.

    .venv/bin/python bench/simulator_async.py --delay 3 --target 0.80 --out /tmp/async_bench
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "heart_disease.json"

CONFIGS = {
    "FedAvg": ({}, 10),
    "FedAsync": ({"alpha": 0.6, "staleness": "polynomial", "staleness_a": 0.5, "max_staleness": 20}, 40),
    "FedBuff": ({"buffer_size": 2, "staleness": "polynomial", "staleness_a": 0.5, "max_staleness": 20}, 20),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--delay", type=float, default=3.0, help="straggler delay (s) of the slow site")
    ap.add_argument("--target", type=float, default=0.80, help="test accuracy to reach")
    ap.add_argument("--out", type=Path, default=None, help="write curves.png and results.json here")
    ap.add_argument("--aggregators", default="FedAvg,FedAsync,FedBuff")
    ap.add_argument("--smoke", action="store_true", help="FedAvg and FedBuff, 2 rounds each, no delay: checks the "
                                                         "bench runs (seconds)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.delay, args.aggregators = 0.0, "FedAvg,FedBuff"
    from protocol.logs import configure_logging
    from simulator.history import time_to
    from simulator.run import simulate

    configure_logging(mode="cli", level="warning")
    results = {}
    for name in args.aggregators.split(","):
        params, rounds = CONFIGS[name]
        rounds = 2 if args.smoke else rounds
        raw = json.loads(EXAMPLE.read_text())
        raw["federated"]["name"] = name
        raw["federated"]["parameters"].update(params)
        doc = simulate(raw, partition="natural:dataset", rounds=rounds, faults=f"straggler:switzerland:{args.delay}" if args.delay else None,
                       progress=False)
        curve = [(r.get("t_s"), r["round"], (r.get("holdout") or {}).get("accuracy"), (r.get("holdout") or {}).get("auc"))
                 for r in doc["rounds"]]
        results[name] = {
            "rounds_or_versions": len(doc["rounds"]),
            "wall_s": round(doc["timing"]["wall_s"], 2),
            "time_to_target_s": time_to(doc, "accuracy", args.target),
            "final_test_accuracy": round(doc["holdout"]["accuracy"], 4),
            "final_test_auc": round(doc["holdout"]["auc"], 4),
            "best_test_accuracy": round(max(c[2] for c in curve if c[2] is not None), 4),
            "curve": curve,
        }
        r = results[name]
        print(f"{name:9s} steps={r['rounds_or_versions']:3d} wall={r['wall_s']:7.2f}s "
              f"time_to_acc>={args.target}: {r['time_to_target_s']}  final acc={r['final_test_accuracy']} "
              f"auc={r['final_test_auc']} best acc={r['best_test_accuracy']}", flush=True)
    base = results.get("FedAvg", {}).get("time_to_target_s")
    for name, r in results.items():
        if base and r["time_to_target_s"]:
            print(f"{name}: {base / r['time_to_target_s']:.2f}x faster than FedAvg to accuracy {args.target}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name, r in results.items():
            pts = [(t, a) for t, _, a, _ in r["curve"] if t is not None and a is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=3, label=name)
        ax.axhline(args.target, color="grey", ls=":", label=f"target {args.target}")
        ax.set(xlabel="wall time (s)", ylabel="test accuracy (union of 4 hospitals)",
               title=f"heart_disease, Switzerland {args.delay:g} s late on every task")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.savefig(args.out / "curves.png", dpi=110, bbox_inches="tight")
        print(f"wrote {args.out / 'curves.png'}")


if __name__ == "__main__":
    main()
