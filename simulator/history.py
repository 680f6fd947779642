"""Per-round detail read back from the coordinator's state after a simulated run.

The coordinator commits every round with its checkpoint (hash in the database) and
per-site metrics. From those the simulator adds to each round of the result:

* ``per_site`` - each site's validation metrics of that round (for the report's
  per-site curves);
* ``t_s`` - seconds from the run's creation to the round's commit;
* ``holdout`` - the round's global model scored on the union of the rows the simulator
  held back from every site, so synchronous and asynchronous runs compare on the same
  yardstick (time to a held-out accuracy), whatever each aggregator reports as its round
  metric. (``test`` is reserved for the sites' own fixed test splits.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_VAL_KEYS = ("loss", "accuracy", "auc", "f1")


def _site_metrics(m: dict[str, Any]) -> dict[str, float]:
    """Prefer the federated evaluation of the new global model (``eval_*``), else after-training."""
    out = {}
    for k in _VAL_KEYS:
        v = m.get(f"eval_{k}", m.get(k))
        if isinstance(v, (int, float)):
            out[k] = float(v)
    return out


def enrich_rounds(doc: dict[str, Any], *, state_dir: Path, scorer: Any | None) -> None:
    """Add ``per_site``, ``t_s`` and (with ``scorer(weights) -> metrics``) ``holdout`` to ``doc["rounds"]``."""
    from coordinator.checkpoints import load_tensors
    from coordinator.state import StateStore

    store = StateStore(state_dir)
    try:
        run = store.run(doc["run_id"])
        rows = {int(r["round"]): r for r in store.rounds(doc["run_id"])}
    finally:
        store.close()
    created = float(run.get("created_at") or 0.0)
    for r in doc.get("rounds", []):
        row = rows.get(int(r["round"]))
        if row is None:
            continue
        metrics = row.get("metrics") or {}
        per_site = {s: _site_metrics(m) for s, m in (metrics.get("per_site") or {}).items()}
        if per_site:
            r["per_site"] = per_site
        if row.get("committed_at") and created:
            r["t_s"] = float(row["committed_at"]) - created
        if scorer is not None and row.get("checkpoint_path"):
            weights = load_tensors(Path(state_dir) / row["checkpoint_path"], sha256=row.get("checkpoint_sha256"))
            scored = scorer(weights)
            r["holdout"] = {k: scored[k] for k in _VAL_KEYS if k in scored}


def time_to(doc: dict[str, Any], metric: str, target: float) -> float | None:
    """Seconds until a round's global model first reached ``target`` on the held-out rows (None: never)."""
    for r in doc.get("rounds", []):
        v = (r.get("holdout") or {}).get(metric)
        if v is not None and v >= target and r.get("t_s") is not None:
            return float(r["t_s"])
    return None
