"""What an asynchronous loop checks of a site's answer before folding it (FedAsync, FedBuff, secure FedBuff).

One rule for every asynchronous loop, so the plain and the secure one cannot drift: the answer
must be to a ``TrainTask`` this run sent that site for that version; only its first answer
counts (a second one is settled as a duplicate, not dead-lettered: redelivery is normal); a
``Declined`` is recorded; an update must be based on the version its task carried, and not
staler than ``max_staleness`` (settled as stale, and the site re-tasked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

from coordinator.inbox import Held, Message
from coordinator.rounds.context import RunContext
from coordinator.validation import Rejected
from protocol.messages import Declined, MaskedUpdate, Update

Outcome = Literal["settled", "stale", "update"]


@dataclass(frozen=True)
class Admission:
    """``update``: fold it, ``staleness`` rounds old; ``stale``: settled, re-task the site; ``settled``: done."""

    outcome: Outcome
    staleness: int = 0


def admit(ctx: RunContext, msg: Message, *, version: int, held: Mapping[str, Held],
          max_staleness: int | None, masked: bool = False) -> Admission:
    """Check a TrainTask answer against the run; settle what needs no fold, raise ``Rejected`` for the rest.

    ``masked``: the run is under secure aggregation, so an update must be a ``MaskedUpdate``.
    """
    inbox, env, p, site = ctx.inbox, msg.env, msg.payload, msg.site
    task = ctx.tasks.get(p.task_id)
    if task is None or task.kind != "TrainTask" or task.site != site or task.round != env.round:
        raise Rejected("not_tasked", f"{site} answers task {p.task_id}, which this run did not send it")
    if any(h.row.task_id == p.task_id for h in held.values()) or ctx.store.task_answered(ctx.run_id, p.task_id):
        inbox.settle(msg, verdict="duplicate", reason=f"task {p.task_id} already answered", round=version)
        return Admission("settled")
    if isinstance(p, Declined):
        inbox.decline(msg, round=version)
        return Admission("settled")
    if masked and (isinstance(p, Update) or not isinstance(p, MaskedUpdate)):
        raise Rejected("secure_aggregation", "this run is under secure aggregation: an unmasked Update is "
                       "refused and not stored")
    tau = version - p.base_round
    if p.base_round != env.round or tau < 0:
        raise Rejected("wrong_round", f"update based on version {p.base_round} for task of version "
                       f"{env.round}; the model is at version {version}")
    if max_staleness is not None and tau > max_staleness:
        inbox.settle(msg, verdict="stale", reason=f"staleness {tau} > max_staleness {max_staleness}", round=version)
        return Admission("stale", tau)
    return Admission("update", tau)


__all__ = ["Admission", "admit"]
