"""A site's answer to a ``StatsTask``: its cohort table, released as its ``stats`` policy says.

``dp`` (the default): one Gaussian mechanism on the vector of bounded counts and sums that
``protocol.cohort`` lays out (L2 sensitivity Δ = √(Σ per column: 3 for a numeric column with
public bounds, 1 otherwise)), noise N(0, (σ_s·Δ)²) per coordinate from the site's secret
generator (``site_worker/secure_rng.py``), σ_s = ``stats_noise_multiplier``: the ledger entry
``(σ_s, 1, 1)``, reserved before anything is computed and committed before the reply exists.
``exact``: the exact vector (a leak the policy allows, named in docs/threat-model.md).
``none``: declined with a public reason. The row count ``n`` is the one the hello announced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from protocol.cohort import CohortError, CohortSpec, exact_vector, spec_from_experiment
from protocol.config import ConfigError, load_experiment
from protocol.dp_plan import stats_entries
from protocol.messages import Declined, Envelope, StatsResult, StatsTask
from site_worker.approvals import experiment_hash
from site_worker.data import DataError, _category_key, announced_rows, encode_labels, read_table, target_rule, to_numeric
from site_worker.dp import noise_source, release_inputs
from site_worker.ledger import BudgetExceeded

if TYPE_CHECKING:
    from site_worker.handlers import TaskHandler

log = structlog.get_logger(__name__)


def _decline(env: Envelope, reason: str, detail: str, figures: dict[str, float] | None = None) -> Declined:
    log.warning("stats_declined", task_id=env.message_id, reason=reason, detail=detail)
    return Declined(task_id=env.message_id, reason=reason, detail=detail, figures=figures or {})  # type: ignore[arg-type]


def columns_of(frame: Any, spec: CohortSpec, dataset_spec: Any) -> dict[str, Any]:
    """Each cohort column of the site's own rows, parsed as training parses them (missing codes,
    category keys, ``positive_if``)."""
    missing: dict[str, list[float]] = dict(getattr(dataset_spec, "missing_values", None) or {})
    out: dict[str, Any] = {}
    for c in spec.columns:
        if c.name not in frame.columns:
            raise DataError(c.name, "column is missing from the dataset")
        series = frame[c.name]
        if c.kind == "categorical":
            listed = {(_category_key(v) or ""): v for v in c.categories}
            out[c.name] = [None if k is None else str(listed.get(k, k)) for k in series.map(_category_key)]
        elif c.kind == "outcome" and c.task != "regression":
            k = len(c.categories) or 2
            out[c.name] = encode_labels(series, c.name, c.task, k, target_rule(dataset_spec))
        else:
            vals = to_numeric(series, c.name).to_numpy(dtype=np.float64)
            if c.name in missing:
                vals = np.where(np.isin(vals, missing[c.name]), np.nan, vals)
            out[c.name] = vals
    return out


def handle_stats(handler: TaskHandler, env: Envelope, task: StatsTask) -> StatsResult | Declined:
    """The reply to one verified StatsTask (never raises for a bad task: a Declined says why)."""
    config, policy = handler.config, handler.config.policy
    if policy.stats == "none":
        return _decline(env, "policy", 'stats: this site withholds cohort statistics (policy.stats = "none")')
    try:
        exp = load_experiment(task.experiment)
        spec = spec_from_experiment(exp, bins=task.bins)
    except (ConfigError, CohortError) as e:
        return _decline(env, "policy", f"invalid experiment: {e}")
    if task.dataset not in config.datasets:
        return _decline(env, "data", f"dataset {task.dataset!r} is not offered by this site "
                                     f"(offered: {', '.join(sorted(config.datasets))})")
    if policy.require_approval and not handler.approvals.approved(experiment_hash(exp.to_wire(), task.dataset)):
        return _decline(env, "policy", "require_approval: this experiment is not approved at this site; its operator "
                                       "runs `fedbus site approve EXPERIMENT.json`")
    if spec.size() > policy.max_release_values:
        return _decline(env, "policy", f"max_release_values: the cohort release has {spec.size()} values, this "
                                       f"site's policy allows {policy.max_release_values}")
    source = config.datasets[task.dataset]
    try:
        rows = announced_rows(source)
    except DataError as e:
        return _decline(env, "data", str(e))
    delta = policy.site_delta(rows)
    entries = stats_entries(policy)
    epsilon = None
    if entries:
        try:
            _spent, epsilon = handler.ledger.reserve(
                task.dataset, release_id=env.message_id, kind="stats", entries=entries, delta=delta,
                accountant=policy.accountant, max_epsilon=policy.max_epsilon, run_id=env.run_id)
        except BudgetExceeded as e:
            figures = {k: v for k, v in e.figures.items() if k in ("epsilon_spent", "max_epsilon", "delta")}
            return _decline(env, "budget", e.detail, figures)
    try:
        cols = columns_of(read_table(source), spec, exp.dataset)
        exact = exact_vector(spec, cols)
    except DataError as e:
        handler.ledger.cancel(task.dataset, env.message_id)  # nothing computed left the site
        return _decline(env, "data", str(e))
    if policy.stats == "dp":
        sd = policy.stats_noise_multiplier * spec.sensitivity()
        rng = noise_source(policy, task_seed=0, purpose="stats", inputs=lambda: release_inputs(exact.tobytes()))
        values = exact + rng.standard_normal(len(exact)) * sd
        handler.ledger.commit(task.dataset, env.message_id)  # durable before the reply exists
    else:
        sd, values = 0.0, exact
    log.info("stats_released", task_id=env.message_id, mode=policy.stats, values=len(values), epsilon=epsilon)
    return StatsResult(task_id=env.message_id, values=tuple(float(v) for v in values), n=int(rows),
                       noise_sd=float(sd), mode=policy.stats, layout=spec.digest(),
                       epsilon=epsilon, delta=delta if policy.stats == "dp" else None,
                       accountant=policy.accountant if policy.stats == "dp" else None)
