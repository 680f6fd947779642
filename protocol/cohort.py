"""The cohort before training: a "Table 1" of a dataset's columns, released as one DP vector.

One home for the arithmetic every party shares: the site (``site_worker/stats.py``) builds
the exact vector and adds the noise; the coordinator, the simulator and the dashboard read
figures off released vectors (``table``) and pool sites by summing them (``pool``).

The layout is a function of public things only: the experiment's ``dataset`` block (features,
categorical lists, ``bounds``, target, task) and the number of histogram bins. Per column:

* numeric with public bounds ``[lo, hi]`` (``dataset.bounds``): ``missing``, ``bins`` histogram
  cells over ``[lo, hi]`` (values outside are clipped to the bounds), ``sum`` of
  ``u = (x - lo) / (hi - lo)`` and ``sumsq`` of ``u²``. One row changes either ``missing`` by 1
  or one cell by 1 and the two sums by at most 1 each: L2 sensitivity² 3;
* numeric without bounds: ``missing`` only (a mean needs public bounds to be bounded): 1;
* categorical: one cell per listed category, ``other`` (a value not listed) and ``missing``:
  one row moves one cell: 1;
* the outcome (``dataset.target``): binary ``positive`` and ``missing`` (1); multiclass one cell
  per class and ``missing`` (1); regression as a numeric column (its bounds, if given).

The vector's L2 sensitivity is Δ = √(Σ per-column sensitivity²) under add/remove-one-row
adjacency; the site adds N(0, (σ_s·Δ)²) to every coordinate (σ_s = the site's
``stats_noise_multiplier``): one Gaussian mechanism, the accountant entry ``(σ_s, 1, 1)``.
The row count ``n`` is the one the site already announces in its ``SiteHello`` (public), so
it is not in the vector; everything shown is post-processing of the vector and ``n``.

Intervals (95 %) are for the cohort's own value (the rows the sites hold), and cover the DP
noise: a Monte Carlo over the known Gaussian noise, re-drawn around the released vector and
pushed through the same post-processing, seeded from the released numbers (anyone holding
the release gets the same interval); percentiles 2.5 and 97.5. Median and quartiles come
from the histogram, interpolated within a bin; their intervals are widened by one bin width
each side, since the true quantile can lie anywhere in the bin the histogram puts it in.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import numpy as np

STATS_MODES = ("dp", "exact", "none")
DEFAULT_BINS = 20
MAX_BINS = 200
MAX_STATS_VALUES = 65_536  # values one release may carry (protocol/bounds.py)
_DRAWS = 2000  # Monte Carlo draws per interval

Kind = Literal["numeric", "categorical", "outcome"]


class CohortError(ValueError):
    """The experiment cannot describe a cohort (no features, a tabular dataset missing); names the key."""


@dataclass(frozen=True)
class Column:
    """One row of Table 1. ``cells`` are its coordinates in the released vector."""

    name: str
    kind: Kind
    bounds: tuple[float, float] | None = None  # numeric: public [lo, hi]
    categories: tuple[str, ...] = ()  # categorical: listed categories; outcome: class names
    task: str = "binary"  # outcome only: binary | multiclass | regression

    @property
    def numeric(self) -> bool:
        return self.kind == "numeric" or (self.kind == "outcome" and self.task == "regression")

    def cells(self, bins: int) -> list[str]:
        if self.numeric:
            return ["missing", *(f"bin{i}" for i in range(bins)), "sum", "sumsq"] if self.bounds else ["missing"]
        if self.kind == "categorical":
            return [*(f"cat:{c}" for c in self.categories), "other", "missing"]
        if self.task == "binary":
            return ["positive", "missing"]
        return [*(f"class:{c}" for c in self.categories), "missing"]

    def sensitivity_sq(self) -> float:
        """Squared L2 change of this column's cells when one row is added or removed."""
        return 3.0 if self.numeric and self.bounds else 1.0


@dataclass(frozen=True)
class CohortSpec:
    """What a StatsTask asks for, from public settings only."""

    dataset: str
    columns: tuple[Column, ...]
    bins: int = DEFAULT_BINS

    def layout(self) -> list[tuple[str, str]]:
        """(column, cell) for every coordinate of the vector, in order."""
        return [(c.name, cell) for c in self.columns for cell in c.cells(self.bins)]

    def size(self) -> int:
        return sum(len(c.cells(self.bins)) for c in self.columns)

    def sensitivity(self) -> float:
        """L2 sensitivity Δ of the whole vector (add/remove one row)."""
        return math.sqrt(sum(c.sensitivity_sq() for c in self.columns))

    def digest(self) -> str:
        """A short hash of the layout, so a release is never read with another layout."""
        h = hashlib.sha256(repr((self.dataset, self.bins, self.columns)).encode())
        return h.hexdigest()[:16]

    def offsets(self) -> dict[str, tuple[int, int]]:
        out, at = {}, 0
        for c in self.columns:
            k = len(c.cells(self.bins))
            out[c.name] = (at, at + k)
            at += k
        return out


def spec_from_experiment(experiment: Any, *, bins: int = DEFAULT_BINS) -> CohortSpec:
    """The cohort layout of a validated ``protocol.config.Experiment``."""
    data = experiment.dataset
    if data.kind != "tabular":
        raise CohortError("dataset.kind: a cohort table needs a tabular dataset")
    if data.features is None:
        raise CohortError("dataset.features: list the columns the cohort table describes")
    if not 2 <= bins <= MAX_BINS:
        raise CohortError(f"bins: must be in [2, {MAX_BINS}], got {bins}")
    bounds = dict(getattr(data, "bounds", None) or {})
    cols: list[Column] = []
    for f in data.features:
        if f in data.categorical:
            cols.append(Column(f, "categorical", categories=tuple(data.categorical[f])))
        else:
            b = bounds.get(f)
            cols.append(Column(f, "numeric", bounds=(float(b[0]), float(b[1])) if b else None))
    task = str(data.task or "binary")
    if data.target:
        if task == "regression":
            b = bounds.get(data.target)
            cols.append(Column(data.target, "outcome", bounds=(float(b[0]), float(b[1])) if b else None, task=task))
        elif task == "multiclass":
            k = int(data.num_classes or 2)
            cols.append(Column(data.target, "outcome", categories=tuple(str(i) for i in range(k)), task=task))
        else:
            cols.append(Column(data.target, "outcome", task="binary"))
    spec = CohortSpec(dataset=str(data.name), columns=tuple(cols), bins=bins)
    if spec.size() > MAX_STATS_VALUES:
        raise CohortError(f"dataset.features: the cohort release would carry {spec.size()} values, more than "
                          f"{MAX_STATS_VALUES}; describe fewer columns or use fewer bins")
    return spec


def exact_vector(spec: CohortSpec, columns: Mapping[str, Any]) -> np.ndarray:
    """The exact vector from parsed columns: numeric columns as float arrays (NaN = missing),
    categorical columns as sequences of str or None, the binary outcome as 0/1/NaN, the
    multiclass outcome as class indices or NaN. Runs at the site, on its own rows."""
    parts: list[np.ndarray] = []
    for c in spec.columns:
        values = columns[c.name]
        if c.numeric:
            x = np.asarray(values, dtype=np.float64)
            miss = np.isnan(x)
            part = [float(miss.sum())]
            if c.bounds:
                lo, hi = c.bounds
                u = np.clip((x[~miss] - lo) / (hi - lo), 0.0, 1.0)
                b = np.minimum((u * spec.bins).astype(np.int64), spec.bins - 1)
                part += list(np.bincount(b, minlength=spec.bins).astype(np.float64))
                part += [float(u.sum()), float((u * u).sum())]
            parts.append(np.array(part))
        elif c.kind == "categorical":
            counts = {cat: 0.0 for cat in c.categories}
            other = missing = 0.0
            for v in values:
                if v is None:
                    missing += 1
                elif v in counts:
                    counts[v] += 1
                else:
                    other += 1
            parts.append(np.array([*counts.values(), other, missing]))
        else:
            y = np.asarray(values, dtype=np.float64)
            miss = np.isnan(y)
            if c.task == "binary":
                parts.append(np.array([float((y[~miss] > 0.5).sum()), float(miss.sum())]))
            else:
                k = len(c.categories)
                idx = y[~miss].astype(np.int64)
                parts.append(np.concatenate([np.bincount(idx.clip(0, k - 1), minlength=k).astype(np.float64),
                                             [float(miss.sum())]]))
    return np.concatenate(parts) if parts else np.zeros(0)


# ------------------------------------------------------------------------------ post-processing

def _seed(v: np.ndarray, n: float, sd: float) -> int:
    h = hashlib.sha256(np.asarray(v, dtype=np.float64).tobytes() + repr((n, sd)).encode()).digest()
    return int.from_bytes(h[:8], "little")


def _quantile(hist: np.ndarray, p: float, lo: float, hi: float) -> np.ndarray:
    """Quantile p of (draws x bins) non-negative histograms, interpolated within bins."""
    h = np.maximum(hist, 0.0)
    tot = h.sum(axis=-1, keepdims=True)
    cum = np.cumsum(h, axis=-1)
    target = p * tot
    idx = np.minimum((cum < target).sum(axis=-1), h.shape[-1] - 1)
    below = np.take_along_axis(cum, idx[..., None], -1)[..., 0] - np.take_along_axis(h, idx[..., None], -1)[..., 0]
    inbin = np.take_along_axis(h, idx[..., None], -1)[..., 0]
    frac = np.where(inbin > 0, (target[..., 0] - below) / np.where(inbin > 0, inbin, 1.0), 0.5)
    width = (hi - lo) / h.shape[-1]
    out = lo + (idx + np.clip(frac, 0.0, 1.0)) * width
    return np.where(tot[..., 0] > 0, out, np.nan)


def _figure(point: float, draws: np.ndarray, widen: float = 0.0, lo: float = -math.inf,
            hi: float = math.inf) -> dict[str, Any]:
    d = draws[np.isfinite(draws)]
    if not math.isfinite(point) or d.size == 0:
        return {"value": None, "ci": None}
    a, b = (float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))) if d.size > 1 else (point, point)
    a, b = min(a, point), max(b, point)
    return {"value": float(point), "ci": [max(lo, a - widen), min(hi, b + widen)]}


def _column_figures(c: Column, v: np.ndarray, draws: np.ndarray, n: float, bins: int) -> dict[str, Any]:
    """Figures of one column from its cells ``v`` and Monte Carlo ``draws`` (draws x cells)."""
    both = np.vstack([v[None, :], draws])  # row 0: the release itself
    raw_miss = both[:, 0] if c.numeric else both[:, -1]  # numeric: the first cell; the others: the last
    miss = np.clip(raw_miss, 0.0, n)
    out: dict[str, Any] = {"name": c.name, "kind": c.kind}
    out["missing"] = _figure(miss[0], miss[1:], lo=0.0, hi=n)
    out["missing_share"] = _figure(miss[0] / n if n else math.nan, miss[1:] / n if n else miss[1:] * math.nan,
                                   lo=0.0, hi=1.0)
    # Denominators from the unclipped noisy count: clipping a count whose truth is 0 at 0 would bias
    # every share and mean of the column (the noise is symmetric, the clipped count is not).
    observed = np.maximum(n - raw_miss, 1.0)
    if c.numeric:
        out["task"] = c.task if c.kind == "outcome" else None
        if c.bounds:
            lo, hi = c.bounds
            hist = both[:, 1:1 + bins]
            s, q = both[:, 1 + bins], both[:, 2 + bins]
            mu = np.clip(s / observed, 0.0, 1.0)
            var = np.maximum(q / observed - mu * mu, 0.0) * observed / np.maximum(observed - 1.0, 1.0)
            mean, sd = lo + (hi - lo) * mu, (hi - lo) * np.sqrt(var)
            width = (hi - lo) / bins
            out["bounds"] = [lo, hi]
            out["mean"] = _figure(mean[0], mean[1:], lo=lo, hi=hi)
            out["sd"] = _figure(sd[0], sd[1:], lo=0.0)
            for name, p in (("median", 0.5), ("q1", 0.25), ("q3", 0.75)):
                qv = _quantile(hist, p, lo, hi)
                out[name] = _figure(float(qv[0]), qv[1:], widen=width, lo=lo, hi=hi)
            out["histogram"] = {"edges": [lo + i * width for i in range(bins + 1)],
                                "counts": [float(max(0.0, x)) for x in hist[0]]}
        return out
    if c.kind == "categorical":
        k = len(c.categories)
        cells = np.maximum(both[:, :k + 1], 0.0)
        cats = []
        for i, name in enumerate([*c.categories, "(not listed)"]):
            share = cells[:, i] / observed
            cats.append({"category": name, "count": _figure(both[0, i], both[1:, i], lo=0.0, hi=n),
                         "share": _figure(min(1.0, share[0]), np.minimum(share[1:], 1.0), lo=0.0, hi=1.0)})
        out["categories"] = cats
        return out
    out["task"] = c.task
    if c.task == "binary":
        pos = np.clip(both[:, 0], 0.0, None)
        prev = np.minimum(pos / observed, 1.0)
        out["positive"] = _figure(both[0, 0], both[1:, 0], lo=0.0, hi=n)
        out["prevalence"] = _figure(prev[0], prev[1:], lo=0.0, hi=1.0)
        return out
    classes = []
    for i, name in enumerate(c.categories):
        share = np.minimum(np.maximum(both[:, i], 0.0) / observed, 1.0)
        classes.append({"class": name, "count": _figure(both[0, i], both[1:, i], lo=0.0, hi=n),
                        "share": _figure(share[0], share[1:], lo=0.0, hi=1.0)})
    out["classes"] = classes
    return out


def table(spec: CohortSpec, vector: Sequence[float] | np.ndarray, *, n: float, noise_sd: float) -> dict[str, Any]:
    """Table 1 figures of one released vector (a site's, or the pooled sum), each with its 95 %
    interval. ``n`` is the public row count; ``noise_sd`` the per-coordinate noise SD (0: exact).
    Pure post-processing: no privacy cost."""
    v = np.asarray(vector, dtype=np.float64)
    if v.shape != (spec.size(),):
        raise ValueError(f"a cohort release for this layout has {spec.size()} values, got {v.shape}")
    rng = np.random.default_rng(_seed(v, n, noise_sd))
    draws = v[None, :] + (rng.standard_normal((_DRAWS, v.size)) * noise_sd if noise_sd > 0 else 0.0)
    if noise_sd <= 0:
        draws = np.repeat(v[None, :], 2, axis=0)
    cols = []
    for c in spec.columns:
        a, b = spec.offsets()[c.name]
        cols.append(_column_figures(c, v[a:b], draws[:, a:b], float(n), spec.bins))
    return {"n": float(n), "noise_sd": float(noise_sd), "columns": cols}


def pool(releases: Sequence[tuple[Sequence[float], float, float]]) -> tuple[np.ndarray, float, float]:
    """Sum sites' releases ``(vector, n, noise_sd)``: the pooled vector, n and noise SD
    (independent Gaussian noise: variances add). Post-processing of the releases."""
    if not releases:
        raise ValueError("nothing to pool")
    vec = np.sum([np.asarray(v, dtype=np.float64) for v, _, _ in releases], axis=0)
    return vec, float(sum(n for _, n, _ in releases)), float(math.sqrt(sum(sd * sd for _, _, sd in releases)))


__all__ = ["CohortError", "CohortSpec", "Column", "DEFAULT_BINS", "MAX_BINS", "MAX_STATS_VALUES", "STATS_MODES",
           "exact_vector", "pool", "spec_from_experiment", "table"]
