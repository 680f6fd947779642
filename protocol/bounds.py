"""One declarative bound per wire field: type, range and length, stated once, checked at decode.

``protocol/codec.py`` checks each field's *type* from the message dataclass's hints and
the whole frame's size from ``Limits``; this module states what *values* each field may
hold. ``FIELDS`` maps every message type of ``protocol.messages.MESSAGE_TYPES`` (plus the
envelope, ``DatasetInfo`` and the chunk header) to a ``Bound`` per field; the codec calls
``check`` on each decoded field before any handler sees the message, so a NaN, an
infinity, a negative or absurd count, an over-long string, list or map, or a value of
the wrong type inside a free-form map is refused as ``OutOfBounds`` (reason
``out_of_bounds``) and dead-lettered like any malformed frame. Importing this module
fails when a message type or field has no bound, so a new type cannot slip past.

The bounds are wire sanity, not policy: they are loose enough for every honest message
(a DP-noised count can be negative or fractional) and tight enough that no value can
overflow arithmetic downstream. What only the coordinator knows (rows a site announced)
bounds counts further in ``coordinator/inbox.py``.

Over 500 lines on purpose: the bound kinds and the one table of every wire field belong
together, so a reviewer reads each message's limits in one place.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, get_args

from protocol.errors import OutOfBounds
from protocol.messages import ControlAction, DeclineReason, TaskConfig

__all__ = ["Bound", "FIELDS", "CHUNK_HEADER", "COUNT_METRICS", "check", "check_record", "check_message",
           "MAX_COUNT", "MAX_ROWS"]

MAX_COUNT = 2**53  # counts a float carries exactly; rows, examples, n_val, ...
MAX_ROWS = 2**40  # rows one dataset may announce (a trillion)
MAX_ABS = 1e15  # any other number on the wire (metrics, figures): finite and below this
MAX_ROUND = 2**31 - 1
MAX_EPSILON = 1e9  # an ε a ledger can report (a site's own figure; finite)
_INT64 = (-(2**63), 2**63 - 1)


class Bound(abc.ABC):
    """A value's bound; ``check`` raises ``OutOfBounds`` naming ``path``."""

    @abc.abstractmethod
    def check(self, value: Any, path: str) -> None:
        """Raise ``OutOfBounds`` naming ``path`` unless ``value`` is within the bound."""

    @abc.abstractmethod
    def describe(self) -> str:
        """The bound in words, for error messages and docs."""


def _fail(path: str, what: str, value: Any) -> OutOfBounds:
    shown = repr(value)
    return OutOfBounds(f"{path}: {what}, got {shown[:60]}{'...' if len(shown) > 60 else ''}")


def _type_name(value: Any) -> str:
    return "nil" if value is None else type(value).__name__


@dataclass(frozen=True)
class Int(Bound):
    lo: int
    hi: int

    def check(self, value: Any, path: str) -> None:
        if type(value) is not int:
            raise _fail(path, f"expected an int, not {_type_name(value)}", value)
        if not self.lo <= value <= self.hi:
            raise _fail(path, f"must be in [{self.lo}, {self.hi}]", value)

    def describe(self) -> str:
        return f"int in [{self.lo}, {self.hi}]"


@dataclass(frozen=True)
class Num(Bound):
    """A finite number in ``lo..hi``; ``open_lo``/``open_hi`` exclude the ends."""

    lo: float
    hi: float
    open_lo: bool = False
    open_hi: bool = False

    def check(self, value: Any, path: str) -> None:
        if type(value) not in (int, float):
            raise _fail(path, f"expected a number, not {_type_name(value)}", value)
        v = float(value) if abs(value) < 2**1023 else math.inf
        if not math.isfinite(v):
            raise _fail(path, "must be a finite number", value)
        if v < self.lo or v > self.hi or (self.open_lo and v == self.lo) or (self.open_hi and v == self.hi):
            raise _fail(path, f"must be in {self.describe()[7:]}", value)

    def describe(self) -> str:
        return f"number {'(' if self.open_lo else '['}{self.lo:g}, {self.hi:g}{')' if self.open_hi else ']'}"


@dataclass(frozen=True)
class Text(Bound):
    max_len: int
    min_len: int = 0
    pattern: str | None = None
    choices: tuple[str, ...] | None = None

    def check(self, value: Any, path: str) -> None:
        if type(value) is not str:
            raise _fail(path, f"expected a str, not {_type_name(value)}", value)
        if not self.min_len <= len(value) <= self.max_len:
            raise _fail(path, f"length must be in [{self.min_len}, {self.max_len}] characters", value)
        if self.choices is not None and value not in self.choices:
            raise _fail(path, f"must be one of {list(self.choices)}", value)
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise _fail(path, f"must match {self.pattern}", value)

    def describe(self) -> str:
        return f"str of <= {self.max_len} chars" + (f" in {list(self.choices)}" if self.choices else "")


@dataclass(frozen=True)
class Bin(Bound):
    """Raw bytes of ``min_len..max_len`` (keys, signatures, signed statements)."""

    max_len: int
    min_len: int = 0

    def check(self, value: Any, path: str) -> None:
        if type(value) is not bytes:
            raise _fail(path, f"expected bytes, not {_type_name(value)}", value)
        if not self.min_len <= len(value) <= self.max_len:
            raise _fail(path, f"must be {self.min_len}..{self.max_len} bytes", len(value))

    def describe(self) -> str:
        return f"{self.min_len}..{self.max_len} bytes"


@dataclass(frozen=True)
class Flag(Bound):
    def check(self, value: Any, path: str) -> None:
        if type(value) is not bool:
            raise _fail(path, f"expected a bool, not {_type_name(value)}", value)

    def describe(self) -> str:
        return "bool"


@dataclass(frozen=True)
class Opt(Bound):
    """``inner`` or nil."""

    inner: Bound

    def check(self, value: Any, path: str) -> None:
        if value is not None:
            self.inner.check(value, path)

    def describe(self) -> str:
        return f"{self.inner.describe()} or nil"


@dataclass(frozen=True)
class Items(Bound):
    """A list/tuple of at most ``max_items``, each within ``item``."""

    item: Bound
    max_items: int

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, (list, tuple)):
            raise _fail(path, f"expected an array, not {_type_name(value)}", value)
        if len(value) > self.max_items:
            raise _fail(path, f"at most {self.max_items} items", f"{len(value)} items")
        for i, v in enumerate(value):
            self.item.check(v, f"{path}[{i}]")

    def describe(self) -> str:
        return f"<= {self.max_items} x {self.item.describe()}"


@dataclass(frozen=True)
class Table(Bound):
    """A map of at most ``max_items`` str keys of <= ``key_len`` chars; ``named`` keys have
    their own bound, any other key's value is within ``other`` (None: unknown keys refused)."""

    max_items: int
    key_len: int = 64
    named: Mapping[str, Bound] = dataclasses.field(default_factory=dict)
    other: Bound | None = None

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise _fail(path, f"expected a map, not {_type_name(value)}", value)
        if len(value) > self.max_items:
            raise _fail(path, f"at most {self.max_items} entries", f"{len(value)} entries")
        for k, v in value.items():
            if type(k) is not str or not 0 < len(k) <= self.key_len:
                raise _fail(path, f"keys must be str of 1..{self.key_len} chars", k)
            bound = self.named.get(k, self.other)
            if bound is None:
                raise _fail(f"{path}.{k}", "unknown key", k)
            bound.check(v, f"{path}.{k}")

    def describe(self) -> str:
        return f"map of <= {self.max_items} entries"


@dataclass(frozen=True)
class Tree(Bound):
    """A free-form JSON-like value (an experiment, a config): maps with str keys, arrays,
    str, bool, nil and finite numbers only, at most ``max_nodes`` values ``max_depth`` deep."""

    max_nodes: int
    max_depth: int = 16
    max_str: int = 4096

    def check(self, value: Any, path: str) -> None:
        budget = [self.max_nodes]
        self._walk(value, path, 0, budget)

    def _walk(self, value: Any, path: str, depth: int, budget: list[int]) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise _fail(path, f"more than {self.max_nodes} values in all", "...")
        if depth > self.max_depth:
            raise _fail(path, f"nested deeper than {self.max_depth}", "...")
        if value is None or type(value) is bool:
            return
        if type(value) is int:
            if not _INT64[0] <= value <= _INT64[1]:
                raise _fail(path, "must fit a signed 64-bit int", value)
            return
        if type(value) is float:
            if not math.isfinite(value):
                raise _fail(path, "must be a finite number", value)
            return
        if type(value) is str:
            if len(value) > self.max_str:
                raise _fail(path, f"a str of at most {self.max_str} characters", value)
            return
        if isinstance(value, dict):
            for k, v in value.items():
                if type(k) is not str or len(k) > 256:
                    raise _fail(path, "keys must be str of <= 256 chars", k)
                self._walk(v, f"{path}.{k}", depth + 1, budget)
            return
        if isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                self._walk(v, f"{path}[{i}]", depth + 1, budget)
            return
        raise _fail(path, f"{_type_name(value)} is not allowed here", value)

    def describe(self) -> str:
        return f"JSON-like value of <= {self.max_nodes} values"


@dataclass(frozen=True)
class Record(Bound):
    """A typed record nested in a payload (``TaskConfig``): an instance of ``cls`` whose fields
    lie within ``cls.BOUNDS`` (``field -> (int | float, lo, hi)``; nil where the field may be)."""

    cls: type

    def fields(self) -> dict[str, Bound]:
        """Each field's bound, from the record's own table: one statement of each range."""
        out: dict[str, Bound] = {}
        for name, (kind, lo, hi) in self.cls.BOUNDS.items():  # type: ignore[attr-defined]
            inner: Bound = Int(int(lo), int(hi)) if kind is int else Num(float(lo), float(hi))
            default = next(f.default for f in dataclasses.fields(self.cls) if f.name == name)
            out[name] = Opt(inner) if default is None else inner
        return out

    def check(self, value: Any, path: str) -> None:
        if type(value) is not self.cls:
            raise _fail(path, f"expected a {self.cls.__name__} record, not {_type_name(value)}", value)
        for name, bound in self.fields().items():
            bound.check(getattr(value, name), f"{path}.{name}")

    def describe(self) -> str:
        return f"{self.cls.__name__} record"


@dataclass(frozen=True)
class Unchecked(Bound):
    """Bounded elsewhere (tensors: ``Limits`` in the codec, names/shapes by the receiver)."""

    why: str

    def check(self, value: Any, path: str) -> None:
        return None

    def describe(self) -> str:
        return f"bounded by {self.why}"


# ---------------------------------------------------------------------------------------- fields
HEX32 = r"[0-9a-f]{32}"
IDENT = Text(128)  # federation, run, site, dataset names: the codec and stores take no longer
COUNT = Num(-MAX_COUNT, MAX_COUNT)  # a count as released: DP noise may make it negative or fractional
METRIC = Num(-MAX_ABS, MAX_ABS)
# Metric keys that are row counts: the coordinator weighs by them (then bounds them by announced rows).
COUNT_METRICS = ("n", "n_val", "n_test", "personalized_n")
METRICS = Table(max_items=256, named={k: COUNT for k in COUNT_METRICS}, other=METRIC)
EPSILON = Opt(Num(0.0, MAX_EPSILON))
DELTA = Opt(Num(0.0, 1.0))
ROUND = Int(0, MAX_ROUND)
TASK_ID = Text(128)  # the task's message id as the site echoes it; matched, never used as a name
NAMES = Opt(Items(Text(64), 256))

# The site's policy summary (``site_worker.config.SitePolicy.summary``), value by value as
# the site's own config accepts it: the coordinator plans privacy from these numbers.
POLICY = Table(
    max_items=64,
    named={
        "allowed_layers": NAMES,
        "max_parameters": Opt(Int(1, MAX_COUNT)),
        "max_train_memory_mb": Opt(Num(1.0, 1e9)),
        "min_noise_multiplier": Opt(Num(0.0, 1e6)),
        "max_epsilon": EPSILON,
        "allowed_aggregators": NAMES,
        "allow_no_dp": Opt(Flag()),
        "accountant": Opt(Text(16, choices=("rdp", "prv"))),
        "delta": Opt(Num(0.0, 1.0, open_lo=True, open_hi=True)),
        "max_sample_rate": Opt(Num(0.0, 1.0, open_lo=True)),
        "max_epochs": Opt(Int(1, 10**6)),
        "max_steps_per_task": Opt(Int(1, 10**9)),
        "metrics": Opt(Text(16, choices=("dp", "exact", "none"))),
        "metrics_noise_multiplier": Opt(Num(0.1, 1e6)),
        "metrics_loss_clip": Opt(Num(1e-6, 1e6)),
        "union_noise_multiplier": Opt(Num(0.1, 1e6)),
        "stats": Opt(Text(16, choices=("dp", "exact", "none"))),
        "stats_noise_multiplier": Opt(Num(0.1, 1e6)),
        "test_fraction": Opt(Num(0.0, 0.9, open_hi=True)),
        "max_evaluations_per_run": Opt(Int(0, 10**9)),
        "reproducible_dp": Opt(Flag()),
    },
    # A newer site may announce more: scalars and short name lists only, never planned with.
    other=Opt(Tree(max_nodes=257, max_depth=1, max_str=256)),
)

SECAGG_STATEMENT = 4 * 1024 * 1024  # a signed roster (~200 bytes a site) or unmask request (~150 an update)
MAX_MODEL_CHUNKS = 65_536  # chunks of one published model (a 512 MiB model in 8 MiB chunks is 64)

TASK = {
    "experiment": Tree(max_nodes=100_000, max_depth=16, max_str=65_536),
    "weights": Unchecked("Limits (codec) and the receiver's model"),
    "dataset": IDENT,
    "base_round": ROUND,
    "seed": Int(*_INT64),
    "deadline": Num(0.0, 1e11),
    "config": Record(TaskConfig),
    "model_sha256": Opt(Text(64, min_len=64, pattern=r"[0-9a-f]{64}")),  # None: weights inline
    "model_size": Int(0, 2**40),
    "model_chunks": Items(Text(64, min_len=64, pattern=r"[0-9a-f]{64}"), MAX_MODEL_CHUNKS),
}

FIELDS: dict[str, dict[str, Bound]] = {
    "Envelope": {
        "type": Text(32),
        "schema_version": Int(1, 2**31 - 1),
        "message_id": Text(32, min_len=32, pattern=HEX32),
        "federation": IDENT,
        "run_id": IDENT,
        "round": ROUND,
        "sender": IDENT,
        "recipient": IDENT,
        "sent_at": Num(0.0, 1e11),
        "payload": Unchecked("its own type's bounds"),
    },
    "TaskConfig": Record(TaskConfig).fields(),  # stated once, in TaskConfig.BOUNDS
    "DatasetInfo": {
        "name": IDENT,
        "rows": Int(0, MAX_ROWS),
        "columns": Items(Text(256), 65_536),
        "feature_types": Table(max_items=65_536, key_len=256, other=Text(32)),
        "target": Text(256),
        "epsilon_spent": EPSILON,
        "max_epsilon": EPSILON,
        "delta": DELTA,
        "accountant": Opt(Text(16)),
    },
    "SiteHello": {
        "site_id": IDENT,
        "software_version": Text(64),
        "datasets": Items(Unchecked("DatasetInfo's bounds"), 256),
        "policy": POLICY,
    },
    # A liveness beat (coordinator/liveness.py): at most every 10 s, so three missed beats are ≤ 30 s.
    "Heartbeat": {"site_id": IDENT, "seq": Int(0, 2**63 - 1), "every_s": Num(1.0, 10.0)},
    "TrainTask": dict(TASK),
    "EvalTask": {**TASK, "split": Text(16, choices=("validation", "test")), "union_tag": ROUND},
    "PersonalizeTask": dict(TASK),
    "Update": {
        "task_id": TASK_ID,
        "weights": Unchecked("Limits (codec) and the global model's layout (coordinator/validation.py)"),
        "num_examples": Int(0, MAX_COUNT),
        "metrics": METRICS,
        "epsilon": EPSILON,
        "delta": DELTA,
        "base_round": ROUND,
        "reproducible": Flag(),
    },
    "EvalResult": {
        "task_id": TASK_ID,
        "num_examples": Int(0, MAX_COUNT),
        "metrics": METRICS,
        "base_round": ROUND,
        "union_tag": ROUND,
        "union_masked": Unchecked("Limits (codec); empty, or one uint32 array of the roster's length "
                                  "(coordinator/rounds/secure.py)"),
        "union_shares": Unchecked("Limits (codec); empty, or one sealed uint8 share per other roster site "
                                  "(coordinator/rounds/secure.py)"),
    },
    "Declined": {
        "task_id": TASK_ID,
        "reason": Text(32, choices=get_args(DeclineReason)),
        "detail": Text(8192),
        "figures": Table(max_items=32, other=METRIC),
    },
    "RunControl": {
        "action": Text(16, choices=get_args(ControlAction)),
        "reason": Text(1024),
    },
    # The cohort table (protocol/cohort.py): public layout settings out, one noisy vector back.
    "StatsTask": {
        "experiment": TASK["experiment"],
        "dataset": IDENT,
        "bins": Int(2, 200),  # protocol.cohort.MAX_BINS
        "deadline": TASK["deadline"],
    },
    "StatsResult": {
        "task_id": TASK_ID,
        "values": Items(COUNT, 65_536),  # protocol.cohort.MAX_STATS_VALUES; noisy counts may be negative
        "n": Int(0, MAX_ROWS),
        "noise_sd": Num(0.0, MAX_ABS),
        "mode": Text(8, choices=("dp", "exact")),
        "layout": Text(16, min_len=16, pattern=r"[0-9a-f]{16}"),
        "epsilon": EPSILON,
        "delta": DELTA,
        "accountant": Opt(Text(16, choices=("rdp", "prv"))),
    },
    # Secure aggregation (protocol/secagg/, docs/secure-aggregation.md): field vectors and sealed
    # shares are Tensors (Limits bound them; site_worker/secagg.py and coordinator/secagg.py check
    # their lengths against the roster); statements are small signed bytes.
    "SecAggJoin": {"deadline": TASK["deadline"]},
    "SecAggKey": {"task_id": TASK_ID, "public": Bin(32, min_len=32), "kid": Text(64), "sig": Bin(64, min_len=64)},
    "SecAggRoster": {"body": Bin(SECAGG_STATEMENT), "kid": Text(64), "sig": Bin(64, min_len=64)},
    "MaskedUpdate": {
        "task_id": TASK_ID,
        "tag": ROUND,
        "masked": Unchecked("Limits (codec); one uint32 array of the roster's length (coordinator/rounds/secure.py)"),
        "shares": Unchecked("Limits (codec); one sealed uint8 share per other roster site (coordinator/rounds/secure.py)"),
        "epsilon": EPSILON,
        "delta": DELTA,
        "base_round": ROUND,
    },
    "SecAggShare": {"sender": IDENT, "tag": ROUND,
                    "sealed": Unchecked("Limits (codec); AES-GCM authenticates it (protocol/secagg/keys.py)")},
    "SecAggUnmask": {"body": Bin(SECAGG_STATEMENT), "kid": Text(64), "sig": Bin(64, min_len=64),
                     "deadline": TASK["deadline"]},
    "SecAggAnswer": {"task_id": TASK_ID, "request_id": Text(64),
                     "share": Unchecked("Limits (codec); one uint32 array of the coding's piece length")},
}

# The chunk header (protocol/chunking.py), decoded from AMQP headers before any reassembly.
MAX_CHUNKS = 1_000_000
CHUNK_HEADER: dict[str, Bound] = {
    "transfer_id": Text(128, min_len=1),
    "index": Int(0, MAX_CHUNKS - 1),
    "count": Int(1, MAX_CHUNKS),
    "sha256": Text(64, min_len=64, pattern=r"[0-9a-f]{64}"),
    "total_size": Int(0, 2**40),
}


def check(type_name: str, field: str, value: Any, path: str) -> None:
    """Raise ``OutOfBounds`` unless ``value`` is within ``type_name.field``'s bound."""
    FIELDS[type_name][field].check(value, path)


def check_record(fields: Mapping[str, Bound], record: Mapping[str, Any], path: str) -> None:
    """Every field of ``record`` within its bound (missing fields are the codec's to refuse)."""
    for name, bound in fields.items():
        if name in record:
            bound.check(record[name], f"{path}.{name}")


def check_message(obj: Any, path: str = "payload") -> None:
    """Every field of a decoded message dataclass (and its DatasetInfos) within bounds."""
    name = type(obj).__name__
    for f in dataclasses.fields(obj):
        check(name, f.name, getattr(obj, f.name), f"{path}.{f.name}")


def _check_coverage() -> None:
    """Every registered message type, and every one of its fields, has a bound."""
    from protocol.messages import MESSAGE_TYPES, DatasetInfo, Envelope

    for cls in (*MESSAGE_TYPES.values(), DatasetInfo, Envelope):
        have = FIELDS.get(cls.__name__)
        if have is None:
            raise RuntimeError(f"protocol/bounds.py: message type {cls.__name__} has no bounds")
        names = {f.name for f in dataclasses.fields(cls)}
        if names != set(have):
            raise RuntimeError(f"protocol/bounds.py: {cls.__name__} fields {sorted(names)} but bounds for "
                               f"{sorted(have)}: state one bound per field")


_check_coverage()
