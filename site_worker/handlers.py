"""What a site does with one verified task: decide, train or evaluate, and say why not.

``TaskHandler.handle`` takes an envelope whose signature and freshness were already
checked and returns the reply payload (``Update``, ``EvalResult`` or ``Declined``).
It never touches the bus, so the same decisions are testable without a broker and the
daemon keeps the at-least-once bookkeeping (publish, then ack, then mark seen).
Order of checks: experiment valid -> dataset offered -> policy -> data -> budget.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections import OrderedDict
from typing import Any

import structlog
import torch

from protocol.config import ConfigError, load_experiment
from protocol.messages import Declined, Envelope, EvalResult, EvalTask, TrainTask, Update
from protocol.model import build_model, load_tensors, summarize, to_tensors
from site_worker.config import SiteConfig
from site_worker.data import DataError, PreparedData, prepare
from site_worker.flower_adapter import FlowerAdapter, FlowerClientError
from site_worker.ledger import PrivacyLedger
from site_worker.metrics import evaluate
from site_worker.policy import PolicyViolation, check_noise, check_policy, dp_settings
from site_worker import personalize, proximal, run_budget
from site_worker.trainer import TrainSpec, TrainingAborted, plan_dp, train

log = structlog.get_logger(__name__)

Reply = Update | EvalResult | Declined
_EXPERIMENT_CACHE = 4  # experiments a site keeps parsed (one per run it serves, typically)


class _Decline(Exception):
    def __init__(self, reason: str, detail: str, figures: dict[str, float] | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.figures = figures or {}


def _fix_for_dp(model: torch.nn.Module) -> torch.nn.Module:
    """Opacus ``ModuleValidator.fix`` when needed; refuse when it would change the weights' layout."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if not errors:
        return model
    before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    fixed = ModuleValidator.fix(model)
    after = {k: tuple(v.shape) for k, v in fixed.state_dict().items()}
    log.info("model_fixed_for_dp", problems=[str(e)[:200] for e in errors], layout_kept=before == after)
    if before != after:
        raise PolicyViolation(
            "the model has layers Opacus cannot train with DP (" + "; ".join(str(e)[:120] for e in errors)
            + "); replacing them (BatchNorm -> GroupNorm) changes the parameters the coordinator sent; "
            "use GroupNorm or LayerNorm in architecture.layers")
    return fixed


class TaskHandler:
    """The site's decisions for TrainTask/EvalTask; holds the ledger and the optional Flower client."""

    def __init__(self, config: SiteConfig, *, ledger: PrivacyLedger | None = None,
                 stop: threading.Event | None = None, flower: FlowerAdapter | None = None) -> None:
        self.config = config
        self.ledger = ledger or PrivacyLedger(config.state_dir)
        self.stop = stop or threading.Event()
        self.flower = flower
        self.run_ledger = run_budget.RunLedger(config.state_dir)
        self.heads = personalize.HeadStore(config.state_dir)
        self._lock = threading.Lock()  # one task at a time per dataset ledger
        # Per experiment (canonical JSON): the validated experiment, its summary and the model
        # skeletons. A daemon gets the same experiment every round; only weights and seed change.
        self._experiments: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
        self._skeletons: OrderedDict[tuple[str, bool], tuple[torch.nn.Module, str | None]] = OrderedDict()

    def handle(self, env: Envelope) -> Reply:
        """Reply payload for a verified TrainTask/EvalTask. Raises ``TrainingAborted`` on stop."""
        task = env.payload
        assert isinstance(task, (TrainTask, EvalTask))
        try:
            with self._lock:
                if isinstance(task, TrainTask):
                    return self._train(env, task)
                return self._evaluate(env, task)
        except _Decline as d:
            log.warning("task_declined", task_id=env.message_id, reason=d.reason, detail=d.detail, **d.figures)
            return Declined(task_id=env.message_id, reason=d.reason, detail=d.detail, figures=d.figures)  # type: ignore[arg-type]
        except TrainingAborted:
            raise
        except FlowerClientError as e:
            log.error("flower_client_failed", task_id=env.message_id, error=str(e))
            return Declined(task_id=env.message_id, reason="error", detail=str(e))
        except Exception as e:  # noqa: BLE001 - a bug must become an answer, not a redelivery loop
            log.exception("task_failed", task_id=env.message_id)
            return Declined(task_id=env.message_id, reason="error", detail=f"{type(e).__name__}: {e}"[:500])

    # ------------------------------------------------------------------ shared checks

    @staticmethod
    def _remember(cache: OrderedDict, key: Any, value: Any) -> None:
        cache[key] = value
        while len(cache) > _EXPERIMENT_CACHE:
            cache.popitem(last=False)

    def _experiment(self, task: TrainTask | EvalTask) -> tuple[Any, Any, str]:
        key = json.dumps(task.experiment, sort_keys=True, default=str)
        cached = self._experiments.get(key)
        if cached is None:
            try:
                exp = load_experiment(task.experiment)
                summary = summarize(exp.architecture.layers)
            except ConfigError as e:
                raise _Decline("policy", f"invalid experiment: {e}") from None
            cached = (exp, summary)
            self._remember(self._experiments, key, cached)
        exp, summary = cached
        if task.dataset not in self.config.datasets:
            raise _Decline("data", f"dataset {task.dataset!r} is not offered by this site "
                                   f"(offered: {', '.join(sorted(self.config.datasets))})")
        try:
            check_policy(self.config.policy, exp, parameters=int(summary.parameters))
        except PolicyViolation as e:
            raise _Decline("policy", str(e)) from None
        return exp, summary, key

    def _data(self, task: TrainTask | EvalTask, exp: Any, summary: Any) -> PreparedData:
        try:
            return prepare(self.config.datasets[task.dataset], exp.dataset, seed=task.seed,
                           input_shape=tuple(summary.input_shape) if summary.input_shape else None)
        except DataError as e:
            raise _Decline("data", str(e)) from None

    def _skeleton(self, exp: Any, key: str, *, for_dp: bool) -> tuple[torch.nn.Module, str | None]:
        """The experiment's module (made DP-trainable when ``for_dp``), built once; the second
        item is why Opacus cannot train it (then the module is the plain one)."""
        cached = self._skeletons.get((key, for_dp))
        if cached is None:
            model = build_model(exp.architecture.layers, seed=0)  # every weight is overwritten per task
            problem = None
            if for_dp:
                try:
                    model = _fix_for_dp(model)
                except PolicyViolation as e:
                    problem = str(e)
            cached = (model, problem)
            self._remember(self._skeletons, (key, for_dp), cached)
        return cached

    def _model(self, exp: Any, key: str, task: TrainTask | EvalTask, *, for_dp: bool) -> torch.nn.Module:
        """A fresh module holding the task's weights (a copy of the cached skeleton)."""
        skeleton, problem = self._skeleton(exp, key, for_dp=for_dp)
        model = copy.deepcopy(skeleton)
        try:
            load_tensors(model, task.weights, strict=True)
        except (ValueError, KeyError, RuntimeError) as e:
            raise _Decline("error", f"task weights do not fit the experiment's model: {e}") from None
        if problem is not None:
            raise _Decline("policy", problem)
        return model

    # ------------------------------------------------------------------ train / eval

    def _train(self, env: Envelope, task: TrainTask) -> Reply:
        exp, summary, key = self._experiment(task)
        if self.flower is not None:
            return self.flower.fit(task, task_id=env.message_id, server_round=env.round)
        spec = TrainSpec.from_experiment(exp, seed=task.seed, overrides=task.config)
        data = self._data(task, exp, summary)
        dp = dp_settings(exp)
        model = self._model(exp, key, task, for_dp=dp is not None)
        personal = personalize.personal_layers(exp, task.config)
        if personal:
            self.heads.apply(model, env.run_id, task.dataset, personal)  # FedPer: this site's own head
        plan = None
        history = []
        budgeted = spec.dp is not None and run_budget.applies(exp)
        if spec.dp is not None:
            try:
                plan = (run_budget.task_dp_plan(exp, spec, self.run_ledger, run_id=env.run_id, dataset=task.dataset,
                                                round=env.round, n_train=len(data.x_train),
                                                min_noise=self.config.policy.min_noise_multiplier)
                        if budgeted else plan_dp(spec, len(data.x_train)))
            except run_budget.BudgetExhausted as e:
                raise _Decline("budget", str(e)) from None
            try:
                check_noise(self.config.policy, plan.noise_multiplier)
            except PolicyViolation as e:
                raise _Decline("policy", str(e)) from None
            history = self.ledger.history(task.dataset)
            spent = self.ledger.spent(task.dataset, delta=plan.delta, accountant=plan.accountant)
            projected = self.ledger.project(task.dataset, noise_multiplier=plan.noise_multiplier,
                                            sample_rate=plan.sample_rate, steps=plan.steps,
                                            delta=plan.delta, accountant=plan.accountant)
            cap = self.config.policy.max_epsilon
            if cap is not None and projected > cap:
                raise _Decline("budget", f"training would raise epsilon on {task.dataset!r} from {spent:.4g} to "
                                         f"{projected:.4g}, above this site's max_epsilon {cap:g}",
                               {"epsilon_spent": spent, "epsilon_projected": projected, "max_epsilon": cap,
                                "delta": plan.delta})
        result = train(model, data, spec, history=history, plan=plan, stop=self.stop,
                       hooks=proximal.hooks_for(exp, task.config, model))
        if personal:
            self.heads.keep(result.model, env.run_id, task.dataset, personal)
        if spec.dp is not None:
            # Durable before the reply exists: a crash after this can only over-count, never under-count.
            self.ledger.record(task.dataset, result.history, task_id=env.message_id)
            if budgeted:
                self.run_ledger.record(env.run_id, task.dataset, noise_multiplier=plan.noise_multiplier,
                                       sample_rate=plan.sample_rate, steps=plan.steps, task_id=env.message_id)
        return Update(task_id=env.message_id, weights=to_tensors(result.model), num_examples=result.num_examples,
                      metrics=result.metrics, epsilon=result.epsilon, delta=result.delta,
                      base_round=task.base_round)

    def _evaluate(self, env: Envelope, task: EvalTask) -> Reply:
        exp, summary, key = self._experiment(task)
        if self.flower is not None:
            return self.flower.evaluate(task, task_id=env.message_id, server_round=env.round)
        data = self._data(task, exp, summary)
        model = self._model(exp, key, task, for_dp=False)
        personal = personalize.personal_layers(exp)
        if personal:
            self.heads.apply(model, env.run_id, task.dataset, personal)
        t0 = time.perf_counter()
        m = evaluate(model, data.x_val, data.y_val, loss_name=str(exp.training.loss_function), task=data.task)
        m["eval_s"] = time.perf_counter() - t0
        return EvalResult(task_id=env.message_id, num_examples=int(len(data.x_val)), metrics=m,
                          base_round=task.base_round)


__all__ = ["TaskHandler", "TrainingAborted", "Reply"]
