"""Flower ClientApp of the vs-Flower benchmark: one hospital's local training.

Written by bench/vs_flower.py into a temporary Flower app next to a verbatim copy of
bench/_vs_flower_common.py (as ``common.py``), so Flower trains exactly what fedbus trains.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import common

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load this node's hospital (partition-id), train from the global weights, reply."""
    torch.set_num_threads(1)
    spec = common.JobSpec(**common.spec_overrides(common.app_run_config(context.run_config)))
    hospital = common.HOSPITALS[int(context.node_config["partition-id"])]
    site = common.load_site(hospital, spec=spec)
    weights = msg.content["arrays"].to_numpy_ndarrays()
    round_ = int(msg.content["config"]["server-round"])
    new_weights, n, train_s = common.train_local(weights, site, spec=spec, round_=round_)
    content = RecordDict({
        "arrays": ArrayRecord(new_weights),
        "metrics": MetricRecord({"num-examples": n, "train_s": train_s}),
    })
    return Message(content=content, reply_to=msg)
