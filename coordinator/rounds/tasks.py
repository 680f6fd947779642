"""Every task the coordinator sends: built, signed, recorded before it is published.

A reply names its task by ``task_id`` (the task's message id); ``TaskBook`` keeps one
``TaskRecord`` per task so the loops can tell an answer to a task of this run from one
they never sent. Inside ``batch()`` a round's tasks are recorded in one transaction and
only then published (one durable commit per round, never a reply to an unknown task).
A model over ``coordinator.models.INLINE_BELOW`` travels by hash: the task names it, and each
version is published once (``ModelPublisher``) for all the batch's sites before their tasks.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from coordinator.sampling import derive_seed
from coordinator.state import StateStore
from coordinator.models import ModelPublisher
from protocol.config import Experiment
from protocol.messages import (EvalTask, PersonalizeTask, SecAggJoin, SecAggRoster, SecAggShare, SecAggUnmask, TaskConfig,
                               Tensors, TrainTask)
from protocol.model_blob import ModelRef
from protocol.signing import Signer
from protocol.transport.base import Bus
from protocol.transport.topology import TASKS

COORDINATOR = "coordinator"

TaskKind = Literal["TrainTask", "EvalTask", "PersonalizeTask"]
Task = TrainTask | EvalTask | PersonalizeTask | SecAggJoin | SecAggRoster | SecAggShare | SecAggUnmask  # secure.py


@dataclass(frozen=True)
class TaskRecord:
    """One task this run sent (or, on resume, recorded before a crash)."""

    task_id: str
    kind: str  # TaskKind; a stored row is taken as written
    round: int
    site: str
    split: str | None = None  # EvalTask only: "validation" | "test"


@dataclass(frozen=True)
class _Sealed:
    record: TaskRecord
    frame: bytes
    model: tuple[Tensors, ModelRef] | None = None  # the version the task names by hash


class TaskBook:
    """Builds, seals, records and publishes tasks; answers "did this run send that task?"."""

    def __init__(self, *, experiment: Experiment, bus: Bus, store: StateStore, signer: Signer,
                 federation: str, seed: int, models: ModelPublisher | None = None) -> None:
        self.experiment = experiment
        self.bus = bus
        self.store = store
        self.signer = signer
        self.federation = federation
        self.seed = seed  # the run's seed (a resumed run's stored one)
        self.run_id = ""  # set once the run exists
        self._by_id: dict[str, TaskRecord] = {}
        self._tasked: dict[tuple[int, str], set[str]] = {}  # (round, kind) -> sites tasked
        self._batch: list[_Sealed] | None = None  # inside batch(): sealed, not yet recorded
        self.models = models if models is not None else ModelPublisher(bus)

    # ------------------------------------------------------------------ lookups
    def restore(self, rows: list[dict[str, Any]]) -> None:
        """The tasks a resumed run recorded before it stopped."""
        for t in rows:
            self._remember(TaskRecord(task_id=t["task_id"], kind=t["kind"], round=t["round"], site=t["site"],
                                      split=t["split"]))

    def get(self, task_id: str) -> TaskRecord | None:
        return self._by_id.get(task_id)

    def tasked(self, round: int, kind: str) -> set[str]:
        """Sites sent a task of ``kind`` in ``round``."""
        return self._tasked.get((round, kind), set())

    def evaluations(self) -> Counter[str]:
        """EvalTasks sent per site in this run (a site's max_evaluations_per_run counts them)."""
        return Counter(r.site for r in self._by_id.values() if r.kind == "EvalTask")

    def _remember(self, record: TaskRecord) -> None:
        self._tasked.setdefault((record.round, record.kind), set()).add(record.site)
        self._by_id[record.task_id] = record

    # ------------------------------------------------------------------ sending
    def publish(self, payload: Task, *, site: str, round: int,
                model: tuple[Tensors, ModelRef] | None = None) -> str:
        """Seal ``payload`` for ``site``, record it, publish it (or queue it in ``batch``); its task id.

        ``model``: the version ``payload`` names by hash, published (once) before the task."""
        from protocol.codec import new_envelope, seal

        env = new_envelope(payload, federation=self.federation, run_id=self.run_id, round=round,
                           sender=COORDINATOR, recipient=site)
        kind = type(payload).__name__
        split = payload.split if isinstance(payload, EvalTask) else None
        record = TaskRecord(task_id=env.message_id, kind=kind, round=round, site=site, split=split)
        self._remember(record)
        frame = seal(env, self.signer)
        if self._batch is not None:
            self._batch.append(_Sealed(record, frame, model))
            return env.message_id
        # Recorded before publishing: a reply can never arrive for a task we do not know.
        self.store.record_task(run_id=self.run_id, round=round, site=site, kind=kind, task_id=env.message_id, split=split)
        if model is not None:
            self.models.send(*model, [site])
        self.bus.publish(TASKS, site, frame, message_id=env.message_id)
        return env.message_id

    @contextlib.contextmanager
    def batch(self, *, later: list[tuple[str, bytes, str]] | None = None) -> Iterator[None]:
        """Record a round's tasks in one transaction, then publish them.

        One durable commit per round instead of one per site: with many small sites the
        per-task fsync dominated the round time. Still recorded before any is published.
        ``later``: the sealed frames (site, frame, task id) are appended there, recorded but not
        published, for the caller to ``send`` (tasks naming no model only).
        """
        self._batch = []
        try:
            yield
            batch = self._batch
        finally:
            self._batch = None
        if not batch:
            return
        self.store.record_tasks(run_id=self.run_id, tasks=[(s.record.round, s.record.site, s.record.kind,
                                                            s.record.split, s.record.task_id) for s in batch])
        # Each version once, to every site of the batch that names it, before any task that does.
        versions: dict[str, tuple[tuple[Tensors, ModelRef], list[str]]] = {}
        for s in batch:
            if s.model is not None:
                versions.setdefault(s.model[1].sha256, (s.model, []))[1].append(s.record.site)
        for (weights, ref), sites in versions.values():
            self.models.send(weights, ref, sites)
        for s in batch:
            if later is not None and s.model is None:
                later.append((s.record.site, s.frame, s.record.task_id))
                continue
            self.bus.publish(TASKS, s.record.site, s.frame, message_id=s.record.task_id)

    def send(self, frames: list[tuple[str, bytes, str]]) -> None:
        """Publish frames a ``batch(later=...)`` recorded (safe from another thread: the bus's publisher locks)."""
        for site, frame, task_id in frames:
            self.bus.publish(TASKS, site, frame, message_id=task_id)

    def dataset(self) -> str:
        return self.experiment.dataset.name or ""

    def _by_ref(self, weights: Tensors) -> tuple[Tensors, dict[str, Any], tuple[Tensors, ModelRef] | None]:
        """The task's ``weights`` and model fields: inline, or empty and named by hash."""
        ref = self.models.ref(weights)
        if ref is None:
            return weights, {}, None
        return (), {"model_sha256": ref.sha256, "model_size": ref.size, "model_chunks": ref.chunks}, (weights, ref)

    def train(self, weights: Tensors, *, site: str, round: int, base_round: int, deadline: float,
              config: TaskConfig) -> str:
        inline, fields, model = self._by_ref(weights)
        task = TrainTask(
            experiment=self.experiment.to_wire(), weights=inline, dataset=self.dataset(), base_round=base_round,
            seed=derive_seed(self.seed, round, site), deadline=deadline, config=config, **fields,
        )
        return self.publish(task, site=site, round=round, model=model)

    def evaluate(self, weights: Tensors, *, site: str, round: int, split: str, deadline: float,
                 config: TaskConfig, union_tag: int = 0) -> str:
        inline, fields, model = self._by_ref(weights)
        task = EvalTask(
            experiment=self.experiment.to_wire(), weights=inline, dataset=self.dataset(), base_round=round,
            seed=derive_seed(self.seed, round, site, "eval"), deadline=deadline, split=split, config=config,
            union_tag=union_tag, **fields,
        )
        return self.publish(task, site=site, round=round, model=model)

    def personalize(self, weights: Tensors, *, site: str, round: int, deadline: float, config: TaskConfig) -> str:
        inline, fields, model = self._by_ref(weights)
        task = PersonalizeTask(experiment=self.experiment.to_wire(), weights=inline, dataset=self.dataset(),
                               base_round=round, seed=derive_seed(self.seed, round, site, "personalize"),
                               deadline=deadline, config=config, **fields)
        return self.publish(task, site=site, round=round, model=model)


__all__ = ["COORDINATOR", "TaskBook", "TaskRecord"]
