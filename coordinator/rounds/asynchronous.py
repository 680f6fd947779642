"""Asynchronous rounds (FedAsync, FedBuff): merge each update on arrival.

The aggregator's ``configure_fit`` names the sites kept busy and how many accepted
updates make one global step (``expected``). Every global step is a committed version;
a site whose update was merged (or found too stale) gets the newest model at once.
An update's base version must be one this run sent it; its staleness τ = version − base.
"""

from __future__ import annotations

import time
from typing import Any

from coordinator import checkpoints
from coordinator.aggregators import AsyncAggregator
from coordinator.inbox import Held, Inbound, Message
from coordinator.metrics import after_training, validation_weight, weighted_mean
from coordinator.progress import RoundProgress
from coordinator.rounds.answers import admit
from coordinator.rounds.context import RunContext, give_up, warn_reproducible
from coordinator.rounds.patience import Patience
from coordinator.sampling import sample_count
from protocol.messages import EvalResult, Tensors

# (new weights or None, site to re-task or None); None: nothing changed
Step = tuple[Tensors | None, str | None] | None


class AsyncRounds:
    """Runs versions ``first_version..rounds_planned`` (or until a stop request or early stopping)."""

    def __init__(self, ctx: RunContext, agg: AsyncAggregator) -> None:
        self.ctx = ctx
        self.agg = agg

    def run(self, weights: Tensors, first_version: int, sites: list[str]) -> Tensors:
        """FedAsync / FedBuff: merge on arrival; each global step is a committed version."""
        ctx = self.ctx
        fed = ctx.experiment.federated
        version = first_version - 1
        versions: dict[int, Tensors] = {version: weights}
        plan = self.agg.configure_fit(version, sites, sample_count(len(sites), fed.fraction_fit, fed.min_fit_clients))
        active = plan.sites
        for site in active:
            self._task(weights, site, version)
        held: dict[str, Held] = {}
        merged: dict[str, Held] = {}
        patience = Patience(ctx.round_timeout_s, fed.max_round_retries)
        t_step = time.monotonic()
        agg_s = 0.0
        with RoundProgress(ctx.rounds_planned, enabled=ctx.progress, start=version) as progress:
            progress.begin(version + 1, expected=plan.expected)
            patience.restart()
            while version < ctx.rounds_planned and not ctx.store.stop_requested(ctx.run_id):
                delivery = ctx.inbox.next(patience.deadline)
                if delivery is None:
                    if not patience.silent():
                        continue
                    if patience.exhausted:
                        raise give_up(
                            held,
                            f"version {version + 1}: no update arrived for {ctx.round_timeout_s:.0f} s, "
                            f"{fed.max_round_retries} times in a row (sites tasked: {', '.join(active)})"
                        )
                    ctx.log.warning("no update before the deadline; re-sending tasks", version=version)
                    for site in active:
                        self._task(weights, site, version)
                    continue
                patience.heard()
                t = time.monotonic()
                step = self._message(delivery, version, weights, versions, held, merged)
                agg_s += time.monotonic() - t
                if step is None:
                    progress.replies(len(merged), plan.expected)
                    continue
                new_weights, delivering = step
                if new_weights is not None:
                    version += 1
                    val = _step_metrics(merged)
                    t = time.monotonic()
                    ctx.commit_round(version, new_weights, agg_state=self.agg.state(),
                                     sampled=sorted({_site(h) for h in merged.values()}), attempts=1, held=held,
                                     accepted=merged, metrics=val, wall_s=time.monotonic() - t_step, agg_s=agg_s)
                    warn_reproducible(ctx.log.bind(version=version), {_site(h): h for h in merged.values()})
                    merged = {}
                    weights = new_weights
                    versions[version] = weights
                    window = self.agg.max_staleness if self.agg.max_staleness is not None else 8
                    for v in [v for v in versions if v < version - window]:
                        del versions[v]
                    progress.done(version, loss=val["aggregate"].get("loss"), accuracy=val["aggregate"].get("accuracy"))
                    progress.begin(version + 1, expected=plan.expected)
                    t_step, agg_s = time.monotonic(), 0.0
                    if ctx.early and ctx.early.update(val["aggregate"].get("loss")):
                        ctx.log.info("early stopping", version=version)
                        break
                if delivering is not None and version < ctx.rounds_planned:
                    self._task(weights, delivering, version)
        for h in held.values():  # merged into a buffer that never stepped: give back
            h.delivery.requeue()
        return weights

    def _task(self, weights: Tensors, site: str, version: int) -> None:
        self.ctx.tasks.train(weights, site=site, round=version, base_round=version,
                             deadline=time.time() + self.ctx.round_timeout_s, config=self.agg.task_config(version))

    def _message(self, inbound: Inbound, version: int, weights: Tensors, versions: dict[int, Tensors],
                 held: dict[str, Held], merged: dict[str, Held]) -> Step:
        """None when nothing changed; else (new weights or None, site to re-task or None)."""
        ctx, inbox = self.ctx, self.ctx.inbox
        step: list[Step] = [None]

        def route(msg: Message) -> None:
            env, p, site = msg.env, msg.payload, msg.site
            if isinstance(p, EvalResult):
                return inbox.late_eval(msg, round=version)
            admitted = admit(ctx, msg, version=version, held=held, max_staleness=self.agg.max_staleness)
            if admitted.outcome == "stale":
                step[0] = (None, site)
            if admitted.outcome != "update":
                return None
            tau = admitted.staleness
            base = self._version_weights(p.base_round, versions)
            h, new = inbox.accept_update(
                msg, held, weights=weights, norm_bound=ctx.norm_bound, staleness=tau,
                fold=lambda c: self.agg.merge(c, version=version, global_weights=weights, base_weights=base))
            merged[env.message_id] = h
            step[0] = (new, site)

        inbox.handle(inbound, round=version, held=held, route=route)
        return step[0]

    def _version_weights(self, version: int, versions: dict[int, Tensors]) -> Tensors:
        """The global model of ``version`` (an async update's base), from memory or its checkpoint."""
        ctx = self.ctx
        base = versions.get(version)
        if base is None:
            r = {r["round"]: r for r in ctx.store.rounds(ctx.run_id)}.get(version)
            if r is None:
                run = ctx.store.run(ctx.run_id)
                base = checkpoints.load_tensors(ctx.store.dir / run["initial_checkpoint"], sha256=run["initial_sha256"])
            else:
                base = checkpoints.load_tensors(ctx.store.dir / r["checkpoint_path"], sha256=r["checkpoint_sha256"])
            versions[version] = base
        return base


def _site(h: Held) -> str:
    assert h.row.site is not None  # an accepted update's row names its site
    return h.row.site


def _step_metrics(merged: dict[str, Held]) -> dict[str, Any]:
    """A version's validation figures: the after_* metrics of the updates merged into it."""
    return {"aggregate": weighted_mean([
        (after_training(h.payload.metrics), validation_weight(h.payload.metrics, h.payload.num_examples))
        for h in merged.values()]), "per_site": {
        _site(h): dict(after_training(h.payload.metrics), staleness=h.row.staleness,
                         reproducible=h.payload.reproducible)
        for h in merged.values()}, "source": "updates"}


__all__ = ["AsyncRounds"]
