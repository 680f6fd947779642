"""Broker endpoints from a URL: several nodes, TLS files, certificate login (no pika here).

One broker setting names a whole (possibly clustered) broker, so it travels through
every config, CLI flag and kit unchanged:

    amqps://broker.example:5671/fed?auth=external&ca_certs=ca.pem&certfile=site.pem&keyfile=site.key
    amqp://u:p@10.0.0.1:5672/fed,amqp://u:p@10.0.0.2:5672/fed,amqp://u:p@10.0.0.3:5672/fed

* A comma separates the URLs of the nodes of one cluster; the bus fails over between
  them in order. Several URLs mean a cluster, so queues are declared as quorum queues.
* ``ca_certs`` / ``certfile`` / ``keyfile`` (or ``tls={"ca","cert","key"}``) name the TLS
  files; ``auth=external`` logs in by client certificate (SASL EXTERNAL) with no
  password, and the broker user is the certificate's CN.
* ``queue_type=quorum`` asks for quorum queues on a single URL too.
"""

from __future__ import annotations

import datetime as dt
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from protocol.broker_url import BrokerURLError, redact, with_certificate

_TLS_QUERY = {"ca_certs": "ca", "certfile": "cert", "keyfile": "key"}
TLS_KEYS = ("ca", "cert", "key", "auth")


class EndpointError(ValueError):
    """A broker URL or its TLS settings are wrong; the message names the setting."""


@dataclass(frozen=True)
class Endpoint:
    """One broker node: the URL pika gets (TLS query removed) and how to log in."""

    url: str  # cleaned: no TLS query parameters, no fedbus-only parameters
    scheme: str
    host: str
    port: int
    vhost: str
    user: str
    external: bool  # SASL EXTERNAL: log in by client certificate
    tls: dict[str, str]  # ca / cert / key paths (amqps only)

    @property
    def where(self) -> str:
        """host:port/vhost, for messages (never the password)."""
        return f"{self.host}:{self.port}" + ("" if self.vhost == "/" else f" vhost {self.vhost!r}")


@dataclass(frozen=True)
class Endpoints:
    nodes: tuple[Endpoint, ...]
    quorum: bool  # several nodes, or queue_type=quorum

    @property
    def user(self) -> str:
        return self.nodes[0].user

    @property
    def where(self) -> str:
        return ", ".join(n.where for n in self.nodes)


def split_urls(url: str) -> list[str]:
    """The node URLs of a broker setting (comma-separated)."""
    urls = [u.strip() for u in url.split(",") if u.strip()]
    if not urls:
        raise EndpointError("broker URL is empty")
    return urls


def parse_endpoints(url: str, *, tls: dict[str, str] | None = None) -> Endpoints:
    """Validate every node URL; all nodes must agree on user and login method."""
    nodes = [_parse_one(u, tls=tls) for u in split_urls(url)]
    if len({(n.user, n.external, n.vhost) for n in nodes}) > 1:
        raise EndpointError(f"the broker URLs {url!r} disagree on user, vhost or auth; every node of a cluster takes the same")
    quorum = len(nodes) > 1 or any("queue_type=quorum" in u for u in split_urls(url))
    return Endpoints(tuple(nodes), quorum)


def _parse_one(url: str, *, tls: dict[str, str] | None) -> Endpoint:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("amqp", "amqps"):
        raise EndpointError(f"not an AMQP URL: {redact(url)!r}; use amqp://user:pass@host:5672/vhost or amqps://...")
    query = dict(parse_qsl(parts.query))
    opts = {k: v for k, v in (tls or {}).items() if v is not None}
    for q, k in _TLS_QUERY.items():
        if q in query:
            opts.setdefault(k, query.pop(q))
    if "auth" in query:
        opts.setdefault("auth", query.pop("auth"))
    qtype = query.pop("queue_type", None)
    if qtype not in (None, "quorum", "classic"):
        raise EndpointError(f"queue_type={qtype!r} in the broker URL: use quorum or classic")
    unknown = set(opts) - set(TLS_KEYS)
    if unknown:
        raise EndpointError(f"tls: unknown option(s) {sorted(unknown)}; use ca, cert, key, auth")
    auth = opts.pop("auth", "plain").lower()
    if auth not in ("plain", "external"):
        raise EndpointError(f"auth={auth!r}: use 'plain' (user and password) or 'external' (client certificate)")
    if opts and scheme != "amqps":
        raise EndpointError(f"TLS options given for a plain {redact(url)!r}; use amqps://")
    if auth == "external":
        if scheme != "amqps" or not opts.get("cert"):
            raise EndpointError("auth=external logs in by client certificate: it needs amqps:// and a cert (certfile=) and key")
    if "key" in opts and "cert" not in opts:
        raise EndpointError("tls: 'key' given without 'cert'")
    host = parts.hostname or "localhost"
    port = parts.port or (5671 if scheme == "amqps" else 5672)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    if auth == "external":
        cn = certificate_cn(opts["cert"])
        if parts.username and unquote(parts.username) != cn:
            raise EndpointError(
                f"the broker URL names user {unquote(parts.username)!r} but the certificate {opts['cert']} is for "
                f"{cn!r}: with auth=external the broker user is the certificate's CN"
            )
        user = cn
    else:
        user = unquote(parts.username) if parts.username else "guest"
    clean = urlunsplit((scheme, parts.netloc, parts.path, urlencode(query), ""))
    return Endpoint(clean, scheme, host, port, vhost, user, auth == "external", opts)


def certificate_cn(cert_path: str | Path) -> str:
    """The subject CN of a PEM certificate (the broker user under EXTERNAL login)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    except (OSError, ValueError) as e:
        raise EndpointError(f"tls: cannot read certificate {cert_path}: {e}") from None
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns:
        raise EndpointError(f"tls: certificate {cert_path} has no CN; issue it with `fedbus certs issue NAME`")
    return str(cns[0].value)


def check_own_certificate(cert_path: str, *, now: dt.datetime | None = None) -> None:
    """Refuse to present a certificate that is expired or not valid yet (say so plainly)."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    now = now or dt.datetime.now(dt.timezone.utc)
    if now > cert.not_valid_after_utc:
        raise EndpointError(
            f"tls: our client certificate {cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
            "ask the federation operator for a new one (`fedbus certs issue`)"
        )
    if now < cert.not_valid_before_utc:
        raise EndpointError(
            f"tls: our client certificate {cert_path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
            "(check this machine's clock)"
        )


def ssl_context(tls: dict[str, str]) -> ssl.SSLContext:
    """A client context that verifies the broker (certificate and hostname) against ``ca``
    (system CAs if absent) and presents ``cert``/``key`` when given (mutual TLS)."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.get("ca"))
    except (OSError, ssl.SSLError) as e:
        raise EndpointError(f"tls: cannot load the CA file {tls.get('ca')}: {e}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.get("cert"):
        check_own_certificate(tls["cert"])
        try:
            ctx.load_cert_chain(certfile=tls["cert"], keyfile=tls.get("key"))
        except (OSError, ssl.SSLError) as e:
            raise EndpointError(
                f"tls: cannot load certificate {tls['cert']} with key {tls.get('key')}: {e} "
                "(does the key belong to the certificate?)"
            ) from None
    return ctx


_VERIFY_CAUSES = (
    ("certificate has expired", "the broker's certificate has expired: renew the broker's server certificate"),
    ("hostname mismatch", "the broker's certificate is not for host {host}: connect by the name in its certificate, or reissue it with that name"),
    ("ip address mismatch", "the broker's certificate is not for address {host}: connect by the name in its certificate, or reissue it"),
    ("unable to get local issuer", "the broker's certificate is not signed by our CA ({ca}): wrong CA file, or a broker impersonating ours"),
    ("self-signed certificate", "the broker's certificate is not signed by our CA ({ca}): wrong CA file, or a broker impersonating ours"),
    ("self signed certificate", "the broker's certificate is not signed by our CA ({ca}): wrong CA file, or a broker impersonating ours"),
    ("not yet valid", "the broker's certificate is not valid yet (check the clocks)"),
)
_ALERT_CAUSES = (
    ("alert unknown ca", "the broker does not trust our client certificate (issued by another CA)"),
    ("alert certificate expired", "the broker refused our client certificate: it has expired"),
    ("alert bad certificate", "the broker refused our client certificate"),
    ("alert certificate required", "the broker requires a client certificate: set certfile= and keyfile="),
    ("alert handshake failure", "TLS handshake refused by the broker (no common protocol/cipher, or no client certificate)"),
    ("wrong version number", "the port does not speak TLS (plain AMQP port? use 5671 or the broker's TLS port)"),
)


def tls_cause(text: str, node: Endpoint) -> str | None:
    """A plain-words cause for a TLS failure text, or None if it is not one we know."""
    low = text.lower()
    for needle, cause in (*_VERIFY_CAUSES, *_ALERT_CAUSES):
        if needle in low:
            return cause.format(host=node.host, ca=node.tls.get("ca") or "the system CAs")
    return None


def certificate_url(base: str, *, ca: str | Path, cert: str | Path, key: str | Path) -> str:
    """``base`` (amqps://host:port/vhost, one or several nodes) with certificate login:
    what a site's or the coordinator's ``broker_url`` holds under ``auth = "external"``."""
    try:
        return with_certificate(base, ca=str(ca), cert=str(cert), key=str(key))
    except BrokerURLError as e:
        raise EndpointError(str(e)) from None
