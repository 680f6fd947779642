"""A trained ``Update`` of a central-DP run (``federated.secure_aggregation.dp = "central"``) as it may leave.

The handler trains as usual (no per-record noise) and returns its ``Update``; here, before
anything leaves, the site charges its ledger the run's user-level epsilon (sync: the whole run, T
sampled Skellam steps, on its first update of the run; FedBuff: one un-subsampled step per masked
update: ``protocol.secagg.rules.central_entry``), refuses a (T+1)-th update, clips the whole delta to C, rounds it at s, adds Sk(mu/m, mu/m) from its secret
stream (the site's dp_seed only under its research setting reproducible_dp) and masks the integer vector (``SiteSecAgg.mask_integers``: never under a roster that
unmasks sums of fewer than m sites). The reservation is committed before the masked update
exists; a refusal to mask cancels it. Nothing but the masked vector and sealed shares leaves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import structlog
import torch

from protocol.messages import Declined, Envelope, MaskedUpdate, TrainTask, Update
from protocol.secagg import skellam
from protocol.secagg.rules import central_entry, central_per_update, pooled_mu
from site_worker.central_dp import CentralRefused, CentralShare, check_rounds
from site_worker.pooled_task import answer_masked, masked_update
from site_worker.secagg import SecAggRefused
from site_worker.secagg_handlers import flat, room_for_union
from site_worker.dp import noise_source, release_inputs

if TYPE_CHECKING:
    from site_worker.handlers import TaskHandler
    from site_worker.secagg_handlers import SecAggSite

log = structlog.get_logger(__name__)


def charged(handler: TaskHandler, dataset: str, run_id: str) -> bool:
    """Whether the ledger already holds this run's central charge (reserved or spent)."""
    return any(r.get("run_id") == run_id and r.get("skellam") for r in handler.ledger.releases(dataset))


def central_update(handler: TaskHandler, secagg: SecAggSite, env: Envelope, update: Update) -> MaskedUpdate | Declined:
    """The masked, clipped, noised update of ``env``'s TrainTask, or the refusal naming its rule."""
    task = env.payload
    assert isinstance(task, TrainTask)
    names = [n for n, _ in task.weights]
    if [n for n, _ in update.weights] != names:
        return secagg._refused(env, "roster_mismatch", "the trained model's tensors are not the task's")
    def masked() -> MaskedUpdate:
        with handler._lock:
            exp, summary, _ = handler._experiment(task)
            sa = exp.federated.secure_aggregation
            assert sa is not None and sa.dp == "central"
            policy = handler.config.policy
            roster = secagg.state.roster(env.run_id)
            run = central_entry(exp, len(roster.sites))  # the planner's entry: T releases at the run's q
            share = CentralShare(sa.clip, sa.scale, pooled_mu(exp), run.sample_rate, run.steps,
                                 policy.assume_honest_sites)
            check_rounds(secagg.state.integer_masked(env.run_id), share.rounds)
            delta_vec = flat(update.weights) - flat(task.weights)
            rows = handler._data(task, exp, summary).rows
            delta = policy.site_delta(rows)
            # sync: the whole run's T sampled steps, once, on the first update; FedBuff (q = 1): each
            # masked update is one un-subsampled release, charged as it is masked (at most T of them)
            per_update = central_per_update(exp)
            first = per_update or not charged(handler, task.dataset, env.run_id)
            if first:
                epsilon = handler._reserve(task.dataset, env, kind="train", entries=[], delta=delta,
                                           pooled=[share.entry(int(delta_vec.size), steps=1 if per_update else None)])
            else:
                epsilon = handler.ledger.spent(task.dataset, delta=delta, accountant=policy.accountant)
            try:
                rng = noise_source(policy, task_seed=task.seed, purpose="central-dp",  # secret unless reproducible_dp
                                   inputs=lambda: release_inputs(torch.from_numpy(delta_vec), env.round))
                ints = share.contribution(delta_vec, rng)
                tag = secagg.state.next_tag(env.run_id, env.round)
                ints = room_for_union(np.asarray(ints), roster.length)
                out = secagg.state.mask_integers(env.run_id, tag, ints, bound=share.field_bound(),
                                                 assume_honest_sites=share.assume_honest_sites)
            except SecAggRefused:
                if first:
                    handler.ledger.cancel(task.dataset, env.message_id)  # nothing left the site
                raise
            if first:
                handler.ledger.commit(task.dataset, env.message_id)  # durable before the masked update exists
        log.info("central_update_masked", task_id=env.message_id, epsilon=epsilon, accountant=skellam.ACCOUNTANT)
        return masked_update(update.task_id, tag, out, epsilon, delta, base_round=update.base_round)

    return answer_masked(handler, secagg, env, "central-DP update", masked, refusals=(SecAggRefused, CentralRefused))


__all__ = ["central_update", "charged"]
