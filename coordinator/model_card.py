"""A model card per registry version, in Markdown and HTML, from one list of sections.

Built from the signed registry entry (coordinator/model_registry.py) and the run's stored
result, never from numbers typed by hand: intended use, data (sites, rows; the cohort
table when a cohort release is given), performance overall and per site with 95 %
intervals, privacy (ε per site with δ and accountant, secure aggregation or not),
limitations (one-class sites, small test sets, sites without DP) and the audit trail.
A section whose input is absent (no cohort) is left out rather than filled with guesses.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

SMALL_TEST = 30  # fewer test rows than this: intervals too wide to tell models apart
Row = list[str]


class HasRuns(Protocol):
    """A state reader (``StateStore``, or the dashboard's read-only ``StateReader``)."""

    def run(self, run_id: str) -> dict[str, Any]: ...

    def rounds(self, run_id: str) -> list[dict[str, Any]]: ...


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    header: Row | None = None
    rows: list[Row] = field(default_factory=list)
    anchor: str = ""


def _pct(fig: dict[str, Any] | None, *, percent: bool = True) -> str:
    if not fig:
        return "not reported"
    scale, unit = (100.0, " %") if percent else (1.0, "")
    v = f"{fig['value'] * scale:.1f}{unit}" if percent else f"{fig['value']:.3f}"
    ci = fig.get("ci95")
    if ci:
        lo, hi = (f"{c * scale:.1f}" if percent else f"{c:.3f}" for c in ci)
        return f"{v} (95 % CI {lo}–{hi}{unit.strip() and ' %'})"
    return f"{v} (no interval reported)"


def sections(record: dict[str, Any], *, run: dict[str, Any] | None = None, cohort: dict[str, Any] | None = None,
             verified: bool | None = None, trail: list[dict[str, Any]] | None = None) -> list[Section]:
    run = run or {}
    exp = run.get("experiment") or {}
    result = run.get("result") or {}
    info = exp.get("basic_info") or {}
    ds = exp.get("dataset") or {}
    m = record.get("metrics") or {}
    per_site = m.get("per_site") or {}
    priv = record.get("privacy") or {}
    what = str(info.get("description") or info.get("name") or record.get("experiment_name") or record["name"]).strip()
    out = [Section("Intended use", anchor="intended-use", paragraphs=[
        what if what.endswith(".") else what + ".",
        f"Predicts `{ds.get('target', '?')}` ({ds.get('task', 'task not stated')}) from the dataset "
        f"`{record.get('dataset') or ds.get('name') or '?'}`, trained by federated learning across "
        f"{len(record.get('sites') or [])} sites without their rows leaving them.",
        "For research on populations like the sites' own. Validated only on the sites' test splits: "
        "not for a clinical decision about a patient without validation where it is to be used.",
    ])]
    plan = (result.get("privacy") or {}).get("plan") or {}
    data = Section("Data", anchor="data", header=["Site", "Rows announced", "Training rows", "Test rows"])
    for site in record.get("sites") or sorted(per_site):
        p = plan.get(site) or {}
        data.rows.append([site, str(p.get("rows", "not reported")), str(p.get("n_train", "not reported")),
                          str((per_site.get(site) or {}).get("n_test", "not reported"))])
    data.paragraphs.append(f"Features: {', '.join(map(str, ds.get('features') or [])) or 'as the dataset declares'}.")
    out.append(data)
    if cohort:
        sites = ", ".join(cohort.get("sites") or [])
        coh = Section("Cohort", anchor="cohort", header=["Figure", f"Pooled over {sites}"], paragraphs=[
            f"The cohort's descriptive statistics as the sites released them (cohort {cohort.get('cohort_id')}), "
            "each with its 95 % interval (the interval covers the sites' DP noise)."])
        coh.rows = [[str(label), str(cell)] for label, cell in cohort.get("rows") or []]
        out.append(coh)
    perf = Section("Performance", anchor="performance", header=["Where", "Accuracy", "AUC", "F1", "Sensitivity", "Specificity", "Test rows"],
                   paragraphs=[f"On the sites' fixed {m.get('split', 'test')} splits, after round {record.get('round')}."])
    o = m.get("overall") or {}
    perf.rows.append(["All sites", _pct(o.get("accuracy")), _pct(o.get("auc"), percent=False), _pct(o.get("f1"), percent=False),
                      _pct(o.get("sensitivity")), _pct(o.get("specificity")), str(m.get("n_test", "not reported"))])
    for site, s in per_site.items():
        perf.rows.append([site, _pct(s.get("accuracy")), _pct(s.get("auc"), percent=False), _pct(s.get("f1"), percent=False),
                          _pct(s.get("sensitivity")), _pct(s.get("specificity")), str(s.get("n_test", "not reported"))])
    out.append(perf)
    pv = Section("Privacy", anchor="privacy", header=["Site", "ε spent", "δ", "Accountant"])
    for site, eps in (priv.get("epsilon") or {}).items():
        pv.rows.append([site, f"{eps:.3f}" if eps is not None else "∞ (no DP)", str(priv.get("delta")), str(priv.get("accountant"))])
    pv.paragraphs.append(f"Secure aggregation: {'yes' if priv.get('secure_aggregation') else 'no'} "
                         f"({'the coordinator sees only sums' if priv.get('secure_aggregation') else 'the coordinator sees each site’s DP-noised update'}). "
                         f"Budget mode: {priv.get('mode') or 'not stated'}"
                         + (f", total ε {priv['total_epsilon']:g} per site" if isinstance(priv.get('total_epsilon'), (int, float)) else "") + ".")
    out.append(pv)
    lim = []
    for site, s in per_site.items():
        if s.get("predicts_one_class"):
            lim.append(f"{site}: the model predicts one class only there; its accuracy is the majority-class rate, not skill.")
        n = s.get("n_test")
        if isinstance(n, int) and n < SMALL_TEST:
            lim.append(f"{site}: {n} test rows (fewer than {SMALL_TEST}); its intervals are wide.")
    lim += [f"{site}: trained without differential privacy (ε = ∞)." for site, e in (priv.get("epsilon") or {}).items() if e is None]
    out.append(Section("Limitations", anchor="limitations", paragraphs=lim or ["None flagged by the checks (one-class sites, small test sets, sites without DP)."]))
    audit = Section("Audit trail", anchor="audit-trail", header=["When (UTC)", "Who", "What"])
    audit.rows.append([record["approved_at_utc"], record["approved_by"],
                       f"signed: {record['name']} v{record['version']} = run {record['run_id']} round {record['round']}"])
    for line in trail or []:
        audit.rows.append([str(line.get("at_utc", "")), f"{line.get('user')} ({line.get('role')})",
                           f"{line.get('action')} {line.get('target') or ''}: {line.get('outcome')}"])
    audit.rows.sort(key=lambda r: r[0])  # ISO times: in the order things happened
    audit.paragraphs += [
        f"Checkpoint sha256 `{record['checkpoint_sha256']}`; experiment sha256 `{record['experiment_sha256']}`.",
        f"Signed by coordinator key `{record['coordinator_kid']}`"
        + ("; the signature verifies." if verified else "; the signature does NOT verify." if verified is False else "."),
        f"Re-check with `fedbus coordinator audit {record['run_id']} --state STATE`.",
    ]
    out.append(audit)
    return out


def markdown(record: dict[str, Any], **kw: Any) -> str:
    lines = [f"# Model card: {record['name']} v{record['version']}", ""]
    for s in sections(record, **kw):
        lines += [f"## {s.title}", ""]
        lines += [p + "\n" for p in s.paragraphs]
        if s.header:
            lines.append("| " + " | ".join(s.header) + " |")
            lines.append("|" + "---|" * len(s.header))
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in s.rows]
            lines.append("")
    return "\n".join(lines)


def _inline(text: str) -> str:
    """Escape, then show `code` spans as <code>."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def html_page(record: dict[str, Any], *, stylesheet: str | None = None, **kw: Any) -> str:
    title = f"Model card: {record['name']} v{record['version']}"
    body = [f"<h1>{html.escape(title)}</h1>"]
    for s in sections(record, **kw):
        body.append(f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>')
        body += [f"<p>{_inline(p)}</p>" for p in s.paragraphs]
        if s.header:
            body.append("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in s.header) + "</tr></thead><tbody>")
            body += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in s.rows]
            body.append("</tbody></table>")
        body.append("</section>")
    link = f'<link rel="stylesheet" href="{html.escape(stylesheet)}">' if stylesheet else ""
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>{link}</head>\n'
            f'<body><main class="model-card">{"".join(body)}</main></body></html>\n')


def load_cohort(state_dir: Path, run: dict[str, Any] | None) -> dict[str, Any] | None:
    """The pooled cohort table of the run's experiment (``coordinator.cohort``, the newest
    ``fedbus coordinator cohort`` release for it or its dataset) as ``{"sites", "rows": [(label,
    cell)]}`` in the Cohort page's layout (``cohort.rows_of``: each figure with its 95 % interval);
    None (no cohort released) leaves the card's cohort section out."""
    from coordinator.cohort import latest_cohort, rows_of

    if not run or not run.get("experiment"):
        return None
    try:
        doc = latest_cohort(Path(state_dir), run["experiment"])
    except (ValueError, TypeError, OSError):  # an experiment the loader refuses has no cohort to show
        return None
    pooled = (doc or {}).get("pooled") or {}
    if not isinstance((pooled.get("table") or {}).get("columns"), list) or not isinstance((doc or {}).get("columns"), list):
        return None
    try:
        rows = [(label, cells[0]) for label, cells in rows_of({**(doc or {}), "sites": {}})]
    except (KeyError, TypeError, IndexError, ValueError):  # a document another version wrote: no section, not a crash
        return None
    return {"sites": [str(s) for s in pooled.get("sites") or []], "cohort_id": (doc or {}).get("cohort_id"), "rows": rows}


def card_inputs(reader: HasRuns, state_dir: Path, signed: dict[str, Any],
                trail: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """What ``markdown``/``html_page`` take for a stored entry: its run, whether it verifies, the cohort."""
    from coordinator.audit import run_checkpoints
    from coordinator.model_registry import entry_path, verify_entry

    record = signed["record"]
    try:
        run = reader.run(record["run_id"])
    except (LookupError, RuntimeError):  # NoSuchRun, StateError: the card says what the entry says
        run = None
    verified = None
    if run is not None:
        path = entry_path(state_dir, record["name"], int(record["version"]))
        verified = verify_entry(state_dir, path, signed, run, run_checkpoints(reader, run)) is None
    return {"run": run, "verified": verified, "cohort": load_cohort(state_dir, run), "trail": trail}
