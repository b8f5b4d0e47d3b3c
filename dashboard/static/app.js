"use strict";
// The tensortap page: runs list, one run's charts and tables, live updates by SSE, an
// optional overlay run. Helpers (el, fmt, Chart, ...) are in charts.js.

const $ = (id) => document.getElementById(id);
const enc = encodeURIComponent;
// An error of api() has .status (the HTTP status), or .network (no answer: collector gone).
async function api(path) {
  let r;
  try {
    r = await fetch(path, {cache: "no-store"});
  } catch (e) {
    throw Object.assign(new Error("unreachable: " + path), {network: true});
  }
  if (!r.ok) throw Object.assign(new Error(r.status + " " + path), {status: r.status});
  return r.json();
}

// State, exposed for tests and the benchmark (window.__tt.latency: ms from wire t to drawn).
const S = {run: null, cmp: null, gen: 0, charts: new Map(), es: null, findings: -1,
  latency: [], flushing: false, runs: [], down: false, missing: null, cursor: 0, pollMs: 2000};
window.__tt = S;

// Which statistic each chart draws: the first of these a series has (exact, then by suffix).
const PICK = {value: ["value", "loss"], mean: ["mean"], std: ["std"], norm: ["norm", "l2_norm", "l2"]};
const GRAD_CHARTS = [["grad-mean", "mean", "gradient mean", false],
  ["grad-std", "std", "gradient std (log)", true], ["grad-norm", "norm", "gradient L2 norm (log)", true]];
const ACT_SHOWN = ["mean", "std"], ACT_HIDDEN = ["min", "max"];

function pick(stats, want) {
  for (const w of PICK[want] || [want]) if (stats.includes(w)) return w;
  for (const w of PICK[want] || [want]) { const s = stats.find(x => x.endsWith("." + w)); if (s) return s; }
  return want === "value" ? stats.find(s => !/count|nan|inf/.test(s)) || null : null;
}

function actStats(stats) {
  const last = (s) => s.split(".").pop();
  return stats.filter(s => ACT_SHOWN.includes(last(s)) || ACT_HIDDEN.includes(last(s)));
}

// -- charts of one run (plus the overlay) ---------------------------------------------------
// A trace's colour, handed out in order within its scope: the metrics chart, the gradient
// charts (one layer, one colour in all three), each activation chart; so that the traces of
// one chart differ (a page-wide order gave "std" and "rank 1 · std" one colour).
function colorOf(name, scope = "") {
  let m = S.colors.get(scope);
  if (!m) S.colors.set(scope, m = new Map());
  if (!m.has(name)) m.set(name, PALETTE[m.size % PALETTE.length]);
  return m.get(name);
}

function chartFor(id, title, opts) {
  if (!S.charts.has(id)) S.charts.set(id, new Chart($("chart-" + id) || newActDiv(id), chartLayout(title, opts)));
  return S.charts.get(id);
}

function newActDiv(id) {
  const d = el("div", {class: "chart"});
  $("activations").append(d);
  return d;
}

// Route one series (initial rows or one live record) into the charts that draw it.
// prefix "" for the run in view, "cmp" for the overlay (drawn dashed).
// name: the series' label (its name, "name · rank r" for the other ranks of a DDP run);
// base, rank: its records' name and rank (an activation's chart is one for every rank of it);
// split: the evaluation an activation series was taken in ("val": its traces in the same chart).
function place(kind, name, stats, prefix, x, y, base = name, rank = 0, split = null) {
  const over = prefix ? (S.cmp ?? prefix) + " · " : "";  // the overlaid run's traces say its name
  const label = over + name;
  const dash = prefix ? "dot" : "solid";
  const out = [];  // [chart, key, stat] where this series goes
  if (kind === "metrics") {
    const c = chartFor("metrics", "", {bad: true});  // a NaN or Inf loss: marked, not only a gap
    const key = prefix + "|" + name, stat = c.has(key) ? c.spec(key).stat : pick(stats, "value");
    if (stat) {
      c.add(key, {label, stat, color: colorOf(name, "metrics"), dash, bad: true}, x(stat), y(stat));
      out.push([c, key, stat]);
    }
  } else if (kind === "gradients") {
    showKind(kind, true);
    for (const [id, want, title, log] of GRAD_CHARTS) {
      const c = chartFor(id, title, {log, below: true});
      const key = prefix + "|" + name, stat = c.has(key) ? c.spec(key).stat : pick(stats, want);
      if (stat) { c.add(key, {label, stat, color: colorOf(name, "gradients"), dash}, x(stat), y(stat)); out.push([c, key, stat]); }
    }
  } else if (kind === "activations") {
    showKind(kind, true);
    const c = chartFor("act:" + base, "activation: " + base, {legend: true});
    // the other ranks' traces in rank 0's chart; an evaluation's ("val · mean") beside training's
    const r = (rank ? "rank " + rank + " · " : "") + (split != null ? split + " · " : "");
    for (const stat of actStats(stats)) {
      const key = prefix + "|" + r + stat, own = r + stat;
      const visible = ACT_SHOWN.includes(stat.split(".").pop()) ? true : "legendonly";
      // an evaluation's values as points: its batches share a step (a line zigzags between them)
      c.add(key, {label: over + own, stat, color: colorOf(own, "act:" + base), dash, visible,
                  markers: split != null}, x(stat), y(stat));
      out.push([c, key, stat]);
    }
  }
  return out;
}

// The statistics each kind's charts draw, and how many points per series to fetch.
const NEED = {
  metrics: [(st) => [pick(st, "value")], 2000],
  gradients: [(st) => GRAD_CHARTS.map(([, want]) => pick(st, want)), 600],
  activations: [(st) => actStats(st), 600],
};

// onAsked: called once the series have been asked for (their answers come meanwhile)
async function loadSeries(run, prefix, gen, onAsked = () => {}) {
  const streams = await api(`/api/runs/${enc(run)}/streams`);
  const kinds = Object.keys(NEED).filter(k => (streams[k] || []).length);
  const asked = kinds.map(kind => {
    const [need, points] = NEED[kind];
    const stats = [...new Set(streams[kind].flatMap(s => need(s.stats)).filter(Boolean))];
    const q = stats.map(s => "stat=" + enc(s)).join("&");
    return stats.length ? api(`/api/runs/${enc(run)}/kind/${kind}?${q}&points=${points}`) : null;
  });
  onAsked();
  const results = await Promise.all(asked);
  if (gen !== S.gen) return null;
  if (!prefix) for (const kind of Object.keys(NONE)) showKind(kind, kinds.includes(kind));
  let cursor = Infinity;
  kinds.forEach((kind, k) => {
    const res = results[k];
    if (!res) return;
    cursor = Math.min(cursor, res.cursor);
    for (const s of streams[kind]) {
      const label = s.label ?? s.name, row = res.series[label];
      if (row) place(kind, label, s.stats, prefix, () => row.step, (st) => row[st] || [], s.of ?? s.name,
        label === s.name ? 0 : s.rank, s.split ?? null);
    }
  });
  return cursor === Infinity ? 0 : cursor;
}

// A kind a run has no records of (a metrics-only run: no gradients, no activations) is one
// line saying so, not an empty panel; its charts show as soon as a record of it comes.
const NONE = {
  gradients: ["grad-none", "grad-charts", "No gradient records in this run. A loop that never " +
    "begins a step (tap.log_batch) records the loss only."],
  activations: ["act-none", "act-charts", "No activation records in this run."],
};

function showKind(kind, has) {
  const [hint, box, text] = NONE[kind];
  if ($(box).hidden === !has) return;
  $(box).hidden = !has;
  $(hint).hidden = has;
  $(hint).textContent = has ? "" : text;
}

function onLive(msg) {
  S.cursor = msg.cursor;
  for (const [, kind, name, rank, step, t, flat, label, of, split] of msg.items) {
    if (kind === "metrics" || kind === "gradients" || kind === "activations") {
      const stats = Object.keys(flat);
      const rec = {t, left: 0};  // drawn once each visible chart it went to has been redrawn
      const own = label ?? name;  // (a rank's own trace once the run has several ranks)
      for (const [c, key, stat] of place(kind, own, stats, "", () => [], () => [], of ?? name, own === name ? 0 : rank,
                                         split ?? null)) {
        if (stat in flat) c.push(key, step, flat[stat]);
        if (c.visible && c.waiting.at(-1) !== rec) { c.waiting.push(rec); rec.left++; }
      }
    } else if (kind === "loader_stats" || kind === "patch_metrics") {
      scheduleTables();
    }
  }
  // the findings again when they changed (a live run's plateau finding is rewritten as it goes on)
  if (msg.findings_rev !== S.findingsRev && S.findings !== -2) {
    S.findingsRev = msg.findings_rev;
    loadFindings(S.run, S.gen).catch(showError);
  }
  if ((msg.state ?? msg.live) !== S.state || (msg.records !== undefined && msg.records !== S.meta?.records)) {
    scheduleManifest();  // its counts follow the run (throttled), and its ranks' closed once they say bye
  }
  S.state = msg.state ?? msg.live;
  setLive(msg.state ?? msg.live);
  // the run's entry in the list too, at once (it waited for the next poll of the runs)
  const mine = S.runs.find(r => r.run === S.run), live = S.state === "live" || S.state === true;
  if (mine && mine.live !== live) { mine.live = live; renderRuns(); }
  if (msg.records !== undefined && msg.records !== S.meta?.records) showMeta({records: msg.records});
  requestDraw();
}

// Draw what arrived, once per animation frame at most; a chart out of view only once, then
// when it scrolls into view (Chart.due). One chart at a time, charts in view first, with a
// turn of the event loop between two: live messages that come meanwhile are taken in at once,
// and a chart drawn early in a round does not wait for the others to show. The latency figure
// (window.__tt.latency) is per record that went to a visible chart: from its wire time t to
// the end of the redraw of the last of its visible charts that drew it. A record whose chart
// leaves the view before it is drawn is left out of the figure.
// A plotly redraw costs about the same for 1 or 500 new points, so rounds are spaced: one
// starts at least MIN_FRAME_MS, and at least the last round's length, after the last one
// started (so a round longer than MIN_FRAME_MS is followed by the next at once; the turns
// between its charts keep server-sent events from queueing behind it).
const MIN_FRAME_MS = 30;

function requestDraw() {
  if (S.flushing) { S.again = true; return; }
  S.flushing = true;
  const gap = Math.max(MIN_FRAME_MS, S.drawMs || 0);
  const wait = Math.max(0, (S.lastDraw || 0) + gap - performance.now());
  setTimeout(() => requestAnimationFrame(draw), wait);
}

async function draw() {
  const gen = S.gen, now0 = S.lastDraw = performance.now();
  let drawn = 0;
  try {
    const all = [...S.charts.values()];  // the charts in view first
    for (const c of all.filter(c => c.visible).concat(all.filter(c => !c.visible))) {
      if (gen !== S.gen) break;
      if (!c.due()) continue;
      if (drawn++) await new Promise(r => setTimeout(r, 0));  // live messages in between
      const recs = c.waiting;
      c.waiting = [];
      await c.flush();
      if (gen !== S.gen) break;  // another run opened meanwhile: its charts are new ones
      const now = Date.now();
      for (const r of recs) if (--r.left === 0 && !r.gone && gen === S.gen) S.latency.push(now - r.t * 1000);
    }
    S.drawMs = performance.now() - now0;
    if (S.latency.length > 200000) S.latency.splice(0, 100000);
  } finally {
    S.flushing = false;
    if (S.again) { S.again = false; requestDraw(); }
  }
}
Chart.onVisible = requestDraw;

// -- tables and panels ----------------------------------------------------------------------
const STAT_ORDER = ["count", "min", "max", "mean", "std", "nan", "inf"];
const PARTS = ["real", "imag", "abs", "angle"];

function statRows(data) {
  const rows = [], top = {}, info = [];
  for (const [k, v] of Object.entries(data || {})) {
    if (v === null || typeof v === "number") top[k] = v;
    else if (v && typeof v === "object" && !Array.isArray(v)) rows.push([k, Object.fromEntries(flatten(v))]);
    else info.push(k + "=" + (Array.isArray(v) ? JSON.stringify(v) : String(v)));
  }
  rows.sort((a, b) => (PARTS.indexOf(a[0]) + 99) % 99 - (PARTS.indexOf(b[0]) + 99) % 99);
  if (Object.keys(top).length) rows.unshift(["", top]);
  return {rows, info: info.join("; ")};
}

function statTable(records) {
  const built = records.map(r => ({r, ...statRows(r.data)}));
  const cols = [...new Set(built.flatMap(b => b.rows.flatMap(([, s]) => Object.keys(s))))];
  cols.sort((a, b) => ((STAT_ORDER.indexOf(a) + 99) % 99 - (STAT_ORDER.indexOf(b) + 99) % 99) || a.localeCompare(b));
  const head = el("tr", {}, el("th", {class: "name"}, "field"), el("th", {class: "name"}, "part"),
    ...cols.map(c => el("th", {}, c)), el("th", {class: "name"}, "info"));
  const body = [];
  for (const {r, rows, info} of built) {
    for (const [part, stats] of (rows.length ? rows : [["", {}]])) {
      body.push(el("tr", {}, el("td", {class: "name"}, r.name), el("td", {class: "name"}, part),
        ...cols.map(c => el("td", {class: /nan|inf/.test(c) && stats[c] > 0 ? "bad" : ""}, fmt(stats[c]))),
        el("td", {class: "name"}, info)));
    }
  }
  return el("table", {}, el("thead", {}, head), el("tbody", {}, ...body));
}

async function loadTables(run, gen) {
  const [loader, patch] = await Promise.all([api(`/api/runs/${enc(run)}/records/loader_stats`),
    api(`/api/runs/${enc(run)}/records/patch_metrics`)]);
  if (gen !== S.gen) return;
  const first = new Map();  // the first record of each field is the first batch
  for (const r of loader) if (!first.has(r.name)) first.set(r.name, r);
  const rs = [...first.values()];
  // the batch's step and epoch (a loader's presence and length, logged once, carry none)
  const at = rs.find(r => r.step !== null && r.step !== undefined) || rs[0];
  $("loader-caption").textContent = rs.length ? `first record of each field: step ${fmt(at?.step)}, ` +
    `epoch ${fmt(at?.epoch)}, rank ${at?.rank} (${plural(loader.length, "record")} in all)` : "no loader records yet";
  $("loader").replaceChildren(rs.length ? statTable(rs) : "");
  const latest = new Map();
  for (const r of patch) latest.set(r.name, r);
  // the scaling statement (a sentence) above the table, once per metric set; the numbers below
  const rows = [], scaling = [];
  for (const r of latest.values()) {
    const stated = r.data && typeof r.data.scaling === "string" ? r.data.scaling : null;
    scaling.push(`${r.name}: ${stated ?? "scaling not stated by the sender"}`);
    for (const [k, v] of flatten(r.data)) if (!(k === "scaling" && stated !== null)) rows.push([r.name, k, v]);
  }
  $("patch-scaling").textContent = latest.size ? "Scaling. " + scaling.join(" · ") : "";
  $("patch").replaceChildren(rows.length ? el("table", {},
    el("thead", {}, el("tr", {}, el("th", {class: "name"}, "name"), el("th", {class: "name"}, "metric"), el("th", {}, "value"))),
    el("tbody", {}, ...rows.map(([n, k, v]) => el("tr", {}, el("td", {class: "name"}, n),
      el("td", {class: "name"}, k), el("td", {class: typeof v === "string" ? "text" : ""}, fmt(v)))))) :
    el("p", {class: "muted"}, "no patch metrics yet"));
}

// The manifest panel, at most every MANIFEST_MS while the run's records or state move.
const MANIFEST_MS = 2000;
function scheduleManifest() {
  if (S.manifestTimer) return;
  const run = S.run, gen = S.gen;
  S.manifestTimer = setTimeout(() => {
    S.manifestTimer = null;
    if (gen === S.gen) api(`/api/runs/${enc(run)}/manifest`).then(m => { if (gen === S.gen) showManifest(m); })
      .catch(showError);
  }, MANIFEST_MS);
}

function showManifest(manifest) {
  const {stream_marks: _marks, ...kept} = manifest || {};  // (the collector's restart bookkeeping)
  $("manifest").replaceChildren(el("div", {class: "table-wrap"}, ...kvTable(kept)));
}

function scheduleTables() {
  if (S.tablesTimer) return;
  S.tablesTimer = setTimeout(() => { S.tablesTimer = null; loadTables(S.run, S.gen).catch(showError); }, 500);
}

async function loadFindings(run, gen) {
  S.findings = -2;  // a fetch is on its way; the next SSE count refreshes again if different
  let list;
  try { list = await api(`/api/runs/${enc(run)}/findings`); } catch (e) { S.findings = -1; throw e; }
  if (gen !== S.gen) return;
  S.findings = list.length;
  $("findings").replaceChildren(...(list.length ? list.map(f => {
    const sev = f.severity || f.level || "info";
    const title = f.title || f.rule || f.code || f.id || "finding";
    const msg = f.hint || f.message || f.detail || f.summary || "";
    const rest = Object.fromEntries(Object.entries(f).filter(([k]) =>
      !["severity", "level", "title", "rule", "code", "id", "hint", "message", "detail", "summary"].includes(k)));
    // the evidence folded: one line of it shown, the whole on a click
    const ev = Object.keys(rest).length === 1 && rest.evidence !== undefined ? rest.evidence : rest;
    // a symptom the diagnosis explains by a cause listed above it: indented, the cause named
    const of = f.evidence && Array.isArray(f.evidence.consequence_of) ? f.evidence.consequence_of : null;
    return el("div", {class: "finding " + String(sev).toLowerCase() + (of ? " consequence" : "")},
      el("span", {class: "sev"}, sev), el("span", {class: "title"}, title),
      of ? el("span", {class: "of"}, "← " + of.join(", ")) : null, msg ? el("div", {}, msg) : null,
      Object.keys(rest).length ? el("details", {class: "evidence"},
        el("summary", {}, "evidence ", el("code", {}, jsonLine(ev))), el("pre", {}, compactJSON(ev))) : null);
  }) : [el("p", {class: "muted"}, "nothing flagged")]));
}

function kvTable(obj) {
  const scalars = [], tables = [];
  for (const [k, v] of Object.entries(obj || {})) {
    const rows = v && typeof v === "object" && !Array.isArray(v) ? Object.entries(v) : null;
    if (rows && rows.length && rows.every(([, r]) => r && typeof r === "object" && !Array.isArray(r))) tables.push([k, rows]);
    else scalars.push(...(rows ? flatten(v, k + ".") : [[k, Array.isArray(v) ? JSON.stringify(v) : v]]));
  }
  const parts = [el("p", {class: "muted small"}, scalars.map(([k, v]) => `${k}: ${fmtField(k, v)}`).join(" · "))];
  for (const [k, rows] of tables) {
    const cols = [...new Set(rows.flatMap(([, r]) => flatten(r).map(([c]) => c)))];
    parts.push(el("table", {}, el("thead", {}, el("tr", {}, el("th", {class: "name"}, k), ...cols.map(c => el("th", {}, c)))),
      el("tbody", {}, ...rows.map(([n, r]) => { const f = Object.fromEntries(flatten(r));
        return el("tr", {}, el("td", {class: "name"}, n), ...cols.map(c =>
          el("td", {class: /gap|drop|dup|reject/.test(c) && f[c] > 0 ? "bad" : ""}, fmt(f[c])))); }))));
  }
  return parts;
}

// -- runs, health, navigation ---------------------------------------------------------------
async function refreshRuns() {
  const was = S.runs.find(r => r.run === S.run);
  S.runs = await api("/api/runs");
  const now = S.runs.find(r => r.run === S.run);
  if (was && now && (was.loading && !now.loading || was.stored && !now.stored) && !S.missing) {
    // a restarted collector has put the run's stored records back, or a stored run (its
    // files, read) has resumed sending (the live run, whole)
    openRun().catch(showError);
  } else if (now && now.state && !S.down) {
    setLive(now.state);
    showMeta({records: now.records, ranks: now.ranks, loading: now.loading, uncharted: now.uncharted});
  }
  if (S.missing && S.runs.some(r => r.run === S.missing)) {  // the run asked for has come
    S.missing = null;
    openRun().catch(showError);
  } else if (S.missing) {
    showMissing(S.missing);
  }
  renderRuns();
  const sel = $("compare");
  const want = [""].concat(S.runs.map(r => r.run).filter(r => r !== S.run));
  if ([...sel.options].map(o => o.value).join("\n") !== want.join("\n")) {
    sel.replaceChildren(...want.map(r => el("option", {value: r}, r || "(none)")));
  }
  sel.value = S.cmp || "";
  if (!S.run && !S.missing && S.runs.length) go((S.runs.find(r => r.live) || S.runs[S.runs.length - 1]).run, null);
}

function renderRuns() {
  $("runs").replaceChildren(...S.runs.slice().reverse().map(r => {
    const li = el("li", {class: r.run === S.run ? "selected" : ""}, el("span", {class: "dot" + (r.live ? " live" : "")}),
      r.run, el("span", {class: "sub"}, `${plural(r.records, "record")} · ${plural(r.findings, "finding")}` +
        (r.live && !S.down ? " · live" : "")));
    li.addEventListener("click", () => go(r.run, S.cmp === r.run ? null : S.cmp));
    return li;
  }));
}

async function refreshHealth() {
  const h = await api("/api/health");
  $("health").replaceChildren(...flatten(h).map(([k, v]) =>
    el("span", {class: "chip" + (/gap|drop|reject|dup|error|degraded|lost/.test(k) && v && v !== "ok" ? " warn" : "")},
      k, el("b", {}, fmtField(k, v)))));
}

// state: "live", "finished" (every rank said bye) or "unclosed" (a rank never said bye and
// nothing came for a while: stopped without closing, killed, or paused); a bool from an older
// collector
const STATES = {
  live: ["live", "live", ""],
  finished: ["finished", "", "every rank said bye"],
  unclosed: ["quiet, never closed", "quiet", "nothing came for 15 s and a rank never said bye: " +
    "the training stopped without closing (killed?) or is paused"],
};

// The run's head line: records (kept current by the live stream and the runs' poll), ranks,
// whether its stored records are being put back, the overlay.
function showMeta(update = {}) {
  if (!S.meta || S.meta.run !== S.run) return;  // (another run's head is on its way)
  const m = S.meta = {...S.meta, ...update};
  const ranks = m.ranks.length === 1 ? `rank ${m.ranks[0]}` : `ranks ${m.ranks.join(", ")}`;
  $("run-meta").textContent = `${plural(m.records, "record")} · ${ranks}` +
    (m.loading ? " · loading its stored records" : "") + (m.cmp ? ` · overlaid (dotted): ${m.cmp}` : "") +
    (m.uncharted ? ` · ${m.uncharted} records not charted (the run has 4,096 series; they are in its files)` : "");
}

function setLive(state) {
  if (S.down) return;  // the badge says "collector unreachable" until it answers again
  const [text, cls, title] = STATES[state === true ? "live" : state === false ? "finished" : state] || STATES.finished;
  $("run-live").textContent = text;
  $("run-live").className = "badge" + (cls ? " " + cls : "");
  $("run-live").title = title;
}

// The runs and the health every POLL_MS. While the collector does not answer, the page says so
// (a banner, the badge, no run marked live) and asks less and less often (up to POLL_MAX_MS);
// once it answers again, the run in view is opened afresh (a restarted collector has a new index).
const POLL_MS = 2000, POLL_MAX_MS = 30000;

function poll() {
  if (S.polling) return S.polling;  // (one at a time: one chain of timers)
  clearTimeout(S.pollTimer);
  let gone = false;
  const one = (p) => p.catch(e => { if (e.network) gone = true; else showError(e); });
  return S.polling = Promise.all([one(refreshRuns()), one(refreshHealth())]).then(() => {
    S.polling = null;
    setDown(gone);
    S.pollMs = gone ? Math.min(POLL_MAX_MS, S.pollMs * 2) : POLL_MS;
    S.pollTimer = setTimeout(poll, S.pollMs);
  });
}

function setDown(down) {
  if (down === S.down) return;
  S.down = down;
  $("down").hidden = !down;
  if (down) {
    if (S.es) { S.es.close(); S.es = null; }
    $("run-live").textContent = "collector unreachable";
    $("run-live").className = "badge down";
    for (const dot of document.querySelectorAll("#runs .dot.live")) dot.classList.remove("live");
    $("health").classList.add("stale");  // (the collector's last counters, not its state now)
    $("health").title = "the collector does not answer: these are its last counters";
  } else {
    $("health").classList.remove("stale");
    $("health").title = "";
    if (S.run && !S.missing) openRun().catch(showError);
  }
}

function go(run, cmp) {
  location.hash = new URLSearchParams(Object.entries({run, ...(cmp ? {cmp} : {})})).toString();
}

// A run the URL names that the collector does not have: one line saying so, and the runs it has.
function showMissing(run) {
  const links = S.runs.slice().reverse().map(r => el("a", {href: "#" + new URLSearchParams({run: r.run})}, r.run));
  const list = links.flatMap((a, i) => i ? [", ", a] : [a]);
  $("empty").replaceChildren(el("strong", {}, `no run '${run}' here.`), " ",
    ...(links.length ? ["Runs here: ", ...list] : ["No runs here yet; it opens once it sends."]));
  $("empty").hidden = false;
  $("run").hidden = true;
}

async function openRun() {
  const h = new URLSearchParams(location.hash.slice(1));
  const run = h.get("run"), cmp = h.get("cmp") || null;
  if (!run) return;
  const gen = ++S.gen;
  S.missing = null;
  if (S.es) { S.es.close(); S.es = null; }
  for (const c of S.charts.values()) c.purge();
  S.charts = new Map();
  S.colors = new Map();
  S.run = run; S.cmp = cmp; S.findings = -1; S.findingsRev = null; S.state = null;
  $("activations").replaceChildren();
  $("empty").hidden = true;
  $("run").hidden = false;
  $("run-title").textContent = run;
  // Every request at once: the series, the findings and tables, the run's head. plotly.min.js
  // (charts.js) runs once the series have been asked for and the head and the findings are
  // shown: a second on a first visit, while the server answers.
  let asked;
  const series = loadSeries(run, "", gen, () => asked());
  series.catch(() => {});  // (awaited below; not an unhandled rejection meanwhile)
  const shown = [new Promise(r => { asked = r; }), loadFindings(run, gen).catch(showError)];
  loadTables(run, gen).catch(showError);
  const head = Promise.all([api(`/api/runs/${enc(run)}`), api(`/api/runs/${enc(run)}/manifest`)]);
  shown.push(head.catch(() => {}).then(() => new Promise(r => setTimeout(r, 0))));  // (after it is drawn below)
  Promise.all(shown).then(loadPlotly).catch(showError);
  let summary, manifest;
  try {
    [summary, manifest] = await head;
  } catch (e) {
    if (gen !== S.gen || (e.status !== 404 && e.status !== 422)) throw e;  // (422: no run id at all)
    S.gen++;  // what else was asked for this run is dropped
    S.missing = run;
    for (const c of S.charts.values()) c.purge();
    S.charts = new Map();
    showMissing(run);
    refreshRuns().catch(showError);
    return;
  }
  if (gen !== S.gen) return;
  setLive(summary.state ?? summary.live);
  S.meta = {...summary, cmp};
  showMeta();
  S.state = summary.state ?? summary.live;
  showManifest(manifest);
  if (!performance.getEntriesByName("tensortap:head").length) performance.mark("tensortap:head");  // bench
  $("loss-log").checked = false;
  refreshRuns().catch(showError);
  const cursor = await series;
  if (cmp && gen === S.gen) {
    await loadSeries(cmp, "cmp", gen).catch(e => {
      if (e.status !== 404 && e.status !== 422) throw e;
      if (gen === S.gen) showMeta({cmp: `${cmp} (no such run: nothing overlaid)`});
    }).catch(showError);
  }
  // the live stream opens once the charts can be drawn: records of the meantime come from the
  // cursor, and none waits in the page behind plotly's second of compiling
  await loadPlotly();
  if (gen !== S.gen) return;
  requestDraw();
  openStream(run, gen, cursor);
}

// The live stream. EventSource would retry every second on its own, for ever, while the
// collector is gone; instead an error closes it and asks poll() at once: a collector that
// answers gets a new stream from the last cursor, one that does not gets the backed-off polling.
function openStream(run, gen, cursor) {
  S.cursor = cursor;
  const es = S.es = new EventSource(`/api/runs/${enc(run)}/live?cursor=${cursor}`);
  es.onmessage = (ev) => { if (gen === S.gen) onLive(JSON.parse(ev.data)); };
  es.onerror = () => {
    es.close();
    if (S.es !== es) return;
    S.es = null;
    poll().then(() => { if (!S.down && gen === S.gen && !S.es) openStream(run, gen, S.cursor); });
  };
}

// (a 404 is shown where it matters: an unknown run by showMissing; an unreachable collector
// by the banner)
function showError(e) { if (!e || (e.status !== 404 && !e.network)) console.error("tensortap:", e); }

window.addEventListener("hashchange", () => openRun().catch(showError));
document.addEventListener("DOMContentLoaded", () => {
  $("compare").addEventListener("change", (e) => go(S.run, e.target.value || null));
  $("loss-log").addEventListener("change", (e) => S.charts.get("metrics")?.setLog(e.target.checked));
  openRun().catch(showError);
  poll();
  setTimeout(() => loadPlotly().catch(showError), 2000);  // no run opened yet: ready for the first
});
