"""``fedbus config new``: an experiment from a dataset file or a site's catalogue entry.

From a file (on the machine that holds it): column types and categories are read from
the data. From a site's catalogue (at the coordinator): only what the site announced in
its hello (names, types, row count, target), never values, so categorical columns,
whose categories a hello does not carry, are left out and named in a note.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from protocol.experiment_template import DEFAULT_EPSILON, new_experiment


def _target_encoding(values: list[str]) -> tuple[str, int, str | None]:
    """(task, num_classes, positive_if) for a target's distinct values; ValueError if unusable."""
    from site_worker.columns import task_of

    task, k = task_of(values)
    if task == "binary":
        try:
            nums = sorted(float(v) for v in values)
        except ValueError:
            raise ValueError(f"the binary target holds {values}: encode it as 0/1 in the file") from None
        if nums != [0.0, 1.0]:
            return task, 2, f">{nums[0]:g}"  # the larger value is the positive class
    return task, k, None


def _positive(df: pd.DataFrame, target: str, values: list[str]) -> pd.Series:
    """The binary target as booleans: the larger of its two values is the positive class."""
    from site_worker.data import _category_key

    try:
        top = max(values, key=float)
    except ValueError:
        top = max(values)
    keys = df[target].map(_category_key)
    return (keys == top).where(keys.notna())


def experiment_from_file(path: Path, *, target: str, exclude: list[str], name: str | None,
                         rounds: int = 10, dataset_name: str | None = None, keep: list[str] | None = None,
                         epsilon: float = DEFAULT_EPSILON, rows_per_site: int | None = None,
                         ) -> tuple[dict[str, Any], list[str]]:
    """The experiment document and notes for the operator (one line per column left out).

    Columns that leak the outcome (``fedbus.leak_screen``) are left out unless in ``keep``."""
    from fedbus.leak_screen import screen
    from site_worker.columns import plan_columns, read_file, safe_key
    from site_worker.data import DataError

    if not path.exists():
        raise ValueError(f"--dataset {path} does not exist")
    keep = list(keep or [])
    try:
        df = read_file(path, target=target)
        missing = [c for c in keep if c not in df.columns]
        if missing:
            raise ValueError(f"--keep {missing[0]}: no such column in {path} (columns: {', '.join(map(str, df.columns))})")
        plan = plan_columns(df, target=target, exclude=tuple(exclude))
        task, k, rule = _target_encoding(plan.target_values)
        numeric = [c for c in plan.features if c not in plan.categorical]
        positive = _positive(df, target, plan.target_values) if task == "binary" else None
        leaks = screen(df[[c for c in df.columns if c not in plan.excluded]], target=target, numeric=numeric,
                       positive=positive, keep=tuple(keep))
    except DataError as e:
        raise ValueError(f"--dataset {path}: {e}") from None
    excluded = {**plan.excluded, **{c: f"{why} (--keep {c} to use it)" for c, why in leaks.items()}}
    features = [c for c in plan.features if c not in leaks]
    categorical = {c: v for c, v in plan.categorical.items() if c not in leaks}
    if not features:
        raise ValueError(f"--dataset {path}: no usable feature column besides the target {target!r}"
                         + (f" (left out as leaks: {', '.join(leaks)}; --keep COLUMN to use one)" if leaks else ""))
    key = safe_key(dataset_name or path.stem)
    notes = [f"left out {c}: {why}" for c, why in excluded.items()]
    if rule:
        notes.append(f"binary target {target!r} holds {plan.target_values}: dataset.positive_if = {rule!r}")
    left_out = (f"Left out as outcome leaks: {', '.join(leaks)}. " if leaks else "")
    doc = new_experiment(name=name or key, dataset=key, target=target, features=features,
                         categorical=categorical, task=task, num_classes=k, positive_if=rule,
                         exclude=list(excluded), rows=plan.rows, rounds=rounds,
                         rows_per_site=rows_per_site if rows_per_site is not None else plan.rows,
                         epsilon=epsilon, left_out=left_out)
    notes.append(f"sites offer this file as [datasets.{key}] with target = {target!r}")
    return doc, notes


def experiment_from_catalogue(state: Path, site: str, dataset: str, *, target: str | None, exclude: list[str],
                              name: str | None, rounds: int = 10, epsilon: float = DEFAULT_EPSILON,
                              rows_per_site: int | None = None) -> tuple[dict[str, Any], list[str]]:
    """From SITE's announced ``dataset`` (its SiteHello as stored in the coordinator's state)."""
    from coordinator.state import StateStore

    if not (state / "coordinator.db").exists():
        raise ValueError(f"{state} holds no coordinator state (no coordinator.db): check --state")
    store = StateStore(state)
    try:
        rows = {s["site_id"]: s for s in store.sites()}
    finally:
        store.close()
    if site not in rows:
        raise ValueError(f"site {site!r} is not enrolled in {state} (enrolled: {', '.join(sorted(rows)) or 'none'})")
    hello = rows[site]["hello"] or {}
    offered = {d["name"]: d for d in hello.get("datasets") or []}
    if dataset not in offered:
        have = ", ".join(sorted(offered)) or "none: start the site so its hello reaches the coordinator"
        raise ValueError(f"site {site!r} announced no dataset {dataset!r} (announced: {have})")
    info = offered[dataset]
    tgt = target or info["target"]
    if tgt != info["target"]:
        raise ValueError(f"--target {tgt!r}: site {site!r} trains {dataset!r} on target {info['target']!r}")
    types: dict[str, str] = dict(info.get("feature_types") or {})
    from fedbus.leak_screen import duration_reason, identifier_reason

    # Only names reach the coordinator: the name checks run here, the value checks at the site's file.
    leaks = {c: why for c in info["columns"] if c != tgt and c not in exclude
             and (why := duration_reason(c) or identifier_reason(c, None))}
    exclude = [*exclude, *leaks]
    features = [c for c in info["columns"] if c != tgt and c not in exclude and types.get(c) == "numeric"]
    skipped = [c for c in info["columns"] if c != tgt and c not in exclude and types.get(c) != "numeric"]
    if not features:
        raise ValueError(f"site {site!r} announced no numeric column in {dataset!r} besides the target")
    notes = [f"left out {c}: {why}" for c, why in leaks.items()]
    if skipped:
        notes.append(f"left out {', '.join(skipped)}: categorical, and a hello carries no category values; add "
                     "them to dataset.categorical (with the categories the site holds) and widen the input layer")
    notes.append("the target's classes are not in the catalogue: assumed binary 0/1; edit dataset.task if not")
    doc = new_experiment(name=name or dataset, dataset=dataset, target=tgt, features=features, categorical={},
                         task="binary", num_classes=2, exclude=skipped + list(exclude), rows=info.get("rows"),
                         rounds=rounds, rows_per_site=rows_per_site, epsilon=epsilon,
                         left_out=f"Left out as outcome leaks: {', '.join(leaks)}. " if leaks else "")
    return doc, notes
