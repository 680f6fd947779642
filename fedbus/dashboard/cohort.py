"""The dashboard's Cohort page: the sites' Table 1 before training, per site and pooled, with histograms.

Rendered on the server from the cohort documents in ``STATE/cohorts/`` (``coordinator.cohort``),
so it needs no script: the table's figures are those ``fedbus coordinator cohort`` prints, every
one with its 95 % interval, and each numeric column with public bounds gets a histogram (inline
SVG, one per site and the pooled one) drawn from the released (noisy) bins. Read-only: it shows
what the sites already released; asking for a new table is ``fedbus coordinator cohort``.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from coordinator.cohort import cohorts, rows_of

_E = html.escape


def cohort_doc(state: Path, cohort_id: str | None = None) -> dict[str, Any]:
    """The JSON twin: the stored cohorts (newest first, ids only) and the one shown."""
    docs = cohorts(state)
    shown = next((d for d in docs if d["cohort_id"] == cohort_id), None) if cohort_id else (docs[0] if docs else None)
    return {"cohorts": [{"cohort_id": d["cohort_id"], "dataset": d.get("dataset"), "experiment": d.get("experiment"),
                         "created_at": d.get("created_at")} for d in docs], "cohort": shown}


def _histogram(hist: dict[str, Any], label: str) -> str:
    counts, edges = hist["counts"], hist["edges"]
    w, h, pad = 240, 90, 16
    top = max(counts) or 1.0
    bw = (w - 2) / len(counts)
    bars = "".join(
        f'<rect class="hbin" x="{1 + i * bw:.1f}" y="{h - pad - (c / top) * (h - pad - 4):.1f}" width="{max(bw - 1, 1):.1f}" '
        f'height="{(c / top) * (h - pad - 4):.1f}" fill="#1f6feb"><title>{edges[i]:g}–{edges[i + 1]:g}: {c:.0f}</title></rect>'
        for i, c in enumerate(counts))
    axis = (f'<text x="1" y="{h - 3}" font-size="10" fill="#5d6b7a">{edges[0]:g}</text>'
            f'<text x="{w - 1}" y="{h - 3}" font-size="10" fill="#5d6b7a" text-anchor="end">{edges[-1]:g}</text>')
    return (f'<figure class="hist"><svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
            f'aria-label="{_E(label)}">{bars}{axis}</svg><figcaption>{_E(label)}</figcaption></figure>')


def render_cohort(state: Path, *, cohort_id: str | None, nav: str, footer: str) -> str:
    doc = cohort_doc(state, cohort_id)
    c = doc["cohort"]
    body: list[str] = ['<h1>Cohort</h1>']
    if c is None:
        body.append('<p class="sub">No cohort table yet. Ask the sites for one before training: '
                    '<code>fedbus coordinator cohort EXPERIMENT.json</code> (or <code>fedbus simulate '
                    'EXPERIMENT.json --cohort-only --out DIR</code>).</p>')
    else:
        released = [s for s, v in c["sites"].items() if v["status"] == "released"]
        body.append(f'<p class="sub">{_E(str(c.get("dataset")))} · experiment {_E(str(c.get("experiment")))} · '
                    f'<span class="mono">{_E(c["cohort_id"])}</span></p>')
        body.append('<p class="explain">Each figure: the value, then its 95 % interval. Every hospital added '
                    'random noise to its counts before releasing them (differential privacy), and the interval '
                    'covers that noise: the true figure for these patients lies in it 95 times in 100. Pooled = '
                    'the sum of the hospitals\' releases.</p>')
        heads = "".join(f"<th>{_E(s)}</th>" for s in released) + ("<th>pooled</th>" if c.get("pooled") else "")
        rows = "".join(f"<tr><td>{_E(label)}</td>" + "".join(f'<td class="num">{_E(x)}</td>' for x in cells) + "</tr>"
                       for label, cells in rows_of(c))
        body.append(f'<div class="card"><table id="cohort-table"><thead><tr><th></th>{heads}</tr></thead>'
                    f'<tbody>{rows}</tbody></table></div>')
        body.append('<h2>Histograms</h2><p class="explain">Released (noisy) counts per bin over each column\'s '
                    'public range; a bar can be zero where noise took the count below zero.</p>')
        tables = [(s, c["sites"][s]["table"]) for s in released] + ([("pooled", c["pooled"]["table"])]
                                                                     if c.get("pooled") else [])
        for i, col in enumerate(c["columns"]):
            figs = [(name, t["columns"][i].get("histogram")) for name, t in tables]
            if not any(hg for _, hg in figs):
                continue
            body.append(f'<div class="card histograms" data-column="{_E(col["name"])}"><h3>{_E(col["name"])}</h3>'
                        + "".join(_histogram(hg, name) for name, hg in figs if hg) + "</div>")
        body.append("<h2>Privacy</h2><table id='cohort-privacy'><thead><tr><th>site</th><th>release</th>"
                    "<th class='num'>ε spent (all releases)</th><th class='num'>δ</th><th>accountant</th>"
                    "<th class='num'>noise SD per count</th></tr></thead><tbody>")
        for s, v in c["sites"].items():
            if v["status"] != "released":
                body.append(f"<tr><td>{_E(s)}</td><td colspan='5'>{_E(v['status'])}: "
                            f"{_E(str(v.get('detail', '')))}</td></tr>")
            elif v["mode"] == "exact":
                body.append(f"<tr><td>{_E(s)}</td><td>exact: not private (a leak the hospital's policy allows)</td>"
                            "<td class='num'>-</td><td class='num'>-</td><td>-</td><td class='num'>0</td></tr>")
            else:
                body.append(f"<tr><td>{_E(s)}</td><td>DP (Gaussian)</td><td class='num'>{v['epsilon']:.3g}</td>"
                            f"<td class='num'>{v['delta']:g}</td><td>{_E(str(v['accountant']))}</td>"
                            f"<td class='num'>{v['noise_sd']:.3g}</td></tr>")
        body.append("</tbody></table>")
        if len(doc["cohorts"]) > 1:
            links = "".join(f'<li><a href="/cohort?id={_E(d["cohort_id"])}">{_E(d["cohort_id"])}</a> '
                            f'{_E(str(d.get("dataset")))}</li>' for d in doc["cohorts"])
            body.append(f"<h2>Earlier cohort tables</h2><ul>{links}</ul>")
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fedbus · Cohort</title>
<link rel="stylesheet" href="/static/style.css">
<link rel="stylesheet" href="/static/cohort.css">
</head>
<body data-page="cohort">
<header><span class="brand">fedbus</span><nav>{nav}</nav></header>
<main id="app">{''.join(body)}</main>
<footer>{footer}</footer>
</body>
</html>
"""
