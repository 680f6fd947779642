"""Flower ServerApp of the vs-Flower benchmark: FedAvg with per-round timestamps.

Writes ``result.json`` (per-round wall times and the slowest client's training time) and
``weights.npz`` (the final global model) into the folder named by the run config key
``out-dir`` (or in the VSFLOWER_RUN_CONFIG environment variable under the simulation engine,
whose ``run_simulation`` takes no run config). The bench evaluates the weights itself.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from . import common

app = ServerApp()


class TimedFedAvg(FedAvg):
    """FedAvg that stamps each round's start and end and keeps the clients' train_s."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rounds: list[dict] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.rounds.append({"round": server_round, "start": time.time()})
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        train_s = [float(m.content["metrics"]["train_s"]) for m in replies if not m.has_error()]
        result = super().aggregate_train(server_round, replies)
        entry = self.rounds[-1]
        entry["end"] = time.time()
        entry["round_s"] = entry["end"] - entry["start"]
        entry["slowest_train_s"] = max(train_s) if train_s else None
        entry["replies"] = len(train_s)
        entry["errors"] = len(replies) - len(train_s)
        return result


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the job's rounds on all four SuperNodes and write the figures."""
    started = time.time()
    spec = common.JobSpec(**common.spec_overrides(common.app_run_config(context.run_config)))
    out = common.app_run_config(context.run_config).get("out-dir")
    if not out:
        raise ValueError("set the run config key out-dir (or VSFLOWER_RUN_CONFIG) to a folder for result.json")
    out_dir = Path(str(out))
    strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=4,
                           min_available_nodes=4)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(common.initial_weights(spec=spec)),
                            num_rounds=spec.rounds, timeout=600.0)
    weights = result.arrays.to_numpy_ndarrays()
    np.savez(out_dir / "weights.npz", *weights)
    doc = {"started": started, "finished": time.time(), "rounds": strategy.rounds}
    tmp = out_dir / "result.json.tmp"
    tmp.write_text(json.dumps(doc))
    tmp.replace(out_dir / "result.json")
