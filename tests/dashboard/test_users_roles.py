"""Named users with roles: the users file (argon2), sign-in sessions, and each role's allowed and
refused actions at the edge (a viewer gets 403 on every action; each action is logged with its user)."""

from __future__ import annotations

import json
import shutil

import pytest
from fastapi.testclient import TestClient

from fedbus.dashboard.app import create_app
from fedbus.dashboard.security import SESSION_COOKIE, Access
from fedbus.dashboard.users import MIN_PASSWORD, ROLES, UsersFile
from tests.dashboard.conftest import fedbus

PASSWORD = "p" * MIN_PASSWORD  # just long enough


@pytest.fixture()
def fresh(sim_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(sim_out, out)
    # other tests act on the shared simulation (as 'local', the token's user): start this one's log empty
    (out / "coordinator" / "dashboard-actions.jsonl").unlink(missing_ok=True)
    return out / "coordinator"


@pytest.fixture()
def users(tmp_path) -> UsersFile:
    f = UsersFile(tmp_path / "users.json")
    for role in ROLES:
        f.add(f"{role}-1", role, PASSWORD + role)
    return f


def signed_in(state, users: UsersFile, name: str | None, *, token: str | None = None) -> TestClient:
    access = Access(token=token, allow_actions=True, loopback_only=True, users=users)
    c = TestClient(create_app(state, access=access), base_url="http://127.0.0.1")
    if name is not None:
        r = c.post("/login", data={"user": name, "password": PASSWORD + name.split("-")[0]}, follow_redirects=False)
        assert r.status_code == 303 and SESSION_COOKIE in r.cookies, r.text
    return c


def _h(c: TestClient) -> dict[str, str]:
    return {"X-Fedbus-CSRF": c.app.state.access.csrf}


def test_users_cli_edges(tmp_path):
    f = tmp_path / "u.json"

    def users(*args: str, password: str | None = None):
        import os
        import subprocess
        import sys

        from tests.dashboard.conftest import ROOT

        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return subprocess.run([sys.executable, "-m", "fedbus.cli", "coordinator", "users", *args, "--file", str(f)],
                              input=(password + "\n") if password is not None else "", capture_output=True, text=True,
                              env=env, timeout=60)

    short = users("add", "ada", "--role", "approver", "--password-stdin", password="x" * (MIN_PASSWORD - 1))
    assert short.returncode == 2 and len(short.stderr.strip().splitlines()) == 1 and "12 to" in short.stderr
    assert not f.exists()
    ok = users("add", "ada", "--role", "approver", "--password-stdin", password="x" * MIN_PASSWORD)
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(f.read_text())
    assert doc["users"]["ada"]["role"] == "approver" and doc["users"]["ada"]["hash"].startswith("$argon2id$")
    assert "x" * MIN_PASSWORD not in f.read_text() and (f.stat().st_mode & 0o777) == 0o600
    for args, word in ((("add", "ada", "--role", "viewer"), "exists"), (("add", "eve", "--role", "root"), "role"),
                       (("add", "Eve", "--role", "viewer"), "user name"), (("remove", "nobody"), "no user"),
                       (("passwd", "nobody"), "no user")):
        bad = users(*args, "--password-stdin", password="y" * MIN_PASSWORD) if args[0] != "remove" else users(*args)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and word in bad.stderr, (args, bad.stderr)
        assert "Traceback" not in bad.stderr
    assert users("passwd", "ada", "--password-stdin", password="z" * MIN_PASSWORD).returncode == 0
    assert UsersFile(f).verify("ada", "z" * MIN_PASSWORD).role == "approver"
    assert UsersFile(f).verify("ada", "x" * MIN_PASSWORD) is None
    assert users("remove", "ada").returncode == 0 and UsersFile(f).load() == {}


def test_sign_in_needs_the_right_password(fresh, users):
    c = signed_in(fresh, users, None)
    assert c.get("/api/runs").status_code == 401
    assert c.get("/runs", headers={"accept": "text/html"}, follow_redirects=False).headers["location"] == "/login"
    login = c.get("/login")
    assert 'name="user"' in login.text and 'name="password"' in login.text and 'name="token"' not in login.text
    wrong = c.post("/login", data={"user": "viewer-1", "password": PASSWORD + "viewe"}, follow_redirects=False)
    assert wrong.status_code == 401 and SESSION_COOKIE not in wrong.cookies
    assert c.post("/login", data={"user": "nobody", "password": PASSWORD}, follow_redirects=False).status_code == 401
    assert c.get("/api/runs").status_code == 401
    ok = c.post("/login", data={"user": "viewer-1", "password": PASSWORD + "viewer"}, follow_redirects=False)
    assert ok.status_code == 303
    cookie = ok.headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    assert c.get("/api/runs").status_code == 200
    assert c.get("/api/session").json()["user"] == "viewer-1"
    c.post("/logout", headers=_h(c), follow_redirects=False)
    assert c.get("/api/runs").status_code == 401  # the session ended server-side too


def test_a_sign_in_form_from_another_origin_is_refused(fresh, users):
    c = signed_in(fresh, users, None)
    r = c.post("/login", data={"user": "admin-1", "password": PASSWORD + "admin"}, headers={"origin": "http://evil.example"},
               follow_redirects=False)
    assert r.status_code == 403 and SESSION_COOKIE not in r.cookies


ACTIONS = {  # action -> (method path, body) that reaches the action itself once allowed
    "stop": ("/api/runs/{run}/stop", {}),
    "approve": ("/api/runs/{run}/approve", {"who": "someone else", "name": "heart-mlp"}),
    "start": ("/api/runs/start", {"experiment": "absent.json"}),
}


@pytest.mark.parametrize("role", ROLES)
def test_each_role_may_do_exactly_its_actions(fresh, users, run_ids, role):
    from fedbus.dashboard.users import ALLOWED

    c = signed_in(fresh, users, f"{role}-1")
    for action, (path, doc) in ACTIONS.items():
        r = c.post(path.format(run=run_ids[0]), json=doc, headers=_h(c))
        if role in ALLOWED[action]:
            assert r.status_code != 403, (role, action, r.text)
        else:
            assert r.status_code == 403 and f"is a {role}" in r.json()["detail"], (role, action, r.text)
    log = [json.loads(x) for x in (fresh / "dashboard-actions.jsonl").read_text().splitlines()]
    assert {x["action"] for x in log} == set(ACTIONS) and all(x["user"] == f"{role}-1" for x in log)
    assert all((x["outcome"] == "refused") == (role not in ALLOWED[x["action"]]) for x in log if x["status"] == 403)


def test_the_approval_names_the_signed_in_approver_not_the_form(fresh, users, run_ids):
    c = signed_in(fresh, users, "approver-1")
    r = c.post(f"/api/runs/{run_ids[0]}/approve", json={"who": "Dr. Somebody Else"}, headers=_h(c))
    assert r.status_code == 200, r.text
    assert r.json()["record"]["approved_by"] == "approver-1"
    code = fedbus("coordinator", "audit", run_ids[0], "--state", str(fresh), "--json", check=False, timeout=120)
    assert code.returncode == 0, code.stderr


def test_a_viewer_gets_403_on_every_action_even_read_write(fresh, users, run_ids):
    c = signed_in(fresh, users, "viewer-1")
    for path, doc in ACTIONS.values():
        assert c.post(path.format(run=run_ids[0]), json=doc, headers=_h(c)).status_code == 403
    assert not (fresh / "approvals").exists()
    assert c.post(f"/api/runs/{run_ids[0]}/audit", headers=_h(c)).status_code == 200  # a check, not an action


def test_the_token_stays_the_machine_option(fresh, users, run_ids):
    token = "t" * 32
    c = signed_in(fresh, users, None, token=token)
    auth = {"Authorization": f"Bearer {token}", **_h(c)}
    assert c.get("/api/runs").status_code == 401
    assert c.get("/api/session", headers=auth).json()["role"] == "admin"
    r = c.post(f"/api/runs/{run_ids[0]}/approve", json={"who": "ops-robot"}, headers=auth)
    assert r.status_code == 200 and r.json()["record"]["approved_by"] == "ops-robot"
    assert c.get("/api/runs", headers={"Authorization": "Bearer " + "t" * 31 + "u"}).status_code == 401
