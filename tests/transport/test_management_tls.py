"""Provisioning never sends the broker admin credential (or a new password) in clear beyond
this machine, and speaks HTTPS to the management API verified with the federation CA.

The network is played by this test: ``broker.example`` is made to resolve to a listener on
127.0.0.1 (``socket.getaddrinfo`` is patched, and every lookup of the name is recorded), so a
credential sent "to the broker" would land here. The refusal is decided on the name alone,
before any lookup or connection. The HTTPS management API here is a stand-in (Python ``ssl``,
certificates from ``fedbus certs``) that records what reaches it; the real RabbitMQ
management listener with TLS is ``tests/transport/test_tls_broker.py::test_provision_over_the_real_management_api_with_tls``.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from typer.testing import CliRunner

from protocol.transport import certificates
from protocol.transport.provision import (
    ProvisionError,
    _Admin,
    _Management,
    check_management_url,
    management_api,
    provision,
)

REMOTE = "broker.example"


class Listener:
    """A TCP listener on 127.0.0.1 that records every connection and the bytes sent on it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    self.received.append(conn.recv(65536))
                except OSError:
                    self.received.append(b"")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Listener, list[str]]]:
    """``broker.example`` resolves to our listener; every lookup of it is recorded."""
    listener = Listener()
    lookups: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *a: Any, **kw: Any) -> Any:
        if isinstance(host, str) and host.endswith(REMOTE.split(".", 1)[1]):
            lookups.append(f"{host}:{port}")
            return real("127.0.0.1", port, *a, **kw)
        return real(host, port, *a, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield listener, lookups
    listener.close()


def test_plain_http_with_credentials_to_another_host_is_refused_before_any_connection(network) -> None:
    listener, lookups = network
    p = listener.port
    admin = f"amqp://admin:s3cret-admin@{REMOTE}:{p}/%2F"
    # Explicit plain URL, the amqp:// default (http://HOST:15672), and look-alike names.
    for url in (f"http://{REMOTE}:{p}", None, f"http://127.evil.example:{p}", f"http://localhost.evil.example:{p}"):
        with pytest.raises(ProvisionError, match="refusing to send the broker admin credentials in clear"):
            provision(admin, sites=["site-1"], management_url=url)
        with pytest.raises(ProvisionError, match="in clear"):
            _Admin.choose(admin, method="management", management_url=url)
    with pytest.raises(ProvisionError, match="in clear"):
        _Management(f"http://{REMOTE}:{p}", "admin", "s3cret-admin")
    assert lookups == [] and listener.received == []  # nothing resolved, nothing connected, nothing sent
    # Credentials never ride in the management URL itself either.
    with pytest.raises(ProvisionError, match="no credentials in it"):
        check_management_url(f"https://admin:pw@{REMOTE}:15671")
    # Just inside: plain HTTP to this machine (the broker host itself) is allowed.
    for ok in ("http://localhost:15672", "http://127.0.0.1:15672", "http://[::1]:15672", "https://broker.example:15671"):
        check_management_url(ok)


def test_cli_refuses_plain_http_beyond_loopback_in_one_line(network, tmp_path: Path) -> None:
    from fedbus.cli import app

    listener, lookups = network
    p = listener.port
    r = CliRunner().invoke(app, ["broker", "provision", "--broker", f"amqp://admin:s3cret@{REMOTE}:{p}/%2F",
                                 "--site", "s1", "--management-url", f"http://{REMOTE}:{p}"])
    assert r.exit_code == 2 and "in clear" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    r = CliRunner().invoke(app, ["broker", "provision", "--broker", f"amqp://admin:s3cret@{REMOTE}:{p}/%2F",
                                 "--site", "s1"])  # the default for amqp:// is plain http://HOST:15672
    assert r.exit_code == 2 and "in clear" in r.output, r.output
    project = tmp_path / "project.toml"
    project.write_text(f'[federation]\nname = "fed"\nbroker = "amqp://{REMOTE}:{p}/%2F"\n'
                       f'admin = "amqp://admin:s3cret@{REMOTE}:{p}/%2F"\n[[sites]]\nid = "s1"\n')
    r = CliRunner().invoke(app, ["provision", str(project), "--out", str(tmp_path / "kits")])
    assert r.exit_code == 2 and "in clear" in r.stderr, r.output
    assert not (tmp_path / "kits").exists()  # refused before a kit was written
    assert lookups == [] and listener.received == []


def test_an_amqps_broker_means_https_management() -> None:
    assert management_api("amqps://admin:pw@broker.example:5671/fed") == "https://broker.example:15671"
    assert management_api("amqp://admin:pw@broker.example/") == "http://broker.example:15672"
    assert management_api("amqps://a:b@h/", "https://mgmt.example:8443/") == "https://mgmt.example:8443"


# -- the management API over HTTPS, verified with the federation CA ------------------------------


class _Api(BaseHTTPRequestHandler):
    calls: ClassVar[list[tuple[str, str, str]]] = []
    redirect_to: ClassVar[str | None] = None

    def _reply(self, code: int, body: bytes = b"{}", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _record(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        self.calls.append((self.command, self.path, self.headers.get("Authorization", "")))

    def do_GET(self) -> None:
        self._record()
        if self.redirect_to:
            self._reply(302, headers={"Location": self.redirect_to})
        elif self.path == "/api/overview":
            self._reply(200)
        elif self.path == "/api/users":
            self._reply(200, json.dumps([{"name": "guest"}]).encode())
        else:
            self._reply(404)

    def do_PUT(self) -> None:
        self._record()
        self._reply(201)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("mgmt-pki")
    certificates.make_ca(d, federation="mgmt-test")
    certificates.issue(d, "broker", server_names=["localhost"])
    other = d / "other"
    certificates.make_ca(other, federation="someone-else")
    return {"ca": d / "ca.pem", "cert": d / "broker.pem", "key": d / "broker.key", "other_ca": other / "ca.pem"}


@pytest.fixture
def https_api(pki: dict[str, Path]) -> Iterator[int]:
    _Api.calls, _Api.redirect_to = [], None
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki["cert"], pki["key"])
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_management_over_https_verified_with_the_federation_ca(https_api: int, pki: dict[str, Path]) -> None:
    port = https_api
    broker = f"amqps://admin:s3cret@localhost:5671/%2F?ca_certs={pki['ca']}"
    admin = _Admin.choose(broker, method="management", management_url=f"https://localhost:{port}")
    assert admin.name == "management" and admin.users() == {"guest"}
    admin.put_user("site-1", "new-password", existed=False)
    assert [c[:2] for c in _Api.calls] == [("GET", "/api/overview"), ("GET", "/api/users"), ("PUT", "/api/users/site-1")]
    assert all(auth.startswith("Basic ") for *_, auth in _Api.calls)
    _Api.calls.clear()
    # Another CA (an impostor, or the wrong file), given explicitly or in the URL: refused, not
    # a silent fall-back to rabbitmqctl, and nothing reached the HTTP layer.
    for url, ca in ((broker, str(pki["other_ca"])), (f"amqps://admin:s3cret@localhost/?ca_certs={pki['other_ca']}", None),
                    ("amqps://admin:s3cret@localhost/", None)):  # system CAs do not know ours
        with pytest.raises(ProvisionError, match="did not prove it is our broker"):
            _Admin.choose(url, method="auto", management_url=f"https://localhost:{port}", ca=ca)
    # The right CA but a name the certificate does not carry.
    with pytest.raises(ProvisionError, match="did not prove it is our broker.*(?i:mismatch)"):
        _Admin.choose(broker, method="management", management_url=f"https://127.0.0.1:{port}")
    assert _Api.calls == []


def test_a_redirect_is_never_followed_with_the_credentials(network, https_api: int, pki: dict[str, Path]) -> None:
    listener, lookups = network
    _Api.redirect_to = f"http://{REMOTE}:{listener.port}/api/overview"
    with pytest.raises(ProvisionError, match="redirected"):
        _Admin.choose(f"amqps://admin:s3cret@localhost/?ca_certs={pki['ca']}", method="auto",
                      management_url=f"https://localhost:{https_api}")
    assert len(_Api.calls) == 1 and lookups == [] and listener.received == []
