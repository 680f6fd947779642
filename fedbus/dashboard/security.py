"""Who may read the dashboard, and what makes a state-changing request acceptable.

* Bound to localhost without a token: only requests whose ``Host`` is a loopback name
  are served (a page on another site cannot reach us through DNS rebinding).
* With a token (required beyond localhost): every request carries it as
  ``Authorization: Bearer T``, the ``fedbus_token`` cookie (HttpOnly, SameSite=Strict)
  or, once, ``?token=T`` on a page (which sets the cookie); otherwise 401.
* Every POST carries the per-server CSRF token in ``X-Fedbus-CSRF`` (the pages read it
  from a ``<meta>`` tag that another origin cannot read) and, where the browser sends
  one, an ``Origin`` equal to our own; otherwise 403. Actions on runs further need
  ``--allow-actions`` (403 without).
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
COOKIE = "fedbus_token"
CSRF_HEADER = "x-fedbus-csrf"
MIN_TOKEN_CHARS = 16


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


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


@dataclass
class Access:
    """The server's access rules (fixed when it starts)."""

    token: str | None
    allow_actions: bool
    loopback_only: bool
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    def token_ok(self, given: str | None) -> bool:
        return self.token is None or (given is not None and hmac.compare_digest(given.encode(), self.token.encode()))


def _host_name(request: Request) -> str:
    host = request.headers.get("host", "")
    return urlsplit(f"//{host}").hostname or ""


class AccessMiddleware(BaseHTTPMiddleware):
    def __init__(self, app, access: Access) -> None:
        super().__init__(app)
        self.access = access

    async def dispatch(self, request: Request, call_next) -> Response:
        a = self.access
        if a.loopback_only and a.token is None and not is_loopback(_host_name(request)):
            return JSONResponse({"error": "this dashboard answers only on localhost"}, status_code=403)
        if a.token is not None:
            auth = request.headers.get("authorization", "")
            bearer = auth[7:].strip() if auth.lower().startswith("bearer ") else None
            query = request.query_params.get("token")
            if query is not None and request.method == "GET" and a.token_ok(query):
                target = request.url.remove_query_params("token")
                resp = RedirectResponse(str(target.path) + (f"?{target.query}" if target.query else ""), status_code=303)
                resp.set_cookie(COOKIE, a.token, httponly=True, samesite="strict", path="/")
                return resp
            if not (a.token_ok(bearer) or a.token_ok(request.cookies.get(COOKIE))):
                return JSONResponse(
                    {"error": "a token is required: open the URL that `fedbus coordinator serve` printed "
                              "(…?token=…) or send 'Authorization: Bearer TOKEN'"},
                    status_code=401, headers={"WWW-Authenticate": "Bearer"},
                )
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            problem = self._csrf_problem(request)
            if problem:
                return JSONResponse({"error": problem}, status_code=403)
        return await call_next(request)

    def _csrf_problem(self, request: Request) -> str | None:
        given = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(given.encode(), self.access.csrf.encode()):
            return "missing or wrong X-Fedbus-CSRF header: use the buttons on the dashboard's pages"
        origin = request.headers.get("origin")
        if origin is not None:
            o = urlsplit(origin)
            if o.netloc != request.headers.get("host", ""):
                return f"cross-origin request from {origin} refused"
        if request.headers.get("sec-fetch-site") not in (None, "same-origin", "none"):
            return "cross-site request refused"
        return None
