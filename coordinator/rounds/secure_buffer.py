"""FedBuff under secure aggregation (issue 22): buffers of masked updates, one unmask per buffer.

The roster is set up as in the sync loop (``SecureSync.setup``). The sites are kept busy as in
plain FedBuff: a site whose masked update was accepted is sent the newest model at once. Each
accepted ``MaskedUpdate`` has its sealed shares relayed to their recipients and its masked
vector added to the open buffer's ``MaskedSum``; its delivery is held, unacked. The buffer
closes when it holds at least ``buffer_size`` updates **and** updates of at least
``min_contributors`` distinct sites (the sites refuse anything less, and a site that uploads
twice must not close a buffer of one hospital). One signed ``SecAggUnmask`` names exactly the
buffer's ``(site, tag)`` set; U answers decode the mask sum, and the new version is

    w <- w + server_lr * (sum w_i delta_i) / (sum w_i)

with each site's weight ``w_i`` inside its masked vector (FedAvg's weighting; plain FedBuff's
staleness function cannot apply to a masked update, so ``config validate`` allows only the
constant one). Messages that arrive while a buffer unmasks (the next buffer's updates) wait,
unacked, and are routed once the new version is committed, so their sites are re-tasked with
it. Each update is in exactly one buffer: the coordinator never names a ``(site, tag)`` twice,
and the sites would refuse it if it did (``update_reused``).

User-level central DP (``secure_aggregation.dp = "central"``): each site masks its clipped, rounded
update plus its Skellam share Sk(mu/m, mu/m) (``site_worker/central_task.py``), and a buffer holds
at most one update of each site (the sites refuse any other sum: ``one_update_per_site``), so a
site whose update is in the open buffer is re-tasked only once that buffer's version commits (an
update it sends meanwhile waits for the next buffer). The buffer then closes at exactly
``buffer_size`` updates of as many sites, each sum carries at least K >= m noise shares, and the
new version is w + server_lr * (unmasked sum) / (s * buffer_size): uniform public weights, a
denominator fixed before any update arrived; the coordinator adds no noise.

Record-level DP at pooled cost (``dp = "pooled"``): the same one-update-per-site buffers, each
update one site's masked DP-SGD step (its Poisson batch's rounded clipped gradient sum plus its
Skellam share, ``site_worker/pooled_task.py``), and the new version is w - server_lr * lr *
(unmasked sum) / (s * the buffer's expected batch, sum q n_i over its sites' announced rows):
asynchronous SGD on the pooled noisy gradient, each gradient taken on the version its site was sent.
"""

from __future__ import annotations

import time
from typing import Any

from coordinator.aggregators import AsyncAggregator
from coordinator.inbox import Held, Inbound, Message
from coordinator.progress import RoundProgress
from coordinator.rounds.answers import admit
from coordinator.rounds.context import RunContext, RunFailed, give_up
from coordinator.rounds.patience import Patience
from coordinator.rounds.secure import SecureSync, _flat, _unflat
from coordinator.sampling import sample_count
from coordinator.secagg import MaskedSum
from coordinator.validation import Rejected
from protocol.messages import EvalResult, MaskedUpdate, Tensors


class SecureBufferRounds:
    """Versions ``1..rounds_planned`` of FedBuff, each the unmasked mean of one buffer."""

    def __init__(self, ctx: RunContext, agg: AsyncAggregator) -> None:
        self.ctx = ctx
        self.agg = agg
        self.secure = SecureSync(ctx)
        params = ctx.experiment.federated.parameters
        self.buffer_size = int(getattr(agg, "buffer_size", params.get("buffer_size", 2)))
        self.server_lr = float(getattr(agg, "server_lr", params.get("server_lr", 1.0)))
        self.version = 0
        self.weights: Tensors = ()
        self.buffer: MaskedSum | None = None
        self.held: dict[str, Held] = {}  # the open buffer's updates, acked when its version commits
        self.waiting: list[Message] = []  # arrived while a buffer was unmasking: routed after the commit
        self.retask: list[str] = []
        # the DP modes: one update per site per buffer; a buffered site is re-tasked (and an update it
        # sent meanwhile routed) only after the buffer's version commits
        self.one_per_site = self.secure.central or self.secure.pooled
        self.after_commit: list[str] = []
        self.next_buffer: list[Message] = []

    def run(self, weights: Tensors, first_version: int, sites: list[str]) -> Tensors:
        ctx = self.ctx
        fed = ctx.experiment.federated
        if first_version > 1:
            raise RunFailed("a run under secure aggregation cannot be resumed yet (its roster and the sites' "
                            "shares belong to the interrupted run): start a new run")
        if ctx.early is not None:
            ctx.log.warning("early stopping is not applied: under secure aggregation a FedBuff version has no "
                            "validation loss (no per-site training metric leaves a site)")
        self.secure.setup(sites, weights)
        sites = [s for s in sites if s in self.secure.sites]
        if self.one_per_site and len(self.secure.sites) < self.buffer_size:
            raise RunFailed(f"secure aggregation dp = {self.secure.cfg.dp!r}: a buffer holds one update of each of "
                            f"buffer_size={self.buffer_size} distinct sites, and the roster has "
                            f"{len(self.secure.sites)}: start more sites or lower buffer_size")
        if self.secure.central:
            self.secure.planned = self.buffer_size  # every buffer's public denominator, fixed before any update
        self.version, self.weights = first_version - 1, weights
        self.buffer = self.secure.new_sum()
        plan = self.agg.configure_fit(self.version, sites, sample_count(len(sites), fed.fraction_fit,
                                                                        fed.min_fit_clients))
        active = plan.sites
        for site in active:
            self._task(site)
        patience = Patience(ctx.round_timeout_s, fed.max_round_retries)
        t_step = time.monotonic()
        try:
            with RoundProgress(ctx.rounds_planned, enabled=ctx.progress, start=self.version) as progress:
                progress.begin(self.version + 1, expected=self.buffer_size)
                patience.restart()
                while self.version < ctx.rounds_planned and not ctx.store.stop_requested(ctx.run_id):
                    if self._full():
                        self._step(progress, time.monotonic() - t_step)
                        self._send_retasks()  # the buffer's sites train on the new version
                        t_step = time.monotonic()
                        patience.restart()
                        continue
                    if self.waiting:
                        self._deliver(self.waiting.pop(0))
                        if not self._full():
                            self._send_retasks()
                        continue
                    inbound = ctx.inbox.next(patience.deadline)
                    if inbound is None:
                        if not patience.silent():
                            continue
                        if patience.exhausted:
                            raise give_up(self.held, (
                                f"version {self.version + 1}: the buffer holds {len(self._contributors())} masked "
                                f"update(s) of {len(self._distinct())} site(s) after {ctx.round_timeout_s:.0f} s, "
                                f"{fed.max_round_retries} times in a row; it closes at buffer_size="
                                f"{self.buffer_size} updates of min_contributors={self.secure.cfg.min_contributors} "
                                f"sites (sites tasked: {', '.join(active)})"))
                        ctx.log.warning("no update before the deadline; re-sending tasks", version=self.version)
                        for site in active:
                            if not (self.one_per_site and site in self._distinct()):  # DP modes: one per buffer
                                self._task(site)
                        continue
                    patience.heard()
                    self._handle(inbound)
                    if not self._full():
                        self._send_retasks()
                    progress.replies(len(self._contributors()), self.buffer_size)
        except RunFailed:
            for m in self.waiting + self.next_buffer:
                m.delivery.requeue()
            raise
        for h in self.held.values():  # a buffer that never closed: give its updates back
            h.delivery.requeue()
        for m in self.waiting + self.next_buffer:
            m.delivery.requeue()
        return self.weights

    # ------------------------------------------------------------------ buffer
    def _contributors(self) -> list[tuple[str, int]]:
        return self.buffer.contributors if self.buffer is not None else []

    def _distinct(self) -> set[str]:
        return {s for s, _ in self._contributors()}

    def _full(self) -> bool:
        return (len(self._contributors()) >= self.buffer_size
                and len(self._distinct()) >= self.secure.cfg.min_contributors)

    def _step(self, progress: RoundProgress, wall_s: float) -> None:
        """Unmask the closed buffer, commit its version, open the next buffer."""
        ctx = self.ctx
        assert self.buffer is not None
        t = time.monotonic()
        new = self.version + 1
        mean = self.secure.unmask(new, self.weights, self.buffer, self.held, other=self.waiting.append)
        step = _flat(mean.weights) - _flat(self.weights)
        weights = _unflat(_flat(self.weights) + self.server_lr * step, self.weights)
        seen = self.secure.report["rounds"][-1]
        seen.update(buffer=[f"{s}#{tag}" for s, tag in sorted(self.buffer.contributors)])
        val: dict[str, Any] = {"aggregate": {}, "per_site": {}, "source": "secure_sum", "secure_aggregation": seen}
        agg_s = time.monotonic() - t
        ctx.commit_round(new, weights, agg_state=self.agg.state(), sampled=sorted(self._distinct()), attempts=1,
                         held=self.held, accepted=dict(self.held), metrics=val, wall_s=wall_s, agg_s=agg_s)
        ctx.log.info("secure buffer committed", version=new, updates=len(self.buffer.contributors),
                     sites=len(self._distinct()))
        self.version, self.weights = new, weights
        self.buffer = self.secure.new_sum()
        self.retask += self.after_commit  # DP modes: the buffer's sites train on the new version now
        self.waiting += self.next_buffer  # ... and what they sent meanwhile enters the next buffer
        self.after_commit, self.next_buffer = [], []
        progress.done(new, loss=None, accuracy=None)
        progress.begin(new + 1, expected=self.buffer_size)

    # ------------------------------------------------------------------ messages
    def _task(self, site: str) -> None:
        self.ctx.tasks.train(self.weights, site=site, round=self.version, base_round=self.version,
                             deadline=time.time() + self.ctx.round_timeout_s, config=self.agg.task_config(self.version))

    def _send_retasks(self) -> None:
        todo, self.retask = self.retask, []
        if self.version < self.ctx.rounds_planned:
            for site in todo:
                self._task(site)

    def _handle(self, inbound: Inbound) -> None:
        self.ctx.inbox.handle(inbound, round=self.version, held=self.held, route=self._route)

    def _deliver(self, msg: Message) -> None:
        """Route a message that waited for a buffer's unmasking (opened and checked already)."""
        try:
            self._route(msg)
        except Rejected as e:
            self.ctx.inbox.reject(msg.delivery, e, round=self.version, opened=msg.opened)

    def _route(self, msg: Message) -> None:
        ctx, inbox = self.ctx, self.ctx.inbox
        env, p, site = msg.env, msg.payload, msg.site
        version = self.version
        if isinstance(p, EvalResult):
            return inbox.late_eval(msg, round=version)
        if self.secure.roster_refused(msg, version):
            return None
        task = ctx.tasks.get(p.task_id)
        if task is not None and task.site == site and task.kind in ("SecAggUnmask", "SecAggJoin"):
            # an answer past the U that unmasked a buffer (or a key after the roster was sent): no effect
            return inbox.settle(msg, verdict="late", reason=f"{env.type} to a {task.kind} already done", round=version)
        if self.one_per_site and isinstance(p, MaskedUpdate) and site in self._distinct():
            self.next_buffer.append(msg)  # a second update of a buffered site: the next buffer's (unacked till then)
            return None
        admitted = admit(ctx, msg, version=version, held=self.held, max_staleness=self.agg.max_staleness, masked=True)
        if admitted.outcome == "stale":
            self.retask.append(site)
        if admitted.outcome != "update":
            return None
        tau = admitted.staleness
        assert self.buffer is not None
        self.secure.accept(msg, env.round, self.buffer)  # relays its sealed shares, adds the masked vector
        inbox.hold(msg, self.held, payload=p, staleness=tau)
        (self.after_commit if self.one_per_site else self.retask).append(site)


__all__ = ["SecureBufferRounds"]
