"""Metrics a site releases, protected as its policy says: ``dp``, ``exact`` or ``none``.

``exact`` metrics are exact statistics of private rows (a coordinator that crafts the
weights reads, e.g., the positive rate of the split to full precision): a leak the
policy may allow, named in docs/threat-model.md. ``none`` releases nothing.

``dp`` releases one Gaussian mechanism per evaluation on a vector of counts and sums,
and derives every reported metric from the noisy vector (post-processing is free):

* binary: the 2x2 confusion counts at 0.5 (accuracy, F1, n), a histogram of (label,
  score bin) over 10 equal score bins (a binned ROC AUC), and the sum of per-example
  losses clipped to [0, C] and divided by C;
* multiclass: the (label, prediction) confusion matrix plus the clipped loss sum;
* regression: the row count, the clipped squared-error sum / C and the clipped
  absolute-error sum / √C.

Adding or removing one row changes one confusion cell, one histogram cell (binary) and
the scaled loss sum by at most 1 each, so the vector's L2 sensitivity is Δ = √3 (binary),
√2 (multiclass: one confusion cell and the loss) or √3 (regression: count, two sums). Every coordinate gets N(0, (σ·Δ)²) with σ = ``metrics_noise_multiplier``:
a Gaussian mechanism with noise multiplier σ, i.e. the Opacus accountant entry (σ, q=1, 1
step), charged to the same ledger as training: its entries are ``protocol.dp_plan.release_entries``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from protocol import dp_figures
from protocol.policy import SitePolicy
from protocol.secagg.union import RELEASE_BINS, release_length
from site_worker.metrics import EVAL_ROWS, evaluate, prepare_target
from site_worker.secure_rng import SecureRandom

BINS = RELEASE_BINS  # score bins of the binary histogram (0.5 is a bin edge)


@torch.inference_mode()
def _outputs(model: torch.nn.Module, x: torch.Tensor, batch_size: int = EVAL_ROWS) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        outs = [model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    finally:
        model.train(was)
    return torch.cat(outs) if outs else torch.zeros((0, 1))


def release_size(*, task: str, loss_name: str, outputs: int) -> int:
    """Values in one model's DP statistics vector (``statistics``), from public shapes alone:
    binary 4 + 2 x BINS + 1, multiclass k x k + 1, regression 3."""
    return release_length(task=task, loss_name=loss_name, outputs=outputs)


def _per_example_loss(out: torch.Tensor, y: torch.Tensor, loss_name: str) -> torch.Tensor:
    t = prepare_target(y, out, loss_name)
    if loss_name == "bce_with_logits":
        return torch.nn.functional.binary_cross_entropy_with_logits(out, t, reduction="none").reshape(len(out), -1).mean(1)
    if loss_name == "cross_entropy":
        return torch.nn.functional.cross_entropy(out, t, reduction="none")
    return ((out - t) ** 2).reshape(len(out), -1).mean(1)


def statistics(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss_name: str, task: str,
               clip: float) -> tuple[str, np.ndarray, float]:
    """(layout, exact statistics vector, L2 sensitivity) for the DP release."""
    out = _outputs(model, x)
    if len(out) == 0:
        raise ValueError("no rows to evaluate")
    with torch.inference_mode():
        if task == "regression" or loss_name == "mse":
            err = (out.reshape(len(out), -1) - y.reshape(len(out), -1).to(out.dtype)).double()
            se = (err**2).mean(1).clamp(max=clip) / clip
            ae = err.abs().mean(1).clamp(max=math.sqrt(clip)) / math.sqrt(clip)
            return "regression", np.array([len(out), float(se.sum()), float(ae.sum())]), math.sqrt(3.0)
        loss = _per_example_loss(out, y, loss_name).double().clamp(min=0.0, max=clip) / clip
        true = y.reshape(-1).long().numpy()
        if out.ndim == 1 or out.shape[-1] == 1 or out.shape[-1] == 2:
            score = (torch.sigmoid(out.reshape(-1)) if out.ndim == 1 or out.shape[-1] == 1
                     else torch.softmax(out.double(), -1)[:, 1]).double().numpy()
            t = true.clip(0, 1)
            b = np.minimum((score * BINS).astype(np.int64), BINS - 1)
            conf = np.zeros((2, 2))  # [label, prediction at 0.5]
            np.add.at(conf, (t, (score >= 0.5).astype(np.int64)), 1.0)
            hist = np.zeros((2, BINS))
            np.add.at(hist, (t, b), 1.0)
            return "binary", np.concatenate([conf.ravel(), hist.ravel(), [float(loss.sum())]]), math.sqrt(3.0)
        k = out.shape[-1]
        pred = out.argmax(-1).numpy()
        conf = np.zeros((k, k))
        np.add.at(conf, (true.clip(0, k - 1), pred), 1.0)
        return f"multiclass:{k}", np.concatenate([conf.ravel(), [float(loss.sum())]]), math.sqrt(2.0)


def derive(layout: str, v: np.ndarray, *, clip: float, noise_sd: float = 0.0, rows: int | None = None) -> dict[str, float]:
    """Metrics from a (noisy) statistics vector; pure post-processing. Classification figures
    come from the one confusion matrix, projected and with 95 % intervals
    (``protocol.dp_figures``); ``noise_sd`` is the per-coordinate noise SD (0: exact counts),
    ``rows`` the public bound on the released n. Binary releases also carry their noisy cells
    (``cm_*``) and ``noise_sd`` so the coordinator can pool the sites' matrices."""
    if layout == "regression":
        n = dp_figures.released_n(v[:1], rows)
        return {"loss": max(0.0, v[1]) * clip / n, "mse": max(0.0, v[1]) * clip / n,
                "mae": max(0.0, v[2]) * math.sqrt(clip) / n, "n": n}
    loss_sum = max(0.0, float(v[-1]))
    if layout == "binary":
        out = dp_figures.confusion_figures(v[:4], noise_sd, rows=rows)
        out["loss"] = loss_sum * clip / out["n"]
        out.update(dp_figures.auc_figure(v[4:-1], noise_sd, n=out["n"]))
        out.update({name: float(c) for name, c in zip(dp_figures.CELLS, v[:4])})
        out["noise_sd"] = float(noise_sd)
        return out
    out = dp_figures.confusion_figures(v[:-1], noise_sd, rows=rows)
    out["loss"] = loss_sum * clip / out["n"]
    return out


def release_metrics(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss_name: str, task: str,
                    policy: SitePolicy, rng: SecureRandom | None, rows: int | None = None) -> dict[str, float]:
    """The metrics this site may release on (x, y): exact, DP (noise from ``rng``) or none.
    ``rows`` is the public bound on the released n. The caller has already reserved
    ``release_entries(policy)`` in the ledger."""
    if policy.metrics == "none" or len(x) == 0:
        return {}
    if policy.metrics == "exact":
        return evaluate(model, x, y, loss_name=loss_name, task=task)
    assert rng is not None
    layout, v, sens = statistics(model, x, y, loss_name=loss_name, task=task, clip=policy.metrics_loss_clip)
    sd = policy.metrics_noise_multiplier * sens
    noisy = v + rng.standard_normal(len(v)) * sd
    return derive(layout, noisy, clip=policy.metrics_loss_clip, noise_sd=sd, rows=rows)

