"""What this site has approved to run: canonical hashes of experiments, on disk (issue 20, Build 2).

The anchor is Fed-BioMed's training-plan approval: a hospital's operator reviews an experiment
(``fedbus site check --experiment``), approves it (``fedbus site approve``), and with
``policy.require_approval = true`` the site declines (``Declined(policy)``, the hash in the
reason) every task whose experiment hash it has not approved. The hash covers what the site
would run: the architecture, the training block (DP request included) and the dataset block,
and the site dataset the task names; a run's name, description or federation settings do not
change it. ``state_dir/approvals.json`` holds ``{hash: {"name", "dataset", "at"}}``.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

from protocol.durable import write_atomic

HASH_PREFIX = "sha256:"


def experiment_hash(experiment: dict[str, Any], dataset: str) -> str:
    """The canonical hash of what a site runs for ``experiment`` on its ``dataset``."""
    doc = {"architecture": experiment.get("architecture"), "training": experiment.get("training"),
           "dataset": experiment.get("dataset"), "site_dataset": dataset}
    canon = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False, default=str)
    return HASH_PREFIX + hashlib.sha256(canon.encode("utf-8")).hexdigest()


class Approvals:
    """``state_dir/approvals.json``: the experiment hashes this site's operator approved."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "approvals.json"
        self._lock = threading.Lock()

    def all(self) -> dict[str, dict[str, Any]]:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        return {str(k): dict(v) for k, v in doc.get("approved", {}).items()}

    def approved(self, digest: str) -> bool:
        return digest in self.all()

    def approve(self, digest: str, *, name: str, dataset: str) -> None:
        with self._lock:
            doc = self.all()
            doc[digest] = {"name": name, "dataset": dataset, "at": time.time()}
            write_atomic(self.path, json.dumps({"approved": doc}, indent=1, sort_keys=True).encode("utf-8"))

    def revoke(self, digest: str) -> bool:
        """Forget ``digest``; False when it was not approved."""
        with self._lock:
            doc = self.all()
            if doc.pop(digest, None) is None:
                return False
            write_atomic(self.path, json.dumps({"approved": doc}, indent=1, sort_keys=True).encode("utf-8"))
            return True


__all__ = ["Approvals", "experiment_hash"]
