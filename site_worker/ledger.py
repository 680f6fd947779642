"""The site's privacy ledger: Opacus accountant history per dataset, on disk.

Privacy loss accumulates over every model a site ever released from a dataset, across
rounds, runs and restarts, so the accountant's ``state_dict`` (its history of
``(noise_multiplier, sample_rate, steps)``) is persisted per dataset as JSON in the
state directory and replaced atomically (write, fsync, rename). The budget check
projects the ε the accountant *would* report after a task, before spending anything.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant

from protocol.durable import write_atomic

History = list[tuple[float, float, int]]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def atomic_write_json(path: Path, doc: Any) -> None:
    """Replace ``path`` with ``doc`` so a crash leaves the old or the new file, never half."""
    write_atomic(path, json.dumps(doc, indent=1, sort_keys=True).encode("utf-8"))


@functools.lru_cache(maxsize=256)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """RDP of one DP-SGD step at Opacus' default orders (the expensive part; a few pairs per site)."""
    from opacus.accountants.analysis.rdp import compute_rdp

    rdp = np.asarray(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                 orders=RDPAccountant.DEFAULT_ALPHAS), dtype=float)
    rdp.setflags(write=False)
    return rdp


def epsilon_of(history: History, *, delta: float, accountant: str = "rdp") -> float:
    """ε of an accountant with this history, as Opacus' ``get_epsilon`` computes it; 0 for no history.

    For RDP this is ``RDPAccountant.get_privacy_spent`` with the per-step RDP cached by
    (sample rate, noise): Opacus recomputes it on every call, which costs ~0.3 s.
    """
    if not history:
        return 0.0
    if accountant != "rdp":
        acc = create_accountant(mechanism=accountant)
        acc.history = [tuple(h) for h in history]
        return float(acc.get_epsilon(delta=delta))
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum(_rdp_per_step(float(sr), float(nm)) * int(n) for nm, sr, n in history)
    eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def simulate_steps(history: History, *, noise_multiplier: float, sample_rate: float, steps: int) -> History:
    """The history after ``steps`` more DP-SGD steps (what ``RDPAccountant.step`` would record)."""
    out = [tuple(h) for h in history]
    if steps <= 0:
        return out  # type: ignore[return-value]
    if out and out[-1][0] == noise_multiplier and out[-1][1] == sample_rate:
        nm, sr, n = out.pop()
        out.append((nm, sr, int(n) + steps))
    else:
        out.append((noise_multiplier, sample_rate, steps))
    return out  # type: ignore[return-value]


class PrivacyLedger:
    """Per-dataset accountant histories under ``state_dir/privacy/``."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "privacy"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def _path(self, dataset: str) -> Path:
        return self.dir / f"{_safe(dataset)}.json"

    def history(self, dataset: str) -> History:
        """The accountant history spent on ``dataset`` so far (empty when never trained)."""
        p = self._path(dataset)
        with self._lock:
            if not p.exists():
                return []
            doc = json.loads(p.read_text(encoding="utf-8"))
        return [(float(nm), float(sr), int(n)) for nm, sr, n in doc["history"]]

    def state_dict(self, dataset: str) -> dict[str, Any]:
        """In Opacus ``accountant.state_dict()`` form, for ``load_state_dict``."""
        return {"history": self.history(dataset), "mechanism": "rdp"}

    def spent(self, dataset: str, *, delta: float, accountant: str = "rdp") -> float:
        return epsilon_of(self.history(dataset), delta=delta, accountant=accountant)

    def project(self, dataset: str, *, noise_multiplier: float, sample_rate: float, steps: int,
                delta: float, accountant: str = "rdp") -> float:
        """ε after this task's steps, computed on a copy: nothing is recorded."""
        after = simulate_steps(self.history(dataset), noise_multiplier=noise_multiplier,
                               sample_rate=sample_rate, steps=steps)
        return epsilon_of(after, delta=delta, accountant=accountant)

    def record(self, dataset: str, history: History, *, task_id: str | None = None) -> None:
        """Persist the accountant history after training (before the reply is published)."""
        doc = {
            "dataset": dataset,
            "mechanism": "rdp",
            "history": [[float(nm), float(sr), int(n)] for nm, sr, n in history],
            "last_task_id": task_id,
        }
        with self._lock:
            atomic_write_json(self._path(dataset), doc)
