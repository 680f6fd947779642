// fedbus model registry: the signed versions (Mark valid / `coordinator models register`) and their model cards.
(function () {
  "use strict";
  const app = document.getElementById("app");
  function el(tag, attrs, ...kids) {
    const n = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) { if (v === null || v === undefined || v === false) continue; if (k === "class") n.className = v; else n.setAttribute(k, v); }
    for (const k of kids.flat()) if (k !== null && k !== undefined) n.append(k.nodeType ? k : String(k));
    return n;
  }
  async function main() {
    const r = await fetch("/api/models", { credentials: "same-origin" });
    if (r.status === 401) { location.assign("/login"); return; }
    const doc = await r.json();
    const pct = (f) => (f && f.value !== undefined ? `${(100 * f.value).toFixed(1)} %` + (f.ci95 ? ` (${(100 * f.ci95[0]).toFixed(0)}–${(100 * f.ci95[1]).toFixed(0)})` : "") : "–");
    const rows = doc.models.map((m) => el("tr", { "data-model": m.name, "data-version": m.version },
      el("td", {}, m.name), el("td", { class: "num" }, "v" + m.version), el("td", {}, el("a", { href: `/runs/${m.run_id}` }, m.run_id)),
      el("td", {}, m.approved_by), el("td", {}, m.approved_at_utc), el("td", {}, pct(m.accuracy)),
      el("td", {}, Object.entries(m.epsilon || {}).map(([s, e]) => `${s} ${e === null ? "∞" : (+e).toFixed(2)}`).join(", ")),
      el("td", { class: m.verified ? "ok" : "bad" }, m.verified ? "verifies" : "does NOT verify"),
      el("td", {}, el("a", { href: m.card, class: "card-link" }, "model card"), " · ", el("a", { href: m.card_md }, "Markdown"))));
    app.replaceChildren(el("h1", {}, "Model registry"),
      el("p", { class: "sub" }, "Every version someone marked valid, signed by the coordinator's key; `fedbus coordinator audit RUN` re-verifies them."),
      doc.models.length ? el("table", { id: "models" }, el("thead", {}, el("tr", {}, ["Model", "Version", "Run", "Approved by", "When (UTC)", "Test accuracy (95 % CI)", "ε per site", "Signature", ""].map((h) => el("th", {}, h)))), el("tbody", {}, rows))
        : el("p", { class: "muted", id: "no-models" }, "No model has been marked valid yet: an approver marks a finished run's model valid on its run page."));
  }
  main().catch((e) => app.replaceChildren(el("div", { class: "msg bad" }, "Could not load the registry: " + e.message)));
})();
