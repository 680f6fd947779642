// fedbus model designer: edits one experiment document; the server checks it on every change
// (/api/designer/check: the same validation as `fedbus config validate`, and each site's ε plan).
(function () {
  "use strict";
  const CSRF = document.querySelector('meta[name="fedbus-csrf"]').content;
  const SESSION = JSON.parse(document.querySelector('meta[name="fedbus-session"]').content);
  const app = document.getElementById("app");
  function el(tag, attrs, ...kids) {
    const n = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") n.className = v; else if (k.startsWith("on")) n.addEventListener(k.slice(2), v); else n.setAttribute(k, v);
    }
    for (const k of kids.flat()) if (k !== null && k !== undefined) n.append(k.nodeType ? k : String(k));
    return n;
  }
  async function api(path) {
    const r = await fetch(path, { credentials: "same-origin" });
    if (r.status === 401) { location.assign("/login"); throw new Error("sign in first"); }
    if (!r.ok) throw new Error((await r.json().catch(() => ({}))).detail || r.statusText);
    return r.json();
  }
  async function post(path, body) {
    const r = await fetch(path, { method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-Fedbus-CSRF": CSRF }, body: JSON.stringify(body || {}) });
    const doc = await r.json().catch(() => ({}));
    return { status: r.status, ok: r.ok, doc, error: doc.error || doc.detail || r.statusText };
  }
  const MARKERS = ["input", "output"];
  let meta = null, doc = null, seq = 0, timer = null, saved = null;

  function say(id, text, good) { const n = document.getElementById(id); n.className = "msg " + (good ? "ok" : "bad"); n.textContent = text; }

  function syncMarkers() {  // the input width is the features chosen; the output width the last layer's
    const layers = doc.architecture.layers;
    if (doc.dataset.kind !== "signal" && layers[0].type === "input") {
      layers[0].params.features = doc.dataset.features.length;
      const sel = (doc.dataset.selected_datasets || [])[0];
      if (sel && sel.features_info) { sel.features_info.input_features = doc.dataset.features.length; sel.features_info.feature_types = { numeric: doc.dataset.features.length, categorical: 0 }; }
    }
    const last = [...layers].reverse().find((l) => !MARKERS.includes(l.type) && l.params && l.params.out_features);
    const out = layers[layers.length - 1];
    if (last && out.type === "output") out.params.features = last.params.out_features;
  }

  function changed() { syncMarkers(); renderLayers(null); clearTimeout(timer); timer = setTimeout(check, 120); }

  async function check() {
    const mine = ++seq;
    document.getElementById("check-status").textContent = "checking…";
    const r = await post("/api/designer/check", { experiment: doc });
    if (mine !== seq) return;  // a newer edit is being checked
    renderLayers(r.doc);
    const count = document.getElementById("param-count");
    const plan = document.getElementById("eps-plan");
    if (!r.ok || !r.doc.valid) {
      const e = (r.doc && r.doc.error) || { path: "", message: r.error };
      say("check-status", `invalid: ${e.path}: ${e.message}`, false);
      count.textContent = "–"; count.dataset.value = ""; plan.replaceChildren(); return;
    }
    say("check-status", `valid: input ${JSON.stringify(r.doc.input_shape)} → output ${JSON.stringify(r.doc.output_shape)}`, true);
    count.textContent = r.doc.parameters.toLocaleString("en"); count.dataset.value = r.doc.parameters;
    const p = r.doc.privacy_plan;
    if (!p) { plan.replaceChildren(el("tr", {}, el("td", { colspan: 5 }, doc.training.optimizer.differential_privacy ? "no site offers this dataset yet" : "DP is off: ε = ∞"))); return; }
    if (p.error) { plan.replaceChildren(el("tr", {}, el("td", { colspan: 5, class: "bad" }, p.error))); return; }
    plan.replaceChildren(...Object.entries(p.sites).map(([site, s]) => el("tr", { "data-site": site },
      el("td", {}, site), el("td", { class: "num" }, s.rows ?? "–"),
      el("td", { class: "num planned-epsilon", "data-epsilon": s.planned_epsilon ?? "" }, s.planned_epsilon === undefined ? "–" : (+s.planned_epsilon).toFixed(2)),
      el("td", { class: "num" }, s.noise_multiplier === undefined ? "–" : (+s.noise_multiplier).toFixed(3)),
      el("td", { class: "plan-note" }, s.warning || s.error || `δ ${s.delta ?? p.delta}, ${s.accountant ?? p.accountant}`))));
  }

  function paramInput(layer, name, spec) {
    const v = layer.params[name];
    const inp = el("input", { "data-param": name, size: 6, value: v === undefined || v === null ? "" : v, placeholder: spec.default === null || spec.default === undefined ? (spec.required ? "required" : "") : String(spec.default) });
    inp.addEventListener("change", () => {
      const t = inp.value.trim();
      if (t === "") delete layer.params[name];
      else if (spec.kind === "bool") layer.params[name] = t === "true";
      else if (!isNaN(+t)) layer.params[name] = +t; else layer.params[name] = t;
      changed();
    });
    return el("label", { class: "param" }, name + " ", inp);
  }

  function renderLayers(result) {
    const rows = (result && result.valid && result.layers) || null;
    const body = document.getElementById("layers-body");
    body.replaceChildren(...doc.architecture.layers.map((layer, i) => {
      const marker = MARKERS.includes(layer.type);
      const spec = meta.palette[layer.type] || {};
      const walk = rows && rows.find((r) => r.index === i);
      const old = document.querySelector(`#layers-body tr[data-index="${i}"] td.shape`);  // kept until the check answers
      const oldW = document.querySelector(`#layers-body tr[data-index="${i}"] td.layer-params`);
      return el("tr", { "data-index": i, "data-type": layer.type },
        el("td", { class: "num" }, i), el("td", {}, layer.type),
        el("td", {}, marker ? el("span", { class: "muted" }, JSON.stringify(layer.params)) :
          Object.entries(spec).filter(([, s]) => !s.inferred).map(([n, s]) => paramInput(layer, n, s))),
        el("td", { class: "shape mono" }, walk ? JSON.stringify(walk.output_shape) : (old && !result ? old.textContent : "–")),
        el("td", { class: "num layer-params" }, walk ? walk.parameters : (oldW && !result ? oldW.textContent : "–")),
        el("td", {}, marker ? "" : el("button", { class: "remove-layer", onclick: () => { doc.architecture.layers.splice(i, 1); changed(); } }, "remove")));
    }));
  }

  function addLayer() {
    const type = document.getElementById("layer-type").value;
    const spec = meta.palette[type];
    const params = {};
    for (const [n, s] of Object.entries(spec)) if (s.required) params[n] = n.startsWith("out") ? 16 : n === "kernel_size" ? 2 : n === "num_groups" ? 1 : 1;
    const layers = doc.architecture.layers;
    layers.splice(layers.length - 1, 0, { name: type, type, params });
    changed();
  }

  function field(id, label, get, set) {
    const inp = el("input", { id, size: 8, value: get() });
    inp.addEventListener("change", () => { set(inp.value); changed(); });
    return el("label", { class: "field" }, label + " ", inp);
  }

  function renderForm() {
    const t = doc.training, dp = () => t.optimizer.differential_privacy;
    const cat = meta.catalogue[doc.dataset.name] || { columns: [], target: doc.dataset.target, sites: {} };
    const feats = el("div", { id: "features" }, cat.columns.filter((c) => c !== cat.target).map((c) => {
      const box = el("input", { type: "checkbox", value: c, checked: doc.dataset.features && doc.dataset.features.includes(c) ? "checked" : null });
      box.addEventListener("change", () => { doc.dataset.features = [...document.querySelectorAll("#features input:checked")].map((b) => b.value); changed(); });
      return el("label", { class: "feature" }, box, " " + c);
    }));
    document.getElementById("form").replaceChildren(
      el("h2", {}, "Experiment"), field("exp-name", "Name", () => doc.basic_info.name, (v) => { doc.basic_info.name = v; }),
      el("h2", {}, "Data"), el("p", { class: "sub" }, `Dataset ${doc.dataset.name} (target ${doc.dataset.target}), offered by ${Object.keys(cat.sites).length} site(s): ${Object.entries(cat.sites).map(([s, n]) => `${s} ${n} rows`).join(", ")}`),
      doc.dataset.kind === "signal" ? el("p", { class: "muted" }, "A signal dataset: the input is its channels × length.") : feats,
      el("h2", {}, "Training"),
      field("rounds", "Rounds", () => t.rounds, (v) => { t.rounds = +v; }),
      field("epochs", "Epochs", () => t.epochs, (v) => { t.epochs = +v; }),
      field("batch-size", "Batch size", () => t.batch_size, (v) => { t.batch_size = +v; }),
      field("learning-rate", "Learning rate", () => t.optimizer.learning_rate, (v) => { t.optimizer.learning_rate = +v; }),
      el("h2", {}, "Privacy budget (per site, whole run)"),
      field("total-epsilon", "Total ε", () => (dp() ? dp().total_epsilon : ""), (v) => { if (v === "") delete t.optimizer.differential_privacy; else { t.optimizer.differential_privacy = t.optimizer.differential_privacy || { max_grad_norm: 1.0, delta: 1e-5 }; t.optimizer.differential_privacy.total_epsilon = +v; } }),
      field("delta", "δ", () => (dp() ? dp().delta : ""), (v) => { if (dp()) dp().delta = +v; }),
      field("max-grad-norm", "Clip", () => (dp() ? dp().max_grad_norm : ""), (v) => { if (dp()) dp().max_grad_norm = +v; }));
  }

  async function loadTemplate() {
    const kind = document.getElementById("template").value, ds = document.getElementById("dataset").value;
    doc = await api(`/api/designer/template?kind=${encodeURIComponent(kind)}&dataset=${encodeURIComponent(ds)}`);
    renderForm(); changed();
  }

  async function save() {
    const r = await post("/api/designer/save", { experiment: doc });
    if (!r.ok) { say("action-status", `not saved (${r.status}): ${r.error}`, false); return null; }
    saved = r.doc.saved;
    say("action-status", `saved ${r.doc.saved} to the state's experiments/ (${r.doc.parameters} parameters)`, true);
    return saved;
  }

  async function startRun() {
    const name = await save();
    if (!name) return;
    const r = await post("/api/runs/start", { experiment: name });
    if (!r.ok) { say("action-status", `not started (${r.status}): ${r.error}`, false); return; }
    const link = el("a", { href: r.doc.run_id ? `/runs/${r.doc.run_id}` : "/runs", id: "watch-run" }, "watch it");
    const n = document.getElementById("action-status");
    n.className = "msg ok"; n.replaceChildren(`started ${name}${r.doc.run_id ? " as " + r.doc.run_id : ""}: `, link);
  }

  async function main() {
    meta = await api("/api/designer");
    const datasets = Object.keys(meta.catalogue);
    const may = SESSION.may || {};
    app.replaceChildren(
      el("h1", {}, "Model designer"),
      el("p", { class: "sub" }, "Build a sequential model from the layers the model language allows; every change is checked as `fedbus config validate` checks it, with each site's ε plan from the rows and the privacy policy it announced (the plan the run prints before round 1)."),
      el("div", { class: "actions" },
        el("label", {}, "Dataset ", el("select", { id: "dataset" }, datasets.map((d) => el("option", { value: d }, d)))),
        el("label", {}, " Template ", el("select", { id: "template" }, Object.entries(meta.templates).map(([k, v]) => el("option", { value: k, selected: k === "mlp" ? "selected" : null }, v)))),
        el("button", { id: "apply-template", onclick: () => loadTemplate().catch(fail) }, "Use template")),
      el("div", { id: "form", class: "card" }),
      el("h2", {}, "Layers"),
      el("table", { id: "layers" }, el("thead", {}, el("tr", {}, el("th", {}, "#"), el("th", {}, "Type"), el("th", {}, "Parameters"), el("th", {}, "Output shape"), el("th", { class: "num" }, "Weights"), el("th", {}, ""))), el("tbody", { id: "layers-body" })),
      el("div", { class: "actions" }, el("select", { id: "layer-type" }, Object.keys(meta.palette).map((t) => el("option", { value: t }, t))),
        el("button", { id: "add-layer", onclick: addLayer }, "Add layer")),
      el("div", { class: "grid k4" }, el("div", { class: "card kpi" }, el("div", { class: "label" }, "Parameters"), el("div", { class: "value", id: "param-count" }, "–"))),
      el("div", { id: "check-status", class: "msg" }, ""),
      el("h2", {}, "ε plan per site"),
      el("table", { id: "eps-plan-table" }, el("thead", {}, el("tr", {}, el("th", {}, "Site"), el("th", { class: "num" }, "Rows"), el("th", { class: "num" }, "Planned ε"), el("th", { class: "num" }, "Noise σ"), el("th", {}, "Notes"))), el("tbody", { id: "eps-plan" })),
      el("div", { class: "actions" },
        el("button", { id: "save", class: "primary", disabled: may.design ? null : "disabled", title: may.design ? null : "needs the researcher role and --allow-actions", onclick: () => save().catch(fail) }, "Save experiment"),
        el("button", { id: "start", disabled: may.start ? null : "disabled", title: may.start ? null : "needs the researcher role and --allow-actions", onclick: () => startRun().catch(fail) }, "Save and start")),
      el("div", { id: "action-status", class: "msg" }, ""));
    if (!datasets.length) { say("check-status", "no site has announced a dataset yet (see Sites)", false); return; }
    await loadTemplate();
  }
  function fail(e) { say("action-status", "error: " + e.message, false); }
  main().catch((e) => app.replaceChildren(el("div", { class: "msg bad" }, "Could not load the designer: " + e.message)));
})();
