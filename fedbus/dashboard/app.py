"""The FastAPI application: one HTML page and one JSON twin (``/api/...``) per view, plus actions.

Pages are small HTML shells; ``static/dashboard.js`` fills them from the JSON twin and,
on a live run, asks ``/api/runs/{id}/rounds?after=N`` for new rounds every couple of
seconds (one indexed SQLite read), so curves grow round by round without a reload.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from fedbus.dashboard import action_log, views
from fedbus.dashboard.actions import ActionError, Actions
from fedbus.dashboard.data import NoSuchRun, StateReader
from fedbus.dashboard.dead_letters import dead_letters_doc
from fedbus.dashboard.pages import PAGES, render
from fedbus.dashboard.security import LOCAL, Access, AccessMiddleware
from fedbus.dashboard.users import ALLOWED, User

STATIC = Path(__file__).parent / "static"
MAX_COMPARE = 4


def create_app(state_dir: str | Path, *, access: Access, key: Path | None = None, broker: str | None = None,
               federation: str | None = None, poll_s: float = 2.0, simulate_out: Path | None = None,
               mlflow: str | None = None) -> FastAPI:
    """The dashboard over ``state_dir``; ``access`` fixes token, actions and CSRF (see security.py);
    ``mlflow``: a tracking URI that "Mark valid" registers into and started runs log to."""
    state = Path(state_dir)
    reader = StateReader(state)
    actions = Actions(state, key=key, broker=broker, federation=federation, simulate_out=simulate_out, mlflow=mlflow)
    app = FastAPI(title="fedbus dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(AccessMiddleware, access=access)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.state.access, app.state.actions, app.state.reader = access, actions, reader

    def session(user: User = LOCAL) -> dict[str, Any]:
        return {"actions_allowed": access.allow_actions, "token_required": access.token is not None,
                "broker": bool(broker) or actions.simulate_out is not None, "can_sign": bool(actions.key_candidates()),
                "poll_s": poll_s, "state_dir": str(state), "user": user.name, "role": user.role,
                "named_users": access.users is not None, "mlflow": mlflow,
                "may": {a: access.allow_actions and user.may(a) for a in ALLOWED}}

    def user_of(request: Request) -> User:
        return getattr(request.state, "user", LOCAL)

    def page(name: str, request: Request) -> HTMLResponse:
        resp = HTMLResponse(render(name, csrf=access.csrf, session=session(user_of(request))))
        resp.headers["Content-Security-Policy"] = ("default-src 'self'; script-src 'self'; style-src 'self'; "
                                                   "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'")
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["Referrer-Policy"] = "no-referrer"
        return resp

    def run_or_404(fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except NoSuchRun as e:
            raise HTTPException(404, f"no run {e.args[0]!r} in {state}") from None

    def allowed(request: Request, action: str, target: str | None) -> User:
        """The user, when they may ``action`` here; else 403 (logged, as every action is)."""
        user = user_of(request)
        why = None
        if not access.allow_actions:
            why = "this dashboard is read-only: start `fedbus coordinator serve` with --allow-actions"
        elif not user.may(action):
            why = (f"{user.name} is a {user.role}; to {action} needs the role "
                   f"{' or '.join(sorted(ALLOWED[action]))} (`fedbus coordinator users passwd NAME --role ROLE`)")
        if why:
            action_log.record(state, user=user.name, role=user.role, action=action, target=target, status=403, detail=why)
            raise HTTPException(403, why)
        return user

    async def body(request: Request) -> dict[str, Any]:
        try:
            doc = json.loads(await request.body() or b"{}")
        except ValueError:
            raise HTTPException(400, "the request body must be JSON") from None
        if not isinstance(doc, dict):
            raise HTTPException(400, "the request body must be a JSON object")
        return doc

    def acted(fn, *args, log: tuple[User, str, str | None] | None = None, **kw) -> JSONResponse:
        try:
            doc, status = fn(*args, **kw), 200
        except ActionError as e:
            doc, status = {"error": str(e)}, e.status
        if log is not None:
            user, action, target = log
            action_log.record(state, user=user.name, role=user.role, action=action, target=target, status=status,
                              detail=doc.get("error") if status >= 400 else None)
        return JSONResponse(doc, status_code=status)

    app.state.allowed, app.state.acted, app.state.user_of, app.state.page = allowed, acted, user_of, page
    from fedbus.dashboard import workbench

    workbench.register(app, state, reader)  # designer, registry, model cards

    # -- pages -------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index() -> RedirectResponse:
        return RedirectResponse("/runs", status_code=307)

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    for name, route in PAGES.items():
        app.add_api_route(route, _page_route(page, name), methods=["GET"], response_class=HTMLResponse)

    @app.get("/cohort", response_class=HTMLResponse)
    def cohort_page(request: Request, id: str | None = Query(None, max_length=128)) -> HTMLResponse:
        from fedbus.dashboard.cohort import render_cohort
        from fedbus.dashboard.pages import _NAV

        here = ' class="here"'
        nav = "".join(f'<a href="{href}"{here if key == "cohort" else ""}>{label}</a>' for key, href, label in _NAV)
        resp = HTMLResponse(render_cohort(state, cohort_id=id, nav=nav, footer=f"Read from {state}"))
        for k, v in page("cohort", request).headers.items():  # the same security headers as every page
            if k.lower() in ("content-security-policy", "x-frame-options", "referrer-policy"):
                resp.headers[k] = v
        return resp

    @app.get("/api/cohort")
    def api_cohort(id: str | None = Query(None, max_length=128)) -> dict[str, Any]:
        from fedbus.dashboard.cohort import cohort_doc

        return cohort_doc(state, id)

    @app.get("/runs/{run_id}", response_class=HTMLResponse)
    def run_page(run_id: str, request: Request) -> HTMLResponse:
        return page("run", request)

    # -- JSON twins --------------------------------------------------------------
    @app.get("/api/session")
    def api_session(request: Request) -> dict[str, Any]:
        return session(user_of(request))

    @app.get("/api/sites")
    def api_sites() -> dict[str, Any]:
        return views.sites_doc(reader)

    @app.get("/api/runs")
    def api_runs(status: str | None = Query(None, pattern="^(running|completed|failed|stopped)$")) -> dict[str, Any]:
        return views.runs_doc(reader, status=status)

    @app.get("/api/runs/{run_id}")
    def api_run(run_id: str) -> dict[str, Any]:
        doc = run_or_404(views.run_doc, reader, run_id)
        doc["approvals"] = actions.approvals(run_id)
        doc["audit"] = actions.last_audit(run_id)
        base = f"/api/runs/{run_id}/export"
        doc["exports"] = {"experiment": f"{base}/experiment.json", "model": f"{base}/model.safetensors",
                          "csv": f"{base}/metrics.csv"}
        return doc

    @app.get("/api/runs/{run_id}/rounds")
    def api_rounds(run_id: str, after: int = Query(0, ge=0)) -> dict[str, Any]:
        return run_or_404(views.rounds_doc, reader, run_id, after=after)

    @app.get("/api/compare")
    def api_compare(runs: str = Query(..., description="run ids, comma-separated")) -> dict[str, Any]:
        ids = [r for r in (x.strip() for x in runs.split(",")) if r]
        if not 2 <= len(ids) <= MAX_COMPARE:
            raise HTTPException(400, f"compare needs 2 to {MAX_COMPARE} run ids: /compare?runs=A,B")
        return run_or_404(views.compare_doc, reader, ids)

    @app.get("/api/dead-letters")
    def api_dead_letters() -> dict[str, Any]:
        fed = federation or next(iter(reader.federations()[-1:]), None)
        return dead_letters_doc(broker, fed)

    @app.get("/api/experiments")
    def api_experiments() -> dict[str, Any]:
        return {"experiments": actions.experiments(), "folder": str(state / "experiments")}

    # -- exports -----------------------------------------------------------------
    @app.get("/api/runs/{run_id}/export/experiment.json")
    def export_experiment(run_id: str) -> Response:
        run = run_or_404(reader.run, run_id)
        as_run = json.loads(json.dumps(run["experiment"]))
        as_run.setdefault("training", {})["rounds"] = run["rounds_planned"]
        as_run.setdefault("metadata", {}).update({"fedbus_run_id": run_id, "fedbus_status": run["status"]})
        return Response(json.dumps(as_run, indent=4), media_type="application/json",
                        headers={"Content-Disposition": f'attachment; filename="{run_id}.experiment.json"'})

    @app.get("/api/runs/{run_id}/export/model.safetensors")
    def export_model(run_id: str) -> FileResponse:
        run_or_404(reader.run, run_id)
        ck = reader.checkpoint(run_id)
        if ck is None or not ck[0].exists():
            raise HTTPException(404, f"run {run_id} has no checkpoint yet")
        return FileResponse(ck[0], media_type="application/octet-stream", filename=f"{run_id}.round-{ck[2]}.safetensors",
                            headers={"X-Checkpoint-Sha256": ck[1]})

    @app.get("/api/runs/{run_id}/export/metrics.csv")
    def export_csv(run_id: str) -> Response:
        from coordinator.results import _metrics_csv

        run_or_404(reader.run, run_id)
        with tempfile.TemporaryDirectory() as tmp:
            text = _metrics_csv(reader.rounds(run_id), Path(tmp) / "metrics.csv").read_text()
        return Response(text, media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{run_id}.metrics.csv"'})

    # -- audit and actions -------------------------------------------------------
    @app.post("/api/runs/{run_id}/audit")
    def api_audit(run_id: str) -> JSONResponse:
        return acted(actions.audit, run_id)

    def named(user: User, doc: dict[str, Any], default: str) -> str:
        """Who acts: a signed-in person's own name; the token or a local operator may say who they are."""
        if access.users is not None and user.name not in (LOCAL.name, "token"):
            return user.name
        return str(doc.get("who") or default)[:200]

    @app.post("/api/runs/{run_id}/stop")
    async def api_stop(run_id: str, request: Request) -> JSONResponse:
        user = allowed(request, "stop", run_id)
        doc = await body(request)
        return acted(actions.stop, run_id, who=named(user, doc, "dashboard user"), log=(user, "stop", run_id))

    @app.post("/api/runs/{run_id}/approve")
    async def api_approve(run_id: str, request: Request) -> JSONResponse:
        user = allowed(request, "approve", run_id)
        doc = await body(request)
        return acted(actions.approve, run_id, who=named(user, doc, ""), note=str(doc.get("note") or ""),
                     model_name=str(doc.get("name") or "") or None, log=(user, "approve", run_id))

    @app.post("/api/runs/start")
    async def api_start(request: Request) -> JSONResponse:
        doc = await body(request)
        name = str(doc.get("experiment") or "")
        user = allowed(request, "start", name)
        return acted(actions.start, name, log=(user, "start", name))

    @app.get("/api/actions")
    def api_actions() -> dict[str, Any]:
        return {"actions": action_log.read(state)}

    return app


def _page_route(page, name: str):
    def route(request: Request) -> HTMLResponse:
        return page(name, request)

    return route
