"""A TrainTask of a pooled-DP run (``federated.secure_aggregation.dp = "pooled"``) over the bus.

Instead of local DP-SGD the site takes ONE pooled step (``site_worker.pooled_dp``): its Poisson
batch's per-sample rounded clipped gradients plus its Skellam share Sk(mu/m, mu/m), masked as an
integer vector (``SiteSecAgg.mask_integers``). The step is reserved in the ledger under the
Skellam accountant before anything is computed and committed before the masked update leaves;
nothing but the masked vector and the sealed shares leaves the site (no metric, no row count).
The handler's own checks run first (experiment, policy incl. ``check_pooled_policy``, data).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import structlog

from protocol.messages import Declined, Envelope, MaskedUpdate, TrainTask
from protocol.secagg import field as F
from protocol.secagg import skellam
from protocol.secagg.rules import pooled_mu
from protocol.policy import PolicyViolation
from site_worker.dp import check_memory
from site_worker.pooled_dp import MEMORY_FACTOR, PooledStep
from site_worker.secagg import MaskedOutput, SecAggRefused
from site_worker.secure_rng import SecureRandom

from site_worker.secagg_handlers import room_for_union

if TYPE_CHECKING:
    from site_worker.handlers import TaskHandler
    from site_worker.secagg_handlers import SecAggSite

log = structlog.get_logger(__name__)


def masked_update(task_id: str, tag: int, out: MaskedOutput, epsilon: float, delta: float, *,
                  base_round: int) -> MaskedUpdate:
    """What leaves the site under a distributed-DP mode: the masked vector and the sealed shares, nothing else."""
    return MaskedUpdate(
        task_id=task_id, tag=tag, masked=(("masked", F.to_bytes_array(out.masked)),),
        shares=tuple((site, np.frombuffer(sealed, dtype=np.uint8)) for site, sealed in sorted(out.sealed.items())),
        epsilon=epsilon, delta=delta, base_round=base_round,
    )


def answer_masked(handler: TaskHandler, secagg: SecAggSite, env: Envelope, what: str,
                  step: Callable[[], MaskedUpdate],
                  refusals: tuple[type[Exception], ...] = (SecAggRefused,),
                  ) -> MaskedUpdate | Declined:
    """Run a distributed-DP ``step``; a decline, a refusal naming its rule, or a bug each become an answer
    (never a redelivery loop, as the handler's own errors)."""
    from site_worker.handlers import _Decline

    try:
        return step()
    except _Decline as d:
        log.warning("task_declined", task_id=env.message_id, reason=d.reason, detail=d.detail)
        return Declined(task_id=env.message_id, reason=d.reason, detail=d.detail)  # type: ignore[arg-type]
    except refusals as e:  # SecAggRefused, PooledRefused: each names its rule
        return secagg._refused(env, e.rule, str(e))  # type: ignore[attr-defined]
    except Exception as e:  # noqa: BLE001 - a bug must become an answer, not a redelivery loop (as the handler's)
        handler.release_reservations(env)
        log.exception("task_failed", task_id=env.message_id)
        return Declined(task_id=env.message_id, reason="error", detail=f"{type(e).__name__}: the site failed on this "
                                                                        f"{what}; its operator has the traceback")


def pooled_update(handler: TaskHandler, secagg: SecAggSite, env: Envelope) -> MaskedUpdate | Declined:
    """The masked pooled step for ``env``'s TrainTask, or the refusal naming its rule."""
    task = env.payload
    assert isinstance(task, TrainTask)

    def take_step() -> MaskedUpdate:
        from site_worker.handlers import _Decline

        with handler._lock:
            exp, summary, key = handler._experiment(task)
            sa = exp.federated.secure_aggregation
            assert sa is not None
            policy = handler.config.policy
            data = handler._data(task, exp, summary)
            try:  # the step's per-sample gradients must fit max_train_memory_mb (at most max_batch rows)
                check_memory(policy, int(summary.parameters) * MEMORY_FACTOR, activations=exp.chain.train_values,
                             batch_size=min(sa.max_batch, len(data.x_train)), n_train=len(data.x_train),
                             sample_rate=sa.sample_rate if sa.sample_rate < 1 else None)
            except PolicyViolation as e:
                raise _Decline("policy", str(e)) from None
            model = handler._model(exp, key, task, for_dp=True)
            step = PooledStep(sa.clip, sa.scale, pooled_mu(exp), sa.sample_rate, sa.max_batch,
                              policy.assume_honest_sites)
            dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
            delta = policy.site_delta(data.rows)
            epsilon = handler._reserve(task.dataset, env, kind="train", entries=[], delta=delta,
                                       pooled=[step.entry(dim)])
            try:
                ints = step.contribution(model, exp.training.loss_function, data.x_train, data.y_train,
                                         SecureRandom.secret())
                tag = secagg.state.next_tag(env.run_id, env.round)
                bound = skellam.field_bound(sites=1, max_batch=sa.max_batch, clip=sa.clip, scale=sa.scale,
                                            mu=step.mu, honest=step.assume_honest_sites)
                ints = room_for_union(np.asarray(ints), secagg.state.roster(env.run_id).length)
                out = secagg.state.mask_integers(env.run_id, tag, ints, bound=bound,
                                                 assume_honest_sites=step.assume_honest_sites)
            except SecAggRefused:
                handler.ledger.cancel(task.dataset, env.message_id)  # nothing left the site
                raise
            handler.ledger.commit(task.dataset, env.message_id)  # durable before the masked update exists
            handler.joined.trained(env.run_id, task.dataset, env.round)
        log.info("pooled_step_masked", task_id=env.message_id, epsilon=epsilon, accountant=skellam.ACCOUNTANT)
        return masked_update(env.message_id, tag, out, epsilon, delta, base_round=task.base_round)

    return answer_masked(handler, secagg, env, "pooled step", take_step)


__all__ = ["answer_masked", "masked_update", "pooled_update"]
