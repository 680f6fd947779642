"""The cohort before training: ask every site for its Table 1, pool the releases, keep the table.

``CohortCollector.collect`` sends one signed ``StatsTask`` per site, reads the sites'
``StatsResult``/``Declined`` replies from the federation's updates queue (signature, sender,
task id, layout and size checked; anything else is dead-lettered with its reason), and builds
the cohort document: per site, the released vector, its noise SD and the ε the site charged
(with δ and accountant), the figures read off it (``protocol.cohort.table``), and the pooled
column from the summed releases (noise variances add). Everything is post-processing of what
the sites released. Documents are kept as ``STATE/cohorts/<cohort_id>.json`` (names made here,
never from the wire); ``latest_cohort`` finds the newest for an experiment (the model card's
"data" section and the dashboard's Cohort page read it). ``rows_of`` lays the document out as
labelled rows, one cell per site and pooled, each figure with its interval (one layout for the
terminal, the Cohort page and the model card).
"""

from __future__ import annotations

import hashlib
import json
import queue
import re
import time
import uuid
from pathlib import Path
from typing import Any

import structlog

from protocol.cohort import DEFAULT_BINS, CohortSpec, pool, spec_from_experiment, table
from protocol.config import Experiment
from protocol.messages import Declined, StatsResult, StatsTask
from protocol.signing import Signer
from protocol.transport.base import Bus, Delivery, Topology
from protocol.transport.topology import TASKS, updates_queue

log = structlog.get_logger(__name__)
COORDINATOR = "coordinator"
COHORTS = "cohorts"
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class CohortFailed(Exception):
    """No cohort could be asked for (no sites, a bad experiment); says how to fix it."""


def experiment_digest(exp: Experiment) -> str:
    """SHA-256 of the experiment's canonical wire form: which experiment a cohort describes."""
    return hashlib.sha256(json.dumps(exp.to_wire(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def spec_doc(spec: CohortSpec) -> list[dict[str, Any]]:
    return [{"name": c.name, "kind": c.kind, "bounds": list(c.bounds) if c.bounds else None,
             "categories": list(c.categories), "task": c.task if c.kind == "outcome" else None} for c in spec.columns]


def build_document(exp: Experiment, spec: CohortSpec, replies: dict[str, Any], *, federation: str,
                   cohort_id: str) -> dict[str, Any]:
    """The cohort document from each site's reply (a ``StatsResult``, a ``Declined`` or None)."""
    sites: dict[str, Any] = {}
    released: list[tuple[list[float], float, float]] = []
    for site in sorted(replies):
        r = replies[site]
        if isinstance(r, StatsResult):
            sites[site] = {"status": "released", "mode": r.mode, "n": r.n, "noise_sd": r.noise_sd,
                           "epsilon": r.epsilon, "delta": r.delta, "accountant": r.accountant,
                           "values": list(r.values), "table": table(spec, r.values, n=r.n, noise_sd=r.noise_sd)}
            released.append((list(r.values), float(r.n), float(r.noise_sd)))
        elif isinstance(r, Declined):
            sites[site] = {"status": "declined", "reason": r.reason, "detail": r.detail}
        else:
            sites[site] = {"status": "no_answer", "detail": "no answer by the deadline"}
    pooled = None
    if released:
        vec, n, sd = pool(released)
        pooled = {"sites": [s for s in sorted(sites) if sites[s]["status"] == "released"], "n": n, "noise_sd": sd,
                  "table": table(spec, vec, n=n, noise_sd=sd)}
    return {"cohort_id": cohort_id, "created_at": time.time(), "federation": federation,
            "experiment": exp.name, "experiment_hash": experiment_digest(exp), "dataset": spec.dataset,
            "bins": spec.bins, "layout": spec.digest(), "columns": spec_doc(spec), "sites": sites, "pooled": pooled}


def save(state_dir: Path, doc: dict[str, Any]) -> Path:
    from protocol.durable import write_atomic

    if not _ID.match(str(doc["cohort_id"])):
        raise ValueError(f"cohort id {doc['cohort_id']!r}: letters, digits, '-', '_' and '.' only")
    path = Path(state_dir) / COHORTS / f"{doc['cohort_id']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(doc, indent=1, sort_keys=True).encode("utf-8"))
    return path


def cohorts(state_dir: Path) -> list[dict[str, Any]]:
    """Every stored cohort document, newest first."""
    out = []
    for p in sorted((Path(state_dir) / COHORTS).glob("*.json")):
        try:
            out.append(json.loads(p.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda d: -float(d.get("created_at") or 0))


def latest_cohort(state_dir: Path, experiment: Experiment | dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The newest cohort of ``experiment`` (any experiment when None): the table a model card or
    a run page shows. A run's experiment (``StateStore.run(id)["experiment"]``) may be passed as is."""
    from protocol.config import load_experiment

    want = None
    if experiment is not None:
        exp = experiment if isinstance(experiment, Experiment) else load_experiment(experiment)
        want = experiment_digest(exp)
        name = exp.dataset.name
    for doc in cohorts(state_dir):
        if want is None or doc.get("experiment_hash") == want:
            return doc
    if want is not None:  # the same dataset described by another experiment (e.g. another model)
        for doc in cohorts(state_dir):
            if doc.get("dataset") == name:
                return doc
    return None


def _fmt(fig: dict[str, Any] | None, *, pct: bool = False, digits: int = 1) -> str:
    if not fig or fig.get("value") is None:
        return "-"
    k = 100.0 if pct else 1.0
    lo, hi = fig["ci"]
    unit = " %" if pct else ""
    return f"{fig['value'] * k:.{digits}f}{unit} ({lo * k:.{digits}f}–{hi * k:.{digits}f})"


def rows_of(doc: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(label, one cell per released site then pooled) for every figure of the cohort table: the
    terminal's table (``coordinator cohort``), the dashboard's Cohort page and the model card's
    cohort section (a document whose ``sites`` is empty gives the pooled column alone)."""
    sites = [s for s, v in doc["sites"].items() if v["status"] == "released"]
    tables = [doc["sites"][s]["table"] for s in sites] + ([doc["pooled"]["table"]] if doc.get("pooled") else [])
    out: list[tuple[str, list[str]]] = [("n (announced rows)", [f"{t['n']:.0f}" for t in tables])]
    for i, col in enumerate(doc["columns"]):
        cols = [t["columns"][i] for t in tables]
        name = col["name"]
        if col["kind"] == "outcome" and col.get("task") == "binary":
            out.append((f"{name}: prevalence", [_fmt(c.get("prevalence"), pct=True) for c in cols]))
        elif col["kind"] == "categorical" or (col["kind"] == "outcome" and col.get("task") == "multiclass"):
            key, label = ("categories", "category") if col["kind"] == "categorical" else ("classes", "class")
            for j, cat in enumerate(cols[0][key] if cols else []):
                out.append((f"{name} = {cat[label]}", [_fmt(c[key][j]["share"], pct=True) for c in cols]))
        elif col.get("bounds"):
            out.append((f"{name}: mean (SD)", [f"{_fmt(c.get('mean'))}  SD {_fmt(c.get('sd'))}" for c in cols]))
            out.append((f"{name}: median [IQR]", [
                f"{_fmt(c.get('median'))} [{_fmt(c.get('q1'))}, {_fmt(c.get('q3'))}]" for c in cols]))
        out.append((f"{name}: missing", [_fmt(c.get("missing_share"), pct=True) for c in cols]))
    return out


class CohortCollector:
    """Asks ``sites`` for the cohort table of ``experiment`` over ``bus`` and keeps the answer."""

    def __init__(self, experiment: Experiment, *, bus: Bus, state_dir: Path, signer: Signer, federation: str,
                 sites: list[str] | None = None, bins: int = DEFAULT_BINS, timeout_s: float = 120.0,
                 max_skew_s: float = 300.0) -> None:
        from coordinator.state import StateStore

        self.exp = experiment
        self.spec = spec_from_experiment(experiment, bins=bins)
        self.bus, self.signer, self.federation = bus, signer, federation
        self.store = StateStore(state_dir)
        self.state_dir = Path(state_dir)
        self.sites = sorted(sites) if sites else sorted(s["site_id"] for s in self.store.sites())
        self.timeout_s, self.max_skew_s = timeout_s, max_skew_s
        self._q: queue.Queue[Delivery] = queue.Queue()

    def collect(self) -> dict[str, Any]:
        from protocol.codec import new_envelope, open_frame, seal
        from protocol.errors import ProtocolError

        if not self.sites:
            raise CohortFailed(f"no enrolled sites in {self.state_dir}: enroll them first "
                               "(`fedbus coordinator enroll SITE_ID PUBKEY --state DIR`)")
        cohort_id = f"cohort-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        trust = self.store.trust_store()
        self.bus.declare(Topology(sites=self.sites, federations=[self.federation]))
        consumer = self.bus.consume(updates_queue(self.federation), self._q.put, prefetch=64)
        sent: dict[str, str] = {}  # task id -> site
        replies: dict[str, Any] = {s: None for s in self.sites}
        deadline = time.time() + self.timeout_s
        try:
            wire = self.exp.to_wire()
            for site in self.sites:
                task = StatsTask(experiment=wire, dataset=self.spec.dataset, bins=self.spec.bins, deadline=deadline)
                env = new_envelope(task, federation=self.federation, run_id=cohort_id, round=0,
                                   sender=COORDINATOR, recipient=site)
                self.bus.publish(TASKS, site, seal(env, self.signer), message_id=env.message_id)
                sent[env.message_id] = site
            log.info("cohort_asked", cohort_id=cohort_id, sites=self.sites, values=self.spec.size())
            while any(v is None for v in replies.values()) and time.time() < deadline:
                try:
                    d = self._q.get(timeout=min(0.5, max(0.01, deadline - time.time())))
                except queue.Empty:
                    continue
                try:
                    opened = open_frame(d.body, trust)
                except ProtocolError as e:
                    d.nack(f"{e.reason}: {e}")
                    continue
                env, p = opened.envelope, opened.envelope.payload
                reason = self._refuse(env, p, opened.signer, sent, replies, cohort_id)
                if reason:
                    log.warning("cohort_reply_rejected", reason=reason, sender=opened.signer)
                    d.nack(reason)
                    continue
                replies[opened.signer] = p
                d.ack()
        finally:
            consumer.cancel()
        doc = build_document(self.exp, self.spec, replies, federation=self.federation, cohort_id=cohort_id)
        save(self.state_dir, doc)
        return doc

    def _refuse(self, env: Any, p: Any, signer: str, sent: dict[str, str], replies: dict[str, Any],
                cohort_id: str) -> str | None:
        """Why a reply is not this cohort's answer from its signer (None: it is)."""
        if env.run_id != cohort_id or env.sender != signer:
            return f"not_for_this_cohort: run {env.run_id!r} from {signer!r}"
        if not isinstance(p, (StatsResult, Declined)) or sent.get(p.task_id) != signer:
            return f"not_for_this_cohort: {env.type} does not answer a StatsTask sent to {signer!r}"
        if replies.get(signer) is not None:
            return "duplicate: this site already answered this cohort"
        if env.sent_at > time.time() + self.max_skew_s:
            return "clock_skew: sent_at is in the future"
        if isinstance(p, StatsResult):
            if p.layout != self.spec.digest() or len(p.values) != self.spec.size():
                return f"bad_layout: {len(p.values)} values in layout {p.layout}, asked {self.spec.size()} in " \
                       f"{self.spec.digest()}"
            announced = self._announced(signer)
            if announced is not None and p.n > announced:
                return f"count_bound: n {p.n} above the {announced} rows the site announced"
        return None

    def _announced(self, site: str) -> int | None:
        """The rows ``site``'s last hello announced for the dataset (None: no hello heard)."""
        row = self.store.site(site) or {}
        for d in ((row.get("hello") or {}).get("datasets") or []):
            if isinstance(d, dict) and d.get("name") == self.spec.dataset and isinstance(d.get("rows"), int):
                return int(d["rows"])
        return None
