"""Broker URLs: the one place a user, a password or a login method is put into one.

``amqp://user:pass@host:port/vhost?query``, percent-quoted, and IPv6-safe: a literal IPv6
host keeps its brackets (``amqp://site-a:pw@[::1]:5672/``). Before this module five copies
added a password and four of them dropped the brackets, so ``[::1]`` became ``::1`` and the
URL no longer parsed. A setting may name several nodes of a cluster, comma-separated; every
function here takes such a setting and treats each node alike.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from urllib.parse import quote, unquote, urlencode, urlsplit, urlunsplit

SCHEMES = ("amqp", "amqps")


class BrokerURLError(ValueError):
    """A broker URL that cannot be used as asked; the message names the URL (password redacted)."""


@dataclass(frozen=True)
class BrokerURL:
    """One node's URL, parsed. ``user`` and ``password`` are plain text (unquoted)."""

    scheme: str
    host: str  # without brackets, also for IPv6
    port: int | None = None
    user: str | None = None
    password: str | None = None
    path: str = "/"  # as written (quoted): "/%2F" is the vhost "/"
    query: str = ""

    @classmethod
    def parse(cls, url: str) -> BrokerURL:
        """One node's URL; ``BrokerURLError`` for a bad scheme or port."""
        try:
            p = urlsplit(url.strip())
            port = p.port
        except ValueError as e:  # "Port out of range", bad IPv6 literal
            raise BrokerURLError(f"broker URL {redact(url)!r}: {e}") from None
        scheme = p.scheme.lower()
        if scheme not in SCHEMES:
            raise BrokerURLError(f"broker URL {redact(url)!r} is not amqp:// or amqps://")
        return cls(scheme=scheme, host=p.hostname or "localhost", port=port,
                   user=unquote(p.username) if p.username else None,
                   password=unquote(p.password) if p.password is not None else None,
                   path=p.path or "/", query=p.query)

    @property
    def vhost(self) -> str:
        return unquote(self.path[1:]) if len(self.path) > 1 else "/"

    @property
    def netloc_host(self) -> str:
        """``host[:port]`` as it goes in a URL (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host + (f":{self.port}" if self.port else "")

    def with_user(self, user: str, password: str | None = None) -> BrokerURL:
        return replace(self, user=user, password=password)

    def with_password(self, password: str) -> BrokerURL:
        """The same user with ``password``; refused when the URL names no user."""
        if not self.user:
            raise BrokerURLError(f"broker URL {self.redacted()!r} names no user to go with the password; "
                                 "write it as amqp://USER@host:5672/vhost")
        return replace(self, password=password)

    def with_certificate(self, *, ca: str, cert: str, key: str) -> BrokerURL:
        """Certificate login (EXTERNAL): no user or password, the TLS files in the query."""
        if self.scheme != "amqps":
            raise BrokerURLError(f"certificate login needs amqps://, got {self.redacted()!r}")
        q = urlencode({"auth": "external", "ca_certs": ca, "certfile": cert, "keyfile": key})
        return replace(self, user=None, password=None, query=q)

    def _text(self, password: str | None) -> str:
        cred = ""
        if self.user:
            cred = quote(self.user, safe="")
            if password is not None:
                cred += ":" + password
            cred += "@"
        return urlunsplit((self.scheme, cred + self.netloc_host, self.path, self.query, ""))

    def __str__(self) -> str:
        return self._text(None if self.password is None else quote(self.password, safe=""))

    def redacted(self) -> str:
        return self._text(None if self.password is None else "***")


def split_nodes(url: str) -> list[str]:
    """The node URLs of a broker setting (comma-separated; blanks dropped)."""
    return [u.strip() for u in url.split(",") if u.strip()]


def with_password(url: str, password: str) -> str:
    """Every node of ``url`` with ``password`` for its user (a kit's broker.password)."""
    return ",".join(str(BrokerURL.parse(u).with_password(password)) for u in _nodes(url))


def with_user(url: str, user: str, password: str | None = None) -> str:
    """Every node of ``url`` as ``user`` (with ``password``, or none: it lives in a file)."""
    return ",".join(str(BrokerURL.parse(u).with_user(user, password)) for u in _nodes(url))


def with_certificate(url: str, *, ca: str, cert: str, key: str) -> str:
    """Every node of ``url`` logging in by client certificate."""
    return ",".join(str(BrokerURL.parse(u).with_certificate(ca=ca, cert=cert, key=key)) for u in _nodes(url))


def redact(url: str) -> str:
    """``url`` safe to print or log: every node's password replaced by ``***``.

    Never raises: text that does not parse as a URL is returned with anything between
    ``:`` and ``@`` hidden, so an error message about a bad URL cannot leak its password.
    """
    out = []
    for u in url.split(","):
        u = u.strip()
        try:
            p = urlsplit(u)
            p.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            at = u.rfind("@")
            out.append(u if at < 0 else u[: u.find("//") + 2 if "//" in u else 0] + "***" + u[at:])
            continue
        if p.password is None:
            out.append(u)
            continue
        host = f"[{p.hostname}]" if p.hostname and ":" in p.hostname else (p.hostname or "")
        netloc = f"{p.username}:***@{host}" + (f":{p.port}" if p.port else "")
        out.append(urlunsplit((p.scheme, netloc, p.path, p.query, p.fragment)))
    return ",".join(out)


def _nodes(url: str) -> list[str]:
    nodes = split_nodes(url)
    if not nodes:
        raise BrokerURLError("broker URL is empty")
    return nodes
