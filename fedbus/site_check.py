"""``fedbus site check``: everything a site needs before it joins, one line per check.

Config, key files and their modes, broker login and read permission on the site's own
queue, the coordinator's key, and with an experiment: the site policy, each dataset
file against it (target, features, categories, rows) and the ε the whole run would
cost this site on top of what its ledger already holds. Nothing is sent to anyone.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from protocol.config import Experiment
    from site_worker.config import DatasetSource, SiteConfig


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.name}: {self.detail}"


def _mode_ok(path: Path) -> tuple[bool, str]:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return False, f"{path} has mode {mode:o}; others can read it: chmod 600 {path}"
    return True, f"{path} (mode {mode:o})"


def run_checks(config: Path, experiment: Path | None, *, broker_timeout_s: float = 20.0) -> list[Check]:
    """All checks in order; later ones are skipped when the config itself is unusable."""
    from site_worker.config import SiteConfigError, load_site_config

    out: list[Check] = []
    try:
        cfg = load_site_config(config)
    except SiteConfigError as e:
        return [Check("config", False, f"{config}: {e}")]
    out.append(Check("config", True, f"{config}: site {cfg.site_id}, federation {cfg.federation}, "
                                     f"datasets {', '.join(sorted(cfg.datasets))}"))
    out.append(_check_key(cfg))
    out.extend(_check_secret_files(config))
    out.append(_check_coordinator_key(cfg))
    out.append(_check_broker(cfg, broker_timeout_s))
    if experiment is not None:
        out.extend(_check_experiment(cfg, experiment))
    else:  # always open the data: a misspelt target or a missing file fails here, not at the first task
        out.extend(_check_data_file(name, src) for name, src in sorted(cfg.datasets.items()))
    return out


def _check_data_file(name: str, src: DatasetSource) -> Check:
    """Open one dataset file and check its target and feature columns (no experiment needed)."""
    from site_worker.columns import plan_columns
    from site_worker.data import DataError, read_table

    label = f"dataset {name}"
    if src.format == "npy":
        import numpy as np

        try:
            x = np.load(src.path, mmap_mode="r", allow_pickle=False)
            y = np.load(src.labels_path, mmap_mode="r", allow_pickle=False) if src.labels_path else None
        except (OSError, ValueError) as e:
            return Check(label, False, f"{src.path}: {e}")
        if y is None or len(y) != len(x):
            return Check(label, False, f"{src.path}: labels_path must hold one label per row of {src.path}")
        return Check(label, True, f"{src.path}: {len(x)} rows of shape {tuple(x.shape[1:])}, labels {src.labels_path}")
    try:
        plan = plan_columns(read_table(src), target=src.target)
    except DataError as e:
        return Check(label, False, f"{src.path}: {e}")
    except OSError as e:
        return Check(label, False, f"{src.path}: cannot read it ({e}); fix path under [datasets.{name}]")
    missing = [c for c in src.columns if c not in plan.features and c not in plan.excluded]
    if missing:
        return Check(label, False, f"{src.path}: [datasets.{name}.columns] names {', '.join(missing)}, not in the file")
    if not plan.features:
        return Check(label, False, f"{src.path}: no feature column besides the target {src.target!r}")
    if len(plan.target_values) < 2:
        return Check(label, False, f"{src.path}: target {src.target!r} holds {len(plan.target_values)} distinct value(s)")
    return Check(label, True, f"{src.path}: {plan.rows} rows, target {src.target!r} ({len(plan.target_values)} values), "
                              f"{len(plan.features)} feature columns")


def _check_key(cfg: SiteConfig) -> Check:
    from protocol.signing import Signer

    try:
        kid = Signer.from_file(cfg.key_path).kid
    except (OSError, ValueError) as e:
        return Check("site key", False, str(e))
    ok, detail = _mode_ok(cfg.key_path)
    return Check("site key", ok, f"{detail}, key id {kid}")


def _check_secret_files(config: Path) -> list[Check]:
    from protocol.toml_config import read_toml

    raw = read_toml(config)
    pw = raw.get("broker_password_file")
    if not pw:
        return []
    p = Path(pw) if Path(pw).is_absolute() else config.resolve().parent / pw
    ok, detail = _mode_ok(p)
    return [Check("broker password file", ok, detail)]


def _check_coordinator_key(cfg: SiteConfig) -> Check:
    from protocol.signing import key_id_of_pem

    try:
        kid = key_id_of_pem(Path(cfg.coordinator_pub).read_bytes())
    except (OSError, ValueError) as e:
        return Check("coordinator key", False, f"{cfg.coordinator_pub}: {e}")
    return Check("coordinator key", True, f"{cfg.coordinator_pub}: tasks must be signed by key id {kid}")


def _check_broker(cfg: SiteConfig, timeout_s: float) -> Check:
    """Log in and attach to the site's own queue (read permission); a task that arrives meanwhile goes back."""
    from protocol.transport import BusError, open_bus
    from protocol.transport.topology import site_queue

    queue = site_queue(cfg.site_id)
    bus = None
    try:
        bus = open_bus(cfg.broker_url, tls=cfg.tls) if cfg.tls else open_bus(cfg.broker_url)
        consumer = bus.consume(queue, lambda d: d.requeue(), prefetch=1)
        consumer.cancel()
    except (BusError, ValueError, OSError) as e:
        return Check("broker", False, f"{_redact(cfg.broker_url)}: {e}")
    finally:
        if bus is not None:
            bus.close()
    return Check("broker", True, f"logged in to {_redact(cfg.broker_url)} and may read {queue}")


def _redact(url: str) -> str:
    from protocol.broker_url import redact

    return redact(url)


def _check_experiment(cfg: SiteConfig, experiment: Path) -> list[Check]:
    from protocol.config import ConfigError, load_experiment
    from protocol.model import summarize
    from site_worker.data import DataError, prepare
    from protocol.policy import PolicyViolation
    from site_worker.policy import check_policy
    from site_worker.splits import SplitKey

    try:
        exp = load_experiment(experiment)
    except ConfigError as e:
        return [Check("experiment", False, f"{experiment}: {e}")]
    from site_worker.approvals import Approvals, experiment_hash

    out = [Check("experiment", True, f"{experiment}: {exp.name}, dataset {exp.dataset.name!r}, "
                                     f"{exp.training.rounds} rounds")]
    digest = experiment_hash(exp.to_wire(), exp.dataset.name)
    approved = Approvals(cfg.state_dir).approved(digest)
    out.append(Check("approval", approved or not cfg.policy.require_approval,
                     f"experiment hash {digest}: " + ("approved" if approved else "not approved")
                     + ("" if approved or not cfg.policy.require_approval else
                        "; this site requires approval (policy.require_approval): fedbus site approve "
                        f"{experiment} --config SITE.toml")))
    summary = summarize(exp.architecture.layers)
    out.append(Check("model", True, f"{int(summary.parameters)} parameters, layers "
                                    + ", ".join(str(layer.type) for layer in exp.architecture.layers)))
    try:
        check_policy(cfg.policy, exp, parameters=int(summarize(exp.architecture.layers).parameters))
        out.append(Check("policy", True, "the experiment is within this site's policy"))
    except PolicyViolation as e:
        out.append(Check("policy", False, f"this site would decline: {e}"))
    name = exp.dataset.name
    if name not in cfg.datasets:
        out.append(Check(f"dataset {name}", False, f"the experiment trains on {name!r} but this site offers "
                                                   f"{', '.join(sorted(cfg.datasets))}: add [datasets.{name}] to site.toml"))
        return out
    src = cfg.datasets[name]
    try:
        key = SplitKey.load_or_create(cfg.state_dir, test_fraction=cfg.policy.test_fraction)
        data = prepare(src, exp.dataset, key=key, input_shape=exp.input_shape)
    except DataError as e:
        out.append(Check(f"dataset {name}", False, f"{src.path}: {e}"))
        return out
    out.append(Check(f"dataset {name}", True, f"{src.path}: {data.rows} usable rows, target {src.target!r}, "
                                              f"{len(data.features)} encoded features as the model expects"))
    out.append(_check_privacy(cfg, exp, name, n_train=len(data.x_train), rows=int(data.rows)))
    return out


def _check_privacy(cfg: SiteConfig, exp: Experiment, dataset: str, *, n_train: int, rows: int) -> Check:
    """ε of the whole run at this site on top of its ledger: the plan the site itself runs
    (``privacy_plan.site_run_plan``: every round's DP-SGD steps, its metrics releases, the test
    evaluations, the fine-tune and the final evaluation, at the policy's accountant and δ, a
    ``total_epsilon`` run's solved σ included), so the figure is the ledger's after the run."""
    from protocol import privacy_plan
    from protocol.accounting import epsilon_of, merge
    from protocol.policy import PolicyViolation
    from protocol.train_spec import TrainSpec
    from site_worker.ledger import PrivacyLedger

    policy = cfg.policy
    spec = TrainSpec.from_experiment(exp, seed=0)
    sa = exp.federated.secure_aggregation
    if spec.dp is None and sa is not None and sa.dp in ("pooled", "central"):
        return _check_secure_dp(cfg, exp, dataset, rows=rows)
    if spec.dp is None:
        return Check("privacy", policy.allow_no_dp, "DP is off for this experiment: updates are not private"
                     + ("" if policy.allow_no_dp else "; this site's policy requires DP and would decline"))
    try:
        plan = privacy_plan.site_run_plan(exp, policy, n_train=n_train, rows=rows)
    except PolicyViolation as e:
        return Check("privacy", False, f"this site would decline: {e}")
    except privacy_plan.BudgetExhausted as e:
        return Check("privacy", False, f"this site would decline: total_epsilon: {e}")
    history = PrivacyLedger(cfg.state_dir).history(dataset)
    spent = epsilon_of(history, delta=plan.delta, accountant=plan.accountant)
    after = epsilon_of(merge([*history, *plan.entries()]), delta=plan.delta, accountant=plan.accountant)
    budget = policy.max_epsilon
    ok = budget is None or after <= budget
    metrics = float(plan.to_json()["metrics_epsilon"])
    union = privacy_plan.union_entries(exp, policy)
    noise = f"σ_m {policy.metrics_noise_multiplier:g}" + (f", the union's σ_u {policy.union_noise_multiplier:g}" if union else "")
    return Check("privacy", ok, f"the run would cost ε {after - spent:.4g} (ε {spent:.4g} -> {after:.4g} at δ "
                                f"{plan.delta:g}, {plan.accountant} accountant, {plan.rounds} rounds of "
                                f"{plan.round_steps} steps at noise {plan.noise_multiplier:.4g}, with the metrics, "
                                "fine-tune and final releases the site plans"
                                + (f", total_epsilon {plan.total_epsilon:g}" if plan.total_epsilon is not None else "")
                                + f"; the metrics releases alone ε {metrics:.3g} at {noise})"
                                + (f"; budget max_epsilon {budget:g}" if budget is not None else "")
                                + ("" if ok else ": the site would decline the rounds past its budget"))


def _check_secure_dp(cfg: SiteConfig, exp: Experiment, dataset: str, *, rows: int) -> Check:
    """Distributed DP under secure aggregation (``dp = "pooled"`` or ``"central"``): the ε of
    ``protocol.privacy_plan.secure_dp_plan`` (the entries the site charges: pooled, T steps at the
    records' q; central, T sampled rounds in sync or at most T un-subsampled updates under FedBuff;
    and the metrics releases) on top of the ledger, at the site's δ, composed in RDP as the ledger does."""
    from protocol import privacy_plan
    from protocol.policy import PolicyViolation
    from protocol.secagg import skellam
    from protocol.secagg.rules import central_sample_rate
    from site_worker.ledger import PrivacyLedger
    from site_worker.policy import check_pooled_policy

    policy = cfg.policy
    try:
        check_pooled_policy(policy, exp)
    except PolicyViolation as e:
        return Check("privacy", False, f"this site would decline: {e}")
    delta = policy.site_delta(rows)
    ledger = PrivacyLedger(cfg.state_dir)
    spent = ledger.spent(dataset, delta=delta, accountant="rdp")  # check_pooled_policy: the site composes in RDP
    rel = ledger.releases(dataset)
    before = [skellam.SkellamEntry.from_list(e) for r in rel for e in r.get("skellam", ())]
    after = privacy_plan.secure_dp_epsilon(exp, policy, delta=delta, spent=ledger.history(dataset),
                                           spent_skellam=before)
    sa = exp.federated.secure_aggregation
    assert sa is not None
    sites = max(1, int(exp.federated.min_available_clients))
    budget = policy.max_epsilon
    ok = budget is None or after <= budget
    if sa.dp == "pooled":
        how = f"record-level pooled DP: at most {exp.training.rounds} DP-SGD steps at q = {sa.sample_rate:g}"
    elif exp.federated.name == "FedBuff":
        how = f"user-level central DP: at most {exp.training.rounds} masked updates, each un-subsampled (FedBuff: q = 1)"
    else:
        how = (f"user-level central DP: {exp.training.rounds} rounds sampled at q = "
               f"{central_sample_rate(exp, sites):.4g} (k/N of {sites} sites)")
    return Check("privacy", ok, f"the run would cost ε {after - spent:.4g} (ε {spent:.4g} -> {after:.4g} at δ "
                                f"{delta:g}, {skellam.ACCOUNTANT} accountant, {how}, with the metrics releases "
                                "the site plans)" + (f"; budget max_epsilon {budget:g}" if budget is not None else "")
                                + ("" if ok else ": the site would decline the updates past its budget"))


def print_checks(checks: list[Check], echo: Callable[[str], None]) -> bool:
    for c in checks:
        echo(c.line())
    return all(c.ok for c in checks)
