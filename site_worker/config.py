"""Site configuration: what a hospital writes in ``site.toml``.

Validated once at the edge; every error names the TOML key and says how to fix it,
so an IT department can get a site running without reading code. Relative paths
are resolved against the directory of the TOML file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from protocol.broker_url import BrokerURLError, with_password
from protocol.config_error import ConfigError
from protocol.ids import NAME_RULE, is_name
from protocol.policy import ACCOUNTANTS, MAX_ASSUMED_HONEST, METRICS_MODES, SECURE_AGGREGATION_MODES, SitePolicy
from protocol.toml_config import read_toml
from site_worker import readers

COLUMN_TYPES = ("numeric", "categorical")


class SiteConfigError(ConfigError):
    """A bad site configuration; ``key`` is the dotted TOML key at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(key, message)
        self.key = key


@dataclass(frozen=True)
class DatasetSource:
    """One local dataset the site offers (values never leave the site)."""

    name: str
    path: Path  # CSV / Parquet file, or the X array for ``npy``
    target: str  # target column (for ``npy``: a label name used in the catalogue)
    format: str = "csv"
    columns: dict[str, str] = field(default_factory=dict)  # column -> "numeric" | "categorical"
    labels_path: Path | None = None  # ``npy`` only: the y array
    csv_separator: str = ","


@dataclass(frozen=True)
class SiteConfig:
    site_id: str
    federation: str
    broker_url: str
    key_path: Path
    coordinator_pub: Path
    state_dir: Path
    datasets: dict[str, DatasetSource]
    policy: SitePolicy = field(default_factory=SitePolicy)
    tls: dict[str, str] | None = None  # {"ca", "cert", "key"} file paths for amqps://
    flower_client: str | None = None  # "module:function" returning a flwr NumPyClient
    max_skew_s: float = 300.0
    grace_s: float = 30.0
    heartbeat_s: int = 30
    alive_every_s: float = 10.0  # signed liveness beat to the coordinator (protocol Heartbeat, 1-10 s; 0: none)
    declare_topology: bool = False  # provisioned site users may not declare; guest/dev may
    log_level: str = "info"
    torch_threads: int | None = None  # CPU threads for training (None = torch's default)
    # The federation's site public keys (NAME.pub, from the kit): who may bind an X25519 key in a
    # secure-aggregation roster (site_worker/secagg.py). None: this site cannot join secure runs.
    peers_dir: Path | None = None


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and validate ``site.toml``; raises ``SiteConfigError`` naming the key."""
    path = Path(path)
    raw = read_toml(path, key="config", error=SiteConfigError)
    return site_config_from_dict(raw, base_dir=path.resolve().parent)


STATE_DIR_ENV = "FEDBUS_STATE_DIR"  # set by a kit's systemd unit (its StateDirectory=); replaces state_dir


def _state_dir(r: _Reader) -> Path:
    """``state_dir`` from site.toml, unless ``FEDBUS_STATE_DIR`` names the one the service may write."""
    env = os.environ.get(STATE_DIR_ENV, "").strip()
    if env:
        if not Path(env).is_absolute():
            raise SiteConfigError("state_dir", f"{STATE_DIR_ENV}={env!r} must be an absolute path")
        return Path(env)
    p = r.path("state_dir", must_exist=False)
    assert p is not None
    return p


def site_config_from_dict(raw: dict[str, Any], *, base_dir: Path | None = None) -> SiteConfig:
    """Validate an already-parsed TOML document (tests and the simulator use this)."""
    base = base_dir or Path.cwd()
    r = _Reader(raw, "", base)
    known = {
        "site_id", "federation", "broker_url", "broker_password_file", "key_path",
        "coordinator_pub", "state_dir", "datasets", "policy", "tls", "flower_client",
        "max_skew_s", "grace_s", "heartbeat_s", "declare_topology", "log_level", "torch_threads",
        "peers_dir", "alive_every_s",
    }
    r.reject_unknown(known)
    site_id = r.ident("site_id")
    federation = r.ident("federation")
    broker_url = r.string("broker_url")
    scheme = urlsplit(broker_url).scheme
    if scheme not in ("amqp", "amqps", "memory"):
        raise SiteConfigError("broker_url", f"scheme {scheme!r} is not supported; use amqp://, amqps:// or memory://")
    pw_file = r.path("broker_password_file", required=False, must_exist=True)
    if pw_file is not None:
        try:
            broker_url = with_password(broker_url, pw_file.read_text(encoding="utf-8").strip())
        except BrokerURLError as e:
            raise SiteConfigError("broker_password_file", f"cannot go with broker_url: {e}") from None
    tls = None
    if "tls" in raw:
        t = r.sub("tls")
        t.reject_unknown({"ca", "cert", "key", "auth"})
        tls = {k: str(t.path(k, required=False, must_exist=True)) for k in ("ca", "cert", "key") if k in t.raw}
        auth = t.string("auth", required=False)
        if auth is not None:  # "external": log in by the client certificate (broker user = its CN)
            if auth not in ("plain", "external"):
                raise SiteConfigError("tls.auth", f"{auth!r} is not 'plain' or 'external' (certificate login)")
            tls["auth"] = auth
    policy = _policy(r.sub("policy")) if "policy" in raw else SitePolicy()
    datasets = _datasets(r)
    flower = r.string("flower_client", required=False)
    if flower is not None and not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", flower):
        raise SiteConfigError("flower_client", f"{flower!r} is not 'module:function' (e.g. 'my_site.client:make_client')")
    level = r.string("log_level", required=False) or "info"
    if level not in ("debug", "info", "warning", "error"):
        raise SiteConfigError("log_level", f"{level!r} is not one of debug, info, warning, error")
    return SiteConfig(
        site_id=site_id,
        federation=federation,
        broker_url=broker_url,
        key_path=r.path("key_path", must_exist=True),
        coordinator_pub=r.path("coordinator_pub", must_exist=True),
        state_dir=_state_dir(r),
        datasets=datasets,
        policy=policy,
        tls=tls,
        flower_client=flower or None,
        max_skew_s=r.number("max_skew_s", default=300.0, minimum=0.0),
        grace_s=r.number("grace_s", default=30.0, minimum=0.0),
        heartbeat_s=int(r.number("heartbeat_s", default=30, minimum=0)),
        alive_every_s=_alive_every(r),
        declare_topology=r.boolean("declare_topology", default=False),
        log_level=level,
        torch_threads=_threads(r),
        peers_dir=r.path("peers_dir", required=False, must_exist=True),
    )


def _alive_every(r: "_Reader") -> float:
    """``alive_every_s``: 0 (no beats) or 1-10 s, the wire bound of ``Heartbeat.every_s``."""
    v = float(r.number("alive_every_s", default=10.0, minimum=0.0))
    if v != 0.0 and not 1.0 <= v <= 10.0:
        raise SiteConfigError(r.key("alive_every_s"), f"must be 0 (no liveness beats) or between 1 and 10 seconds, got {v:g}")
    return v


def _threads(r: "_Reader") -> int | None:
    v = r.raw.get("torch_threads")
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise SiteConfigError("torch_threads", f"must be a positive integer, got {v!r}")
    return v


def _policy(r: "_Reader") -> SitePolicy:
    d = SitePolicy()
    r.reject_unknown({
        "allowed_layers", "max_parameters", "max_train_memory_mb", "min_noise_multiplier", "max_epsilon",
        "max_eval_memory_mb", "max_release_values",
        "allowed_aggregators", "allow_no_dp", "accountant", "delta", "max_sample_rate", "max_epochs",
        "max_steps_per_task", "metrics", "metrics_noise_multiplier", "metrics_loss_clip", "union_noise_multiplier",
        "max_evaluations_per_run", "test_fraction", "reproducible_dp", "dp_seed",
        "allow_unprotected_flower_client", "require_approval", "secure_aggregation",
        "secure_aggregation_min_contributors", "stats", "stats_noise_multiplier", "assume_honest_sites",
    })
    layers = r.string_list("allowed_layers")
    aggs = r.string_list("allowed_aggregators")
    accountant = r.string("accountant", required=False) or d.accountant
    if accountant not in ACCOUNTANTS:
        raise SiteConfigError(r.key("accountant"), f"{accountant!r} is not one of {', '.join(ACCOUNTANTS)} "
                                                   "(gdp does not compose across tasks)")
    metrics = r.string("metrics", required=False) or d.metrics
    if metrics not in METRICS_MODES:
        raise SiteConfigError(r.key("metrics"), f"{metrics!r} is not one of {', '.join(METRICS_MODES)}")
    stats = r.string("stats", required=False) or d.stats
    if stats not in METRICS_MODES:
        raise SiteConfigError(r.key("stats"), f"{stats!r} is not one of {', '.join(METRICS_MODES)}")
    delta = r.number("delta", default=None, minimum=0.0)
    if delta is not None and not 0 < delta < 1:
        raise SiteConfigError(r.key("delta"), f"must be in (0, 1), got {delta}")
    sample_rate = float(r.number("max_sample_rate", default=d.max_sample_rate, minimum=0.0))
    if not 0 < sample_rate <= 1:
        raise SiteConfigError(r.key("max_sample_rate"), f"must be in (0, 1], got {sample_rate}")
    test_fraction = float(r.number("test_fraction", default=d.test_fraction, minimum=0.0))
    if not test_fraction < 0.9:
        raise SiteConfigError(r.key("test_fraction"), f"must be in [0, 0.9), got {test_fraction}")
    secagg = r.string("secure_aggregation", required=False) or d.secure_aggregation
    if secagg not in SECURE_AGGREGATION_MODES:
        raise SiteConfigError(r.key("secure_aggregation"), f"{secagg!r} is not one of {', '.join(SECURE_AGGREGATION_MODES)}")
    reproducible = r.boolean("reproducible_dp", default=False)
    dp_seed = r.integer("dp_seed", default=None, minimum=0)
    if reproducible and dp_seed is None:
        raise SiteConfigError(r.key("dp_seed"), "reproducible_dp = true needs a site-local integer dp_seed")
    return SitePolicy(
        allowed_layers=tuple(layers) if layers is not None else None,
        max_parameters=r.integer("max_parameters", default=None, minimum=1),
        max_train_memory_mb=float(r.number("max_train_memory_mb", default=d.max_train_memory_mb, minimum=1.0)),
        max_eval_memory_mb=float(r.number("max_eval_memory_mb", default=d.max_eval_memory_mb, minimum=1.0)),
        max_release_values=r.integer("max_release_values", default=d.max_release_values, minimum=25),
        min_noise_multiplier=float(r.number("min_noise_multiplier", default=d.min_noise_multiplier, minimum=0.0)),
        max_epsilon=r.number("max_epsilon", default=None, minimum=0.0),
        allowed_aggregators=tuple(aggs) if aggs is not None else None,
        allow_no_dp=r.boolean("allow_no_dp", default=False),
        accountant=accountant,
        delta=delta,
        max_sample_rate=sample_rate,
        max_epochs=r.integer("max_epochs", default=d.max_epochs, minimum=1),
        max_steps_per_task=r.integer("max_steps_per_task", default=d.max_steps_per_task, minimum=1),
        metrics=metrics,
        metrics_noise_multiplier=float(r.number("metrics_noise_multiplier", default=d.metrics_noise_multiplier,
                                                minimum=0.1)),
        metrics_loss_clip=float(r.number("metrics_loss_clip", default=d.metrics_loss_clip, minimum=1e-6)),
        union_noise_multiplier=float(r.number("union_noise_multiplier", default=d.union_noise_multiplier,
                                              minimum=0.1)),
        max_evaluations_per_run=r.integer("max_evaluations_per_run", default=d.max_evaluations_per_run, minimum=0),
        test_fraction=test_fraction,
        reproducible_dp=reproducible,
        dp_seed=dp_seed,
        allow_unprotected_flower_client=r.boolean("allow_unprotected_flower_client", default=False),
        require_approval=r.boolean("require_approval", default=False),
        secure_aggregation=secagg,
        secure_aggregation_min_contributors=r.integer("secure_aggregation_min_contributors",
                                                      default=d.secure_aggregation_min_contributors, minimum=2),
        assume_honest_sites=r.integer("assume_honest_sites", default=d.assume_honest_sites, minimum=1,
                                      maximum=MAX_ASSUMED_HONEST),
        stats=stats,
        stats_noise_multiplier=float(r.number("stats_noise_multiplier", default=d.stats_noise_multiplier,
                                              minimum=0.1)),
    )


def _datasets(r: "_Reader") -> dict[str, DatasetSource]:
    if "datasets" not in r.raw:
        raise SiteConfigError("datasets", "missing; add a [datasets.NAME] table with path and target")
    d = r.sub("datasets")
    if not d.raw:
        raise SiteConfigError("datasets", "no dataset offered; add a [datasets.NAME] table with path and target")
    out: dict[str, DatasetSource] = {}
    for name in d.raw:
        if not is_name(name):
            raise SiteConfigError(f"datasets.{name}", "dataset names use letters, digits, '_', '-', '.'")
        t = d.sub(name)
        t.reject_unknown({"path", "target", "format", "columns", "labels_path", "csv_separator"})
        p = t.path("path", must_exist=True)
        fmt = t.string("format", required=False) or _infer_format(p, t.key("format"))
        if fmt not in readers.formats():
            raise SiteConfigError(t.key("format"), f"{fmt!r} is not one of {', '.join(readers.formats())}")
        apart = readers.by_format(fmt).labels_file  # the labels in a file of their own (an .npy pair)
        labels = t.path("labels_path", required=True, must_exist=True) if apart else None
        target = t.string("target", required=not apart) or "label"
        cols: dict[str, str] = {}
        if "columns" in t.raw:
            c = t.sub("columns")
            for col, typ in c.raw.items():
                if typ not in COLUMN_TYPES:
                    raise SiteConfigError(c.key(col), f"{typ!r} is not one of {', '.join(COLUMN_TYPES)}")
                cols[col] = typ
        sep = t.string("csv_separator", required=False) or ","
        out[name] = DatasetSource(
            name=name, path=p, target=target, format=fmt, columns=cols, labels_path=labels, csv_separator=sep
        )
    return out


def _infer_format(p: Path, key: str) -> str:
    fmt = readers.infer_format(p)
    if fmt is None:
        raise SiteConfigError(key, f"cannot tell the format of {p.name}; set format = "
                                   + " | ".join(f'"{f}"' for f in readers.formats()))
    return fmt


class _Reader:
    """Typed access to one TOML table with key-naming errors."""

    def __init__(self, raw: Any, prefix: str, base: Path) -> None:
        if not isinstance(raw, dict):
            raise SiteConfigError(prefix or "config", f"must be a table, got {type(raw).__name__}")
        self.raw = raw
        self.prefix = prefix
        self.base = base

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def sub(self, name: str) -> "_Reader":
        return _Reader(self.raw[name], self.key(name), self.base)

    def reject_unknown(self, known: set[str]) -> None:
        for k in self.raw:
            if k not in known:
                raise SiteConfigError(self.key(k), f"unknown key; expected one of {', '.join(sorted(known))}")

    def string(self, name: str, *, required: bool = True) -> str | None:
        v = self.raw.get(name)
        if v is None:
            if required:
                raise SiteConfigError(self.key(name), "missing; it is required")
            return None
        if not isinstance(v, str) or (required and not v.strip()):
            raise SiteConfigError(self.key(name), f"must be a non-empty string, got {v!r}")
        return v

    def ident(self, name: str) -> str:
        v = self.string(name)
        assert v is not None
        if not is_name(v):
            raise SiteConfigError(self.key(name), f"{v!r} must be {NAME_RULE}")
        return v

    def path(self, name: str, *, required: bool = True, must_exist: bool = False) -> Path | None:
        v = self.string(name, required=required)
        if v is None:
            return None
        p = Path(os.path.expanduser(v))
        if not p.is_absolute():
            p = self.base / p
        if must_exist and not p.exists():
            raise SiteConfigError(self.key(name), f"{p} does not exist")
        return p

    def number(self, name: str, *, default: float | None, minimum: float | None = None) -> Any:
        v = self.raw.get(name, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SiteConfigError(self.key(name), f"must be a number, got {v!r}")
        if minimum is not None and v < minimum:
            raise SiteConfigError(self.key(name), f"must be >= {minimum}, got {v}")
        return float(v) if isinstance(default, float) or isinstance(v, float) else v

    def integer(self, name: str, *, default: int | None, minimum: int | None = None,
                maximum: int | None = None) -> Any:
        v = self.raw.get(name, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise SiteConfigError(self.key(name), f"must be an integer, got {v!r}")
        if minimum is not None and v < minimum:
            raise SiteConfigError(self.key(name), f"must be >= {minimum}, got {v}")
        if maximum is not None and v > maximum:
            raise SiteConfigError(self.key(name), f"must be <= {maximum}, got {v}")
        return v

    def boolean(self, name: str, *, default: bool) -> bool:
        v = self.raw.get(name, default)
        if not isinstance(v, bool):
            raise SiteConfigError(self.key(name), f"must be true or false, got {v!r}")
        return v

    def string_list(self, name: str) -> list[str] | None:
        v = self.raw.get(name)
        if v is None:
            return None
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            raise SiteConfigError(self.key(name), f"must be a list of strings, got {v!r}")
        return v
