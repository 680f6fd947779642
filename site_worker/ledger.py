"""The site's privacy ledger: every release of a dataset, as Opacus accountant entries, on disk.

Privacy loss accumulates over everything a site ever released from a dataset (models,
DP metrics), across rounds, runs, restarts and processes, so each release's
``(noise_multiplier, sample_rate, steps)`` entries are persisted per dataset as JSON in
the state directory, replaced atomically (write, fsync, rename) under a cross-process
file lock. A release is reserved (and counted) before it is computed, so the budget
check and the spending are one step. A metrics release (a Gaussian mechanism with noise
σ·Δ on a vector of L2 sensitivity Δ) is the entry ``(σ, 1.0, 1)``: one step of the
subsampled Gaussian with sampling rate 1, exactly the Gaussian mechanism in RDP and PRV.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from protocol.accounting import History, epsilon_of, merge, rdp_of, simulate_steps
from protocol.durable import write_atomic
from protocol.secagg import skellam


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def atomic_write_json(path: Path, doc: Any) -> None:
    """Replace ``path`` with ``doc`` so a crash leaves the old or the new file, never half."""
    write_atomic(path, json.dumps(doc, indent=1, sort_keys=True).encode("utf-8"))


def _skellam_rows(rel: list[dict[str, Any]]) -> list[skellam.SkellamEntry]:
    return [skellam.SkellamEntry.from_list(e) for r in rel for e in r.get("skellam", ())]


def _epsilon(history: History, pooled: list[skellam.SkellamEntry], *, delta: float, accountant: str) -> float:
    """epsilon of Gaussian entries plus pooled-DP (Skellam) steps: RDP composed at Opacus' orders
    (``protocol.secagg.skellam``); without pooled steps exactly ``epsilon_of``."""
    if not pooled:
        return epsilon_of(history, delta=delta, accountant=accountant)
    if accountant not in ("rdp", skellam.ACCOUNTANT):
        raise ValueError(f"pooled-DP steps compose in RDP only; this ledger reports with {accountant!r}")
    return skellam.epsilon_of(pooled, delta=delta, gaussian_rdp=rdp_of(history) if history else None)


class BudgetExceeded(Exception):
    """A release would take a dataset past ``max_epsilon``; nothing was reserved."""

    def __init__(self, detail: str, figures: dict[str, float]) -> None:
        super().__init__(detail)
        self.detail = detail
        self.figures = figures


class PrivacyLedger:
    """Per-dataset privacy releases under ``state_dir/privacy/``, one JSON file per dataset.

    Each file lists releases ``{id, kind, run_id, entries, state}``: ``kind`` is "train" or
    "metrics"/"eval", ``entries`` are Opacus accountant entries ``(σ, q, steps)`` (a pooled-DP
    step adds ``skellam``: ``[mu, Δ1, Δ2, q, steps]``, ``protocol.secagg.skellam``), ``state``
    is "reserved" (counted, training under way) or "spent". The history every epsilon is
    computed from includes reserved releases, so a crash between reserve and commit
    over-counts and never under-counts. Check-and-reserve happens under an exclusive
    ``fcntl.flock`` on ``privacy/<dataset>.lock``: two daemons (or threads) sharing a state
    directory cannot both pass the budget check on the same remaining budget.
    """

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "privacy"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def _path(self, dataset: str) -> Path:
        return self.dir / f"{_safe(dataset)}.json"

    @contextlib.contextmanager
    def _locked(self, dataset: str) -> Iterator[list[dict[str, Any]]]:
        """The dataset's releases, read and (on normal exit) written back under the file lock."""
        lock_path = self.dir / f"{_safe(dataset)}.lock"
        with self._lock, open(lock_path, "a+b") as lf:
            fcntl.flock(lf.fileno(), fcntl.LOCK_EX)
            try:
                releases = self._read(dataset)
                before = json.dumps(releases, sort_keys=True)
                yield releases
                if json.dumps(releases, sort_keys=True) != before:
                    atomic_write_json(self._path(dataset), {"dataset": dataset, "releases": releases})
            finally:
                fcntl.flock(lf.fileno(), fcntl.LOCK_UN)

    def _read(self, dataset: str) -> list[dict[str, Any]]:
        p = self._path(dataset)
        if not p.exists():
            return []
        doc = json.loads(p.read_text(encoding="utf-8"))
        if "releases" in doc:
            return list(doc["releases"])
        # A ledger written before releases were itemised: its history is one spent release.
        return [{"id": doc.get("last_task_id") or "legacy", "kind": "train", "run_id": None,
                 "entries": doc.get("history", []), "state": "spent"}]

    def releases(self, dataset: str) -> list[dict[str, Any]]:
        with self._locked(dataset) as rel:
            return [dict(r) for r in rel]

    def history(self, dataset: str) -> History:
        """The accountant history of everything released (or reserved) from ``dataset``."""
        with self._locked(dataset) as rel:
            return merge([e for r in rel for e in r["entries"]])

    def state_dict(self, dataset: str) -> dict[str, Any]:
        """In Opacus ``accountant.state_dict()`` form, for ``load_state_dict``."""
        return {"history": self.history(dataset), "mechanism": "rdp"}

    def spent(self, dataset: str, *, delta: float, accountant: str = "rdp") -> float:
        with self._locked(dataset) as rel:
            history, pooled = merge([e for r in rel for e in r["entries"]]), _skellam_rows(rel)
        return _epsilon(history, pooled, delta=delta, accountant=accountant)

    def project(self, dataset: str, *, noise_multiplier: float, sample_rate: float, steps: int,
                delta: float, accountant: str = "rdp") -> float:
        """ε after this task's steps, computed on a copy: nothing is recorded."""
        with self._locked(dataset) as rel:
            history, pooled = merge([e for r in rel for e in r["entries"]]), _skellam_rows(rel)
        after = simulate_steps(history, noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        return _epsilon(after, pooled, delta=delta, accountant=accountant)

    def project_entries(self, dataset: str, entries: History, *, delta: float, accountant: str = "rdp") -> float:
        """ε after releasing ``entries`` on top of the ledger, computed on a copy: nothing is recorded."""
        with self._locked(dataset) as rel:
            history, pooled = merge([e for r in rel for e in r["entries"]]), _skellam_rows(rel)
        return _epsilon(merge([*history, *entries]), pooled, delta=delta, accountant=accountant)

    def count(self, dataset: str, *, kind: str, run_id: str) -> int:
        """Releases of ``kind`` for ``run_id`` so far (the per-run evaluation cap)."""
        with self._locked(dataset) as rel:
            return sum(1 for r in rel if r["kind"] == kind and r.get("run_id") == run_id)

    def reserve(self, dataset: str, *, release_id: str, kind: str, entries: History, delta: float,
                accountant: str, max_epsilon: float | None, run_id: str | None = None,
                max_count: tuple[int, str] | None = None,
                pooled: list[skellam.SkellamEntry] | None = None) -> tuple[float, float]:
        """Check the budget and reserve ``entries`` in one locked step; returns (spent, projected) ε.

        Raises ``BudgetExceeded`` (nothing reserved) when the projection passes ``max_epsilon``,
        or when ``max_count = (cap, setting)`` releases of this kind/run already exist. A
        release id already spent (a redelivered task) is charged again: the earlier attempt
        may have published its reply. A release id still *reserved* is an attempt that died
        before its commit, so before any reply existed: it released nothing, and this
        reservation replaces it (a crash loop cannot drain the budget; issue 20, class 8).
        """
        with self._locked(dataset) as rel:
            rel[:] = [r for r in rel if not (r["id"] == release_id and r["state"] == "reserved")]
            if max_count is not None:
                cap, setting = max_count
                done = sum(1 for r in rel if r["kind"] == kind and r.get("run_id") == run_id)
                if done >= cap:
                    raise BudgetExceeded(f"{setting}: {done} {kind} releases for run {run_id!r} already, this "
                                         f"site's policy.{setting} is {cap}", {"count": float(done), "cap": float(cap)})
            history, before = merge([e for r in rel for e in r["entries"]]), _skellam_rows(rel)
            spent = _epsilon(history, before, delta=delta, accountant=accountant)
            projected = _epsilon(merge([*history, *entries]), [*before, *(pooled or [])], delta=delta,
                                 accountant=accountant)
            if max_epsilon is not None and projected > max_epsilon:
                # The projection follows from this task's sample rate and steps (the site's training
                # rows): the figure stays in ``figures`` for the site's log, the wire omits it.
                raise BudgetExceeded(
                    f"max_epsilon: releasing this would raise epsilon on {dataset!r} from {spent:.4g} (delta "
                    f"{delta:g}, {accountant}) above this site's max_epsilon {max_epsilon:g}",
                    {"epsilon_spent": spent, "epsilon_projected": projected, "max_epsilon": max_epsilon,
                     "delta": delta})
            rel.append({"id": release_id, "kind": kind, "run_id": run_id, "state": "reserved", "at": time.time(),
                        "entries": [[float(a), float(b), int(c)] for a, b, c in entries],
                        **({"skellam": [p.as_list() for p in pooled]} if pooled else {})})
            return spent, projected

    def commit(self, dataset: str, release_id: str) -> None:
        """Mark a reserved release spent (its reply is about to be published)."""
        with self._locked(dataset) as rel:
            for r in reversed(rel):
                if r["id"] == release_id and r["state"] == "reserved":
                    r["state"] = "spent"
                    return

    def cancel(self, dataset: str, release_id: str) -> None:
        """Drop a reservation whose result was never released (training aborted on stop)."""
        with self._locked(dataset) as rel:
            for i in range(len(rel) - 1, -1, -1):
                if rel[i]["id"] == release_id and rel[i]["state"] == "reserved":
                    del rel[i]
                    return
