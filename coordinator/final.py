"""The end of a run: every site scores the final global model on its fixed test split
(the tasks and answers: ``coordinator/rounds/evaluation.py``; here, what the answers mean).

Without personalisation that is an ``EvalTask(split="test")``. When the experiment
personalises (``training.personalization``, or a private head: ``TaskConfig.personal_layers``), each site that trained in the run
gets a signed ``PersonalizeTask`` with the final weights instead: it fine-tunes its own
copy under its own budget and answers one ``EvalResult`` holding the global model's test
metrics and the personalised model's (``personalized_*``), released together. Sites that
never trained get the plain ``EvalTask``. Replies go through the same inbox as every other
message (signature, run, replay, bounds); they are recorded and acked when the final
figures are stored.

The result's ``final`` block: n-weighted means over the sites (``accuracy``... and
``majority_class_accuracy``), ``per_site[site]`` with ``sensitivity``, ``specificity``,
``majority_class_accuracy``, ``n_test`` and ``personalized`` {accuracy, auc, f1,
sensitivity, specificity, loss, n_test}, and ``personalized`` (its n-weighted means and
``mean_accuracy``/``mean_auc``, the plain mean over sites, left out under DP metrics:
it has no interval). ``split`` is ``"test"``.

Every classification figure carries its 95 % interval beside it (``ci: {name: [lo, hi]}``),
and one whose interval is too wide to say anything is ``None`` with
``withheld: {name: "too few test rows for this budget"}`` (``protocol.dp_figures``). The
union's figures, when every site sent its binary confusion cells, come from the summed cells
(noise variances add): one consistent matrix with intervals, not a mean of noisy ratios.
Under DP without cells the union's AUC is not shown: a mean of binned AUCs has no interval.

Under secure aggregation the union's figures come instead from the unmasked SUM of the sites'
masked union vectors (``union``: ``protocol.secagg.union.union_figures``, noise added once for
the union, not once per site), in the same form (value, ``ci``, ``withheld``); the caller marks
``union_source``. Per-site figures stay each site's own release.
"""

from __future__ import annotations

from typing import Any

from coordinator.metrics import weighted_mean
from protocol import dp_figures
from protocol.config import Experiment
from protocol.messages import TaskConfig

PREFIX = "personalized_"
_NOT_GLOBAL = {"epsilon", "delta", "eval_s", "personalize_s", "n", "predicts_one_class", "one_class_dp_estimate",
               "union_share_sd", "union_loss_clip"}


def personalises(experiment: Experiment, config: TaskConfig) -> bool:
    """The run asks for a personal model per site: a fine-tune, or a private head (the
    aggregator's ``TaskConfig.personal_layers``, e.g. FedPer's)."""
    return experiment.training.personalization is not None or config.personal_layers > 0


def method(experiment: Experiment, config: TaskConfig, aggregator: str) -> str:
    parts = []
    if config.personal_layers > 0:
        parts.append(f"{aggregator} head ({config.personal_layers} layer(s))")
    p = experiment.training.personalization
    if p is not None:
        parts.append(f"fine-tune {p.mode} {p.epochs} epoch(s)")
    return " + ".join(parts)


def _site_block(m: dict[str, float], *, prefix: str = "", n_key: str = "n") -> dict[str, Any]:
    out: dict[str, Any] = {k: m.get(prefix + k) for k in ("accuracy", "auc", "f1", "loss")}
    out.update({k: m[prefix + k] for k in ("sensitivity", "specificity") if m.get(prefix + k) is not None})
    out.update(dp_figures.block(m, prefix=prefix))  # each figure with its ci; too wide: withheld
    n = m.get(n_key)
    out["n_test"] = int(n) if n is not None else None
    if isinstance(m.get(prefix + "noise_sd"), (int, float)):  # public: the release's noise SD per cell (0: exact)
        out["noise_sd"] = float(m[prefix + "noise_sd"])
    if m.get(prefix + "predicts_one_class") is not None:  # a flag, not a figure: exact, or a DP estimate
        out["predicts_one_class"] = bool(m[prefix + "predicts_one_class"])
        if m.get(prefix + "one_class_dp_estimate"):
            out["one_class_estimate"] = "dp"  # from the noisy test counts (site_worker.final_model)
    return out


def one_class_warnings(final: dict[str, Any]) -> list[str]:
    """The report's and the CLI tables' one-class warnings for a result's ``final`` block: a
    model that predicts one class is a majority-class predictor, whatever its accuracy. Under
    DP metrics the flag is an estimate from noisy counts, and the text says so."""
    notes = []
    if final.get("predicts_one_class"):
        notes.append("the global model predicts one class only on the union of test splits")
    for s, m in (final.get("per_site") or {}).items():
        for tag, block in (("global", m), ("personalised", m.get("personalized") or {})):
            if not block.get("predicts_one_class"):
                continue
            if block.get("one_class_estimate") == "dp":
                share = block.get("predicted_positive_share")
                notes.append(f"{s}: the {tag} model appears to predict one class (DP estimate from the noisy test "
                             "counts" + (f": about {share:.0%} predicted positive" if share is not None else "")
                             + ")")
            else:
                notes.append(f"{s}: the {tag} model predicts one class only (accuracy = that class's share)")
    return notes


def _pooled(means: dict[str, float], sites: list[dict[str, float]]) -> dict[str, Any]:
    """The union's figures: from the summed confusion cells when every site sent them (with
    intervals), else the n-weighted means; under DP the figures a mean cannot give an interval
    for (AUC, sensitivity...) are left out. The majority-class figure stays the sites' mean."""
    dp = any(m.get("noise_sd") for m in sites)
    pooled = dp_figures.union(sites)
    if pooled is not None:
        keep = {k: v for k, v in means.items()
                if k not in dp_figures.WITH_CI or k == "majority_class_accuracy" or (k == "auc" and not dp)}
        flat = {**{k: v for k, v in pooled.items() if not k.startswith("majority_class_accuracy") and k != "n"}, **keep}
    elif dp:  # a mean of noisy figures has no interval: not shown (only pooled cells give one)
        flat = {k: v for k, v in means.items() if k not in dp_figures.WITH_CI or k == "majority_class_accuracy"}
    else:
        flat = means
    return {**{k: v for k, v in flat.items() if not k.endswith(("_lo", "_hi"))}, **dp_figures.block(flat)}


def _from_sum(means: dict[str, float], union: dict[str, float]) -> dict[str, Any]:
    """The union's block from the secure sum's figures (with intervals). The majority-class
    baseline comes from the same sum's class counts, with its interval: the sites' own releases
    carry √N times the noise, so their mean is often withheld where the union's is not."""
    flat = {k: v for k, v in union.items() if k != "n"}
    if flat.get("majority_class_accuracy") is None and means.get("majority_class_accuracy") is not None:
        flat = {k: v for k, v in flat.items() if not k.startswith("majority_class_accuracy")}
        flat["majority_class_accuracy"] = means["majority_class_accuracy"]
    return {**{k: v for k, v in flat.items() if not k.endswith(("_lo", "_hi"))}, **dp_figures.block(flat)}


def summarise(experiment: Experiment, results: dict[str, dict[str, float]], *, config: TaskConfig,
              aggregator: str, union: dict[str, float] | None = None) -> dict[str, Any]:
    """The ``final`` block of the result (see the module docstring); ``union``: the figures of
    the secure sum of the sites' union vectors, which replace the pooled per-site releases."""
    glob = {s: {k: v for k, v in m.items() if not k.startswith(PREFIX) and k not in _NOT_GLOBAL}
            for s, m in results.items()}
    means = weighted_mean([(g, results[s]["n"]) for s, g in glob.items()])
    agg = _pooled(means, list(results.values())) if union is None else _from_sum(means, union)
    final: dict[str, Any] = {k: agg.get(k) for k in ("loss", "accuracy", "auc", "f1")}
    final.update({k: v for k, v in agg.items() if k not in final})
    per_site: dict[str, Any] = {}
    personal: dict[str, dict[str, float]] = {}
    for s, m in sorted(results.items()):
        block = _site_block(m)
        if m.get("majority_class_accuracy") is not None and "majority_class_accuracy" not in block:
            block["majority_class_accuracy"] = m["majority_class_accuracy"]
        if m.get("epsilon") is not None:
            block["epsilon"] = m["epsilon"]
        if any(k.startswith(PREFIX) for k in m):
            block["personalized"] = _site_block(m, prefix=PREFIX, n_key=PREFIX + "n")
            personal[s] = {k[len(PREFIX):]: v for k, v in m.items() if k.startswith(PREFIX)}
        per_site[s] = block
    final["per_site"] = per_site
    final["n_test"] = sum(int(m["n"]) for m in results.values())
    final["n_sites"] = len(results)
    final["split"] = "test"
    if personal:
        pagg = weighted_mean([({k: v for k, v in pm.items() if k not in _NOT_GLOBAL}, float(pm.get("n") or results[s]["n"]))
                              for s, pm in personal.items()])
        pagg = _pooled(pagg, list(personal.values()))
        # the plain mean over sites has no interval: under DP metrics it is not released
        noisy = any(pm.get("noise_sd") for pm in personal.values())
        accs = [pm["accuracy"] for pm in personal.values() if pm.get("accuracy") is not None and not noisy]
        aucs = [pm["auc"] for pm in personal.values() if pm.get("auc") is not None and not noisy]
        final["personalized"] = {"method": method(experiment, config, aggregator), **pagg, "n_sites": len(personal),
                                 "mean_accuracy": sum(accs) / len(accs) if accs else None,
                                 "mean_auc": sum(aucs) / len(aucs) if aucs else None}
    return final


__all__ = ["method", "one_class_warnings", "personalises", "summarise"]
