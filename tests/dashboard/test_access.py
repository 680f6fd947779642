"""Who may do what: read-only refuses every action (403), a token is needed beyond localhost
(401), and state-changing requests need the page's CSRF token and our own origin."""

from __future__ import annotations


import httpx
import pytest

from fedbus.dashboard.server import BackgroundServer, ServeError, ServeOptions
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


def test_localhost_server_refuses_foreign_host_headers(state):
    api = client(state)
    assert api.get("/api/runs", headers={"Host": "attacker.example"}).status_code == 403
    assert api.get("/api/runs", headers={"Host": "localhost:8765"}).status_code == 200


def test_token_is_required_beyond_localhost(state, tmp_path):
    token = "t0ken-" + "x" * 20
    (tmp_path / "token").write_text(token + "\n")
    with pytest.raises(ServeError, match="--token"):
        BackgroundServer(ServeOptions(state=state, host="0.0.0.0", port=0))
    srv = BackgroundServer(ServeOptions(state=state, host="0.0.0.0", port=0, token_file=tmp_path / "token")).start()
    try:
        base = f"http://127.0.0.1:{srv.port}"
        for path in ("/api/runs", "/api/sites", "/runs", "/static/dashboard.js"):
            assert httpx.get(base + path).status_code == 401, path
        assert httpx.get(base + "/api/runs", headers={"Authorization": "Bearer wrong" + "x" * 20}).status_code == 401
        assert httpx.get(base + "/api/runs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        with httpx.Client(base_url=base) as c:  # the printed URL's ?token= sets a SameSite=Strict cookie
            r = c.get(f"/runs?token={token}", follow_redirects=False)
            assert r.status_code == 303 and "samesite=strict" in r.headers["set-cookie"].lower()
            assert c.get("/api/runs").status_code == 200
    finally:
        srv.stop()


def test_serve_cli_refuses_bad_options(state, tmp_path):
    r = fedbus("coordinator", "serve", "--state", str(state), "--host", "0.0.0.0", check=False, timeout=60)
    assert r.returncode == 2 and "--token" in r.stderr
    (tmp_path / "short").write_text("abc")
    r = fedbus("coordinator", "serve", "--state", str(state), "--token", str(tmp_path / "short"), check=False, timeout=60)
    assert r.returncode == 2 and "16 characters" in r.stderr
