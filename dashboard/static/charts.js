"use strict";
// Small helpers shared by the page: DOM building that never parses data as HTML, number
// formatting, and a plotly chart that takes live points in batches.

// Every string from the wire goes through textContent (el) or, for plotly, plotlyText:
// plotly reads a small HTML subset in trace names and titles, and decodes entities, so an
// entity-escaped name is shown literally.
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

// "1 finding", "3 findings"
function plural(n, word) { return `${n} ${word}${n === 1 ? "" : "s"}`; }

function plotlyText(s) {
  return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

function fmt(v) {
  if (v === null || v === undefined) return "—";
  if (typeof v === "boolean") return v ? "true" : "false";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v) && Math.abs(v) < 1e15) return String(v);
  const a = Math.abs(v);
  return (a !== 0 && (a < 1e-3 || a >= 1e6)) ? v.toExponential(3) : String(Number(v.toPrecision(5)));
}

// A value of a key-value view: the Unix times (seconds) of these fields as local date and time
// (a manifest's created/updated, the health's loaded_at), any other value by fmt.
const TIME_KEY = /(^|\.)(created|updated|loaded_at)$/;

function fmtField(key, v) {
  if (TIME_KEY.test(key) && typeof v === "number" && v > 1e9 && v < 1e11) {
    const d = new Date(v * 1000), p = n => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ` +
      `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
  }
  return fmt(v);
}

// JSON with objects one key a line and arrays of plain values on one line, so that a
// finding's evidence (a list of 68 steps, say) stays a few lines long.
function compactJSON(v, indent = "") {
  const plain = x => x === null || typeof x !== "object";
  if (Array.isArray(v) && v.every(plain)) return JSON.stringify(v).replace(/,/g, ", ");
  if (plain(v)) return JSON.stringify(v);
  const inner = indent + "  ", arr = Array.isArray(v);
  const items = arr ? v.map(x => inner + compactJSON(x, inner))
    : Object.entries(v).map(([k, x]) => `${inner}${JSON.stringify(k)}: ${compactJSON(x, inner)}`);
  if (!items.length) return arr ? "[]" : "{}";
  return (arr ? "[\n" : "{\n") + items.join(",\n") + "\n" + indent + (arr ? "]" : "}");
}

// The first `width` characters of `v` as one line of JSON ("..." where cut).
function jsonLine(v, width = 160) {
  const s = compactJSON(v).replace(/\n */g, " ");  // (a string's own newline is escaped: \\n)
  return s.length <= width ? s : s.slice(0, width - 3) + "...";
}

// {"a": {"b": 1}, "c": "x"} -> [["a.b", 1], ["c", "x"]]
function flatten(obj, prefix = "", out = []) {
  for (const [k, v] of Object.entries(obj || {})) {
    if (v && typeof v === "object" && !Array.isArray(v)) flatten(v, prefix + k + ".", out);
    else out.push([prefix + k, Array.isArray(v) ? JSON.stringify(v) : v]);
  }
  return out;
}

// A trace's name in a legend, at most LEGEND_MAX characters: the last dotted parts of a long
// layer path that fit ("…3.spectral_conv.weights1"), so that a legend of long names does not
// squeeze the plot; the whole name is in the hover.
const LEGEND_MAX = 28;
function legendName(s) {
  s = String(s);
  if (s.length <= LEGEND_MAX) return s;
  const parts = s.split(".");
  let tail = parts.pop();
  while (parts.length && tail.length + parts.at(-1).length + 2 <= LEGEND_MAX) tail = parts.pop() + "." + tail;
  return "…" + tail.slice(-(LEGEND_MAX - 1));
}

const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04",
  "#db2777", "#4b5563", "#65a30d"];
// Points per trace kept while live: past it a trace is thinned 2:1 (the whole history stays
// visible at half the resolution), so the cost of a redraw stays bounded.
const LIVE_CAP = 300;
// A trace of fewer points than this is drawn with markers: a line of one point (a validation
// loss after the first epoch) shows nothing. Past it (a live loss growing) the markers go.
const SPARSE_MAX = 30;

// plotly.min.js (4.8 MB) takes about a second to compile and run in a browser that has not
// kept its compiled code. It is preloaded (index.html) and run once the page has asked for
// the run's data (app.js), so that the server answers meanwhile and the run's tables and
// findings show first; every plotly call waits for it.
let plotlyLoad = null;
function loadPlotly() {
  if (!plotlyLoad) plotlyLoad = window.Plotly ? Promise.resolve() : new Promise((ok, fail) => {
    const s = document.createElement("script");
    s.src = "/static/plotly.min.js";
    s.onload = () => ok();
    s.onerror = () => { plotlyLoad = null; fail(new Error("plotly.min.js did not load")); };
    document.head.append(s);
  });
  return plotlyLoad;
}

// A plotly chart whose traces are keyed by a string. New traces and new points are queued
// and drawn together by flush(): one plotly call per chart per frame, not one per record.
class Chart {
  constructor(div, layout) {
    this.div = div;
    this.layout = layout;
    this.keys = new Map();   // trace key -> trace index
    this.specs = [];         // index -> {stat, ...}
    this.newTraces = [];
    this.pending = new Map(); // index -> {x: [], y: []}
    this.lengths = [];       // index -> points in the trace
    this.sparse = new Set(); // indices drawn with markers (fewer than SPARSE_MAX points)
    this.waiting = [];       // live records sent here while in view, not drawn yet (latency)
    this.drawn = false;
    this.purged = false;     // purge()d (another run opened): a flush under way stops
    this.visible = true;     // in the viewport (an IntersectionObserver keeps this)
    Chart.observer.observe(div);
    div.__chart = this;
  }

  // A chart outside the viewport is drawn once, then not again until it scrolls into view:
  // a redraw costs the same whether anyone sees it or not, and one of a chart left alone
  // for seconds is long (a chart in view would wait behind it). Its new points wait, thinned.
  due() { return this.dirty() && (this.visible || !this.drawn); }

  has(key) { return this.keys.has(key); }
  spec(key) { return this.specs[this.keys.get(key)]; }

  // spec: {label, stat, color, dash, visible, markers (points only, never a line), bad (its
  // NaN/Inf points, a gap in the line, are also marked along the chart's top: a trace of
  // their own, made at the first)}; x, y: initial points
  add(key, spec, x = [], y = []) {
    if (this.keys.has(key)) return this.keys.get(key);
    const i = this.specs.length;
    this.keys.set(key, i);
    this.specs.push(spec);
    this.lengths.push(x.length);
    const sparse = x.length < SPARSE_MAX && !spec.markers;
    if (sparse) this.sparse.add(i);
    const mode = spec.markers ? "markers" : sparse ? "lines+markers" : "lines";
    this.newTraces.push({
      type: "scatter", mode, name: plotlyText(legendName(spec.label)), x, y,
      line: {width: 1.5, color: spec.color, dash: spec.dash || "solid"},
      marker: {size: spec.symbol ? 7 : 5, color: spec.color, symbol: spec.symbol || "circle"},
      visible: spec.visible === undefined ? true : spec.visible, yaxis: spec.yaxis || "y",
      hovertemplate: (spec.hover || "%{y:.4g} @ step %{x}") + "<extra>" + plotlyText(spec.label) + "</extra>",
    });
    if (spec.bad) {
      const bx = Array.from(x).filter((_, j) => !Number.isFinite(y[j]));
      if (bx.length) this.addBad(key, spec, bx);
    }
    return i;
  }

  // The marks of `key`'s NaN/Inf steps: points at the top of the chart (on a hidden second
  // y axis of 0..1, so neither the scale nor log mode moves them), in the trace's colour.
  addBad(key, spec, x) {
    this.add(key + "\u0000bad", {label: spec.label + " NaN/Inf", stat: spec.stat, color: spec.color,
      markers: true, symbol: "x", yaxis: "y2", hover: "NaN or Inf @ step %{x}"}, x, x.map(() => BAD_Y));
  }

  push(key, x, y) {
    const spec = this.spec(key);
    if (spec.bad && !Number.isFinite(y)) {  // (null: JSON's NaN and Inf)
      if (this.has(key + "\u0000bad")) this.push(key + "\u0000bad", x, BAD_Y);
      else this.addBad(key, spec, [x]);
    }
    const i = this.keys.get(key);
    let p = this.pending.get(i);
    if (!p) this.pending.set(i, p = {x: [], y: []});
    p.x.push(x);
    p.y.push(y);
    if (!this.visible && p.x.length > 2 * LIVE_CAP) {  // out of view: thinned 2:1 as they wait
      const keep = (_, j) => j % 2 === 0 || j === p.x.length - 1;
      p.x = p.x.filter(keep);
      p.y = p.y.filter(keep);
    }
  }

  dirty() { return this.newTraces.length > 0 || this.pending.size > 0 || !this.drawn; }

  // Draw what is queued. Each plotly call is awaited; a chart purged meanwhile (the page
  // opened another run) stops there: its div has no plot to extend any more.
  async flush() {
    if (!window.Plotly) await loadPlotly();
    if (this.purged) return;
    if (!this.drawn) {
      const traces = this.newTraces;
      this.newTraces = [];
      this.drawn = true;
      const {legendBelow, ...layout} = {...this.layout, showlegend: this.layout.showlegend ?? traces.length <= 14};
      await Plotly.newPlot(this.div, traces, layout, {displaylogo: false, responsive: true});
      if (this.layout.legendBelow) await this.fitLegend();
    } else if (this.newTraces.length) {
      const traces = this.newTraces;
      this.newTraces = [];
      await Plotly.addTraces(this.div, traces);
      if (this.layout.legendBelow) await this.fitLegend();
    }
    if (this.purged) return;
    if (this.pending.size) {
      const idx = [...this.pending.keys()];
      const xs = idx.map(i => this.pending.get(i).x);
      const ys = idx.map(i => this.pending.get(i).y);
      this.pending = new Map();
      const full = [];
      idx.forEach((i, k) => { this.lengths[i] += xs[k].length; if (this.lengths[i] > LIVE_CAP) full.push(i); });
      if (full.length) await this.thin(idx, xs, ys, full);
      else await Plotly.extendTraces(this.div, {x: xs, y: ys}, idx);
      if (this.purged) return;
      const dense = idx.filter(i => this.sparse.has(i) && this.lengths[i] >= SPARSE_MAX);
      if (dense.length) {  // once per trace: its markers go
        dense.forEach(i => this.sparse.delete(i));
        await Plotly.restyle(this.div, {mode: "lines"}, dense);
      }
    }
  }

  // A legend below the plot (a chart of layers: long names) adds its own height to the chart's,
  // so that the plot keeps its height and its whole width.
  async fitLegend() {
    if (this.purged) return;
    const fl = this.div._fullLayout, lh = fl && fl.showlegend && fl.legend ? fl.legend._height || 0 : 0;
    const want = Math.round(CHART_PX + lh), mb = MARGIN_B + lh;
    // (the margin too: a div kept from another run's chart may have the height already)
    if (Math.abs(this.div.clientHeight - want) > 2 || Math.abs((fl?.margin?.b ?? MARGIN_B) - mb) > 2) {
      this.div.style.height = want + "px";
      await Plotly.relayout(this.div, {height: want, "margin.b": mb});
    }
  }

  // Append and thin 2:1 (keeping the newest point) in one redraw.
  async thin(idx, xs, ys, full) {
    const data = this.div.data, set = {x: [], y: []};
    idx.forEach((i, k) => {
      let x = Array.from(data[i].x).concat(xs[k]), y = Array.from(data[i].y).concat(ys[k]);
      if (full.includes(i)) {
        const keep = (_, j) => j % 2 === 0 || j === x.length - 1;
        x = x.filter(keep); y = y.filter(keep);
      }
      this.lengths[i] = x.length;
      set.x.push(x); set.y.push(y);
    });
    await Plotly.restyle(this.div, set, idx);
  }

  setLog(on) {
    if (this.drawn) Plotly.relayout(this.div, {"yaxis.type": on ? "log" : "linear"});
    this.layout.yaxis = {...this.layout.yaxis, type: on ? "log" : "linear"};
  }

  purge() {
    this.purged = true;
    Chart.observer.unobserve(this.div);
    if (this.drawn && window.Plotly) Plotly.purge(this.div);
    this.div.style.height = "";  // (the div serves the next run's chart: fitLegend sizes it anew)
  }
}
Chart.onVisible = () => {};
Chart.observer = new IntersectionObserver((entries) => {
  let shown = false;
  for (const e of entries) {
    const c = e.target.__chart;
    if (!c) continue;
    shown = shown || (e.isIntersecting && !c.visible);
    if (c.visible && !e.isIntersecting) {  // left the view: its undrawn records are not "drawn in view"
      for (const r of c.waiting) r.gone = true;
      c.waiting = [];
    }
    c.visible = e.isIntersecting;
  }
  if (shown) Chart.onVisible();
});

const CHART_PX = 300, MARGIN_B = 36;  // a chart's height (style.css .chart), a legend below it added
const BAD_Y = 0.97;  // where NaN/Inf marks sit on their hidden 0..1 axis: along the plot's top

// bad: the chart marks its traces' NaN/Inf steps (Chart.addBad) on a second y axis, hidden
function chartLayout(title, {log = false, legend, below = false, bad = false} = {}) {
  return {
    ...(bad ? {yaxis2: {overlaying: "y", range: [0, 1], visible: false, fixedrange: true}} : {}),
    legendBelow: below,
    title: title ? {text: plotlyText(title), font: {size: 13}, x: 0.01} : undefined,
    margin: {l: 55, r: 10, t: title ? 32 : 10, b: MARGIN_B},
    xaxis: {title: {text: "step"}, zeroline: false},
    yaxis: {type: log ? "log" : "linear", exponentformat: "e"},
    legend: below ? {font: {size: 10}, orientation: "h", x: 0, xanchor: "left", y: 0, yref: "container",
      yanchor: "bottom"} : {font: {size: 10}},
    showlegend: legend,
    hovermode: "closest",
    paper_bgcolor: "#fff", plot_bgcolor: "#fff",
  };
}
