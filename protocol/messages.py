"""Message types of the fedbus wire protocol (docs/design.md "Wire protocol").

Every message is a frozen dataclass. The envelope carries routing and replay
metadata; the payload is one of the message classes below. Weights travel as an
ordered tuple of ``(name, ndarray)`` pairs (``Tensors``); the codec turns them into
``{name, dtype, shape, data}`` maps with raw little-endian buffers and decodes them
zero-copy with ``np.frombuffer``.

The field lists here are the contract between coordinator, site worker and
simulator. ``protocol/codec.py`` owns the byte encoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

SCHEMA_VERSION = 1

# An ordered list of named arrays: the state_dict of a model, in module order.
Tensors = tuple[tuple[str, np.ndarray], ...]

# model_unavailable: the task's model (by hash) never reached the site or was retired (protocol/model_blob.py)
# secure_aggregation: a roster, share or unmask request the site refused (site_worker/secagg.py names the rule)
DeclineReason = Literal["budget", "policy", "data", "error", "untrusted_task", "model_unavailable",
                        "secure_aggregation"]
ControlAction = Literal["stop", "abort"]


@dataclass(frozen=True)
class DatasetInfo:
    """What a site says about one dataset it offers: metadata only, never values."""

    name: str
    rows: int
    columns: tuple[str, ...]
    feature_types: dict[str, str]  # column -> "numeric" | "categorical" | "signal"
    target: str
    # The site's privacy ledger for this dataset when it says hello (site_worker.announce):
    # ε spent over every release so far, at ``delta`` with ``accountant``, against ``max_epsilon``.
    epsilon_spent: float | None = None
    max_epsilon: float | None = None
    delta: float | None = None
    accountant: str | None = None


@dataclass(frozen=True)
class SiteHello:
    TYPE: ClassVar[str] = "SiteHello"
    site_id: str
    software_version: str
    datasets: tuple[DatasetInfo, ...]
    # Policy summary the site enforces itself (max_epsilon, allowed aggregators, ...).
    policy: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Heartbeat:
    """Site -> coordinator, on the control exchange every ``every_s`` seconds (site.toml
    ``alive_every_s``, 1-10): the site's daemon is alive. Signed like every message; it carries
    no data about patients. The coordinator keeps ``min(received, sent_at)`` of the newest one
    (``coordinator/liveness.py``) and the dashboard calls a site offline after three missed
    beats, so within 30 s of a kill."""

    TYPE: ClassVar[str] = "Heartbeat"
    site_id: str
    seq: int
    every_s: float


@dataclass(frozen=True)
class TaskConfig:
    """What the run's aggregator asks of a site's trainer, per task (issue 21): typed fields,
    so a site reads ``proximal_mu`` or ``personal_layers`` and never branches on an
    aggregator's name. ``None`` overrides keep the experiment's own value. Each field has
    explicit bounds; a value outside them is refused when the task is built or decoded."""

    proximal_mu: float = 0.0  # FedProx's pull towards the round's global model; 0 = none
    personal_layers: int = 0  # FedPer: the last layers each site keeps to itself; 0 = none
    epochs: int | None = None  # per-task overrides of the experiment (the site's policy still bounds them)
    learning_rate: float | None = None
    batch_size: int | None = None
    weight_decay: float | None = None

    # field -> (type, low, high), both ends inclusive; floats must also be finite.
    BOUNDS: ClassVar[dict[str, tuple[type, float, float]]] = {
        "proximal_mu": (float, 0.0, 1e4),
        "personal_layers": (int, 0, 256),
        "epochs": (int, 1, 100_000),
        "learning_rate": (float, 1e-12, 1e3),
        "batch_size": (int, 1, 10_000_000),
        "weight_decay": (float, 0.0, 1e3),
    }

    def __post_init__(self) -> None:
        for name, (kind, lo, hi) in self.BOUNDS.items():
            v = getattr(self, name)
            if v is None and name not in ("proximal_mu", "personal_layers"):
                continue
            ok_type = (type(v) is int) if kind is int else (type(v) in (int, float))
            if not ok_type or not (math.isfinite(v) and lo <= v <= hi):
                raise ValueError(f"task config {name} must be {'an integer' if kind is int else 'a finite number'} "
                                 f"in [{lo:g}, {hi:g}], got {v!r}")
            if kind is float and type(v) is int:
                object.__setattr__(self, name, float(v))

    def overrides(self) -> dict[str, Any]:
        """The per-task overrides that are set (``epochs``, ``learning_rate``, ...)."""
        return {k: v for k in ("epochs", "learning_rate", "batch_size", "weight_decay")
                if (v := getattr(self, k)) is not None}


@dataclass(frozen=True)
class TrainTask:
    TYPE: ClassVar[str] = "TrainTask"
    # The experiment JSON as the coordinator runs it (architecture, training, dataset,
    # federated blocks). Declarative only: the site builds the model from the layer list.
    experiment: dict[str, Any]
    weights: Tensors
    dataset: str  # name of the site's dataset to train on
    base_round: int  # global model version these weights are (staleness for async)
    seed: int
    deadline: float  # unix seconds; a site may skip a task whose deadline has passed
    config: TaskConfig = field(default_factory=TaskConfig)  # set by the aggregator (proximal_mu, ...)
    # The model by reference (protocol/model_blob.py): when ``model_sha256`` is set, ``weights``
    # is empty and the site fetches the blob's chunks by hash and verifies them before use.
    model_sha256: str | None = None
    model_size: int = 0
    model_chunks: tuple[str, ...] = ()


@dataclass(frozen=True)
class EvalTask:
    TYPE: ClassVar[str] = "EvalTask"
    experiment: dict[str, Any]
    weights: Tensors
    dataset: str
    base_round: int
    seed: int
    deadline: float
    split: str = "validation"  # "validation" | "test"
    config: TaskConfig = field(default_factory=TaskConfig)
    # The model by reference (protocol/model_blob.py): when ``model_sha256`` is set, ``weights``
    # is empty and the site fetches the blob's chunks by hash and verifies them before use.
    model_sha256: str | None = None
    model_size: int = 0
    model_chunks: tuple[str, ...] = ()
    # Under secure aggregation, the run's final test (protocol/secagg/union.py): > 0 asks a site
    # whose metrics policy is dp to add its masked union vector, tagged at least this, to its answer.
    union_tag: int = 0


@dataclass(frozen=True)
class PersonalizeTask:
    """After the last round: the final global model, for the site to evaluate on its fixed test
    split, fine-tune on its own training rows (``training.personalization``, FedPer's head) under
    its own DP budget, keep both, and report both (an ``EvalResult``: the global model's metrics,
    and the personalised model's under ``personalized_*``)."""

    TYPE: ClassVar[str] = "PersonalizeTask"
    experiment: dict[str, Any]
    weights: Tensors
    dataset: str
    base_round: int  # the last committed round: the version these final weights are
    seed: int
    deadline: float
    config: TaskConfig = field(default_factory=TaskConfig)
    # The model by reference (protocol/model_blob.py): when ``model_sha256`` is set, ``weights``
    # is empty and the site fetches the blob's chunks by hash and verifies them before use.
    model_sha256: str | None = None
    model_size: int = 0
    model_chunks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Update:
    TYPE: ClassVar[str] = "Update"
    task_id: str  # message_id of the TrainTask this answers
    weights: Tensors
    num_examples: int
    metrics: dict[str, float]  # before_* / after_* validation metrics, train_s, samples_per_s
    epsilon: float | None  # cumulative epsilon spent on this dataset; None = DP off (infinite)
    delta: float | None
    base_round: int
    reproducible: bool = False  # the site's DP noise came from its reproducible_dp seed, not the OS


@dataclass(frozen=True)
class EvalResult:
    TYPE: ClassVar[str] = "EvalResult"
    task_id: str
    num_examples: int
    metrics: dict[str, float]
    base_round: int
    # The union vector of a secure run's final test (protocol/secagg/union.py): its tag in the unmask
    # request, the masked field vector (one uint32 array of the roster's length) and one sealed
    # uint8 share per other roster site, as in a MaskedUpdate; empty otherwise.
    union_tag: int = 0
    union_masked: Tensors = ()
    union_shares: Tensors = ()


@dataclass(frozen=True)
class Declined:
    TYPE: ClassVar[str] = "Declined"
    task_id: str
    reason: DeclineReason
    detail: str
    figures: dict[str, float] = field(default_factory=dict)  # e.g. epsilon_spent, epsilon_next, max_epsilon


@dataclass(frozen=True)
class RunControl:
    TYPE: ClassVar[str] = "RunControl"
    action: ControlAction
    reason: str = ""


@dataclass(frozen=True)
class StatsTask:
    """Coordinator -> site: a "Table 1" of ``dataset`` (issue 25). The layout follows from the
    experiment's public ``dataset`` block and ``bins`` alone (``protocol.cohort``); the site
    answers one ``StatsResult`` released as its ``stats`` policy says, or a ``Declined``."""

    TYPE: ClassVar[str] = "StatsTask"
    experiment: dict[str, Any]
    dataset: str
    bins: int
    deadline: float


@dataclass(frozen=True)
class StatsResult:
    """Site -> coordinator: the cohort vector (``protocol.cohort`` layout ``layout``), with the
    per-coordinate noise SD (0 under ``exact``) and the ledger's ε at ``delta`` with ``accountant``
    after this release (None under ``exact``). ``n`` is the row count the site's hello announced."""

    TYPE: ClassVar[str] = "StatsResult"
    task_id: str
    values: tuple[float, ...]
    n: int
    noise_sd: float
    mode: str  # "dp" | "exact"
    layout: str
    epsilon: float | None
    delta: float | None
    accountant: str | None



# ---------------------------------------------------------------- secure aggregation (issue 22)
# docs/secure-aggregation.md "Protocol, message by message". Everything a site sends here is
# masked, sealed for another site, or a sum over at least min_contributors sites.


@dataclass(frozen=True)
class SecAggJoin:
    """Coordinator -> site: send this run's X25519 key, signed by your identity (``SecAggKey``)."""

    TYPE: ClassVar[str] = "SecAggJoin"
    deadline: float


@dataclass(frozen=True)
class SecAggKey:
    """Site -> coordinator: the site's X25519 public key for the run (``protocol.secagg.keys.KeyBinding``)."""

    TYPE: ClassVar[str] = "SecAggKey"
    task_id: str
    public: bytes  # 32 raw bytes
    kid: str  # the site's Ed25519 key id
    sig: bytes  # over KeyBinding.signed_bytes()


@dataclass(frozen=True)
class SecAggRoster:
    """Coordinator -> site: ``Roster.body()`` and the coordinator's signature over exactly those bytes."""

    TYPE: ClassVar[str] = "SecAggRoster"
    body: bytes
    kid: str
    sig: bytes


@dataclass(frozen=True)
class MaskedUpdate:
    """Site -> coordinator, in place of an ``Update`` under secure aggregation: the masked field
    vector ``[w*delta..., w]`` (one little-endian uint32 array) and the mask's shares, each sealed
    (AES-GCM) for the roster site it is named after; the coordinator relays them unopened."""

    TYPE: ClassVar[str] = "MaskedUpdate"
    task_id: str
    tag: int  # the update's tag in unmask requests (the round)
    masked: Tensors  # (("masked", uint32[length]),)
    shares: Tensors  # ((recipient site, uint8 sealed share), ...)
    epsilon: float | None
    delta: float | None
    base_round: int


@dataclass(frozen=True)
class SecAggShare:
    """Coordinator -> site: one sealed share relayed from ``sender`` (the coordinator cannot open it)."""

    TYPE: ClassVar[str] = "SecAggShare"
    sender: str
    tag: int
    sealed: Tensors  # ((sender, uint8 sealed share),)


@dataclass(frozen=True)
class SecAggUnmask:
    """Coordinator -> site: ``UnmaskRequest.body()`` (the exact contributor set) and its signature."""

    TYPE: ClassVar[str] = "SecAggUnmask"
    body: bytes
    kid: str
    sig: bytes
    deadline: float


@dataclass(frozen=True)
class SecAggAnswer:
    """Site -> coordinator: the sum of the site's shares of exactly the request's contributors."""

    TYPE: ClassVar[str] = "SecAggAnswer"
    task_id: str
    request_id: str
    share: Tensors  # (("share", uint32[piece]),)

Payload = (SiteHello | TrainTask | EvalTask | PersonalizeTask | Update | EvalResult | Declined | RunControl
           | StatsTask | StatsResult | SecAggJoin | SecAggKey | SecAggRoster | MaskedUpdate | SecAggShare
           | SecAggUnmask | SecAggAnswer | Heartbeat)

MESSAGE_TYPES: dict[str, type] = {
    cls.TYPE: cls
    for cls in (SiteHello, Heartbeat, TrainTask, EvalTask, PersonalizeTask, Update, EvalResult, Declined, RunControl,
                StatsTask, StatsResult, SecAggJoin, SecAggKey, SecAggRoster, MaskedUpdate, SecAggShare, SecAggUnmask,
                SecAggAnswer)
}


@dataclass(frozen=True)
class Envelope:
    """Routing and replay metadata around one payload; signed as a whole."""

    type: str
    schema_version: int
    message_id: str  # exactly uuid4().hex (32 lowercase hex digits); the codec refuses anything else
    federation: str
    run_id: str
    round: int
    sender: str
    recipient: str
    sent_at: float  # unix seconds
    payload: Payload
