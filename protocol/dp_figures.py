"""Figures from one released confusion matrix, made consistent, each with its 95 % interval.

A site releases one noisy confusion matrix per model (``site_worker/release.py``: every cell
plus N(0, s²), s = σ·Δ, public). Everything shown is derived here, by post-processing only,
so it costs no privacy:

* **Consistent projection.** The released n is the noisy cells' sum, rounded, at least 1 and
  at most the public row bound. The noisy cells are projected (Euclidean, the least-squares
  fit) onto {c ≥ 0, Σc = n}: non-negative cells that add up to the released n; for binary,
  a predicted column consistent with 0 (within 2 of its noise SDs) while the other is not is
  first set to 0 (``project_binary``: the one-class flag and the figures read one matrix). Accuracy,
  sensitivity, specificity, F1, prevalence, the predicted-positive share and the one-class
  flag all come from those cells, so no impossible combination can appear (accuracy 100 %
  with specificity 0.44 cannot happen: both read the same four cells).
* **95 % intervals** for the model's figure on the population the test split is drawn from,
  covering both the DP noise and the test-set size, by Monte Carlo (``DRAWS`` draws): draw
  the noise again (u = released + N(0, s²), projected like the release), then the
  population proportions from Dirichlet(u + ½) (Jeffreys prior: the test split is a sample of
  n patients), and take each figure's 2.5 and 97.5 percentiles, widened to hold the point
  figure. Its coverage is measured in tests/protocol/test_dp_figures.py.
* **Too few rows.** A figure whose interval spans at least ``TOO_WIDE`` of its whole range
  ([0, 1]) says nothing: it is shown as ``TOO_FEW`` instead of a number.
* AUC comes only from the released (label, score bin) histogram, projected the same way, with
  its interval from the same Monte Carlo; otherwise it is not shown.

The Monte Carlo draws use a generator seeded from the released numbers themselves: the
intervals are a function of the release, reproducible by anyone who holds it.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Mapping, Sequence

import numpy as np

DRAWS = 2000
LEVEL = 0.95
TOO_WIDE = 0.9  # an interval over ≥ 90 % of [0, 1] is not a figure
TOO_FEW = "too few test rows for this budget"
PRIOR = 0.5  # Jeffreys: Dirichlet(½, ..., ½)
BINARY = ("accuracy", "sensitivity", "specificity", "f1", "prevalence", "predicted_positive_share",
          "majority_class_accuracy")
MULTICLASS = ("accuracy", "f1")
CELLS = ("cm_tn", "cm_fp", "cm_fn", "cm_tp")  # the released binary cells on the wire, [label][prediction]
WITH_CI = (*BINARY, "auc")


def project(v: np.ndarray, total: np.ndarray | float) -> np.ndarray:
    """Euclidean projection of each row of ``v`` (..., m) onto {c ≥ 0, Σc = total}
    (the sort-based simplex projection); ``total`` ≥ 0, a scalar or one per row."""
    v = np.asarray(v, dtype=np.float64)
    t = np.broadcast_to(np.asarray(total, dtype=np.float64), v.shape[:-1])[..., None]
    u = -np.sort(-v, axis=-1)
    css = np.cumsum(u, axis=-1) - t
    ind = np.arange(1, v.shape[-1] + 1, dtype=np.float64)
    rho = np.sum(u - css / ind > 0, axis=-1, keepdims=True)  # ≥ 1 whenever total ≥ 0
    rho = np.maximum(rho, 1)
    theta = np.take_along_axis(css, rho - 1, axis=-1) / rho
    return np.maximum(v - theta, 0.0)


ONE_CLASS_SDS = 2.0  # a noisy predicted-class count this many of its noise SDs from 0 is "consistent with 0"


def project_binary(v: np.ndarray, total: np.ndarray | float, noise_sd: float) -> np.ndarray:
    """The consistent projection of (..., 4) noisy binary cells [tn, fp, fn, tp]: a predicted
    column (fp + tp, or tn + fn: two cells, noise SD √2·s) within ``ONE_CLASS_SDS`` of its SDs
    of 0 while the other is not is consistent with "predicts one class", and is set to 0; then
    the cells are projected onto {c ≥ 0, Σc = total}. With s = 0 a column is forced only when
    it is empty already (exact counts stay exact)."""
    v = np.array(v, dtype=np.float64, copy=True)
    limit = ONE_CLASS_SDS * math.sqrt(2.0) * float(noise_sd)
    pos = v[..., 1] + v[..., 3] <= limit
    neg = v[..., 0] + v[..., 2] <= limit
    force_pos, force_neg = pos & ~neg, neg & ~pos
    far = -1e12  # below any θ: projected to 0
    v[..., 1] = np.where(force_pos, far, v[..., 1])
    v[..., 3] = np.where(force_pos, far, v[..., 3])
    v[..., 0] = np.where(force_neg, far, v[..., 0])
    v[..., 2] = np.where(force_neg, far, v[..., 2])
    return project(v, total)


def one_class_known(v: np.ndarray, noise_sd: float) -> bool:
    """Whether the noise lets the release say if the model predicts one class: not when both
    predicted columns are within the limit of 0 (noise this large for this split cannot tell)."""
    limit = ONE_CLASS_SDS * math.sqrt(2.0) * float(noise_sd)
    return not (v[1] + v[3] <= limit and v[0] + v[2] <= limit) or noise_sd == 0


def released_n(cells: np.ndarray, rows: int | None) -> float:
    """The released row count: the noisy cells' sum, rounded, in [1, rows] (rows public)."""
    n = max(1.0, float(round(float(np.sum(cells)))))
    return min(n, float(rows)) if rows is not None and rows >= 1 else n


def _ratio(a: np.ndarray, b: np.ndarray, empty: float = math.nan) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), empty)


def _binary(c: np.ndarray) -> dict[str, np.ndarray]:
    """Figures of (..., 4) cells [tn, fp, fn, tp] (counts or proportions)."""
    tn, fp, fn, tp = (c[..., i] for i in range(4))
    n = tn + fp + fn + tp
    return {"accuracy": _ratio(tn + tp, n), "sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn, 0.0), "prevalence": _ratio(tp + fn, n),
            "predicted_positive_share": _ratio(tp + fp, n),
            "majority_class_accuracy": _ratio(np.maximum(tn + fp, fn + tp), n)}


def _multiclass(c: np.ndarray, k: int) -> dict[str, np.ndarray]:
    m = c.reshape(c.shape[:-1] + (k, k))
    n = m.sum(axis=(-1, -2))
    diag = np.diagonal(m, axis1=-2, axis2=-1)
    f1 = _ratio(2 * diag, m.sum(axis=-1) + m.sum(axis=-2), 0.0).mean(axis=-1)
    return {"accuracy": _ratio(diag.sum(axis=-1), n), "f1": f1}


def _auc(h: np.ndarray) -> np.ndarray:
    """Binned ROC AUC of (..., 2·B) histograms [negatives by bin, positives by bin]."""
    b = h.shape[-1] // 2
    neg, pos = h[..., :b], h[..., b:]
    below = np.cumsum(neg, axis=-1) - neg  # negatives in lower bins
    # in [0, 1] exactly: the float sums can land one ulp past 1 (a page read "AUC 1.0000000000000002")
    return np.clip(_ratio((pos * (below + 0.5 * neg)).sum(-1), pos.sum(-1) * neg.sum(-1)), 0.0, 1.0)


def _rng(*parts: Any) -> np.random.Generator:
    h = hashlib.sha256()
    for p in parts:
        h.update(np.ascontiguousarray(np.asarray(p, dtype=np.float64)).tobytes())
    return np.random.default_rng(int.from_bytes(h.digest()[:8], "little"))


def _dirichlet(rng: np.random.Generator, alpha: np.ndarray) -> np.ndarray:
    g = rng.gamma(alpha)
    return g / g.sum(axis=-1, keepdims=True)


def _intervals(point: dict[str, float | None], draws: dict[str, np.ndarray]) -> dict[str, float]:
    out: dict[str, float] = {}
    q = (1.0 - LEVEL) / 2.0
    for k, d in draws.items():
        d = d[np.isfinite(d)]
        if len(d) < 10:
            continue
        lo, hi = float(np.quantile(d, q)), float(np.quantile(d, 1.0 - q))
        p = point.get(k)
        if p is not None:
            lo, hi = min(lo, p), max(hi, p)
        out[f"{k}_lo"], out[f"{k}_hi"] = lo, hi
    return out


def confusion_figures(cells: np.ndarray, noise_sd: float, *, rows: int | None = None,
                      draws: int = DRAWS) -> dict[str, float]:
    """Flat figures (wire form) of one released confusion matrix ``cells`` (k·k values,
    [label][prediction], noisy with SD ``noise_sd`` per cell; 0 for exact counts): ``n``, each
    figure, its ``_lo``/``_hi``, and for binary ``predicts_one_class`` (1 when one predicted
    column of the projected matrix is empty, 0 when neither is, left out when the noise cannot
    tell: ``one_class_known``)."""
    v = np.asarray(cells, dtype=np.float64).reshape(-1)
    k = int(round(math.sqrt(len(v))))
    n = released_n(v, rows)
    def proj(x: np.ndarray, total: np.ndarray | float) -> np.ndarray:
        return project_binary(x, total, noise_sd) if k == 2 else project(x, total)

    c = proj(v, n)

    def figs(x: np.ndarray) -> dict[str, np.ndarray]:
        return _binary(x) if k == 2 else _multiclass(x, k)

    point = {name: (float(val) if np.isfinite(val) else None) for name, val in figs(c).items()}
    rng = _rng(v, [noise_sd, n])
    u = v + rng.standard_normal((draws, len(v))) * float(noise_sd)
    u = proj(u, np.clip(np.round(u.sum(-1)), 1.0, float(rows) if rows else np.inf))
    out: dict[str, float] = {"n": n, **{name: val for name, val in point.items() if val is not None}}
    out.update(_intervals(point, figs(_dirichlet(rng, u + PRIOR))))
    if k == 2 and one_class_known(v, noise_sd):
        out["predicts_one_class"] = float(c[0] + c[2] == 0 or c[1] + c[3] == 0)
    return out


def auc_figure(hist: np.ndarray, noise_sd: float, *, n: float, draws: int = DRAWS) -> dict[str, float]:
    """``auc`` with ``auc_lo``/``auc_hi`` from a released (label, score bin) histogram (2·B values),
    projected onto {h ≥ 0, Σh = n}; nothing when a class is empty after the projection."""
    v = np.asarray(hist, dtype=np.float64).reshape(-1)
    h = project(v, n)
    point = float(_auc(h))
    if not math.isfinite(point):
        return {}
    rng = _rng(v, [noise_sd, n])
    u = project(v + rng.standard_normal((draws, len(v))) * float(noise_sd), n)
    return {"auc": point, **_intervals({"auc": point}, {"auc": _auc(_dirichlet(rng, u + PRIOR))})}


def too_wide(lo: float, hi: float) -> bool:
    """The interval spans ``TOO_WIDE`` or more of [0, 1]: no figure, ``TOO_FEW`` instead."""
    return hi - lo >= TOO_WIDE


def union(sites: Sequence[Mapping[str, Any]], *, prefix: str = "") -> dict[str, float] | None:
    """Figures of the union of test splits from the sites' released binary cells: the cells
    add up and so do the noise variances (post-processing). None unless every site sent cells."""
    cells, var, n = np.zeros(4), 0.0, 0.0
    for m in sites:
        got = [m.get(prefix + c) for c in CELLS]
        if any(not isinstance(x, (int, float)) for x in got) or not isinstance(m.get(prefix + "noise_sd"), (int, float)):
            return None
        cells += np.asarray(got, dtype=np.float64)
        var += float(m[prefix + "noise_sd"]) ** 2
        n += float(m.get(prefix + "n") or 0.0)
    if not sites:
        return None
    return confusion_figures(cells, math.sqrt(var), rows=int(n) if n >= 1 else None)


def block(m: Mapping[str, Any], names: tuple[str, ...] = WITH_CI, *, prefix: str = "") -> dict[str, Any]:
    """The result JSON's form of flat figures: ``{name: value or None, "ci": {name: [lo, hi]},
    "withheld": {name: TOO_FEW}}``; a figure whose interval is too wide has value None. Under DP
    (the release's ``noise_sd`` > 0) a figure that came without an interval is withheld too (an
    AUC whose noisy histogram left a class empty in most draws): every table, page and export
    reads this block, so none can show a bare noisy number."""
    out: dict[str, Any] = {}
    ci: dict[str, list[float]] = {}
    withheld: dict[str, str] = {}
    sd = m.get(prefix + "noise_sd")
    noisy = isinstance(sd, (int, float)) and not isinstance(sd, bool) and sd > 0
    for name in names:
        v, lo, hi = m.get(prefix + name), m.get(f"{prefix}{name}_lo"), m.get(f"{prefix}{name}_hi")
        if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
            ci[name] = [float(lo), float(hi)]
            if too_wide(float(lo), float(hi)):
                withheld[name] = TOO_FEW
                v = None
        elif noisy and v is not None:
            withheld[name] = TOO_FEW
            v = None
            out[name] = None
        if v is not None or name in ci:
            out[name] = v
    if ci:
        out["ci"] = ci
    if withheld:
        out["withheld"] = withheld
    return out


def show(value: Any, ci: Any = None, *, percent: bool = False, digits: int = 2, withheld: Any = None) -> str:
    """One figure for people: "72.7 % (51–89)", "0.74 (0.61–0.85)", "–", or ``TOO_FEW``."""
    if withheld:
        return TOO_FEW
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "–"
    if percent:
        text = f"{100 * value:.1f} %"
        if ci:
            text += f" ({100 * ci[0]:.0f}–{100 * ci[1]:.0f})"
        return text
    text = f"{value:.{digits}f}"
    if ci:
        text += f" ({ci[0]:.{digits}f}–{ci[1]:.{digits}f})"
    return text


def shown(m: Mapping[str, Any] | None, name: str, *, percent: bool = False, digits: int = 2) -> str:
    """``show`` for figure ``name`` of a result block (``block``'s form)."""
    m = m or {}
    return show(m.get(name), (m.get("ci") or {}).get(name), percent=percent, digits=digits,
                withheld=(m.get("withheld") or {}).get(name))


__all__ = ["BINARY", "CELLS", "ONE_CLASS_SDS", "TOO_FEW", "auc_figure", "block", "confusion_figures", "project",
           "project_binary", "show", "shown", "too_wide", "union"]
