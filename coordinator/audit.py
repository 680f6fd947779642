"""Re-verify a stored run: every accepted message's signature and every checkpoint's hash.

Signatures are checked over the stored body bytes with the key the database recorded
for the signer (keys are never deleted, so re-enrolment does not break old audits);
the body's sha256 and message id must match its update-log row. Any mismatch makes
the audit fail, naming the file or row.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from coordinator.checkpoints import sha256_file
from coordinator.state import StateStore


@dataclass
class AuditReport:
    run_id: str
    signatures: int = 0
    checkpoints: int = 0
    approvals: int = 0
    registry: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {"run_id": self.run_id, "ok": self.ok, "signatures_verified": self.signatures,
                "checkpoints_verified": self.checkpoints, "approvals_verified": self.approvals,
                "registry_entries_verified": self.registry, "problems": self.problems}


def _check_file(store: StateStore, rel: str | None, sha: str | None, what: str, report: AuditReport) -> None:
    if not rel or not sha:
        report.problems.append(f"{what}: no file or hash recorded")
        return
    path = store.dir / rel
    if not path.exists():
        report.problems.append(f"{what}: {path} is missing")
        return
    actual = sha256_file(path)
    if actual != sha:
        report.problems.append(f"{what}: {path} has sha256 {actual}, the database recorded {sha}")
        return
    report.checkpoints += 1


def audit_run(store: StateStore, run_id: str) -> AuditReport:
    """Audit ``run_id``; the report lists every problem found (empty = the run verifies)."""
    from protocol.codec import decode_envelope, signed_digest
    from protocol.errors import ProtocolError
    from protocol.signing import TrustStore

    run = store.run(run_id)
    report = AuditReport(run_id=run_id)
    _check_file(store, run.get("initial_checkpoint"), run.get("initial_sha256"), "initial checkpoint", report)
    for r in store.rounds(run_id):
        _check_file(store, r["checkpoint_path"], r["checkpoint_sha256"], f"round {r['round']} checkpoint", report)
        if r["agg_state_path"]:
            _check_file(store, r["agg_state_path"], r["agg_state_sha256"], f"round {r['round']} aggregator state", report)
    for u in store.updates(run_id, verdict="accepted"):
        what = f"{u['kind']} {u['message_id']} from {u['site']} (round {u['round']})"
        if not u["body_path"]:
            report.problems.append(f"{what}: body not stored (run made with store_bodies=False); cannot re-verify")
            continue
        path = Path(store.dir / u["body_path"])
        if not path.exists():
            report.problems.append(f"{what}: body file {path} is missing")
            continue
        body = path.read_bytes()
        if hashlib.sha256(body).hexdigest() != u["body_sha256"]:
            report.problems.append(f"{what}: body file {path} does not match its recorded sha256")
            continue
        key = store.key(u["kid"] or "")
        if key is None:
            report.problems.append(f"{what}: key {u['kid']} is not in the key table")
            continue
        site, pem = key
        trust = TrustStore()
        trust.add(site, pem)
        try:
            signer = trust.verify(u["kid"], signed_digest(body), bytes(u["signature"] or b""))
            env = decode_envelope(body)
        except ProtocolError as e:
            report.problems.append(f"{what}: {e.reason}: {e}")
            continue
        if signer != u["site"] or env.sender != u["site"] or env.message_id != u["message_id"] or env.run_id != run_id:
            report.problems.append(f"{what}: body names sender {env.sender!r}, message {env.message_id}, run {env.run_id!r}")
            continue
        report.signatures += 1
    _check_approvals(store, run, report)
    return report


class HasRounds(Protocol):
    def rounds(self, run_id: str) -> list[dict[str, Any]]: ...


def run_checkpoints(store: HasRounds, run: dict) -> dict[int, tuple[str, str]]:
    """round -> (checkpoint path, sha256) as the database recorded them (round 0: the initial model)."""
    cks: dict[int, tuple[str, str]] = {}
    if run.get("initial_checkpoint") and run.get("initial_sha256"):  # round 0, when the run recorded one
        cks[0] = (str(run["initial_checkpoint"]), str(run["initial_sha256"]))
    cks.update({r["round"]: (r["checkpoint_path"], r["checkpoint_sha256"]) for r in store.rounds(run["run_id"])})
    return cks


def _check_approvals(store: StateStore, run: dict, report: AuditReport) -> None:
    """Every signed "model is valid" record (coordinator/approvals.py) must still verify."""
    from coordinator.approvals import verify_approvals

    cks = run_checkpoints(store, run)
    ok, problems = verify_approvals(store.dir, run, cks)
    report.approvals += ok
    report.problems.extend(problems)
    _check_registry(store, run, cks, report)


def _check_registry(store: StateStore, run: dict, cks: dict, report: AuditReport) -> None:
    """Every signed registry entry of the run (coordinator/model_registry.py) must still verify."""
    from coordinator.model_registry import verify_entries

    ok, problems = verify_entries(store.dir, run, cks)
    report.registry += ok
    report.problems.extend(problems)
