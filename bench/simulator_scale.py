"""How many simulated sites one process holds: wall time and peak memory of ``fedbus simulate``.

Runs the in-memory federation (production coordinator + N production site workers in one
process) on a synthetic tabular dataset with a small MLP (10 -> 16 -> 1, DP off, five local
epochs, 20 rows per site), for each N given, and prints wall time, peak RSS, peak thread count
and time per site-round. Run:

    .venv/bin/python bench/simulator_scale.py --sites 10,100,1000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _experiment(rounds: int) -> dict:
    return {
        "basic_info": {"name": "scale_mlp"},
        "architecture": {"layers": [
            {"type": "input", "params": {"features": 10}},
            {"type": "Linear", "params": {"in_features": 10, "out_features": 16}},
            {"type": "ReLU", "params": {}},
            {"type": "Linear", "params": {"in_features": 16, "out_features": 1}},
            {"type": "output", "params": {"features": 1}},
        ]},
        "training": {"optimizer": {"type": "adam", "learning_rate": 0.05,
                                   "differential_privacy": {"enabled": False}},
                     "loss_function": "bce_with_logits", "epochs": 5, "batch_size": 16, "rounds": rounds, "seed": 1},
        "dataset": {"name": "synthetic", "target": "y", "task": "binary", "validation_fraction": 0.25},
        "federated": {"name": "FedAvg", "parameters": {"fraction_fit": 1.0, "fraction_eval": 0.0,
                                                       "min_fit_clients": 1, "min_eval_clients": 0,
                                                       "min_available_clients": 1},
                      "round_timeout_s": 3600},
    }


def _dataset(path: Path, rows: int) -> None:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 10))
    y = (x[:, 0] + 0.5 * x[:, 1] - x[:, 2] + rng.normal(scale=0.5, size=rows) > 0).astype(int)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(10)])
    frame["y"] = y
    frame.to_csv(path, index=False)


class PeakSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.peak_rss = 0
        self.peak_threads = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)
            self.peak_threads = max(self.peak_threads, self.proc.num_threads())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", default="10,100,1000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows-per-site", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="10 sites, 1 round: checks the bench runs (seconds)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.sites, args.rounds = "10", 1
    from protocol.logs import configure_logging
    from simulator.run import simulate

    configure_logging(mode="cli", level="warning")
    import psutil

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(s) for s in args.sites.split(",")]:
            data = Path(tmp) / f"synthetic_{n}.csv"
            _dataset(data, n * args.rows_per_site)
            sampler = PeakSampler()
            base_rss = psutil.Process().memory_info().rss
            sampler.start()
            t0 = time.perf_counter()
            doc = simulate(_experiment(args.rounds), sites=n, dataset=str(data), target="y", progress=False)
            wall = time.perf_counter() - t0
            sampler.stop.set()
            sampler.join()
            row = {
                "sites": n, "rounds": args.rounds, "wall_s": round(wall, 2),
                "federation_wall_s": round(doc["timing"]["wall_s"], 2),
                "s_per_site_round": round(doc["timing"]["wall_s"] / (n * args.rounds), 5),
                "peak_rss_mib": round(sampler.peak_rss / 2**20, 1), "rss_before_mib": round(base_rss / 2**20, 1),
                "peak_threads": sampler.peak_threads,
                "replies": [r["replies"] for r in doc["rounds"]],
                "test_accuracy": round(doc["final"]["accuracy"], 3),
                "phases_s": {k: round(v, 2) for k, v in doc["timing"].items() if k.endswith("_s")},
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
