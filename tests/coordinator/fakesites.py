"""Fake sites for coordinator tests: consume a site queue, answer with crafted signed replies.

They run the real codec and bus, so the coordinator sees exactly what a site worker
sends; a test decides the weights (hand-computable), and can inject bad replies
(tampered, unknown key, replayed, wrong round, wrong shape, NaN) through ``tamper``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from protocol.codec import encode_envelope, encode_frame, new_envelope, open_frame, seal, signed_digest
from protocol.messages import (Declined, EvalResult, EvalTask, PersonalizeTask, SiteHello, DatasetInfo, TrainTask,
                               Update)
from protocol.signing import Signer, TrustStore
from protocol.transport.base import Bus, Delivery
from protocol.transport.topology import CONTROL, UPDATES, site_queue


def seal_raw(env, signer: Signer) -> bytes:
    """Sign ``env`` as it is: unlike ``codec.seal`` (which refuses what receivers would), no checks.
    A lying site runs its own code, so the sender-side check is no defence: the receiver's is."""
    body = encode_envelope(env)
    return encode_frame(signer.kid, body, signer.sign(signed_digest(body)))


def offset_weights(task_weights, offset: float):
    """The task's weights plus a constant: makes FedAvg hand-computable."""
    return tuple((n, (np.asarray(a) + np.float32(offset)).astype(np.float32)) for n, a in task_weights)


@dataclass
class FakeSite:
    site_id: str
    bus: Bus
    federation: str
    coordinator_pub: bytes
    signer: Signer = field(default_factory=Signer.generate)
    offset: float = 1.0
    num_examples: int = 10
    # tamper(env, frame) -> list of frames to publish instead of the honest one (None = honest)
    tamper: Callable | None = None
    decline: str | None = None
    silent: bool = False  # never answer training (a site that died)
    eval_metrics: dict = field(default_factory=lambda: {"loss": 0.5, "accuracy": 0.75, "auc": 0.8, "f1": 0.7})
    stop_after_round: int | None = None  # stop answering after this round (a site killed mid-run)
    gate: dict = field(default_factory=dict)  # round -> threading.Event to wait for before replying
    # what it answers a PersonalizeTask with, beside eval_metrics (the global model's)
    personal_metrics: dict = field(default_factory=lambda: {"accuracy": 0.85, "auc": 0.9, "f1": 0.8, "loss": 0.4})
    unchecked: bool = False  # seal replies with ``seal_raw``: a lying site skips codec.seal's checks


    def __post_init__(self) -> None:
        self.trust = TrustStore()
        self.trust.add("coordinator", self.coordinator_pub)
        self.tasks: list = []
        self.sent: list[bytes] = []
        self.got_task = threading.Event()
        self.replied: list[tuple[str, int]] = []  # (payload type, round) of every honest reply published
        self._cond = threading.Condition()
        self._consumer = None

    def start(self, *, hello: bool = True) -> "FakeSite":
        self._consumer = self.bus.consume(site_queue(self.site_id), self._on_task, prefetch=1)
        if hello:
            info = DatasetInfo(name="toy", rows=100, columns=("a", "b", "c", "y"),
                               feature_types={"a": "numeric", "b": "numeric", "c": "numeric"}, target="y")
            env = new_envelope(SiteHello(site_id=self.site_id, software_version="fake", datasets=(info,)),
                               federation=self.federation, run_id="", round=0, sender=self.site_id,
                               recipient="coordinator")
            self.bus.publish(CONTROL, self.federation, seal(env, self.signer), message_id=env.message_id)
        return self

    def stop(self) -> None:
        if self._consumer is not None:
            self._consumer.cancel()
            self._consumer = None

    def wait_replied(self, kind: str, round: int, *, count: int = 1, timeout: float = 60.0) -> bool:
        """Wait until ``count`` replies of ``kind`` for ``round`` were published."""
        with self._cond:
            return self._cond.wait_for(lambda: self.replied.count((kind, round)) >= count, timeout=timeout)

    def publish(self, frame: bytes, message_id: str) -> None:
        self.sent.append(frame)
        self.bus.publish(UPDATES, self.federation, frame, message_id=message_id)

    def reply(self, task_env, payload, *, round: int | None = None, run_id: str | None = None):
        env = new_envelope(payload, federation=self.federation, run_id=run_id or task_env.run_id,
                           round=task_env.round if round is None else round, sender=self.site_id,
                           recipient="coordinator")
        return env, (seal_raw(env, self.signer) if self.unchecked else seal(env, self.signer))

    def _on_task(self, delivery: Delivery) -> None:
        opened = open_frame(delivery.body, self.trust)
        env = opened.envelope
        task = env.payload
        self.tasks.append(env)
        self.got_task.set()
        if self.stop_after_round is not None and env.round > self.stop_after_round:
            delivery.ack()
            return
        if env.round in self.gate and isinstance(task, TrainTask):
            self.gate[env.round].wait(timeout=120)
        if isinstance(task, TrainTask):
            if self.silent:
                delivery.ack()
                return
            if self.decline:
                payload = Declined(task_id=env.message_id, reason="budget", detail=self.decline)
            else:
                payload = Update(
                    task_id=env.message_id, weights=offset_weights(task.weights, self.offset),
                    num_examples=self.num_examples,
                    metrics={"after_loss": 1.0 / (1 + env.round), "after_accuracy": 0.5 + 0.01 * env.round,
                             "after_auc": 0.6, "n_val": float(self.num_examples) / 5, "train_s": 0.01},
                    epsilon=0.5 * (env.round + 1), delta=1e-5, base_round=task.base_round,
                )
        elif isinstance(task, EvalTask):
            payload = EvalResult(task_id=env.message_id, num_examples=self.num_examples,
                                 metrics=dict(self.eval_metrics, n=float(self.num_examples)), base_round=task.base_round)
        elif isinstance(task, PersonalizeTask):
            metrics = dict(self.eval_metrics, n=float(self.num_examples))
            metrics.update({f"personalized_{k}": v for k, v in self.personal_metrics.items()})
            metrics.setdefault("personalized_n", float(self.num_examples))
            payload = EvalResult(task_id=env.message_id, num_examples=self.num_examples, metrics=metrics,
                                 base_round=task.base_round)
        else:
            delivery.ack()
            return
        out_env, frame = self.reply(env, payload)
        frames = [(frame, out_env.message_id)]
        if self.tamper is not None and isinstance(task, TrainTask):
            frames = self.tamper(self, env, out_env, frame) or frames
        for f, mid in frames:
            self.publish(f, mid)
        with self._cond:
            self.replied.append((type(payload).__name__, env.round))
            self._cond.notify_all()
        delivery.ack()
