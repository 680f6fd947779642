"""Broker users and permissions for sites and the coordinator (``fedbus broker provision``).

Least privilege, enforced by RabbitMQ itself:

* a **site** user (user name = the site id, so a delivery's broker-vouched ``user_id``
  *is* the sender's site id) may read only ``fedbus.site.<id>``, write only to
  ``fedbus.updates`` / ``fedbus.control`` (and ``fedbus.dlx``, so it can dead-letter a
  rejected task with its reason), and configure nothing: it cannot declare, bind or
  delete anything;
* the **coordinator** user may read its federation's queues (updates, control, and the
  liveness copy of the control messages that ``coordinator serve --broker`` watches between
  runs) and ``fedbus.dead`` (never a site's queue), publish to ``fedbus.tasks`` and ``fedbus.dlx``, and configure the fedbus
  exchanges and queues so that it can run ``bus.declare()`` for its topology (a new site
  needs its queue). Reading the exchanges and writing the queues is what AMQP requires for
  the bindings; it lets it neither read site queues nor publish as a site.

Users are created through the management HTTP API when it answers, else with
``rabbitmqctl`` on this machine (``node`` names a node other than the default); the result
says which. The management API carries the admin credential and every new password, so it
is spoken over HTTPS (``https://HOST:15671`` for an ``amqps://`` broker, or
``management_url``), verified against the federation CA (``ca``, else the broker URL's
``ca_certs``); plain ``http://`` is refused, before any connection, unless the host is
this machine (``protocol.loopback``), and a redirect is never followed. With ``auth="external"`` users get no password at all: they log
in by client certificate (EXTERNAL; broker user = the certificate's CN). Re-running is idempotent
for the topology, tags and permissions and **rotates** the passwords of existing users
(the new ones are returned, and printed or written once by the CLI).
"""

from __future__ import annotations

import abc
import base64
import json
import re
import secrets
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import quote, unquote, urlsplit

import structlog

from protocol.broker_url import with_user
from protocol.ids import NAME_RULE, is_name
from protocol.loopback import is_loopback
from protocol.transport.base import Topology
from protocol.transport.topology import (
    CONTROL,
    DEAD,
    DLX,
    TASKS,
    UPDATES,
    control_queue,
    liveness_queue,
    site_queue,
    updates_queue,
)

log = structlog.get_logger(__name__)

Method = Literal["auto", "management", "rabbitmqctl"]
MANAGEMENT_PORT, MANAGEMENT_TLS_PORT = 15672, 15671  # RabbitMQ's defaults (management.tcp / management.ssl)


class ProvisionError(Exception):
    """Provisioning could not be done; the message says what to change."""


@dataclass(frozen=True)
class Permissions:
    configure: str
    write: str
    read: str


@dataclass
class Credentials:
    """What provisioning did: ``passwords`` maps user -> new password (shown once)."""

    method: str  # "management" | "rabbitmqctl"
    vhost: str
    passwords: dict[str, str] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)  # user -> "site" | "coordinator"
    permissions: dict[str, Permissions] = field(default_factory=dict)


def _alt(*names: str) -> str:
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def site_permissions(site_id: str) -> Permissions:
    return Permissions(configure="^$", write=_alt(UPDATES, CONTROL, DLX), read=_alt(site_queue(site_id)))


def coordinator_permissions(federation: str) -> Permissions:
    """Publish tasks, read its federation's queues and the dead letters, and re-run
    ``bus.declare()`` for its topology (new sites): configure on the fedbus exchanges and
    queues, read on the exchanges and write on the queues for the bindings. Reading a
    site's queue stays refused."""
    site_queues = re.escape(site_queue("")) + r"[A-Za-z0-9._-]+"
    own = [updates_queue(federation), control_queue(federation), liveness_queue(federation)]
    names = [re.escape(n) for n in (TASKS, UPDATES, CONTROL, DLX, DEAD, *own)]
    return Permissions(
        configure="^(" + "|".join([*names, site_queues]) + ")$",
        write="^(" + "|".join([re.escape(n) for n in (TASKS, DLX, DEAD, *own)] + [site_queues]) + ")$",
        read=_alt(TASKS, UPDATES, CONTROL, DLX, DEAD, *own),
    )


def _check_name(kind: str, value: str) -> None:
    if not is_name(value):
        raise ProvisionError(f"{kind} {value!r} is not a valid name: use {NAME_RULE}")


def provision(
    broker_url: str,
    *,
    sites: list[str],
    coordinator: str | None = None,
    federation: str | None = None,
    quorum: bool = False,
    method: Method = "auto",
    management_url: str | None = None,
    passwords: dict[str, str] | None = None,
    auth: Literal["plain", "external"] = "plain",
    node: str | None = None,
    ca: str | None = None,
) -> Credentials:
    """Declare the topology (as the admin in ``broker_url``) and create the users.

    ``federation`` is required with ``coordinator`` (its queues are per federation).
    ``passwords`` gives users their password instead of a new one (a kit keeps its
    password when re-provisioned: idempotent, nothing rotates unless asked).
    ``auth="external"``: passwordless users for certificate login (``passwords`` stays empty).
    ``ca``: the federation CA that the broker's and the management API's certificates must
    chain to (default: the broker URL's ``ca_certs``, else the system CAs).
    """
    from protocol.transport import open_bus

    if not sites and not coordinator:
        raise ProvisionError("nothing to provision: give at least one --site or --coordinator")
    for s in sites:
        _check_name("site id", s)
    if coordinator:
        _check_name("coordinator name", coordinator)
        if not federation:
            raise ProvisionError("--coordinator needs --federation (its update/control queues are per federation)")
        if coordinator in sites:
            raise ProvisionError(f"coordinator name {coordinator!r} is also a site id; pick another")
    if federation:
        _check_name("federation", federation)
    if auth not in ("plain", "external"):
        raise ProvisionError(f"auth {auth!r}: use plain (passwords) or external (client certificates)")
    parts = urlsplit(broker_url.split(",")[0])
    if parts.scheme not in ("amqp", "amqps"):
        raise ProvisionError(f"--broker must be an amqp:// or amqps:// URL, got {broker_url!r}")
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    if method != "rabbitmqctl":  # before any connection: no credential goes out in clear
        check_management_url(management_api(broker_url, management_url))

    bus = open_bus(broker_url, quorum=quorum, **({"tls": {"ca": ca}} if ca and parts.scheme == "amqps" else {}))
    try:
        bus.declare(Topology(sites=sites, federations=[federation] if federation else [], quorum=quorum))
    finally:
        bus.close()

    admin = _Admin.choose(broker_url, method=method, management_url=management_url, node=node, ca=ca)
    creds = Credentials(method=admin.name, vhost=vhost)
    wanted: list[tuple[str, str, Permissions]] = [(s, "site", site_permissions(s)) for s in sites]
    if coordinator and federation:
        wanted.append((coordinator, "coordinator", coordinator_permissions(federation)))
    existing = admin.users()
    for user, role, perms in wanted:
        password = ((passwords or {}).get(user) or secrets.token_urlsafe(24)) if auth == "plain" else None
        existed = user in existing
        admin.put_user(user, password, existed=existed)
        admin.set_permissions(vhost, user, perms)
        if password is not None:
            creds.passwords[user] = password
        creds.roles[user] = role
        creds.permissions[user] = perms
        log.info("broker user provisioned", user=user, role=role, vhost=vhost, method=admin.name,
                 password="none (certificate login)" if password is None else ("rotated" if existed else "new"))
    return creds


def deprovision(
    broker_url: str, users: list[str], *, method: Method = "auto", management_url: str | None = None,
    node: str | None = None, ca: str | None = None,
) -> None:
    """Delete broker users (tests, and sites leaving the federation)."""
    admin = _Admin.choose(broker_url, method=method, management_url=management_url, node=node, ca=ca)
    for u in users:
        admin.delete_user(u)


def user_url(broker_url: str, user: str, password: str) -> str:
    """``broker_url`` with another user's credentials (what a site's config needs)."""
    return with_user(broker_url, user, password)


def management_api(broker_url: str, management_url: str | None = None) -> str:
    """The management API's base URL: ``management_url``, else HTTPS on 15671 for an
    ``amqps://`` broker and HTTP on 15672 for ``amqp://`` (allowed only on loopback)."""
    if management_url:
        return management_url.rstrip("/")
    p = urlsplit(broker_url.split(",")[0].strip())
    host = p.hostname or "localhost"
    shown = f"[{host}]" if ":" in host else host
    if p.scheme.lower() == "amqps":
        return f"https://{shown}:{MANAGEMENT_TLS_PORT}"
    return f"http://{shown}:{MANAGEMENT_PORT}"


def check_management_url(api: str) -> None:
    """Refuse a management API the admin credential would reach in clear: plain HTTP to
    anything but this machine (decided on the name, no DNS asked, nothing connected)."""
    p = urlsplit(api)
    if p.scheme not in ("http", "https") or not p.hostname:
        raise ProvisionError(f"--management-url {api!r}: use https://HOST:{MANAGEMENT_TLS_PORT} (the broker's "
                             "management.ssl listener)")
    if p.username or p.password:
        raise ProvisionError(f"--management-url {p.scheme}://{p.hostname}…: put no credentials in it; the admin "
                             "user and password come from the admin broker URL")
    if p.scheme == "http" and not is_loopback(p.hostname):
        raise ProvisionError(
            f"refusing to send the broker admin credentials in clear: the management API {api} is plain http:// "
            f"to {p.hostname}, which is not this machine; enable management.ssl on the broker and give "
            f"--management-url https://{p.hostname}:{MANAGEMENT_TLS_PORT} (verified with the federation CA), "
            "or run this on the broker host with --method rabbitmqctl"
        )


def _management_context(broker_url: str, ca: str | None) -> ssl.SSLContext:
    """Verify the management API's certificate and host name against ``ca``, else the
    broker URL's ``ca_certs`` (the federation CA), else the system CAs; present the URL's
    client certificate where it names one."""
    from protocol.transport.endpoints import EndpointError, parse_endpoints, ssl_context

    tls: dict[str, str] = {}
    try:
        if urlsplit(broker_url.split(",")[0].strip()).scheme.lower() == "amqps":
            tls = {k: v for k, v in parse_endpoints(broker_url).nodes[0].tls.items() if k in ("ca", "cert", "key")}
        if ca:
            tls["ca"] = ca
        return ssl_context(tls)
    except EndpointError as e:
        raise ProvisionError(f"management API over HTTPS: {e}") from None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect would carry the Authorization header to wherever it points: never followed."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        raise ProvisionError(f"the management API at {req.full_url} redirected ({code}) to {newurl}; credentials "
                             "are never sent after a redirect: give the final address with --management-url")


class _Admin(abc.ABC):
    """How users and permissions are managed: the management HTTP API or rabbitmqctl."""

    name = ""

    @staticmethod
    def choose(broker_url: str, *, method: Method, management_url: str | None, node: str | None = None,
               ca: str | None = None) -> "_Admin":
        p = urlsplit(broker_url.split(",")[0])
        user, password = unquote(p.username or "guest"), unquote(p.password or "guest")
        api = management_api(broker_url, management_url)
        if method in ("auto", "management"):
            check_management_url(api)
            ctx = _management_context(broker_url, ca) if api.startswith("https:") else None
            mgmt = _Management(api, user, password, context=ctx)
            if mgmt.available():
                return mgmt
            if method == "management":
                raise ProvisionError(
                    f"the management API does not answer at {api}/api/overview; enable it with "
                    "`rabbitmq-plugins enable rabbitmq_management` or use --method rabbitmqctl"
                )
        if shutil.which("rabbitmqctl") is None:
            raise ProvisionError(
                f"no management API at {api} and no rabbitmqctl on this machine: enable "
                "rabbitmq_management on the broker, or run this on the broker host"
            )
        if p.hostname not in (None, "localhost", "127.0.0.1", "::1"):
            log.warning("using rabbitmqctl: it manages the broker node on THIS machine", broker_host=p.hostname)
        return _Rabbitmqctl(node)

    @abc.abstractmethod
    def users(self) -> set[str]:
        """Names of the broker's users."""

    @abc.abstractmethod
    def put_user(self, user: str, password: str | None, *, existed: bool) -> None:
        """Create the user, or set its password (rotate) and clear its tags; with
        ``password=None`` the user has no password (certificate login only)."""

    @abc.abstractmethod
    def set_permissions(self, vhost: str, user: str, perms: Permissions) -> None:
        """Set the user's configure/write/read patterns on ``vhost``."""

    @abc.abstractmethod
    def delete_user(self, user: str) -> None:
        """Remove the user (cleanup)."""


class _Management(_Admin):
    name = "management"

    def __init__(self, api: str, user: str, password: str, *, context: ssl.SSLContext | None = None) -> None:
        check_management_url(api)
        self.api = api.rstrip("/")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self._auth = f"Basic {token}"
        # Direct (no proxy from the environment), verified, and no redirect followed.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect(),
                                                   urllib.request.HTTPSHandler(context=context or ssl.create_default_context()))

    def _call(self, verb: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(
            f"{self.api}{path}", method=verb, data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": self._auth, "Content-Type": "application/json"},
        )
        try:
            with self._opener.open(req, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def available(self) -> bool:
        try:
            status, _ = self._call("GET", "/api/overview")
        except (OSError, urllib.error.URLError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, ssl.SSLCertVerificationError):  # never fall back past an impostor
                raise ProvisionError(
                    f"the management API at {self.api} did not prove it is our broker: {reason.verify_message} "
                    "(its certificate must be signed by the federation CA, for this host name)") from None
            if isinstance(reason, ssl.SSLError):
                raise ProvisionError(f"TLS to the management API at {self.api} failed: {reason}; is it the "
                                     "management.ssl port?") from None
            return False
        if status in (401, 403):
            raise ProvisionError(f"the management API at {self.api} refused the admin credentials ({status})")
        return status == 200

    def _ok(self, status: int, body: bytes, what: str) -> None:
        if status not in (200, 201, 204):
            raise ProvisionError(f"management API: {what} failed ({status}): {body[:300].decode(errors='replace')}")

    def users(self) -> set[str]:
        s, b = self._call("GET", "/api/users")
        self._ok(s, b, "listing users")
        return {u["name"] for u in json.loads(b)}

    def put_user(self, user: str, password: str | None, *, existed: bool) -> None:
        body = {"password": password, "tags": ""} if password is not None else {"password_hash": "", "tags": ""}
        s, b = self._call("PUT", f"/api/users/{quote(user, safe='')}", body)
        self._ok(s, b, f"creating user {user!r}")

    def set_permissions(self, vhost: str, user: str, perms: Permissions) -> None:
        s, b = self._call(
            "PUT", f"/api/permissions/{quote(vhost, safe='')}/{quote(user, safe='')}",
            {"configure": perms.configure, "write": perms.write, "read": perms.read},
        )
        self._ok(s, b, f"setting permissions of {user!r} on vhost {vhost!r}")

    def delete_user(self, user: str) -> None:
        s, b = self._call("DELETE", f"/api/users/{quote(user, safe='')}")
        if s != 404:
            self._ok(s, b, f"deleting user {user!r}")


class _Rabbitmqctl(_Admin):
    name = "rabbitmqctl"

    def __init__(self, node: str | None = None) -> None:
        self._node = ["-n", node] if node else []

    def _run(self, *args: str, stdin: str | None = None) -> str:
        r = subprocess.run(["rabbitmqctl", "-q", *self._node, *args], input=stdin, capture_output=True, text=True,
                           timeout=120)
        if r.returncode != 0:
            raise ProvisionError(
                f"rabbitmqctl {args[0]} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[:500]} "
                "(rabbitmqctl must run as root or the rabbitmq user on the broker host)"
            )
        return r.stdout

    def users(self) -> set[str]:
        out = self._run("list_users", "--formatter", "json")
        return {u["user"] for u in json.loads(out or "[]")}

    def put_user(self, user: str, password: str | None, *, existed: bool) -> None:
        # The password goes through stdin, never the command line (visible in `ps`).
        if not existed:
            self._run("add_user", user, stdin=(password or secrets.token_urlsafe(24)) + "\n")  # created without tags
        elif password is not None:
            self._run("change_password", user, stdin=password + "\n")
        if existed:
            self._run("set_user_tags", user)  # no tags: no management or admin rights
        if password is None:
            self._run("clear_password", user)  # certificate login only

    def set_permissions(self, vhost: str, user: str, perms: Permissions) -> None:
        self._run("set_permissions", "-p", vhost, user, perms.configure, perms.write, perms.read)

    def delete_user(self, user: str) -> None:
        r = subprocess.run(["rabbitmqctl", "-q", *self._node, "delete_user", user], capture_output=True, text=True,
                           timeout=120)
        if r.returncode != 0 and "no_such_user" not in r.stdout + r.stderr and "does not exist" not in r.stdout + r.stderr:
            raise ProvisionError(f"rabbitmqctl delete_user {user} failed: {(r.stderr or r.stdout).strip()[:300]}")
