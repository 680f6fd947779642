"""The experiment configuration: schema, defaults and ``load_experiment``.

An experiment is the JSON document a coordinator runs and sends to every site in
``TrainTask.experiment``. Its shape follows the MediNet export
(``metadata``, ``basic_info``, ``architecture``, ``training``, ``dataset``,
``federated``, ``job_config``): such an export is accepted unchanged, and every field
fedbus does not use is kept (``Experiment.raw`` holds the document exactly as given), so
a run can be exported "as run".

Keys are strict: a key no block declares is an error naming its JSON path, with a "did
you mean" (a typo must never fall back to a default while the run spends privacy
budget). MediNet's own fields (``metadata``, ``job_config``, ``training.flower_version``,
...) are an explicit per-block list (``_Block.medinet_fields``), accepted and reported
by ``Experiment.not_used`` as "not used by fedbus". A new experiment field is declared
as an ordinary pydantic field on its block; nothing else needs to change.

Validation happens here, at the edge: a bad document raises ``ConfigError`` whose
``path`` is the JSON path of the field (``training.batch_size``,
``architecture.layers[2].params.in_features``). The layer list is checked against the
whitelist and its shapes walked by ``protocol.layers`` without building anything.
Inside fedbus, code trusts the typed ``Experiment``.

Over 500 lines on purpose: the experiment schema, its MediNet aliases and its cross-field
checks are one contract with one error path (the JSON path of the fault).
"""

from __future__ import annotations

import copy
import difflib
import json
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from protocol.config_error import ConfigError
from protocol.layers import ResolvedChain, canonical_type, resolve_layers, row_mixing_message, unknown_type_message

__all__ = [
    "ConfigError",
    "DPConfig",
    "DatasetSpec",
    "Experiment",
    "FederatedSpec",
    "LayerSpec",
    "PersonalizationSpec",
    "load_experiment",
]

# Strict scalars: "32" or true is not a batch size.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # strict float still accepts JSON integers
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]

LossName = Literal["bce_with_logits", "cross_entropy", "mse"]
OptimizerName = Literal["adam", "sgd", "rmsprop"]
Task = Literal["binary", "multiclass", "regression"]

MAX_LAYERS = 1024

_LOSS_ALIASES = {
    "bcewithlogits": "bce_with_logits",
    "crossentropy": "cross_entropy",
    "mse": "mse",
    "meansquarederror": "mse",
}
_OPTIMIZER_ALIASES = {"adam": "adam", "sgd": "sgd", "rmsprop": "rmsprop"}
# Flower's spelling of the federated parameters -> fedbus's (one spelling inside).
_FLOWER_PARAM_ALIASES = {"fraction_evaluate": "fraction_eval", "min_evaluate_clients": "min_eval_clients"}
_POSITIVE_IF = re.compile(r"^\s*(>=|<=|==|!=|>|<)\s*([-+]?\d+(?:\.\d+)?)\s*$")


class _Block(BaseModel):
    """A block of the experiment. Unknown keys are refused by ``check_keys`` before
    validation; the MediNet fields listed in ``medinet_fields`` are kept (``extra="allow"``)
    and reported as not used by fedbus."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    medinet_fields: ClassVar[frozenset[str]] = frozenset()


# --------------------------------------------------------------------------- architecture


class LayerSpec(_Block):
    """One entry of ``architecture.layers``: a whitelisted type and its params."""

    medinet_fields: ClassVar[frozenset[str]] = frozenset({"readonly", "id", "position"})

    name: Str | None = None
    type: Str
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("type")
    @classmethod
    def _whitelisted(cls, value: str) -> str:
        canonical = canonical_type(value)
        if canonical is None:
            raise ValueError(unknown_type_message(value))
        return canonical

    @field_validator("params", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value


class Architecture(_Block):
    layers: list[LayerSpec] = Field(min_length=1, max_length=MAX_LAYERS)


class BasicInfo(_Block):
    name: Str = "experiment"
    description: Str = ""


# --------------------------------------------------------------------------- training


class DPConfig(_Block):
    """Site-side DP-SGD (Opacus): a fixed noise multiplier, a target epsilon per task, or a
    total epsilon per site for the whole run (``total_epsilon``, at ``delta``), from which
    each site derives its own noise from its own row count and the planned steps."""

    enabled: Bool = True
    noise_multiplier: Float | None = Field(None, ge=0)
    max_grad_norm: Float = Field(1.0, gt=0)
    target_epsilon: Float | None = Field(None, gt=0)
    total_epsilon: Float | None = Field(None, gt=0)
    delta: Float = Field(1e-5, gt=0, lt=1)
    random_seed: Int | None = None
    accountant: Literal["rdp", "prv", "gdp"] = "rdp"

    @model_validator(mode="after")
    def _noise_or_target(self) -> DPConfig:
        if self.enabled and self.noise_multiplier is None and self.target_epsilon is None and self.total_epsilon is None:
            raise ValueError('set "noise_multiplier", "target_epsilon" or "total_epsilon", '
                             'or "enabled": false to train without DP')
        if self.total_epsilon is not None and (self.target_epsilon is not None or self.noise_multiplier is not None):
            raise ValueError('"total_epsilon" (a budget for the whole run) fixes the noise itself; '
                             'drop "target_epsilon" and "noise_multiplier"')
        return self


class OptimizerSpec(_Block):
    type: OptimizerName = "adam"
    learning_rate: Float = Field(1e-3, gt=0)
    weight_decay: Float = Field(0.0, ge=0)
    momentum: Float = Field(0.0, ge=0)
    differential_privacy: DPConfig | None = None

    @field_validator("type", mode="before")
    @classmethod
    def _alias(cls, value: Any) -> Any:
        if isinstance(value, str):
            return _OPTIMIZER_ALIASES.get(value.strip().lower(), value)
        return value


class PersonalizationSpec(_Block):
    """After the federated rounds each site fine-tunes the global model on its own training
    rows (``last_layer``: only the final layer; ``full``: every layer) for ``epochs``, under
    the same DP settings and, with ``total_epsilon``, inside the same run budget."""

    mode: Literal["last_layer", "bias", "full"] = "last_layer"
    epochs: Int = Field(5, ge=1)
    learning_rate: Float | None = Field(None, gt=0)
    # "last": keep the last epoch; "validation": keep the checkpoint (the model before
    # fine-tuning, or after any epoch) with the lowest loss on the site's own validation split,
    # site-local (site_worker.personalize).
    select: Literal["validation", "last"] = "last"
    # Ditto-style pull towards the global model while fine-tuning: grad += mu * (w - w_global).
    proximal_mu: Float = Field(0.0, ge=0)


class TrainingSpec(_Block):
    medinet_fields: ClassVar[frozenset[str]] = frozenset({"metrics", "flower_version"})
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    loss_function: LossName
    epochs: Int = Field(ge=1)
    batch_size: Int = Field(ge=1)
    rounds: Int = Field(ge=1)
    seed: Int = 42
    personalization: PersonalizationSpec | None = None

    @field_validator("loss_function", mode="before")
    @classmethod
    def _alias(cls, value: Any) -> Any:
        if isinstance(value, str):
            key = re.sub(r"[\s_\-]", "", value.strip().lower())
            key = key.removesuffix("loss") if key != "loss" else key
            return _LOSS_ALIASES.get(key, value)
        return value

    @property
    def dp(self) -> DPConfig | None:
        """The DP settings when DP is on, else None (absent block or ``enabled: false``)."""
        dp = self.optimizer.differential_privacy
        return dp if dp is not None and dp.enabled else None


# --------------------------------------------------------------------------- dataset


def _first_selected(selected: list[dict[str, Any]]) -> Mapping[str, Any]:
    first = selected[0] if selected else {}
    return first if isinstance(first, Mapping) else {}


def _target_info(selected: list[dict[str, Any]]) -> Mapping[str, Any]:
    info = _first_selected(selected).get("target_info")
    return info if isinstance(info, Mapping) else {}


class DatasetSpec(_Block):
    """Which dataset sites train on and how its columns become model inputs.

    ``name``, ``target``, ``task`` and ``num_classes`` default to what a MediNet
    export's ``selected_datasets[0]`` says. ``categorical`` lists each categorical
    column's categories; the site one-hot encodes them in this order, matching values
    as strings (``str(value)``: booleans read ``"True"``/``"False"``). ``positive_if``
    (binary tasks) turns a numeric target into 0/1, e.g. ``">0"``.

    Numeric columns are standardised at each site on its own training rows unless
    ``scaling`` gives the column a fixed ``[center, scale]``: one public scale for every
    hospital, so the shared layers read a value the same way everywhere (a site-fitted
    scale moves with each hospital's case mix). ``missing_values`` names the codes a
    column uses for "not measured" (the UCI heart files record a missing cholesterol as
    0); they are imputed like empty cells: with the column's fixed centre where it has
    one, else with the site's training median.
    """

    name: Str | None = None
    target: Str | None = None
    task: Task | None = None
    num_classes: Int | None = Field(None, ge=2)
    features: list[Str] | None = Field(None, min_length=1)
    categorical: dict[str, list[Str]] = Field(default_factory=dict)
    missing_values: dict[str, list[Float]] = Field(default_factory=dict)
    scaling: dict[str, tuple[Float, Float]] = Field(default_factory=dict)
    # Public [lo, hi] per numeric column, for the cohort table's DP histogram, mean and SD
    # (protocol/cohort.py): a value outside is clipped. Left out of the wire form when empty,
    # so experiments without it keep their hash.
    bounds: dict[str, tuple[Float, Float]] = Field(default_factory=dict)
    exclude: list[Str] = Field(default_factory=list)
    validation_fraction: Float = Field(0.2, gt=0, lt=1)
    kind: Literal["tabular", "signal"] = "tabular"
    positive_if: Str | None = None
    selected_datasets: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("positive_if")
    @classmethod
    def _rule(cls, value: str | None) -> str | None:
        if value is not None and not _POSITIVE_IF.match(value):
            raise ValueError(f'must be a comparison with a number such as ">0" or ">= 2", got {value!r}')
        return value.replace(" ", "") if value is not None else None

    @model_validator(mode="after")
    def _from_selected(self) -> DatasetSpec:
        selected = _first_selected(self.selected_datasets)
        info = _target_info(self.selected_datasets)
        if self.name is None and isinstance(selected.get("dataset_name"), str):
            self.name = selected["dataset_name"].strip()
        if self.name is not None:
            self.name = self.name.strip()
        if not self.name:
            raise ConfigError(
                "dataset.name",
                "is required: name the dataset sites offer (or give dataset.selected_datasets[0].dataset_name)",
            )
        if self.target is None and isinstance(info.get("name"), str):
            self.target = info["name"]
        if self.task is None:
            subtype = str(info.get("task_subtype", "")).lower()
            kind = str(info.get("type", "")).lower()
            if "binary" in subtype:
                self.task = "binary"
            elif "multi" in subtype:
                self.task = "multiclass"
            elif "regression" in (subtype, kind):
                self.task = "regression"
        if self.num_classes is None:
            n = info.get("num_classes")
            if isinstance(n, int) and not isinstance(n, bool) and n >= 2:
                self.num_classes = n
        for column, categories in self.categorical.items():
            where = f"dataset.categorical.{column}"
            if not categories:
                raise ConfigError(where, "must list at least one category")
            if len(set(categories)) != len(categories):
                raise ConfigError(where, "lists a category twice")
        for column, codes in self.missing_values.items():
            if not codes:
                raise ConfigError(f"dataset.missing_values.{column}", "must list at least one code")
        for column, (lo, hi) in self.bounds.items():
            if not lo < hi:
                raise ConfigError(f"dataset.bounds.{column}", f"is a [low, high] pair with low < high, got [{lo}, {hi}]")
            if column in self.categorical:
                raise ConfigError(f"dataset.bounds.{column}", "is a categorical column; only numeric columns take bounds")
        for column, (_, scale) in self.scaling.items():
            if not scale > 0:
                raise ConfigError(f"dataset.scaling.{column}",
                                  f"is a (center, scale) pair and its scale must be > 0, got {scale}")
        return self

    @model_serializer(mode="wrap")
    def _drop_empty_bounds(self, handler: Any) -> Any:
        out = handler(self)
        if isinstance(out, dict) and not self.bounds:
            out.pop("bounds", None)
        return out

    @property
    def positive_rule(self) -> tuple[str, float] | None:
        """``positive_if`` parsed: ``(">", 0.0)``, or None."""
        if self.positive_if is None:
            return None
        match = _POSITIVE_IF.match(self.positive_if)
        assert match is not None  # checked by the validator
        return match.group(1), float(match.group(2))

    def input_width(self) -> int | None:
        """Model input width of a tabular dataset with declared features, else None."""
        if self.kind != "tabular" or self.features is None:
            return None
        return sum(len(self.categorical.get(f, ())) or 1 for f in self.features)


# --------------------------------------------------------------------------- federated


class CentralDP(_Block):
    clip_norm: Float = Field(gt=0)
    noise_multiplier: Float = Field(ge=0)
    delta: Float = Field(1e-5, gt=0, lt=1)  # the δ the run's central ε is reported at


MAX_WEIGHT_CAP = 2**30


class SecureAggregation(_Block):
    """``federated.secure_aggregation``: the coordinator sees only sums (protocol/secagg/).

    ``min_contributors`` (K): the fewest updates a site will unmask as one sum; ``threshold``
    (U): aggregated shares needed to unmask, so up to N - U sites may drop after uploading;
    ``privacy`` (T): sites that together learn nothing of one mask; ``clip`` (C) and ``scale``
    the fixed-point quantisation; ``max_sites`` the most sites a sum may hold (the bit budget:
    max_sites x round(C x scale) must stay below 2**30)."""

    min_contributors: Int = Field(ge=2)
    threshold: Int = Field(ge=1)
    privacy: Int = Field(1, ge=0)
    clip: Float = Field(1.0, gt=0)
    scale: Float = Field(65536.0, ge=1)
    max_sites: Int = Field(64, ge=1, le=10_000)
    # W: public FedAvg weight cap; a site weighs min(rows, W) / W, masked inside its vector.
    weight_cap: Int = Field(1000, ge=1, le=MAX_WEIGHT_CAP)
    # Distributed DP (issue 22 item 4): "pooled" = each site takes one DP-SGD step a round and adds
    # Sk(mu/m, mu/m), the sum carries the pooled noise once (protocol/secagg/skellam.py). The pooled
    # noise is ``noise_multiplier`` x Delta2 (2 mu = (sigma Delta2)^2) or the least that keeps the
    # run's ``rounds`` steps within ``target_epsilon`` at ``delta``; ``sample_rate`` each site's
    # Poisson rate, ``max_batch`` the most rows a site's batch sum holds (the bit budget).
    # "central" = user-level DP-FedAvg under secure aggregation: each sampled site trains as usual,
    # clips its whole update to ``clip``, rounds it at ``scale`` and adds Sk(mu/m, mu/m); the unit of
    # privacy is a site's dataset, sites are sampled at fraction_fit (site_worker/central_dp.py).
    dp: Str = "off"
    noise_multiplier: Float | None = Field(None, gt=0, le=1e6)
    target_epsilon: Float | None = Field(None, gt=0, le=1e4)
    delta: Float = Field(1e-5, gt=0, lt=1)
    sample_rate: Float = Field(1.0, gt=0, le=1)
    max_batch: Int = Field(4096, ge=1, le=2**20)


class EarlyStopping(_Block):
    patience: Int = Field(ge=1)
    min_delta: Float = Field(0.0, ge=0)


_FED_DEFAULTS: dict[str, float | int] = {
    "fraction_fit": 1.0,
    "fraction_eval": 1.0,
    "min_fit_clients": 1,
    "min_eval_clients": 1,
    "min_available_clients": 1,
}


# Other keys of ``federated.parameters`` fedbus reads itself (an aggregator's own keys,
# e.g. FedAsync's ``alpha``, are checked by the aggregator; Flower strategies by signature).
_FED_KEYS = ("round_timeout_s", "max_round_retries", "central_dp", "early_stopping", "norm_bound", "test_every")


class FederatedSpec(_Block):
    """The aggregator by name and its parameters (the five sampling ones always set)."""

    name: Str = "FedAvg"
    parameters: dict[str, Any] = Field(default_factory=dict)
    round_timeout_s: Float = Field(120.0, gt=0)
    max_round_retries: Int = Field(2, ge=0)
    central_dp: CentralDP | None = None
    early_stopping: EarlyStopping | None = None
    secure_aggregation: SecureAggregation | None = None
    # Evaluate the global model on every site's fixed test split every N rounds (0: only the
    # final evaluation). Off by default: each is a release charged to the site's ledger (under
    # metrics = "dp") and counted against its max_evaluations_per_run, and choosing a round by
    # its test score makes the final test figure optimistic.
    test_every: Int = Field(0, ge=0)

    @field_validator("name")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError('must name an aggregator such as "FedAvg", "FedAsync", "FedBuff" or "flower:FedAdam"')
        return value.strip()

    @model_validator(mode="after")
    def _sampling(self) -> FederatedSpec:
        params = dict(self.parameters)
        for flower, ours in _FLOWER_PARAM_ALIASES.items():
            if flower in params:
                value = params.pop(flower)
                params.setdefault(ours, value)
        sampling = [*_FED_DEFAULTS, *_FED_KEYS]
        for key in params:
            close = difflib.get_close_matches(key, sampling, n=1, cutoff=0.8)
            if key not in sampling and close:
                raise ConfigError(f"federated.parameters.{key}", f'unknown key; did you mean "{close[0]}"?')
        for key, default in _FED_DEFAULTS.items():
            value = params.get(key, default)
            where = f"federated.parameters.{key}"
            if key.startswith("fraction_"):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                    raise ConfigError(where, f"must be a number in [0, 1], got {value!r}")
                params[key] = float(value)
            else:
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ConfigError(where, f"must be an integer >= 0, got {value!r}")
                params[key] = value
        if params["min_fit_clients"] < 1:
            raise ConfigError("federated.parameters.min_fit_clients", "must be >= 1")
        if params["min_available_clients"] < params["min_fit_clients"]:
            raise ConfigError(
                "federated.parameters.min_available_clients",
                f"must be >= min_fit_clients ({params['min_fit_clients']})",
            )
        self.parameters = params
        if self.secure_aggregation is not None:
            from protocol.secagg.rules import check_aggregator

            sa = self.secure_aggregation
            check_aggregator(self.name, params, central_dp=self.central_dp is not None,
                             min_contributors=sa.min_contributors, threshold=sa.threshold, privacy=sa.privacy,
                             clip=sa.clip, scale=sa.scale, max_sites=sa.max_sites)
        return self

    @property
    def fraction_fit(self) -> float:
        return self.parameters["fraction_fit"]

    @property
    def fraction_eval(self) -> float:
        return self.parameters["fraction_eval"]

    @property
    def min_fit_clients(self) -> int:
        return self.parameters["min_fit_clients"]

    @property
    def min_eval_clients(self) -> int:
        return self.parameters["min_eval_clients"]

    @property
    def min_available_clients(self) -> int:
        return self.parameters["min_available_clients"]


# --------------------------------------------------------------------------- experiment


def _fmt(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


class Experiment(_Block):
    """A validated experiment. Build it with ``load_experiment``."""

    basic_info: BasicInfo = Field(default_factory=BasicInfo)
    architecture: Architecture
    training: TrainingSpec
    dataset: DatasetSpec
    federated: FederatedSpec = Field(default_factory=FederatedSpec)

    medinet_fields: ClassVar[frozenset[str]] = frozenset({"metadata", "job_config"})

    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)
    _chain: ResolvedChain | None = PrivateAttr(default=None)
    _not_used: list[str] = PrivateAttr(default_factory=list)

    @property
    def not_used(self) -> list[str]:
        """JSON paths of the MediNet fields this document carries that fedbus ignores."""
        return list(self._not_used)

    @property
    def name(self) -> str:
        return self.basic_info.name

    @property
    def raw(self) -> dict[str, Any]:
        """The document exactly as given (for export "as run")."""
        return self._raw

    @property
    def chain(self) -> ResolvedChain:
        """The checked layer chain: constructor arguments and per-layer shapes."""
        assert self._chain is not None
        return self._chain

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.chain.input_shape

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.chain.output_shape

    @model_validator(mode="after")
    def _consistent(self) -> Experiment:
        chain = resolve_layers(self.architecture.layers)
        if self.training.dp is not None:  # no site trains or evaluates it under DP (site_worker.policy)
            for layer in chain.row_mixing:
                raise ConfigError(f"architecture.layers[{layer.index}].type", row_mixing_message(layer))
        self._chain = chain
        data, training = self.dataset, self.training
        loss = training.loss_function
        if data.task is None:
            data.task = {"bce_with_logits": "binary", "cross_entropy": "multiclass", "mse": "regression"}[loss]
        out = chain.output_shape
        if data.num_classes is None:
            data.num_classes = out[0] if loss == "cross_entropy" and len(out) == 1 and out[0] >= 2 else 2
        last = f"architecture.layers[{len(chain.layers) - 1}]"
        allowed_tasks = {
            "bce_with_logits": ("binary",),
            "cross_entropy": ("binary", "multiclass"),
            "mse": ("regression",),
        }[loss]
        if data.task not in allowed_tasks:
            raise ConfigError(
                "training.loss_function",
                f'{loss} does not fit dataset.task "{data.task}"; use '
                + {"binary": "bce_with_logits", "multiclass": "cross_entropy", "regression": "mse"}[data.task],
            )
        want = (data.num_classes,) if loss == "cross_entropy" else (1,)
        if out != want:
            why = f"one logit per class (dataset.num_classes = {data.num_classes})" if loss == "cross_entropy" else "one output"
            raise ConfigError(last, f"the model's output is {_fmt(out)} but {loss} needs {_fmt(want)}: {why}")
        if data.positive_if is not None and data.task != "binary":
            raise ConfigError("dataset.positive_if", 'only applies to dataset.task "binary"')
        self._check_columns(chain)
        sa = self.federated.secure_aggregation
        if sa is not None and sa.dp != "off":
            from protocol.secagg.rules import check_pooled

            check_pooled(self)
        return self

    def _check_columns(self, chain: ResolvedChain) -> None:
        data = self.dataset
        in_shape = chain.input_shape
        first = chain.layers[0]
        where = f"architecture.layers[0].params.{'features' if first.type == 'input' else 'in_features'}"
        if data.kind == "signal":
            if len(in_shape) != 2:
                raise ConfigError(
                    "architecture.layers[0].params",
                    'a signal dataset needs an input marker with "channels" and "length"',
                )
            for key in ("missing_values", "scaling"):
                if getattr(data, key):
                    raise ConfigError(f"dataset.{key}", "applies to tabular columns only; remove it for a signal dataset")
            return
        if len(in_shape) != 1:
            raise ConfigError(
                "architecture.layers[0].params",
                'a tabular dataset needs an input marker with "features"; '
                'set dataset.kind to "signal" for [channels, length] inputs',
            )
        excluded = set(data.exclude)
        for column in data.categorical:
            if column in excluded:
                raise ConfigError(f"dataset.categorical.{column}", "is also in dataset.exclude")
            if data.features is not None and column not in data.features:
                raise ConfigError(f"dataset.categorical.{column}", "is not in dataset.features")
        if data.features is not None:
            if len(set(data.features)) != len(data.features):
                raise ConfigError("dataset.features", "lists a column twice")
            for i, column in enumerate(data.features):
                if column == data.target:
                    raise ConfigError(f"dataset.features[{i}]", f"is the target column {column!r}")
                if column in excluded:
                    raise ConfigError(f"dataset.features[{i}]", f"{column!r} is also in dataset.exclude")
        for key, columns in (("missing_values", data.missing_values), ("scaling", data.scaling)):
            for column in columns:
                where_col = f"dataset.{key}.{column}"
                if column in data.categorical:
                    raise ConfigError(where_col, "is a categorical column; only numeric columns take it")
                if column in excluded or column == data.target:
                    raise ConfigError(where_col, "is not a feature (excluded, or the target)")
                if data.features is not None and column not in data.features:
                    raise ConfigError(where_col, "is not in dataset.features")
        if data.features is None:
            return
        width = data.input_width()
        if width != in_shape[0]:
            n_cat = sum(len(data.categorical[f]) for f in data.features if f in data.categorical)
            n_num = len(data.features) - sum(1 for f in data.features if f in data.categorical)
            raise ConfigError(
                where,
                f"must equal the one-hot width of dataset.features ({width}: {n_num} numeric columns "
                f"+ {n_cat} categories), got {in_shape[0]}",
            )

    # ------------------------------------------------------------------ wire

    def to_wire(self) -> dict[str, Any]:
        """A plain JSON-able dict (raw + normalized defaults) that loads back equal."""
        return self.model_dump(mode="json")

    def with_overrides(
        self,
        *,
        rounds: int | None = None,
        epochs: int | None = None,
        batch_size: int | None = None,
        learning_rate: float | None = None,
        seed: int | None = None,
        aggregator: str | None = None,
        dataset: str | None = None,
    ) -> Experiment:
        """A re-validated copy with the given settings replaced (None keeps the value)."""
        return load_experiment(apply_overrides(self.to_wire(), {
            "rounds": rounds, "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
            "seed": seed, "aggregator": aggregator, "dataset": dataset}))


# --------------------------------------------------------------------------- overrides

# Where each override lives in an experiment document: the one table of them (issue 21).
OVERRIDES: dict[str, tuple[str, ...]] = {
    "rounds": ("training", "rounds"),
    "epochs": ("training", "epochs"),
    "batch_size": ("training", "batch_size"),
    "seed": ("training", "seed"),
    "learning_rate": ("training", "optimizer", "learning_rate"),
    "weight_decay": ("training", "optimizer", "weight_decay"),
    "aggregator": ("federated", "name"),
    "dataset": ("dataset", "name"),
}


def apply_overrides(doc: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Write each set override (``None`` keeps the document's value) at its place in the
    experiment document ``doc``, in place, and return ``doc``. The one function every override
    goes through: ``Experiment.with_overrides``, the simulator's ``--rounds``/``--seed``, a
    task's ``TaskConfig`` (``TrainSpec.from_experiment``) and the fine-tune's epochs and rate.
    A missing block on the way is created; one that is not a table is left as it is, for
    validation to name. An unknown override name is a programming error (``KeyError``)."""
    for name, value in overrides.items():
        path = OVERRIDES[name]
        if value is None:
            continue
        node: Any = doc
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                break
        else:
            node[path[-1]] = value
    return doc


# --------------------------------------------------------------------------- loading


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _message(err: Mapping[str, Any]) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    got = f", got {value!r}" if not isinstance(value, (dict, list)) else ""
    if kind == "missing":
        return "is required"
    if kind == "greater_than_equal":
        return f"must be >= {ctx['ge']}{got}"
    if kind == "greater_than":
        return f"must be > {ctx['gt']}{got}"
    if kind == "less_than_equal":
        return f"must be <= {ctx['le']}{got}"
    if kind == "less_than":
        return f"must be < {ctx['lt']}{got}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be an integer{got}"
    if kind == "finite_number":
        return f"must be a finite number{got}"
    if kind in ("float_type", "float_parsing"):
        return f"must be a number{got}"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false{got}"
    if kind == "string_type":
        return f"must be a string{got}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}{got}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"must be an object{got}"
    if kind == "list_type":
        return f"must be a list{got}"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} item(s)"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} items"
    if kind == "value_error":
        return str(err["msg"]).removeprefix("Value error, ")
    return str(err["msg"])


def _config_error(exc: ValidationError) -> ConfigError:
    found: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        inner = (err.get("ctx") or {}).get("error")
        if isinstance(inner, ConfigError):
            found.extend(inner.errors)
        else:
            found.append((_path(err["loc"]), _message(err)))
    path, message = found[0]
    if len(found) > 1:
        message += f" (and {len(found) - 1} more problem{'s' if len(found) > 2 else ''})"
    return ConfigError(path, message, errors=found)


def _read(source: str | Path) -> dict[str, Any]:
    file = Path(source)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("", f"experiment file {file} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"cannot read experiment file {file}: {exc}") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ConfigError("", f"{file} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:
        raise ConfigError("", f"{file} is not valid JSON: {exc}") from None
    return data


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


# ``dataset.selected_datasets[i]`` is MediNet's own record of the dataset: fedbus reads these
# keys and reports every other one as not used.
_SELECTED_USED = frozenset({"dataset_name", "target_info", "features_info"})


def _did_you_mean(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if close:
        return f'unknown key; did you mean "{close[0]}"?'
    return f"unknown key; this block takes {', '.join(sorted(candidates))}"


def _blocks(annotation: Any) -> tuple[type[_Block] | None, bool]:
    """(the _Block class a field holds, whether it is a list of them), else (None, False)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _blocks(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _blocks(arg)
            if found[0] is not None:
                return found
        return None, False
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        cls, _ = _blocks(item)
        return cls, cls is not None
    if isinstance(annotation, type) and issubclass(annotation, _Block):
        return annotation, False
    return None, False


def check_keys(cls: type[_Block], data: Any, path: str = "") -> tuple[list[tuple[str, str]], list[str]]:
    """Walk ``data`` against the schema: (unknown keys as (path, message), MediNet paths not used)."""
    errors: list[tuple[str, str]] = []
    unused: list[str] = []
    if not isinstance(data, Mapping):
        return errors, unused  # the type error is pydantic's to report
    fields = cls.model_fields
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key in cls.medinet_fields:
            unused.append(where)
            continue
        if key not in fields:
            errors.append((where, _did_you_mean(str(key), [*fields, *cls.medinet_fields])))
            continue
        if cls is DatasetSpec and key == "selected_datasets" and isinstance(value, list):
            for i, entry in enumerate(value):
                if isinstance(entry, Mapping):
                    unused.extend(f"{where}[{i}].{k}" for k in entry if k not in _SELECTED_USED)
            continue
        sub, many = _blocks(fields[key].annotation)
        if sub is None:
            continue
        items = enumerate(value) if many and isinstance(value, list) else [(None, value)] if not many else []
        for i, item in items:
            e, u = check_keys(sub, item, where if i is None else f"{where}[{i}]")
            errors.extend(e)
            unused.extend(u)
    return errors, unused


def load_experiment(source: str | Path | Mapping[str, Any]) -> Experiment:
    """Validate an experiment from a file path or an already parsed dict.

    Raises ``ConfigError`` (a ``ValueError``) naming the JSON path of the first
    problem; ``e.errors`` lists all of them.
    """
    data = copy.deepcopy(dict(source)) if isinstance(source, Mapping) else _read(source)
    if not isinstance(data, dict):
        raise ConfigError("", f"an experiment must be a JSON object, got {type(data).__name__}")
    unknown, not_used = check_keys(Experiment, data)
    if unknown:
        path, message = unknown[0]
        more = f" (and {len(unknown) - 1} more unknown key{'s' if len(unknown) > 2 else ''})" if len(unknown) > 1 else ""
        raise ConfigError(path, message + more, errors=unknown)
    try:
        experiment = Experiment.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc) from None
    experiment._raw = copy.deepcopy(data)
    experiment._not_used = not_used
    return experiment

