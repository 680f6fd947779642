"""The model designer (MediNet's Model Designer): build an experiment in a form, check it live, save it.

The page (``static/designer.js``) edits one experiment document. Every change is posted to
``/api/designer/check``, which answers with exactly what ``fedbus config validate`` says
(``fedbus.experiment_check``: schema, shape walk, parameter count, aggregator) and each
site's ε plan from the rows *and the policy* its hello announced: ``coordinator.privacy_plan.plan``,
the plan ``coordinator run`` prints before round 1 (over ``protocol.privacy_plan``, the planner the
sites spend by), so a site's own δ, accountant, sample-rate cap or budget shows here, and a site
that would decline says why.
Saving validates again and writes ``STATE/experiments/<slug>.json``, the slug made from the
validated experiment name by a fixed rule (never a path from the request); the existing
``/api/runs/start`` starts it. Templates build the examples' models (logistic regression,
MLP, ECG CNN) for the dataset chosen from the sites' catalogue; a tabular template's features
are the dataset's columns less the target and less the columns that would leak the outcome by
their name (``fedbus.leak_screen``, as ``config new`` screens them: a follow-up duration such as
heart failure's ``time``, an identifier). The researcher may still tick one back.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from fedbus.dashboard.data import StateReader
from protocol.config import ConfigError
from protocol.experiment_template import new_experiment
from protocol.layers import LAYER_TYPES

SLUG = re.compile(r"[^A-Za-z0-9_-]+")
MAX_DOC_BYTES = 256 * 1024
ECG_LENGTH = 185  # the synthetic ECG beats' length (simulator/ecg_synthetic.py)


class DesignError(ValueError):
    """The design cannot be saved (invalid, or its file exists); ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int = 400, doc: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.doc = doc


def palette() -> dict[str, Any]:
    """Each layer type the model language allows, with its parameters (kind, default, required)."""
    out = {}
    for name, lt in LAYER_TYPES.items():
        params = {}
        for p, spec in lt.params.items():
            inferred = p in getattr(lt, "inferred", frozenset())
            params[p] = {"kind": spec.kind, "required": spec.required and not inferred,
                         "default": None if spec.required else spec.default, "inferred": inferred}
        out[name] = params
    return out


def catalogue(reader: StateReader) -> dict[str, Any]:
    """Datasets the sites offer: name -> {sites: {site: rows}, columns, feature_types, target}."""
    found: dict[str, dict[str, Any]] = {}
    for s in reader.sites():
        for d in (s["hello"] or {}).get("datasets") or []:
            entry = found.setdefault(d.get("name"), {"sites": {}, "columns": [], "feature_types": {}, "target": d.get("target")})
            entry["sites"][s["site_id"]] = d.get("rows")
            for c in d.get("columns") or []:
                if c not in entry["columns"]:
                    entry["columns"].append(c)
            if isinstance(d.get("feature_types"), dict):
                entry["feature_types"].update({k: v for k, v in d["feature_types"].items() if isinstance(v, str)})
    return found


def template_features(cat: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """(features, left out with why) for a tabular template over a catalogue entry: every column but
    the target, less those whose name says they leak the outcome (a follow-up duration, an identifier)."""
    from fedbus.leak_screen import duration_reason, identifier_reason

    features, left_out = [], {}
    for c in cat["columns"]:
        if c == cat["target"]:
            continue
        why = duration_reason(c) or identifier_reason(c, None)
        if why:
            left_out[c] = why
        else:
            features.append(c)
    return features, left_out


def _layer(t: str, **params: Any) -> dict[str, Any]:
    return {"name": t, "type": t, "params": params}


def template(kind: str, *, dataset: str, target: str, features: list[str], rows: int | None = None,
             left_out: dict[str, str] | None = None) -> dict[str, Any]:
    """An experiment for ``dataset`` with the layers of ``kind``: "logistic", "mlp" or "ecg_cnn";
    ``left_out``: columns kept out of ``features`` as outcome leaks (named in the description)."""
    if kind == "ecg_cnn":
        doc = new_experiment(name=f"{dataset}_ecg_cnn", dataset=dataset, target=target, features=[], categorical={},
                             task="multiclass", num_classes=2, rows=rows)
        doc["dataset"] = {"name": dataset, "target": target, "kind": "signal", "task": "multiclass", "num_classes": 2,
                          "validation_fraction": 0.2}
        doc["architecture"]["layers"] = [
            {"name": "Input Layer", "type": "input", "params": {"channels": 1, "length": ECG_LENGTH}},
            _layer("Conv1d", in_channels=1, out_channels=16, kernel_size=5), _layer("ReLU"),
            _layer("MaxPool1d", kernel_size=2), _layer("Flatten"), _layer("Linear", out_features=128), _layer("ReLU"),
            _layer("Linear", out_features=2), {"name": "Output Layer", "type": "output", "params": {"features": 2}}]
    else:
        doc = new_experiment(name=f"{dataset}_{kind}", dataset=dataset, target=target, features=features, categorical={},
                             task="binary", num_classes=2, rows=rows)
        hidden = [] if kind == "logistic" else [_layer("Linear", out_features=32), _layer("ReLU")]
        if kind not in ("logistic", "mlp"):
            raise DesignError(f"no template {kind!r}: logistic, mlp or ecg_cnn", 404)
        doc["architecture"]["layers"] = [doc["architecture"]["layers"][0], *hidden, _layer("Linear", out_features=1),
                                         doc["architecture"]["layers"][-1]]
    opt = doc["training"]["optimizer"]
    opt["differential_privacy"] = {"total_epsilon": 8.0, "max_grad_norm": 1.0, "delta": 1e-5}
    doc["training"].update(epochs=1, batch_size=16, rounds=3)  # a sample rate the site defaults allow at ~50 rows
    doc["basic_info"]["description"] = f"{kind} for {target} on {dataset}, designed in the fedbus dashboard" + (
        f"; left out as outcome leaks: {'; '.join(f'{c} ({why})' for c, why in left_out.items())}" if left_out else "")
    return doc


TEMPLATES = {"logistic": "Logistic regression", "mlp": "MLP (one hidden layer of 32)", "ecg_cnn": "ECG CNN (Conv1d 16×5)"}


def check(doc: Any, reader: StateReader) -> dict[str, Any]:
    """What ``config validate`` says of ``doc``, plus each site's ε plan for its dataset."""
    from fedbus.experiment_check import check_experiment, error_doc, report

    if not isinstance(doc, dict):
        return {"valid": False, "error": {"path": "", "message": "the experiment must be a JSON object", "errors": []}}
    if len(json.dumps(doc)) > MAX_DOC_BYTES:
        return {"valid": False, "error": {"path": "", "message": f"the experiment is larger than {MAX_DOC_BYTES} bytes",
                                          "errors": []}}
    try:
        experiment, summary = check_experiment(doc)
    except ConfigError as exc:
        return error_doc(exc)
    from coordinator.privacy_plan import plan

    out = report(experiment, summary)
    rows = {s: int(n) for s, n in (catalogue(reader).get(experiment.dataset.name, {}).get("sites") or {}).items()
            if isinstance(n, int) and n >= 2}
    hellos = {s["site_id"]: s["hello"] for s in reader.sites() if s["site_id"] in rows}
    try:
        out["privacy_plan"] = plan(experiment, hellos) if hellos else None
    except (ValueError, ConfigError) as e:  # a budget no noise can meet, say: shown, not raised
        out["privacy_plan"] = {"error": str(e)}
    out["catalogue_rows"] = rows
    return out


def file_name(doc: dict[str, Any]) -> str:
    """``<slug of basic_info.name>.json``: letters, digits, '_' and '-' only, at most 64 characters."""
    name = str((doc.get("basic_info") or {}).get("name") or "")
    slug = SLUG.sub("-", name).strip("-_")[:64]
    if not slug:
        raise DesignError("give the experiment a name (basic_info.name): its file is named after it")
    return f"{slug}.json"


def save(state_dir: Path, doc: Any, reader: StateReader, *, overwrite: bool = False) -> dict[str, Any]:
    """Validate ``doc`` as ``config validate`` does, then write it to ``STATE/experiments/``."""
    result = check(doc, reader)
    if not result["valid"]:
        raise DesignError(f"not saved: {result['error']['path']}: {result['error']['message']}", 400, result)
    assert isinstance(doc, dict)
    name = file_name(doc)
    folder = Path(state_dir) / "experiments"
    folder.mkdir(exist_ok=True)
    path = folder / name
    if path.exists() and not overwrite:
        raise DesignError(f"{name} exists in {folder}: rename the experiment (basic_info.name) or save over it", 409)
    from protocol.durable import write_atomic

    write_atomic(path, json.dumps(doc, indent=2).encode("utf-8"))
    return {"saved": name, "path": str(path), "parameters": result["parameters"]}
