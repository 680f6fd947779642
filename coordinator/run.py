"""One federated run: sample sites, send tasks, verify and aggregate replies, commit, repeat.

The bus delivers updates on its worker threads; the handler only puts the delivery on
an in-process queue, so pika's I/O thread never waits on verification or arithmetic.
The run loop (the caller's thread) opens each frame, validates it, folds it into the
aggregator and *holds* the delivery; once the round's checkpoint and state rows are
committed, every held delivery is acked. A coordinator killed at any moment therefore
loses nothing (unacked updates come back) and double-counts nothing (committed updates
are recognised by message id and by (run, round, site) and acked as duplicates).

This module is the orchestrator: it creates or resumes the run, opens the bus, and hands
the rounds to ``coordinator/rounds/`` (sync or async loop, evaluation, result document).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import structlog

from coordinator import checkpoints
from coordinator.aggregators import Aggregator, EarlyStopping, build_aggregator
from coordinator.control import on_control
from coordinator.inbox import Inbox
from coordinator.registry import SiteRegistry
from coordinator.rounds.asynchronous import AsyncRounds
from coordinator.rounds.context import RunContext, RunFailed, checkpoint_path
from coordinator.rounds.evaluation import Evaluation
from coordinator.rounds.result import (
    RunResult,
    announce_plan,
    build_result,
    stored_result,
)
from coordinator.rounds.secure_buffer import SecureBufferRounds
from coordinator.rounds.sync import SyncRounds
from coordinator.initial_model import initial_weights
from coordinator.memory import model_mb, peak_rss_mb, return_freed_buffers
from coordinator.models import INLINE_BELOW, ModelPublisher
from coordinator.rounds.tasks import COORDINATOR, TaskBook
from coordinator.secagg import refuse_until_wired
from coordinator.state import StateError, StateStore
from protocol.config import Experiment
from protocol.messages import Tensors
from protocol.signing import Signer
from protocol.transport.base import Bus, Consumer, Topology
from protocol.transport.topology import control_queue, updates_queue

log = structlog.get_logger(__name__)

__all__ = ["COORDINATOR", "Coordinator", "RunFailed", "RunResult", "reassembly_budget"]


class Coordinator:
    """Drives one run of an experiment over a bus; see docs/contracts.md for the API."""

    def __init__(
        self,
        experiment: Experiment | dict[str, Any] | str | Path,
        *,
        bus: Bus,
        state_dir: str | Path,
        signer: Signer,
        federation: str,
        sites: list[str] | None = None,
        run_id: str | None = None,
        resume: bool = False,
        progress: bool = True,
        round_timeout_s: float | None = None,
        rounds: int | None = None,
        max_skew_s: float = 300.0,
        prefetch: int = 1000,
        available_timeout_s: float | None = None,
        store_bodies: bool = True,
        hello_grace_s: float = 2.0,
        privacy_plan: dict[str, Any] | None = None,
        show_plan: bool = True,
        model_inline_below: int | None = None,
    ) -> None:
        from protocol.config import load_experiment

        self.experiment: Experiment = experiment if isinstance(experiment, Experiment) else load_experiment(experiment)
        refuse_until_wired(self.experiment)
        self.bus = bus
        self.store = StateStore(state_dir)
        self.registry = SiteRegistry(self.store)
        self.signer = signer
        self.federation = federation
        self.restrict = sorted(sites) if sites is not None else None
        self.resume = resume
        self.progress_enabled = progress
        fed = self.experiment.federated
        self.round_timeout_s = float(round_timeout_s if round_timeout_s is not None else fed.round_timeout_s)
        self.available_timeout_s = float(available_timeout_s if available_timeout_s is not None else self.round_timeout_s)
        self.rounds_planned = int(rounds if rounds is not None else self.experiment.training.rounds)
        self.hello_grace_s = hello_grace_s
        self.prefetch = prefetch
        # The run's privacy plan; None: made from the rows the sites announce (the simulator, which
        # reads the sites' data, passes the plan from their real training rows).
        self.privacy_plan: dict[str, Any] | None = privacy_plan
        self.show_plan = show_plan  # show it on the terminal before round 1 (always logged)
        self.run_id = run_id
        self.aggregator_name = fed.name
        norm = fed.parameters.get("norm_bound")
        self.norm_bound = float(norm) if norm is not None else None
        self._consumers: list[Consumer] = []
        self._resumed_from: dict[str, Any] | None = None  # the committed round a --resume started from
        self._log = log.bind(federation=federation)
        self.tasks = TaskBook(experiment=self.experiment, bus=bus, store=self.store, signer=signer,
                              federation=federation, seed=int(self.experiment.training.seed),
                              models=ModelPublisher(bus, inline_below=INLINE_BELOW if model_inline_below is None
                                                    else model_inline_below))
        self.inbox = Inbox(self.store, federation=federation, dataset=self.tasks.dataset(), max_skew_s=max_skew_s,
                           store_bodies=store_bodies, log=self._log, wait_hello=self.registry.wait_hello)
        self.inbox.on_model_unavailable = self.tasks.models.forget

    # ------------------------------------------------------------------ public
    def run(self) -> RunResult:
        """Run (or resume) to the end; a failed run returns ``status="failed"`` with the reason."""
        started = time.monotonic()
        return_freed_buffers()  # before any model-sized buffer (coordinator/memory.py)
        floor_mb = peak_rss_mb()
        weights, first_round = self._start()
        size_mb = model_mb(weights)
        run_id = self.run_id
        assert run_id is not None  # _start created or found it
        stored = self.store.run(run_id)
        if stored["status"] != "running" and stored["result"]:
            self._log.info("run already finished; nothing to resume", run_id=run_id, status=stored["status"])
            return stored_result(stored["result"], weights)
        self._log = log.bind(run_id=run_id, federation=self.federation)
        self.inbox.run_id, self.inbox.log = run_id, self._log
        self.tasks.run_id = run_id
        self.agg.start_run(run_id, self.tasks.seed)  # e.g. central DP keys its noise and sample with the run id
        ctx = self._context()
        status, reason = "completed", None
        try:
            self._open_consumers(int(size_mb * 2**20))
            sites = ctx.available()
            self.store.set_run_sites(run_id, sites)
            ctx.sites = sites
            self.privacy_plan = announce_plan(ctx, self.privacy_plan, show=self.show_plan)
            # Handed over, not kept: a reference here would hold the initial model for the whole run.
            initial = [weights]
            del weights
            secure = None  # the run's secure aggregation (sync or FedBuff): it sums the final test's union vectors
            if self.agg.synchronous:
                sync = SyncRounds(ctx, self.agg, self._evaluation(ctx))
                weights, secure = sync.run(initial.pop(), first_round), sync.secure
            elif self.experiment.federated.secure_aggregation is not None:  # FedBuff's buffers, masked
                buffered = SecureBufferRounds(ctx, self.agg)
                weights, secure = buffered.run(initial.pop(), first_round, sites), buffered.secure
            else:
                weights = AsyncRounds(ctx, self.agg).run(initial.pop(), first_round, sites)
            stop = self.store.stop_requested(run_id)
            if stop:
                status, reason, final = "stopped", stop, {}
                self._log.info("run stopped on request", reason=stop)
            else:
                final = self._evaluation(ctx).final(weights, secure=secure)
        except RunFailed as e:
            status, reason, final = "failed", str(e), {}
            weights = self._started_from()  # as before the hand-over: the model the rounds started from
            self._log.error("run failed", reason=reason)
        finally:
            self._close_consumers()
            self.inbox.bodies.close()  # the writer thread of stored bodies (coordinator/bodies.py)
        result = build_result(ctx, aggregator=self.aggregator_name, plan=self.privacy_plan, status=status,
                              reason=reason, final=final, weights=weights, wall_s=time.monotonic() - started,
                              synchronous=self.agg.synchronous)
        peak = peak_rss_mb()
        if floor_mb is not None and peak is not None:
            result.memory = {"floor_mb": round(floor_mb, 1), "peak_mb": round(peak, 1), "model_mb": round(size_mb, 3)}
        self.store.finish_run(run_id, status=result.status, reason=result.reason, result=result.to_json())
        return result

    def _started_from(self) -> Tensors:
        """The model this run (or this resume) started its rounds from, read back from its checkpoint."""
        assert self.run_id is not None
        run, last = self.store.run(self.run_id), self._resumed_from
        if last is not None:
            return checkpoints.load_tensors(self.store.dir / last["checkpoint_path"], sha256=last["checkpoint_sha256"])
        return checkpoints.load_tensors(self.store.dir / run["initial_checkpoint"], sha256=run["initial_sha256"])

    def _context(self) -> RunContext:
        assert self.run_id is not None
        return RunContext(
            experiment=self.experiment, store=self.store, registry=self.registry, inbox=self.inbox, tasks=self.tasks,
            log=self._log, run_id=self.run_id, rounds_planned=self.rounds_planned,
            round_timeout_s=self.round_timeout_s, available_timeout_s=self.available_timeout_s,
            hello_grace_s=self.hello_grace_s, restrict=self.restrict, progress=self.progress_enabled,
            norm_bound=self.norm_bound, early=self.early,
        )

    def _evaluation(self, ctx: RunContext) -> Evaluation:
        return Evaluation(ctx, task_config=self.agg.task_config, aggregator=self.aggregator_name)

    # ------------------------------------------------------------------ set-up
    def _start(self) -> tuple[Tensors, int]:
        if self.resume:
            self.run_id = self.run_id or self.store.latest_unfinished(self.federation)
            if self.run_id is None:
                raise StateError(f"--resume: no unfinished run of federation {self.federation!r} in {self.store.dir}")
        run = None
        if self.run_id is not None:
            try:
                run = self.store.run(self.run_id)
            except StateError:
                if self.resume:
                    raise
        seed = self.tasks.seed
        initial = initial_weights(list(self.experiment.architecture.layers), seed=seed, workdir=self.store.dir)
        self.agg: Aggregator = build_aggregator(
            self.aggregator_name,
            parameters=dict(self.experiment.federated.parameters),
            initial=initial,
            seed=seed,
            central_dp=self._central_dp(),
        )
        es = self.experiment.federated.early_stopping
        self.early = EarlyStopping(patience=es.patience, min_delta=es.min_delta) if es else None
        if run is not None:
            if not self.resume:
                raise StateError(f"run {self.run_id!r} already exists in {self.store.dir}; pass --resume to continue it")
            return self._restore(run, initial)
        self.run_id = self.run_id or f"{_slug(self.experiment.name)}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.store.create_run(
            run_id=self.run_id, federation=self.federation, aggregator=self.agg.name or self.aggregator_name,
            experiment=self.experiment.raw, seed=seed, rounds=self.rounds_planned, sites=self.restrict or [],
            coordinator_kid=getattr(self.signer, "kid", None),
        )
        path = checkpoint_path(self.store, self.run_id, 0)
        sha = checkpoints.save_tensors(path, initial, metadata={"run_id": self.run_id, "round": "0"})
        self.store.set_initial_checkpoint(self.run_id, str(path.relative_to(self.store.dir)), sha)
        self._log.info("run created", run_id=self.run_id, aggregator=self.aggregator_name, rounds=self.rounds_planned)
        return initial, 1

    def _restore(self, run: dict[str, Any], initial: Tensors) -> tuple[Tensors, int]:
        assert self.run_id is not None
        if run["status"] != "running":
            self._log.info("run already finished; resuming its final evaluation only", status=run["status"])
        self.rounds_planned = int(run["rounds_planned"])
        self.tasks.seed = int(run["seed"])
        if run["sites"] and self.restrict is None:
            self.restrict = run["sites"]
        self.tasks.restore(self.store.tasks(self.run_id))
        last = self._resumed_from = self.store.last_round(self.run_id)
        if last is None:
            return checkpoints.load_tensors(self.store.dir / run["initial_checkpoint"], sha256=run["initial_sha256"]), 1
        weights = checkpoints.load_tensors(self.store.dir / last["checkpoint_path"], sha256=last["checkpoint_sha256"])
        if last["agg_state_path"]:
            self.agg.load_state(dict(checkpoints.load_tensors(self.store.dir / last["agg_state_path"],
                                                              sha256=last["agg_state_sha256"])))
        if self.early:
            for r in self.store.rounds(self.run_id):
                if self.early.update(r["loss"]):
                    self._log.info("early stopping had already triggered; only the final evaluation is left")
                    return weights, self.rounds_planned + 1
        self._log.info("resuming", run_id=self.run_id, after_round=last["round"])
        return weights, int(last["round"]) + 1

    def _central_dp(self) -> dict[str, Any] | None:
        """Central DP settings with the secret from the state directory (never from the experiment)."""
        from coordinator.aggregators.central_dp import load_or_create_secret

        c = self.experiment.federated.central_dp
        if not c:
            return None
        return {"clip_norm": c.clip_norm, "noise_multiplier": c.noise_multiplier,
                "secret": load_or_create_secret(self.store.dir / "secrets" / "central_dp.key")}

    # ------------------------------------------------------------------ bus
    def _open_consumers(self, model_bytes: int = 0) -> None:
        sites = self.restrict if self.restrict is not None else self.registry.enrolled()
        self.bus.declare(Topology(sites=sites, federations=[self.federation]))
        spill_budget = getattr(self.bus, "spill_budget", None)  # AMQP: partial transfers wait on disk
        if spill_budget is not None:
            budget = spill_budget(reassembly_budget(len(sites), model_bytes))
            self._log.debug("update reassembly budget", bytes=budget, sites=len(sites), model_bytes=model_bytes)
        self.inbox.refresh_trust()
        self._consumers.append(self.bus.consume(control_queue(self.federation), lambda d: on_control(
            d, inbox=self.inbox, store=self.store, registry=self.registry, log=self._log), prefetch=16))
        self._consumers.append(self.bus.consume(updates_queue(self.federation), self.inbox.on_delivery,
                                                prefetch=self.prefetch))

    def _close_consumers(self) -> None:
        for c in self._consumers:
            try:
                c.cancel()
            except Exception as e:  # noqa: BLE001 - closing must not hide the run's outcome
                self._log.warning("consumer cancel failed", error=str(e))
        self._consumers.clear()


def _slug(name: str) -> str:
    s = "".join(c if c.isalnum() or c in "-_" else "-" for c in name.strip().lower()).strip("-")
    return s[:40] or "run"


UPDATE_OVERHEAD_BYTES = 1 << 20  # an update frame's envelope, metrics and signature beside its weights


def reassembly_budget(sites: int, model_bytes: int, *, spill_dir: str | None = None) -> int:
    """Bytes of updates the coordinator's consumer may reassemble at once: one update per site (so a
    round's updates are received once, none refused for room and received again), capped by half the
    free disk where partial transfers spill. The consumer's own default (1 GiB) stays the floor
    (``AmqpBus.spill_budget`` never lowers it); each broker user's quota is one frame at most."""
    import shutil
    import tempfile

    want = max(0, sites) * (max(0, model_bytes) + UPDATE_OVERHEAD_BYTES)
    try:
        free = shutil.disk_usage(spill_dir or tempfile.gettempdir()).free
    except OSError:
        return 0
    return min(want, free // 2)
