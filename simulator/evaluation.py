"""Scoring models on the held-out test splits, with the site worker's own preprocessing.

A site standardises features with statistics of its own data, so a site's test rows
must be transformed with that site's statistics (fitted on its training file), never
with the test rows' own. This module reuses ``site_worker.data`` (feature encoding,
labels) and ``site_worker.metrics`` (loss, accuracy, AUC, F1), so federated and
baseline models are scored exactly as a site scores them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from site_worker import data as site_data
from site_worker.config import DatasetSource
from site_worker.metrics import make_loss, prepare_target, task_metrics


@dataclass(frozen=True)
class TestSplit:
    """One site's held-out rows, encoded the way that site encodes its data."""

    site: str
    x: torch.Tensor
    y: torch.Tensor


def _spec_task(spec: Any) -> tuple[str, int]:
    return (getattr(spec, "task", None) or "binary"), int(getattr(spec, "num_classes", None) or 2)


def _target_rule(spec: Any) -> Any:
    rule = getattr(spec, "positive_if", None)
    return rule if rule is not None else site_data.target_rule(spec)


def holdout(train: DatasetSource, test: DatasetSource, spec: Any, *, input_shape: tuple[int, ...] | None, site: str) -> TestSplit:
    """Encode ``test`` rows with the statistics of ``train`` (all of that site's training file)."""
    task, num_classes = _spec_task(spec)
    rule = _target_rule(spec)
    if train.format == "npy":
        x, y_raw = site_data.read_signals(test)
        y = site_data.encode_labels(pd.Series(y_raw), test.target, task, num_classes, rule)
        x = np.asarray(x, dtype=np.float32)
        if input_shape is not None:
            x = x.reshape((len(x), *input_shape))
    else:
        df_tr = site_data.read_table(train).copy()
        df_te = pd.read_csv(test.path, low_memory=False) if test.format == "csv" else pd.read_parquet(test.path)
        both = pd.concat([df_tr, df_te], ignore_index=True)
        y_all = site_data.encode_labels(both[train.target], train.target, task, num_classes, rule)
        keep = ~np.isnan(y_all)
        is_test = np.zeros(len(both), dtype=bool)
        is_test[len(df_tr):] = True
        both, y_all, is_test = both.loc[keep].reset_index(drop=True), y_all[keep], is_test[keep]
        tr_idx, te_idx = np.flatnonzero(~is_test), np.flatnonzero(is_test)
        _, x, _ = site_data.tabular_features(both, train, spec, train.target, tr_idx, te_idx)
        y = y_all[te_idx]
        if input_shape is not None and len(input_shape) > 1:
            x = x.reshape((len(x), *input_shape))
    y_t = torch.as_tensor(y, dtype=torch.long if task == "multiclass" else torch.float32)
    if task != "multiclass":
        y_t = y_t.reshape(-1, 1)
    return TestSplit(site=site, x=torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32), y=y_t)


@torch.no_grad()
def score(model: torch.nn.Module, splits: list[TestSplit], *, loss_name: str, task: str) -> dict[str, Any]:
    """Metrics on each split and on their union: ``{"per_site": {...}, **union}``."""
    model.eval()
    loss_fn = make_loss(loss_name)
    outs, ys = [], []
    per_site: dict[str, dict[str, float]] = {}
    for s in splits:
        out = model(s.x) if len(s.x) else torch.zeros((0, 1))
        per_site[s.site] = _metrics(out, s.y, loss_fn, loss_name, task)
        outs.append(out)
        ys.append(s.y)
    union = _metrics(torch.cat(outs), torch.cat(ys), loss_fn, loss_name, task) if splits else {}
    return {**union, "per_site": per_site}


def _metrics(out: torch.Tensor, y: torch.Tensor, loss_fn: Any, loss_name: str, task: str) -> dict[str, float]:
    n = int(len(y))
    if n == 0:
        return {"n_test": 0}
    loss = float(loss_fn(out, prepare_target(y, out, loss_name)))
    m: dict[str, Any] = {"loss": loss, **task_metrics(out, y, loss_name=loss_name, task=task)}
    m = {k: float(v) for k, v in m.items() if v is not None and math.isfinite(float(v))}
    m["n_test"] = n
    return m


def source_for(path: Path, target: str, name: str) -> DatasetSource:
    """A DatasetSource for a file the simulator wrote (``.csv`` or the ``_X.npy`` of a pair)."""
    if path.name.endswith("_X.npy"):
        return DatasetSource(name=name, path=path, target=target, format="npy",
                             labels_path=path.with_name(path.name[: -len("_X.npy")] + "_y.npy"))
    fmt = "parquet" if path.suffix in (".parquet", ".pq") else "csv"
    return DatasetSource(name=name, path=path, target=target, format=fmt)
