"""The model registry: signed, versioned entries "model NAME version V is run R's checkpoint H".

An entry is made when someone marks a run's model valid (the dashboard's "Mark valid", or
``fedbus coordinator models register RUN --name NAME``), after its approval
(coordinator/approvals.py). It names the checkpoint and its sha256, the sha256 of the
experiment as run, who approved it and when, the final metrics with their 95 % intervals
(overall and per site) and ε per site with δ and accountant. It is signed with the
coordinator's Ed25519 key over its canonical JSON and stored as
``STATE/models/<name>/v<version>.json``; a version is never overwritten (the file is
linked into place, so two registrations cannot take the same number).

``fedbus coordinator audit RUN`` re-verifies the run's entries (``verify_entries``):
signature, key, checkpoint hash in the database and on disk, experiment hash. Editing
any byte of an entry fails the audit.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from coordinator.approvals import canonical, checkpoint_problem, sign, verify_signed
from coordinator.checkpoints import sha256_file
from protocol import durable

KIND = "fedbus.model-registry/1"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
MAX_VERSIONS = 10_000
_METRICS = ("accuracy", "auc", "f1", "sensitivity", "specificity", "loss")
FINISHED = ("completed", "completed_with_gaps")


class RegistryError(ValueError):
    """An entry cannot be made or read (bad name, unfinished run, no such version); the message says why."""


def check_name(name: str) -> str:
    if not NAME.fullmatch(name or ""):
        raise RegistryError(f"model name {name!r}: 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


def experiment_sha256(experiment: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(experiment)).hexdigest()


def _figure(m: dict[str, Any], key: str) -> dict[str, Any] | None:
    v = m.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return None
    ci = (m.get("ci") or {}).get(key)
    return {"value": float(v), "ci95": [float(ci[0]), float(ci[1])] if isinstance(ci, list) and len(ci) == 2 else None}


def metrics_of(final: dict[str, Any]) -> dict[str, Any]:
    """Overall and per-site test figures, each with its 95 % interval (None where the run reported none)."""
    per_site = {}
    for site, m in sorted((final.get("per_site") or {}).items()):
        per_site[site] = {**{k: _figure(m, k) for k in _METRICS}, "n_test": m.get("n_test"),
                          "majority_class_accuracy": m.get("majority_class_accuracy"),
                          "predicts_one_class": bool(m.get("predicts_one_class"))}
    return {"split": final.get("split", "test"), "n_test": final.get("n_test"),
            "overall": {k: _figure(final, k) for k in _METRICS}, "per_site": per_site}


def privacy_of(result: dict[str, Any], experiment: dict[str, Any]) -> dict[str, Any]:
    p = result.get("privacy") or {}
    eps = p.get("epsilon") or result.get("epsilon") or {}
    fed = experiment.get("federated") or {}
    secure = bool(fed.get("secure_aggregation") or (fed.get("parameters") or {}).get("secure_aggregation"))
    return {"epsilon": {s: (float(v) if v is not None else None) for s, v in sorted(eps.items())},
            "delta": p.get("delta"), "accountant": p.get("accountant"), "mode": p.get("mode"),
            "total_epsilon": p.get("total_epsilon"), "secure_aggregation": secure}


def models_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "models"


def entry_path(state_dir: Path, name: str, version: int) -> Path:
    return models_dir(state_dir) / check_name(name) / f"v{int(version)}.json"


def register(state_dir: Path, *, name: str, run: dict[str, Any], round: int, checkpoint: str, checkpoint_sha256: str,
             approved_by: str, signer: Any, approval_signature: str | None = None) -> dict[str, Any]:
    """Sign and store the next version of ``name`` for ``run`` (a state row with ``experiment`` and ``result``)."""
    check_name(name)
    if run.get("status") not in FINISHED or not (run.get("result") or {}).get("final"):
        raise RegistryError(f"run {run['run_id']} is {run.get('status')}: register a model once its run has finished "
                            "and its sites have scored it on their test splits")
    actual = sha256_file(Path(state_dir) / checkpoint)
    if actual != checkpoint_sha256:
        raise RegistryError(f"checkpoint {checkpoint} has sha256 {actual}, the database recorded {checkpoint_sha256}")
    result, experiment = run["result"], run.get("experiment") or {}
    folder = models_dir(state_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    for version in range(len(list(folder.glob("v*.json"))) + 1, MAX_VERSIONS):
        now = time.time()
        record = {
            "kind": KIND, "name": name, "version": version, "run_id": run["run_id"], "federation": run.get("federation"),
            "dataset": (experiment.get("dataset") or {}).get("name"),
            "experiment_name": (experiment.get("basic_info") or {}).get("name"),
            "round": int(round), "checkpoint": checkpoint, "checkpoint_sha256": checkpoint_sha256,
            "experiment_sha256": experiment_sha256(experiment), "approved_by": approved_by,
            "approved_at": now, "approved_at_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "approval_signature": approval_signature, "metrics": metrics_of(result["final"]),
            "privacy": privacy_of(result, experiment), "sites": sorted(run.get("sites") or []),
            "coordinator_kid": signer.kid,
        }
        signed = sign(record, signer)
        final = folder / f"v{version}.json"
        tmp = folder / f".v{version}.{os.getpid()}.tmp"
        durable.write_atomic(tmp, json.dumps(signed, indent=2).encode("utf-8"))
        try:
            os.link(tmp, final)  # fails if another registration took this version first
        except FileExistsError:
            continue
        finally:
            tmp.unlink(missing_ok=True)
        durable.fsync_dir(folder)
        return signed
    raise RegistryError(f"model {name} has {MAX_VERSIONS} versions already: choose another name")


def entries(state_dir: Path, name: str | None = None) -> list[dict[str, Any]]:
    """Every stored entry (signed form), by name then version; a file that is not JSON is skipped here
    (``verify_entries`` reports it)."""
    root = models_dir(state_dir)
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and NAME.fullmatch(p.name)):
        if name is not None and folder.name != name:
            continue
        for f in sorted(folder.glob("v*.json"), key=lambda p: int(p.stem[1:]) if p.stem[1:].isdigit() else 0):
            try:
                doc = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(doc, dict) and isinstance(doc.get("record"), dict):
                out.append(doc)
    return out


def entry(state_dir: Path, name: str, version: int | None = None) -> dict[str, Any]:
    """One entry (the latest version when ``version`` is None)."""
    found = entries(state_dir, check_name(name))
    if not found:
        raise RegistryError(f"no model named {name!r} in {models_dir(state_dir)}; list them with `coordinator models list`")
    if version is None:
        return found[-1]
    for e in found:
        if e["record"].get("version") == version:
            return e
    raise RegistryError(f"model {name} has no version {version} (versions: {[e['record'].get('version') for e in found]})")


def verify_entry(state_dir: Path, path: Path, signed: dict[str, Any], run: dict[str, Any],
                 checkpoints: dict[int, tuple[str, str]]) -> str | None:
    """None when the entry stored at ``path`` verifies against ``run`` (a state row, ``experiment`` parsed)
    and its checkpoints (round -> (path, sha256) from the database); else what is wrong."""
    record = signed["record"]
    problem = verify_signed(signed, expected_kid=run.get("coordinator_kid"), what="entry")
    if problem:
        return problem
    try:
        where = entry_path(state_dir, str(record.get("name")), int(record.get("version") or 0))
    except (RegistryError, TypeError, ValueError):
        where = None
    if record.get("kind") != KIND or where != path:
        return f"names model {record.get('name')} v{record.get('version')}, not the file it is stored in"
    problem = checkpoint_problem(state_dir, record, checkpoints)
    if problem:
        return problem
    if experiment_sha256(run.get("experiment") or {}) != record.get("experiment_sha256"):
        return "the experiment the database holds for the run no longer has the registered sha256"
    return None


def verify_entries(state_dir: Path, run: dict[str, Any], checkpoints: dict[int, tuple[str, str]]) -> tuple[int, list[str]]:
    """(entries verified, problems) for the registry entries of ``run`` (a state row, ``experiment`` parsed)."""
    run_id = run["run_id"]
    ok, problems = 0, []
    root = models_dir(state_dir)
    for f in sorted(root.glob("*/v*.json")) if root.is_dir() else []:
        try:
            signed = json.loads(f.read_text(encoding="utf-8"))
            record = signed["record"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"registry entry {f}: unreadable ({e})")
            continue
        if not isinstance(record, dict) or record.get("run_id") != run_id:
            continue
        problem = verify_entry(state_dir, f, signed, run, checkpoints)
        if problem:
            problems.append(f"registry entry {record.get('name')} v{record.get('version')} ({f}): {problem}")
        else:
            ok += 1
    return ok, problems
