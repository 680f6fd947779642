"""The researcher's workbench routes: the model designer, the model registry and model cards.

Kept apart from app.py's run views; it uses app.py's ``allowed`` (role and read-only checks,
logged) and ``acted`` (the action log) so that every action here is checked and recorded
exactly as the others are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from fedbus.dashboard import action_log, designer
from fedbus.dashboard.actions import ActionError
from fedbus.dashboard.data import StateReader

CARD_CSP = "default-src 'self'; script-src 'none'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'"


def trail_targets(reader: StateReader, record: dict[str, Any]) -> set[str]:
    """What the action log names for this model's history: its run, and the experiment it was
    designed (its name) and started as (its file in STATE/experiments/)."""
    out = {record["run_id"]}
    try:
        exp = reader.run(record["run_id"])["experiment"]
    except LookupError:
        return out
    name = str((exp.get("basic_info") or {}).get("name") or "")
    if name:
        out.add(name)
        try:
            out.add(designer.file_name(exp))
        except designer.DesignError:
            pass
    return out


def register(app: FastAPI, state: Path, reader: StateReader) -> None:
    allowed, acted, page = app.state.allowed, app.state.acted, app.state.page

    async def body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > designer.MAX_DOC_BYTES + 1024:
            raise HTTPException(413, f"the request is larger than {designer.MAX_DOC_BYTES} bytes")
        try:
            doc = json.loads(raw or b"{}")
        except ValueError:
            raise HTTPException(400, "the request body must be JSON") from None
        if not isinstance(doc, dict):
            raise HTTPException(400, "the request body must be a JSON object")
        return doc

    @app.get("/designer", response_class=HTMLResponse)
    def designer_page(request: Request) -> HTMLResponse:
        return page("designer", request)

    @app.get("/models", response_class=HTMLResponse)
    def models_page(request: Request) -> HTMLResponse:
        return page("models", request)

    @app.get("/api/designer")
    def api_designer() -> dict[str, Any]:
        return {"palette": designer.palette(), "templates": designer.TEMPLATES, "catalogue": designer.catalogue(reader)}

    @app.get("/api/designer/template")
    def api_template(kind: str = Query(..., pattern="^(logistic|mlp|ecg_cnn)$"), dataset: str = Query(..., max_length=200),
                     features: str = Query("", max_length=20_000)) -> dict[str, Any]:
        cat = designer.catalogue(reader).get(dataset)
        if cat is None:
            raise HTTPException(404, f"no site offers a dataset {dataset!r}; see /sites")
        cols, left_out = ([c for c in features.split(",") if c], {}) if features else designer.template_features(cat)
        unknown = [c for c in cols if c not in cat["columns"]]
        if unknown:
            raise HTTPException(400, f"{dataset} has no column(s) {unknown}")
        rows = sum(n for n in cat["sites"].values() if isinstance(n, int)) or None
        return designer.template(kind, dataset=dataset, target=str(cat["target"]), features=cols, rows=rows, left_out=left_out)

    @app.post("/api/designer/check")
    async def api_check(request: Request) -> dict[str, Any]:
        return designer.check((await body(request)).get("experiment"), reader)

    @app.post("/api/designer/save")
    async def api_save(request: Request) -> JSONResponse:
        doc = await body(request)
        exp = doc.get("experiment")
        target = str(((exp or {}).get("basic_info") or {}).get("name") or "")[:100] if isinstance(exp, dict) else None
        user = allowed(request, "design", target)

        def save() -> dict[str, Any]:
            try:
                return designer.save(state, exp, reader, overwrite=bool(doc.get("overwrite")))
            except designer.DesignError as e:
                raise ActionError(str(e), e.status) from None

        return acted(save, log=(user, "design", target))

    @app.get("/api/models")
    def api_models() -> dict[str, Any]:
        from coordinator.model_card import card_inputs
        from coordinator.model_registry import entries

        out = []
        for signed in entries(state):
            rec = signed["record"]
            out.append({**{k: rec[k] for k in ("name", "version", "run_id", "approved_by", "approved_at_utc",
                                                "checkpoint_sha256", "dataset")},
                        "accuracy": (rec["metrics"]["overall"].get("accuracy") or {}),
                        "epsilon": rec["privacy"].get("epsilon"),
                        "verified": card_inputs(reader, state, signed)["verified"],
                        "card": f"/models/{rec['name']}/v{rec['version']}", "card_md": f"/models/{rec['name']}/v{rec['version']}.md"})
        return {"models": out}

    def card(name: str, version: int) -> tuple[dict[str, Any], dict[str, Any]]:
        from coordinator.model_card import card_inputs
        from coordinator.model_registry import RegistryError, entry

        try:
            signed = entry(state, name, version)
        except RegistryError as e:
            raise HTTPException(404, str(e)) from None
        trail = [x for x in action_log.read(state) if x.get("target") in trail_targets(reader, signed["record"])]
        return signed["record"], card_inputs(reader, state, signed, trail)

    @app.get("/models/{name}/v{version}.md")
    def card_md(name: str, version: int) -> Response:
        from coordinator.model_card import markdown

        rec, inputs = card(name, version)
        return Response(markdown(rec, **inputs), media_type="text/markdown; charset=utf-8")

    @app.get("/models/{name}/v{version}", response_class=HTMLResponse)
    def card_html(name: str, version: int) -> HTMLResponse:
        from coordinator.model_card import html_page

        rec, inputs = card(name, version)
        resp = HTMLResponse(html_page(rec, stylesheet="/static/style.css", **inputs))
        resp.headers["Content-Security-Policy"] = CARD_CSP
        resp.headers["X-Frame-Options"] = "DENY"
        return resp
