"""A finished run's figures as the run page shows them: each site's own test split, its
majority-class baseline and personalised model, a warning where a model predicts one class,
and (kept apart, under its own name) what ``simulate`` scored on its held-out rows.

Everything here reads the stored result (``runs.result_json``, the coordinator's ``final``
from each site's final evaluation, issue 11) or ``simulate``'s ``result.json``; nothing is
recomputed from rows. A figure the result does not hold comes back ``None``.
"""

from __future__ import annotations

from typing import Any

SITE_METRICS = ("loss", "accuracy", "auc", "f1", "sensitivity", "specificity")
PERSONAL_METRICS = ("accuracy", "auc", "f1", "sensitivity", "specificity", "loss")
MAJORITY_BASIS = "mean of the sites' majority-class baselines, weighted by test rows"
SUM_MAJORITY_BASIS = "from the secure sum of the sites' class counts, with its 95 % interval"
TEST_SOURCE = "each site's fixed test split, scored by the site at the end of the run"
HOLDOUT_SOURCE = "the simulator's held-out rows: kept back from every site, not any site's test split"


def num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def one_class(m: dict[str, Any] | None) -> str | None:
    """Why a model looks like it predicts one class on a test split, or None.

    The site's flag when it sent one (exact, or under DP metrics an estimate from the noisy
    test counts, said so); otherwise a sensitivity or specificity of 0."""
    if not isinstance(m, dict):
        return None
    if m.get("predicts_one_class") is True:
        if m.get("one_class_estimate") == "dp":
            return "it appears to predict one class (DP estimate from the noisy test counts)"
        return "it predicts the same class for every test patient"
    if num(m.get("sensitivity")) == 0.0:
        return "sensitivity 0: it finds no patient with the outcome"
    if num(m.get("specificity")) == 0.0:
        return "specificity 0: it flags every patient without the outcome"
    return None


def figures(m: dict[str, Any], names: tuple[str, ...], *, dp: bool = False) -> dict[str, Any]:
    """Figures with their 95 % intervals (``ci``) and the ones withheld as too uncertain
    (``withheld``), as the result stores them (``protocol.dp_figures.block``). Under DP metrics
    (``dp``) a released figure without an interval is not shown (None): e.g. a mean of the sites'
    noisy AUCs, which no histogram backs (issue 24: "otherwise it is not shown")."""
    ci = dict(m.get("ci") or {})
    out = {k: num(m.get(k)) for k in names}
    if dp:
        out.update({k: None for k in names if k in WITH_CI and k not in ci})
    return {**out, "ci": ci, "withheld": dict(m.get("withheld") or {})}


WITH_CI = ("accuracy", "auc", "f1", "sensitivity", "specificity", "majority_class_accuracy")


def released_under_dp(m: dict[str, Any]) -> bool:
    """One site's block was released under DP metrics (its noise SD rides with it)."""
    return isinstance(m.get("noise_sd"), (int, float)) and not isinstance(m.get("noise_sd"), bool) and m["noise_sd"] > 0


def under_dp(final: dict[str, Any]) -> bool:
    """The sites released the final figures under DP metrics (their noise SD rides with them)."""
    return any(isinstance((m or {}).get("noise_sd"), (int, float)) and m["noise_sd"] > 0
               for m in (final.get("per_site") or {}).values())


def weighted_baseline(per_site: dict[str, Any]) -> float | None:
    """The sites' majority-class baselines, averaged with their test rows as weights (None if any is missing)."""
    pairs = [(num(m.get("majority_class_accuracy")), num(m.get("n_test"))) for m in per_site.values()]
    if not pairs or any(a is None or not n for a, n in pairs):
        return None
    return sum(a * n for a, n in pairs) / sum(n for _, n in pairs)


def site_block(fm: dict[str, Any]) -> dict[str, Any]:
    """One site's final figures on its own test split: global model, baseline, personalised model."""
    pm = fm.get("personalized") if isinstance(fm.get("personalized"), dict) else None
    # Under DP metrics a site figure whose interval could not be computed (e.g. an AUC whose noisy
    # histogram left a class empty in most draws) is not shown either.
    dp = released_under_dp(fm)
    return {
        "test": figures(fm, SITE_METRICS, dp=dp),
        "n_test": fm.get("n_test"),
        # under DP metrics the test-row count is the released matrix's total: a noisy figure too
        "n_test_noisy": dp,
        "majority_class_accuracy": num(fm.get("majority_class_accuracy")),
        # under DP metrics the baseline is a figure of the released matrix too: with its interval
        "majority": figures(fm, ("majority_class_accuracy",)),
        "one_class": one_class(fm),
        "personalized": ({**figures(pm, PERSONAL_METRICS, dp=dp or released_under_dp(pm)), "n_test": pm.get("n_test"),
                          "one_class": one_class(pm)} if pm else None),
    }


def personalises(experiment: dict[str, Any]) -> bool:
    """The experiment asks each site for a personal model (as ``coordinator.final.personalises``):
    a fine-tune, or a private head its aggregator asks for in the tasks' ``TaskConfig``."""
    if not isinstance(experiment, dict):
        return False
    training, fed = experiment.get("training") or {}, experiment.get("federated") or {}
    if training.get("personalization"):
        return True
    try:  # the aggregator's own answer; it needs no model to say what its tasks ask
        from coordinator.aggregators import get_aggregator

        agg = get_aggregator(str(fed.get("name")), parameters=dict(fed.get("parameters") or {}), initial=())
        return agg.task_config(1).personal_layers > 0
    except Exception:  # noqa: BLE001 - an aggregator this dashboard cannot build: no personal models shown
        return False


def final_doc(final: dict[str, Any], last_validation: Any) -> dict[str, Any]:
    """The run's headline: means over the sites' test splits, the weighted baseline, personalised means."""
    per_site = final.get("per_site") or {}
    p = final.get("personalized") if isinstance(final.get("personalized"), dict) else None
    stored = num(final.get("majority_class_accuracy"))
    summed = final.get("union_source") == "secure_sum" and stored is not None  # the union's own class counts
    baseline = None if summed else weighted_baseline(per_site)
    dp = under_dp(final)
    return {
        "test": figures(final, SITE_METRICS, dp=dp) if final else None,
        "validation": last_validation, "n_test": final.get("n_test"), "split": final.get("split"),
        "n_test_noisy": dp,  # the sum of the sites' released (noisy) totals
        # "secure_sum": the union's figures come from the unmasked sum of the sites' masked statistics
        # (noise once); otherwise a reason they were pooled from the sites' own releases
        "union_source": final.get("union_source"),
        "source": TEST_SOURCE if final else None,
        "majority_class_accuracy": baseline if baseline is not None else stored,
        "majority_basis": (SUM_MAJORITY_BASIS if summed else MAJORITY_BASIS if baseline is not None
                           else "as the result stores it" if stored is not None else None),
        "majority": figures(final, ("majority_class_accuracy",)) if summed else None,
        "personalized": ({**figures(p, PERSONAL_METRICS, dp=dp), "method": p.get("method"),
                          "n_sites": p.get("n_sites"), "basis": "mean over the sites, weighted by test rows"} if p else None),
        "one_class": {s: w for s, w in ((s, one_class(m)) for s, m in per_site.items()) if w},
        "per_site": per_site,
    }


def holdout_doc(overlay: dict[str, Any]) -> dict[str, Any] | None:
    """``simulate``'s held-out block, labelled as such (None outside a simulation)."""
    h = overlay.get("holdout")
    if not isinstance(h, dict) or not h:
        return None
    p = h.get("personalized") if isinstance(h.get("personalized"), dict) else None
    return {"source": HOLDOUT_SOURCE, "metrics": {k: num(h.get(k)) for k in SITE_METRICS}, "n": h.get("n_test"),
            "majority_class_accuracy": num(h.get("majority_class_accuracy")),
            "personalized": {k: num(p.get(k)) for k in PERSONAL_METRICS} if p else None}


def site_budgets(sites: list[dict[str, Any]], dataset: str | None) -> dict[str, float | None]:
    """Each site's ε budget for the run's dataset, as its hello announced it (dataset's, else its policy's)."""
    out: dict[str, float | None] = {}
    for s in sites:
        hello = s.get("hello") or {}
        policy = hello.get("policy") or {}
        ds = next((d for d in hello.get("datasets") or [] if d.get("name") == dataset), {})
        out[s["site_id"]] = num(ds.get("max_epsilon")) if ds.get("max_epsilon") is not None else num(policy.get("max_epsilon"))
    return out


def secure_of(experiment: dict[str, Any], privacy: dict[str, Any] | None) -> dict[str, Any]:
    """What the coordinator saw of the sites' updates: the finished run's own account
    (``privacy.secure_aggregation`` in its result), else, while it runs, its experiment's setting."""
    stored = (privacy or {}).get("secure_aggregation")
    if isinstance(stored, dict) and isinstance(stored.get("used"), bool):
        return stored
    sa = ((experiment or {}).get("federated") or {}).get("secure_aggregation")
    if isinstance(sa, dict):
        return {"used": True, "min_contributors": sa.get("min_contributors"), "threshold": sa.get("threshold"),
                "coordinator_saw": "the unmasked sums of the sites' masked updates, never one site's update"}
    return {"used": False, "coordinator_saw": "each contributing site's update in the clear"}

