"""The run's result document (docs/design.md's, see docs/contracts.md) and its privacy block.

Everything here is read back from the state store, so a resumed run's document covers
the rounds committed before the crash as well. The privacy plan is announced before
round 1: logged always, and shown on the terminal through the progress reporter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from coordinator.progress import announce
from coordinator.rounds.context import RunContext
from protocol.messages import Tensors


COMPLETED = "completed"
COMPLETED_WITH_GAPS = "completed_with_gaps"  # ran to its end, but a sampled site declined or missed a round
EXIT_WITH_GAPS = 3  # the CLI's exit code for it (0 completed, 1 failed, 2 bad input)


def gaps(rounds: list[dict[str, Any]], updates: list[dict[str, Any]], *,
         synchronous: bool = True) -> list[dict[str, Any]]:
    """Every (round, site) where a site asked to take part gave the round nothing: each sampled
    site of a committed round without an accepted update, and every decline (the final
    evaluation's included), with the reason: the site's decline, a late or rejected reply,
    or no reply by the deadline. Sorted by round, then site.

    An asynchronous loop (FedAsync, FedBuff) asks no site for a given version: a version's
    sites are the contributors it merged (each update filed under the version it was trained
    from), and a stale update is the loop working, so only declines are gaps there."""
    accepted = {(u["round"], u["site"]) for u in updates
                if u["verdict"] == "accepted" and u.get("kind") in ("Update", "MaskedUpdate")}
    said: dict[tuple[int, str], str] = {}
    for u in updates:  # what the site's own messages say, a decline first
        key = (u["round"], u["site"])
        if u["verdict"] in ("declined", "late", "rejected") and key not in accepted and u["site"]:
            text = f"{u['verdict']}: {u['reason']}" if u["reason"] else str(u["verdict"])
            if key not in said or u["verdict"] == "declined":
                said[key] = text
    out: dict[tuple[int, str], str] = {}
    for r in rounds if synchronous else []:
        for site in r.get("sampled") or []:
            key = (int(r["round"]), site)
            if key not in accepted:
                out[key] = said.get(key, "no reply by the round's deadline")
    for key, text in said.items():
        if text.startswith("declined"):
            out.setdefault(key, text)
    return [{"round": rnd, "site": site, "reason": out[(rnd, site)]} for rnd, site in sorted(out)]


def describe_gaps(items: list[dict[str, Any]]) -> str:
    """One line for people: which sites, which rounds, why."""
    by_site: dict[str, list[str]] = {}
    for g in items:
        by_site.setdefault(g["site"], []).append(f"round {g['round']} ({g['reason']})")
    return "; ".join(f"{site}: {', '.join(parts)}" for site, parts in sorted(by_site.items()))


@dataclass
class RunResult:
    """What a run produced; ``to_json`` is the docs/design.md result document."""

    run_id: str
    aggregator: str
    sites: list[str]
    rounds: list[dict[str, Any]]
    final: dict[str, Any]
    epsilon: dict[str, float | None]
    timing: dict[str, float]
    rejected: list[dict[str, Any]]
    declined: list[dict[str, Any]] = field(default_factory=list)
    gaps: list[dict[str, Any]] = field(default_factory=list)
    privacy: dict[str, Any] = field(default_factory=dict)
    status: str = "completed"
    reason: str | None = None
    weights: Tensors | None = None
    checkpoint: str | None = None
    # This process's resident memory (Linux): VmHWM before the first model-sized buffer and at the end,
    # and the model's size, in MiB (issue 23's bound: peak within 3 models of the floor).
    memory: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """The run ran to its end (with or without gaps)."""
        return self.status in (COMPLETED, COMPLETED_WITH_GAPS)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "aggregator": self.aggregator,
            "sites": self.sites,
            "rounds": self.rounds,
            "final": self.final,
            "epsilon": self.epsilon,
            "timing": self.timing,
            "rejected": self.rejected,
            "declined": self.declined,
            "gaps": self.gaps,
            "privacy": self.privacy,
            "status": self.status,
            "reason": self.reason,
            "checkpoint": self.checkpoint,
            "memory": self.memory,
        }


def announce_plan(ctx: RunContext, plan: dict[str, Any] | None, *, show: bool) -> dict[str, Any] | None:
    """The privacy plan before round 1 (``plan``, else made from the rows each site announced):
    in the log, and on the terminal when ``show``; returns it."""
    if plan is None and ctx.experiment.training.dp is None:
        return None  # no site DP, no plan: and no import of the budget arithmetic (Opacus: seconds)
    from coordinator import (
        privacy_plan as plans,  # imports the sites' budget arithmetic: only when a run starts
    )

    if plan is None:
        hellos = {s: (ctx.store.site(s) or {}).get("hello") for s in ctx.sites}
        plan = plans.plan(ctx.experiment, hellos)
    if plan is None:
        return None
    ctx.log.info("privacy plan", total_epsilon=plan["total_epsilon"], delta=plan["delta"],
                 accountant=plan["accountant"], planned_epsilon=plans.planned_epsilon(plan))
    if show:
        announce(plans.describe(plan))
    return plan


def build_result(ctx: RunContext, *, aggregator: str, plan: dict[str, Any] | None, status: str, reason: str | None,
                 final: dict[str, Any], weights: Tensors, wall_s: float, synchronous: bool = True) -> RunResult:
    store, run_id = ctx.store, ctx.run_id
    rounds = store.rounds(run_id)
    rows = [{"round": r["round"], "loss": r["loss"], "accuracy": r["accuracy"], "auc": r["auc"],
             "replies": r["replies"], "wall_s": r["wall_s"],
             # Under secure aggregation: what the coordinator saw (contributors, who answered, the weight sum).
             **({"secure_aggregation": r["metrics"]["secure_aggregation"]}
                if "secure_aggregation" in (r.get("metrics") or {}) else {})} for r in rounds]
    eps: dict[str, float | None] = {s: None for s in ctx.sites or ctx.restrict or []}
    for line in store.privacy(run_id):
        if line["epsilon"] is not None:
            eps[line["site"]] = max(line["epsilon"], eps.get(line["site"]) or 0.0)
        else:
            eps.setdefault(line["site"], None)
    for site, m in (final.get("per_site") or {}).items():  # after the final task (a fine-tune spends)
        if m.get("epsilon") is not None:
            eps[site] = max(float(m["epsilon"]), eps.get(site) or 0.0)
    upd = store.updates(run_id)
    rejected = [{"message_id": u["message_id"], "site": u["site"], "reason": u["reason"], "round": u["round"]}
                for u in upd if u["verdict"] == "rejected"]
    declined = [{"message_id": u["message_id"], "site": u["site"], "reason": u["reason"], "round": u["round"]}
                for u in upd if u["verdict"] == "declined"]
    timing = {
        "wall_s": wall_s,
        "train_s": sum(r["train_s"] or 0.0 for r in rounds),
        "communication_s": sum(r["communication_s"] or 0.0 for r in rounds),
        "aggregation_s": sum(r["aggregation_s"] or 0.0 for r in rounds),
    }
    last = rounds[-1] if rounds else None
    missed = gaps(rounds, upd, synchronous=synchronous)
    if status == COMPLETED and missed:
        status, reason = COMPLETED_WITH_GAPS, "completed with gaps: " + describe_gaps(missed)
    return RunResult(
        run_id=run_id, aggregator=aggregator, sites=sorted(eps), rounds=rows, final=final,
        epsilon=eps, timing=timing, rejected=rejected, declined=declined, gaps=missed,
        privacy=_privacy(ctx, plan, rounds, eps, final), status=status, reason=reason,
        weights=weights, checkpoint=str(store.dir / last["checkpoint_path"]) if last else None,
    )


def _privacy(ctx: RunContext, plan: dict[str, Any] | None, rounds: list[dict[str, Any]],
             eps: dict[str, float | None], final: dict[str, Any] | None = None) -> dict[str, Any]:
    """``reproducible_dp``: sites whose DP noise was reproducible (their setting); ``central``: central DP's ε;
    with site DP: δ, accountant, ε per site (reported by the sites) and the plan shown before round 1."""
    out: dict[str, Any] = {"reproducible_dp": sorted({
        site for r in rounds for site, m in (r["metrics"].get("per_site") or {}).items() if m.get("reproducible")})}
    if plan is not None:
        from coordinator import privacy_plan as plans

        p = plan
        out.update(delta=p["delta"], accountant=p["accountant"], epsilon=dict(eps),
                   planned_epsilon=plans.planned_epsilon(p), total_epsilon=p["total_epsilon"],
                   mode=p.get("mode"), planned_from=p["planned_from"], plan=p["sites"])
        if p.get("upper_bound"):
            out["planned_is_upper_bound"] = p["upper_bound"]
    central = ctx.experiment.federated.central_dp
    if central:
        out["central"] = _central_privacy(central, rounds, ctx.store.run(ctx.run_id)["sites"])
    out["secure_aggregation"] = _secure_summary(ctx, rounds, final or {})
    return out


def _secure_summary(ctx: RunContext, rounds: list[dict[str, Any]], final: dict[str, Any]) -> dict[str, Any]:
    """Whether the run used secure aggregation and what the coordinator saw of the sites' updates."""
    sa = ctx.experiment.federated.secure_aggregation
    if sa is None:
        return {"used": False, "coordinator_saw": "each contributing site's update in the clear"}
    sums = [r["metrics"]["secure_aggregation"] for r in rounds if "secure_aggregation" in (r.get("metrics") or {})]
    saw = ("each site's masked update (uniform field elements) and the unmasked sum of each "
           + ("buffer" if ctx.experiment.federated.name == "FedBuff" else "round")
           + " with its weight sum: never one site's update, row count or training metric")
    if sa.dp == "pooled":
        saw = ("each site's masked update (uniform field elements) and each round's unmasked sum of the sites' "
               "noisy integer batch gradients (pooled Skellam noise, added by the sites): never one site's step, "
               "batch size or training metric, never an un-noised sum")
    elif sa.dp == "central":
        which = ("each buffer's unmasked sum of its sites'" if ctx.experiment.federated.name == "FedBuff" else
                 "each round's unmasked sum of the sampled sites'")
        saw = (f"each site's masked update (uniform field elements) and {which} clipped, rounded updates with their "
               "Skellam noise shares (user-level DP, noise added by the sites, uniform weights): never one site's "
               "update, row count or training metric, never an un-noised sum")
    metrics = ("the final test's union figures: only the unmasked sum of the sites' masked union vectors "
               "(confusion cells, score histogram, clipped loss sum, each with its share of the DP noise), "
               "besides each site's own DP release" if final.get("union_source") == "secure_sum" else
               "each site's own metrics release" + (f"; union from pooling them: {final['union_source']}"
                                                    if final.get("union_source") else ""))
    return {"used": True, "metrics_saw": metrics, "union_source": final.get("union_source"),
            "min_contributors": sa.min_contributors, "threshold": sa.threshold, "privacy": sa.privacy,
            "clip": sa.clip, "scale": sa.scale, "sums_unmasked": len(sums), "dp": sa.dp,
            "fewest_contributors": min((int(x["contributors"]) for x in sums), default=None), "coordinator_saw": saw}


def _central_privacy(central: Any, rounds: list[dict[str, Any]], run_sites: list[str]) -> dict[str, Any]:
    """Central DP's ε for the rounds committed: Opacus' RDP accountant, q = sampled / available per round."""
    from coordinator.aggregators.central_dp import central_epsilon

    rates = [min(1.0, len(r["sampled"]) / max(1, int(r["metrics"].get("available") or len(run_sites) or 1)))
             for r in rounds]
    eps = central_epsilon(central.noise_multiplier, rates, central.delta)
    return {"epsilon": eps, "delta": central.delta, "accountant": "rdp", "noise_multiplier": central.noise_multiplier,
            "clip_norm": central.clip_norm, "rounds": len(rates), "sample_rates": rates,
            "mechanism": "user-level DP-FedAvg (McMahan et al. 2018): equal weights, fixed denominator qN",
            "note": None if eps is not None else "noise_multiplier 0: no finite epsilon"}


def stored_result(doc: dict[str, Any], weights: Tensors) -> RunResult:
    """The result of a run that had already finished (``--resume`` of a finished run)."""
    fields = {k: doc.get(k) for k in ("run_id", "aggregator", "sites", "rounds", "final", "epsilon", "timing", "rejected",
                                      "declined", "gaps", "privacy", "status", "reason", "checkpoint", "memory")}
    fields = {k: (v if v is not None else ([] if k in ("sites", "rounds", "rejected", "declined", "gaps") else
                                          {} if k in ("final", "epsilon", "timing", "privacy", "memory") else None))
              for k, v in fields.items()}
    return RunResult(**cast(dict[str, Any], fields), weights=weights)


__all__ = ["COMPLETED", "COMPLETED_WITH_GAPS", "EXIT_WITH_GAPS", "RunResult", "announce_plan", "build_result", "describe_gaps",
           "gaps", "stored_result"]
