"""The site daemon: announce, consume own queue, verify, decide, reply, ack.

Delivery is at least once, so the order per task is fixed: verify the frame (only the
coordinator's key is trusted) and the replay guard, compute the reply, publish it and
wait for the broker's confirm, *then* ack the task and record its id as seen. A crash
anywhere before the ack means the task is redelivered; the coordinator de-duplicates
by ``task_id``. Frames that fail verification are dead-lettered with the reason.
The handler runs on the bus's worker thread (never pika's I/O thread), so long
training does not starve heartbeats.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path
from typing import Any

import structlog

from protocol.codec import new_envelope, open_frame, seal
from protocol.model_blob import MODEL_CHUNK_HEADER
from protocol.errors import ProtocolError, UnknownSigner
from protocol.messages import (Declined, Envelope, EvalTask, Heartbeat, PersonalizeTask, RunControl, SiteHello,
                               StatsTask, TrainTask, Update)
from protocol.transport.base import Bus, BusError, Consumer, Delivery, PublishError, PublishRefused, Topology
from protocol.replay import ReplayGuard
from protocol.signing import Signer, TrustStore, key_id_of_pem
from protocol.transport.topology import CONTROL, UPDATES, site_queue
from site_worker.announce import with_budget
from site_worker.attempts import TaskAttempts, backoff_s
from site_worker.config import SiteConfig
from site_worker.data import DataError, catalogue
from site_worker.handlers import TaskHandler
from site_worker.ledger import PrivacyLedger
from site_worker.model_cache import ChunkRefused, ModelCache, ModelMismatch, ModelUnavailable
from site_worker.secagg_handlers import SECAGG_TASKS, SecAggSite, wants_secagg
from site_worker.trainer import TrainingAborted
from site_worker.untrusted import UntrustedNotices

log = structlog.get_logger(__name__)

COORDINATOR = "coordinator"  # the identity the site's trust store gives the coordinator's key
CLOCK_OFFSET_ENV = "FEDBUS_CLOCK_OFFSET_S"


def clock_offset_s() -> float:
    """Fault injection only (chaos tests): ``FEDBUS_CLOCK_OFFSET_S`` seconds added to this
    site's clock, i.e. to the ``sent_at`` it stamps and the time its replay guard checks
    against, to play a hospital whose NTP is broken. 0 when unset."""
    raw = os.environ.get(CLOCK_OFFSET_ENV, "").strip()
    try:
        return float(raw) if raw else 0.0
    except ValueError:
        raise ValueError(f"{CLOCK_OFFSET_ENV}={raw!r} is not a number of seconds") from None


def software_version() -> str:
    try:
        from importlib.metadata import version

        return version("fedbus")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout)
        return "0.1.0+checkout"


class SiteWorker:
    """One site's daemon. ``start()`` returns; work happens on the bus's consumer thread."""

    def __init__(self, config: SiteConfig, bus: Bus | None = None) -> None:
        self.config = config
        self._bus = bus
        self._owns_bus = bus is None
        config.state_dir.mkdir(parents=True, exist_ok=True)
        if config.torch_threads:
            import torch

            torch.set_num_threads(config.torch_threads)
        self.signer = Signer.from_file(config.key_path)
        self.trust = TrustStore()
        self.trust.add(COORDINATOR, Path(config.coordinator_pub).read_bytes())
        self.untrusted = UntrustedNotices(site_id=config.site_id, federation=config.federation,
                                          trusted_kid=key_id_of_pem(Path(config.coordinator_pub).read_bytes()))
        self.clock_offset_s = clock_offset_s()
        self.guard = ReplayGuard(max_skew_s=config.max_skew_s, path=config.state_dir / "seen_tasks.log",
                                 clock=self._now)
        self.ledger = PrivacyLedger(config.state_dir)
        self.attempts = TaskAttempts(config.state_dir)
        self.models = ModelCache(config.state_dir)
        self._abort = threading.Event()  # training checks it between batches
        self._stopping = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        flower = None
        if config.flower_client:
            from site_worker.flower_adapter import FlowerAdapter, make_client

            flower = FlowerAdapter(make_client(config.flower_client, config))
        self.handler = TaskHandler(config, ledger=self.ledger, stop=self._abort, flower=flower)
        self.secagg = SecAggSite(config, self.signer, Path(config.coordinator_pub).read_bytes())
        self.handler.secagg = self.secagg  # a secure run's final test adds the masked union vector
        self._consumer: Consumer | None = None
        self._beats: threading.Thread | None = None
        self._stats_lock = threading.Lock()
        self._stats = {"tasks_done": 0, "trained": 0, "evaluated": 0, "declined": 0, "rejected": 0,
                       "abandoned": 0, "controls": 0, "expired": 0, "publish_failed": 0,
                       "personalized": 0, "stats": 0, "secagg": 0}
        self.log = log.bind(site_id=config.site_id)

    # ------------------------------------------------------------------ lifecycle

    def _now(self) -> float:
        """This site's wall clock (``time.time()`` unless a clock offset is injected)."""
        return time.time() + self.clock_offset_s

    @property
    def stats(self) -> dict[str, int]:
        with self._stats_lock:
            return dict(self._stats)

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self._stats[key] += 1

    @property
    def bus(self) -> Bus:
        if self._bus is None:
            from protocol.transport import open_bus

            opts: dict[str, Any] = {}
            if not self.config.broker_url.startswith("memory:"):
                opts["heartbeat"] = self.config.heartbeat_s
                opts["connection_name"] = f"fedbus-site:{self.config.site_id}"
                if self.config.tls:
                    opts["tls"] = dict(self.config.tls)
            self._bus = open_bus(self.config.broker_url, **opts)
        return self._bus

    def warm_up(self) -> float:
        """Pay one-time import costs (torch optimizers pull in torch._dynamo, Opacus) before
        announcing, so the first task's latency is the task's own. scikit-learn is left out: only
        multiclass and regression metrics use it (``site_worker.metrics``), binary ones are numpy."""
        t0 = time.perf_counter()
        import opacus  # noqa: F401
        import torch

        torch.optim.Adam([torch.zeros(1, requires_grad=True)])
        return time.perf_counter() - t0

    def start(self) -> None:
        """Announce the site (signed SiteHello) and start consuming its task queue."""
        warm_s = self.warm_up()
        if self.config.declare_topology:
            self.bus.declare(Topology(sites=[self.config.site_id], federations=[self.config.federation]))
        self.announce()
        self._consumer = self.bus.consume(site_queue(self.config.site_id), self._on_delivery, prefetch=1)
        if self.config.alive_every_s > 0:
            self._beats = threading.Thread(target=self._beat, name=f"fedbus-alive-{self.config.site_id}", daemon=True)
            self._beats.start()
        self.log.info("site_started", queue=site_queue(self.config.site_id), datasets=sorted(self.config.datasets),
                      federation=self.config.federation, warm_up_s=round(warm_s, 3))

    def hello(self) -> SiteHello:
        infos = []
        for name, src in sorted(self.config.datasets.items()):
            try:
                infos.append(with_budget(catalogue(src), ledger=self.ledger, policy=self.config.policy))
            except DataError as e:
                self.log.error("dataset_unreadable", dataset=name, error=str(e))
        return SiteHello(site_id=self.config.site_id, software_version=software_version(), datasets=tuple(infos),
                         policy=self.config.policy.summary())

    def announce(self) -> None:
        """Publish the SiteHello; a coordinator that is not up yet is not fatal (the site still serves)."""
        env = new_envelope(self.hello(), federation=self.config.federation, run_id="", round=0,
                           sender=self.config.site_id, recipient=COORDINATOR, sent_at=self._now())
        try:
            self.bus.publish(CONTROL, self.config.federation, seal(env, self.signer), message_id=env.message_id)
            self.log.info("hello_sent", message_id=env.message_id)
        except PublishError as e:
            self.log.warning("hello_not_delivered", error=str(e))

    def _beat(self) -> None:
        """Publish a signed ``Heartbeat`` every ``alive_every_s`` until stopping (coordinator/liveness.py).
        A beat that cannot be delivered is logged and skipped: the next one tries again."""
        every = float(self.config.alive_every_s)
        seq = 0
        while True:
            env = new_envelope(Heartbeat(site_id=self.config.site_id, seq=seq, every_s=every),
                               federation=self.config.federation, run_id="", round=0,
                               sender=self.config.site_id, recipient=COORDINATOR, sent_at=self._now())
            try:
                self.bus.publish(CONTROL, self.config.federation, seal(env, self.signer), message_id=env.message_id)
            except (BusError, PublishError) as e:
                self.log.warning("heartbeat_not_delivered", error=str(e))
            seq += 1
            if self._stopping.wait(every):
                return

    def stop(self, grace_s: float | None = None) -> dict[str, int]:
        """Stop taking tasks, let the current one finish within ``grace_s`` or abandon it, close."""
        grace = self.config.grace_s if grace_s is None else grace_s
        self._stopping.set()
        if self._beats is not None:
            self._beats.join(timeout=10.0)
        t0 = time.monotonic()
        finished = self._idle.wait(grace)
        if not finished:
            self.log.warning("abandoning_current_task", grace_s=grace)
            self._abort.set()
            self._idle.wait(max(5.0, grace))
        if self._consumer is not None:
            try:
                self._consumer.cancel()
            except BusError as e:
                self.log.warning("cancel_failed", error=str(e))
        if self._owns_bus and self._bus is not None:
            try:
                self._bus.close()
            except BusError as e:
                self.log.warning("close_failed", error=str(e))
        self.guard.close()
        stats = self.stats
        self.log.info("site_stopped", stop_s=round(time.monotonic() - t0, 3), **stats)
        return stats

    # ------------------------------------------------------------------ per delivery

    def _on_delivery(self, d: Delivery) -> None:
        self._idle.clear()
        try:
            if self._stopping.is_set():
                # Leave it unsettled: cancel/close hands it back to the queue without a busy loop.
                self.log.info("task_left_for_redelivery", message_id=d.message_id)
                return
            self._process(d)
        finally:
            self._idle.set()

    def _reject(self, d: Delivery, reason: str, message: str) -> None:
        self._count("rejected")
        self.log.warning("frame_rejected", message_id=d.message_id, reason=reason, error=message)
        d.nack(f"{reason}: {message}")

    def _process(self, d: Delivery) -> None:
        claimed = (d.headers or {}).get(MODEL_CHUNK_HEADER)
        if claimed is not None:
            self._model_chunk(d, claimed)
            return
        try:
            opened = open_frame(d.body, self.trust)
            env = opened.envelope
            self.guard.check(env, recipient=self.config.site_id)
        except ProtocolError as e:
            self._reject(d, e.reason, str(e))
            if isinstance(e, UnknownSigner):
                self._tell_untrusted(d.body)
            return
        if not isinstance(env.payload, (TrainTask, EvalTask, PersonalizeTask, StatsTask, RunControl, *SECAGG_TASKS)):
            self._reject(d, "unexpected_type", f"{env.type} is not a task a site accepts")
            return
        if env.federation != self.config.federation:
            self._reject(d, "wrong_federation",
                         f"task for federation {env.federation!r}, this site serves {self.config.federation!r}")
            return
        with structlog.contextvars.bound_contextvars(site_id=self.config.site_id, run_id=env.run_id,
                                                     round=env.round):
            self._task(d, env)

    def _model_chunk(self, d: Delivery, claimed: object) -> None:
        """Store a chunk of a published model (site_worker/model_cache.py); ack once it is durable."""
        try:
            digest = self.models.put(claimed if isinstance(claimed, (str, bytes)) else repr(claimed), d.body)
        except ChunkRefused as e:
            self._reject(d, "model_chunk_refused", str(e))
            return
        d.ack()
        self.log.info("model_chunk_stored", sha256=digest[:12], bytes=len(d.body))

    def _tell_untrusted(self, frame: bytes | memoryview) -> None:
        """A signed Declined(untrusted_task) to the coordinator, rate-limited per unknown signer (site_worker/untrusted.py)."""
        env = self.untrusted.notice(frame, sent_at=self._now())
        if env is None:
            return
        try:
            self.bus.publish(UPDATES, env.federation, seal(env, self.signer), message_id=env.message_id)
            self.log.warning("told_coordinator_untrusted_task", run_id=env.run_id, detail=env.payload.detail)
        except (PublishError, PublishRefused) as e:
            self.log.error("untrusted_task_notice_failed", error=str(e))

    def _task(self, d: Delivery, env: Envelope) -> None:
        tlog = self.log.bind(task_id=env.message_id, type=env.type)
        payload = env.payload
        if isinstance(payload, RunControl):
            tlog.info("run_control", action=payload.action, reason=payload.reason)
            self._count("controls")
            d.ack()
            self.guard.mark_seen(env.message_id)
            return
        if isinstance(payload, SECAGG_TASKS):
            self._secagg_task(d, env, tlog)
            return
        if payload.deadline and payload.deadline > 0 and time.time() > payload.deadline:
            tlog.warning("task_expired", deadline=payload.deadline)
            self._count("expired")
            d.ack()
            self.guard.mark_seen(env.message_id)
            return
        tlog.info("task_received", dataset=payload.dataset, redelivered=d.redelivered)
        if isinstance(payload, (TrainTask, EvalTask, PersonalizeTask)) and payload.model_sha256:
            try:  # the model by hash: verified against the signed sha256 before anything uses it
                payload = dataclasses.replace(payload, weights=self.models.resolve(payload))
            except ModelMismatch as e:
                self._reject(d, "model_hash_mismatch", str(e))
                return
            except ModelUnavailable as e:
                tlog.warning("model_unavailable", error=str(e))
                self._reply(d, env, Declined(task_id=env.message_id, reason="model_unavailable", detail=str(e)), tlog)
                return
            env = dataclasses.replace(env, payload=payload)
        started = self.attempts.started(env.message_id)
        if started >= self.attempts.max_attempts:
            # It crashed the site every time: decline it so it cannot loop, and release what the
            # dead attempts reserved (none of them committed, so none published anything).
            self.handler.release_reservations(env)
            tlog.error("task_crash_loop", attempts=started)
            self._reply(d, env, Declined(
                task_id=env.message_id, reason="error",
                detail=f"crash_loop: this site started the task {started} times without finishing it (the "
                       f"limit is {self.attempts.max_attempts}); its operator has each crash in the site's log"), tlog)
            return
        wait = backoff_s(started + 1)
        if wait:
            tlog.warning("task_retry_backoff", attempt=started + 1, backoff_s=wait)
            if self._stopping.wait(wait):
                return  # stopping: unsettled, redelivered later
        secure = wants_secagg(payload.experiment) if isinstance(payload, TrainTask) else None
        if secure is not None and (refused := self.secagg.ready(env)) is not None:
            self._reply(d, env, refused, tlog)  # no roster committed: decline before anything is spent
            return
        self.attempts.begin(env.message_id)
        if secure is not None and secure.get("dp") == "pooled":  # one pooled DP step, masked (issue 22 item 4)
            from site_worker.pooled_task import pooled_update

            self._reply(d, env, pooled_update(self.handler, self.secagg, env), tlog)
            return
        try:
            reply = self.handler.handle(env)
        except TrainingAborted as e:
            self._count("abandoned")
            self.attempts.done(env.message_id)  # a stop, not a crash: the next start is not a retry
            tlog.warning("task_abandoned", reason=str(e))
            return  # unsettled: redelivered when the consumer is cancelled / the process dies
        if secure is not None and isinstance(reply, Update):
            # Under secure aggregation only the masked vector and sealed shares leave: no update, no metric.
            if secure.get("dp") == "central":  # clipped, noised, charged to the ledger (issue 22 item 4)
                from site_worker.central_task import central_update

                self._reply(d, env, central_update(self.handler, self.secagg, env, reply), tlog)
                return
            masked = self.secagg.masked(env, env.payload.weights, reply, int(secure.get("weight_cap", 1000)))
            self._reply(d, env, masked, tlog)
            return
        self._reply(d, env, reply, tlog)

    def _secagg_task(self, d: Delivery, env: Envelope, tlog: Any) -> None:
        """A roster, relayed share or unmask request (site_worker/secagg_handlers.py)."""
        deadline = getattr(env.payload, "deadline", 0.0)
        if deadline and time.time() > deadline:
            tlog.warning("task_expired", deadline=deadline)
            self._count("expired")
            d.ack()
            self.guard.mark_seen(env.message_id)
            return
        reply = self.secagg.handle(env)
        if reply is not None:
            self._reply(d, env, reply, tlog)
            return
        d.ack()
        self.guard.mark_seen(env.message_id)

    def _reply(self, d: Delivery, task_env: Envelope, reply: Any, tlog: Any) -> None:
        env = new_envelope(reply, federation=task_env.federation, run_id=task_env.run_id, round=task_env.round,
                           sender=self.config.site_id, recipient=COORDINATOR, sent_at=self._now())
        try:
            frame = seal(env, self.signer)
        except (TypeError, ProtocolError) as e:  # a reply outside protocol/bounds.py: say so instead of crashing
            tlog.error("reply_out_of_bounds", error=str(e)[:500])
            env = new_envelope(Declined(task_id=task_env.message_id, reason="error", detail="reply_out_of_bounds"),
                               federation=task_env.federation, run_id=task_env.run_id, round=task_env.round,
                               sender=self.config.site_id, recipient=COORDINATOR, sent_at=self._now())
            frame, reply = seal(env, self.signer), env.payload
        try:
            self.bus.publish(UPDATES, task_env.federation, frame, message_id=env.message_id)
        except PublishRefused as e:
            # The broker will never route it (no updates queue / no permission): retrying would
            # loop, so the task goes to the dead-letter queue with the reason, for an operator.
            self._count("publish_failed")
            tlog.error("reply_refused", error=str(e))
            d.nack(f"reply_refused: {e}")
            return
        except PublishError as e:
            self._count("publish_failed")
            tlog.error("reply_not_confirmed", error=str(e))
            d.requeue()  # try again; the coordinator de-duplicates by task_id
            return
        d.ack()
        self.guard.mark_seen(task_env.message_id)
        self.attempts.done(task_env.message_id)
        self._count("tasks_done")
        kind = type(reply).__name__
        if kind in ("Update", "MaskedUpdate"):
            self._count("trained")
        elif kind == "EvalResult" and isinstance(task_env.payload, PersonalizeTask):
            self._count("personalized")
        elif kind == "EvalResult":
            self._count("evaluated")
        elif kind == "StatsResult":
            self._count("stats")
        elif kind in ("SecAggKey", "SecAggAnswer"):
            self._count("secagg")
        else:
            self._count("declined")
        tlog.info("reply_sent", reply=kind, reply_id=env.message_id, bytes=len(frame),
                  epsilon=getattr(reply, "epsilon", None), reason=getattr(reply, "reason", None))
