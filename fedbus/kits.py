"""Provisioning kits: one project file in, one directory per party out.

``fedbus provision PROJECT.toml --out DIR`` writes

* ``DIR/<site>/``: ``site.toml`` filled in, the site's key pair, ``coordinator.pub``,
  ``peers/`` (every active site's public key, for secure aggregation's key bindings), the
  broker password (``broker.password``, mode 0600), ``fedbus-site.service`` (systemd,
  ``RestartPreventExitStatus=2``) and a ``README`` with the four steps left to the hospital;
* ``DIR/coordinator/``: ``coordinator.toml``, the coordinator's key pair, its broker
  password, and ``state/`` with every site enrolled;
* ``DIR/kits.json``: what was provisioned (key ids, revocations), so re-running is
  idempotent: existing keys and passwords are kept; only ``rotate`` renews them.

It also creates the broker users (``protocol/transport/provision.py``) with the kits'
passwords. ``revoke`` distrusts a site's key in the coordinator's state, deletes its
broker user and removes its kit. TLS: the project's ``[tls]`` table goes to
``tls_files`` (the hook the certificates module provides) once per party.

Over 500 lines on purpose: the project file's checks, the per-party kit writers and the
re-provision rules (rotate, revoke, keep site.toml) must agree on one model of a kit.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from fedbus.kit_unit import site_unit, state_directory
from protocol.broker_url import BrokerURLError, with_password, with_user
from protocol.config_error import ConfigError
from protocol.durable import write_atomic
from protocol.ids import NAME_RULE, is_name
from protocol.toml_config import read_toml
from protocol.signing import Signer, generate_keypair

COORDINATOR = "coordinator"  # the coordinator's kit directory and key name


class ProjectError(ConfigError):
    """A bad project file; ``key`` is the TOML key at fault (exit 2)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(key, message)
        self.key = key


@dataclass(frozen=True)
class SiteSpec:
    id: str
    dataset: str
    target: str | None
    data: str | None  # path of the data file at the hospital, if known
    max_epsilon: float = 10.0  # the kit's default privacy budget (the hospital's to change)
    test_fraction: float | None = None  # the kit's policy.test_fraction, when the project sets one


@dataclass(frozen=True)
class Project:
    federation: str
    broker: str  # URL the parties connect to (credentials stripped in kits)
    admin: str  # URL with admin credentials used to create the users
    coordinator_user: str
    quorum: bool
    sites: list[SiteSpec]
    tls: dict[str, Any] | None = None
    install_dir: str | None = None  # where kits will live on the target machines (systemd paths)
    management_url: str | None = None  # RabbitMQ management API (default: from the admin URL; see provision.py)

    def ca_file(self) -> str | None:
        """The federation CA the broker's (and its management API's) certificates chain to."""
        t = self.tls or {}
        if t.get("ca"):
            return str(t["ca"])
        return str(Path(str(t["pki"])) / "ca.pem") if t.get("pki") else None


def _toml_table(raw: Any, key: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ProjectError(key, "must be a table")
    return raw


def _reject_unknown(t: dict[str, Any], known: set[str], where: str) -> None:
    for k in t:
        if k not in known:
            raise ProjectError(f"{where}.{k}" if where else k, f"unknown key; expected one of {', '.join(sorted(known))}")


def _string(t: dict[str, Any], k: str, where: str, *, required: bool = True) -> str | None:
    v = t.get(k)
    if v is None:
        if required:
            raise ProjectError(f"{where}.{k}", "missing; it is required")
        return None
    if not isinstance(v, str) or not v.strip():
        raise ProjectError(f"{where}.{k}", f"must be a non-empty string, got {v!r}")
    return v


def _ident(t: dict[str, Any], k: str, where: str) -> str:
    v = _string(t, k, where)
    assert v is not None
    if not is_name(v):
        raise ProjectError(f"{where}.{k}", f"{v!r} must be {NAME_RULE}")
    return v


def _number(t: dict[str, Any], k: str, where: str, default: float) -> float:
    v = t.get(k, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise ProjectError(f"{where}.{k}", f"must be a positive number, got {v!r}")
    return float(v)


def _fraction(t: dict[str, Any], k: str, where: str, default: float | None) -> float | None:
    """A share of a dataset's rows, the same range a site's policy accepts (0 < f < 0.9)."""
    v = t.get(k, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 0.9:
        raise ProjectError(f"{where}.{k}", f"must be a number above 0 and below 0.9, got {v!r}")
    return float(v)


def _read_toml(path: Path, key: str) -> dict[str, Any]:
    """The parsed file; ``ProjectError(key)`` when it is missing or not TOML."""
    return read_toml(path, key=key, error=ProjectError)


def load_project(path: Path) -> Project:
    """Read and validate PROJECT.toml (see README "Deployment")."""
    raw = _read_toml(path, "project")
    _reject_unknown(raw, {"federation", "sites", "tls"}, "")
    fed = _toml_table(raw.get("federation"), "federation")
    _reject_unknown(fed, {"name", "broker", "admin", "coordinator_user", "quorum", "dataset", "target", "install_dir",
                          "max_epsilon", "management_url", "test_fraction"}, "federation")
    name = _ident(fed, "name", "federation")
    broker = _string(fed, "broker", "federation")
    assert broker is not None
    if urlsplit(broker).scheme not in ("amqp", "amqps"):
        raise ProjectError("federation.broker", f"must be an amqp:// or amqps:// URL, got {broker!r}")
    admin = _string(fed, "admin", "federation", required=False) or broker
    if not urlsplit(admin).username:
        raise ProjectError("federation.admin", "give the admin URL with credentials (amqp://admin:PASS@host:5672/vhost) "
                                               "to create the broker users, or put them in federation.broker")
    quorum = fed.get("quorum", False)
    if not isinstance(quorum, bool):
        raise ProjectError("federation.quorum", f"must be true or false, got {quorum!r}")
    dataset = _string(fed, "dataset", "federation", required=False) or "data"
    target = _string(fed, "target", "federation", required=False)
    budget = _number(fed, "max_epsilon", "federation", 10.0)
    fraction = _fraction(fed, "test_fraction", "federation", None)
    entries = raw.get("sites")
    if not isinstance(entries, list) or not entries:
        raise ProjectError("sites", "add at least one [[sites]] table with an id")
    sites: list[SiteSpec] = []
    for i, entry in enumerate(entries):
        where = f"sites[{i}]"
        t = _toml_table(entry, where)
        _reject_unknown(t, {"id", "dataset", "target", "data", "max_epsilon", "test_fraction"}, where)
        sid = _ident(t, "id", where)
        if sid == COORDINATOR or any(s.id == sid for s in sites):
            raise ProjectError(f"{where}.id", f"{sid!r} is used twice (or is the coordinator's name)")
        ds = _string(t, "dataset", where, required=False) or dataset
        if not is_name(ds):
            raise ProjectError(f"{where}.dataset", f"{ds!r} must use letters, digits, '.', '_', '-'")
        data = _string(t, "data", where, required=False)
        if data is not None and not Path(data).is_absolute():  # relative to the project file, as a reader expects
            data = str((path.resolve().parent / data).resolve())
        sites.append(SiteSpec(sid, ds, _string(t, "target", where, required=False) or target,
                              data, _number(t, "max_epsilon", where, budget), _fraction(t, "test_fraction", where, fraction)))
    tls = _toml_table(raw["tls"], "tls") if "tls" in raw else None
    user = fed.get("coordinator_user") or f"coordinator-{name}"
    if not is_name(user) or user in {s.id for s in sites}:
        raise ProjectError("federation.coordinator_user", f"{user!r} must be a name no site uses")
    return Project(name, broker, admin, user, quorum, sites, tls, _string(fed, "install_dir", "federation", required=False),
                   _string(fed, "management_url", "federation", required=False))


# ----------------------------------------------------------------------------- TLS hook

TlsHook = Callable[[dict[str, Any], Path, str], "dict[str, str] | None"]


def tls_files(tls: dict[str, Any], kit: Path, party: str) -> dict[str, str] | None:
    """The ``[tls]`` files of one party's kit ({"ca", "cert", "key"}, paths relative to the kit).

    HOOK for the certificates module: if ``protocol.transport.certificates`` defines
    ``kit_tls(tls, kit_dir, party)``, it is called (it may issue a certificate per
    party). Otherwise only ``tls.ca`` is copied into the kit (server-verified TLS).
    """
    try:
        from protocol.transport import certificates  # type: ignore[attr-defined]
    except ImportError:
        certificates = None
    hook = getattr(certificates, "kit_tls", None)
    if hook is not None:
        return hook(tls, kit, party)
    ca = tls.get("ca")
    if not ca:
        return None
    src = Path(ca)
    if not src.exists():
        raise ProjectError("tls.ca", f"{src} does not exist")
    shutil.copyfile(src, kit / "ca.pem")
    return {"ca": "ca.pem"}


# ----------------------------------------------------------------------------- files

def write_secret(path: Path, text: str) -> None:
    """Write ``text`` with mode 0600 from the first byte on, crash-safe (``protocol.durable``)."""
    write_atomic(path, text.encode("utf-8"), mode=0o600)


def _q(v: str) -> str:
    return json.dumps(v)  # a TOML basic string is a JSON string for our characters


def party_url(broker: str, user: str) -> str:
    """``broker`` with ``user`` and no password (the password lives in broker.password)."""
    return with_user(broker, user)


def _password(path: Path, rotate: bool) -> tuple[str, bool]:
    if path.exists() and not rotate:
        return path.read_text(encoding="utf-8").strip(), False
    pw = secrets.token_urlsafe(24)
    write_secret(path, pw + "\n")
    return pw, True


def _keypair(kit: Path, name: str, rotate: bool) -> tuple[str, bool]:
    key = kit / f"{name}.key"
    made = rotate or not key.exists()
    if made:
        generate_keypair(name, kit, force=True)
    return Signer.from_file(key).kid, made


def _tls_toml(files: dict[str, str] | None) -> str:
    if not files:
        return ""
    return "\n[tls]\n" + "".join(f"{k} = {_q(v)}\n" for k, v in files.items())


def _data_path(s: SiteSpec, kit: Path) -> str:
    """The data file as site.toml names it: relative to the kit (portable), never the provisioner's absolute path."""
    if s.data is None:
        return f"data/{s.dataset}.csv"
    return os.path.relpath(s.data, kit.resolve())


def _test_fraction_toml(s: SiteSpec) -> str:
    if s.test_fraction is None:
        return ""
    return f"test_fraction = {s.test_fraction:g}      # of each dataset's rows: the fixed test split, never trained on\n"


def _site_toml(p: Project, s: SiteSpec, tls: dict[str, str] | None, kit: Path) -> str:
    data = _data_path(s, kit)
    return f"""# fedbus site worker for {s.id} in federation {p.federation} (written by fedbus provision).
# Every path is relative to this file's directory (the kit): copy the kit anywhere.
# FEDBUS_STATE_DIR (environment), when set, replaces state_dir (the systemd unit sets it).
site_id = {_q(s.id)}
federation = {_q(p.federation)}
broker_url = {_q(party_url(p.broker, s.id))}
broker_password_file = "broker.password"
key_path = {_q(s.id + ".key")}
coordinator_pub = "coordinator.pub"
peers_dir = "peers"     # the federation's site keys (secure aggregation); compare their ids with the other hospitals
state_dir = "state"
log_level = "info"

[policy]
max_epsilon = {s.max_epsilon:g}        # this hospital's lifetime privacy budget per dataset
{_test_fraction_toml(s)}require_approval = true   # run only experiments approved here: fedbus site approve EXPERIMENT.json --config site.toml
min_noise_multiplier = 0.5
allow_no_dp = false

[datasets.{s.dataset}]
path = {_q(data)}   # STEP 1: the hospital's data file (CSV or Parquet)
target = {_q(s.target or "TARGET_COLUMN")}
{_tls_toml(tls)}"""


def _site_readme(p: Project, s: SiteSpec) -> str:
    return f"""fedbus kit for site {s.id} (federation {p.federation})
========================================================

Everything is filled in: site.toml, this site's signing key ({s.id}.key, keep it secret),
the coordinator's public key (coordinator.pub: only its tasks are run), the broker password
(broker.password, mode 0600) and a systemd unit. The broker is {party_url(p.broker, s.id)};
the site only connects out to it.

Four steps are left to you:

1. Point at the data file: edit `path` under [datasets.{s.dataset}] in site.toml (relative
   to this kit, or absolute; and `target`, the column to predict, if it says TARGET_COLUMN).
   Every path in the kit is relative to the kit: copy the whole folder where you like.
2. Check everything before joining (config, keys, broker login, data against the experiment,
   the experiment's hash, its model and the privacy cost of the run here):

       fedbus site check --config site.toml --experiment EXPERIMENT.json

3. Approve the experiment (this site runs only what it approved: policy.require_approval):

       fedbus site approve EXPERIMENT.json --config site.toml

   (`fedbus site approvals list|revoke HASH --config site.toml` to review or withdraw)
4. Start the worker:

       fedbus site run --config site.toml

   or as a service, as the unprivileged user `fedbus` (never root): set FEDBUS_KIT_DIR in
   fedbus-site.service to where this kit lives, then follow the install lines at its top.
   The service keeps its state (privacy ledger, approvals) in /var/lib/{state_directory(s.id)}:
   approve for it with `sudo -u fedbus FEDBUS_STATE_DIR=/var/lib/{state_directory(s.id)} fedbus site approve ...`.
"""


def _coordinator_toml(p: Project, tls: dict[str, str] | None) -> str:
    return f"""# fedbus coordinator for federation {p.federation} (written by fedbus provision).
# Use: fedbus coordinator run EXPERIMENT.json --config coordinator.toml
federation = {_q(p.federation)}
broker_url = {_q(party_url(p.broker, p.coordinator_user))}
broker_password_file = "broker.password"
key_path = "coordinator.key"
state_dir = "state"
{_tls_toml(tls)}"""


def _coordinator_readme(p: Project) -> str:
    sites = ", ".join(s.id for s in p.sites)
    return f"""fedbus kit for the coordinator of federation {p.federation}
=================================================

state/ has every site enrolled ({sites}); coordinator.key signs the tasks (each site kit
holds coordinator.pub). Run an experiment:

    fedbus coordinator run EXPERIMENT.json --config coordinator.toml

Then: fedbus coordinator runs list --state state
      fedbus coordinator audit RUN --state state
"""


# ----------------------------------------------------------------------------- provisioning

def _kept_site_toml(path: Path, s: SiteSpec) -> str:
    """The report line for a site.toml kept as the hospital left it; it names a budget that
    differs from the project's (the hospital's own ``max_epsilon`` stands: re-provisioning
    never resets it)."""
    try:
        raw = read_toml(path, key="site.toml")
        own = raw.get("policy", {}).get("max_epsilon")
    except (ConfigError, AttributeError) as e:
        return f"site {s.id} site.toml as it is (not read: {e})"
    # a kit written before kits carried peers/: it cannot join a secure run until the hospital adds it
    peers = "" if "peers_dir" in raw else '; add peers_dir = "peers" to it to join secure aggregation'
    if isinstance(own, (int, float)) and not isinstance(own, bool) and float(own) != s.max_epsilon:
        return (f"site {s.id} site.toml with the hospital's max_epsilon {own:g} (the project says {s.max_epsilon:g}; "
                f"the hospital's budget stands){peers}")
    return f"site {s.id} site.toml{peers}"


@dataclass
class KitReport:
    out: Path
    created: list[str] = field(default_factory=list)  # human lines: what was created or rotated
    kept: list[str] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)
    broker: str | None = None  # how the broker users were made, or None when skipped

    def to_json(self) -> dict[str, Any]:
        return {"out": str(self.out), "created": self.created, "kept": self.kept, "revoked": self.revoked,
                "broker": self.broker}


def _write_peers(folder: Path, pubs: dict[str, bytes]) -> None:
    """``folder`` holds exactly the active sites' public keys (a revoked site's key is removed)."""
    folder.mkdir(exist_ok=True)
    for old in folder.glob("*.pub"):
        if old.stem not in pubs:
            old.unlink()
    for sid, pem in pubs.items():
        (folder / f"{sid}.pub").write_bytes(pem)


def provision_kits(project: Project, out: Path, *, rotate_keys: set[str] = frozenset(),
                   rotate_passwords: set[str] = frozenset(), revoke: set[str] = frozenset(),
                   broker: bool = True) -> KitReport:
    """Write or update every kit; see the module docstring. Raises ``ProjectError`` on bad names."""
    from coordinator.state import StateStore

    ids = {s.id for s in project.sites} | {COORDINATOR}
    for what, names in (("--rotate-key", rotate_keys), ("--rotate-password", rotate_passwords)):
        for n in names:
            if n not in ids:
                raise ProjectError(what, f"{n!r} is neither a site of the project nor 'coordinator'")
    if broker:  # before writing anything: the admin credential never goes out in clear
        from protocol.transport.provision import check_management_url, management_api

        check_management_url(management_api(project.admin, project.management_url))
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "kits.json"
    record: dict[str, Any] = json.loads(record_path.read_text()) if record_path.exists() else {}
    if record.get("federation") not in (None, project.federation):
        raise ProjectError("federation.name", f"{out} holds kits of federation {record['federation']!r}; use another --out")
    record["federation"] = project.federation
    revoked: dict[str, Any] = record.setdefault("revoked", {})
    rep = KitReport(out)

    ckit = out / COORDINATOR
    ckit.mkdir(exist_ok=True)
    ckid, made = _keypair(ckit, COORDINATOR, COORDINATOR in rotate_keys)
    (rep.created if made else rep.kept).append(f"coordinator key {ckid}")
    cpw, made = _password(ckit / "broker.password", COORDINATOR in rotate_passwords)
    (rep.created if made else rep.kept).append("coordinator broker password")
    ctls = tls_files(project.tls, ckit, project.coordinator_user) if project.tls else None  # cert CN = broker user
    (ckit / "coordinator.toml").write_text(_coordinator_toml(project, ctls), encoding="utf-8")
    (ckit / "README").write_text(_coordinator_readme(project), encoding="utf-8")

    passwords = {project.coordinator_user: cpw}
    active: list[SiteSpec] = []
    pubs: dict[str, bytes] = {}
    for s in project.sites:
        if s.id in revoke:
            continue
        if s.id in revoked:
            rep.kept.append(f"site {s.id} stays revoked (remove it from the project file)")
            continue
        kit = out / s.id
        kit.mkdir(exist_ok=True)
        kid, made = _keypair(kit, s.id, s.id in rotate_keys)
        (rep.created if made else rep.kept).append(f"site {s.id} key {kid}")
        pw, made = _password(kit / "broker.password", s.id in rotate_passwords)
        (rep.created if made else rep.kept).append(f"site {s.id} broker password")
        shutil.copyfile(ckit / f"{COORDINATOR}.pub", kit / "coordinator.pub")
        tls = tls_files(project.tls, kit, s.id) if project.tls else None
        if not (kit / "site.toml").exists():  # the hospital edits it (data path, budget): never clobbered
            (kit / "site.toml").write_text(_site_toml(project, s, tls, kit), encoding="utf-8")
        else:
            rep.kept.append(_kept_site_toml(kit / "site.toml", s))
        (kit / "fedbus-site.service").write_text(site_unit(site_id=s.id, federation=project.federation,
                                                             install_dir=project.install_dir), encoding="utf-8")
        (kit / "README").write_text(_site_readme(project, s), encoding="utf-8")
        passwords[s.id] = pw
        pubs[s.id] = (kit / f"{s.id}.pub").read_bytes()
        active.append(s)

    for s in active:  # every kit holds the federation's site keys: who may bind a key in a secure roster
        _write_peers(out / s.id / "peers", pubs)
    store = StateStore(ckit / "state")
    try:
        for sid, pem in pubs.items():
            store.enroll(sid, pem)
        for sid in sorted(revoke):
            kid = store.revoke(sid)
            revoked[sid] = {"kid": kid, "at": time.time()}
            shutil.rmtree(out / sid, ignore_errors=True)
            rep.revoked.append(f"site {sid}: key {kid} distrusted, kit removed")
    finally:
        store.close()

    if broker:
        from protocol.transport.provision import deprovision, provision

        creds = provision(project.admin, sites=[s.id for s in active], coordinator=project.coordinator_user,
                          federation=project.federation, quorum=project.quorum, passwords=passwords,
                          auth="external" if (project.tls or {}).get("auth") == "external" else "plain",
                          management_url=project.management_url, ca=project.ca_file())
        rep.broker = f"{creds.method} on vhost {creds.vhost!r}: {', '.join(creds.passwords)}"
        if revoke:
            deprovision(project.admin, sorted(revoke), management_url=project.management_url, ca=project.ca_file())
            rep.revoked.append(f"broker users deleted: {', '.join(sorted(revoke))}")
    record["coordinator"] = {"kid": ckid, "broker_user": project.coordinator_user}
    record["sites"] = {s.id: {"kid": Signer.from_file(out / s.id / f"{s.id}.key").kid} for s in active}
    record_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return rep


# ----------------------------------------------------------------------------- coordinator.toml

@dataclass(frozen=True)
class CoordinatorConfig:
    federation: str
    broker_url: str  # with the password filled in
    key_path: Path
    state_dir: Path
    tls: dict[str, str] | None


def load_coordinator_config(path: Path) -> CoordinatorConfig:
    """A coordinator kit's ``coordinator.toml``; ``ProjectError`` naming the key."""
    raw = _read_toml(path, "config")
    _reject_unknown(raw, {"federation", "broker_url", "broker_password_file", "key_path", "state_dir", "tls"}, "")
    base = path.resolve().parent

    def rel(k: str) -> Path:
        v = _string(raw, k, "")
        assert v is not None
        p = Path(os.path.expanduser(v))
        return p if p.is_absolute() else base / p

    url = _string(raw, "broker_url", "")
    assert url is not None
    if "broker_password_file" in raw:
        pw_file = rel("broker_password_file")
        try:
            pw = pw_file.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ProjectError("broker_password_file", f"cannot read {pw_file}: {e.strerror}") from None
        try:
            url = with_password(url, pw)
        except BrokerURLError as e:
            raise ProjectError("broker_password_file", f"cannot go with broker_url: {e}") from None
    tls = None
    if "tls" in raw:
        t = _toml_table(raw["tls"], "tls")
        _reject_unknown(t, {"ca", "cert", "key", "auth"}, "tls")
        tls = {k: str((base / v) if not Path(v).is_absolute() else Path(v)) for k, v in t.items() if k != "auth"}
        if "auth" in t:  # "external": log in by the client certificate (broker user = its CN)
            if t["auth"] not in ("plain", "external"):
                raise ProjectError("tls.auth", f"{t['auth']!r} is not 'plain' or 'external'")
            tls["auth"] = t["auth"]
    return CoordinatorConfig(federation=_ident(raw, "federation", ""), broker_url=url, key_path=rel("key_path"),
                             state_dir=rel("state_dir"), tls=tls)
