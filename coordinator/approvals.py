"""Signed approvals: "the model of run R at checkpoint H is valid", said by a named person.

A researcher marks a run's final model as valid from the dashboard; the record (who,
when, which run, which checkpoint file and its sha256) is signed with the coordinator's
Ed25519 key and kept in ``STATE/approvals/<run_id>.json``. ``fedbus coordinator audit``
re-verifies every record: the signature over the canonical JSON of the record, the key
against the run's recorded coordinator key id, and the checkpoint hash against both the
database and the file on disk. Editing any byte of a record, re-signing it with another
key, or swapping the checkpoint makes the audit fail. The signing and the checks (``sign``,
``verify_signed``, ``checkpoint_problem``) are shared with the model registry's entries.
"""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path
from typing import Any

from coordinator.checkpoints import sha256_file
from protocol.durable import write_atomic

KIND = "fedbus.model-approval/1"
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class ApprovalError(ValueError):
    """An approval cannot be made (unknown run, no checkpoint, bad name); the message says why."""


def canonical(record: dict[str, Any]) -> bytes:
    """The exact bytes that are signed: sorted keys, no whitespace, UTF-8."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def approvals_path(state_dir: Path, run_id: str) -> Path:
    if not _RUN_ID.fullmatch(run_id):  # run ids are the coordinator's slugs; refuse anything else
        raise ApprovalError(f"{run_id!r} is not a run id")
    return Path(state_dir) / "approvals" / f"{run_id}.json"


def load_approvals(state_dir: Path, run_id: str) -> list[dict[str, Any]]:
    """The signed records of a run, as stored (raises ``ValueError`` on a file that is not JSON)."""
    path = approvals_path(state_dir, run_id)
    if not path.exists():
        return []
    doc = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or not isinstance(doc.get("approvals"), list):
        raise ValueError(f"{path}: expected {{\"approvals\": [...]}}")
    return doc["approvals"]


def approve(
    state_dir: Path, *, run_id: str, round: int, checkpoint: str, checkpoint_sha256: str, approved_by: str,
    signer: Any, federation: str | None = None, note: str = "",
) -> dict[str, Any]:
    """Sign and append an approval of ``checkpoint`` (path relative to ``state_dir``); returns the signed record."""
    who = approved_by.strip()
    if not who or len(who) > 200:
        raise ApprovalError("say who approves (a name of 1-200 characters)")
    if len(note) > 2000:
        raise ApprovalError("the note is longer than 2000 characters")
    actual = sha256_file(Path(state_dir) / checkpoint)
    if actual != checkpoint_sha256:
        raise ApprovalError(f"checkpoint {checkpoint} has sha256 {actual}, the database recorded {checkpoint_sha256}")
    now = time.time()
    record = {
        "kind": KIND, "run_id": run_id, "federation": federation, "verdict": "valid", "approved_by": who,
        "approved_at": now, "approved_at_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "round": int(round), "checkpoint": checkpoint, "checkpoint_sha256": checkpoint_sha256,
        "coordinator_kid": signer.kid, "note": note,
    }
    signed = sign(record, signer)
    path = approvals_path(state_dir, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = load_approvals(state_dir, run_id)
    write_atomic(path, json.dumps({"approvals": [*existing, signed]}, indent=2).encode("utf-8"))
    return signed


def sign(record: dict[str, Any], signer: Any) -> dict[str, Any]:
    """The signed form of ``record`` (an approval here, a registry entry in ``model_registry``): the
    record, the key id and public key, and the Ed25519 signature over its canonical bytes."""
    return {"record": record, "kid": signer.kid, "public_pem": signer.public_pem().decode(),
            "signature": base64.b64encode(signer.sign(canonical(record))).decode()}


def verify_signed(signed: dict[str, Any], *, expected_kid: str | None, what: str = "record") -> str | None:
    """None when the signature over ``signed["record"]`` holds under the key it names, and that key is
    the run's coordinator key (``expected_kid``); else what is wrong. One check for approvals and
    registry entries."""
    from protocol.errors import BadSignature
    from protocol.signing import KeyFileError, TrustStore

    try:
        record, pem = signed["record"], signed["public_pem"].encode()
        sig = base64.b64decode(signed["signature"], validate=True)
        trust = TrustStore()
        kid = trust.add("coordinator", pem)
        trust.verify(kid, canonical(record), sig)
    except BadSignature:
        return f"the signature does not match the {what} (it was changed after signing)"
    except (KeyError, TypeError, AttributeError, ValueError, KeyFileError) as e:
        return f"malformed ({type(e).__name__}: {e})"
    if kid != signed.get("kid") or kid != record.get("coordinator_kid") or (expected_kid and kid != expected_kid):
        return f"signed by key {kid}, the run's coordinator key is {expected_kid}"
    return None


def checkpoint_problem(state_dir: Path, record: dict[str, Any], checkpoints: dict[int, tuple[str, str]]) -> str | None:
    """None when the checkpoint ``record`` names is the one the database recorded for its round and the
    file still has that sha256; else what is wrong."""
    rnd = record.get("round")
    stored = checkpoints.get(rnd) if isinstance(rnd, int) else None
    if stored is None or stored != (record.get("checkpoint"), record.get("checkpoint_sha256")):
        return (f"checkpoint {record.get('checkpoint')} ({record.get('checkpoint_sha256')}) is not the one the "
                f"database recorded for round {record.get('round')}")
    path = Path(state_dir) / stored[0]
    if not path.exists() or sha256_file(path) != stored[1]:
        return f"checkpoint file {path} is missing or no longer has the approved sha256"
    return None


def verify_approvals(state_dir: Path, run: dict[str, Any], checkpoints: dict[int, tuple[str, str]]) -> tuple[int, list[str]]:
    """(records verified, problems) for ``run`` (a state row); ``checkpoints``: round -> (path, sha256) from the db."""
    run_id = run["run_id"]
    try:
        records = load_approvals(state_dir, run_id)
    except (ValueError, OSError) as e:
        return 0, [f"approvals of {run_id}: unreadable ({e})"]
    ok, problems = 0, []
    for i, signed in enumerate(records):
        what = f"approval {i + 1} of {run_id}"
        problem = verify_signed(signed, expected_kid=run.get("coordinator_kid"))
        if problem is None:
            record = signed["record"]
            if record.get("kind") != KIND or record.get("run_id") != run_id:
                problem = f"names run {record.get('run_id')!r}, not {run_id!r}"
            else:
                problem = checkpoint_problem(state_dir, record, checkpoints)
        if problem:
            problems.append(f"{what}: {problem}")
        else:
            ok += 1
    return ok, problems
