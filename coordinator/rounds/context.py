"""What every part of one run shares: its collaborators, its settings, and the round commit.

``RunContext`` is built by the orchestrator (``coordinator/run.py``) once the run id is
known; the sync and async loops, the evaluation and the result document read it. The
commit lives here because both loops commit rounds the same way: checkpoint and
aggregator state first, then the round row and its updates in one transaction, and only
then are the held deliveries acked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Mapping

from coordinator import checkpoints
from coordinator.aggregators import EarlyStopping
from coordinator.inbox import Held, Inbox
from coordinator.registry import SiteRegistry
from coordinator.rounds.tasks import TaskBook
from coordinator.state import RoundRow, StateStore
from protocol.config import Experiment
from protocol.messages import Tensors


class RunFailed(Exception):
    """The run cannot go on (too few sites, too few replies after the retries)."""


def give_up(held: Mapping[str, Any], reason: str) -> RunFailed:
    """Requeue every held, uncommitted delivery (nothing is lost) and return the failure to raise."""
    for h in held.values():
        h.delivery.requeue()
    return RunFailed(reason)


@dataclass
class RunContext:
    """One run's shared state; the loops own nothing else between rounds."""

    experiment: Experiment
    store: StateStore
    registry: SiteRegistry
    inbox: Inbox
    tasks: TaskBook
    log: Any  # structlog logger bound to the run
    run_id: str
    rounds_planned: int
    round_timeout_s: float
    available_timeout_s: float
    hello_grace_s: float
    restrict: list[str] | None  # the sites named on the command line (or stored with the run)
    progress: bool
    norm_bound: float | None
    early: EarlyStopping | None
    sites: list[str] = field(default_factory=list)  # the run's sites, once chosen
    graced: bool = False

    @property
    def seed(self) -> int:
        return self.tasks.seed

    def available(self) -> list[str]:
        """Sites that said hello, waiting for ``min_available_clients``; RunFailed if too few come."""
        fed = self.experiment.federated
        need = max(fed.min_available_clients, fed.min_fit_clients)
        sites = self.registry.available(self.restrict)
        if len(sites) < need:
            self.log.info("waiting for sites", have=len(sites), need=need, timeout_s=self.available_timeout_s)
            sites = self.registry.wait_available(need, timeout_s=self.available_timeout_s, restrict=self.restrict)
        if self.restrict is None and len(sites) >= need and self.hello_grace_s > 0 and not self.graced:
            self.graced = True
            # Enrolled sites started together say hello within moments of each other: give
            # the rest a short grace so the first round does not start with only the fastest.
            sites = self.registry.wait_available(len(self.registry.enrolled()), timeout_s=self.hello_grace_s)
        if len(sites) < need:
            raise RunFailed(
                f"only {len(sites)} site(s) available ({', '.join(sites) or 'none'}) but min_available_clients="
                f"{fed.min_available_clients} and min_fit_clients={fed.min_fit_clients}: enroll more sites "
                f"(fedbus coordinator enroll) and start their workers, or lower the minimums"
            )
        return sites

    def checkpoint_path(self, round: int, suffix: str = "") -> Path:
        return checkpoint_path(self.store, self.run_id, round, suffix)

    def commit_round(self, rnd: int, weights: Tensors, *, agg_state: dict[str, Any], sampled: list[str],
                     attempts: int, held: dict[str, Held], accepted: dict[str, Held], metrics: dict[str, Any],
                     wall_s: float, agg_s: float) -> None:
        """Make round ``rnd`` durable (checkpoint, aggregator state, row, updates), then ack its deliveries."""
        ck = self.checkpoint_path(rnd)
        sha = checkpoints.save_tensors(ck, weights, metadata={"run_id": self.run_id, "round": str(rnd)})
        st_path = st_sha = None
        if agg_state:
            p = self.checkpoint_path(rnd, ".agg")
            st_sha = checkpoints.save_tensors(p, agg_state)
            st_path = str(p.relative_to(self.store.dir))
        train_s = max((float((getattr(h.payload, "metrics", None) or {}).get("train_s", 0.0)) for h in accepted.values()),
                      default=0.0)  # a MaskedUpdate carries no metric
        a = metrics["aggregate"]
        row = RoundRow(
            run_id=self.run_id, round=rnd, attempts=attempts, sampled=list(sampled), replies=len(accepted),
            loss=a.get("loss"), accuracy=a.get("accuracy"), auc=a.get("auc"), metrics=metrics, wall_s=wall_s,
            train_s=train_s, communication_s=max(0.0, wall_s - train_s - agg_s), aggregation_s=agg_s,
            checkpoint_path=str(ck.relative_to(self.store.dir)), checkpoint_sha256=sha,
            agg_state_path=st_path, agg_state_sha256=st_sha,
        )
        self.inbox.bodies.wait()  # every stored body durable before the rows that name them (bodies.py)
        self.store.commit_round(row, [h.row for h in held.values()])
        for h in held.values():  # only now is every held update's effect durable
            h.delivery.ack()
        held.clear()


def checkpoint_path(store: StateStore, run_id: str, round: int, suffix: str = "") -> Path:
    return store.run_dir(run_id) / "checkpoints" / f"round-{round:04d}{suffix}.safetensors"


def warn_reproducible(rlog: Any, accepted: dict[str, Held]) -> None:
    sites = sorted(s for s, h in accepted.items() if getattr(h.payload, "reproducible", False))
    if sites:
        rlog.warning("DP noise of these sites is reproducible (their reproducible_dp setting): research runs only",
                     sites=sites)


__all__ = ["RunContext", "RunFailed", "checkpoint_path", "warn_reproducible"]
