"""Read-only access to a coordinator's state directory, safe beside a live coordinator.

Every request opens its own ``mode=ro`` SQLite connection: WAL lets it read the last
committed round while the coordinator writes the next one, and a read-only handle
can never take the writer's lock or change a byte. A state directory without a
database yet (a simulation still laying out its sites) reads as empty, not as an error.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


class NoSuchRun(LookupError):
    """The run id names no run in this state directory."""


def _loads(text: str | None, default: Any) -> Any:
    if not text:
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default


class StateReader:
    """Queries over ``STATE/coordinator.db``; each call uses a fresh read-only connection."""

    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir)
        self.db_path = self.dir / "coordinator.db"

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection | None]:
        if not self.db_path.exists():
            yield None
            return
        db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=5.0, check_same_thread=False)
        db.row_factory = sqlite3.Row
        try:
            yield db
        finally:
            db.close()

    def _rows(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        with self._db() as db:
            if db is None:
                return []
            try:
                return [dict(r) for r in db.execute(sql, args).fetchall()]
            except sqlite3.OperationalError as e:
                if "no such table" in str(e):  # the coordinator has not created its schema yet
                    return []
                raise

    # -- sites ---------------------------------------------------------------------
    def sites(self) -> list[dict[str, Any]]:
        out = []
        for r in self._rows("SELECT site_id, kid, enrolled_at, hello_json, hello_at FROM sites ORDER BY site_id"):
            r["hello"] = _loads(r.pop("hello_json"), None)
            out.append(r)
        return out

    def liveness(self) -> dict[str, dict[str, Any]]:
        """Each site's newest heartbeat (``coordinator/liveness.py``); empty for a state written before beats."""
        return {r["site_id"]: r for r in self._rows("SELECT site_id, seen_at, every_s, seq FROM liveness")}

    def listening(self, now: float | None = None) -> bool:
        """Someone records heartbeats: a run here is running (its control queue), or a liveness
        monitor (``coordinator serve --broker``) ticked recently (coordinator/liveness_monitor.py)."""
        from coordinator.liveness import fresh

        if self._rows("SELECT 1 FROM runs WHERE status = 'running' LIMIT 1"):
            return True
        now = time.time() if now is None else now
        return any(fresh(m, now=now) for m in self._rows("SELECT name, seen_at, every_s FROM monitors"))

    def last_replies(self) -> dict[str, float]:
        """Latest time each site's message reached the coordinator (any verdict)."""
        rows = self._rows("SELECT site, MAX(received_at) AS at FROM updates WHERE site IS NOT NULL GROUP BY site")
        return {r["site"]: r["at"] for r in rows}

    def privacy_lines(self) -> list[dict[str, Any]]:
        """Every ε a site reported, with the run's dataset, oldest first."""
        return self._rows(
            "SELECT p.run_id, p.round, p.site, p.epsilon, p.delta, p.reported_at, r.experiment_json "
            "FROM privacy p JOIN runs r ON r.run_id = p.run_id ORDER BY p.reported_at"
        )

    # -- runs ----------------------------------------------------------------------
    def runs(self, status: str | None = None) -> list[dict[str, Any]]:
        sql = ("SELECT run_id, federation, aggregator, status, reason, rounds_planned, created_at, finished_at, "
               "experiment_json, result_json, "
               "(SELECT COUNT(*) FROM rounds WHERE rounds.run_id = runs.run_id) AS rounds_done, "
               "(SELECT MAX(committed_at) FROM rounds WHERE rounds.run_id = runs.run_id) AS last_commit FROM runs")
        args: tuple = ()
        if status:
            sql += " WHERE status = ?"
            args = (status,)
        out = []
        for r in self._rows(sql + " ORDER BY created_at DESC", args):
            r["experiment"] = _loads(r.pop("experiment_json"), {})
            r["result"] = _loads(r.pop("result_json"), None)
            out.append(r)
        return out

    def run(self, run_id: str) -> dict[str, Any]:
        rows = self._rows("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        if not rows:
            raise NoSuchRun(run_id)
        r = rows[0]
        r["experiment"] = _loads(r.pop("experiment_json"), {})
        r["sites"] = _loads(r.pop("sites_json"), [])
        r["result"] = _loads(r.pop("result_json"), None)
        return r

    def rounds(self, run_id: str, after: int = 0) -> list[dict[str, Any]]:
        out = []
        for r in self._rows("SELECT * FROM rounds WHERE run_id = ? AND round > ? ORDER BY round", (run_id, after)):
            r["sampled"] = _loads(r.pop("sampled_json"), [])
            r["metrics"] = _loads(r.pop("metrics_json"), {})
            out.append(r)
        return out

    def messages(self, run_id: str) -> list[dict[str, Any]]:
        """The update log of a run without its bulky columns (signature, body path)."""
        out = []
        for r in self._rows(
            "SELECT round, message_id, site, kind, split, bytes, verdict, reason, num_examples, staleness, "
            "metrics_json, epsilon, delta, received_at FROM updates WHERE run_id = ? ORDER BY id", (run_id,)
        ):
            r["metrics"] = _loads(r.pop("metrics_json"), {})
            out.append(r)
        return out

    def checkpoint(self, run_id: str) -> tuple[Path, str, int] | None:
        """(path, sha256 recorded, round) of the run's latest global model, or None."""
        rows = self._rows(
            "SELECT round, checkpoint_path, checkpoint_sha256 FROM rounds WHERE run_id = ? ORDER BY round DESC LIMIT 1",
            (run_id,),
        )
        if rows:
            return self.dir / rows[0]["checkpoint_path"], rows[0]["checkpoint_sha256"], int(rows[0]["round"])
        run = self._rows("SELECT initial_checkpoint, initial_sha256 FROM runs WHERE run_id = ?", (run_id,))
        if run and run[0]["initial_checkpoint"]:
            return self.dir / run[0]["initial_checkpoint"], run[0]["initial_sha256"], 0
        return None

    def federations(self) -> list[str]:
        return [r["federation"] for r in self._rows("SELECT DISTINCT federation FROM runs ORDER BY federation")]
