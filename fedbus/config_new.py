"""``fedbus config new``: an experiment from a dataset file or a site's catalogue entry.

From a file (on the machine that holds it): column types and categories are read from
the data. From a site's catalogue (at the coordinator): only what the site announced in
its hello (names, types, row count, target), never values, so categorical columns,
whose categories a hello does not carry, are left out and named in a note.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from protocol.experiment_template import new_experiment


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


def experiment_from_file(path: Path, *, target: str, exclude: list[str], name: str | None,
                         rounds: int = 10, dataset_name: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """The experiment document and notes for the operator."""
    from site_worker.columns import plan_columns, read_file, safe_key
    from site_worker.data import DataError

    if not path.exists():
        raise ValueError(f"--dataset {path} does not exist")
    try:
        plan = plan_columns(read_file(path, target=target), target=target, exclude=tuple(exclude))
    except DataError as e:
        raise ValueError(f"--dataset {path}: {e}") from None
    if not plan.features:
        raise ValueError(f"--dataset {path}: no usable feature column besides the target {target!r}")
    task, k, rule = _target_encoding(plan.target_values)
    key = safe_key(dataset_name or path.stem)
    notes = [f"left out {c}: {why}" for c, why in plan.excluded.items()]
    if rule:
        notes.append(f"binary target {target!r} holds {plan.target_values}: dataset.positive_if = {rule!r}")
    doc = new_experiment(name=name or key, dataset=key, target=target, features=plan.features,
                         categorical=plan.categorical, task=task, num_classes=k, positive_if=rule,
                         exclude=[c for c in plan.excluded], rows=plan.rows, rounds=rounds)
    notes.append(f"sites offer this file as [datasets.{key}] with target = {target!r}")
    return doc, notes


def experiment_from_catalogue(state: Path, site: str, dataset: str, *, target: str | None, exclude: list[str],
                              name: str | None, rounds: int = 10) -> tuple[dict[str, Any], list[str]]:
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
    features = [c for c in info["columns"] if c != tgt and c not in exclude and types.get(c) == "numeric"]
    skipped = [c for c in info["columns"] if c != tgt and c not in exclude and types.get(c) != "numeric"]
    if not features:
        raise ValueError(f"site {site!r} announced no numeric column in {dataset!r} besides the target")
    notes = []
    if skipped:
        notes.append(f"left out {', '.join(skipped)}: categorical, and a hello carries no category values; add "
                     "them to dataset.categorical (with the categories the site holds) and widen the input layer")
    notes.append("the target's classes are not in the catalogue: assumed binary 0/1; edit dataset.task if not")
    doc = new_experiment(name=name or dataset, dataset=dataset, target=tgt, features=features, categorical={},
                         task="binary", num_classes=2, exclude=skipped + list(exclude), rows=info.get("rows"),
                         rounds=rounds)
    return doc, notes
