"""Who may read the dashboard, and what makes a state-changing request acceptable.

* Bound to localhost without a token: only requests whose ``Host`` is a loopback name
  (``localhost`` exactly, or a loopback IP address) are served, so a page on another site
  cannot reach us through DNS rebinding (``127.attacker.example`` is someone's DNS name).
* With a token (required beyond localhost, where TLS is required too): every request
  carries it as ``Authorization: Bearer T`` or the ``fedbus_token`` cookie (HttpOnly,
  SameSite=Strict, Secure under TLS) that a ``POST /login`` form sets; otherwise 401
  (pages redirect to ``/login``). The token is never read from a URL: a URL ends up in
  logs, proxies, browser history and Referer headers, so ``?token=`` is refused (401).
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
from urllib.parse import parse_qs, urlsplit

from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from protocol.loopback import is_loopback

COOKIE = "fedbus_token"
LOGIN = "/login"
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

    def token_ok(self, given: str | None) -> bool:
        return self.token is None or (given is not None and hmac.compare_digest(given.encode(), self.token.encode()))


class AccessMiddleware(BaseHTTPMiddleware):
    def __init__(self, app, access: Access) -> None:
        super().__init__(app)
        self.access = access

    async def dispatch(self, request: Request, call_next) -> Response:
        a = self.access
        if a.loopback_only and a.token is None and not is_loopback(request.headers.get("host", "")):
            return JSONResponse({"error": "this dashboard answers only on localhost"}, status_code=403)
        if a.token is not None:
            if "token" in request.query_params:  # never honoured: it would sit in logs and histories
                return _unauthorized(request, "a token is never accepted in a URL (it ends up in logs, proxies "
                                              f"and browser history): sign in at {LOGIN} or send "
                                              "'Authorization: Bearer TOKEN'")
            if request.url.path == LOGIN:
                return await self._login(request)
            if request.url.path not in PUBLIC and not self._signed_in(request):
                return _unauthorized(request, f"a token is required: sign in at {LOGIN} with the token from the "
                                              "file given to `fedbus coordinator serve --token`, or send "
                                              "'Authorization: Bearer TOKEN'")
        elif request.url.path == LOGIN:
            return RedirectResponse("/runs", status_code=303)  # nothing to sign in to
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            problem = self._csrf_problem(request)
            if problem:
                return JSONResponse({"error": problem}, status_code=403)
        return await call_next(request)

    def _signed_in(self, request: Request) -> bool:
        auth = request.headers.get("authorization", "")
        bearer = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        return self.access.token_ok(bearer) or self.access.token_ok(request.cookies.get(COOKIE))

    async def _login(self, request: Request) -> Response:
        """GET: the sign-in form. POST (same origin only): the token from the form body;
        right, a 303 to /runs with the session cookie; wrong, the form again with 401."""
        if request.method != "POST":
            return login_page()
        problem = self._origin_problem(request)
        if problem:
            return JSONResponse({"error": problem}, status_code=403)
        raw = await request.body()
        given = parse_qs(raw.decode("utf-8", "replace")).get("token", [None])[0] if len(raw) <= MAX_LOGIN_BYTES else None
        if given is None or not self.access.token_ok(given.strip()):
            return login_page("wrong token", status=401)
        resp = RedirectResponse("/runs", status_code=303)
        resp.set_cookie(COOKIE, self.access.token or "", httponly=True, samesite="strict", path="/",
                        secure=self.access.tls)
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


def login_page(problem: str | None = None, *, status: int = 200) -> HTMLResponse:
    """The sign-in form: the token travels in a POST body, never in a URL."""
    msg = f'<p class="msg bad" id="login-problem">{html.escape(problem)}</p>' if problem else ""
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedbus · sign in</title>
<link rel="stylesheet" href="/static/style.css"></head>
<body><header><span class="brand">fedbus</span></header>
<main><h1>Sign in</h1>
<p class="sub">Paste the token from the file given to <code>fedbus coordinator serve --token</code>.</p>{msg}
<form method="post" action="{LOGIN}" autocomplete="off">
<input type="password" name="token" id="token" required minlength="{MIN_TOKEN_CHARS}" size="48">
<button class="primary" type="submit" id="sign-in">Sign in</button></form></main></body></html>
"""
    resp = HTMLResponse(body, status_code=status)
    resp.headers["Content-Security-Policy"] = ("default-src 'self'; style-src 'self'; form-action 'self'; "
                                               "frame-ancestors 'none'")
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["Referrer-Policy"] = "same-origin"  # no-referrer would make the form's Origin "null"
    return resp
