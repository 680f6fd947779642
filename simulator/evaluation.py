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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from site_worker import data as site_data
from site_worker import readers
from site_worker.config import DatasetSource
from site_worker.metrics import make_loss, prepare_target, task_metrics

if TYPE_CHECKING:
    from protocol.config import DatasetSpec


@dataclass(frozen=True)
class TestSplit:
    """One site's held-out rows, encoded the way that site encodes its data."""

    site: str
    x: torch.Tensor
    y: torch.Tensor
    majority: float | None = None  # the majority class of the site's *training* rows (a no-skill model)


def _spec_task(spec: DatasetSpec) -> tuple[str, int]:
    return (getattr(spec, "task", None) or "binary"), int(getattr(spec, "num_classes", None) or 2)


def _target_rule(spec: DatasetSpec) -> Any:
    rule = getattr(spec, "positive_if", None)
    return rule if rule is not None else site_data.target_rule(spec)


def holdout(train: DatasetSource, test: DatasetSource, spec: DatasetSpec, *, input_shape: tuple[int, ...] | None, site: str) -> TestSplit:
    """Encode ``test`` rows with the statistics of ``train`` (all of that site's training file)."""
    task, num_classes = _spec_task(spec)
    x, y, y_train = readers.by_format(train.format).holdout(train, test, spec, task=task, num_classes=num_classes,
                                                             rule=_target_rule(spec), input_shape=input_shape)
    majority = _majority(y_train, task)
    y_t = torch.as_tensor(y, dtype=torch.long if task == "multiclass" else torch.float32)
    if task != "multiclass":
        y_t = y_t.reshape(-1, 1)
    return TestSplit(site=site, x=torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32), y=y_t,
                     majority=majority)


def _majority(y: np.ndarray, task: str) -> float | None:
    if task == "regression":
        return None
    y = y[~np.isnan(y)] if y.dtype.kind == "f" else y
    if len(y) == 0:
        return None
    values, counts = np.unique(y, return_counts=True)
    return float(values[int(np.argmax(counts))])


@torch.no_grad()
def score(model: torch.nn.Module, splits: list[TestSplit], *, loss_name: str, task: str) -> dict[str, Any]:
    """Metrics on each split and on their union: ``{"per_site": {...}, **union}``."""
    model.eval()
    loss_fn = make_loss(loss_name)
    outs, ys = [], []
    per_site: dict[str, dict[str, float]] = {}
    majority = []
    for s in splits:
        out = model(s.x) if len(s.x) else torch.zeros((0, 1))
        per_site[s.site] = _metrics(out, s.y, loss_fn, loss_name, task, majority=s.majority)
        outs.append(out)
        ys.append(s.y)
        if s.majority is not None:
            majority.append((s.y.reshape(-1) == s.majority).float())
    union = _metrics(torch.cat(outs), torch.cat(ys), loss_fn, loss_name, task) if splits else {}
    if majority and len(majority) == len(splits):
        # every site predicting its own training majority, over the union of test rows
        union["majority_class_accuracy"] = float(torch.cat(majority).mean())
    return {**union, "per_site": per_site}


def classification_extras(out: torch.Tensor, y: torch.Tensor, *, majority: float | None) -> dict[str, Any]:
    """Sensitivity, specificity, the majority-class baseline and whether the model predicts one class."""
    m: dict[str, Any] = {}
    true = y.reshape(-1).long()
    if out.ndim == 1 or out.shape[-1] == 1:
        pred = (torch.sigmoid(out.reshape(-1)) >= 0.5).long()
        pos, neg = true == 1, true == 0
        if int(pos.sum()):
            m["sensitivity"] = float((pred[pos] == 1).float().mean())
        if int(neg.sum()):
            m["specificity"] = float((pred[neg] == 0).float().mean())
    else:
        pred = out.argmax(dim=-1)
        if out.shape[-1] == 2:
            pos, neg = true == 1, true == 0
            if int(pos.sum()):
                m["sensitivity"] = float((pred[pos] == 1).float().mean())
            if int(neg.sum()):
                m["specificity"] = float((pred[neg] == 0).float().mean())
    m["predicts_one_class"] = bool(len(pred) > 1 and int(torch.unique(pred).numel()) == 1)
    m["positive_rate"] = float((pred == 1).float().mean()) if len(pred) else 0.0
    if majority is not None:
        m["majority_class_accuracy"] = float((true == int(majority)).float().mean())
    return m


def _metrics(out: torch.Tensor, y: torch.Tensor, loss_fn: Any, loss_name: str, task: str, *,
             majority: float | None = None) -> dict[str, Any]:
    n = int(len(y))
    if n == 0:
        return {"n_test": 0}
    loss = float(loss_fn(out, prepare_target(y, out, loss_name)))
    m: dict[str, Any] = {"loss": loss, **task_metrics(out, y, loss_name=loss_name, task=task)}
    m = {k: float(v) for k, v in m.items() if v is not None and math.isfinite(float(v))}
    if task != "regression":
        m.update(classification_extras(out, y, majority=majority))
    m["n_test"] = n
    return m


def source_for(path: Path, target: str, name: str) -> DatasetSource:
    """A DatasetSource for a file the simulator wrote (``.csv`` or the ``_X.npy`` of a pair), as
    its site.toml names it (``Reader.site_toml``)."""
    fmt = readers.infer_format(path) or "csv"
    keys = readers.by_format(fmt).site_toml(path)
    labels = keys.get("labels_path")
    return DatasetSource(name=name, path=path, target=target, format=keys.get("format", fmt),
                         labels_path=None if labels is None else Path(labels))


@torch.no_grad()
def union_of_own(models: dict[str, torch.nn.Module], splits: list[TestSplit], *, loss_name: str,
                 task: str) -> dict[str, Any]:
    """Each site's own model on its own test rows: metrics over the union of those rows, plus
    ``mean_accuracy``/``mean_auc`` (the mean over sites, FLamby's per-client average)."""
    loss_fn = make_loss(loss_name)
    outs, ys, accs, aucs = [], [], [], []
    for s in splits:
        model = models[s.site]
        model.eval()
        out = model(s.x)
        outs.append(out)
        ys.append(s.y)
        m = _metrics(out, s.y, loss_fn, loss_name, task)
        if "accuracy" in m:
            accs.append(m["accuracy"])
        if "auc" in m:
            aucs.append(m["auc"])
    union = _metrics(torch.cat(outs), torch.cat(ys), loss_fn, loss_name, task)
    if accs:
        union["mean_accuracy"] = float(np.mean(accs))
    if aucs:
        union["mean_auc"] = float(np.mean(aucs))
    return union
