"""Who may read the dashboard, and what makes a state-changing request acceptable.

* Bound to localhost without a token: only requests whose ``Host`` is a loopback name
  (``localhost`` exactly, or a loopback IP address) are served, so a page on another site
  cannot reach us through DNS rebinding (``127.attacker.example`` is someone's DNS name).
* With a token (required beyond localhost, where TLS is required too): every request
  carries it as ``Authorization: Bearer T`` or the ``fedbus_token`` cookie (HttpOnly,
  SameSite=Strict, Secure under TLS) that a ``POST /login`` form sets; otherwise 401
  (pages redirect to ``/login``). The token is never read from a URL: a URL ends up in
  logs, proxies, browser history and Referer headers, so ``?token=`` is refused (401).
* With a users file (``serve --users FILE``, fedbus/dashboard/users.py): people sign in at
  ``/login`` with a name and password; the server keeps the session (a random id in the
  ``fedbus_session`` cookie, HttpOnly, SameSite=Strict, Secure under TLS, 12 h) and each
  request knows its ``User`` (``request.state.user``), whose role decides each action (403).
  The token, when given too, stays the machine-to-machine option (it acts as ``admin``).
* Every POST carries the per-server CSRF token in ``X-Fedbus-CSRF`` (the pages read it
  from a ``<meta>`` tag that another origin cannot read) and, where the browser sends
  one, an ``Origin`` equal to our own; otherwise 403. Actions on runs further need
  ``--allow-actions`` (403 without). The login form, which cannot send a header, needs a
  same-origin request instead.
"""

from __future__ import annotations

import hmac
import html
import secrets
from dataclasses import dataclass, field
from pathlib import Path
import threading
import time
from urllib.parse import parse_qs, urlsplit

from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from fedbus.dashboard.users import TOKEN_USER, User, UsersError, UsersFile
from protocol.loopback import is_loopback

COOKIE = "fedbus_token"
SESSION_COOKIE = "fedbus_session"
SESSION_S = 12 * 3600.0
LOGIN = "/login"
LOGOUT = "/logout"
LOCAL = User("local", "admin")  # a localhost dashboard without token or users: as before, one operator
PUBLIC = {"/static/style.css"}  # what the login page needs before anyone has signed in
CSRF_HEADER = "x-fedbus-csrf"
MIN_TOKEN_CHARS = 16
MAX_LOGIN_BYTES = 4096  # a form with one token field


class TokenFileError(ValueError):
    """The token file is missing, unreadable or too short; the message says how to make one."""


def read_token(path: Path) -> str:
    hint = f"create one with: python -c 'import secrets; print(secrets.token_urlsafe(32))' > {path}"
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise TokenFileError(f"--token {path}: cannot read it ({e.strerror}); {hint}") from None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise TokenFileError(f"--token {path}: a token is one line of at least {MIN_TOKEN_CHARS} characters; {hint}")
    return token


@dataclass
class Access:
    """The server's access rules (fixed when it starts)."""

    token: str | None
    allow_actions: bool
    loopback_only: bool
    tls: bool = False  # served over HTTPS: the cookie is marked Secure
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    users: UsersFile | None = None  # named users with roles (``serve --users FILE``)
    _sessions: dict[str, tuple[User, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def sign_in_required(self) -> bool:
        return self.token is not None or self.users is not None

    def token_ok(self, given: str | None) -> bool:
        if self.token is None:
            return self.users is None
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def open_session(self, user: User) -> str:
        sid = secrets.token_urlsafe(32)
        with self._lock:
            now = time.time()
            self._sessions = {k: v for k, v in self._sessions.items() if v[1] > now}
            self._sessions[sid] = (user, now + SESSION_S)
        return sid

    def session_user(self, sid: str | None) -> User | None:
        if not sid:
            return None
        with self._lock:
            got = self._sessions.get(sid)
        if got is None or got[1] <= time.time():
            return None
        return got[0]

    def close_session(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)


class AccessMiddleware(BaseHTTPMiddleware):
    def __init__(self, app, access: Access) -> None:
        super().__init__(app)
        self.access = access

    async def dispatch(self, request: Request, call_next) -> Response:
        a = self.access
        if a.loopback_only and a.token is None and not is_loopback(request.headers.get("host", "")):
            return JSONResponse({"error": "this dashboard answers only on localhost"}, status_code=403)
        request.state.user = LOCAL
        if a.sign_in_required:
            if "token" in request.query_params:  # never honoured: it would sit in logs and histories
                return _unauthorized(request, "a token is never accepted in a URL (it ends up in logs, proxies "
                                              f"and browser history): sign in at {LOGIN} or send "
                                              "'Authorization: Bearer TOKEN'")
            if request.url.path == LOGIN:
                return await self._login(request)
            if request.url.path == LOGOUT and request.method == "POST":
                problem = self._origin_problem(request)
                if problem:
                    return JSONResponse({"error": problem}, status_code=403)
                resp = RedirectResponse(LOGIN, status_code=303)
                a.close_session(request.cookies.get(SESSION_COOKIE))
                resp.delete_cookie(SESSION_COOKIE, path="/")
                resp.delete_cookie(COOKIE, path="/")
                return resp
            user = self._signed_in(request)
            if request.url.path not in PUBLIC and user is None:
                return _unauthorized(request, f"sign in first: at {LOGIN} with your name and password (or the token "
                                              "from the file given to `fedbus coordinator serve --token`), or send "
                                              "'Authorization: Bearer TOKEN'")
            request.state.user = user
        elif request.url.path == LOGIN:
            return RedirectResponse("/runs", status_code=303)  # nothing to sign in to
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            problem = self._csrf_problem(request)
            if problem:
                return JSONResponse({"error": problem}, status_code=403)
        return await call_next(request)

    def _signed_in(self, request: Request) -> User | None:
        """The user a request acts as: a session's, or ``token`` (admin) with the machine token."""
        a = self.access
        user = a.session_user(request.cookies.get(SESSION_COOKIE))
        if user is not None:
            return user
        if a.token is None:
            return None
        auth = request.headers.get("authorization", "")
        bearer = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        if a.token_ok(bearer) or a.token_ok(request.cookies.get(COOKIE)):
            return User(TOKEN_USER, "admin")
        return None

    async def _login(self, request: Request) -> Response:
        """GET: the sign-in form. POST (same origin only): a name and password (users file) or the
        token from the form body; right, a 303 to /runs with the session cookie; wrong, the form again with 401."""
        a = self.access
        if request.method != "POST":
            return login_page(users=a.users is not None, token=a.token is not None)
        problem = self._origin_problem(request)
        if problem:
            return JSONResponse({"error": problem}, status_code=403)
        raw = await request.body()
        form = parse_qs(raw.decode("utf-8", "replace")) if len(raw) <= MAX_LOGIN_BYTES else {}
        given = form.get("token", [None])[0]
        name, password = form.get("user", [None])[0], form.get("password", [None])[0]
        resp = RedirectResponse("/runs", status_code=303)
        if a.users is not None and name is not None and password is not None:
            try:
                user = a.users.verify(name.strip(), password)
            except UsersError:
                user = None
            if user is None:
                return login_page("wrong name or password", status=401, users=True, token=a.token is not None)
            resp.set_cookie(SESSION_COOKIE, a.open_session(user), httponly=True, samesite="strict", path="/",
                            secure=a.tls, max_age=int(SESSION_S))
            return resp
        if a.token is None or given is None or not a.token_ok(given.strip()):
            return login_page("wrong token", status=401, users=a.users is not None, token=a.token is not None)
        resp.set_cookie(COOKIE, a.token, httponly=True, samesite="strict", path="/", secure=a.tls)
        return resp

    def _csrf_problem(self, request: Request) -> str | None:
        given = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(given.encode(), self.access.csrf.encode()):
            return "missing or wrong X-Fedbus-CSRF header: use the buttons on the dashboard's pages"
        return self._origin_problem(request)

    @staticmethod
    def _origin_problem(request: Request) -> str | None:
        origin = request.headers.get("origin")
        if origin is not None:
            o = urlsplit(origin)
            if o.netloc != request.headers.get("host", ""):
                return f"cross-origin request from {origin} refused"
        if request.headers.get("sec-fetch-site") not in (None, "same-origin", "none"):
            return "cross-site request refused"
        return None


def _unauthorized(request: Request, why: str) -> Response:
    """401 for the API and scripts; a page (a browser navigating) goes to the sign-in form."""
    if request.method == "GET" and not request.url.path.startswith("/api/") and "text/html" in request.headers.get("accept", ""):
        return RedirectResponse(LOGIN, status_code=303)
    return JSONResponse({"error": why}, status_code=401, headers={"WWW-Authenticate": "Bearer"})


def login_page(problem: str | None = None, *, status: int = 200, users: bool = False, token: bool = True) -> HTMLResponse:
    """The sign-in form(s): name and password (users file) and/or the token, in a POST body, never in a URL."""
    msg = f'<p class="msg bad" id="login-problem">{html.escape(problem)}</p>' if problem else ""
    named = f"""<form method="post" action="{LOGIN}" autocomplete="off" id="user-login">
<label>Name <input name="user" id="user" required size="24" autocomplete="username"></label>
<label>Password <input type="password" name="password" id="password" required size="24" autocomplete="current-password"></label>
<button class="primary" type="submit" id="sign-in-user">Sign in</button></form>""" if users else ""
    by_token = f"""<p class="sub">Paste the token from the file given to <code>fedbus coordinator serve --token</code>.</p>
<form method="post" action="{LOGIN}" autocomplete="off">
<input type="password" name="token" id="token" required minlength="{MIN_TOKEN_CHARS}" size="48">
<button class="primary" type="submit" id="sign-in">Sign in</button></form>""" if token else ""
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedbus · sign in</title>
<link rel="stylesheet" href="/static/style.css"></head>
<body><header><span class="brand">fedbus</span></header>
<main><h1>Sign in</h1>{msg}{named}{by_token}</main></body></html>
"""
    resp = HTMLResponse(body, status_code=status)
    resp.headers["Content-Security-Policy"] = ("default-src 'self'; style-src 'self'; form-action 'self'; "
                                               "frame-ancestors 'none'")
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["Referrer-Policy"] = "same-origin"  # no-referrer would make the form's Origin "null"
    return resp
