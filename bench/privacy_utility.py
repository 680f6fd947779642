"""Privacy against utility on Fed-Heart-Disease: four real hospitals, ε per site over the whole run.

For every ε in EPSILONS (``inf`` = DP off), method (FedAvg, FedAdam and FedAvg + a per-hospital
bias fine-tune on ``examples/heart_disease_dp.json``, FedPer + fine-tune on
``examples/heart_disease_fedper.json``)
and seed, runs the experiment through the simulator (natural partition by
hospital, the production site and coordinator code) with ``total_epsilon`` = ε, and records
the accuracy and AUC on the union of the hospitals' held-out rows (the simulator keeps 20 % of
each hospital's rows from every site; the baselines are scored on the same rows) and on each
hospital's own held-out rows. The FedAvg runs also train the local-only and pooled baselines under
the same ε. "pooled DP (secure sum)" is issue 22's record-level pooled-cost mode
(``simulator/pooled_run.py``: one DP-SGD step a round per hospital with a Skellam share of the
noise, the coordinator steps on the secure sum; same data path and held-out rows; at ε = inf the
same pipeline with no noise). Prints progress and a markdown table, writes ``bench/out/privacy_utility.json``,
``.png`` and ``.log``.

    python bench/privacy_utility.py                # full: 6 ε x 4 methods x 3 seeds (~5 min on 2 busy cores)
    python bench/privacy_utility.py --quick        # 3 ε x 4 methods x 1 seed, a smoke run
    python bench/privacy_utility.py --max-minutes 20   # stop starting new runs after 20 minutes
    python bench/privacy_utility.py --render bench/out/privacy_utility.json   # tables + PNG of a saved run
    python bench/privacy_utility.py --epsilons 1,inf --methods "FedAvg+bias fine-tune" --seeds 20
                                                   # one method's DP cost at ε = 1, paired over 20 seeds
    python bench/privacy_utility.py --epsilons inf --methods FedPer+fine-tune --seeds 40
                                                   # personalised vs local per hospital, paired over 40 seeds
    python bench/privacy_utility.py --epsilons 0.5,1,inf --methods "FedAvg,pooled DP (secure sum)" --seeds 20
                                                   # pooled-cost DP against per-site DP-SGD (bench/README.md)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out"
EXAMPLE = ROOT / "examples" / "heart_disease_dp.json"
PERSONAL = ROOT / "examples" / "heart_disease_fedper.json"
EPSILONS = [0.5, 1.0, 2.0, 4.0, 8.0, math.inf]
SEEDS = [1, 2, 3]
# FLamby's published Fed-Heart-Disease figures (mean over the four hospitals' test accuracy).
FLAMBY = {"FedAvg": 0.685, "FedYogi": 0.731, "pooled": 0.735, "FENDA-FL (personalised)": 0.81}


FEDADAM = {"server_learning_rate": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 0.001}


def methods(base: dict[str, Any], personal: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Experiment variants: the DP example with FedAvg (its own server) or FedAdam, and the
    FedPer example (an MLP with a personal output layer and a fine-tune) under the DP example's budget."""
    out = {}
    avg = copy.deepcopy(base)
    avg["training"].pop("personalization", None)  # the global model alone
    avg["federated"]["name"] = "FedAvg"
    for k in ("server_learning_rate", "beta_1", "beta_2", "tau", "server_momentum"):
        avg["federated"]["parameters"].pop(k, None)
    out["FedAvg"] = avg
    adam = copy.deepcopy(avg)
    adam["federated"]["name"] = "FedAdam"
    adam["federated"]["parameters"].update(FEDADAM)
    out["FedAdam"] = adam
    # The example as shipped: each hospital re-fits only its output bias (its own base rate)
    # after the rounds, inside the same ε: one noisy coordinate per step.
    bias = copy.deepcopy(base)
    bias["training"].setdefault("personalization", {"mode": "bias", "epochs": 5, "select": "validation"})
    out["FedAvg+bias fine-tune"] = bias
    per = copy.deepcopy(personal)
    per["training"]["optimizer"]["differential_privacy"] = copy.deepcopy(base["training"]["optimizer"]["differential_privacy"])
    out["FedPer+fine-tune"] = per
    out[POOLED] = pooled_variant(base)
    return out


POOLED = "pooled DP (secure sum)"


def pooled_variant(base: dict[str, Any]) -> dict[str, Any]:
    """Record-level DP at pooled cost (issue 22 item 4): the DP example's logistic model, its clip 0.5
    and lr 6, one full-batch step a round at every hospital with a Skellam share of the noise, the
    coordinator one step on the unmasked sum (``simulator/pooled_run.py``); every hospital assumes
    all four add their share (m = 4, min_contributors 4)."""
    e = copy.deepcopy(base)
    dp = e["training"]["optimizer"].pop("differential_privacy")
    e["training"].pop("personalization", None)
    e["federated"]["name"] = "FedAvg"
    e["federated"]["parameters"].update(min_fit_clients=4, min_available_clients=4)
    e["federated"]["secure_aggregation"] = {
        "min_contributors": 4, "threshold": 3, "dp": "pooled", "clip": float(dp["max_grad_norm"]), "scale": 1024.0,
        "max_sites": 4, "max_batch": 512, "sample_rate": 1.0, "delta": float(dp["delta"]),
        "target_epsilon": float(dp["total_epsilon"])}
    return e


def with_epsilon(exp: dict[str, Any], eps: float) -> dict[str, Any]:
    e = copy.deepcopy(exp)
    sa = e["federated"].get("secure_aggregation")
    if sa is not None and sa.get("dp") == "pooled":  # inf: the same pipeline with no noise (one_run)
        sa["target_epsilon"] = 1.0 if math.isinf(eps) else float(eps)
        return e
    dp = e["training"]["optimizer"]["differential_privacy"]
    if math.isinf(eps):
        e["training"]["optimizer"]["differential_privacy"] = {"enabled": False}
    else:
        dp.update(enabled=True, total_epsilon=float(eps))
        dp.pop("noise_multiplier", None)
        dp.pop("target_epsilon", None)
    return e


def _quiet() -> None:
    import structlog

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


def pooled_run(exp: dict[str, Any], *, seed: int, noise: bool) -> dict[str, Any]:
    """The pooled-DP series: scored on the same held-out rows as ``one_run``'s."""
    from simulator.pooled_run import simulate_pooled

    doc = simulate_pooled(exp, seed=seed, noise=noise)
    final = doc["holdout"]
    sites = sorted(final["per_site"])
    eps = doc["privacy"]["epsilon"]
    return {"model": {"acc": final.get("accuracy"), "auc": final.get("auc"),
                      "mean_acc": statistics.fmean(final["per_site"][s]["accuracy"] for s in sites),
                      "per_site": {s: {k: final["per_site"][s].get(k) for k in ("accuracy", "auc")} for s in sites}},
            "epsilon": eps if noise else None, "privacy": {k: v for k, v in doc["privacy"].items() if k != "epsilon"}}


def one_run(exp: dict[str, Any], *, seed: int, baselines: bool, personal: bool) -> dict[str, Any]:
    from simulator.run import simulate

    doc = simulate(exp, partition="natural:dataset", seed=seed, progress=False, baselines=baselines)
    # The simulator's held-out rows (``holdout``: 20 % per hospital that no site holds), where the
    # local-only and pooled baselines are scored too: every series on the same rows. The sites' own
    # reports on their fixed test splits are in ``doc["final"]``.
    final = doc["holdout"]
    sites = sorted(final["per_site"])
    if personal:
        p = final["personalized"]
        model = {"acc": p.get("accuracy"), "auc": p.get("auc"), "mean_acc": p.get("mean_accuracy"),
                 "per_site": {s: {k: final["per_site"][s]["personalized"].get(k) for k in ("accuracy", "auc")}
                              for s in sites}}
    else:
        model = {"acc": final.get("accuracy"), "auc": final.get("auc"),
                 "mean_acc": statistics.fmean(final["per_site"][s]["accuracy"] for s in sites),
                 "per_site": {s: {k: final["per_site"][s].get(k) for k in ("accuracy", "auc")} for s in sites}}
    out = {"model": model, "epsilon": (doc.get("privacy") or {}).get("epsilon")}
    if baselines:
        b = doc["baselines"]
        loc = b["local"]
        out["local"] = {"acc": loc["_union"].get("accuracy"), "auc": loc["_union"].get("auc"),
                        "mean_acc": loc["_union"].get("mean_accuracy"),
                        "per_site": {s: {k: loc[s].get(k) for k in ("accuracy", "auc")} for s in sites}}
        pooled_sites = b.get("pooled_per_site") or {}
        out["pooled"] = {"acc": b["pooled"].get("accuracy"), "auc": b["pooled"].get("auc"),
                         "mean_acc": statistics.fmean(pooled_sites[s]["accuracy"] for s in sites) if pooled_sites else None}
    if personal:
        out["global_per_site"] = {s: {k: final["per_site"][s].get(k) for k in ("accuracy", "auc")} for s in sites}
    return out


def _stats(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{series: {eps: {acc: (mean, sd), auc: .., mean_acc: .., n}}}`` over seeds."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        eps = "inf" if math.isinf(r["eps"]) else f"{r['eps']:g}"
        groups.setdefault((r["method"], eps), []).append(r["result"]["model"])
        suffix = " (FedPer's MLP)" if r["method"].startswith("FedPer") else ""
        for b in ("local", "pooled"):
            if b in r["result"]:
                name = ("local-only" if b == "local" else "pooled") + suffix
                groups.setdefault((name, eps), []).append(r["result"][b])
    for (series, eps), rows in groups.items():
        table.setdefault(series, {})[eps] = {k: _stats([row.get(k) for row in rows]) for k in ("acc", "auc", "mean_acc")}
        table[series][eps]["n"] = len(rows)
    return table


def markdown(table: dict[str, dict[str, dict[str, Any]]], eps_keys: list[str]) -> str:
    def cell(v: tuple[float | None, float | None]) -> str:
        return "-" if v[0] is None else f"{v[0]:.3f} ± {v[1]:.3f}"

    lines = []
    for metric, title in (("acc", "union test accuracy"), ("auc", "union test AUC"),
                          ("mean_acc", "mean of the four hospitals' test accuracy (FLamby's measure)")):
        lines.append(f"\n**{title}** (mean ± sd over seeds)\n")
        lines.append("| series | " + " | ".join(f"ε={e}" for e in eps_keys) + " |")
        lines.append("|---|" + "---|" * len(eps_keys))
        for series in sorted(table):
            lines.append(f"| {series} | " + " | ".join(cell(table[series].get(e, {}).get(metric, (None, None)))
                                                     for e in eps_keys) + " |")
    return "\n".join(lines)


def _mean_sd(vals: list[float]) -> str:
    m, sd = _stats(vals)
    return "-" if m is None else f"{m:.3f} ± {sd:.3f}"


def _hospital_rows(sites: list[str], seeds: list[int], columns: list[Any], *, beats: Any) -> list[str]:
    """One markdown row per hospital: each column's ``(seed, site, metric) -> value`` as mean ± sd
    over seeds, for accuracy then AUC, and in how many seeds ``beats`` holds on both metrics."""
    rows = []
    for site in sites:
        row = [site]
        for metric in ("accuracy", "auc"):
            row += [_mean_sd([col(s, site, metric) for s in seeds]) for col in columns]
        wins = sum(all(beats(s, site, m) for m in ("accuracy", "auc")) for s in seeds)
        rows.append("| " + " | ".join(row) + f" | {wins}/{len(seeds)} |")
    return rows


def _paired(seeds: list[int], site: str, a: Any, b: Any) -> str:
    """``a - b`` paired by seed, for accuracy then AUC: mean ± standard error over the seeds
    where both are defined (the spread of one hospital's test split cancels in the pairing)."""
    cells = []
    for m in ("accuracy", "auc"):
        d = [a(s, site, m) - b(s, site, m) for s in seeds if a(s, site, m) is not None and b(s, site, m) is not None]
        se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else 0.0
        cells.append("-" if not d else f"{statistics.fmean(d):+.4f} ± {se:.4f}")
    return " / ".join(cells)


def per_hospital(runs: list[dict[str, Any]]) -> str:
    """No DP, each hospital's own test split: the personalised model against the local-only
    models (the same MLP trained alone, and, where the FedAvg series ran on the same seeds, the
    DP example's logistic model trained alone) and the global FedPer model; mean ± sd over
    seeds, personalised − local MLP paired by seed (± s.e.), and in how many seeds personalised
    >= every local model."""
    inf = [r for r in runs if math.isinf(r["eps"])]
    per = {r["seed"]: r["result"] for r in inf if r["method"].startswith("FedPer")}
    avg = {r["seed"]: r["result"] for r in inf if r["method"] == "FedAvg"}
    seeds = sorted(per)
    if not seeds:
        return ""
    sites = sorted(per[seeds[0]]["model"]["per_site"])
    pers = lambda s, site, m: per[s]["model"]["per_site"][site][m]  # noqa: E731
    mlp = lambda s, site, m: per[s]["local"]["per_site"][site][m]  # noqa: E731
    logistic = lambda s, site, m: avg[s]["local"]["per_site"][site][m] if s in avg else None  # noqa: E731

    def beats(s: int, site: str, m: str) -> bool:
        p = pers(s, site, m)
        return p is not None and all(v is None or p >= v for v in (mlp(s, site, m), logistic(s, site, m)))

    lines = ["\n**each hospital's own test split, no DP** (mean ± sd over seeds; accuracy / AUC)\n",
             "| hospital | personalised acc | local MLP acc | local logistic acc | global FedPer acc | "
             "personalised AUC | local MLP AUC | local logistic AUC | global FedPer AUC | "
             "seeds pers ≥ every local (acc and AUC) | pers − local MLP, acc / AUC (paired, ± s.e.) |",
             "|---|" + "---|" * 10]
    columns = [pers, mlp, logistic, lambda s, site, m: per[s]["global_per_site"][site][m]]
    rows = _hospital_rows(sites, seeds, columns, beats=beats)
    lines += [row + f" {_paired(seeds, site, pers, mlp)} |" for site, row in zip(sites, rows)]
    return "\n".join(lines)


def per_hospital_dp(runs: list[dict[str, Any]], eps: float = 1.0, method: str = "FedAvg+bias fine-tune") -> str:
    """At ``eps``, each hospital's own test split: its personalised model (``method``) against
    its local-only model and the FedAvg global model under the same ε, same seeds."""
    at = [r for r in runs if r["eps"] == eps]
    per = {r["seed"]: r["result"] for r in at if r["method"] == method}
    avg = {r["seed"]: r["result"] for r in at if r["method"] == "FedAvg"}
    seeds = sorted(set(per) & set(avg))
    if not seeds:
        return ""
    sites = sorted(per[seeds[0]]["model"]["per_site"])
    lines = [f"\n**each hospital's own test split at ε = {eps:g}** ({method} vs local-only and the FedAvg global "
             "model, the same ε; mean ± sd over seeds)\n",
             "| hospital | personalised acc | local-only acc | FedAvg global acc | personalised AUC | local-only AUC | "
             "FedAvg global AUC | seeds pers ≥ local (acc and AUC) |",
             "|---|" + "---|" * 7]
    columns = [lambda s, site, m: per[s]["model"]["per_site"][site][m],
               lambda s, site, m: avg[s]["local"]["per_site"][site][m],
               lambda s, site, m: avg[s]["model"]["per_site"][site][m]]
    lines += _hospital_rows(sites, seeds, columns, beats=lambda s, site, m: per[s]["model"]["per_site"][site][m]
                            >= avg[s]["local"]["per_site"][site][m])
    return "\n".join(lines)


def dp_cost(runs: list[dict[str, Any]], eps: float = 1.0) -> str:
    """Per method, union accuracy without DP minus at ``eps``, paired by seed (the same test rows):
    mean ± standard error over seeds, and the largest mean over any 3 consecutive seeds."""
    lines = [f"\n**DP cost at ε = {eps:g}** (union accuracy, no DP minus ε = {eps:g}, paired by seed; points)\n",
             "| series | seeds | no DP | ε | cost | ± s.e. | worst 3-seed window |", "|---|---|---|---|---|---|---|"]
    for method in sorted({r["method"] for r in runs}):
        at = {r["seed"]: r["result"]["model"]["acc"] for r in runs if r["method"] == method and r["eps"] == eps}
        inf = {r["seed"]: r["result"]["model"]["acc"] for r in runs if r["method"] == method and math.isinf(r["eps"])}
        seeds = sorted(set(at) & set(inf))
        if len(seeds) < 2:
            continue
        diffs = [100 * (inf[s] - at[s]) for s in seeds]
        se = statistics.stdev(diffs) / math.sqrt(len(diffs))
        worst = max((statistics.fmean(diffs[i:i + 3]) for i in range(len(diffs) - 2)), default=None)
        lines.append(f"| {method} | {len(seeds)} | {statistics.fmean(inf[s] for s in seeds):.3f} | "
                     f"{statistics.fmean(at[s] for s in seeds):.3f} | {statistics.fmean(diffs):.1f} | {se:.1f} | "
                     + ("-" if worst is None else f"{worst:.1f}") + " |")
    return "\n".join(lines)


def tables(runs: list[dict[str, Any]], eps_keys: list[str]) -> str:
    return "\n".join([markdown(summarise(runs), eps_keys), per_hospital(runs), per_hospital_dp(runs), dp_cost(runs)])


def render(path: Path) -> int:
    """Tables and PNG again from a saved ``privacy_utility.json`` (no training)."""
    doc = json.loads(path.read_text())
    runs = [dict(r, eps=float(r["eps"])) for r in doc["runs"]]
    table = summarise(runs)
    print(tables(runs, doc["epsilons"]))
    plot(table, doc["epsilons"], path.with_suffix(".png"))
    return 0


def plot(table: dict[str, dict[str, dict[str, Any]]], eps_keys: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = list(range(len(eps_keys)))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (metric, title) in zip(axes, (("acc", "union test accuracy"), ("auc", "union test AUC"),
                                          ("mean_acc", "mean per-hospital test accuracy"))):
        for series in sorted(table):
            m = [table[series].get(e, {}).get(metric, (None, None)) for e in eps_keys]
            ax.errorbar([x for x, v in zip(xs, m) if v[0] is not None], [v[0] for v in m if v[0] is not None],
                        yerr=[v[1] for v in m if v[0] is not None], marker="o", capsize=3, label=series,
                        linestyle="--" if series.startswith(("local-only", "pooled")) and series != POOLED else "-")
        if metric == "mean_acc":
            for name, v in FLAMBY.items():
                ax.axhline(v, color="grey", linewidth=0.7, linestyle=":")
                ax.text(xs[0], v, f"FLamby {name} {v}", fontsize=6, va="bottom", color="grey")
        ax.set_xticks(xs, [f"ε={e}" for e in eps_keys])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("ε per site over the whole run (δ = 1e-5); inf = no DP")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Fed-Heart-Disease, four hospitals (fedbus simulator, fixed test splits)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="ε in {1, 8, inf}, one seed")
    ap.add_argument("--seeds", type=int, default=len(SEEDS), help="seeds per point (default 3)")
    ap.add_argument("--epsilons", help="comma-separated ε per site, 'inf' = no DP (default 0.5,1,2,4,8,inf)")
    ap.add_argument("--methods", help="comma-separated series to run (default all: " + ", ".join(
        ["FedAvg", "FedAdam", "FedAvg+bias fine-tune", "FedPer+fine-tune", POOLED]) + ")")
    ap.add_argument("--max-minutes", type=float, default=45.0, help="start no new run after this long")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--render", type=Path, metavar="JSON", help="print the tables and redraw the PNG of a saved run")
    ap.add_argument("--smoke", action="store_true", help="FedAvg at ε = 1, one seed, 2 rounds, into a temporary "
                                                         "folder: checks the bench runs (seconds)")
    args = ap.parse_args(argv)
    if args.smoke:
        import tempfile

        args.quick, args.epsilons, args.methods = True, "1", f"FedAvg,{POOLED}"
        args.out = Path(tempfile.mkdtemp(prefix="privacy-utility-smoke-"))
    if args.render is not None:
        return render(args.render)
    _quiet()
    import torch

    torch.set_num_threads(1)
    epsilons = [1.0, 8.0, math.inf] if args.quick else EPSILONS
    if args.epsilons:
        epsilons = [float(e) for e in args.epsilons.split(",")]
    seeds = SEEDS[:1] if args.quick else list(range(1, args.seeds + 1))
    base = json.loads(EXAMPLE.read_text())
    variants = methods(base, json.loads(PERSONAL.read_text()))
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",")]
        unknown = [m for m in wanted if m not in variants]
        if unknown:
            ap.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(variants)}")
        variants = {m: variants[m] for m in wanted}
    if args.smoke:
        for exp in variants.values():
            exp["training"]["rounds"] = 2
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "privacy_utility.log", "w", encoding="utf-8")
    # seed outermost: a run cut short by --max-minutes still has every point for the seeds it finished
    plan = [(m, e, s) for s in seeds for e in epsilons for m in variants]
    runs: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for i, (method, eps, seed) in enumerate(plan, 1):
        elapsed = time.perf_counter() - t0
        if elapsed > args.max_minutes * 60:
            msg = f"stopping: {args.max_minutes:g} min reached after {i - 1}/{len(plan)} runs"
            print(msg, file=sys.stderr, flush=True)
            log.write(msg + "\n")
            break
        t = time.perf_counter()
        personal = method.startswith("FedPer") or "fine-tune" in method
        # FedPer's own local-only baseline (the same MLP alone) only without DP: the per-hospital table
        if method == POOLED:
            result = pooled_run(with_epsilon(variants[method], eps), seed=seed, noise=not math.isinf(eps))
        else:
            result = one_run(with_epsilon(variants[method], eps), seed=seed,
                             baselines=method == "FedAvg" or (method.startswith("FedPer") and math.isinf(eps)),
                             personal=personal)
        runs.append({"method": method, "eps": eps, "seed": seed, "result": result, "wall_s": time.perf_counter() - t})
        done = time.perf_counter() - t0
        eta = done / i * (len(plan) - i)
        m = result["model"]
        line = (f"[{i}/{len(plan)}] {method:<17} ε={eps:<4g} seed={seed} acc={m['acc']:.3f} auc={m['auc']:.3f} "
                f"mean_acc={m['mean_acc']:.3f} ({time.perf_counter() - t:.0f}s, ETA {eta / 60:.1f} min)")
        print(line, file=sys.stderr, flush=True)
        log.write(line + "\n")
        log.flush()
    eps_keys = ["inf" if math.isinf(e) else f"{e:g}" for e in epsilons]
    table = summarise(runs)
    md = tables(runs, eps_keys)
    doc = {"example": str(EXAMPLE.relative_to(ROOT)), "epsilons": eps_keys, "seeds": seeds, "delta": 1e-5,
           "summary": {s: {e: {k: list(v) if isinstance(v, tuple) else v for k, v in row.items()}
                           for e, row in rows.items()} for s, rows in table.items()},
           "runs": runs, "flamby": FLAMBY, "wall_s": time.perf_counter() - t0}
    (args.out / "privacy_utility.json").write_text(json.dumps(doc, indent=1, default=str))
    plot(table, eps_keys, args.out / "privacy_utility.png")
    print(md)
    log.write(md + "\n")
    log.close()
    print(f"\nwrote {args.out / 'privacy_utility.json'}, .png, .log ({(time.perf_counter() - t0) / 60:.1f} min)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
