"""Validation metrics a site reports: numbers only, computed on its local split.

Classification: loss, accuracy, ROC AUC, F1; regression: loss, MSE, MAE. A metric that
is undefined on the local split (AUC with one class present) is left out rather than
reported as a made-up number.
"""

from __future__ import annotations

import math

import numpy as np
import torch


# Rows per inference pass wherever a site evaluates (the memory check in site_worker.dp uses it).
EVAL_ROWS = 4096


def make_loss(name: str) -> torch.nn.Module:
    """The experiment's loss function by name."""
    if name == "bce_with_logits":
        return torch.nn.BCEWithLogitsLoss()
    if name == "cross_entropy":
        return torch.nn.CrossEntropyLoss()
    if name == "mse":
        return torch.nn.MSELoss()
    raise ValueError(f"training.loss_function {name!r} is not bce_with_logits, cross_entropy or mse")


def prepare_target(y: torch.Tensor, out: torch.Tensor, loss_name: str) -> torch.Tensor:
    """Shape/dtype the labels for the loss (class indices for CE, floats shaped like the output else)."""
    if loss_name == "cross_entropy":
        return y.reshape(-1).long()
    return y.reshape(out.shape).to(out.dtype)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss_name: str, task: str,
             batch_size: int = EVAL_ROWS) -> dict[str, float]:
    """Loss and task metrics of ``model`` on (x, y) in eval mode.

    Runs before and after every local training, so it must cost next to nothing: one
    forward pass for a site's validation split (batched only beyond ``batch_size`` rows),
    no autograd, and metrics in plain numpy rather than sklearn's validated entry points.
    """
    was_training = model.training
    model.eval()
    loss_fn = make_loss(loss_name)
    outs = []
    total, n = 0.0, len(x)
    try:
        for i in range(0, n, batch_size):
            out = model(x[i : i + batch_size])
            yb = prepare_target(y[i : i + batch_size], out, loss_name)
            total += float(loss_fn(out, yb)) * len(yb)
            outs.append(out)
    finally:
        model.train(was_training)
    if n == 0:
        return {"n": 0.0}
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    metrics = {"loss": total / n, "n": float(n)}
    metrics.update(task_metrics(out, y, loss_name=loss_name, task=task))
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}


def binary_auc(true: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC as the Mann-Whitney statistic with mid-ranks for ties (equal to sklearn's
    ``roc_auc_score``); None unless both classes are present."""
    pos = true == 1
    n_pos = int(pos.sum())
    n_neg = len(true) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # mid-ranks: every run of equal scores gets the mean of its 1-based positions
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    mid = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(mid, ends - starts)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _f1(true: np.ndarray, pred: np.ndarray, label: int) -> float:
    tp = int(np.sum((pred == label) & (true == label)))
    fp = int(np.sum((pred == label) & (true != label)))
    fn = int(np.sum((pred != label) & (true == label)))
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2 * tp / denom  # sklearn's zero_division=0


def task_metrics(out: torch.Tensor, y: torch.Tensor, *, loss_name: str, task: str) -> dict[str, float | None]:
    """Accuracy/AUC/F1 from logits for classification, MSE/MAE for regression."""
    if task == "regression" or loss_name == "mse":
        from sklearn.metrics import mean_absolute_error, mean_squared_error  # seconds to import: only if used

        pred = out.reshape(-1).double().numpy()
        true = y.reshape(-1).double().numpy()
        return {"mse": mean_squared_error(true, pred), "mae": mean_absolute_error(true, pred)}
    true = y.reshape(-1).long().numpy()
    if out.ndim == 1 or out.shape[-1] == 1:
        score = torch.sigmoid(out.reshape(-1)).double().numpy()
        pred = (score >= 0.5).astype(np.int64)
        auc = binary_auc(true, score)
        f1 = _f1(true, pred, 1)
    else:
        prob = torch.softmax(out.double(), dim=-1).numpy()
        pred = prob.argmax(axis=1)
        classes = np.unique(true)
        if prob.shape[1] == 2:
            auc = binary_auc(true, prob[:, 1]) if len(classes) == 2 else None
            f1 = _f1(true, pred, 1)
        else:
            from sklearn.metrics import f1_score, roc_auc_score  # seconds to import: only if used

            auc = (roc_auc_score(true, prob, multi_class="ovr", labels=list(range(prob.shape[1])))
                   if len(classes) == prob.shape[1] else None)
            f1 = f1_score(true, pred, average="macro", zero_division=0)
    return {"accuracy": float((pred == true).mean()), "auc": auc, "f1": f1}


def prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    """``{"loss": ..}`` -> ``{"before_loss": ..}`` (n is reported once as n_val)."""
    return {f"{prefix}_{k}": v for k, v in metrics.items() if k != "n"}
