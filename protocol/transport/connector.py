"""Opening AMQP connections to a broker's nodes: failover, fail-fast, refusals named.

Sites connect outbound across firewalls and VPNs, and a clustered broker loses nodes, so
the AMQP bus's publisher (``publisher.py``) and consumers (``consumer.py``) get their
connections from here:

* :class:`Connector` opens a connection to the first node that answers, starting from
  the one that last worked (failover between the nodes of a cluster).
* A broker that was **never reached** fails after ``connect_timeout_s`` with one line
  (what, where, the likely cause): :class:`BrokerUnreachable`. Once connected, losses
  are retried forever by the callers, with :func:`backoff`.
* **Refusals** that retrying cannot fix (login, vhost, TLS verification, AMQP 403/404/406)
  are told apart from transient errors (:data:`TRANSIENT`) and named plainly
  (:func:`refusal_of`, :func:`permission_error`, :meth:`Connector.refused_at_door`).
* **Every attempt is bounded by the time left.** Until the first connection, name
  resolution (which pika does not time out), TCP, TLS and the AMQP handshake of each
  address of each node get at most what remains of ``connect_timeout_s``, so a silent
  or black-holed cluster fails as fast as a refused port, not after nodes x addresses
  x ``stack_timeout``.
* :func:`reach` makes that check once, *before* a process pays for its start-up (torch
  imports, warm-up): on a loaded host the start-up alone can take longer than the
  connect timeout, and a broker that is not there must not wait for it.
"""

from __future__ import annotations

import copy
import ipaddress
import itertools
import logging
import random
import socket
import ssl
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import pika
import pika.credentials
import pika.exceptions as px
import structlog
from pika.adapters.utils.connection_workflow import AMQPConnectionWorkflowFailed, AMQPConnectorException

from protocol.loopback import is_loopback
from protocol.transport.base import BrokerRefused, BrokerUnreachable, BusPermissionError
from protocol.transport.endpoints import Endpoint, Endpoints, parse_endpoints, ssl_context, tls_cause

log = structlog.get_logger(__name__)

_REFUSAL_CODES = {403: "ACCESS_REFUSED", 404: "NOT_FOUND", 406: "PRECONDITION_FAILED", 530: "NOT_ALLOWED", 540: "NOT_IMPLEMENTED"}
# Errors of a connection (not of what was asked on it): retried, never fatal.
# pika's connector errors (AMQPConnectorStackTimeout: TCP connected, no AMQP handshake in time)
# are not AMQPConnectionErrors, but are the same kind of failure.
TRANSIENT = (px.AMQPConnectionError, AMQPConnectorException, AMQPConnectionWorkflowFailed, px.ConnectionWrongStateError,
             px.ChannelWrongStateError, ConnectionError, OSError)
DEFAULT_CONNECT_TIMEOUT_S = 10.0  # a broker never reached fails within this (one line, exit 1)
_MIN_ATTEMPT_S = 1.0  # an attempt near the deadline still gets this long (a live broker answers in ms)
_RESOLVE_TIMEOUT_S = 10.0  # name resolution, once connected (pika's has no limit at all)

# pika reports every failed connection attempt at ERROR; fedbus says what happened in
# one line of its own. ``protocol.logs`` re-enables pika's logging at --log-level debug.
if logging.getLogger("pika").level == logging.NOTSET:
    logging.getLogger("pika").setLevel(logging.CRITICAL + 1)


def build_ssl_context(*, ca: str | None = None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """A client TLS context that verifies the broker against ``ca`` (system CAs if None)
    and presents ``cert``/``key`` when given (mutual TLS)."""
    return ssl_context({k: v for k, v in (("ca", ca), ("cert", cert), ("key", key)) if v})


def check_no_password_in_clear(node: Endpoint) -> None:
    """Refuse a password that plain ``amqp://`` would carry in clear beyond this machine
    (AMQP's PLAIN login sends it as is): the network is an attacker (docs/threat-model.md §7)."""
    if node.scheme == "amqp" and not node.external and urlsplit(node.url).password and not is_loopback(node.host):
        raise BrokerRefused(
            f"refusing to send broker user {node.user!r}'s password in clear to {node.where}: plain amqp:// is "
            "allowed with a password only on this machine; use amqps:// (TLS, verified with the federation CA)")


def node_parameters(node: Endpoint, *, heartbeat: int, blocked_connection_timeout: float, connection_name: str | None,
                    connect_timeout_s: float) -> pika.ConnectionParameters:
    check_no_password_in_clear(node)
    params = pika.URLParameters(node.url)
    params.heartbeat = heartbeat
    params.blocked_connection_timeout = blocked_connection_timeout
    params.connection_attempts = 1
    params.socket_timeout = min(10.0, connect_timeout_s)
    params.stack_timeout = min(15.0, connect_timeout_s)
    if connection_name:
        params.client_properties = {"connection_name": connection_name}
    if node.scheme == "amqps":
        params.ssl_options = pika.SSLOptions(ssl_context(node.tls), server_hostname=node.host)
    if node.external:
        params.credentials = pika.credentials.ExternalCredentials()
    return params


def connection_parameters(
    url: str,
    *,
    tls: dict[str, str] | None = None,
    heartbeat: int = 30,
    blocked_connection_timeout: float = 60.0,
    connection_name: str | None = None,
) -> tuple[pika.ConnectionParameters, str]:
    """pika parameters and the user name for the first node of ``url`` (see
    ``protocol.transport.endpoints`` for the URL forms)."""
    eps = parse_endpoints(url, tls=tls)
    return node_parameters(eps.nodes[0], heartbeat=heartbeat, blocked_connection_timeout=blocked_connection_timeout,
                           connection_name=connection_name, connect_timeout_s=DEFAULT_CONNECT_TIMEOUT_S), eps.user


def _ssl_error(exc: BaseException) -> BaseException | None:
    """The ssl.SSLError (or TLS alert text) somewhere inside a pika connection error."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen or e is None:
            continue
        seen.add(id(e))
        if isinstance(e, ssl.SSLError):
            return e
        if isinstance(e, BaseException):
            todo.extend([e.__cause__, e.__context__, *[a for a in e.args if isinstance(a, BaseException)]])
            for a in e.args:
                if isinstance(a, (list, tuple)):
                    todo.extend(x for x in a if isinstance(x, BaseException))
    return None


def _tls_refusal(exc: BaseException, node: Endpoint) -> str | None:
    """A one-line cause if ``exc`` is a TLS failure (verification or a broker alert)."""
    if node.scheme != "amqps":
        return None
    err = _ssl_error(exc)
    text = f"{err!r} {getattr(err, 'verify_message', '')}" if err is not None else repr(exc)
    return tls_cause(text, node)  # unnamed TLS errors (a node dying mid-handshake) stay transient


def refusal_of(exc: BaseException) -> tuple[int, str] | None:
    """(code, text) if ``exc`` is a refusal that retrying cannot fix, else None."""
    if isinstance(exc, (px.AuthenticationError, px.ProbableAuthenticationError)):
        return 403, f"login refused (bad user name or password): {exc}"
    if isinstance(exc, px.ProbableAccessDeniedError):
        return 403, f"access to the virtual host refused: {exc}"
    if isinstance(exc, (px.ChannelClosedByBroker, px.ConnectionClosedByBroker)):
        text = str(exc.reply_text)
        if exc.reply_code == 406 and "acknowledgement" in text and "timed out" in text:
            # consumer_timeout: a handler held a delivery too long. Not a refusal: reconnect,
            # the broker redelivers it. (Raise the broker's consumer_timeout for long tasks.)
            log.warning("broker closed the channel: delivery held longer than its consumer_timeout", detail=text)
            return None
        if exc.reply_code == 404 and "down or inaccessible" in text:
            # A clustered queue whose node is down (it cancelled our consumer): it comes
            # back with its node, or its quorum elects a leader. Retry, do not stop.
            log.warning("queue's node is down; retrying", detail=text)
            return None
        if exc.reply_code in _REFUSAL_CODES:
            return exc.reply_code, text
    return None


def permission_error(
    code: int, text: str, *, user: str, what: str, cls: type[BusPermissionError] = BusPermissionError,
    external: bool = False,
) -> BusPermissionError:
    hint = {
        403: "The broker user lacks this permission: re-run `fedbus broker provision` or use the right user.",
        404: "It does not exist: declare the topology first (`fedbus broker provision`, or the coordinator).",
        406: "It conflicts with what exists (e.g. a queue declared with other arguments such as the quorum "
        "flag, or a message over max_message_size): delete it or declare it the same way.",
    }.get(code, "")
    if external and code == 403:
        hint = (f"We logged in by certificate as {user!r} (its CN): if this process is not {user!r}, it presents "
                "another party's certificate; give it its own (`fedbus certs issue`).")
    name = _REFUSAL_CODES.get(code, str(code))
    return cls(f"broker refused {what} for user {user!r}: {name} ({code}) {text}. {hint}".rstrip())


def backoff(attempt: int, *, cap: float) -> float:
    """Capped exponential backoff with full jitter in [d/2, d]."""
    d = min(cap, 0.25 * 2 ** min(attempt, 16))
    return random.uniform(d / 2, d)


class Connector:
    """Opens connections to the broker's nodes in turn (failover) and fails fast on a
    broker that was never reached: after ``connect_timeout_s`` without any connection
    it raises :class:`BrokerUnreachable` (one line: what, where, the likely cause), and
    every later attempt raises the same at once. Once connected, losses are retried
    forever by the callers (a restarted broker or a failed-over node comes back)."""

    def __init__(self, endpoints: Endpoints, params: list[pika.ConnectionParameters], *, connect_timeout_s: float) -> None:
        self.endpoints = endpoints
        self.params = params
        self.connect_timeout_s = connect_timeout_s
        self.connected = threading.Event()  # some connection of this bus succeeded once
        self.unreachable: BrokerUnreachable | None = None
        self._first_try: float | None = None
        self._lock = threading.Lock()
        self._preferred = 0  # the node that last worked: tried first

    def remaining(self) -> float | None:
        """Seconds left before a never-connected bus gives up (None once connected)."""
        if self.connected.is_set():
            return None
        with self._lock:
            if self._first_try is None:
                self._first_try = time.monotonic()
            return self.connect_timeout_s - (time.monotonic() - self._first_try)

    def open(self, what: str) -> tuple[pika.BlockingConnection, int]:
        """A connection to the first node that answers (from the last good one); raises
        the refusal, :class:`BrokerUnreachable`, or the last transient error."""
        if self.unreachable is not None and not self.connected.is_set():
            raise self.unreachable
        self.remaining()
        n = len(self.params)
        last: BaseException | None = None
        for i in range(n):
            idx = (self._preferred + i) % n
            node = self.endpoints.nodes[idx]
            left = self.remaining()
            if left is not None and left <= 0 and last is not None:
                break  # the budget is spent: the next node would only add to it
            try:
                conn = self._attempt(idx, left, what)
            except Exception as e:  # noqa: BLE001 - classified below
                refused = self.refused_at_door(e, node, what)
                if refused is not None:
                    raise refused from e
                if not isinstance(e, TRANSIENT):
                    raise
                last = e
                if n > 1:
                    log.info("broker node unavailable; trying the next", node=node.where, error=repr(e))
                continue
            if idx != self._preferred or not self.connected.is_set():
                log.info("connected to broker node", node=node.where, nodes=n)
            self._preferred = idx
            self.connected.set()
            return conn, idx
        left = self.remaining()
        if left is not None and left <= 0:
            self.unreachable = BrokerUnreachable(_unreachable_text(self, last))
            raise self.unreachable from last
        assert last is not None
        raise last

    def refused_at_door(self, exc: BaseException, node: Endpoint, what: str) -> BrokerRefused | None:
        """A refusal of the connection itself (login, vhost, TLS), named plainly."""
        how = "certificate" if node.external else "password"
        if isinstance(exc, (px.AuthenticationError, px.ProbableAuthenticationError)):
            hint = (f"the broker has no user {self.endpoints.user!r} for this certificate's CN, or EXTERNAL login is not enabled "
                    "(rabbitmq_auth_mechanism_ssl, auth_mechanisms.1 = EXTERNAL)" if node.external
                    else "wrong user name or password: use the credentials `fedbus broker provision` wrote")
            return BrokerRefused(f"login refused by the broker at {node.where} for user {self.endpoints.user!r} ({how}): {hint}")
        if isinstance(exc, px.ProbableAccessDeniedError):
            return BrokerRefused(f"broker at {node.where} refused user {self.endpoints.user!r} access to virtual host "
                                 f"{node.vhost!r}: grant it with `fedbus broker provision`")
        cause = _tls_refusal(exc, node)
        if cause is not None:
            return BrokerRefused(f"TLS connection to {node.where} refused ({what}): {cause}")
        return None

    def _attempt(self, idx: int, left: float | None, what: str) -> pika.BlockingConnection:
        """One node: each of its addresses in turn, within ``left`` seconds (if not None)."""
        node, base = self.endpoints.nodes[idx], self.params[idx]
        deadline = None if left is None else time.monotonic() + max(_MIN_ATTEMPT_S, left)

        def within(limit: float) -> float:
            return limit if deadline is None else min(limit, max(_MIN_ATTEMPT_S, deadline - time.monotonic()))

        last: BaseException | None = None
        for addr in resolve(node.host, node.port, timeout_s=within(_RESOLVE_TIMEOUT_S)):
            p = copy.copy(base)
            p.host = addr  # resolved here, within the budget; TLS still checks node.host (server_hostname)
            p.socket_timeout = within(base.socket_timeout or _RESOLVE_TIMEOUT_S)
            p.stack_timeout = within(base.stack_timeout or _RESOLVE_TIMEOUT_S)
            try:
                return pika.BlockingConnection(p)
            except Exception as e:  # noqa: BLE001 - a refusal or a non-connection error is the caller's
                if not isinstance(e, TRANSIENT) or self.refused_at_door(e, node, what) is not None:
                    raise
                last = e
                if deadline is not None and time.monotonic() >= deadline:
                    break
        assert last is not None  # resolve() returns at least one address or raises
        raise last

    def cap_delay(self, delay: float) -> float:
        left = self.remaining()
        return delay if left is None else max(0.0, min(delay, left))


def _unreachable_text(connector: Connector, err: BaseException | None) -> str:
    text = repr(err).lower()
    if "refused" in text:
        cause = "connection refused: nothing listens there. Is RabbitMQ running, and is the port right (5672 amqp, 5671 amqps)?"
    elif "gaierror" in text or "name or service not known" in text or "nodename nor servname" in text:
        cause = "the host name does not resolve: check the host in the broker URL"
    elif "resolving" in text:
        cause = "the host name did not resolve in time: is DNS reachable from here? (or use the broker's address)"
    elif "stacktimeout" in text:
        cause = ("something accepted the connection but never completed the AMQP handshake: a wrong port, a proxy "
                 "or firewall in the way, or a broker too overloaded to answer")
    elif "timed out" in text or "timeout" in text:
        cause = "no answer: a firewall dropping the traffic, or a wrong address"
    elif "incompatibleprotocol" in text or "streamlost" in text or "eof" in text:
        cause = "something answered but not as an AMQP broker: wrong port, or amqp:// on a TLS port (use amqps://)"
    else:
        cause = f"{type(err).__name__}: {err}" if err else "no node answered"
    eps = connector.endpoints
    return (f"cannot reach the RabbitMQ broker at {eps.where} (user {eps.user!r}) within "
            f"{connector.connect_timeout_s:.0f} s: {cause}")



def resolve(host: str, port: int, *, timeout_s: float) -> list[str]:
    """The addresses of ``host`` (resolver order, no duplicates) within ``timeout_s``.

    pika resolves names without any time limit, so a resolver that never answers would
    hold a never-connected bus past its connect timeout; here the lookup runs on a
    daemon thread that is abandoned (it ends with the resolver's own timeout) if late.
    """
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    box: dict[str, Any] = {}
    done = threading.Event()

    def lookup() -> None:
        try:
            box["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        except OSError as e:
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=lookup, name=f"fedbus-resolve:{host}", daemon=True).start()
    if not done.wait(timeout_s):
        raise TimeoutError(f"resolving {host!r} took longer than {timeout_s:.1f} s")
    if "error" in box:
        raise box["error"]
    addrs: list[str] = []
    for *_, sockaddr in box["infos"]:
        if sockaddr[0] not in addrs:
            addrs.append(str(sockaddr[0]))
    if not addrs:
        raise socket.gaierror(f"{host!r} resolves to no address")
    return addrs


def reach(url: str, *, tls: dict[str, str] | None = None, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
          reconnect_max_s: float = 10.0) -> None:
    """Open one connection to the broker and close it, before a process's start-up work.

    A site imports torch and warms up before it first connects; on a loaded host that
    alone outlasts the connect timeout, so an absent broker would be reported late by a
    margin that grows with the load. Called first, this bounds the failure by
    ``connect_timeout_s`` (:class:`BrokerUnreachable`, one line); refusals (login, TLS,
    vhost) come out at once as :class:`BrokerRefused`. ``memory://``: nothing to reach.
    """
    if urlsplit(url.split(",")[0].strip()).scheme.lower() not in ("amqp", "amqps"):
        return
    eps = parse_endpoints(url, tls=tls)
    params = [node_parameters(n, heartbeat=0, blocked_connection_timeout=60.0, connection_name="fedbus start-up check",
                              connect_timeout_s=connect_timeout_s) for n in eps.nodes]
    connector = Connector(eps, params, connect_timeout_s=connect_timeout_s)
    what = "checking the broker before starting"
    for attempt in itertools.count():
        try:
            conn, _ = connector.open(what)
        except (BrokerRefused, BrokerUnreachable):
            raise
        except TRANSIENT as e:
            delay = connector.cap_delay(backoff(attempt, cap=reconnect_max_s))
            log.info("broker connection problem; reconnecting", what=what, error=repr(e), retry_in_s=round(delay, 2))
            threading.Event().wait(delay)  # a signal handler (SIGTERM at start-up) still runs at once
            continue
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - we only wanted to know it answers
            pass
        return
