"""Issue 24: how wide is the heart-failure demo's union test-accuracy interval, and what would
±10 points cost? The width as a function of the sites' metrics noise σ_m
(``policy.metrics_noise_multiplier``) and of the union's test rows, pooled from the sites' own
releases (no secure aggregation: √N sites' noise) or from one secure sum (noise added once),
with the ε each σ_m costs from the one planner.

Everything is the project's own code, nothing re-implemented:

* test rows: the demo's three hospital files (``bench/config_new_demo.demo_experiment``: the
  heart-failure records split three ways) through each site's split (``site_worker.data.prepare``
  with ``--keys`` public split keys, one per simulated deployment) at ``policy.test_fraction``
  0.2 (the default), 0.4 and 0.6: the test and training rows each site really holds, and the real
  test labels;
* a release: a stand-in model whose predictions on the site's real test labels hit a chosen
  sensitivity/specificity (default 0.55/0.88: ~77 % accuracy at the data's 32 % prevalence, like
  the demo's final model in ``bench/dp_interval_check.py``), through the site's
  ``site_worker.release.release_metrics`` (the noise its policy σ_m puts on Δ = √3);
  the pooled union is the coordinator's ``coordinator.final._pooled`` of the three releases; the
  secure one sums the sites' ``site_worker.secure_metrics.union_contribution`` (K = 3 shares,
  without the masks, which cancel, and the fixed-point rounding, ≤ 0.5 counts) into
  ``protocol.secagg.union.union_figures`` and ``coordinator.final._from_sum``; the floor is the
  same union with exact counts (σ_m = 0, ``metrics = "exact"``'s figures: the test-set size alone);
* ε: ``protocol.dp_plan.release_entries`` through ``protocol.accounting.epsilon_of`` at the
  site's δ (per release), and the demo's whole run through ``protocol.privacy_plan.site_run_plan``
  (what ``fedbus site check`` and the coordinator's plan call): the metrics releases' ε, and the
  training σ the ε 8 budget leaves.

Half-width = (hi − lo) / 2 of the printed 95 % interval (``protocol.dp_figures``), averaged over
``--reps`` simulated releases; "withheld" = the share printed "too few test rows for this budget".

    python bench/union_interval.py [--reps 40] [--keys 10] [--json OUT]   # figures: bench/README.md
    python bench/union_interval.py --smoke                                 # seconds
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, cast

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIGMAS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 5.0, 8.0)
FRACTIONS = (0.2, 0.4, 0.6)  # policy.test_fraction: the default, and 2x / 3x the test rows
SITES = 3
DEMO_TEST_FRACTION = 0.4  # the README demo's project.toml (test_fraction = 0.4)
LOSS = "bce_with_logits"


def site_splits(exp_path: Path, work: Path, *, keys: int, fraction: float) -> list[list[dict[str, Any]]]:
    """Per split key, per site: its test labels, test rows, training rows and announced rows, as
    ``site_worker.data.prepare`` splits the demo's hospital files under ``test_fraction``."""
    from protocol.config import load_experiment
    from site_worker.config import DatasetSource
    from site_worker.data import prepare
    from site_worker.splits import SplitKey

    exp = load_experiment(json.loads(exp_path.read_text(encoding="utf-8")))
    out = []
    for k in range(keys):
        deployment = []
        for i, c in enumerate("abc"):
            src = DatasetSource(name="heart_failure", path=work / f"hospital-{c}.csv", target="DEATH_EVENT")
            key = SplitKey.from_seed(1000 * k + i, test_fraction=fraction)
            d = prepare(src, exp.dataset, input_shape=None, key=key)
            assert d.y_test is not None, "the demo's sites hold test rows"
            deployment.append({"y_test": d.y_test.reshape(-1).numpy().astype(np.int64), "rows": d.rows,
                               "n_test": len(d.y_test), "n_train": len(d.y_train)})
        out.append(deployment)
    return out


def stand_in(y: np.ndarray, rng: np.random.Generator, *, sensitivity: float, specificity: float) -> Any:
    """(model, x, y) whose 0.5-threshold predictions on labels ``y`` have the given rates."""
    import torch

    pos = np.where(y == 1, rng.random(len(y)) < sensitivity, rng.random(len(y)) >= specificity)
    model = torch.nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.0)
    x = torch.as_tensor(np.where(pos, 3.0, -3.0), dtype=torch.float32).reshape(-1, 1)
    return model, x, torch.as_tensor(y, dtype=torch.float32).reshape(-1, 1), int(np.sum(pos == (y == 1)))


def union_accuracy(deployment: list[dict[str, Any]], sigma: float, mode: str, rng: np.random.Generator, *,
                   sensitivity: float, specificity: float, union_sigma: float | None = None) -> dict[str, Any]:
    """One simulated final test: the union accuracy block as the coordinator shows it (the secure
    sum's noise at ``union_sigma``, the policy's ``union_noise_multiplier``; σ_m when not given)."""
    from coordinator.final import _from_sum, _pooled
    from protocol.policy import SitePolicy
    from protocol.secagg.union import from_field, union_figures, union_noise_sd
    from site_worker.release import release_metrics
    from site_worker.secure_metrics import union_contribution

    policy = SitePolicy(metrics="exact" if sigma == 0 else "dp", metrics_noise_multiplier=sigma or 1.0,
                        union_noise_multiplier=union_sigma or sigma or 1.0)
    releases, summed, shares, correct = [], None, [], 0
    for site in deployment:
        model, x, y, right = stand_in(site["y_test"], rng, sensitivity=sensitivity, specificity=specificity)
        correct += right
        if mode == "secure" and sigma > 0:
            layout, field, sd = union_contribution(model, x, y, loss_name=LOSS, task="binary", policy=policy, rng=rng,
                                                   min_contributors=len(deployment))
            summed = field if summed is None else summed + field
            shares.append(sd)
        elif sigma > 0:
            releases.append(release_metrics(model, x, y, loss_name=LOSS, task="binary", policy=policy,
                                            rng=cast(Any, rng), rows=site["rows"]))  # any standard_normal stream
        else:  # exact counts: the figures' interval is the test-set size alone
            releases.append({**dict(zip(("cm_tn", "cm_fp", "cm_fn", "cm_tp"), _cells(model, x, y))),
                             "noise_sd": 0.0, "n": float(site["n_test"])})
    if summed is not None:
        figures = union_figures("binary", from_field(summed), noise_sd=union_noise_sd(shares),
                                clip=policy.metrics_loss_clip, rows=sum(s["rows"] for s in deployment))
        block = _from_sum({}, figures)
    else:
        block = _pooled({}, releases)
    lo, hi = block["ci"]["accuracy"]
    n = sum(s["n_test"] for s in deployment)
    return {"half": (hi - lo) / 2.0, "withheld": "accuracy" in (block.get("withheld") or {}),
            "inside": lo <= correct / n <= hi}


def _cells(model: Any, x: Any, y: Any) -> list[float]:
    """The exact confusion cells [tn, fp, fn, tp] (the release's first four statistics)."""
    from site_worker.release import statistics as stats

    _, v, _ = stats(model, x, y, loss_name=LOSS, task="binary", clip=5.0)
    return [float(c) for c in v[:4]]


def widths(splits: list[list[dict[str, Any]]], sigma: float, mode: str, *, reps: int, seed: int,
           sensitivity: float, specificity: float, union_sigma: float | None = None) -> dict[str, Any]:
    rng = np.random.default_rng([seed, int(sigma * 1000), len(mode)])
    got = [union_accuracy(splits[r % len(splits)], sigma, mode, rng, sensitivity=sensitivity,
                          specificity=specificity, union_sigma=union_sigma) for r in range(reps)]
    halves = [g["half"] for g in got]
    return {"sigma_m": sigma, "mode": mode, "mean_half_width": statistics.fmean(halves),
            "median_half_width": statistics.median(halves),
            "within_10": sum(h <= 0.10 for h in halves) / len(halves),
            "withheld": sum(g["withheld"] for g in got) / len(got),
            "covered": sum(g["inside"] for g in got) / len(got), "reps": reps}


def epsilon_costs(exp_path: Path, sigma: float, *, n_train: int, rows: int, secure: bool) -> dict[str, Any]:
    """ε of one metrics release at σ_m, and the demo run's plan (``fedbus site check``'s call)."""
    from protocol.accounting import epsilon_of, merge
    from protocol.config import load_experiment
    from protocol.dp_plan import release_entries
    from protocol.policy import PolicyViolation, SitePolicy
    from protocol.privacy_plan import BudgetExhausted, plan_run, site_run_plan

    policy = SitePolicy(metrics_noise_multiplier=sigma, union_noise_multiplier=sigma)
    delta = policy.site_delta(rows)
    doc = json.loads(exp_path.read_text(encoding="utf-8"))
    if secure:
        doc["federated"]["secure_aggregation"] = {"min_contributors": SITES, "threshold": SITES}
        doc["federated"]["parameters"].update({k: SITES for k in ("min_fit_clients", "min_eval_clients",
                                                                  "min_available_clients")})
    exp = load_experiment(doc)
    out: dict[str, Any] = {"sigma_m": sigma, "secure": secure, "delta": delta,
                           "epsilon_per_release": epsilon_of(release_entries(policy), delta=delta,
                                                             accountant=policy.accountant)}
    # The releases the run plans: counted on a plan the budget certainly allows (σ_m 100), then
    # their ε at this σ_m composed by the same accountant (the plan itself refuses when they alone
    # pass the run's total, and then says so).
    shape = plan_run(exp, n_train=n_train, delta=delta, policy=SitePolicy(metrics_noise_multiplier=100.0))
    releases = len(shape.per_round_fixed) * shape.rounds + len(shape.test_fixed) + len(shape.final_fixed)
    metrics = epsilon_of(merge(release_entries(policy) * releases), delta=delta, accountant=policy.accountant)
    total = float(shape.total_epsilon or math.nan)
    out.update({"releases": releases, "metrics_epsilon": metrics, "total_epsilon": total,
                "metrics_share_of_total": metrics / total})
    try:
        plan = site_run_plan(exp, policy, n_train=n_train, rows=rows)
    except (PolicyViolation, BudgetExhausted) as e:
        return {**out, "error": str(e)}
    j = plan.to_json()
    return {**out, "training_noise_multiplier": j["noise_multiplier"], "planned_epsilon": j["planned_epsilon"],
            "plan_metrics_epsilon": j["metrics_epsilon"]}


def shipped(exp_path: Path, work: Path, *, reps: int, keys: int, seed: int, sensitivity: float,
            specificity: float) -> dict[str, Any]:
    """The README demo as it ships: its project's ``test_fraction`` 0.4, ``config new
    --secure-aggregation 3`` and the default policy (σ_m for the sites' own releases, σ_u for the
    union): the union's half-width, and the run's plan as ``fedbus site check`` prints it."""
    from protocol.config import load_experiment
    from protocol.policy import SitePolicy
    from protocol.privacy_plan import site_run_plan

    fraction, policy = DEMO_TEST_FRACTION, SitePolicy()
    doc = json.loads(exp_path.read_text(encoding="utf-8"))
    from fedbus.cli_config import secure_aggregation

    secure_aggregation(doc, SITES)
    secure_path = work / "experiment-secure.json"
    secure_path.write_text(json.dumps(doc), encoding="utf-8")
    splits = site_splits(secure_path, work, keys=keys, fraction=fraction)
    w = widths(splits, policy.metrics_noise_multiplier, "secure", reps=reps, seed=seed, sensitivity=sensitivity,
               specificity=specificity, union_sigma=policy.union_noise_multiplier)
    rows = max(s["rows"] for d in splits for s in d)
    n_train = int(round(statistics.fmean(s["n_train"] for d in splits for s in d)))
    plan = site_run_plan(load_experiment(doc), policy, n_train=n_train, rows=rows).to_json()
    return {"test_fraction": fraction, "sigma_m": policy.metrics_noise_multiplier,
            "sigma_u": policy.union_noise_multiplier, "union_test_rows": statistics.fmean(sum(s["n_test"] for s in d)
                                                                                          for d in splits),
            "site_train_rows": n_train, **{k: w[k] for k in ("mean_half_width", "median_half_width", "within_10",
                                                             "withheld", "covered")},
            "plan": {k: plan.get(k) for k in (
                "planned_epsilon", "metrics_epsilon", "noise_multiplier", "total_epsilon", "delta", "accountant")}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="σ_m 5, the demo's split, 1 split key, 3 releases each")
    ap.add_argument("--reps", type=int, default=40, help="simulated final tests per cell")
    ap.add_argument("--keys", type=int, default=10, help="simulated deployments (split keys) per test fraction")
    ap.add_argument("--sensitivity", type=float, default=0.55)
    ap.add_argument("--specificity", type=float, default=0.88)
    ap.add_argument("--seed", type=int, default=24)
    ap.add_argument("--json", type=Path, default=None, metavar="OUT")
    a = ap.parse_args(argv)
    sigmas, fractions, reps, keys = ((5.0,), (0.2,), 3, 1) if a.smoke else (SIGMAS, FRACTIONS, a.reps, a.keys)
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")  # Opacus, at ε ≫ 1: a bound, noted
    from bench.config_new_demo import demo_experiment

    result: dict[str, Any] = {"sensitivity": a.sensitivity, "specificity": a.specificity, "reps": reps, "keys": keys,
                              "splits": [], "widths": [], "epsilon": []}
    with tempfile.TemporaryDirectory() as tmp:
        exp = demo_experiment(Path(tmp), rounds=3)
        demo = None
        for f in fractions:
            splits = site_splits(exp, Path(tmp), keys=keys, fraction=f)
            union_test = [sum(s["n_test"] for s in d) for d in splits]
            train = [s["n_train"] for d in splits for s in d]
            row: dict[str, Any] = {"test_fraction": f, "union_test_rows": statistics.fmean(union_test),
                   "union_test_rows_range": [min(union_test), max(union_test)],
                   "site_test_rows": statistics.fmean(s["n_test"] for d in splits for s in d),
                   "site_train_rows": statistics.fmean(train), "rows": [s["rows"] for s in splits[0]]}
            result["splits"].append(row)
            print(f"test_fraction {f}: union test rows {row['union_test_rows']:.1f} "
                  f"({row['union_test_rows_range'][0]}–{row['union_test_rows_range'][1]}), per site "
                  f"{row['site_test_rows']:.1f} test / {row['site_train_rows']:.1f} training rows", flush=True)
            if demo is None:
                demo = row
            floor = widths(splits, 0.0, "exact", reps=reps, seed=a.seed, sensitivity=a.sensitivity,
                           specificity=a.specificity)
            result["widths"].append({"test_fraction": f, **floor})
            print(f"  no noise (σ_m = 0): ±{100 * floor['mean_half_width']:.1f} points", flush=True)
            for sigma in sigmas:
                for mode in ("pooled", "secure"):
                    w = widths(splits, sigma, mode, reps=reps, seed=a.seed, sensitivity=a.sensitivity,
                               specificity=a.specificity)
                    result["widths"].append({"test_fraction": f, **w})
                    print(f"  σ_m {sigma:g} {mode:>6}: ±{100 * w['mean_half_width']:.1f} points (median "
                          f"±{100 * w['median_half_width']:.1f}; ≤ ±10 in {100 * w['within_10']:.0f} %, withheld "
                          f"{100 * w['withheld']:.0f} %, covers the true accuracy {100 * w['covered']:.0f} %)", flush=True)
        assert demo is not None
        d = result["shipped"] = shipped(exp, Path(tmp), reps=reps, keys=keys, seed=a.seed, sensitivity=a.sensitivity,
                                        specificity=a.specificity)
        print(f"the demo as shipped (test_fraction {d['test_fraction']}, secure aggregation, σ_m {d['sigma_m']:g}, "
              f"σ_u {d['sigma_u']:g}): union ±{100 * d['mean_half_width']:.1f} points (median "
              f"±{100 * d['median_half_width']:.1f}; ≤ ±10 in {100 * d['within_10']:.0f} %, covers the true accuracy "
              f"{100 * d['covered']:.0f} %); plan: metrics ε {d['plan']['metrics_epsilon']:.2f} of "
              f"{d['plan']['total_epsilon']:g}, training σ {d['plan']['noise_multiplier']:.3f}", flush=True)
        for f_row in result["splits"]:
            n_train, rows = int(round(f_row["site_train_rows"])), int(max(f_row["rows"]))
            for sigma in sigmas:
                for secure in (False, True):
                    e = epsilon_costs(exp, sigma, n_train=n_train, rows=rows, secure=secure)
                    e["test_fraction"] = f_row["test_fraction"]
                    result["epsilon"].append(e)
                    trained = (f"training σ {e['training_noise_multiplier']:.3f}" if "error" not in e
                             else f"the site declines: {e['error']}")
                    print(f"tf {f_row['test_fraction']} σ_m {sigma:g}{' secure' if secure else ''}: ε/release "
                          f"{e['epsilon_per_release']:.3f}; {e['releases']} releases ε {e['metrics_epsilon']:.2f} "
                          f"= {100 * e['metrics_share_of_total']:.0f} % of ε {e['total_epsilon']:g}; {trained}", flush=True)
    if a.json is not None:
        a.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0 if all(math.isfinite(w["mean_half_width"]) for w in result["widths"]) else 1


if __name__ == "__main__":
    sys.exit(main())
