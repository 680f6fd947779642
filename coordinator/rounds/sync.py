"""Synchronous rounds (FedAvg and every server optimiser, central DP around any of them).

Each round: the aggregator's ``configure_fit`` picks the sites and the task config; the
loop sends them the model, folds each accepted update into the aggregator, retries the
missing with extra sites while fewer than ``min_fit_clients`` answered, then evaluates
and commits the round. A resumed round asks every sampled site again: updates of a
round that never committed do not exist (rounds commit atomically); duplicates of
earlier answers are settled by the inbox.
"""

from __future__ import annotations

import time
from typing import Any

from coordinator.aggregators import SyncAggregator
from coordinator.inbox import Held, Inbound, Message
from coordinator.progress import RoundProgress
from coordinator.rounds.context import RunContext, RunFailed, give_up, warn_reproducible
from coordinator.rounds.evaluation import Evaluation
from coordinator.sampling import sample_count
from coordinator.validation import Rejected
from coordinator.rounds.secure import SecureSync
from coordinator.secagg import MaskedSum
from protocol.messages import Declined, EvalResult, MaskedUpdate, TaskConfig, Tensors, Update


class SyncRounds:
    """Runs rounds ``first_round..rounds_planned`` (or until a stop request or early stopping)."""

    def __init__(self, ctx: RunContext, agg: SyncAggregator, evaluation: Evaluation) -> None:
        self.ctx = ctx
        self.agg = agg
        self.evaluation = evaluation
        # Under federated.secure_aggregation: masked updates, relayed shares, one unmask per round.
        self.secure = SecureSync(ctx) if ctx.experiment.federated.secure_aggregation is not None else None

    def run(self, weights: Tensors, first_round: int) -> Tensors:
        ctx = self.ctx
        if self.secure is not None:
            if first_round > 1:
                raise RunFailed("a run under secure aggregation cannot be resumed yet (its roster and the sites' "
                                "shares belong to the interrupted run): start a new run")
            self.secure.setup(ctx.available(), weights)
        with RoundProgress(ctx.rounds_planned, enabled=ctx.progress, start=first_round - 1) as progress:
            for rnd in range(first_round, ctx.rounds_planned + 1):
                if ctx.store.stop_requested(ctx.run_id):
                    break
                weights, stop = self._round(rnd, weights, progress)
                if stop:
                    ctx.log.info("early stopping", round=rnd, best_loss=ctx.early.best if ctx.early else None)
                    break
        return weights

    def _round(self, rnd: int, weights: Tensors, progress: RoundProgress) -> tuple[Tensors, bool]:
        ctx = self.ctx
        fed = ctx.experiment.federated
        sites = ctx.available()
        if self.secure is not None:  # only roster sites hold keys and shares
            sites = [s for s in sites if s in self.secure.sites]
        total = self.secure.new_sum() if self.secure is not None else None
        ctx.inbox.refresh_trust()
        t0 = time.monotonic()
        rlog = ctx.log.bind(round=rnd)
        self.agg.begin_round(rnd, weights)
        held: dict[str, Held] = {}
        accepted: dict[str, Held] = {}  # site -> its accepted update this round
        replied: set[str] = set()
        agg_s = 0.0
        plan = self.agg.configure_fit(rnd, sites, sample_count(len(sites), fed.fraction_fit, fed.min_fit_clients))
        sampled = plan.sites
        central = self.secure is not None and self.secure.central
        if central:  # user-level DP under secure aggregation: the coordinator's secret sample of the roster
            sampled = self.secure.sample(rnd, sites)  # type: ignore[union-attr]
        attempt = 0
        deadline = self._send_train(sampled, weights, rnd, plan.config)
        progress.begin(rnd, expected=plan.expected)
        while True:
            while len(replied) < len(sampled):
                delivery = ctx.inbox.next(deadline)
                if delivery is None:
                    if time.time() >= deadline:
                        break
                    continue
                t = time.monotonic()
                self._message(delivery, rnd, weights, sampled, held, accepted, replied, rlog, total)
                agg_s += time.monotonic() - t
                progress.replies(len(replied), len(sampled))
            if len(accepted) >= fed.min_fit_clients:
                break
            attempt += 1
            missing = sorted(set(sampled) - replied)
            if attempt > fed.max_round_retries:
                raise give_up(
                    held,
                    f"round {rnd}: {len(accepted)} update(s) accepted by the deadline but min_fit_clients="
                    f"{fed.min_fit_clients}, after {fed.max_round_retries} retries (no reply from: "
                    f"{', '.join(missing) or 'none'}; declined: {', '.join(sorted(replied - set(accepted))) or 'none'})"
                )
            # central: no site outside the round's sample (it would raise the sampling rate the ledgers charged)
            extra = [] if central else self.agg.configure_fit(rnd, sorted(set(sites) - set(sampled)),
                                                              fed.min_fit_clients - len(accepted), attempt=attempt).sites
            if not missing and not extra:
                raise RunFailed(
                    f"round {rnd}: {len(accepted)} update(s) accepted but min_fit_clients={fed.min_fit_clients}, and "
                    f"every available site has answered (declined: {', '.join(sorted(replied - set(accepted))) or 'none'})"
                )
            rlog.warning("round retry", attempt=attempt, accepted=len(accepted), missing=missing, adding=extra)
            sampled = sorted(set(sampled) | set(extra))
            deadline = self._send_train(missing + extra, weights, rnd, plan.config)
            progress.begin(rnd, expected=len(sampled))

        t = time.monotonic()
        if self.secure is not None and total is not None:  # the only contribution is the unmasked mean
            self.agg.add(self.secure.unmask(rnd, weights, total, held))
        new_weights = self.agg.finish_round()
        agg_s += time.monotonic() - t
        # Under secure aggregation no per-site training metric exists here (only EvalTask releases).
        val = self.evaluation.validation(rnd, new_weights, {} if self.secure else accepted, held, sites, progress)
        if self.secure is not None:
            val["secure_aggregation"] = self.secure.report["rounds"][-1]
        self.evaluation.round_test(rnd, new_weights, held, sites, progress, val)
        val["available"] = len(sites)  # with len(sampled): the round's sampling rate for central DP's ε
        t = time.monotonic()
        ctx.commit_round(rnd, new_weights, agg_state=self.agg.state(), sampled=sampled, attempts=attempt + 1,
                         held=held, accepted=accepted, metrics=val, wall_s=time.monotonic() - t0, agg_s=agg_s)
        agg_s += time.monotonic() - t
        progress.done(rnd, loss=val["aggregate"].get("loss"), accuracy=val["aggregate"].get("accuracy"))
        warn_reproducible(rlog, accepted)
        rlog.info("round committed", replies=len(accepted), loss=val["aggregate"].get("loss"),
                  accuracy=val["aggregate"].get("accuracy"))
        stop = ctx.early.update(val["aggregate"].get("loss")) if ctx.early else False
        return new_weights, stop

    def _send_train(self, sites: list[str], weights: Tensors, rnd: int, config: TaskConfig) -> float:
        deadline = time.time() + self.ctx.round_timeout_s
        with self.ctx.tasks.batch():
            for site in sites:
                self.ctx.tasks.train(weights, site=site, round=rnd, base_round=rnd - 1, deadline=deadline, config=config)
        return deadline

    def _message(self, inbound: Inbound, rnd: int, weights: Tensors, sampled: list[str], held: dict[str, Held],
                 accepted: dict[str, Held], replied: set[str], rlog: Any, total: MaskedSum | None = None) -> None:
        inbox, tasks = self.ctx.inbox, self.ctx.tasks

        def route(msg: Message) -> None:
            env, p, site = msg.env, msg.payload, msg.site
            if isinstance(p, EvalResult):
                return inbox.late_eval(msg, round=rnd)
            if self.secure is not None and self.secure.roster_refused(msg, rnd):
                return None
            if env.round != rnd:
                if env.round < rnd and site in tasks.tasked(env.round, "TrainTask"):
                    return inbox.settle(msg, verdict="late", reason=f"for round {env.round}, now in round {rnd}",
                                        round=rnd)
                raise Rejected("wrong_round", f"message for round {env.round} but round {rnd} is open"
                               + ("" if env.round < rnd else " (future round)"))
            if site not in sampled:
                raise Rejected("not_tasked", f"{site} was not asked to train in round {rnd}")
            if site in accepted or site in replied:
                return inbox.settle(msg, verdict="duplicate", reason=f"{site} already answered round {rnd}",
                                    round=rnd)
            if isinstance(p, Declined):
                replied.add(site)
                return inbox.decline(msg, round=rnd)
            if p.base_round != rnd - 1:
                raise Rejected("wrong_round", f"update trained from model version {p.base_round}, "
                               f"round {rnd} sent version {rnd - 1}")
            if (self.secure is not None) != isinstance(p, MaskedUpdate):
                raise Rejected("secure_aggregation", "this run is under secure aggregation: an unmasked Update is "
                               "refused and not stored" if isinstance(p, Update) else "a MaskedUpdate outside secure aggregation")
            if self.secure is not None and total is not None:
                self.secure.accept(msg, rnd, total)  # relays its sealed shares, adds the masked vector
                accepted[site] = inbox.hold(msg, held, payload=p)
                replied.add(site)
                return None
            h, _ = inbox.accept_update(msg, held, weights=weights, norm_bound=self.ctx.norm_bound, fold=self.agg.add)
            accepted[site] = h
            replied.add(site)
            rlog.debug("update accepted", site_id=site, num_examples=p.num_examples)

        inbox.handle(inbound, round=rnd, held=held, route=route)


__all__ = ["SyncRounds"]
