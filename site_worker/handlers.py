"""What a site does with one verified task: decide, train or evaluate, and say why not.

``TaskHandler.handle`` takes an envelope whose signature and freshness were already
checked and returns the reply payload (``Update``, ``EvalResult`` or ``Declined``).
It never touches the bus, so the same decisions are testable without a broker and the
daemon keeps the at-least-once bookkeeping (publish, then ack, then mark seen).
Order of checks: experiment valid -> dataset offered -> policy -> data -> the DP plan
against the policy (accountant, delta, noise, sample rate, epochs, steps, memory) ->
budget check and reservation in the ledger (one locked step) -> train/evaluate ->
release metrics as the policy says -> commit the reservation -> reply.

Over 500 lines on purpose: every task path's decisions (train, evaluate, personalise, the
Flower client) share one set of checks and one ledger lock, and splitting them apart would
let a path skip a check. The pieces that stand alone live beside it (dp, release, approvals).
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import structlog
import torch

from protocol.config import ConfigError, load_experiment
from protocol.dp_plan import check_epochs, release_entries, site_plan, union_release_entries
from protocol.messages import (Declined, Envelope, EvalResult, EvalTask, PersonalizeTask, StatsResult, StatsTask,
                               TrainTask, Update)
from protocol.model import build_model, load_tensors, summarize, to_tensors
from protocol.policy import PolicyViolation
from protocol.privacy_plan import BudgetExhausted, applies
from protocol.train_spec import TrainSpec
from site_worker.approvals import Approvals, experiment_hash
from site_worker.config import SiteConfig
from site_worker.data import DataError, PreparedData, announced_rows, prepare
from site_worker.dp import check_eval_memory, check_memory, noise_source, release_inputs, step_ghost_values
from site_worker.flower_adapter import FlowerAdapter, FlowerClientError
from site_worker.ledger import BudgetExceeded, PrivacyLedger
from site_worker.metrics import prefixed
from site_worker.noise_keys import NoiseKeys
from site_worker.policy import check_policy
from site_worker.release import release_metrics, release_size
from site_worker import personalize, proximal, run_budget, secure_metrics
from site_worker.final_model import FinalStore, RunsJoined, release_on_test
from site_worker.secagg import SecAggRefused
from site_worker.splits import SplitKey
from site_worker.trainer import TrainingAborted, train

if TYPE_CHECKING:
    from protocol.config import Experiment
    from site_worker.secagg_handlers import SecAggSite

log = structlog.get_logger(__name__)

Reply = Update | EvalResult | StatsResult | Declined
_EXPERIMENT_CACHE = 4  # experiments a site keeps parsed (one per run it serves, typically)
# Figures a Declined may carry: public settings and what the site already reported in its
# Updates. A projection from this task's rows (epsilon_projected) stays in the site's log.
WIRE_FIGURES = frozenset({"epsilon_spent", "max_epsilon", "delta", "count", "cap"})


class _Decline(Exception):
    def __init__(self, reason: str, detail: str, figures: dict[str, float] | None = None,
                 private: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.figures = figures or {}
        self.private = private or {}  # counts from the rows: the site's log only


def _fix_for_dp(model: torch.nn.Module) -> torch.nn.Module:
    """The model as sent, when Opacus can train it with DP; refused otherwise, never "fixed"
    (``ModuleValidator.fix`` would swap layers, i.e. train a model the coordinator did not
    send). Opacus' validator only looks at modules with trainable parameters, so a row-mixing
    layer without them passes it: ``check_layers`` refused those before the model was built."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise PolicyViolation(
            "the model has layers Opacus cannot train with DP (" + "; ".join(str(e)[:120] for e in errors)
            + "); use GroupNorm or LayerNorm in architecture.layers")
    for name, module in model.named_children():
        # Opacus 1.6's LayerNorm per-sample gradient reads .bias unconditionally (crashes without one).
        if isinstance(module, torch.nn.LayerNorm) and module.weight is not None and module.bias is None:
            raise PolicyViolation(
                f"dp_trainable: layer architecture.layers[{name}] is a LayerNorm with a weight and no bias, whose "
                "per-sample gradients Opacus cannot compute; set its bias to true (or elementwise_affine to false)")
    return model


class TaskHandler:
    """The site's decisions for TrainTask/EvalTask; holds the ledger and the optional Flower client."""

    def __init__(self, config: SiteConfig, *, ledger: PrivacyLedger | None = None,
                 stop: threading.Event | None = None, flower: FlowerAdapter | None = None) -> None:
        self.config = config
        self.ledger = ledger or PrivacyLedger(config.state_dir)
        self.stop = stop or threading.Event()
        self.flower = flower
        self.split_key = SplitKey.load_or_create(config.state_dir, test_fraction=config.policy.test_fraction)
        self.heads = personalize.HeadStore(config.state_dir)  # TaskConfig.personal_layers: this site's own last layers
        self.joined = RunsJoined(config.state_dir)  # runs this site trained in (a PersonalizeTask needs one)
        self.finals = FinalStore(config.state_dir)  # each run's final global and personalised models
        self.approvals = Approvals(config.state_dir)  # experiments the operator approved (require_approval)
        self.noise_keys = NoiseKeys(config.state_dir)  # each task seed's first release (reproducible_dp)
        self._lock = threading.Lock()  # one task at a time per dataset ledger
        self.secagg: SecAggSite | None = None  # the daemon's secure-aggregation endpoint (a secure run's union vector)
        # Per experiment (canonical JSON): the validated experiment, its summary and the model
        # skeletons. A daemon gets the same experiment every round; only weights and seed change.
        self._experiments: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
        self._skeletons: OrderedDict[tuple[str, bool], tuple[torch.nn.Module, str | None]] = OrderedDict()

    def handle(self, env: Envelope) -> Reply:
        """Reply payload for a verified TrainTask/EvalTask/PersonalizeTask. Raises ``TrainingAborted`` on stop."""
        task = env.payload
        assert isinstance(task, (TrainTask, EvalTask, PersonalizeTask, StatsTask))
        try:
            with self._lock:
                if isinstance(task, StatsTask):
                    from site_worker.stats import handle_stats  # the cohort table (issue 25)

                    return handle_stats(self, env, task)
                if isinstance(task, TrainTask):
                    return self._train(env, task)
                if isinstance(task, PersonalizeTask):
                    return self._personalize(env, task)
                return self._evaluate(env, task)
        except _Decline as d:
            log.warning("task_declined", task_id=env.message_id, reason=d.reason, detail=d.detail, **d.figures,
                        **{f"private_{k}": v for k, v in d.private.items()})
            figures = {k: v for k, v in d.figures.items() if k in WIRE_FIGURES}
            return Declined(task_id=env.message_id, reason=d.reason, detail=d.detail, figures=figures)  # type: ignore[arg-type]
        except TrainingAborted:
            raise
        except FlowerClientError as e:
            log.error("flower_client_failed", task_id=env.message_id, error=str(e))
            return Declined(task_id=env.message_id, reason="error", detail=str(e))
        except Exception as e:  # noqa: BLE001 - a bug must become an answer, not a redelivery loop
            self.release_reservations(env)  # it failed before its commit: nothing of it left the site
            # The text of an arbitrary exception can quote the data (a value, a row count): the
            # coordinator gets its type, the site's log gets the rest.
            log.exception("task_failed", task_id=env.message_id)
            return Declined(task_id=env.message_id, reason="error",
                            detail=f"{type(e).__name__}: the site failed on this task; its operator has the "
                                   "traceback in the site's log (event task_failed)")

    def release_reservations(self, env: Envelope) -> None:
        """Drop what a task reserved and never committed (committed releases stay charged)."""
        task = env.payload
        dataset = getattr(task, "dataset", None)
        if dataset not in self.config.datasets:
            return
        self.ledger.cancel(dataset, env.message_id)
        if isinstance(task, PersonalizeTask):
            self.ledger.cancel(dataset, personalize.release_id(env.run_id))

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
        if self.config.policy.require_approval:
            digest = experiment_hash(exp.to_wire(), task.dataset)  # normalised: as `site approve` hashes it
            if not self.approvals.approved(digest):
                raise _Decline("policy", f"require_approval: experiment {digest} is not approved at this site; its "
                                         "operator reviews it with `fedbus site check --experiment` and runs "
                                         "`fedbus site approve EXPERIMENT.json`")
        try:
            check_policy(self.config.policy, exp, parameters=int(summary.parameters), buffers=summary.buffers)
        except PolicyViolation as e:
            raise _Decline("policy", str(e)) from None
        self._check_evaluation(exp, task)
        return exp, summary, key

    def _check_evaluation(self, exp: Experiment, task: TrainTask | EvalTask | PersonalizeTask) -> None:
        """Every task evaluates (before/after metrics, an evaluation, the final release of two
        models): its memory and its release vector, from the shapes and the announced rows."""
        try:
            rows = announced_rows(self.config.datasets[task.dataset])
        except DataError as e:
            raise _Decline("data", str(e)) from None
        models = 2 if isinstance(task, PersonalizeTask) else 1
        values = models * release_size(task=str(exp.dataset.task), loss_name=str(exp.training.loss_function),
                                       outputs=exp.chain.output_values)
        try:
            check_eval_memory(self.config.policy, exp.chain, rows=rows, release_values=values)
        except PolicyViolation as e:
            raise _Decline("policy", str(e)) from None

    def _data(self, task: TrainTask | EvalTask, exp: Experiment, summary: Any) -> PreparedData:
        try:
            return prepare(self.config.datasets[task.dataset], exp.dataset, key=self.split_key,
                           input_shape=tuple(summary.input_shape) if summary.input_shape else None)
        except DataError as e:
            raise _Decline("data", str(e), private=e.private) from None

    def _reserve(self, dataset: str, env: Envelope, *, kind: str, entries: list, delta: float,
                 max_count: tuple[int, str] | None = None, pooled: list | None = None) -> float:
        """Budget check and reservation in one locked ledger step; the projected ε."""
        try:
            _spent, projected = self.ledger.reserve(
                dataset, release_id=env.message_id, kind=kind, entries=entries, delta=delta,
                accountant=self.config.policy.accountant, max_epsilon=self.config.policy.max_epsilon,
                run_id=env.run_id, max_count=max_count, pooled=pooled)
        except BudgetExceeded as e:
            reason = "policy" if e.detail.startswith("max_evaluations_per_run") else "budget"
            raise _Decline(reason, e.detail, e.figures) from None
        return projected

    def _skeleton(self, exp: Experiment, key: str, *, for_dp: bool) -> tuple[torch.nn.Module, str | None]:
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

    def _model(self, exp: Experiment, key: str, task: TrainTask | EvalTask, *, for_dp: bool) -> torch.nn.Module:
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
        if (sa := exp.federated.secure_aggregation) is not None and sa.dp != "off":  # never without its noise
            if sa.dp != "central":  # central: trained here, clipped and noised before masking (central_task.py)
                raise _Decline("policy", "secure_aggregation: a pooled DP run is trained only by the daemon's pooled "
                                         "step (site_worker/pooled_task.py)")
        if self.flower is not None:
            return self._flower_fit(env, task)
        policy = self.config.policy
        spec = TrainSpec.from_experiment(exp, seed=task.seed, overrides=task.config.overrides())
        data = self._data(task, exp, summary)
        n_train = len(data.x_train)
        plan = None
        try:
            check_epochs(policy, spec.epochs)
            if spec.dp is not None:
                plan = site_plan(policy, spec, n_train=n_train, rows=data.rows,
                                 noise_multiplier=self._run_noise(env, task, exp, data, n_train))
            check_memory(policy, int(summary.parameters), activations=exp.chain.train_values,
                         batch_size=spec.batch_size, n_train=n_train,
                         sample_rate=plan.sample_rate if plan is not None else None,
                         ghost_values=step_ghost_values(exp.chain, dp=plan is not None))
        except PolicyViolation as e:
            raise _Decline("policy", str(e)) from None
        model = self._model(exp, key, task, for_dp=plan is not None)
        personal = personalize.personal_layers(task.config)
        if personal:
            self.heads.apply(model, env.run_id, task.dataset, personal)
        inputs = self._inputs(key, task, model, data, plan)  # reproducible noise's key: before any training
        epsilon = None
        if plan is not None:
            entries = plan.entries() + release_entries(policy)
            epsilon = self._reserve(task.dataset, env, kind="train", entries=entries, delta=plan.delta)
        try:
            rng = noise_source(policy, task_seed=task.seed, purpose="train", inputs=inputs) if plan is not None else None
            before = (release_metrics(model, data.x_val, data.y_val, loss_name=spec.loss, task=data.task,
                                      policy=policy, rng=None) if policy.metrics == "exact" else {})
            result = train(model, data, spec, plan=plan, stop=self.stop, rng=rng, measure=False,
                           hooks=proximal.hooks_for(task.config, model))
        except TrainingAborted:
            if plan is not None:
                self.ledger.cancel(task.dataset, env.message_id)  # nothing left the site
            raise
        after = release_metrics(result.model, data.x_val, data.y_val, loss_name=spec.loss, task=data.task,
                                policy=policy, rng=noise_source(policy, task_seed=task.seed, purpose="metrics",
                                                                inputs=inputs),
                                rows=announced_rows(self.config.datasets[task.dataset]))
        if personal:
            self.heads.keep(result.model, env.run_id, task.dataset, personal)
        metrics = {**result.metrics, **prefixed("before", before), **prefixed("after", after)}
        if "n" in after:  # at most the announced rows (public): the coordinator refuses more (count_bound)
            metrics["n_val"] = min(after["n"], float(announced_rows(self.config.datasets[task.dataset])))
        if plan is not None:
            # Durable before the reply exists: a crash after this can only over-count, never under-count.
            self.ledger.commit(task.dataset, env.message_id)
            if result.history != plan.entries():
                log.error("accountant_disagrees_with_plan", planned=plan.entries(), trained=result.history)
        self.joined.trained(env.run_id, task.dataset, env.round)
        return Update(task_id=env.message_id, weights=to_tensors(result.model), num_examples=result.num_examples,
                      metrics=metrics, epsilon=epsilon, delta=plan.delta if plan else None,
                      base_round=task.base_round, reproducible=bool(plan and plan.reproducible))

    def _evaluate(self, env: Envelope, task: EvalTask) -> Reply:
        exp, summary, key = self._experiment(task)
        policy = self.config.policy
        if self.flower is not None:
            if policy.metrics != "exact" and not policy.allow_unprotected_flower_client:
                raise _Decline("policy", "metrics: a Flower client's evaluation is exact and this site's "
                                         f"policy.metrics is {policy.metrics!r}")
            return self.flower.evaluate(task, task_id=env.message_id, server_round=env.round)
        if policy.metrics == "none":
            raise _Decline("policy", "metrics: this site withholds evaluation metrics (policy.metrics = \"none\")")
        if task.split not in ("validation", "test"):
            raise _Decline("data", f"split {task.split!r} is not validation or test")
        data = self._data(task, exp, summary)
        try:
            x, y = data.split(task.split)
            rows = announced_rows(self.config.datasets[task.dataset])  # the released counts' public bound
        except DataError as e:
            raise _Decline("data", str(e)) from None
        model = self._model(exp, key, task, for_dp=False)
        if personalize.personal_layers(task.config):
            self.heads.apply(model, env.run_id, task.dataset, personalize.personal_layers(task.config))
        union = secure_metrics.union_wanted(task, policy)  # a secure run's final test: its own release + the union's
        if union:
            try:
                secure_metrics.check_union(self.secagg, env)
            except SecAggRefused as e:
                raise _Decline("secure_aggregation", str(e)) from None
        entries = release_entries(policy) + (union_release_entries(policy) if union else [])
        projected = self._reserve(task.dataset, env, kind="eval", entries=entries, delta=policy.site_delta(data.rows),
                                  max_count=(policy.max_evaluations_per_run, "max_evaluations_per_run"))
        t0 = time.perf_counter()
        rng = noise_source(policy, task_seed=task.seed, purpose="eval",
                           inputs=self._inputs(key, task, model, data, task.split))
        if task.split == "test":  # with sensitivity, specificity and the majority-class baseline
            m = release_on_test([model], x, y, data.y_train, loss_name=str(exp.training.loss_function), task=data.task,
                                policy=policy, rng=rng, rows=rows)[0]
        else:
            m = release_metrics(model, x, y, loss_name=str(exp.training.loss_function), task=data.task,
                                policy=policy, rng=rng, rows=rows)
        fields: dict[str, Any] = {}
        if union:
            assert self.secagg is not None  # check_union
            try:
                fields, public = secure_metrics.masked_union(
                    self.secagg, env, task, model, x, y, loss_name=str(exp.training.loss_function), task_kind=data.task,
                    policy=policy, rng=noise_source(policy, task_seed=task.seed, purpose="union",
                                                    inputs=self._inputs(key, task, model, data, "union")))
            except SecAggRefused as e:
                self.ledger.cancel(task.dataset, env.message_id)  # nothing left the site
                raise _Decline("secure_aggregation", str(e)) from None
            m.update(public)
        self.ledger.commit(task.dataset, env.message_id)
        if task.split == "test" and entries:  # the ledger after the run's last releases (as a fine-tune's reply says)
            m["epsilon"] = projected
        n = int(m.get("n", len(x)))
        m["eval_s"] = time.perf_counter() - t0
        return EvalResult(task_id=env.message_id, num_examples=n, metrics=m, base_round=task.base_round, **fields)

    def _personalize(self, env: Envelope, task: PersonalizeTask) -> Reply:
        """The final global model: evaluate it on the fixed test split, fine-tune a personal copy
        on the training rows (its private head, ``training.personalization``) under this site's
        budget, keep both, and release both models' test metrics in one accounted release."""
        exp, summary, key = self._experiment(task)
        policy = self.config.policy
        if self.flower is not None:  # fedbus cannot fine-tune a Flower client under the ledger: global model only
            return self._evaluate(env, EvalTask(experiment=task.experiment, weights=task.weights, dataset=task.dataset,
                                                base_round=task.base_round, seed=task.seed, deadline=task.deadline,
                                                split="test", config=task.config))
        last = self.joined.last_round(env.run_id, task.dataset)
        if last is None:
            raise _Decline("policy", f"run {env.run_id!r}: this site never trained in it, so it does not personalise "
                                     "a final model of it (no budget is opened for a run it did not join)")
        if env.round < last or task.base_round != env.round:
            raise _Decline("policy", f"final model of round {env.round} (base_round {task.base_round}) but this site "
                                     f"trained in round {last} of run {env.run_id!r}: not the run's final model")
        done = self.finals.reply(env.run_id, task.dataset)
        if done is not None:
            if done.get("task_id") == env.message_id:  # redelivered after a crash: the same answer, no new spend
                return EvalResult(task_id=env.message_id, num_examples=int(done["num_examples"]),
                                  metrics=dict(done["metrics"]), base_round=task.base_round)
            raise _Decline("policy", f"run {env.run_id!r} was already personalised (task {done.get('task_id')}): "
                                     "one final model per run")
        data = self._data(task, exp, summary)
        try:
            x, y = data.split("test")
            rows = announced_rows(self.config.datasets[task.dataset])  # the released counts' public bound
        except DataError as e:
            raise _Decline("data", str(e)) from None
        spec = TrainSpec.from_experiment(exp, seed=task.seed)
        fine_tune = exp.training.personalization is not None
        if fine_tune:  # bounded like any training task, DP or not
            try:
                check_epochs(policy, int(exp.training.personalization.epochs))
                check_memory(policy, int(summary.parameters), activations=exp.chain.train_values,
                             batch_size=spec.batch_size, n_train=len(data.x_train),
                             sample_rate=None if spec.dp is None else min(1.0, spec.batch_size / max(1, len(data.x_train))),
                             ghost_values=step_ghost_values(exp.chain, dp=spec.dp is not None))
            except PolicyViolation as e:
                raise _Decline("policy", f"personalisation: {e}") from None
        model = self._model(exp, key, task, for_dp=spec.dp is not None and fine_tune)
        global_model = copy.deepcopy(model)
        layers = personalize.personal_layers(task.config)
        # Reserved first: a run budget's fine-tune noise then leaves room for this release.
        self._reserve(task.dataset, env, kind="eval", entries=release_entries(policy),
                      delta=policy.site_delta(data.rows),
                      max_count=(policy.max_evaluations_per_run, "max_evaluations_per_run"))
        t0 = time.perf_counter()
        try:
            if layers:
                self.heads.apply(model, env.run_id, task.dataset, layers)
            inputs = self._inputs(key, task, global_model, model, data)
            if fine_tune:
                personalize.personalize_at_site(exp, model, data, config=self.config, dataset=task.dataset,
                                                run_id=env.run_id, seed=task.seed, inputs=inputs)
        except BaseException as e:
            self.ledger.cancel(task.dataset, env.message_id)  # no metrics left the site
            if isinstance(e, (BudgetExceeded, BudgetExhausted)):
                detail = e.detail if isinstance(e, BudgetExceeded) else f"total_epsilon: {e}"
                raise _Decline("budget", f"personalisation: {detail}",
                               getattr(e, "figures", None)) from None
            if isinstance(e, PolicyViolation):
                raise _Decline("policy", f"personalisation: {e}") from None
            raise
        tune_s = time.perf_counter() - t0
        model.eval()
        released = release_on_test([global_model, model], x, y, data.y_train, loss_name=str(exp.training.loss_function),
                                   task=data.task, policy=policy, rows=rows,
                                   rng=noise_source(policy, task_seed=task.seed, purpose="final", inputs=inputs))
        self.ledger.commit(task.dataset, env.message_id)
        metrics = {**released[0], **prefixed("personalized", released[1])}
        if "n" in released[1]:
            metrics["personalized_n"] = released[1]["n"]
        metrics["personalize_s"] = tune_s
        delta = policy.site_delta(data.rows)
        if spec.dp is not None:
            metrics["epsilon"] = self.ledger.spent(task.dataset, delta=delta, accountant=policy.accountant)
            metrics["delta"] = delta
        n = int(released[0].get("n", len(x)))
        self.finals.keep(env.run_id, task.dataset, models={"global": global_model, "personalized": model},
                         reply={"task_id": env.message_id, "round": env.round, "num_examples": n, "metrics": metrics})
        log.info("personalized", run_id=env.run_id, dataset=task.dataset, fine_tune=fine_tune, personal_layers=layers,
                 personalize_s=round(tune_s, 3))
        return EvalResult(task_id=env.message_id, num_examples=n, metrics=metrics, base_round=task.base_round)

    def _inputs(self, key: str, task: Any, *parts: Any) -> Any:
        """What reproducible noise is keyed with beside the seeds: the digest (``dp.release_inputs``)
        of the task as sent (but its deadline), the model and data the release is computed from,
        the plan and the policy, unless this is the seed's first release or an identical one
        (``noise_keys``: a model one float-rounding off must not change the noise). Computed
        only when the policy is reproducible (it hashes the data)."""
        if not self.config.policy.reproducible_dp:
            return None
        fields = (key, task.dataset, task.seed, task.base_round, getattr(task, "split", None),
                  json.dumps(getattr(task, "config", None) or {}, sort_keys=True, default=str))
        digest = release_inputs(fields, *parts, repr(self.config.policy))
        return lambda: self.noise_keys.extra_key(task.seed, digest)

    def _run_noise(self, env: Envelope, task: TrainTask, exp: Experiment, data: PreparedData, n_train: int) -> float | None:
        """σ under the run's ``total_epsilon`` (``site_worker.run_budget``), else None (the spec's own)."""
        if not applies(exp):
            return None
        policy = self.config.policy
        try:
            return run_budget.noise_for_task(exp, self.ledger, run_id=env.run_id, dataset=task.dataset, round=env.round,
                                             n_train=n_train, delta=policy.site_delta(data.rows),
                                             accountant=policy.accountant, policy=policy)
        except BudgetExhausted as e:
            raise _Decline("budget", f"total_epsilon: {e}") from None

    def _flower_fit(self, env: Envelope, task: TrainTask) -> Reply:
        """A Flower client trains: only with DP parameters the ledger can account (its
        ``fedbus_dp_plan``), or when the policy explicitly allows an unprotected client."""
        assert self.flower is not None
        policy = self.config.policy
        if task.config.epochs is not None:  # the client is told to run them: policy.max_epochs holds here too
            try:
                check_epochs(policy, task.config.epochs)
            except PolicyViolation as e:
                raise _Decline("policy", str(e)) from None
        declared = self.flower.dp_plan(task, server_round=env.round)
        if declared is None:
            if not policy.allow_unprotected_flower_client:
                raise _Decline("policy", "allow_unprotected_flower_client: the Flower client declares no DP "
                                         "parameters (fedbus_dp_plan) the ledger can account, and this site's "
                                         "policy.allow_unprotected_flower_client is false")
            return self.flower.fit(task, task_id=env.message_id, server_round=env.round, epsilon=None, delta=None,
                                   keep_metrics=True)
        try:
            rows = announced_rows(self.config.datasets[task.dataset])
        except DataError as e:
            raise _Decline("data", str(e)) from None
        plan = declared
        for bad, setting, detail in (
            (plan.noise_multiplier < policy.min_noise_multiplier, "min_noise_multiplier",
             f"noise multiplier {plan.noise_multiplier:g} < {policy.min_noise_multiplier:g}"),
            (plan.sample_rate > policy.max_sample_rate, "max_sample_rate",
             f"sample rate {plan.sample_rate:g} > {policy.max_sample_rate:g}"),
            (plan.steps > policy.max_steps_per_task, "max_steps_per_task",
             f"{plan.steps} steps > {policy.max_steps_per_task}"),
        ):
            if bad:
                raise _Decline("policy", f"{setting}: the Flower client declares {detail} (policy.{setting})")
        delta = policy.site_delta(rows)
        epsilon = self._reserve(task.dataset, env, kind="train", entries=plan.entries(), delta=delta)
        try:
            update = self.flower.fit(task, task_id=env.message_id, server_round=env.round, epsilon=epsilon,
                                     delta=delta, keep_metrics=policy.metrics == "exact")
        except BaseException:
            # The client may have trained and kept state; what it did is counted (over, never under).
            self.ledger.commit(task.dataset, env.message_id)
            raise
        self.ledger.commit(task.dataset, env.message_id)
        return update


__all__ = ["TaskHandler", "TrainingAborted", "Reply"]
