// fedbus dashboard: fills each page from its /api/ twin. Plain DOM, no third-party code.
(function () {
  "use strict";
  const CSRF = document.querySelector('meta[name="fedbus-csrf"]').content;
  const SESSION = JSON.parse(document.querySelector('meta[name="fedbus-session"]').content);
  const app = document.getElementById("app");
  const COLORS = ["#1f6feb", "#cf222e", "#1a7f37", "#8250df", "#bf8700", "#0a7ea4", "#d4377e", "#57606a"];

  // One line per figure, for a reader who is a clinician, not an ML engineer.
  const EXPLAIN = {
    loss: "Loss: how wrong the model's predicted probabilities are (lower is better; used for training, not for judging).",
    accuracy: "Accuracy: the share of patients whose outcome the model predicts correctly.",
    auc: "AUC: the chance that the model ranks a random patient with the outcome above one without it (0.5 = coin toss, 1 = perfect).",
    f1: "F1: balance of sensitivity (outcomes found) and precision (alarms that were right); 1 is perfect.",
    majority: "Majority-class baseline: the accuracy of always predicting the most common outcome. A model is only useful above it.",
    epsilon: "ε (epsilon): the privacy loss a hospital's data has accumulated under differential privacy; smaller means more private.",
    delta: "δ (delta): the small probability with which the ε guarantee may fail; it must be far below 1/(number of patients).",
    budget: "Budget: the most ε the hospital's own policy allows this dataset to spend; the site refuses work beyond it.",
    accountant: "Accountant: the method that adds up ε over training steps (e.g. RDP or PRV, as implemented by Opacus).",
    validation: "Validation: patients held out from training at each hospital, used to follow training round by round.",
    test: "Test: a fixed split of patients at each hospital that is never trained on; the figure to trust.",
    replies: "Replies: hospitals whose update was accepted in that round.",
    online: "Online: the site's signed heartbeat (every 10 s or less) arrived within its last three beats; offline after three missed beats, at most 30 s. \"Not monitored\": no coordinator is running, so nobody hears the beats.",
    train_s: "Training: time the hospitals spent training (longest site per round, summed).",
    communication_s: "Communication: time waiting for messages to travel through the broker.",
    aggregation_s: "Aggregation: time the coordinator spent combining updates.",
    personalized: "Personalised: the hospital's own version of the model (the global model fine-tuned on its own patients, or its own last layer), scored on its own test split.",
    sensitivity: "Sensitivity: the share of patients with the outcome whom the model finds.",
    specificity: "Specificity: the share of patients without the outcome whom the model correctly leaves alone.",
    one_class: "Predicts one class: the model gives every test patient the same answer, so its accuracy is only the share of the most common outcome; it has learnt nothing useful.",
    holdout: "Held-out rows (simulations only): patients the simulator kept back from every hospital. They are not any hospital's test split; they let runs be compared on the same patients.",
    site_budget: "Site budget: the most ε the hospital's own policy lets this dataset spend (announced in its hello); it refuses work beyond it.",
    rejected: "Rejected: messages the coordinator refused (bad signature, replay, wrong round, out of bounds…), with the reason.",
  };

  // -- small helpers -------------------------------------------------------------
  function el(tag, attrs, ...kids) {
    const n = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") n.className = v; else if (k === "style") n.style.cssText = v; else if (k.startsWith("on")) n.addEventListener(k.slice(2), v); else n.setAttribute(k, v);
    }
    for (const k of kids.flat()) if (k !== null && k !== undefined) n.append(k.nodeType ? k : String(k));
    return n;
  }
  const tip = (text, key) => el("span", { class: "tip", title: EXPLAIN[key] || key }, text);
  const explain = (key) => el("p", { class: "explain" }, EXPLAIN[key]);
  const num = (v, d = 3) => (v === null || v === undefined || !isFinite(v) ? "–" : (+v).toFixed(d));
  const pct = (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(1) + " %");
  // A released figure with its 95 % interval ("72.7 % (51–89)"), or the words for one too uncertain to show.
  const TOO_FEW = "too few test rows for this budget";
  const fig = (t, k, asPct, d = 3) => {
    if (!t) return "–";
    if (t.withheld && t.withheld[k]) return el("span", { class: "muted too-few", title: "its 95 % interval spans nearly the whole range" }, TOO_FEW);
    const v = t[k], ci = t.ci && t.ci[k];
    if (v === null || v === undefined) return "–";
    if (!ci) return asPct ? pct(v) : num(v, d);
    return asPct ? `${pct(v)} (${(100 * ci[0]).toFixed(0)}–${(100 * ci[1]).toFixed(0)})`
      : `${num(v, 2)} (${(+ci[0]).toFixed(2)}–${(+ci[1]).toFixed(2)})`;
  };
  const figText = (t, k) => { const x = fig(t, k); return typeof x === "string" ? x : x.textContent; };
  const pctText = (t, k) => { const x = fig(t, k, true); return typeof x === "string" ? x : x.textContent; };
  const eps = (v) => (v === null || v === undefined ? "–" : (+v).toFixed(2));
  const dlt = (v) => (v === null || v === undefined ? "–" : Array.isArray(v) ? v.map((x) => (+x).toExponential(0)).join(", ") : (+v).toExponential(0));
  const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "–");
  const dur = (s) => (s === null || s === undefined ? "–" : s < 90 ? s.toFixed(1) + " s" : s < 5400 ? (s / 60).toFixed(1) + " min" : (s / 3600).toFixed(1) + " h");
  const ago = (t, now) => { if (!t) return "never"; const s = Math.max(0, now - t); return s < 90 ? `${s.toFixed(0)} s ago` : s < 5400 ? `${(s / 60).toFixed(0)} min ago` : s < 172800 ? `${(s / 3600).toFixed(0)} h ago` : when(t); };
  const badge = (status) => el("span", { class: "badge " + status }, String(status).replace(/_/g, " "));
  const AT_END = "known at the end of the run";
  // A warning beside a figure from a model that gives every patient the same answer.
  const oneClass = (why) => (why ? el("span", { class: "badge warn one-class", title: EXPLAIN.one_class + " Here: " + why + "." }, "predicts one class") : null);
  // Signed out (the session cookie expired with the server, or was never set): the sign-in
  // form, where the token goes in a POST body; it never goes in a URL.
  const signIn = (r) => { if (r.status === 401) { location.assign("/login"); throw new Error("sign in first"); } };
  async function api(path) {
    const r = await fetch(path, { credentials: "same-origin" });
    signIn(r);
    if (!r.ok) throw new Error((await r.json().catch(() => ({}))).detail || r.statusText);
    return r.json();
  }
  async function post(path, body) {
    const r = await fetch(path, { method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-Fedbus-CSRF": CSRF }, body: JSON.stringify(body || {}) });
    signIn(r);
    const doc = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(doc.error || doc.detail || r.statusText);
    return doc;
  }
  function setLive(on, text) {
    const n = document.getElementById("live");
    n.className = "live" + (on ? " on" : "");
    n.textContent = text || "";
  }
  function fail(e) { app.replaceChildren(el("div", { class: "msg bad" }, "Could not load this page: " + e.message)); }

  // -- sites -----------------------------------------------------------------------
  async function sitesPage() {
    const doc = await api("/api/sites");
    const rows = [];
    for (const s of doc.sites) {
      const ds = s.datasets.length ? s.datasets : [null];
      ds.forEach((d, i) => {
        const spent = d && d.epsilon_spent, budget = d && d.budget;
        const share = spent !== null && budget ? Math.min(1, spent / budget) : null;
        rows.push(el("tr", { class: i ? "site-ds" : "", "data-site": s.site_id },
          i ? el("td") : el("td", {}, el("b", {}, s.site_id), el("div", { class: "mono muted" }, "key " + s.kid)),
          i ? el("td") : el("td", { class: "liveness", "data-liveness": s.liveness }, badge(s.liveness || (s.online ? "online" : "offline")),
            el("div", { class: "muted", title: when(s.last_heartbeat || s.last_seen) }, s.last_heartbeat ? "heartbeat " + ago(s.last_heartbeat, doc.now) : "seen " + ago(s.last_seen, doc.now))),
          i ? el("td") : el("td", {}, s.software_version || "–"),
          el("td", {}, d ? el("b", {}, d.name) : el("span", { class: "muted" }, "no dataset announced yet")),
          el("td", { class: "num" }, d ? d.rows : "–"),
          el("td", { class: "num" }, d ? d.columns : "–"),
          el("td", {}, d ? Object.entries(d.feature_types).map(([k, v]) => `${v} ${k}`).join(", ") || "–" : "–"),
          el("td", {}, d ? d.target || "–" : "–"),
          el("td", { class: "num epsilon", "data-epsilon": spent === null || spent === undefined ? "" : spent }, d ? eps(spent) : "–"),
          el("td", { class: "num" }, d ? dlt(d.delta) : "–"),
          el("td", { class: "budget", style: "min-width:190px", "data-budget": budget === null || budget === undefined ? "" : budget },
            d ? (budget ? el("div", {}, el("div", { class: "bar" + (share >= 1 ? " over" : "") }, el("span", { style: `width:${(share || 0) * 100}%` })),
            el("span", { class: "muted", style: "white-space:nowrap" }, `ε ${eps(spent)} of ${eps(budget)} · ${eps(d.budget_left)} left`),
            d.epsilon_source ? el("div", { class: "muted" }, "ε from " + d.epsilon_source) : null)
            : el("span", { class: "muted" }, "no budget announced")) : "–"),
          el("td", {}, d && d.accountant ? d.accountant : el("span", { class: "muted" }, "not reported"))));
      });
    }
    app.replaceChildren(
      el("h1", {}, "Sites and privacy budgets"),
      el("p", { class: "sub" }, `${doc.sites.length} enrolled site(s). Each hospital announces its datasets (metadata only: no patient rows leave it) and reports the privacy it has spent.`),
      explain("epsilon"), explain("delta"), explain("budget"),
      el("table", { id: "sites" }, el("thead", {}, el("tr", {},
        el("th", {}, "Site"), el("th", {}, tip("Status", "online")), el("th", {}, "Software"), el("th", {}, "Dataset"),
        el("th", { class: "num" }, "Rows"), el("th", { class: "num" }, "Columns"), el("th", {}, "Feature types"), el("th", {}, "Target"),
        el("th", { class: "num" }, tip("ε spent", "epsilon")), el("th", { class: "num" }, tip("δ", "delta")),
        el("th", {}, tip("Budget", "budget")), el("th", {}, tip("Accountant", "accountant")))),
        el("tbody", {}, rows)));
  }

  // -- runs ------------------------------------------------------------------------
  async function runsPage() {
    const params = new URLSearchParams(location.search);
    const status = params.get("status") || "";
    const doc = await api("/api/runs" + (status ? "?status=" + status : ""));
    const filter = el("select", { id: "status-filter", onchange: (e) => { location.search = e.target.value ? "?status=" + e.target.value : ""; } },
      el("option", { value: "" }, "all statuses"), doc.statuses.map((s) => el("option", { value: s, selected: s === status ? "selected" : null }, s)));
    const picked = new Set();
    const compareBtn = el("button", { disabled: true, onclick: () => { location.href = "/compare?runs=" + [...picked].join(","); } }, "Compare selected");
    const rows = doc.runs.map((r) => el("tr", { "data-run": r.run_id },
      el("td", {}, el("input", { type: "checkbox", onchange: (e) => { e.target.checked ? picked.add(r.run_id) : picked.delete(r.run_id); compareBtn.disabled = picked.size < 2 || picked.size > 4; } })),
      el("td", {}, el("a", { href: "/runs/" + encodeURIComponent(r.run_id) }, r.run_id), el("div", { class: "muted" }, r.experiment || "")),
      el("td", {}, badge(r.status), r.reason ? el("div", { class: "muted" }, r.reason) : null),
      el("td", {}, r.aggregator), el("td", {}, r.dataset || "–"), el("td", {}, when(r.created_at)),
      el("td", { class: "num" }, dur(r.duration_s)), el("td", { class: "num" }, `${r.rounds_done} / ${r.rounds_planned}`),
      el("td", { class: "num" }, r.final ? fig(r.final, "accuracy", true) : "–"),
      el("td", { class: "num" }, r.final ? pct(r.final.majority_class_accuracy) : r.status === "running" ? el("span", { class: "muted" }, AT_END) : "–"),
      el("td", { class: "num" }, r.final ? fig(r.final, "auc") : "–"),
      el("td", { class: "num" }, r.final ? fig(r.final, "f1") : "–")));
    const parts = [el("h1", {}, "Runs"), el("p", { class: "sub" }, "Every training run in this coordinator's state. Final figures are on each hospital's fixed test split."),
      el("div", { class: "actions" }, el("label", {}, "Show ", filter), compareBtn),
      el("table", { id: "runs" }, el("thead", {}, el("tr", {}, el("th", {}), el("th", {}, "Run"), el("th", {}, "Status"), el("th", {}, "Aggregator"),
        el("th", {}, "Dataset"), el("th", {}, "Created"), el("th", { class: "num" }, "Duration"), el("th", { class: "num" }, "Rounds"),
        el("th", { class: "num" }, tip("Test accuracy", "accuracy")), el("th", { class: "num" }, tip("Majority baseline", "majority")),
        el("th", { class: "num" }, tip("Test AUC", "auc")), el("th", { class: "num" }, tip("Test F1", "f1")))),
        el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", { colspan: 12, class: "muted" }, "No runs yet."))))];
    if (SESSION.actions_allowed) parts.push(await startForm());
    app.replaceChildren(...parts);
    if (doc.runs.some((r) => r.status === "running")) { setLive(true, "live"); setTimeout(() => runsPage().catch(fail), 5000); }
  }

  async function startForm() {
    const exps = (await api("/api/experiments")).experiments;
    const box = el("div", { class: "card" }, el("h2", {}, "Start a run"));
    if (!exps.length) { box.append(el("p", { class: "muted" }, "Put an experiment JSON in the state directory's experiments/ folder to start it from here.")); return box; }
    const pick = el("select", { id: "start-experiment" }, exps.map((x) => el("option", { value: x }, x)));
    const out = el("span", { class: "muted" });
    box.append(el("div", { class: "actions" }, pick, el("button", { class: "primary", id: "start-run", disabled: !SESSION.broker, onclick: async () => {
      try { const r = await post("/api/runs/start", { experiment: pick.value }); out.replaceChildren("started ", el("a", { href: "/runs/" + r.run_id }, r.run_id)); }
      catch (e) { out.textContent = e.message; } } }, "Start"), out));
    if (!SESSION.broker) box.append(el("p", { class: "muted" }, "Starting runs needs a broker: start the dashboard with --broker URL."));
    return box;
  }

  // -- one run ---------------------------------------------------------------------
  const CURVES = [["loss", "Loss"], ["accuracy", "Accuracy"], ["auc", "AUC"], ["f1", "F1"]];

  // view: "all" (every site overlaid), "global" (the all-sites curves only) or one site id.
  function curveSeries(rounds, metric, view) {
    const out = [{ name: "validation (all sites)", color: COLORS[0], width: 2.5, points: rounds.map((r) => [r.round, r.validation[metric]]) },
      { name: "test (all sites)", color: COLORS[1], width: 2.5, dash: "6 3", points: rounds.map((r) => [r.round, r.test ? r.test[metric] : null]) }];
    if (rounds.some((r) => r.holdout)) out.push({ name: "held-out rows (simulator, not a test split)", color: "#8c959f", width: 1.5, dash: "2 3",
      points: rounds.map((r) => [r.round, r.holdout ? r.holdout[metric] : null]) });
    const sites = siteIds(rounds).filter((s) => view === "all" || view === s);
    sites.forEach((s) => {
      const color = COLORS[(siteIds(rounds).indexOf(s) + 2) % COLORS.length], one = view === s;
      // [round, figure, lo, hi]: the 95 % interval the site released with it, drawn as a whisker
      const at = (r, split) => { const f = r.per_site[s] && r.per_site[s][split];
        if (!f || (f.withheld && f.withheld[metric])) return [r.round, null];
        const ci = f.ci && f.ci[metric];
        return ci ? [r.round, f[metric], ci[0], ci[1]] : [r.round, f[metric]]; };
      out.push({ name: s + " validation", color, width: one ? 2 : 1, opacity: one ? 1 : 0.55, points: rounds.map((r) => at(r, "validation")) });
      out.push({ name: s + " test", color, width: one ? 2 : 1, opacity: one ? 1 : 0.55, dash: "4 3", points: rounds.map((r) => at(r, "test")) });
    });
    return out;
  }
  const siteIds = (rounds) => [...new Set(rounds.flatMap((r) => Object.keys(r.per_site)))].sort();

  // What happened to each site's per-round test evaluation: released, declined (and why), or off.
  function testStatusOf(doc, rounds) {
    const box = el("div", { class: "card", id: "test-status" });
    if (!doc.test_every) {
      const sim = rounds.some((r) => r.holdout);
      box.append(el("p", { class: "explain" }, "Test per round is off for this run (federated.test_every = 0): every test evaluation is a privacy release " +
        "charged to the hospital's budget and counted against its evaluation limit, so the test split is scored once, when the run ends. " +
        (sim ? "The grey dotted curve is the simulator's held-out rows (patients kept back from every hospital), scored after the run: it is not a test split of any hospital." : "")));
      return box;
    }
    const sites = siteIds(rounds), rows = sites.map((s) => {
      const seen = rounds.filter((r) => r.per_site[s] && r.per_site[s].test_status);
      const released = seen.filter((r) => r.per_site[s].test_status === "released").length;
      const last = seen.length ? seen[seen.length - 1].per_site[s].test_status : null;
      const refused = last && last !== "released";
      return el("tr", { "data-site": s }, el("td", {}, el("b", {}, s)), el("td", { class: "num" }, released), el("td", { class: "num" }, seen.length - released),
        el("td", { class: "test-status" }, last ? (refused ? el("span", { class: "badge warn" }, "not released") : el("span", { class: "badge ok" }, "released")) : el("span", { class: "muted" }, "not asked yet"),
          refused ? el("span", { class: "muted" }, " " + last) : null));
    });
    box.append(el("p", { class: "explain" }, `The sites score the global model on their fixed test split every ${doc.test_every} round(s); each score is a release the hospital charges to its own privacy budget, and a hospital may decline (budget spent, policy). The last round's test is the final evaluation.`),
      el("table", { id: "test-releases" }, el("thead", {}, el("tr", {}, el("th", {}, "Site"), el("th", { class: "num" }, "Test scores released"),
        el("th", { class: "num" }, "Not released"), el("th", {}, "Latest"))), el("tbody", {}, rows)));
    return box;
  }

  // Only curves with at least one point: a legend never names a curve that is not drawn.
  const hasData = (s) => s.points.some((p) => p[1] !== null && p[1] !== undefined);
  function legend(series) {
    return el("div", { class: "legend" }, series.filter(hasData).map((s) => el("span", {}, el("i", { style: s.dash
      ? `background:repeating-linear-gradient(90deg, ${s.color} 0 4px, transparent 4px 6px)` : `background:${s.color}` }), s.name)));
  }

  function kpi(label, key, value, note) {
    return el("div", { class: "card kpi", "data-kpi": key }, el("div", { class: "label" }, tip(label, key)), el("div", { class: "value" }, value), note ? el("div", { class: "note" }, note) : null);
  }

  // The parts of the run page that change with every round; each has an id so a poll can swap it.
  function baselineNote(doc) {
    const f = doc.final, maj = f.majority_class_accuracy, known = maj !== null && maj !== undefined;
    return el("span", { class: "baseline", "data-value": known ? maj : "" }, known
      ? `majority-class baseline ${f.majority ? pctText(f.majority, "majority_class_accuracy") : pct(maj)}` + (f.majority_basis ? ` (${f.majority_basis})` : "")
      : "majority-class baseline: " + (doc.status === "running" ? AT_END : "not reported"));
  }
  // This run's ε (spent by the plan for the rounds trained, and planned), apart from each site's lifetime ledger.
  const vals = (o) => Object.values(o || {}).filter((v) => v !== null && v !== undefined);
  function epsKpi(doc) {
    const privacy = doc.privacy || {}, spent = vals(privacy.run_spent_epsilon), planned = vals(privacy.planned_epsilon);
    const lifetime = vals(privacy.lifetime_epsilon), budgets = vals(doc.sites.map((s) => s.budget));
    // a DP run: it plans or spends ε, or its experiment trains under DP (a site's lifetime ledger from
    // earlier runs does not make this run one: it read "0.00 · planned not planned")
    const trainsDp = !!((((doc.experiment || {}).training || {}).optimizer || {}).differential_privacy);
    const dp = spent.some((v) => v > 0) || planned.some((v) => v > 0) || trainsDp;
    const run = privacy.total_epsilon !== null && privacy.total_epsilon !== undefined ? ` (run budget ≤ ${eps(privacy.total_epsilon)})` : "";
    const site = lifetime.length ? ` · site lifetime ε ${eps(Math.max(...lifetime))}` + (budgets.length ? ` of budget ${[...new Set(budgets.map(eps))].join(", ")}` : "") : "";
    return kpi("Privacy ε this run (largest site)", "epsilon", !dp ? "no DP" : spent.length ? eps(Math.max(...spent)) : eps(0),
      dp ? `planned ${planned.length ? eps(Math.max(...planned)) : "not planned"}${run} · δ = ${dlt(privacy.delta)} · accountant ${privacy.accountant || "not reported"}${site}` : "this run releases without differential privacy");
  }
  function kpisOf(doc) {
    const f = doc.final, test = f.test || {};
    const last = doc.rounds.length ? doc.rounds[doc.rounds.length - 1] : null;
    const tested = doc.rounds.filter((r) => r.test && r.test.accuracy !== null);
    // the final test exists when a figure is shown or withheld as too uncertain: never fall back to
    // an earlier round's or to validation figures then (they read as the run's result, bare)
    const finalTest = (test.accuracy !== null && test.accuracy !== undefined) || Object.keys(test.withheld || {}).length > 0;
    if (!finalTest && tested.length) {
      const r = tested[tested.length - 1];
      return el("div", { class: "grid k4", id: "kpis" },
        kpi(`Test accuracy (round ${r.round})`, "accuracy", fig(r.test, "accuracy", true), baselineNote(doc)),
        kpi(`Test AUC (round ${r.round})`, "auc", fig(r.test, "auc"), "0.5 = coin toss, 1 = perfect"),
        kpi(`Test F1 (round ${r.round})`, "f1", fig(r.test, "f1"), "the sites' fixed test splits, scored during the run"),
        doc.personalises ? kpi("Personalised accuracy", "personalized", "–", AT_END) : null, epsKpi(doc));
    }
    const haveTest = finalTest, p = f.personalized;
    const union = f.union_source === "secure_sum" ? el("span", { id: "union-source" }, " · union of the test rows from the secure sum of the sites' masked statistics (privacy noise added once)") : null;
    const first = haveTest ? kpi("Test accuracy", "accuracy", fig(test, "accuracy", true), el("span", {}, baselineNote(doc), union))
      : kpi(`Validation accuracy${last ? " (round " + last.round + ")" : ""}`, "validation", last ? fig(last.validation, "accuracy", true) : "–",
        doc.status === "running" ? el("span", {}, "test figures come when the run ends · ", baselineNote(doc)) : baselineNote(doc));
    const warned = Object.keys(f.one_class || {});
    const grid = el("div", { class: "grid k4", id: "kpis" }, first,
      haveTest ? kpi("Test AUC", "auc", fig(test, "auc"), "0.5 = coin toss, 1 = perfect; 95 % interval in brackets")
        : kpi("Validation AUC", "auc", last ? fig(last.validation, "auc") : "–", "0.5 = coin toss, 1 = perfect"),
      haveTest ? kpi("Test F1", "f1", fig(test, "f1"), (f.n_test ? `${f.n_test_noisy ? "≈ " : ""}${f.n_test} test patients${f.n_test_noisy ? " (a noisy count)" : ""} · ` : "") + (f.source || "test split"))
        : kpi("Validation F1", "f1", last ? fig(last.validation, "f1") : "–", "on the sites' validation rows"),
      p ? kpi("Personalised accuracy", "personalized", el("span", { id: "personalized-accuracy", "data-value": p.accuracy ?? "" }, fig(p, "accuracy", true)), `AUC ${figText(p, "auc")} · ${p.method || "personalised"} · ${p.basis}`)
        : doc.personalises ? kpi("Personalised accuracy", "personalized", "–", doc.status === "running" ? AT_END : "not reported") : null,
      epsKpi(doc));
    if (!warned.length) return grid;
    return el("div", { id: "kpis" }, grid, el("div", { class: "msg warn", id: "one-class-warning" }, el("b", {}, "Predicts one class: "),
      warned.map((s) => `${s} (${f.one_class[s]})`).join("; ") + ". " + EXPLAIN.one_class));
  }

  const cellPct = (v, pending) => (v === null || v === undefined ? (pending ? el("span", { class: "muted pending" }, AT_END) : "–") : pct(v));
  function siteTableOf(doc) {
    const live = doc.status === "running", personal = doc.personalises || doc.sites.some((s) => s.personalized);
    const results = doc.sites.map((s) => { const t = s.test || {}, p = s.personalized;
      const pend = live && !s.n_test;
      return el("tr", { "data-site": s.site },
        el("td", {}, el("b", {}, s.site)), el("td", { class: "num test-rows" }, s.n_test_noisy && s.n_test !== null && s.n_test !== undefined
          ? el("span", { class: "noisy", title: "released under differential privacy: a noisy count, not the exact number of test rows" }, "≈ " + s.n_test)
          : s.n_test ?? "–"),
        el("td", { class: "num test-accuracy", title: s.test_round ? `round ${s.test_round} (the run is still going)` : null },
          s.test ? fig(t, "accuracy", true) : "–", s.one_class ? " " : null, oneClass(s.one_class)),
        el("td", { class: "num majority", "data-value": s.majority_class_accuracy ?? "" },
          s.majority && s.majority.ci && s.majority.ci.majority_class_accuracy ? fig(s.majority, "majority_class_accuracy", true) : cellPct(s.majority_class_accuracy, pend)),
        el("td", { class: "num test-auc" }, s.test ? fig(t, "auc") : "–"), el("td", { class: "num test-f1" }, s.test ? fig(t, "f1") : "–"),
        el("td", { class: "num test-sensitivity" }, s.test ? fig(t, "sensitivity", false, 2) : "–"),
        el("td", { class: "num test-specificity" }, s.test ? fig(t, "specificity", false, 2) : "–"),
        personal ? el("td", { class: "num personalized-accuracy", "data-value": p ? p.accuracy ?? "" : "" },
          p ? fig(p, "accuracy", true) : cellPct(null, pend), p && p.one_class ? " " : null, p ? oneClass(p.one_class) : null) : null,
        personal ? el("td", { class: "num personalized-auc", "data-value": p ? p.auc ?? "" : "" }, p ? fig(p, "auc") : "–") : null);
    });
    const privacy = doc.sites.map((s) => el("tr", { "data-site": s.site },
      el("td", {}, el("b", {}, s.site)), el("td", { class: "num" }, s.updates), el("td", { class: "num examples" }, s.examples ?? (s.updates && doc.secure_aggregation && doc.secure_aggregation.used ? el("span", { class: "muted" }, "masked") : "–")),
      el("td", { class: "num run-epsilon", "data-epsilon": s.run_spent_epsilon ?? "" }, s.run_spent_epsilon !== null && s.run_spent_epsilon !== undefined ? eps(s.run_spent_epsilon) : "–"),
      el("td", { class: "num planned-epsilon", "data-epsilon": s.planned_epsilon ?? "" }, s.planned_epsilon !== null && s.planned_epsilon !== undefined ? eps(s.planned_epsilon) : "–"),
      el("td", { class: "num" }, dlt(s.delta)),
      el("td", { class: "num site-budget epsilon", "data-epsilon": s.epsilon ?? "", "data-budget": s.budget ?? "" }, s.budget !== null && s.budget !== undefined
        ? `${eps(s.epsilon)} of ${eps(s.budget)} · ${eps(s.budget_left)} left` : s.epsilon !== null && s.epsilon !== undefined ? `${eps(s.epsilon)} · no budget announced` : el("span", { class: "muted" }, "–")),
      el("td", { class: "num declined" }, s.declined), el("td", { class: "num rejected" }, s.rejected)));
    return el("div", { id: "run-sites" },
      el("p", { class: "explain" }, "Each hospital's figures on its own fixed test split, beside the majority-class baseline (always predicting its most common outcome)" +
        (personal ? " and its personalised model." : ".") + " In brackets: the 95 % interval, covering the privacy noise and the number of test rows; a figure whose interval spans nearly the whole range reads \"" + TOO_FEW + "\"." + (live ? ` Baselines${personal ? " and personalised figures" : ""} are ${AT_END}.` : "")),
      el("div", { class: "table-scroll" }, el("table", { id: "site-results" }, el("thead", {}, el("tr", {}, el("th", {}, "Site"), el("th", { class: "num" }, "Test rows"),
        el("th", { class: "num" }, tip("Test accuracy", "accuracy")), el("th", { class: "num" }, tip("Majority baseline", "majority")),
        el("th", { class: "num" }, tip("Test AUC", "auc")), el("th", { class: "num" }, tip("Test F1", "f1")),
        el("th", { class: "num" }, tip("Sensitivity", "sensitivity")), el("th", { class: "num" }, tip("Specificity", "specificity")),
        personal ? el("th", { class: "num" }, tip("Personalised accuracy", "personalized")) : null,
        personal ? el("th", { class: "num" }, tip("Personalised AUC", "personalized")) : null)),
        el("tbody", {}, results))),
      el("h3", {}, "Privacy and messages per site"),
      el("div", { class: "table-scroll" }, el("table", { id: "site-privacy" }, el("thead", {}, el("tr", {}, el("th", {}, "Site"), el("th", { class: "num" }, "Updates"),
        el("th", { class: "num" }, "Training rows"), el("th", { class: "num" }, tip("ε this run", "epsilon")),
        el("th", { class: "num" }, "ε planned (this run)"), el("th", { class: "num" }, tip("δ", "delta")),
        el("th", { class: "num" }, tip("Site lifetime ε (all runs) of its budget", "site_budget")),
        el("th", { class: "num" }, "Declined"), el("th", { class: "num" }, tip("Rejected", "rejected")))),
        el("tbody", {}, privacy))));
  }

  // What the simulator scored on the rows it kept from every site: labelled held-out, never "test".
  function holdoutOf(doc) {
    const h = doc.holdout;
    if (!h) return null;
    const m = h.metrics || {}, p = h.personalized;
    return el("div", { class: "card", id: "holdout" }, el("h3", {}, tip("Simulator's held-out rows", "holdout")),
      el("p", { class: "explain" }, EXPLAIN.holdout),
      el("div", {}, `global model on ${h.n ?? "?"} held-out patients: accuracy ${pct(m.accuracy)}, AUC ${num(m.auc)}, F1 ${num(m.f1)}` +
        (h.majority_class_accuracy !== null ? ` (majority class ${pct(h.majority_class_accuracy)})` : "") +
        (p ? ` · each site's personalised model on them: accuracy ${pct(p.accuracy)}, AUC ${num(p.auc)}` : "")));
  }

  function rejectedOf(doc) {
    const box = el("div", { id: "rejected-box" });
    box.append(doc.rejected.length ? el("table", { id: "rejected" }, el("thead", {}, el("tr", {}, el("th", {}, "Round"), el("th", {}, "Site"), el("th", {}, "Kind"),
      el("th", {}, "Verdict"), el("th", {}, "Reason"), el("th", {}, "Message"))), el("tbody", {}, doc.rejected.map((r) => el("tr", {},
      el("td", {}, r.round), el("td", {}, r.site || "?"), el("td", {}, r.kind || "?"), el("td", {}, el("span", { class: "badge " + (r.verdict === "rejected" ? "bad" : "warn") }, r.verdict)),
      el("td", {}, r.reason || "–"), el("td", { class: "mono" }, r.message_id)))))
      : el("p", { class: "muted", id: "rejected" }, "No message was rejected."));
    // Every round a sampled site gave nothing (declined, late, no reply), from the run's result; while it runs, its declines.
    const gaps = (doc.gaps && doc.gaps.length) ? doc.gaps : doc.declined.map((d) => ({ round: d.round, site: d.site, reason: "declined: " + d.reason }));
    box.append(el("h3", {}, "Declined and missed rounds"), gaps.length
      ? el("table", { id: "declined" }, el("thead", {}, el("tr", {}, el("th", {}, "Round"), el("th", {}, "Site"), el("th", {}, "Reason"))),
        el("tbody", {}, gaps.map((g) => el("tr", { "data-site": g.site }, el("td", { class: "num" }, g.round), el("td", {}, el("b", {}, g.site)), el("td", {}, g.reason)))))
      : el("p", { class: "muted", id: "declined" }, "Every sampled site answered every round."));
    return box;
  }

  function timingOf(doc) {
    const t = doc.timing || {};
    const parts = [["train_s", "#1f6feb", "training"], ["communication_s", "#bf8700", "communication"], ["aggregation_s", "#1a7f37", "aggregation"]];
    const total = parts.reduce((a, [k]) => a + (t[k] || 0), 0) || 1;
    return el("div", { class: "card", id: "timing" }, el("div", {}, `Wall time ${dur(t.wall_s)}`),
      el("div", { class: "stack" }, parts.map(([k, c]) => el("span", { style: `width:${(100 * (t[k] || 0)) / total}%;background:${c}`, title: EXPLAIN[k] }))),
      el("div", { class: "legend" }, parts.map(([k, c, label]) => el("span", { title: EXPLAIN[k] }, el("i", { style: `background:${c}` }), `${label} ${dur(t[k])}`))));
  }

  function chartsOf(doc, charts, legends, view) {
    const maj = doc.final.majority_class_accuracy;
    const grid = el("div", { class: "grid c2", id: "curves" });
    for (const [m, label] of CURVES) {
      const c = el("div", { id: "chart-" + m });
      const series = curveSeries(doc.rounds, m, view);
      legends[m] = legend(series);
      grid.append(el("div", { class: "card", "data-metric": m }, c, legends[m], el("p", { class: "explain" }, EXPLAIN[m])));
      charts[m] = FedChart.line(c, { title: label + " per round", yLabel: label.toLowerCase(), series, integerX: true,
        yMin: m === "loss" ? undefined : 0, yMax: m === "loss" ? undefined : 1,
        hline: m === "accuracy" && maj !== null && maj !== undefined ? { y: maj, label: "majority baseline" } : null });
    }
    return grid;
  }

  // What the coordinator saw of each hospital's update: only sums (secure aggregation), or each update.
  function secureOf(sa) {
    if (!sa) return null;
    if (!sa.used) return el("p", { class: "sub", id: "secure-aggregation", "data-used": "false" },
      el("b", {}, "No secure aggregation: "), "the coordinator saw each hospital's update in the clear.");
    const sums = sa.sums_unmasked !== undefined ? ` · ${sa.sums_unmasked} sum(s) unmasked` + (sa.fewest_contributors ? `, the smallest of ${sa.fewest_contributors} hospitals` : "") : "";
    return el("p", { class: "sub", id: "secure-aggregation", "data-used": "true" }, el("b", {}, "Secure aggregation: "),
      `the coordinator saw only sums of at least ${sa.min_contributors} hospitals' masked updates, never one hospital's update or training figures` +
      (sa.threshold ? ` (any ${sa.threshold} hospitals can unmask a sum)` : "") + sums + ".");
  }

  async function runPage() {
    const runId = decodeURIComponent(location.pathname.split("/").pop());
    const doc = await api("/api/runs/" + encodeURIComponent(runId));
    const charts = {}, legends = {};
    const rounds = doc.rounds.slice();
    let view = "all";
    const redraw = () => { for (const [m] of CURVES) { const s = curveSeries(rounds, m, view); charts[m].update(s); legends[m].replaceWith(legends[m] = legend(s)); } };
    const viewPick = el("select", { id: "site-view", onchange: (e) => { view = e.target.value; redraw(); } },
      el("option", { value: "all" }, "every site overlaid"), el("option", { value: "global" }, "all sites combined only"),
      siteIds(rounds).map((s) => el("option", { value: s }, "site " + s)));

    const header = el("div", {}, el("h1", {}, doc.experiment_name || doc.run_id, " ", badge(doc.status)),
      el("p", { class: "sub" }, el("span", { class: "mono" }, doc.run_id), ` · ${doc.aggregator} · dataset ${doc.dataset || "–"} · created ${when(doc.created_at)} · `,
        el("span", { id: "rounds-done" }, `${doc.rounds_done} / ${doc.rounds_planned} rounds`), ` · ${dur(doc.duration_s)}`),
      doc.description ? el("p", { class: "explain" }, doc.description) : null, secureOf(doc.secure_aggregation),
      doc.reason ? el("div", { class: "msg warn" }, doc.reason) : null);

    const exp = doc.experiment || {}, tr = exp.training || {}, opt = tr.optimizer || {}, dp = opt.differential_privacy || {};
    const summary = [["aggregator", (exp.federated || {}).name], ["rounds", tr.rounds], ["epochs", tr.epochs], ["batch_size", tr.batch_size],
      ["optimizer", opt.type], ["learning_rate", opt.learning_rate], ["noise_multiplier", dp.noise_multiplier], ["max_grad_norm", dp.max_grad_norm], ["δ asked", dp.delta]];
    const expBox = el("div", { class: "card" }, el("div", { class: "actions" }, summary.filter(([, v]) => v !== undefined).map(([k, v]) => el("span", {}, el("span", { class: "muted" }, k + " "), el("b", {}, String(v))))),
      el("details", {}, el("summary", {}, "The experiment exactly as run (JSON)"), el("pre", { id: "experiment" }, JSON.stringify(exp, null, 2))),
      el("div", { class: "actions" }, el("a", { class: "button", href: doc.exports.experiment, download: "" }, "Export experiment JSON"),
        el("a", { class: "button", href: doc.exports.model, download: "" }, "Export model"), el("a", { class: "button", href: doc.exports.csv, download: "" }, "Export metrics CSV")));

    const auditOut = el("span", { id: "audit-status" }, auditText(doc.audit));
    const approvals = el("ul", { id: "approvals" }, doc.approvals.map(approvalItem));
    const who = el("input", { type: "text", id: "approver", placeholder: "your name", size: 18 });
    const actOut = el("span", { class: "muted", id: "action-status" });
    const actionsBox = el("div", { class: "card" }, el("h2", {}, "Audit and approval"),
      el("p", { class: "explain" }, "The audit re-verifies every stored signature and checkpoint hash, and every signed approval of this run."),
      el("div", { class: "actions" }, el("button", { id: "run-audit", onclick: async () => {
        auditOut.textContent = "auditing…";
        try { auditOut.replaceChildren(auditText(await post(`/api/runs/${encodeURIComponent(runId)}/audit`))); } catch (e) { auditOut.textContent = e.message; } } }, "Run audit"), auditOut),
      el("h2", {}, "Mark the model as valid"),
      el("p", { class: "explain" }, "Signs, with the coordinator's key, that you checked the latest checkpoint of this run; the audit verifies the signature and the checkpoint's hash."),
      approvals,
      SESSION.actions_allowed ? el("div", { class: "actions" }, who, el("button", { class: "primary", id: "mark-valid", disabled: !SESSION.can_sign, onclick: async () => {
        try { const r = await post(`/api/runs/${encodeURIComponent(runId)}/approve`, { who: who.value }); approvals.append(approvalItem(r.record));
          actOut.replaceChildren("signed", ...(r.registry ? [" · registered as ", el("a", { href: `/models/${encodeURIComponent(r.registry.name)}/v${r.registry.version}`, id: "model-card-link" }, `${r.registry.name} v${r.registry.version} (model card)`)] : []),
            ...(r.mlflow ? [" · ", el("span", { id: "mlflow-version" }, r.mlflow.error ? `not registered in MLflow (${r.mlflow.error}): retry with coordinator models register --mlflow`
              : `MLflow: ${r.mlflow.model} version ${r.mlflow.mlflow_version}`)] : [])); }
        catch (e) { actOut.textContent = e.message; } } }, "Mark valid (sign)"),
        doc.status === "running" ? el("button", { class: "danger", id: "stop-run", onclick: async () => {
          try { await post(`/api/runs/${encodeURIComponent(runId)}/stop`, { who: who.value || "dashboard user" }); actOut.textContent = "stop requested: the run stops after this round"; }
          catch (e) { actOut.textContent = e.message; } } }, "Stop run") : null, actOut)
        : el("p", { class: "muted" }, "This dashboard is read-only (start it with --allow-actions to sign approvals or stop runs)."));

    app.replaceChildren(...[header, kpisOf(doc), el("h2", {}, "Curves, round by round"),
      el("p", { class: "explain" }, EXPLAIN.validation + " " + EXPLAIN.test + " Solid lines: validation; dashed: test."),
      el("div", { class: "actions" }, el("label", {}, "Per site: ", viewPick)), chartsOf(doc, charts, legends, view), testStatusOf(doc, rounds),
      el("h2", {}, "Per site"), siteTableOf(doc), holdoutOf(doc),
      el("h2", {}, tip("Rejected messages", "rejected")), rejectedOf(doc),
      el("h2", {}, "Where the time went"), timingOf(doc), el("h2", {}, "Experiment"), expBox, actionsBox].filter(Boolean));

    if (doc.status !== "running") { setLive(false, ""); return; }
    setLive(true, "live: new rounds appear as they complete");
    const poll = async () => {
      try {
        const last = rounds.length ? rounds[rounds.length - 1].round : 0;
        const upd = await api(`/api/runs/${encodeURIComponent(runId)}/rounds?after=${last}`);
        if (upd.status !== "running") { setLive(false, "run " + upd.status); runPage().catch(fail); return; }
        if (upd.rounds.length) {
          rounds.push(...upd.rounds);
          for (const s of siteIds(upd.rounds)) if (![...viewPick.options].some((o) => o.value === s)) viewPick.append(el("option", { value: s }, "site " + s));
          redraw();
          document.getElementById("test-status").replaceWith(testStatusOf(upd, rounds));
          document.getElementById("rounds-done").textContent = `${rounds.length} / ${upd.rounds_planned} rounds`;
          const fresh = await api("/api/runs/" + encodeURIComponent(runId));
          document.getElementById("kpis").replaceWith(kpisOf(fresh));
          document.getElementById("run-sites").replaceWith(siteTableOf(fresh));
          document.getElementById("rejected-box").replaceWith(rejectedOf(fresh));
          document.getElementById("timing").replaceWith(timingOf(fresh));
        }
      } catch (e) { setLive(false, "connection lost: " + e.message); }
      setTimeout(poll, (SESSION.poll_s || 2) * 1000);
    };
    setTimeout(poll, (SESSION.poll_s || 2) * 1000);
  }

  function auditText(a) {
    if (!a) return el("span", { class: "muted" }, "not audited in this session");
    return el("span", {}, badge(a.ok ? "ok" : "bad"), a.ok ? ` verified ${a.signatures_verified} signatures, ${a.checkpoints_verified} checkpoints, ${a.approvals_verified} approvals`
      : " FAILED: " + a.problems.join("; "), el("span", { class: "muted" }, " · " + when(a.checked_at)));
  }
  function approvalItem(r) {
    return el("li", {}, el("b", {}, r.approved_by), ` marked round ${r.round} valid on ${r.approved_at_utc}; checkpoint `, el("span", { class: "mono" }, (r.checkpoint_sha256 || "").slice(0, 16) + "…"), ` signed by coordinator key ${r.coordinator_kid}`);
  }

  // -- compare ---------------------------------------------------------------------
  async function comparePage() {
    const ids = (new URLSearchParams(location.search).get("runs") || "").split(",").filter(Boolean);
    if (ids.length < 2) {
      const runs = (await api("/api/runs")).runs;
      app.replaceChildren(el("h1", {}, "Compare runs"), el("p", { class: "sub" }, "Pick two to four runs on the Runs page, or open /compare?runs=A,B."),
        el("ul", {}, runs.map((r) => el("li", {}, el("a", { href: "/runs/" + r.run_id }, r.run_id), " ", badge(r.status)))));
      return;
    }
    const doc = await api("/api/compare?runs=" + ids.map(encodeURIComponent).join(","));
    const grid = el("div", { class: "grid c2" });
    for (const [m, label] of CURVES) {
      const series = doc.runs.flatMap((r, i) => [{ name: r.run_id + " validation", color: COLORS[i], width: 2.5, points: r.rounds.map((x) => [x.round, x.validation[m]]) },
        ...(r.rounds.some((x) => x.test) ? [{ name: r.run_id + " test", color: COLORS[i], width: 1.5, dash: "6 3", points: r.rounds.map((x) => [x.round, x.test ? x.test[m] : null]) }] : [])]);
      const c = el("div");
      grid.append(el("div", { class: "card" }, c, legend(series)));
      FedChart.line(c, { title: `${label} per round (solid: validation, dashed: test)`, series, integerX: true, yMin: m === "loss" ? undefined : 0, yMax: m === "loss" ? undefined : 1 });
    }
    const diff = doc.diff.filter((d) => !d.bookkeeping), book = doc.diff.filter((d) => d.bookkeeping);
    app.replaceChildren(el("h1", {}, "Compare runs"), el("p", { class: "sub" }, doc.runs.map((r) => r.run_id).join("  vs  ")),
      el("div", { class: "card" }, el("h2", {}, "What changed"),
        el("ul", { class: "diff", id: "settings-diff" }, diff.length ? diff.map((d) => el("li", { title: d.path, "data-path": d.path }, d.text)) : el("li", { class: "muted" }, "The experiments' settings are identical.")),
        book.length ? el("details", {}, el("summary", {}, `${book.length} bookkeeping difference(s) (names, dates)`), el("ul", { class: "diff book" }, book.map((d) => el("li", { title: d.path }, d.text)))) : null),
      el("table", { id: "compare-final" }, el("thead", {}, el("tr", {}, el("th", {}, "Run"), el("th", {}, "Status"), el("th", {}, "Aggregator"),
        el("th", { class: "num" }, tip("Test accuracy", "accuracy")), el("th", { class: "num" }, tip("Majority baseline", "majority")), el("th", { class: "num" }, tip("Test AUC", "auc")),
        el("th", { class: "num" }, tip("Test F1", "f1")), el("th", { class: "num" }, tip("ε this run (largest site)", "epsilon")), el("th", { class: "num" }, "Wall time"))),
        el("tbody", {}, doc.runs.map((r) => { const t = r.final.test || {}; const e = vals(r.privacy.run_spent_epsilon);
          return el("tr", {}, el("td", {}, el("a", { href: "/runs/" + r.run_id }, r.run_id)), el("td", {}, badge(r.status)), el("td", {}, r.aggregator),
            el("td", { class: "num" }, fig(t, "accuracy", true)), el("td", { class: "num" }, pct(r.final.majority_class_accuracy)), el("td", { class: "num" }, fig(t, "auc")),
            el("td", { class: "num" }, fig(t, "f1")), el("td", { class: "num" }, e.length ? eps(Math.max(...e)) + " (δ " + dlt(r.privacy.delta) + ")" : "–"),
            el("td", { class: "num" }, dur((r.timing || {}).wall_s))); }))),
      el("h2", {}, "Curves"), grid);
  }

  // -- dead letters ------------------------------------------------------------------
  async function deadLettersPage() {
    const doc = await api("/api/dead-letters");
    const head = [el("h1", {}, "Dead letters"), el("p", { class: "sub" }, "Messages the bus refused, waiting in fedbus.dead with the reason" + (doc.federation ? ` (federation ${doc.federation})` : "") + "."),
      el("div", { class: "actions" }, el("button", { onclick: () => deadLettersPage().catch(fail) }, "Refresh"), el("span", { class: "muted" }, "checked " + when(doc.checked_at)))];
    if (!doc.available) { app.replaceChildren(...head, el("div", { class: "msg bad", id: "dead-letters-status" }, doc.reason)); return; }
    const rows = doc.letters.map((d) => { const e = d.envelope || {};
      return el("tr", {}, el("td", { class: "mono" }, d.message_id), el("td", {}, d.reason || "–"), el("td", {}, d.queue || "–"), el("td", {}, d.user || e.sender || "?"),
        el("td", {}, e.type || "undecodable"), el("td", {}, e.run_id || "–"), el("td", { class: "num" }, e.round ?? "–"), el("td", { class: "num" }, d.size)); });
    app.replaceChildren(...head, el("div", { class: "msg ok", id: "dead-letters-status" }, `${doc.letters.length} message(s) in fedbus.dead${doc.truncated ? " (first ones only)" : ""}.`),
      el("table", { id: "dead-letters" }, el("thead", {}, el("tr", {}, el("th", {}, "Message"), el("th", {}, "Reason"), el("th", {}, "From queue"), el("th", {}, "Sender"),
        el("th", {}, "Type"), el("th", {}, "Run"), el("th", { class: "num" }, "Round"), el("th", { class: "num" }, "Bytes"))), el("tbody", {}, rows)));
  }

  const PAGES = { sites: sitesPage, runs: runsPage, run: runPage, compare: comparePage, "dead-letters": deadLettersPage };
  if (!document.body.dataset.own) (PAGES[document.body.dataset.page] || runsPage)().catch(fail);  // own: designer.js, models.js
})();
