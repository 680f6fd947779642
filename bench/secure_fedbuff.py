#!/usr/bin/env python
"""FedBuff with and without secure aggregation on heart_disease: the held-out accuracy (issue 22).

    .venv/bin/python bench/secure_fedbuff.py [--seeds 5] [--versions 15] [--buffer 2] [--json]
    .venv/bin/python bench/secure_fedbuff.py --smoke      # 1 seed, 1 version of 1 epoch each: checks the bench runs

One site per hospital (``natural:dataset``: Cleveland, Hungary, Switzerland, VA Long Beach), the
production coordinator and site workers in memory, FedBuff with ``buffer_size`` K and constant
staleness, ``--versions`` global versions; the same seeds with and without
``federated.secure_aggregation`` (min_contributors 2, threshold U = 3 of the 4 sites, T = 1,
clip 1, scale 2^16). Each run's final model is scored on the simulator's held-out rows, which
no site holds (the union test set). The issue's check: the secure runs' mean accuracy is within
1 point of the plain runs' mean (``within_1_point``). Async runs are not bit-reproducible (the
buffers fill in arrival order), so the spread over seeds is reported too (``sd``, the paired
difference's standard error ``paired_se_points``), with the mean accuracy of the last five
versions (``mean_last5_accuracy``, steadier than the last one) and the mean AUC.

What differs besides the masking: a secure buffer's step is the mean weighted by each site's
(capped) rows, carried inside the masked vector; plain FedBuff averages the K deltas unweighted.
Each coordinate of w * delta is clipped to [-1, 1] and quantised at 2^-16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "heart_disease.json"


def experiment(secure: bool, buffer_size: int, timeout_s: float, epochs: int | None = None) -> dict[str, Any]:
    exp = json.loads(EXAMPLE.read_text())
    if epochs is not None:
        exp["training"]["epochs"] = epochs
    exp["federated"]["name"] = "FedBuff"
    exp["federated"]["parameters"].update(buffer_size=buffer_size, min_fit_clients=4, min_available_clients=4,
                                          fraction_eval=0.0)
    exp["federated"]["round_timeout_s"] = timeout_s
    if secure:
        exp["federated"]["secure_aggregation"] = {"min_contributors": 2, "threshold": 3}
    return exp


def run(secure: bool, seed: int, versions: int, buffer_size: int, epochs: int | None = None) -> dict[str, Any]:
    from simulator.run import simulate

    t = time.perf_counter()
    doc = simulate(experiment(secure, buffer_size, 120.0, epochs), partition="natural:dataset", rounds=versions, seed=seed,
                   progress=False)
    curve = [(r.get("holdout") or {}).get("accuracy") for r in doc["rounds"]]
    return {"secure": secure, "seed": seed, "versions": len(doc["rounds"]), "accuracy": doc["holdout"]["accuracy"],
            "auc": doc["holdout"].get("auc"), "n_test": doc["holdout"].get("n_test"),
            "best_accuracy": max((a for a in curve if a is not None), default=None),
            "last5_accuracy": statistics.mean(a for a in curve[-5:] if a is not None) if any(
                a is not None for a in curve[-5:]) else None, "wall_s": time.perf_counter() - t,
            "rejected": len(doc["rejected"]), "status": doc["status"]}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for secure in (False, True):
        acc = [r["accuracy"] for r in runs if r["secure"] is secure]
        last5 = [r["last5_accuracy"] for r in runs if r["secure"] is secure and r["last5_accuracy"] is not None]
        out["secure" if secure else "plain"] = {
            "mean_accuracy": statistics.mean(acc), "sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "mean_last5_accuracy": statistics.mean(last5) if last5 else None,
            "mean_auc": statistics.mean(r["auc"] for r in runs if r["secure"] is secure),
            "runs": len(acc), "mean_wall_s": statistics.mean(r["wall_s"] for r in runs if r["secure"] is secure)}
    diff = out["secure"]["mean_accuracy"] - out["plain"]["mean_accuracy"]
    out["difference_points"] = 100 * diff
    paired = [b["accuracy"] - a["accuracy"] for a, b in zip(*[[r for r in runs if r["secure"] is s] for s in (False, True)])]
    out["paired_se_points"] = 100 * statistics.stdev(paired) / len(paired) ** 0.5 if len(paired) > 1 else None
    out["within_1_point"] = diff >= -0.01
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--versions", type=int, default=15)
    ap.add_argument("--buffer", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="1 seed, 1 version of 1 epoch each")
    a = ap.parse_args()
    from protocol.logs import configure_logging

    configure_logging(mode="cli", level="warning")
    seeds, versions, epochs = (1, 1, 1) if a.smoke else (a.seeds, a.versions, None)
    runs = []
    for seed in range(seeds):
        for secure in (False, True):  # interleaved: load from other work hits both alike
            r = run(secure, seed, versions, a.buffer, epochs)
            runs.append(r)
            if not a.json:
                print(f"seed {seed} {'secure' if secure else 'plain '}: accuracy {r['accuracy']:.3f} "
                      f"(n={r['n_test']}), {r['versions']} versions, {r['wall_s']:.1f} s", flush=True)
    for r in runs:
        assert r["versions"] == versions and r["rejected"] == 0, r
    s = summary(runs)
    if a.json:
        print(json.dumps({"runs": runs, "summary": s, "versions": versions, "buffer_size": a.buffer}))
        return
    print(f"plain FedBuff  {100 * s['plain']['mean_accuracy']:.1f} % (sd {100 * s['plain']['sd']:.1f}), "
          f"secure FedBuff {100 * s['secure']['mean_accuracy']:.1f} % (sd {100 * s['secure']['sd']:.1f}) over "
          f"{seeds} seed(s): {s['difference_points']:+.1f} points; within 1 point: {s['within_1_point']}")


if __name__ == "__main__":
    main()
