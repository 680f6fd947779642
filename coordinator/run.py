"""One federated run: sample sites, send tasks, verify and aggregate replies, commit, repeat.

The bus delivers updates on its worker threads; the handler only puts the delivery on
an in-process queue, so pika's I/O thread never waits on verification or arithmetic.
The run loop (the caller's thread) opens each frame, validates it, folds it into the
aggregator and *holds* the delivery; once the round's checkpoint and state rows are
committed, every held delivery is acked. A coordinator killed at any moment therefore
loses nothing (unacked updates come back) and double-counts nothing (committed updates
are recognised by message id and by (run, round, site) and acked as duplicates).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from coordinator import checkpoints
from coordinator.aggregators import Aggregator, CentralDP, EarlyStopping, build_aggregator
from coordinator.inbox import Held, Inbox, Inbound, Message
from coordinator.metrics import after_training, validation_weight, weighted_mean
from coordinator.progress import RoundProgress
from coordinator.registry import SiteRegistry
from coordinator.sampling import derive_seed, sample_count, sample_sites
from coordinator.state import RoundRow, StateError, StateStore
from coordinator.validation import Rejected
from protocol.messages import Declined, EvalResult, EvalTask, SiteHello, Tensors, TrainTask
from protocol.transport.base import Bus, Delivery, Topology
from protocol.transport.topology import TASKS, control_queue, updates_queue

log = structlog.get_logger(__name__)

COORDINATOR = "coordinator"


class RunFailed(Exception):
    """The run cannot go on (too few sites, too few replies after the retries)."""


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
    privacy: dict[str, Any] = field(default_factory=dict)
    status: str = "completed"
    reason: str | None = None
    weights: Tensors | None = None
    checkpoint: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "completed"

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
            "privacy": self.privacy,
            "status": self.status,
            "reason": self.reason,
            "checkpoint": self.checkpoint,
        }


class Coordinator:
    """Drives one run of an experiment over a bus; see docs/contracts.md for the API."""

    def __init__(
        self,
        experiment: Any,
        *,
        bus: Bus,
        state_dir: str | Path,
        signer: Any,
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
    ) -> None:
        from protocol.config import load_experiment

        self.experiment = experiment if hasattr(experiment, "federated") else load_experiment(experiment)
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
        self.max_skew_s = max_skew_s
        self.prefetch = prefetch
        self.store_bodies = store_bodies
        self.hello_grace_s = hello_grace_s
        # The run's privacy plan; None: made from the rows the sites announce (the simulator, which
        # reads the sites' data, passes the plan from their real training rows).
        self.privacy_plan: dict[str, Any] | None = privacy_plan
        self._plan_given = privacy_plan is not None
        self.show_plan = show_plan  # print it on the terminal before round 1 (always logged)
        self._graced = False
        self.seed = int(self.experiment.training.seed)
        self.run_id = run_id
        self.aggregator_name = fed.name
        norm = fed.parameters.get("norm_bound")
        self.norm_bound = float(norm) if norm is not None else None
        self._consumers: list[Any] = []
        self._tasked: dict[tuple[int, str], set[str]] = {}  # (round, kind) -> sites tasked
        self._task_ids: dict[str, tuple[str, int, str, str | None]] = {}  # task_id -> (kind, round, site, split)
        # While set (inside _batched_tasks): tasks sealed but not yet recorded and published.
        self._task_batch: list[tuple[int, str, str, str | None, str, bytes]] | None = None
        self._log = log.bind(federation=federation)
        self.inbox = Inbox(self.store, federation=federation, dataset=self._dataset(), max_skew_s=max_skew_s,
                           store_bodies=store_bodies, log=self._log, wait_hello=self.registry.wait_hello)

    # ------------------------------------------------------------------ public
    def run(self) -> RunResult:
        """Run (or resume) to the end; a failed run returns ``status="failed"`` with the reason."""
        started = time.monotonic()
        weights, first_round = self._start()
        stored = self.store.run(self.run_id)
        if stored["status"] != "running" and stored["result"]:
            self._log.info("run already finished; nothing to resume", run_id=self.run_id, status=stored["status"])
            return _stored_result(stored["result"], weights)
        self._log = log.bind(run_id=self.run_id, federation=self.federation)
        self.inbox.run_id, self.inbox.log = self.run_id, self._log
        if isinstance(self.agg, CentralDP):
            self.agg.context = self.run_id  # each run's noise is independent of every other's
        status, reason = "completed", None
        try:
            self._open_consumers()
            if self.agg.synchronous:
                weights = self._run_sync(weights, first_round)
            else:
                weights = self._run_async(weights, first_round)
            stop = self.store.stop_requested(self.run_id)
            if stop:
                status, reason, final = "stopped", stop, {}
                self._log.info("run stopped on request", reason=stop)
            else:
                final = self._final_evaluation(weights)
        except RunFailed as e:
            status, reason, final = "failed", str(e), {}
            self._log.error("run failed", reason=reason)
        finally:
            self._close_consumers()
        result = self._result(status=status, reason=reason, final=final, weights=weights,
                              wall_s=time.monotonic() - started)
        self.store.finish_run(self.run_id, status=status, reason=reason, result=result.to_json())
        return result

    # ------------------------------------------------------------------ set-up
    def _start(self) -> tuple[Tensors, int]:
        from protocol.model import build_model, to_tensors

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
        initial = to_tensors(build_model(self.experiment.architecture.layers, seed=self.seed))
        self.agg: Aggregator = build_aggregator(
            self.aggregator_name,
            parameters=dict(self.experiment.federated.parameters),
            initial=initial,
            seed=self.seed,
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
            experiment=self.experiment.raw, seed=self.seed, rounds=self.rounds_planned, sites=self.restrict or [],
            coordinator_kid=getattr(self.signer, "kid", None),
        )
        path = self._checkpoint_path(0)
        sha = checkpoints.save_tensors(path, initial, metadata={"run_id": self.run_id, "round": "0"})
        self.store.set_initial_checkpoint(self.run_id, str(path.relative_to(self.store.dir)), sha)
        self._log.info("run created", run_id=self.run_id, aggregator=self.aggregator_name, rounds=self.rounds_planned)
        return initial, 1

    def _restore(self, run: dict[str, Any], initial: Tensors) -> tuple[Tensors, int]:
        if run["status"] != "running":
            self._log.info("run already finished; resuming its final evaluation only", status=run["status"])
        self.rounds_planned = int(run["rounds_planned"])
        self.seed = int(run["seed"])
        if run["sites"] and self.restrict is None:
            self.restrict = run["sites"]
        for t in self.store.tasks(self.run_id):
            self._tasked.setdefault((t["round"], t["kind"]), set()).add(t["site"])
            self._task_ids[t["task_id"]] = (t["kind"], t["round"], t["site"], t["split"])
        last = self.store.last_round(self.run_id)
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

    def _fit_seed(self) -> int:
        """Seed of the choice of training sites: secret under central DP (its sampling must be)."""
        return self.agg.sampling_seed() if isinstance(self.agg, CentralDP) else self.seed

    def _checkpoint_path(self, round: int, suffix: str = "") -> Path:
        return self.store.run_dir(self.run_id) / "checkpoints" / f"round-{round:04d}{suffix}.safetensors"

    # ------------------------------------------------------------------ bus
    def _open_consumers(self) -> None:
        sites = self.restrict if self.restrict is not None else self.registry.enrolled()
        self.bus.declare(Topology(sites=sites, federations=[self.federation]))
        self.inbox.refresh_trust()
        self._consumers.append(self.bus.consume(control_queue(self.federation), self._on_hello, prefetch=16))
        self._consumers.append(self.bus.consume(updates_queue(self.federation), self.inbox.on_delivery,
                                                prefetch=self.prefetch))

    def _close_consumers(self) -> None:
        for c in self._consumers:
            try:
                c.cancel()
            except Exception as e:  # noqa: BLE001 - closing must not hide the run's outcome
                self._log.warning("consumer cancel failed", error=str(e))
        self._consumers.clear()

    def _on_hello(self, delivery: Delivery) -> None:
        from protocol.codec import open_frame
        from protocol.errors import ProtocolError, UnknownSigner

        try:
            try:
                opened = open_frame(delivery.body, self.inbox.trust)
            except UnknownSigner:  # enrolled after the run started: refresh once from the store
                self.inbox.refresh_trust()
                opened = open_frame(delivery.body, self.inbox.trust)
            hello = opened.envelope.payload
            if not isinstance(hello, SiteHello) or hello.site_id != opened.signer:
                raise Rejected("bad_hello", f"control message from {opened.signer} is not its own SiteHello")
        except (ProtocolError, Rejected) as e:
            delivery.nack(e.header())
            self._log.warning("hello rejected", reason=e.header())
            return
        self.registry.record_hello(opened.signer, hello)
        delivery.ack()

    def _publish(self, payload: Any, *, site: str, round: int) -> str:
        from protocol.codec import new_envelope, seal

        env = new_envelope(payload, federation=self.federation, run_id=self.run_id, round=round,
                           sender=COORDINATOR, recipient=site)
        kind = type(payload).__name__
        split = getattr(payload, "split", None) if kind == "EvalTask" else None
        self._tasked.setdefault((round, kind), set()).add(site)
        self._task_ids[env.message_id] = (kind, round, site, split)
        frame = seal(env, self.signer)
        batch = self._task_batch
        if batch is not None:
            batch.append((round, site, kind, split, env.message_id, frame))
            return env.message_id
        # Recorded before publishing: a reply can never arrive for a task we do not know.
        self.store.record_task(run_id=self.run_id, round=round, site=site, kind=kind, task_id=env.message_id, split=split)
        self.bus.publish(TASKS, site, frame, message_id=env.message_id)
        return env.message_id

    @contextlib.contextmanager
    def _batched_tasks(self):
        """Record a round's tasks in one transaction, then publish them.

        One durable commit per round instead of one per site: with many small sites the
        per-task fsync dominated the round time. Still recorded before any is published.
        """
        self._task_batch = []
        try:
            yield
            batch = self._task_batch
        finally:
            self._task_batch = None
        if not batch:
            return
        self.store.record_tasks(run_id=self.run_id, tasks=[(r, site, kind, split, mid) for r, site, kind, split, mid, _ in batch])
        for _, site, _, _, mid, frame in batch:
            self.bus.publish(TASKS, site, frame, message_id=mid)

    def _train_task(self, weights: Tensors, *, site: str, round: int, base_round: int, deadline: float) -> str:
        task = TrainTask(
            experiment=self.experiment.to_wire(), weights=weights, dataset=self._dataset(), base_round=base_round,
            seed=derive_seed(self.seed, round, site), deadline=deadline,
            config=self.agg.task_config(round),  # e.g. FedProx's proximal_mu
        )
        return self._publish(task, site=site, round=round)

    def _eval_task(self, weights: Tensors, *, site: str, round: int, split: str, deadline: float) -> str:
        task = EvalTask(
            experiment=self.experiment.to_wire(), weights=weights, dataset=self._dataset(), base_round=round,
            seed=derive_seed(self.seed, round, site, "eval"), deadline=deadline, split=split,
        )
        return self._publish(task, site=site, round=round)

    def _dataset(self) -> str:
        return self.experiment.dataset.name or ""

    # ------------------------------------------------------------------ synchronous rounds
    def _available(self) -> list[str]:
        fed = self.experiment.federated
        need = max(fed.min_available_clients, fed.min_fit_clients)
        sites = self.registry.available(self.restrict)
        if len(sites) < need:
            self._log.info("waiting for sites", have=len(sites), need=need, timeout_s=self.available_timeout_s)
            sites = self.registry.wait_available(need, timeout_s=self.available_timeout_s, restrict=self.restrict)
        if self.restrict is None and len(sites) >= need and self.hello_grace_s > 0 and not self._graced:
            self._graced = True
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

    def _run_sync(self, weights: Tensors, first_round: int) -> Tensors:
        sites = self._available()
        self.store.set_run_sites(self.run_id, sites)
        self.sites = sites
        self._announce_plan(sites)
        with RoundProgress(self.rounds_planned, enabled=self.progress_enabled, start=first_round - 1) as progress:
            for rnd in range(first_round, self.rounds_planned + 1):
                if self.store.stop_requested(self.run_id):
                    break
                weights, stop = self._sync_round(rnd, weights, progress)
                if stop:
                    self._log.info("early stopping", round=rnd, best_loss=self.early.best)
                    break
        return weights

    def _sync_round(self, rnd: int, weights: Tensors, progress: RoundProgress) -> tuple[Tensors, bool]:
        fed = self.experiment.federated
        sites = self._available()
        self.inbox.refresh_trust()
        t0 = time.monotonic()
        rlog = self._log.bind(round=rnd)
        self.agg.begin_round(rnd, weights)
        held: dict[str, Held] = {}
        accepted: dict[str, Held] = {}  # site -> its accepted update this round
        replied: set[str] = set()
        agg_s = 0.0
        sampled = sample_sites(sites, sample_count(len(sites), fed.fraction_fit, fed.min_fit_clients),
                               seed=self._fit_seed(), round=rnd)
        if isinstance(self.agg, CentralDP):
            self.agg.expected_clients = len(sampled)  # qN, fixed before any reply: the DP denominator
        # A resumed round: sites whose updates for this round were committed earlier do not exist
        # (rounds commit atomically), so every sampled site is asked again; duplicates are settled.
        attempt = 0
        deadline = self._send_train(sampled, weights, rnd)
        progress.begin(rnd, expected=len(sampled))
        while True:
            while len(replied) < len(sampled):
                delivery = self.inbox.next(deadline)
                if delivery is None:
                    if time.time() >= deadline:
                        break
                    continue
                t = time.monotonic()
                self._sync_message(delivery, rnd, weights, sampled, held, accepted, replied, rlog)
                agg_s += time.monotonic() - t
                progress.replies(len(replied), len(sampled))
            if len(accepted) >= fed.min_fit_clients:
                break
            attempt += 1
            missing = sorted(set(sampled) - replied)
            if attempt > fed.max_round_retries:
                for h in held.values():
                    h.delivery.requeue()
                raise RunFailed(
                    f"round {rnd}: {len(accepted)} update(s) accepted by the deadline but min_fit_clients="
                    f"{fed.min_fit_clients}, after {fed.max_round_retries} retries (no reply from: "
                    f"{', '.join(missing) or 'none'}; declined: {', '.join(sorted(replied - set(accepted))) or 'none'})"
                )
            extra = sample_sites(sorted(set(sites) - set(sampled)), fed.min_fit_clients - len(accepted),
                                 seed=self._fit_seed(), round=rnd, attempt=attempt)
            if not missing and not extra:
                raise RunFailed(
                    f"round {rnd}: {len(accepted)} update(s) accepted but min_fit_clients={fed.min_fit_clients}, and "
                    f"every available site has answered (declined: {', '.join(sorted(replied - set(accepted))) or 'none'})"
                )
            rlog.warning("round retry", attempt=attempt, accepted=len(accepted), missing=missing, adding=extra)
            sampled = sorted(set(sampled) | set(extra))
            deadline = self._send_train(missing + extra, weights, rnd)
            progress.begin(rnd, expected=len(sampled))

        t = time.monotonic()
        new_weights = self.agg.finish_round()
        agg_s += time.monotonic() - t
        val = self._validation_metrics(rnd, new_weights, accepted, held, sites, progress)
        self._round_test_metrics(rnd, new_weights, held, sites, progress, val)
        val["available"] = len(sites)  # with len(sampled): the round's sampling rate for central DP's ε
        t = time.monotonic()
        self._commit_round(rnd, new_weights, sampled=sampled, attempts=attempt + 1, held=held, accepted=accepted,
                           metrics=val, wall_s=time.monotonic() - t0, agg_s=agg_s)
        agg_s += time.monotonic() - t
        progress.done(rnd, loss=val["aggregate"].get("loss"), accuracy=val["aggregate"].get("accuracy"))
        _warn_reproducible(rlog, accepted)
        rlog.info("round committed", replies=len(accepted), loss=val["aggregate"].get("loss"),
                  accuracy=val["aggregate"].get("accuracy"))
        stop = self.early.update(val["aggregate"].get("loss")) if self.early else False
        return new_weights, stop

    def _send_train(self, sites: list[str], weights: Tensors, rnd: int) -> float:
        deadline = time.time() + self.round_timeout_s
        with self._batched_tasks():
            for site in sites:
                self._train_task(weights, site=site, round=rnd, base_round=rnd - 1, deadline=deadline)
        return deadline

    def _sync_message(self, inbound: Inbound, rnd, weights, sampled, held, accepted, replied, rlog) -> None:
        def route(msg: Message) -> None:
            env, p, site = msg.env, msg.payload, msg.site
            if isinstance(p, EvalResult):
                return self.inbox.late_eval(msg, round=rnd)
            if env.round != rnd:
                if env.round < rnd and site in self._tasked.get((env.round, "TrainTask"), ()):
                    return self.inbox.settle(msg, verdict="late", reason=f"for round {env.round}, now in round {rnd}",
                                             round=rnd)
                raise Rejected("wrong_round", f"message for round {env.round} but round {rnd} is open"
                               + ("" if env.round < rnd else " (future round)"))
            if site not in sampled:
                raise Rejected("not_tasked", f"{site} was not asked to train in round {rnd}")
            if site in accepted or site in replied:
                return self.inbox.settle(msg, verdict="duplicate", reason=f"{site} already answered round {rnd}",
                                         round=rnd)
            if isinstance(p, Declined):
                replied.add(site)
                return self.inbox.decline(msg, round=rnd)
            if p.base_round != rnd - 1:
                raise Rejected("wrong_round", f"update trained from model version {p.base_round}, "
                               f"round {rnd} sent version {rnd - 1}")
            h, _ = self.inbox.accept_update(msg, held, weights=weights, norm_bound=self.norm_bound, fold=self.agg.add)
            accepted[site] = h
            replied.add(site)
            rlog.debug("update accepted", site_id=site, num_examples=p.num_examples)

        self.inbox.handle(inbound, round=rnd, held=held, route=route)

    # ------------------------------------------------------------------ evaluation
    def _validation_metrics(self, rnd, new_weights, accepted, held, sites, progress) -> dict[str, Any]:
        """Aggregated validation metrics of a round: EvalTasks when fraction_eval > 0, else after_* of the updates."""
        fed = self.experiment.federated
        per_site: dict[str, dict[str, float]] = {}
        for site, h in accepted.items():
            m = after_training(h.payload.metrics)
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
                                  seed=self.seed, round=rnd, purpose="eval")
            results = self._collect_evals(chosen, new_weights, rnd, split="validation", held=held, progress=progress)
            if len(results) >= min(fed.min_eval_clients, len(chosen)) and results:
                source = "evaluation"
                agg = weighted_mean([(m, float(m.get("n", 0))) for m in results.values()])
                for site, m in results.items():
                    per_site.setdefault(site, {}).update({f"eval_{k}": v for k, v in m.items()})
        return {"aggregate": agg, "per_site": per_site, "source": source}

    def _round_test_metrics(self, rnd, new_weights, held, sites, progress, metrics: dict[str, Any]) -> None:
        """Every ``federated.test_every`` rounds: EvalTask(split="test") to every available site.

        Each answer is a release the site charges to its own ledger; a site may decline (budget,
        policy), and a site whose announced ``max_evaluations_per_run`` has room for only the
        final test is not asked. ``metrics["test_status"]`` says per site what happened."""
        every = self.experiment.federated.test_every
        if not every or rnd % every or rnd == self.rounds_planned:  # the last round's test is the final one
            return
        status: dict[str, str] = {}
        asked = []
        caps = {s["site_id"]: ((s["hello"] or {}).get("policy") or {}).get("max_evaluations_per_run")
                for s in self.store.sites()}
        used = Counter(s for k, _r, s, _sp in self._task_ids.values() if k == "EvalTask")
        for site in sites:
            cap = caps.get(site)
            if isinstance(cap, int) and used[site] + 2 > cap:  # this one and the final test
                status[site] = f"not asked: max_evaluations_per_run {cap} leaves room only for the final test"
            else:
                asked.append(site)
        declined: dict[str, str] = {}
        results = self._collect_evals(asked, new_weights, rnd, split="test", held=held, progress=progress,
                                      declined=declined)
        for site in asked:
            status[site] = "released" if site in results else (f"declined: {declined[site]}" if site in declined
                                                                else "no answer by the deadline")
        for site, m in results.items():
            metrics["per_site"].setdefault(site, {}).update({f"test_{k}": v for k, v in m.items()})
        metrics["test"] = weighted_mean([(m, float(m.get("n", 0))) for m in results.values()]) if results else None
        metrics["test_status"] = status

    def _collect_evals(self, sites: list[str], weights: Tensors, rnd: int, *, split: str, held: dict[str, Held],
                       progress: RoundProgress | None,
                       declined: dict[str, str] | None = None) -> dict[str, dict[str, float]]:
        """Send EvalTasks to ``sites`` and gather their results until all answered or the deadline
        (``declined`` receives each refusing site's reason)."""
        deadline = time.time() + self.round_timeout_s
        pending: dict[str, str] = {}
        with self._batched_tasks():
            for site in sites:
                pending[self._eval_task(weights, site=site, round=rnd, split=split, deadline=deadline)] = site
        results: dict[str, dict[str, float]] = {}
        answered: set[str] = set()
        while len(answered) < len(sites):
            delivery = self.inbox.next(deadline)
            if delivery is None:
                if time.time() >= deadline:
                    missing = sorted(set(sites) - answered)
                    self._log.warning("evaluation deadline passed", round=rnd, split=split, missing=missing)
                    break
                continue
            self.inbox.handle(delivery, round=rnd, held=held,
                              route=lambda msg: self._eval_message(msg, rnd, split, pending, results, answered, held,
                                                                   declined))
            if progress is not None:
                progress.note(f"{split} {len(answered)}/{len(sites)}")
        return results

    def _eval_message(self, msg: Message, rnd: int, split: str, pending: dict[str, str],
                      results: dict[str, dict[str, float]], answered: set[str], held: dict[str, Held],
                      declined: dict[str, str] | None = None) -> None:
        p, site = msg.payload, msg.site
        if pending.get(getattr(p, "task_id", "")) != site:
            return self.inbox.settle(msg, verdict="late", reason="not an answer to an open evaluation task", round=rnd)
        if isinstance(p, Declined):
            answered.add(site)
            if declined is not None:
                declined[site] = f"{p.reason}: {p.detail}"
            return self.inbox.decline(msg, round=rnd)
        if not isinstance(p, EvalResult) or site in answered:
            return self.inbox.settle(msg, verdict="duplicate", reason="evaluation already answered", round=rnd)
        self.inbox.check_eval(msg)
        m = dict(p.metrics)
        m["n"] = float(m.get("n", p.num_examples))
        self.inbox.hold(msg, held, payload=None, split=split)
        results[site] = m
        answered.add(site)

    def _final_evaluation(self, weights: Tensors) -> dict[str, Any]:
        """Every site of the run scores the final model on its fixed test split (``coordinator/final.py``:
        an EvalTask, or a PersonalizeTask when the experiment personalises)."""
        from coordinator import final

        sites = sorted(set(getattr(self, "sites", None) or []) | set(self.registry.available(self.restrict)))
        self.sites = sites
        last = self.store.last_round(self.run_id)
        rnd = int(last["round"]) if last else 0
        return final.summarise(self.experiment, final.collect(self, weights, rnd, sites))

    # ------------------------------------------------------------------ commit
    def _commit_round(self, rnd, weights, *, sampled, attempts, held, accepted, metrics, wall_s, agg_s,
                      train_s: float | None = None) -> None:
        ck = self._checkpoint_path(rnd)
        sha = checkpoints.save_tensors(ck, weights, metadata={"run_id": self.run_id, "round": str(rnd)})
        state = self.agg.state()
        st_path = st_sha = None
        if state:
            p = self._checkpoint_path(rnd, ".agg")
            st_sha = checkpoints.save_tensors(p, state)
            st_path = str(p.relative_to(self.store.dir))
        if train_s is None:
            train_s = max((float(h.payload.metrics.get("train_s", 0.0)) for h in accepted.values()), default=0.0)
        a = metrics["aggregate"]
        row = RoundRow(
            run_id=self.run_id, round=rnd, attempts=attempts, sampled=list(sampled), replies=len(accepted),
            loss=a.get("loss"), accuracy=a.get("accuracy"), auc=a.get("auc"), metrics=metrics, wall_s=wall_s,
            train_s=train_s, communication_s=max(0.0, wall_s - train_s - agg_s), aggregation_s=agg_s,
            checkpoint_path=str(ck.relative_to(self.store.dir)), checkpoint_sha256=sha,
            agg_state_path=st_path, agg_state_sha256=st_sha,
        )
        self.store.commit_round(row, [h.row for h in held.values()])
        for h in held.values():  # only now is every held update's effect durable
            h.delivery.ack()
        held.clear()

    # ------------------------------------------------------------------ asynchronous
    def _run_async(self, weights: Tensors, first_version: int) -> Tensors:
        """FedAsync / FedBuff: merge on arrival; each global step is a committed version."""
        fed = self.experiment.federated
        sites = self._available()
        self.store.set_run_sites(self.run_id, sites)
        self.sites = sites
        self._announce_plan(sites)
        version = first_version - 1
        versions: dict[int, Tensors] = {version: weights}
        active = sample_sites(sites, sample_count(len(sites), fed.fraction_fit, fed.min_fit_clients),
                              seed=self.seed, round=version, purpose="async")
        for site in active:
            self._train_task(weights, site=site, round=version, base_round=version,
                             deadline=time.time() + self.round_timeout_s)
        held: dict[str, Held] = {}
        merged: dict[str, Held] = {}
        timeouts = 0
        t_step = time.monotonic()
        agg_s = 0.0
        with RoundProgress(self.rounds_planned, enabled=self.progress_enabled, start=version) as progress:
            progress.begin(version + 1, expected=getattr(self.agg, "buffer_size", 1))
            deadline = time.time() + self.round_timeout_s
            while version < self.rounds_planned and not self.store.stop_requested(self.run_id):
                delivery = self.inbox.next(deadline)
                if delivery is None:
                    if time.time() < deadline:
                        continue
                    deadline = time.time() + self.round_timeout_s
                    timeouts += 1
                    if timeouts > fed.max_round_retries:
                        for h in held.values():
                            h.delivery.requeue()
                        raise RunFailed(
                            f"version {version + 1}: no update arrived for {self.round_timeout_s:.0f} s, "
                            f"{fed.max_round_retries} times in a row (sites tasked: {', '.join(active)})"
                        )
                    self._log.warning("no update before the deadline; re-sending tasks", version=version)
                    for site in active:
                        self._train_task(weights, site=site, round=version, base_round=version,
                                         deadline=time.time() + self.round_timeout_s)
                    continue
                timeouts = 0
                deadline = time.time() + self.round_timeout_s
                t = time.monotonic()
                step = self._async_message(delivery, version, weights, versions, held, merged)
                agg_s += time.monotonic() - t
                if step is None:
                    progress.replies(len(merged), getattr(self.agg, "buffer_size", 1))
                    continue
                new_weights, delivering = step
                if new_weights is not None:
                    version += 1
                    val = {"aggregate": weighted_mean([
                        (after_training(h.payload.metrics), validation_weight(h.payload.metrics, h.payload.num_examples))
                        for h in merged.values()]), "per_site": {
                        h.row.site: dict(after_training(h.payload.metrics), staleness=h.row.staleness,
                                         reproducible=h.payload.reproducible)
                        for h in merged.values()}, "source": "updates"}
                    t = time.monotonic()
                    self._commit_round(version, new_weights, sampled=sorted({h.row.site for h in merged.values()}),
                                       attempts=1, held=held, accepted=merged, metrics=val,
                                       wall_s=time.monotonic() - t_step, agg_s=agg_s)
                    _warn_reproducible(self._log.bind(version=version), {h.row.site: h for h in merged.values()})
                    merged = {}
                    weights = new_weights
                    versions[version] = weights
                    window = self.agg.max_staleness if self.agg.max_staleness is not None else 8
                    for v in [v for v in versions if v < version - window]:
                        del versions[v]
                    progress.done(version, loss=val["aggregate"].get("loss"), accuracy=val["aggregate"].get("accuracy"))
                    progress.begin(version + 1, expected=getattr(self.agg, "buffer_size", 1))
                    t_step, agg_s = time.monotonic(), 0.0
                    if self.early and self.early.update(val["aggregate"].get("loss")):
                        self._log.info("early stopping", version=version)
                        break
                if delivering is not None and version < self.rounds_planned:
                    self._train_task(weights, site=delivering, round=version, base_round=version,
                                     deadline=time.time() + self.round_timeout_s)
        for h in held.values():  # merged into a buffer that never stepped: give back
            h.delivery.requeue()
        return weights

    def _async_message(self, inbound: Inbound, version, weights, versions, held, merged):
        """None when nothing changed; else (new weights or None, site to re-task or None)."""
        step: list[Any] = [None]

        def route(msg: Message) -> None:
            env, p, site = msg.env, msg.payload, msg.site
            if isinstance(p, EvalResult):
                return self.inbox.late_eval(msg, round=version)
            task = self._task_ids.get(p.task_id)
            if task is None or task[0] != "TrainTask" or task[2] != site or task[1] != env.round:
                raise Rejected("not_tasked", f"{site} answers task {p.task_id}, which this run did not send it")
            if any(h.row.task_id == p.task_id for h in held.values()) or self.store.task_answered(self.run_id, p.task_id):
                return self.inbox.settle(msg, verdict="duplicate", reason=f"task {p.task_id} already answered",
                                         round=version)
            if isinstance(p, Declined):
                return self.inbox.decline(msg, round=version)
            tau = version - p.base_round
            if p.base_round != env.round or tau < 0:
                raise Rejected("wrong_round", f"update based on version {p.base_round} for task of version "
                               f"{env.round}; the model is at version {version}")
            if self.agg.max_staleness is not None and tau > self.agg.max_staleness:
                self.inbox.settle(msg, verdict="stale", reason=f"staleness {tau} > max_staleness {self.agg.max_staleness}",
                                  round=version)
                step[0] = (None, site)
                return
            base = self._version_weights(p.base_round, versions)
            h, new = self.inbox.accept_update(
                msg, held, weights=weights, norm_bound=self.norm_bound, staleness=tau,
                fold=lambda c: self.agg.merge(c, version=version, global_weights=weights, base_weights=base))
            merged[env.message_id] = h
            step[0] = (new, site)

        self.inbox.handle(inbound, round=version, held=held, route=route)
        return step[0]

    def _version_weights(self, version: int, versions: dict[int, Tensors]) -> Tensors:
        """The global model of ``version`` (an async update's base), from memory or its checkpoint."""
        base = versions.get(version)
        if base is None:
            r = {r["round"]: r for r in self.store.rounds(self.run_id)}.get(version)
            if r is None:
                run = self.store.run(self.run_id)
                base = checkpoints.load_tensors(self.store.dir / run["initial_checkpoint"], sha256=run["initial_sha256"])
            else:
                base = checkpoints.load_tensors(self.store.dir / r["checkpoint_path"], sha256=r["checkpoint_sha256"])
            versions[version] = base
        return base

    # ------------------------------------------------------------------ result
    def _announce_plan(self, sites: list[str]) -> None:
        """The privacy plan from the rows each site announced, before round 1: log, terminal, result."""
        from coordinator import privacy_plan

        if not self._plan_given:
            hellos = {s: (self.store.site(s) or {}).get("hello") for s in sites}
            self.privacy_plan = privacy_plan.plan(self.experiment, hellos)
        if self.privacy_plan is None:
            return
        self._log.info("privacy plan", total_epsilon=self.privacy_plan["total_epsilon"],
                       delta=self.privacy_plan["delta"], accountant=self.privacy_plan["accountant"],
                       planned_epsilon=privacy_plan.planned_epsilon(self.privacy_plan))
        if self.show_plan:
            import sys

            print("\n".join(privacy_plan.describe(self.privacy_plan)), file=sys.stderr, flush=True)

    def _privacy(self, rounds: list[dict[str, Any]], eps: dict[str, float | None]) -> dict[str, Any]:
        """``reproducible_dp``: sites whose DP noise was reproducible (their setting); ``central``: central DP's ε;
        with site DP: δ, accountant, ε per site (reported by the sites) and the plan shown before round 1."""
        out: dict[str, Any] = {"reproducible_dp": sorted({
            site for r in rounds for site, m in (r["metrics"].get("per_site") or {}).items() if m.get("reproducible")})}
        if self.privacy_plan is not None:
            from coordinator import privacy_plan

            p = self.privacy_plan
            out.update(delta=p["delta"], accountant=p["accountant"], epsilon=dict(eps),
                       planned_epsilon=privacy_plan.planned_epsilon(p), total_epsilon=p["total_epsilon"],
                       mode=p.get("mode"), planned_from=p["planned_from"], plan=p["sites"])
            if p.get("upper_bound"):
                out["planned_is_upper_bound"] = p["upper_bound"]
        central = self.experiment.federated.central_dp
        if central:
            out["central"] = _central_privacy(central, rounds, self.store.run(self.run_id)["sites"])
        return out

    def _result(self, *, status: str, reason: str | None, final: dict[str, Any], weights: Tensors,
                wall_s: float) -> RunResult:
        rounds = self.store.rounds(self.run_id)
        rows = [{"round": r["round"], "loss": r["loss"], "accuracy": r["accuracy"], "auc": r["auc"],
                 "replies": r["replies"], "wall_s": r["wall_s"]} for r in rounds]
        eps: dict[str, float | None] = {s: None for s in getattr(self, "sites", None) or self.restrict or []}
        for line in self.store.privacy(self.run_id):
            if line["epsilon"] is not None:
                eps[line["site"]] = max(line["epsilon"], eps.get(line["site"]) or 0.0)
            else:
                eps.setdefault(line["site"], None)
        for site, m in (final.get("per_site") or {}).items():  # after the final task (a fine-tune spends)
            if m.get("epsilon") is not None:
                eps[site] = max(float(m["epsilon"]), eps.get(site) or 0.0)
        upd = self.store.updates(self.run_id)
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
        return RunResult(
            run_id=self.run_id, aggregator=self.aggregator_name, sites=sorted(eps), rounds=rows, final=final,
            epsilon=eps, timing=timing, rejected=rejected, declined=declined, privacy=self._privacy(rounds, eps),
            status=status, reason=reason,
            weights=weights, checkpoint=str(self.store.dir / last["checkpoint_path"]) if last else None,
        )


def _warn_reproducible(rlog: Any, accepted: dict[str, Held]) -> None:
    sites = sorted(s for s, h in accepted.items() if getattr(h.payload, "reproducible", False))
    if sites:
        rlog.warning("DP noise of these sites is reproducible (their reproducible_dp setting): research runs only",
                     sites=sites)


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


def _stored_result(doc: dict[str, Any], weights: Tensors) -> RunResult:
    fields = {k: doc.get(k) for k in ("run_id", "aggregator", "sites", "rounds", "final", "epsilon", "timing", "rejected",
                                      "declined", "privacy", "status", "reason", "checkpoint")}
    fields = {k: (v if v is not None else ([] if k in ("sites", "rounds", "rejected", "declined") else
                                          {} if k in ("final", "epsilon", "timing", "privacy") else None))
              for k, v in fields.items()}
    return RunResult(**fields, weights=weights)


def _slug(name: str) -> str:
    s = "".join(c if c.isalnum() or c in "-_" else "-" for c in name.strip().lower()).strip("-")
    return s[:40] or "run"
