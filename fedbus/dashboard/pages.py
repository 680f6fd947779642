"""The HTML shells of the pages; ``static/dashboard.js`` fills each from its ``/api/`` twin.

No inline script (the pages send a strict Content-Security-Policy): the session facts
and the CSRF token travel in ``<meta>`` tags, which another origin cannot read.
"""

from __future__ import annotations

import html
import json
from typing import Any

PAGES = {"sites": "/sites", "runs": "/runs", "compare": "/compare", "dead-letters": "/dead-letters"}
OWN_SCRIPT = {"designer": "/static/designer.js", "models": "/static/models.js"}  # workbench.py's pages
_TITLES = {"sites": "Sites and privacy budgets", "runs": "Runs", "run": "Run", "compare": "Compare runs",
           "dead-letters": "Dead letters", "designer": "Model designer", "models": "Model registry"}
_NAV = [("runs", "/runs", "Runs"), ("sites", "/sites", "Sites"), ("compare", "/compare", "Compare"),
        ("dead-letters", "/dead-letters", "Dead letters"), ("cohort", "/cohort", "Cohort"),
        ("designer", "/designer", "Designer"), ("models", "/models", "Models")]


def render(name: str, *, csrf: str, session: dict[str, Any]) -> str:
    here = ' class="here"'
    nav = "".join(
        f'<a href="{href}"{here if name == key or (name == "run" and key == "runs") else ""}>{label}</a>'
        for key, href, label in _NAV
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="fedbus-csrf" content="{html.escape(csrf)}">
<meta name="fedbus-session" content="{html.escape(json.dumps(session))}">
<title>fedbus · {html.escape(_TITLES.get(name, name))}</title>
<link rel="stylesheet" href="/static/style.css">
</head>
<body data-page="{html.escape(name)}"{' data-own="1"' if name in OWN_SCRIPT else ""}>
<header><span class="brand">fedbus</span><nav>{nav}</nav><span id="live" class="live"></span>{_who(session)}</header>
<main id="app"><p class="muted">Loading…</p></main>
<footer>Read from the coordinator's state directory <code>{html.escape(str(session.get("state_dir", "")))}</code>
{" · actions enabled" if session.get("actions_allowed") else " · read-only"}</footer>
<script src="/static/chart.js"></script>
<script src="/static/dashboard.js"></script>{f'<script src="{OWN_SCRIPT[name]}"></script>' if name in OWN_SCRIPT else ""}
</body>
</html>
"""


def _who(session: dict[str, Any]) -> str:
    """Who is signed in, and the way out (a same-origin POST form: the session ends server-side)."""
    if not session.get("named_users"):
        return ""
    return (f'<span class="who" id="who" data-role="{html.escape(str(session.get("role")))}">'
            f'{html.escape(str(session.get("user")))} ({html.escape(str(session.get("role")))})</span>'
            '<form method="post" action="/logout" class="logout"><button id="sign-out" type="submit">Sign out</button></form>')
