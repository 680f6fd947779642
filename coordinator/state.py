"""The coordinator's state directory: one SQLite database plus checkpoint and body files.

Layout of ``state_dir``::

    coordinator.db                    sites + keys, runs, rounds, update log, privacy ledger
    runs/<run_id>/checkpoints/round-0003.safetensors   global model after round 3 (sha256 in db)
    runs/<run_id>/checkpoints/round-0003.agg.safetensors  aggregator state (FedAdam moments ...)
    runs/<run_id>/bodies/<body_sha256>.body             signed body of every accepted message (named by its hash)

Everything a round changes (its checkpoint row, its accepted updates, the privacy
ledger lines) is written in one transaction; the run loop acks the round's deliveries
only after that commit ("ack an update only after its effect is durable").
The schema is versioned in ``meta.schema_version``; opening a newer database fails.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sites (
    site_id TEXT PRIMARY KEY,
    kid TEXT NOT NULL,
    public_pem TEXT NOT NULL,
    enrolled_at REAL NOT NULL,
    hello_json TEXT,
    hello_at REAL
);
CREATE TABLE IF NOT EXISTS keys (      -- every key ever enrolled, so old signatures stay auditable
    kid TEXT PRIMARY KEY,
    site_id TEXT NOT NULL,
    public_pem TEXT NOT NULL,
    enrolled_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    federation TEXT NOT NULL,
    aggregator TEXT NOT NULL,
    experiment_json TEXT NOT NULL,
    seed INTEGER NOT NULL,
    rounds_planned INTEGER NOT NULL,
    sites_json TEXT NOT NULL,
    coordinator_kid TEXT,
    initial_checkpoint TEXT,
    initial_sha256 TEXT,
    status TEXT NOT NULL,              -- running | completed | failed | stopped
    reason TEXT,
    created_at REAL NOT NULL,
    finished_at REAL,
    result_json TEXT
);
CREATE TABLE IF NOT EXISTS rounds (
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    sampled_json TEXT NOT NULL,
    replies INTEGER NOT NULL,
    loss REAL, accuracy REAL, auc REAL,
    metrics_json TEXT NOT NULL,        -- aggregated + per-site validation metrics
    wall_s REAL, train_s REAL, communication_s REAL, aggregation_s REAL,
    checkpoint_path TEXT NOT NULL,
    checkpoint_sha256 TEXT NOT NULL,
    agg_state_path TEXT,
    agg_state_sha256 TEXT,
    committed_at REAL NOT NULL,
    PRIMARY KEY (run_id, round)
);
CREATE TABLE IF NOT EXISTS updates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    site TEXT,
    kind TEXT,                         -- Update | EvalResult | Declined | ?
    split TEXT,                        -- validation | test for EvalResult
    bytes INTEGER NOT NULL,
    body_sha256 TEXT,
    frame_sha256 TEXT,
    signature BLOB,
    kid TEXT,
    verdict TEXT NOT NULL,             -- accepted | rejected | late | stale | duplicate | declined | secagg
    reason TEXT,
    num_examples INTEGER,
    base_round INTEGER,
    staleness INTEGER,
    metrics_json TEXT,
    epsilon REAL,
    delta REAL,
    body_path TEXT,
    task_id TEXT,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS updates_run ON updates (run_id, round);
CREATE INDEX IF NOT EXISTS updates_msg ON updates (message_id);
CREATE TABLE IF NOT EXISTS revoked (    -- keys distrusted for good (fedbus provision --revoke)
    kid TEXT PRIMARY KEY,
    site_id TEXT NOT NULL,
    revoked_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (      -- every task sent, so a late reply is told from a forged one
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    site TEXT NOT NULL,
    kind TEXT NOT NULL,                -- TrainTask | EvalTask
    split TEXT,
    task_id TEXT PRIMARY KEY,
    sent_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_run ON tasks (run_id, round);
CREATE TABLE IF NOT EXISTS liveness (   -- each site's newest Heartbeat (coordinator/liveness.py)
    site_id TEXT PRIMARY KEY,
    seen_at REAL NOT NULL,             -- min(received, the beat's sent_at): never later than it was alive
    every_s REAL NOT NULL,             -- the interval the site announced
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS monitors (   -- who watches heartbeats between runs (coordinator/liveness_monitor.py)
    name TEXT PRIMARY KEY,             -- e.g. "dashboard:<federation>"
    seen_at REAL NOT NULL,             -- its last tick while its consumer was subscribed
    every_s REAL NOT NULL              -- its tick interval: stale after liveness.MISSED of them
);
CREATE TABLE IF NOT EXISTS privacy (    -- the sites' privacy ledger, as they reported it
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    site TEXT NOT NULL,
    epsilon REAL,
    delta REAL,
    message_id TEXT NOT NULL,
    reported_at REAL NOT NULL
);
"""


class StateError(RuntimeError):
    """The state directory is missing something or is inconsistent; the message says what."""


@dataclass
class UpdateRow:
    """One line of the update log (every message from a site, whatever its verdict)."""

    run_id: str
    round: int
    message_id: str
    site: str | None
    kind: str | None
    bytes: int
    verdict: str
    reason: str | None = None
    split: str | None = None
    body_sha256: str | None = None
    frame_sha256: str | None = None
    signature: bytes | None = None
    kid: str | None = None
    num_examples: int | None = None
    base_round: int | None = None
    staleness: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    epsilon: float | None = None
    delta: float | None = None
    body_path: str | None = None
    task_id: str | None = None
    received_at: float = field(default_factory=time.time)


@dataclass
class RoundRow:
    run_id: str
    round: int
    attempts: int
    sampled: list[str]
    replies: int
    loss: float | None
    accuracy: float | None
    auc: float | None
    metrics: dict[str, Any]
    wall_s: float
    train_s: float
    communication_s: float
    aggregation_s: float
    checkpoint_path: str
    checkpoint_sha256: str
    agg_state_path: str | None = None
    agg_state_sha256: str | None = None
    committed_at: float = field(default_factory=time.time)


class StateStore:
    """SQLite state of one coordinator; safe to use from several threads (one lock)."""

    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.dir / "coordinator.db"
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) > SCHEMA_VERSION:
            raise StateError(
                f"{self.db_path} has schema version {row[0]}, this fedbus understands up to {SCHEMA_VERSION}: upgrade fedbus"
            )

    # -- plumbing ------------------------------------------------------------------
    class _Tx:
        def __init__(self, store: "StateStore") -> None:
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            self.store._lock.acquire()
            self.store._db.execute("BEGIN IMMEDIATE")
            return self.store._db

        def __exit__(self, exc_type, exc, tb) -> None:
            try:
                self.store._db.execute("ROLLBACK" if exc_type else "COMMIT")
            finally:
                self.store._lock.release()

    def _tx(self) -> "StateStore._Tx":
        return StateStore._Tx(self)

    def _query(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def run_dir(self, run_id: str) -> Path:
        return self.dir / "runs" / run_id

    # -- sites and keys --------------------------------------------------------------
    def enroll(self, site_id: str, public_pem: bytes | str) -> str:
        """Record (or replace) a site's public key; returns its key id."""
        from protocol.signing import key_id_of_pem

        pem = public_pem.encode() if isinstance(public_pem, str) else bytes(public_pem)
        try:
            kid = key_id_of_pem(pem)
        except Exception as e:  # noqa: BLE001 - any parse failure means "not a key"
            raise StateError(f"{site_id}: not an Ed25519 public key in PEM format ({e})") from e
        now = time.time()
        with self._tx() as db:
            # One key signs for one site only: a key another site holds (now, or in the key
            # history kept for audits) would let one site's frames verify as the other's.
            other = db.execute(
                "SELECT site_id FROM sites WHERE kid=? AND site_id<>? UNION "
                "SELECT site_id FROM keys WHERE kid=? AND site_id<>?", (kid, site_id, kid, site_id),
            ).fetchone()
            if db.execute("SELECT 1 FROM revoked WHERE kid=?", (kid,)).fetchone() is not None:
                raise StateError(f"{site_id}: key {kid} was revoked; generate a new key for the site and enroll that")
            if other is not None:
                raise StateError(
                    f"{site_id}: key {kid} is already enrolled for site {other[0]!r}; one key cannot sign for two "
                    f"sites: generate a key for {site_id} (fedbus keys generate {site_id} --out DIR) and enroll that"
                )
            db.execute(
                "INSERT INTO sites (site_id, kid, public_pem, enrolled_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(site_id) DO UPDATE SET kid=excluded.kid, public_pem=excluded.public_pem, "
                "enrolled_at=excluded.enrolled_at",
                (site_id, kid, pem.decode(), now),
            )
            db.execute("INSERT OR IGNORE INTO keys VALUES (?, ?, ?, ?)", (kid, site_id, pem.decode(), now))
        return kid

    def revoke(self, site_id: str) -> str | None:
        """Distrust ``site_id``'s key for good and forget the site (its old signatures stay
        auditable from the key history); returns the revoked key id, None if not enrolled."""
        with self._tx() as db:
            row = db.execute("SELECT kid FROM sites WHERE site_id=?", (site_id,)).fetchone()
            if row is None:
                return None
            db.execute("INSERT OR IGNORE INTO revoked VALUES (?, ?, ?)", (row[0], site_id, time.time()))
            db.execute("DELETE FROM sites WHERE site_id=?", (site_id,))
        return row[0]

    def sites(self) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM sites ORDER BY site_id")
        out = []
        for r in rows:
            d = dict(r)
            d["hello"] = json.loads(d.pop("hello_json")) if d.get("hello_json") else None
            out.append(d)
        return out

    def site(self, site_id: str) -> dict[str, Any] | None:
        return next((s for s in self.sites() if s["site_id"] == site_id), None)

    def record_hello(self, site_id: str, hello: dict[str, Any], at: float | None = None) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE sites SET hello_json=?, hello_at=? WHERE site_id=?",
                (json.dumps(hello, sort_keys=True), at or time.time(), site_id),
            )

    def record_heartbeat(self, site_id: str, *, seen_at: float, every_s: float, seq: int) -> None:
        """Keep ``site_id``'s newest beat (an older one, replayed or reordered, changes nothing)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO liveness VALUES (?, ?, ?, ?) ON CONFLICT(site_id) DO UPDATE SET "
                "seen_at=excluded.seen_at, every_s=excluded.every_s, seq=excluded.seq "
                "WHERE excluded.seen_at > liveness.seen_at",
                (site_id, seen_at, every_s, seq),
            )

    def record_monitor(self, name: str, *, seen_at: float, every_s: float) -> None:
        """``name`` is consuming heartbeats now; it says so again every ``every_s`` while it does."""
        with self._tx() as db:
            db.execute("INSERT INTO monitors VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                       "seen_at=excluded.seen_at, every_s=excluded.every_s", (name, seen_at, every_s))

    def drop_monitor(self, name: str) -> None:
        """``name`` stopped watching (a clean stop; a crash is told by its row going stale)."""
        with self._tx() as db:
            db.execute("DELETE FROM monitors WHERE name=?", (name,))

    def liveness(self) -> dict[str, dict[str, float]]:
        return {r["site_id"]: {"seen_at": r["seen_at"], "every_s": r["every_s"], "seq": r["seq"]}
                for r in self._query("SELECT * FROM liveness")}

    def key(self, kid: str) -> tuple[str, bytes] | None:
        rows = self._query("SELECT site_id, public_pem FROM keys WHERE kid=?", (kid,))
        return (rows[0]["site_id"], rows[0]["public_pem"].encode()) if rows else None

    def trust_store(self):
        """A ``TrustStore`` of every currently enrolled site key."""
        from protocol.signing import TrustStore

        import structlog

        trust = TrustStore()
        # Earliest enrollment first: with a duplicate key left by an older fedbus, the site
        # that enrolled it first keeps it and the later one is not trusted (and told why).
        for s in sorted(self.sites(), key=lambda s: (s["enrolled_at"], s["site_id"])):
            try:
                trust.add(s["site_id"], s["public_pem"].encode())
            except ValueError as e:
                structlog.get_logger(__name__).error(
                    "site not trusted: its key is enrolled for another site; re-enroll it with its own key",
                    site_id=s["site_id"], kid=s["kid"], error=str(e))
        return trust

    # -- runs ------------------------------------------------------------------------
    def create_run(
        self, *, run_id: str, federation: str, aggregator: str, experiment: dict[str, Any], seed: int,
        rounds: int, sites: list[str], coordinator_kid: str | None,
    ) -> None:
        with self._tx() as db:
            if db.execute("SELECT 1 FROM runs WHERE run_id=?", (run_id,)).fetchone():
                raise StateError(f"run {run_id!r} already exists in {self.db_path}; use --resume or another run id")
            db.execute(
                "INSERT INTO runs (run_id, federation, aggregator, experiment_json, seed, rounds_planned, sites_json, "
                "coordinator_kid, status, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'running', ?)",
                (run_id, federation, aggregator, json.dumps(experiment), seed, rounds, json.dumps(sites),
                 coordinator_kid, time.time()),
            )

    def run(self, run_id: str) -> dict[str, Any]:
        rows = self._query("SELECT * FROM runs WHERE run_id=?", (run_id,))
        if not rows:
            known = [r["run_id"] for r in self._query("SELECT run_id FROM runs ORDER BY created_at DESC LIMIT 10")]
            raise StateError(f"no run {run_id!r} in {self.db_path}; recent runs: {', '.join(known) or 'none'}")
        d = dict(rows[0])
        d["experiment"] = json.loads(d.pop("experiment_json"))
        d["sites"] = json.loads(d.pop("sites_json"))
        d["result"] = json.loads(d.pop("result_json")) if d.get("result_json") else None
        return d

    def runs(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query(
            "SELECT run_id, federation, aggregator, status, reason, rounds_planned, created_at, finished_at, "
            "(SELECT COUNT(*) FROM rounds WHERE rounds.run_id = runs.run_id) AS rounds_done FROM runs ORDER BY created_at"
        )]

    def latest_unfinished(self, federation: str | None = None) -> str | None:
        sql = "SELECT run_id FROM runs WHERE status='running'"
        args: tuple = ()
        if federation:
            sql += " AND federation=?"
            args = (federation,)
        rows = self._query(sql + " ORDER BY created_at DESC LIMIT 1", args)
        return rows[0]["run_id"] if rows else None

    def request_stop(self, run_id: str, reason: str = "stopped on request") -> None:
        """Ask the coordinator running ``run_id`` to stop after its current round (a flag it polls)."""
        self.run(run_id)  # an unknown run is an error that names the recent ones
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"stop:{run_id}", reason))

    def stop_requested(self, run_id: str) -> str | None:
        """The reason given to ``request_stop``, or None."""
        rows = self._query("SELECT value FROM meta WHERE key=?", (f"stop:{run_id}",))
        return rows[0]["value"] if rows else None

    def set_initial_checkpoint(self, run_id: str, path: str, sha256: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE runs SET initial_checkpoint=?, initial_sha256=? WHERE run_id=?", (path, sha256, run_id))

    def record_task(self, *, run_id: str, round: int, site: str, kind: str, task_id: str, split: str | None = None) -> None:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO tasks VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (run_id, round, site, kind, split, task_id, time.time()))

    def record_tasks(self, *, run_id: str, tasks: list[tuple[int, str, str, str | None, str]]) -> None:
        """Record many ``(round, site, kind, split, task_id)`` in one transaction (one fsync)."""
        now = time.time()
        with self._tx() as db:
            db.executemany("INSERT OR IGNORE INTO tasks VALUES (?, ?, ?, ?, ?, ?, ?)",
                           [(run_id, r, site, kind, split, task_id, now) for r, site, kind, split, task_id in tasks])

    def tasks(self, run_id: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query("SELECT * FROM tasks WHERE run_id=? ORDER BY sent_at", (run_id,))]

    def set_run_sites(self, run_id: str, sites: list[str]) -> None:
        with self._tx() as db:
            db.execute("UPDATE runs SET sites_json=? WHERE run_id=?", (json.dumps(sites), run_id))

    def finish_run(self, run_id: str, *, status: str, reason: str | None, result: dict[str, Any] | None) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE runs SET status=?, reason=?, finished_at=?, result_json=? WHERE run_id=?",
                (status, reason, time.time(), json.dumps(result) if result is not None else None, run_id),
            )

    # -- rounds and the update log ---------------------------------------------------------
    def commit_round(self, row: RoundRow, updates: list[UpdateRow]) -> None:
        """The round's checkpoint row, its messages and privacy lines, in one transaction."""
        d = asdict(row)
        d["sampled_json"] = json.dumps(d.pop("sampled"))
        d["metrics_json"] = json.dumps(d.pop("metrics"), default=float)
        cols = ", ".join(d)
        with self._tx() as db:
            db.execute(f"INSERT OR REPLACE INTO rounds ({cols}) VALUES ({', '.join('?' * len(d))})", tuple(d.values()))
            self._insert_updates(db, updates)

    def record(self, updates: list[UpdateRow]) -> None:
        """Log messages whose verdict needs no checkpoint (rejected, late, duplicate, ...)."""
        if updates:
            with self._tx() as db:
                self._insert_updates(db, updates)

    @staticmethod
    def _insert_updates(db: sqlite3.Connection, updates: list[UpdateRow]) -> None:
        for u in updates:
            d = asdict(u)
            d["metrics_json"] = json.dumps(d.pop("metrics"), default=float)
            db.execute(f"INSERT INTO updates ({', '.join(d)}) VALUES ({', '.join('?' * len(d))})", tuple(d.values()))
            if u.verdict == "accepted" and u.kind in ("Update", "MaskedUpdate"):
                db.execute(
                    "INSERT INTO privacy VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (u.run_id, u.round, u.site, u.epsilon, u.delta, u.message_id, u.received_at),
                )

    def rounds(self, run_id: str) -> list[dict[str, Any]]:
        out = []
        for r in self._query("SELECT * FROM rounds WHERE run_id=? ORDER BY round", (run_id,)):
            d = dict(r)
            d["sampled"] = json.loads(d.pop("sampled_json"))
            d["metrics"] = json.loads(d.pop("metrics_json"))
            out.append(d)
        return out

    def last_round(self, run_id: str) -> dict[str, Any] | None:
        rounds = self.rounds(run_id)
        return rounds[-1] if rounds else None

    def updates(self, run_id: str, *, verdict: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM updates WHERE run_id=?", [run_id]
        if verdict:
            sql += " AND verdict=?"
            args.append(verdict)
        if kind:
            sql += " AND kind=?"
            args.append(kind)
        out = []
        for r in self._query(sql + " ORDER BY id", args):
            d = dict(r)
            d["metrics"] = json.loads(d.pop("metrics_json") or "{}")
            out.append(d)
        return out

    def accepted_message(self, message_id: str) -> bool:
        """Whether a message with this id was accepted and committed (in any run)."""
        return bool(self._query("SELECT 1 FROM updates WHERE message_id=? AND verdict='accepted' LIMIT 1", (message_id,)))

    def task_answered(self, run_id: str, task_id: str) -> bool:
        """Whether an accepted, committed reply to ``task_id`` exists."""
        return bool(self._query(
            "SELECT 1 FROM updates WHERE run_id=? AND task_id=? AND verdict='accepted' LIMIT 1", (run_id, task_id)))

    def accepted_sites(self, run_id: str, round: int, kind: str = "Update") -> set[str]:
        rows = self._query(
            "SELECT site FROM updates WHERE run_id=? AND round=? AND kind=? AND verdict='accepted'", (run_id, round, kind)
        )
        return {r["site"] for r in rows}

    def privacy(self, run_id: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query("SELECT * FROM privacy WHERE run_id=? ORDER BY round, site", (run_id,))]
