// fedbus dashboard: a small SVG line chart (no third-party code).
// FedChart.line(el, {title, xLabel, yLabel, series: [{name, points: [[x, y] or [x, y, lo, hi], ...], color, width, dash}]})
// ([x, y, lo, hi]: a 95 % interval, drawn as a whisker with class "ci")
// draws into el and returns {update(series)}. Every series path carries data-series and
// data-points (how many points it holds), which the browser tests read.
(function () {
  "use strict";
  const NS = "http://www.w3.org/2000/svg";
  const W = 560, H = 260, M = { l: 52, r: 14, t: 26, b: 38 };

  function node(name, attrs, parent) {
    const n = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) n.setAttribute(k, v);
    if (parent) parent.appendChild(n);
    return n;
  }

  function niceTicks(lo, hi, count) {
    if (!(hi > lo)) { hi = lo + 1; }
    const raw = (hi - lo) / count, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((f) => f * mag).find((s) => s >= raw) || raw;
    const ticks = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(+v.toFixed(10));
    return ticks;
  }

  // Enough decimals to tell neighbouring ticks apart (step 0.025 -> 3), none for whole numbers.
  function fmt(v, step) {
    if (Number.isInteger(v) && (!step || Number.isInteger(step))) return String(v);
    const text = step ? String(step) : "0.01", d = text.includes(".") ? text.split(".")[1].length : 0;
    return v.toFixed(Math.min(d, 4));
  }

  function draw(el, opts) {
    el.textContent = "";
    el.classList.add("chart");
    const svg = node("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": opts.title || "chart" }, el);
    node("text", { x: M.l, y: 16, class: "title" }, svg).textContent = opts.title || "";
    const series = (opts.series || []).map((s) => ({ ...s, points: (s.points || []).filter((p) => p[1] !== null && p[1] !== undefined && isFinite(p[1])) }));
    const all = series.flatMap((s) => s.points.flatMap((p) => (p.length > 3 && isFinite(p[2]) && isFinite(p[3]) ? [p, [p[0], p[2]], [p[0], p[3]]] : [p])));
    const iw = W - M.l - M.r, ih = H - M.t - M.b;
    if (!all.length) {
      node("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, svg).textContent = opts.empty || "no rounds yet";
      series.forEach((s) => node("path", { d: "", "data-series": s.name, "data-points": 0, fill: "none" }, svg));
      return;
    }
    let x0 = Math.min(...all.map((p) => p[0])), x1 = Math.max(...all.map((p) => p[0]));
    if (opts.xMax && opts.xMax > x1) x1 = opts.xMax;
    if (x1 === x0) { x0 -= 0.5; x1 += 0.5; }
    let y0 = opts.yMin !== undefined ? opts.yMin : Math.min(...all.map((p) => p[1]));
    let y1 = opts.yMax !== undefined ? opts.yMax : Math.max(...all.map((p) => p[1]));
    if (opts.yMin === undefined || opts.yMax === undefined) {
      const pad = (y1 - y0) * 0.08 || Math.abs(y1) * 0.05 || 0.05;
      if (opts.yMin === undefined) y0 -= pad;
      if (opts.yMax === undefined) y1 += pad;
    }
    const X = (x) => M.l + ((x - x0) / (x1 - x0)) * iw;
    const Y = (y) => M.t + ih - ((y - y0) / (y1 - y0)) * ih;
    const yt = niceTicks(y0, y1, 5), ystep = yt.length > 1 ? yt[1] - yt[0] : 0;
    for (const t of yt) {
      if (t < y0 - 1e-12 || t > y1 + 1e-12) continue;
      node("line", { x1: M.l, x2: W - M.r, y1: Y(t), y2: Y(t), class: "gridline" }, svg);
      node("text", { x: M.l - 6, y: Y(t) + 4, "text-anchor": "end" }, svg).textContent = fmt(t, +ystep.toFixed(10));
    }
    const xt = niceTicks(x0, x1, Math.min(8, Math.max(1, Math.round(x1 - x0)))).filter((t) => Number.isInteger(t) || !opts.integerX);
    const xstep = xt.length > 1 ? +(xt[1] - xt[0]).toFixed(10) : 1;
    for (const t of xt) {
      if (t < x0 || t > x1) continue;
      node("line", { x1: X(t), x2: X(t), y1: M.t + ih, y2: M.t + ih + 4, class: "axis" }, svg);
      node("text", { x: X(t), y: M.t + ih + 16, "text-anchor": "middle" }, svg).textContent = fmt(t, xstep);
    }
    node("line", { x1: M.l, x2: W - M.r, y1: M.t + ih, y2: M.t + ih, class: "axis" }, svg);
    node("line", { x1: M.l, x2: M.l, y1: M.t, y2: M.t + ih, class: "axis" }, svg);
    node("text", { x: M.l + iw / 2, y: H - 4, "text-anchor": "middle" }, svg).textContent = opts.xLabel || "round";
    if (opts.yLabel) node("text", { x: 12, y: M.t + ih / 2, transform: `rotate(-90 12 ${M.t + ih / 2})`, "text-anchor": "middle" }, svg).textContent = opts.yLabel;
    for (const s of series) {
      const d = s.points.map((p, i) => `${i ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
      const path = node("path", { d, fill: "none", stroke: s.color || "#1f6feb", "stroke-width": s.width || 2,
        "data-series": s.name, "data-points": s.points.length }, svg);
      if (s.dash) path.setAttribute("stroke-dasharray", s.dash);
      if (s.opacity) path.setAttribute("stroke-opacity", s.opacity);
      if (s.markers !== false) {
        for (const p of s.points) {
          if (p.length > 3 && isFinite(p[2]) && isFinite(p[3])) {  // the release's 95 % interval, as a whisker
            const w = node("line", { x1: X(p[0]), x2: X(p[0]), y1: Y(p[2]), y2: Y(p[3]), stroke: s.color || "#1f6feb",
              "stroke-width": 1, class: "ci", "data-series": s.name }, svg);
            if (s.opacity) w.setAttribute("stroke-opacity", s.opacity * 0.7);
            node("title", {}, w).textContent = `${s.name}, round ${p[0]}: 95 % interval ${(+p[2]).toFixed(3)}–${(+p[3]).toFixed(3)}`;
          }
          const c = node("circle", { cx: X(p[0]), cy: Y(p[1]), r: s.width > 1.5 || !s.width ? 3 : 2, fill: s.color || "#1f6feb" }, svg);
          if (s.opacity) c.setAttribute("fill-opacity", s.opacity);
          node("title", {}, c).textContent = `${s.name}, round ${p[0]}: ${(+p[1]).toFixed(4)}`;
        }
      }
    }
    if (opts.hline !== undefined && opts.hline !== null && isFinite(opts.hline.y) && opts.hline.y >= y0 && opts.hline.y <= y1) {
      node("line", { x1: M.l, x2: W - M.r, y1: Y(opts.hline.y), y2: Y(opts.hline.y), stroke: "#9a6700", "stroke-dasharray": "2 3" }, svg);
      node("text", { x: W - M.r - 2, y: Y(opts.hline.y) - 4, "text-anchor": "end", fill: "#9a6700" }, svg).textContent = opts.hline.label;
    }
  }

  function line(el, opts) {
    let current = opts;
    draw(el, current);
    return { update(series, more) { current = { ...current, ...(more || {}), series }; draw(el, current); } };
  }

  window.FedChart = { line };
})();
