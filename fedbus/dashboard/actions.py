"""What the dashboard may do (only with ``--allow-actions``), and the audit it may run.

Reads go through ``StateReader``; these are the only places that open the state for
writing, each for one short transaction, exactly as the CLI would:

* stop a run: ``StateStore.request_stop`` (a flag the coordinator checks every round);
* mark a run's model valid: a signed record (``coordinator.approvals``);
* start a run: ``fedbus coordinator run`` as its own process, on an experiment file
  that already lies in ``STATE/experiments/`` (chosen from that listing, never a path
  built from the request).

With an MLflow tracking URI (``coordinator serve --mlflow``), a model marked valid is also
registered in MLflow's model registry (``coordinator.model_registry_mlflow``) and a started
run is logged there when it finishes (``coordinator run --mlflow``, ``simulate --mlflow``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from fedbus.dashboard.data import NoSuchRun, StateReader


def default_model_name(run: dict[str, Any]) -> str:
    """The registry name a model gets when none is given: its experiment's name, as a slug."""
    base = (run.get("experiment") or {}).get("basic_info", {}).get("name") or run["run_id"].split("-")[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(base)).strip("-._")[:100] or "model"


class ActionError(ValueError):
    """An action cannot be done as asked; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


def _store(state_dir: Path):
    from coordinator.state import StateStore

    return StateStore(state_dir)


class Actions:
    """Actions on one state directory; ``key`` signs approvals, ``broker`` is where new runs go."""

    def __init__(self, state_dir: Path, *, key: Path | None, broker: str | None, federation: str | None,
                 simulate_out: Path | None = None, mlflow: str | None = None) -> None:
        self.dir = Path(state_dir)
        self.mlflow = mlflow  # tracking URI (checked when the dashboard started)
        self.simulate_out = simulate_out  # ``simulate --serve``: a started experiment is simulated into this OUT
        self.reader = StateReader(self.dir)
        self.key = key
        self.broker = broker
        self.federation = federation
        self._audits: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._children: list[subprocess.Popen] = []

    # -- stop -----------------------------------------------------------------------
    def stop(self, run_id: str, *, who: str) -> dict[str, Any]:
        run = self._run(run_id)
        if run["status"] != "running":
            raise ActionError(f"run {run_id} is {run['status']}, not running")
        store = _store(self.dir)
        try:
            store.request_stop(run_id, f"stopped from the dashboard by {who}")
        finally:
            store.close()
        return {"run_id": run_id, "stop_requested": True,
                "note": "the coordinator stops after the round in progress"}

    # -- approve --------------------------------------------------------------------
    def approve(self, run_id: str, *, who: str, note: str = "", model_name: str | None = None,
                mlflow: str | None = None) -> dict[str, Any]:
        """Mark valid: a signed approval, then a signed registry entry (``model_name``, default the
        experiment's name) for a finished run; with ``mlflow`` (default: the dashboard's), the version goes
        to MLflow's registry too. The signed entry is made first and stands if MLflow fails: the answer
        then carries ``mlflow.error``, and ``coordinator models register --mlflow`` can retry."""
        from coordinator.approvals import ApprovalError, approve
        from coordinator.model_registry import FINISHED, RegistryError, check_name, register

        run = self._run(run_id)
        ck = self.reader.checkpoint(run_id)
        if ck is None:
            raise ActionError(f"run {run_id} has no checkpoint yet")
        if run["status"] not in FINISHED:
            raise ActionError(f"run {run_id} is {run['status']}: mark its model valid once the run has finished")
        name = model_name or default_model_name(run)
        try:
            check_name(name)
        except RegistryError as e:
            raise ActionError(str(e), status=400) from None
        path, sha, rnd = ck
        signer = self._signer_for(run)
        rel = str(path.relative_to(self.dir))
        try:
            signed = approve(self.dir, run_id=run_id, round=rnd, checkpoint=rel, checkpoint_sha256=sha,
                             approved_by=who, signer=signer, federation=run["federation"], note=note)
            entry = register(self.dir, name=name, run=run, round=rnd, checkpoint=rel, checkpoint_sha256=sha,
                             approved_by=signed["record"]["approved_by"], signer=signer,
                             approval_signature=signed["signature"])
        except (ApprovalError, RegistryError) as e:
            raise ActionError(str(e), status=400) from None
        out = {**signed, "registry": entry["record"]}
        mlflow = mlflow or self.mlflow
        if mlflow:
            from coordinator.model_registry_mlflow import to_mlflow

            try:
                out["mlflow"] = to_mlflow(mlflow, entry["record"], self.dir / rel)
            except Exception as e:  # noqa: BLE001 - MLflow's many kinds; the signed entry is made and stays
                out["mlflow"] = {"uri": mlflow, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                                 if str(e) else type(e).__name__}
        return out

    def key_candidates(self) -> list[Path]:
        """``--key``; else STATE/coordinator.key and, beside a ``simulate --out`` state, the simulation's key."""
        if self.key is not None:
            return [self.key]
        found = [self.dir / "coordinator.key", *sorted(self.dir.parent.glob("work/*/keys/coordinator.key"))]
        return [p for p in found if p.is_file()]

    def _signer_for(self, run: dict[str, Any]):
        from protocol.signing import KeyFileError, Signer

        kids = []
        for path in self.key_candidates():
            try:
                signer = Signer.from_file(path)
            except KeyFileError as e:
                raise ActionError(str(e)) from None
            if not run.get("coordinator_kid") or signer.kid == run["coordinator_kid"]:
                return signer
            kids.append(f"{path} ({signer.kid})")
        if not kids:
            raise ActionError("no coordinator key to sign with: start the dashboard with --key COORDINATOR.key")
        raise ActionError(f"run {run['run_id']} was coordinated by key {run['coordinator_kid']}, not by "
                          f"{', '.join(kids)}: give the dashboard that coordinator's key (--key)")

    def approvals(self, run_id: str) -> list[dict[str, Any]]:
        from coordinator.approvals import load_approvals

        try:
            return [a["record"] for a in load_approvals(self.dir, run_id)]
        except (ValueError, OSError, KeyError, TypeError):
            return []

    # -- audit (a check, allowed on a read-only dashboard) ------------------------------
    def audit(self, run_id: str) -> dict[str, Any]:
        from coordinator.audit import audit_run

        self._run(run_id)
        store = _store(self.dir)
        try:
            report = audit_run(store, run_id).to_json()
        finally:
            store.close()
        report["checked_at"] = time.time()
        with self._lock:
            self._audits[run_id] = report
        return report

    def last_audit(self, run_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._audits.get(run_id)

    # -- start ----------------------------------------------------------------------
    def experiments(self) -> list[str]:
        folder = self.dir / "experiments"
        return sorted(p.name for p in folder.glob("*.json") if p.is_file()) if folder.is_dir() else []

    def _only_federation(self) -> str:
        """The federation this state directory serves, when it has served exactly one."""
        known = self.reader.federations()
        if len(known) != 1:
            raise ActionError("start the dashboard with --federation NAME: this state directory has served "
                              + (f"several federations ({', '.join(known)})" if known else "no federation yet"))
        return known[0]

    def start(self, name: str) -> dict[str, Any]:
        if name not in self.experiments():  # the file is picked from the listing, never joined from input
            raise ActionError(f"no experiment {name!r} in {self.dir / 'experiments'}; known: {self.experiments()}", 404)
        path = self.dir / "experiments" / name
        if not self.broker and self.simulate_out is not None:
            return self._simulate(path, name)
        if not self.broker:
            raise ActionError("this dashboard has no broker to start runs on: start it with --broker URL")
        slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(name).stem).strip("-")[:40] or "run"
        run_id = f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        logs = self.dir / "logs"
        logs.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "fedbus.cli", "coordinator", "run", str(path), "--broker", self.broker,
               "--state", str(self.dir), "--run-id", run_id, "--no-progress"]
        federation = self.federation or self._only_federation()
        cmd += ["--federation", federation]
        key = self.key if self.key is not None else self.dir / "coordinator.key"
        if not key.is_file():
            raise ActionError(f"no coordinator key to sign the run's tasks: start the dashboard with --key FILE "
                              f"(the key whose .pub the sites hold), or put it at {self.dir / 'coordinator.key'}")
        cmd += ["--key", str(key)] + (["--mlflow", self.mlflow] if self.mlflow else [])
        log_path = logs / f"{run_id}.log"
        with open(log_path, "ab") as log:
            child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=dict(os.environ), start_new_session=True)
        self.reap()
        self._children.append(child)
        return {"run_id": run_id, "pid": child.pid, "log": str(log_path), "experiment": name}

    def _simulate(self, path: Path, name: str) -> dict[str, Any]:
        """A simulation's dashboard: the experiment runs as ``fedbus simulate EXP --out OUT`` (its own
        sites, the same state directory), one at a time (two would share OUT's sites and result)."""
        self.reap()
        live = [r["run_id"] for r in self.reader.runs("running")]
        if self._children or live:  # two simulations would share OUT's sites and its result.json
            raise ActionError(f"a simulated run is still going ({', '.join(live) or 'starting'}): wait for it to "
                              "finish, then start the next")
        assert self.simulate_out is not None
        logs = self.dir / "logs"
        logs.mkdir(exist_ok=True)
        log_path = logs / f"simulate-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}.log"
        cmd = [sys.executable, "-m", "fedbus.cli", "simulate", str(path), "--out", str(self.simulate_out),
               *(["--mlflow", self.mlflow] if self.mlflow else [])]
        with open(log_path, "ab") as log:
            child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=dict(os.environ), start_new_session=True)
        self._children.append(child)
        return {"run_id": None, "pid": child.pid, "log": str(log_path), "experiment": name, "simulated": True}

    def reap(self) -> None:
        """Forget started coordinators that have exited (their exit status is in their log)."""
        self._children = [c for c in self._children if c.poll() is None]

    def _run(self, run_id: str) -> dict[str, Any]:
        try:
            return self.reader.run(run_id)
        except NoSuchRun:
            raise ActionError(f"no run {run_id!r} in {self.dir}", status=404) from None
