"""Evaluation: a round's validation figures, the periodic test, and the run's final scores.

* validation (every round): the ``after_*`` metrics the updates carry, or with
  ``fraction_eval`` > 0 ``EvalTask(split="validation")`` to a sample of sites;
* test every ``federated.test_every`` rounds: ``EvalTask(split="test")`` to each available
  site whose ``max_evaluations_per_run`` leaves room for it and the final test;
* final: every site of the run scores the final model on its fixed test split, an
  ``EvalTask``, or a ``PersonalizeTask`` when the run personalises (``coordinator/final.py``
  turns the answers into the result's ``final`` block). Under secure aggregation (the sync loop or FedBuff)
  the ``EvalTask`` carries ``union_tag``: each DP-metrics site's answer adds its masked union
  vector, and the union's figures come from their unmasked sum (``SecureSync.union``).

Answers go through the inbox like every other message; they are held and recorded with
the round (or, for the final ones, when the final figures are stored).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from coordinator import final
from coordinator.inbox import Held, Message
from coordinator.metrics import after_training, validation_weight, weighted_mean
from coordinator.progress import RoundProgress
from coordinator.rounds.context import RunContext
from coordinator.sampling import sample_count, sample_sites
from coordinator.secagg import MaskedSum
from coordinator.validation import Rejected
from protocol.messages import Declined, EvalResult, TaskConfig, Tensors
from protocol.secagg.union import union_planned

if TYPE_CHECKING:
    from coordinator.rounds.secure import SecureSync


class Evaluation:
    """Sends evaluation tasks of a run and gathers their answers."""

    def __init__(self, ctx: RunContext, *, task_config: Callable[[int], TaskConfig], aggregator: str) -> None:
        self.ctx = ctx
        self.task_config = task_config  # the aggregator's config of a round's tasks (a private head, ...)
        self.aggregator = aggregator
        self._union: tuple[SecureSync, MaskedSum] | None = None  # the final test's masked union sum, while open

    # ------------------------------------------------------------------ per round
    def validation(self, rnd: int, new_weights: Tensors, accepted: dict[str, Held], held: dict[str, Held],
                   sites: list[str], progress: RoundProgress) -> dict[str, Any]:
        """Aggregated validation metrics of a round: EvalTasks when fraction_eval > 0, else after_* of the updates."""
        fed = self.ctx.experiment.federated
        per_site: dict[str, dict[str, Any]] = {}
        for site, h in accepted.items():
            m: dict[str, Any] = after_training(h.payload.metrics)
            m["n"] = validation_weight(h.payload.metrics, h.payload.num_examples)
            for k in ("train_s", "samples_per_s", "steps"):
                if k in h.payload.metrics:
                    m[k] = h.payload.metrics[k]
            if h.payload.epsilon is not None:
                m["epsilon"] = h.payload.epsilon
            m["reproducible"] = h.payload.reproducible  # the site's DP noise is reproducible by its own setting
            per_site[site] = m
        source = "updates"
        agg = weighted_mean([({k: v for k, v in m.items() if k not in ("epsilon", "reproducible")}, m["n"])
                             for m in per_site.values()])
        if fed.fraction_eval > 0:
            chosen = sample_sites(sites, sample_count(len(sites), fed.fraction_eval, fed.min_eval_clients),
                                  seed=self.ctx.seed, round=rnd, purpose="eval")
            results = self.collect(chosen, new_weights, rnd, split="validation", held=held, progress=progress)
            if len(results) >= min(fed.min_eval_clients, len(chosen)) and results:
                source = "evaluation"
                agg = weighted_mean([(m, float(m.get("n", 0))) for m in results.values()])
                for site, m in results.items():
                    per_site.setdefault(site, {}).update({f"eval_{k}": v for k, v in m.items()})
        return {"aggregate": agg, "per_site": per_site, "source": source}

    def round_test(self, rnd: int, new_weights: Tensors, held: dict[str, Held], sites: list[str],
                   progress: RoundProgress, metrics: dict[str, Any]) -> None:
        """Every ``federated.test_every`` rounds: EvalTask(split="test") to every available site.

        Each answer is a release the site charges to its own ledger; a site may decline (budget,
        policy), and a site whose announced ``max_evaluations_per_run`` has room for only the
        final test is not asked. ``metrics["test_status"]`` says per site what happened."""
        every = self.ctx.experiment.federated.test_every
        if not every or rnd % every or rnd == self.ctx.rounds_planned:  # the last round's test is the final one
            return
        status: dict[str, str] = {}
        asked = []
        caps = {s["site_id"]: ((s["hello"] or {}).get("policy") or {}).get("max_evaluations_per_run")
                for s in self.ctx.store.sites()}
        used = self.ctx.tasks.evaluations()
        for site in sites:
            cap = caps.get(site)
            if isinstance(cap, int) and used[site] + 2 > cap:  # this one and the final test
                status[site] = f"not asked: max_evaluations_per_run {cap} leaves room only for the final test"
            else:
                asked.append(site)
        declined: dict[str, str] = {}
        results = self.collect(asked, new_weights, rnd, split="test", held=held, progress=progress, declined=declined)
        for site in asked:
            status[site] = "released" if site in results else (f"declined: {declined[site]}" if site in declined
                                                                else "no answer by the deadline")
        for site, m in results.items():
            metrics["per_site"].setdefault(site, {}).update({f"test_{k}": v for k, v in m.items()})
        metrics["test"] = (weighted_mean([({k: v for k, v in m.items() if k != "epsilon"}, float(m.get("n", 0)))
                                          for m in results.values()]) if results else None)
        metrics["test_status"] = status

    def collect(self, sites: list[str], weights: Tensors, rnd: int, *, split: str, held: dict[str, Held],
                progress: RoundProgress | None, declined: dict[str, str] | None = None) -> dict[str, dict[str, float]]:
        """Send EvalTasks to ``sites`` and gather their results until all answered or the deadline
        (``declined`` receives each refusing site's reason)."""
        deadline = time.time() + self.ctx.round_timeout_s
        pending: dict[str, str] = {}
        config = self.task_config(rnd)
        with self.ctx.tasks.batch():
            for site in sites:
                pending[self.ctx.tasks.evaluate(weights, site=site, round=rnd, split=split, deadline=deadline,
                                                config=config)] = site
        return self._gather(sites, rnd, split, pending, held, deadline, progress, declined,
                            on_deadline=lambda missing: self.ctx.log.warning(
                                "evaluation deadline passed", round=rnd, split=split, missing=missing))

    # ------------------------------------------------------------------ the end of the run
    def final(self, weights: Tensors, secure: SecureSync | None = None) -> dict[str, Any]:
        """Every site of the run scores the final model on its fixed test split: an EvalTask, or a
        PersonalizeTask to each site that trained when the run personalises; the ``final`` block.
        Under ``secure`` aggregation the union's figures come from the sum of the sites' masked
        union vectors (only the sum is unmasked), else from pooling the per-site releases."""
        ctx = self.ctx
        sites = sorted(set(ctx.sites) | set(ctx.registry.available(ctx.restrict)))
        ctx.sites = sites
        last = ctx.store.last_round(ctx.run_id)
        rnd = int(last["round"]) if last else 0
        config = self.task_config(rnd)
        personal = final.personalises(ctx.experiment, config)
        trained = {u["site"] for u in ctx.store.updates(ctx.run_id, verdict="accepted", kind="Update")}
        deadline = time.time() + ctx.round_timeout_s
        pending: dict[str, str] = {}
        union = secure.new_sum() if secure is not None and secure.agg is not None and union_planned(ctx.experiment) \
            else None
        self._union = (secure, union) if secure is not None and union is not None else None
        with ctx.tasks.batch():
            for site in sites:
                if personal and site in trained:
                    tid = ctx.tasks.personalize(weights, site=site, round=rnd, deadline=deadline, config=config)
                else:  # a roster site of a secure run: add the masked union vector (tagged past every round)
                    tag = rnd + 1 if union is not None and secure is not None and site in secure.sites else 0
                    tid = ctx.tasks.evaluate(weights, site=site, round=rnd, split="test", deadline=deadline,
                                             config=config, union_tag=tag)
                pending[tid] = site
        held: dict[str, Held] = {}
        results = self._gather(sites, rnd, "test", pending, held, deadline, None, None,
                               on_deadline=lambda missing: ctx.log.warning(
                                   "final evaluation deadline passed", round=rnd, missing=missing))
        self._union = None
        figures, source = None, "per_site_releases"
        if secure is not None and union is not None and results:
            figures, why = secure.union(rnd, union, results, held)
            if figures is not None:
                source = why
            else:
                ctx.log.warning("union metrics from the per-site releases, not a secure sum", reason=why)
                source = f"per_site_releases ({why})"
        ctx.inbox.bodies.wait()  # every stored body durable before the rows that name them (bodies.py)
        ctx.store.record([h.row for h in held.values()])
        for h in held.values():
            h.delivery.ack()
        out = final.summarise(ctx.experiment, results, config=config, aggregator=self.aggregator, union=figures)
        if secure is not None:
            out["union_source"] = source
        return out

    # ------------------------------------------------------------------ answers
    def _gather(self, sites: list[str], rnd: int, split: str, pending: dict[str, str], held: dict[str, Held],
                deadline: float, progress: RoundProgress | None, declined: dict[str, str] | None, *,
                on_deadline: Callable[[list[str]], None]) -> dict[str, dict[str, float]]:
        """Route answers until every site answered or ``deadline`` passed (``on_deadline``: the missing)."""
        results: dict[str, dict[str, float]] = {}
        answered: set[str] = set()
        while len(answered) < len(sites):
            delivery = self.ctx.inbox.next(deadline)
            if delivery is None:
                if time.time() >= deadline:
                    on_deadline(sorted(set(sites) - answered))
                    break
                continue
            self.ctx.inbox.handle(delivery, round=rnd, held=held,
                                  route=lambda msg: self._answer(msg, rnd, split, pending, results, answered, held,
                                                                 declined))
            if progress is not None:
                progress.note(f"{split} {len(answered)}/{len(sites)}")
        return results

    def _answer(self, msg: Message, rnd: int, split: str, pending: dict[str, str],
                results: dict[str, dict[str, float]], answered: set[str], held: dict[str, Held],
                declined: dict[str, str] | None = None) -> None:
        inbox = self.ctx.inbox
        p, site = msg.payload, msg.site
        if pending.get(getattr(p, "task_id", "")) != site:
            return inbox.settle(msg, verdict="late", reason="not an answer to an open evaluation task", round=rnd)
        if isinstance(p, Declined):
            answered.add(site)
            if declined is not None:
                declined[site] = f"{p.reason}: {p.detail}"
            return inbox.decline(msg, round=rnd)
        if not isinstance(p, EvalResult) or site in answered:
            return inbox.settle(msg, verdict="duplicate", reason="evaluation already answered", round=rnd)
        inbox.check_eval(msg)
        if p.union_tag or p.union_masked or p.union_shares:  # only a secure run's final test carries one
            if self._union is None:
                raise Rejected("secure_aggregation", "a union vector outside a secure run's final test")
            sec, total = self._union
            sec.accept_union(msg, rnd, total)  # relays its sealed shares, adds the masked vector
        m = dict(p.metrics)
        m["n"] = float(m.get("n", p.num_examples))
        inbox.hold(msg, held, payload=None, split=split)
        results[site] = m
        answered.add(site)


__all__ = ["Evaluation"]
