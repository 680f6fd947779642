"""Who may do what: read-only refuses every action (403), a token and TLS are needed beyond
localhost (401 / refused to start), the token never travels in a URL, foreign and look-alike
Host headers are refused, and state-changing requests need the page's CSRF token and our own
origin."""

from __future__ import annotations

import socket
import ssl

import httpx
import pytest

from fedbus.dashboard.security import is_loopback
from fedbus.dashboard.server import BackgroundServer, ServeError, ServeOptions, url_of
from tests.dashboard.conftest import fedbus
from tests.dashboard.test_api import client

ACTIONS = [("stop", {"who": "x"}), ("approve", {"who": "Dr. A"})]


def test_read_only_server_refuses_every_action(state, run_ids):
    api = client(state)
    h = {"X-Fedbus-CSRF": api.app.state.access.csrf}
    for action, body in ACTIONS:
        r = api.post(f"/api/runs/{run_ids[0]}/{action}", json=body, headers=h)
        assert r.status_code == 403 and "--allow-actions" in r.json()["detail"], action
    assert api.post("/api/runs/start", json={"experiment": "a.json"}, headers=h).status_code == 403
    assert not (state / "approvals").exists()


def test_posts_need_the_csrf_token_and_our_origin(state, run_ids):
    api = client(state, allow_actions=True)
    csrf = api.app.state.access.csrf
    url = f"/api/runs/{run_ids[0]}/approve"
    assert api.post(url, json={"who": "x"}).status_code == 403
    assert api.post(url, json={"who": "x"}, headers={"X-Fedbus-CSRF": "guess"}).status_code == 403
    evil = {"X-Fedbus-CSRF": csrf, "Origin": "http://evil.example"}
    assert api.post(url, json={"who": "x"}, headers=evil).status_code == 403
    assert api.post(url, json={"who": "x"}, headers={"X-Fedbus-CSRF": csrf, "Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert not (state / "approvals").exists()


# Names that a page's DNS can point at 127.0.0.1 (rebinding): none of them is this machine.
LOOK_ALIKES = ["127.evil.example", "localhost.evil.example", "[::1].evil", "127.0.0.1.nip.io", "attacker.example",
               "localhost.", "localhostx", "128.0.0.1", "[::2]", "0.0.0.0", "127.0.0.1.", ""]
LOOPBACK_HOSTS = ["localhost", "localhost:8765", "LocalHost", "127.0.0.1", "127.0.0.1:8765", "127.255.255.254",
                  "[::1]", "[::1]:8765"]


@pytest.fixture(scope="module")
def empty_state(tmp_path_factory):
    """A coordinator state directory with nothing in it yet: enough for who-may-connect tests
    (no simulated runs to wait for)."""
    return tmp_path_factory.mktemp("empty-state")


def test_look_alike_host_names_are_not_loopback():
    for host in LOOK_ALIKES:
        assert not is_loopback(host), host
    for host in LOOPBACK_HOSTS:
        assert is_loopback(host), host
    assert is_loopback("::1") and not is_loopback("::2")  # bind addresses come without brackets


def test_localhost_server_refuses_foreign_and_look_alike_host_headers(empty_state):
    api = client(empty_state)
    for host in LOOK_ALIKES:
        r = api.get("/api/runs", headers={"Host": host})
        assert r.status_code == 403 and "only on localhost" in r.json()["error"], host
    for host in LOOPBACK_HOSTS:
        assert api.get("/api/runs", headers={"Host": host}).status_code == 200, host


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A federation CA (`fedbus certs`) and a server certificate for localhost and 127.0.0.1."""
    from protocol.transport import certificates

    d = tmp_path_factory.mktemp("dash-tls")
    certificates.make_ca(d, federation="dash-test")
    certificates.issue(d, "dashboard", server_names=["localhost", "127.0.0.1"])
    token = "t0ken-" + "x" * 20
    (d / "token").write_text(token + "\n")
    return {"dir": d, "ca": d / "ca.pem", "cert": d / "dashboard.pem", "key": d / "dashboard.key", "token": token,
            "token_file": d / "token"}


def test_beyond_localhost_needs_tls_and_a_token(empty_state, tls_files):
    state = empty_state
    t = tls_files
    with pytest.raises(ServeError, match="--tls-cert"):  # a token alone: it would cross the network in clear
        BackgroundServer(ServeOptions(state=state, host="0.0.0.0", port=0, token_file=t["token_file"]))
    with pytest.raises(ServeError, match="--token"):  # TLS alone: anyone could read it
        BackgroundServer(ServeOptions(state=state, host="0.0.0.0", port=0, tls_cert=t["cert"], tls_key=t["key"]))
    with pytest.raises(ServeError, match="go together"):
        BackgroundServer(ServeOptions(state=state, host="127.0.0.1", port=0, tls_cert=t["cert"]))
    with pytest.raises(ServeError, match="cannot load"):  # a key that is not the certificate's
        BackgroundServer(ServeOptions(state=state, host="127.0.0.1", port=0, tls_cert=t["cert"], tls_key=t["dir"] / "ca.key"))
    srv = BackgroundServer(ServeOptions(state=state, host="0.0.0.0", port=0, token_file=t["token_file"],
                                        tls_cert=t["cert"], tls_key=t["key"]))
    printed = url_of("0.0.0.0", 8765, srv.access)  # what `coordinator serve` prints
    assert printed == "https://0.0.0.0:8765/login" and t["token"] not in printed


def test_dashboard_over_tls_signs_in_by_post_and_never_takes_the_token_from_a_url(empty_state, tls_files):
    state = empty_state
    t, token = tls_files, tls_files["token"]
    srv = BackgroundServer(ServeOptions(state=state, host="0.0.0.0", port=0, token_file=t["token_file"],
                                        tls_cert=t["cert"], tls_key=t["key"])).start()
    base = f"https://localhost:{srv.port}"
    ours = ssl.create_default_context(cafile=str(t["ca"]))
    try:
        # A real handshake, verified against the federation CA (certificate and host name).
        with socket.create_connection(("localhost", srv.port), timeout=10) as raw:
            with ours.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
                assert dict(x[0] for x in tls.getpeercert()["subject"])["commonName"] == "dashboard"
        # Plain HTTP to that port gets no page; another CA does not verify it.
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{srv.port}/api/runs", timeout=10)
        with pytest.raises(httpx.ConnectError, match="(?i)certificate verify failed"):
            httpx.get(base + "/api/runs", verify=ssl.create_default_context(), timeout=10)

        with httpx.Client(base_url=base, verify=ours, timeout=10) as c:
            for path in ("/api/runs", "/api/sites", "/runs", "/static/dashboard.js"):
                assert c.get(path).status_code == 401, path
            assert c.get("/api/runs", headers={"Authorization": "Bearer wrong" + "x" * 20}).status_code == 401
            assert c.get("/api/runs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
            # The token in a URL is refused even when right, and sets nothing.
            for path in (f"/runs?token={token}", f"/api/runs?token={token}", f"/login?token={token}"):
                r = c.get(path, follow_redirects=False)
                assert r.status_code == 401 and "set-cookie" not in r.headers and "never accepted in a URL" in r.text, path
            assert not c.cookies
            # A browser opening a page is sent to the sign-in form.
            r = c.get("/runs", headers={"Accept": "text/html"}, follow_redirects=False)
            assert r.status_code == 303 and r.headers["location"] == "/login"
            form = c.get("/login")
            assert form.status_code == 200 and 'method="post"' in form.text and token not in form.text
            assert c.get("/static/style.css").status_code == 200  # what the form needs, nothing else
            # Wrong token, or right token from another origin: no cookie.
            r = c.post("/login", data={"token": token + "x"}, follow_redirects=False)
            assert r.status_code == 401 and "set-cookie" not in r.headers
            r = c.post("/login", data={"token": token}, headers={"Origin": "https://evil.example"}, follow_redirects=False)
            assert r.status_code == 403 and "set-cookie" not in r.headers
            assert c.get("/api/runs").status_code == 401
            r = c.post("/login", data={"token": token}, headers={"Origin": base},
                       follow_redirects=False)
            assert r.status_code == 303 and r.headers["location"] == "/runs"
            cookie = r.headers["set-cookie"].lower()
            assert all(flag in cookie for flag in ("httponly", "samesite=strict", "secure")), cookie
            assert c.get("/api/runs").status_code == 200 and c.get("/runs").status_code == 200
    finally:
        srv.stop()


def test_serve_cli_refuses_bad_options(empty_state, tmp_path, tls_files):
    state = empty_state
    r = fedbus("coordinator", "serve", "--state", str(state), "--host", "0.0.0.0", check=False, timeout=60)
    assert r.returncode == 2 and "--tls-cert" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = fedbus("coordinator", "serve", "--state", str(state), "--host", "0.0.0.0", "--token", str(tls_files["token_file"]),
               check=False, timeout=60)
    assert r.returncode == 2 and "--tls-cert" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = fedbus("coordinator", "serve", "--state", str(state), "--host", "0.0.0.0", "--tls-cert", str(tls_files["cert"]),
               check=False, timeout=60)
    assert r.returncode == 2 and "go together" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    (tmp_path / "short").write_text("abc")
    r = fedbus("coordinator", "serve", "--state", str(state), "--token", str(tmp_path / "short"), check=False, timeout=60)
    assert r.returncode == 2 and "16 characters" in r.stderr
