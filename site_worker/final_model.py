"""What a site keeps and releases about a run's final model: both models, one test release.

* ``RunsJoined`` records, per (run, dataset), the last round this site trained in. A
  ``PersonalizeTask`` is honoured only for a run the site joined, for the final model of a
  round at or after its last one, and once per run: a coordinator cannot open a fresh
  budget by naming a run the site never trained in, nor fine-tune twice for one run.
* ``FinalStore`` keeps the final global model, the site's personalised model and the reply
  it sent (under ``state_dir/final/``, named by a hash of run id and dataset, never by a
  wire string), so a redelivered task gets the same answer without spending again.
* ``release_on_test`` is the test-split release: the metrics of one or more models on the
  fixed test split in **one** Gaussian mechanism under ``metrics = "dp"`` (the statistics
  vectors of all models concatenated; L2 sensitivity √(Σ Δᵢ²), noise σ·√(Σ Δᵢ²) on every
  coordinate, i.e. one accountant entry (σ, 1, 1) as ``site_worker.release`` charges).
  Every classification figure (accuracy, sensitivity, specificity, F1, prevalence, the
  majority-class accuracy, the one-class flag) is post-processing of one confusion matrix per
  model, projected to non-negative cells adding up to the released n, each with its 95 %
  interval (``protocol.dp_figures``), or exact (``exact``: a leak the policy allows, named in
  docs/threat-model.md; its intervals cover the test split's size only).
* Whether a model predicts one class: exact under ``exact``; under ``dp`` read off the same
  projected matrix (an empty predicted column), left out when the noise cannot tell.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protocol.durable import write_atomic
from protocol.policy import SitePolicy
from site_worker.metrics import evaluate
from protocol import dp_figures
from site_worker.release import derive, statistics
from site_worker.secure_rng import SecureRandom


def _key(run_id: str, dataset: str) -> str:
    return hashlib.sha256(f"{run_id}\0{dataset}".encode()).hexdigest()[:32]


class RunsJoined:
    """Per (run, dataset): the last round this site trained in (``state_dir/runs/``)."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "runs"

    def last_round(self, run_id: str, dataset: str) -> int | None:
        p = self.dir / f"{_key(run_id, dataset)}.json"
        if not p.exists():
            return None
        doc = json.loads(p.read_text(encoding="utf-8"))
        return int(doc["last_round"]) if doc.get("run_id") == run_id else None

    def trained(self, run_id: str, dataset: str, round: int) -> None:
        last = self.last_round(run_id, dataset)
        if last is not None and last >= round:
            return
        write_atomic(self.dir / f"{_key(run_id, dataset)}.json",
                     json.dumps({"run_id": run_id, "dataset": dataset, "last_round": int(round)}).encode(), fsync=False)


class FinalStore:
    """Both final models of a run and the reply released about them (``state_dir/final/``)."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "final"

    def path(self, run_id: str, dataset: str) -> Path:
        return self.dir / _key(run_id, dataset)

    def reply(self, run_id: str, dataset: str) -> dict[str, Any] | None:
        p = self.path(run_id, dataset) / "reply.json"
        if not p.exists():
            return None
        doc = json.loads(p.read_text(encoding="utf-8"))
        return doc if doc.get("run_id") == run_id else None

    def keep(self, run_id: str, dataset: str, *, models: dict[str, torch.nn.Module], reply: dict[str, Any]) -> None:
        """The models first, the reply last: a reply on disk means both models are there."""
        d = self.path(run_id, dataset)
        for name, model in models.items():
            buf = io.BytesIO()
            np.savez(buf, **{k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()})
            write_atomic(d / f"{name}.npz", buf.getvalue())
        write_atomic(d / "reply.json", json.dumps({"run_id": run_id, "dataset": dataset, **reply}).encode())

    def load(self, run_id: str, dataset: str, name: str) -> dict[str, np.ndarray]:
        with np.load(self.path(run_id, dataset) / f"{name}.npz", allow_pickle=False) as z:
            return {k: z[k] for k in z.files}


def _majority(y_train: torch.Tensor) -> int | None:
    y = y_train.reshape(-1)
    if len(y) == 0:
        return None
    values, counts = torch.unique(y.long(), return_counts=True)
    return int(values[int(torch.argmax(counts))])


def _exact_extras(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, majority: int | None) -> dict[str, float]:
    with torch.inference_mode():
        was = model.training
        model.eval()
        try:
            out = model(x)
        finally:
            model.train(was)
    true = y.reshape(-1).long()
    if out.ndim == 1 or out.shape[-1] == 1:
        pred = (torch.sigmoid(out.reshape(-1)) >= 0.5).long()
    else:
        pred = out.argmax(-1)
    m: dict[str, float] = {}
    if out.ndim == 1 or out.shape[-1] <= 2:
        pos, neg = true == 1, true == 0
        if int(pos.sum()):
            m["sensitivity"] = float((pred[pos] == 1).double().mean())
        if int(neg.sum()):
            m["specificity"] = float((pred[neg] == 0).double().mean())
    if majority is not None and len(true):
        m["majority_class_accuracy"] = float((true == majority).double().mean())
    m["predicts_one_class"] = float(len(pred) > 1 and int(torch.unique(pred).numel()) == 1)  # 1.0 / 0.0
    return m


def _exact_intervals(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss_name: str, task: str,
                     clip: float, exact: dict[str, float]) -> dict[str, float]:
    """Under ``exact``: the 95 % intervals of the exact figures (the test split's size only) and
    the exact cells, so the coordinator can pool the sites (``protocol.dp_figures.union``).
    Each interval holds its ``exact`` figure: the AUC's comes from the binned histogram, and the
    exact (unbinned) AUC can lie just outside the binned one's interval."""
    layout, v, _ = statistics(model, x, y, loss_name=loss_name, task=task, clip=clip)
    if layout != "binary":
        return {}
    d = derive(layout, v, clip=clip, noise_sd=0.0)
    out = {k: val for k, val in d.items() if (k.endswith(("_lo", "_hi")) and not k.startswith("majority"))
           or k in dp_figures.CELLS or k == "noise_sd"}
    for k, val in exact.items():
        if f"{k}_lo" in out and f"{k}_hi" in out:
            out[f"{k}_lo"], out[f"{k}_hi"] = min(out[f"{k}_lo"], val), max(out[f"{k}_hi"], val)
    return out


def release_on_test(models: list[torch.nn.Module], x: torch.Tensor, y: torch.Tensor, y_train: torch.Tensor, *,
                    loss_name: str, task: str, policy: SitePolicy, rng: SecureRandom | None,
                    rows: int | None = None) -> list[dict[str, float]]:
    """Metrics of every model on the test split, as one release (see the module docstring).
    ``rows`` is the public bound on the released n. The caller has reserved
    ``release_entries(policy)`` (one entry) in the ledger."""
    if policy.metrics == "none" or len(x) == 0:
        return [{} for _ in models]
    classify = task != "regression" and loss_name != "mse"
    if policy.metrics == "exact":
        majority = _majority(y_train) if classify else None
        released: list[dict[str, float]] = []
        for model in models:
            exact = {**evaluate(model, x, y, loss_name=loss_name, task=task),
                     **(_exact_extras(model, x, y, majority) if classify else {})}
            released.append({**exact, **(_exact_intervals(model, x, y, loss_name=loss_name, task=task,
                                                          clip=policy.metrics_loss_clip, exact=exact) if classify else {})})
        return released
    assert rng is not None
    clip = policy.metrics_loss_clip
    parts = [statistics(m, x, y, loss_name=loss_name, task=task, clip=clip) for m in models]
    sens = math.sqrt(sum(s * s for _, _, s in parts))
    joint = np.concatenate([v for _, v, _ in parts])
    sd = policy.metrics_noise_multiplier * sens
    noisy = joint + rng.standard_normal(len(joint)) * sd
    out, at = [], 0
    for layout, v, _ in parts:
        piece = noisy[at: at + len(v)]
        at += len(v)
        m = derive(layout, piece, clip=clip, noise_sd=sd, rows=rows)
        if "predicts_one_class" in m:
            m["one_class_dp_estimate"] = 1.0
        out.append(m)
    return out


__all__ = ["FinalStore", "RunsJoined", "release_on_test"]
