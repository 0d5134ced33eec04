package node

// statusPage is the self-contained status page served at /: it polls
// /status every second and draws this node's region and every peer region
// with their nodes as an SVG, each link coloured by its state (ok green;
// retrying, fallback or standby amber; halted or node down red), with the
// lag, where transactions' time went over the last minute (the stage
// delays of /status) and the recent path switches. A target whose nodes refuse this
// node's credentials is red ("auth-refused") whatever path carries its
// data. Every link is horizontal (this region's box spans the height of the
// peer regions) and its label sits above it, so no label crosses a link. It
// polls /history every HistoryEvery and charts each target region's last
// HistorySpan: lag in bytes, lag in seconds and apply rate. It loads nothing
// from elsewhere.
const statusPage = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>prism-cdc status</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.3em; margin: 0 0 .3em; }
#summary { color: #555; margin-bottom: 1em; }
svg { background: #fff; border: 1px solid #ddd; border-radius: 6px; }
.link { stroke-width: 6; stroke-linecap: round; }
.state-ok { stroke: #2e9e44; fill: #2e9e44; }
.state-retrying, .state-fallback, .state-standby { stroke: #e0a100; fill: #e0a100; }
.state-halted, .state-down, .state-auth-refused { stroke: #d2322d; fill: #d2322d; }
.region { fill: #eef3fb; stroke: #6b8bc3; stroke-width: 2; }
.node { fill: #fff; stroke: #6b8bc3; }
.node.active { fill: #cfe9d4; stroke: #2e9e44; stroke-width: 2; }
text { font-size: 12px; fill: #222; stroke: none; }
text.title { font-weight: bold; font-size: 14px; }
table { border-collapse: collapse; margin-top: 1em; background: #fff; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; }
th { background: #f0f0f0; }
.badge { display: inline-block; padding: 0 6px; border-radius: 4px; color: #fff; }
.badge.state-ok { background: #2e9e44; }
.badge.state-retrying, .badge.state-fallback, .badge.state-standby { background: #e0a100; }
.badge.state-halted, .badge.state-down, .badge.state-auth-refused { background: #d2322d; }
.hrow { display: flex; align-items: center; gap: 12px; margin: 6px 0; }
.hname { width: 90px; font-weight: bold; }
svg.chart { border-radius: 4px; }
.chart .plot { fill: #f7f9fc; stroke: #ddd; }
.chart .series { fill: none; stroke-width: 2.5; stroke-linejoin: round; }
.chart .c-bytes { stroke: #3b6fd1; }
.chart .c-seconds { stroke: #8e44ad; }
.chart .c-rate { stroke: #1a8f7a; }
.chart text { font-size: 11px; }
.chart text.axis { fill: #777; }
</style>
</head>
<body>
<h1>prism-cdc <span id="title">status</span></h1>
<div id="summary">loading…</div>
<svg id="map" width="760" height="420" viewBox="0 0 760 420" role="img" aria-label="regions and links"></svg>
<table id="targets"><thead><tr><th>target region</th><th>state</th><th>path</th><th>acked LSN</th><th>lag bytes</th><th>lag seconds</th><th>in flight</th><th>retries / failovers / fallbacks (last hour)</th><th>last error</th></tr></thead><tbody></tbody></table>
<h2 style="font-size:1.1em">Last 15 minutes</h2>
<div id="history">collecting samples…</div>
<h2 style="font-size:1.1em">Where the time went, last minute (from the source commit)</h2>
<table id="delays"><thead><tr><th>transactions</th><th>stage</th><th>p50</th><th>p99</th><th>count</th></tr></thead><tbody></tbody></table>
<h2 style="font-size:1.1em">Recent path switches</h2>
<table id="switches"><thead><tr><th>at (UTC)</th><th>region</th><th>from</th><th>to</th></tr></thead><tbody></tbody></table>
<script>
"use strict";
const NS = "http://www.w3.org/2000/svg";
function el(name, attrs, text) {
  const e = document.createElementNS(NS, name);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}
function stateOf(t, down) {
  if (down) return "down";
  if ((t.auth_refused || []).length > 0) return "auth-refused";
  const p = t.path || "";
  if (p.startsWith("halted")) return "halted";
  if (p === "sql fallback") return "fallback";
  if (p === "connecting") return "retrying";
  if (p.startsWith("not shipping")) return "standby";
  return "ok";
}
function fmtBytes(n) {
  if (n < 1024) return n + " B";
  const u = ["KiB", "MiB", "GiB", "TiB"]; let i = -1;
  do { n /= 1024; i++; } while (n >= 1024 && i < u.length - 1);
  return n.toFixed(1) + " " + u[i];
}
function cell(tr, text, cls) {
  const td = document.createElement("td");
  if (cls) { const s = document.createElement("span"); s.className = "badge " + cls; s.textContent = text; td.appendChild(s); }
  else td.textContent = text;
  tr.appendChild(td);
}
let last = null;
function draw(st, down) {
  document.getElementById("title").textContent = "node " + st.node + " · region " + st.region;
  document.getElementById("summary").textContent = down
    ? "node " + st.node + " does not answer (" + down + ")"
    : "role " + st.role + (st.role_reason ? " (" + st.role_reason + ")" : "") + " · up " + st.uptime +
      " · last read " + st.last_read_lsn + " · slot confirmed " + st.confirmed_lsn + " · decoded " + st.decoded_txns + " txns";
  const svg = document.getElementById("map");
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const targets = st.targets || [];
  const peers = {};
  for (const p of (st.peers || [])) peers[p.region] = p.nodes;
  const cx = 150, cy = 210;
  const n = targets.length;
  const pos = targets.map((t, i) => ({ x: 580, y: n === 1 ? cy : 70 + i * (280 / Math.max(n - 1, 1)) }));
  // Links run horizontally from this region's box, which spans every
  // target's height, to the target's box; each label sits above its own
  // link, and the next link is at least 40 px away.
  targets.forEach((t, i) => {
    const s = stateOf(t, down);
    const y = pos[i].y, x1 = cx + 80, x2 = pos[i].x - 80;
    svg.appendChild(el("line", { x1: x1, y1: y, x2: x2, y2: y, "class": "link state-" + s, "data-region": t.region, "data-state": s }));
    const label = s + " · " + fmtBytes(t.lag_bytes || 0) + " · " + (t.lag_seconds || 0).toFixed(1) + " s";
    svg.appendChild(el("text", { x: (x1 + x2) / 2, y: y - 10, "text-anchor": "middle", "class": "lag", "data-region": t.region }, label));
  });
  function region(x, y, name, nodes, active, title, minH) {
    const h = Math.max(44 + 22 * Math.max(nodes.length, 1), minH || 0);
    svg.appendChild(el("rect", { x: x - 80, y: y - h / 2, width: 160, height: h, rx: 10, "class": "region", "data-region": name }));
    svg.appendChild(el("text", { x: x, y: y - h / 2 + 20, "text-anchor": "middle", "class": "title" }, title));
    nodes.forEach((nd, j) => {
      const ny = y - h / 2 + 32 + j * 22;
      svg.appendChild(el("rect", { x: x - 60, y: ny, width: 120, height: 18, rx: 4, "class": "node" + (nd === active ? " active" : ""), "data-node": nd }));
      svg.appendChild(el("text", { x: x, y: ny + 13, "text-anchor": "middle" }, nd));
    });
  }
  const span = n > 1 ? pos[n - 1].y - pos[0].y + 60 : 0;
  region(cx, cy, st.region, [st.node], st.role === "reader" ? st.node : "", "region " + st.region, span);
  targets.forEach((t, i) => region(pos[i].x, pos[i].y, t.region, peers[t.region] || [], t.path, "region " + t.region));

  const tb = document.querySelector("#targets tbody");
  tb.textContent = "";
  for (const t of targets) {
    const s = stateOf(t, down), tr = document.createElement("tr");
    tr.setAttribute("data-region", t.region);
    const h = t.last_hour || {};
    cell(tr, t.region); cell(tr, s, "state-" + s); cell(tr, t.path); cell(tr, t.acked_lsn);
    cell(tr, fmtBytes(t.lag_bytes || 0)); cell(tr, (t.lag_seconds || 0).toFixed(1));
    cell(tr, t.window_txns + " txns, " + fmtBytes(t.window_bytes || 0));
    cell(tr, (h.retries || 0) + " / " + (h.failovers || 0) + " / " + (h.fallbacks || 0) + "  (total " + t.retries + " / " + t.failovers + " / " + t.fallbacks + ")");
    cell(tr, (t.auth_refused || []).length > 0
      ? "refused by " + t.auth_refused.join(", ") + ": give both nodes the same auth.token (and TLS CA). " + (t.last_error || "")
      : (t.last_error_at ? t.last_error_at.replace("T", " ").replace(/\.\d+Z$/, "Z") + ": " : "") + (t.last_error || ""));
    tb.appendChild(tr);
  }
  const STAGES = { sent: "walsender sent", read: "node read", received: "received here", began: "apply began", applied: "applied" };
  const fmtDelay = v => v < 1 ? (v * 1000).toFixed(1) + " ms" : v.toFixed(1) + " s";
  const db = document.querySelector("#delays tbody");
  db.textContent = "";
  const ds = st.delays || [];
  if (ds.length === 0) { const tr = document.createElement("tr"); cell(tr, "none in the last minute"); cell(tr, ""); cell(tr, ""); cell(tr, ""); cell(tr, ""); db.appendChild(tr); }
  for (const d of ds) {
    const tr = document.createElement("tr");
    tr.setAttribute("data-stage", d.stage + (d.source ? "-" + d.source : ""));
    cell(tr, d.source ? "from " + d.source + ", applied here" : "this region's"); cell(tr, STAGES[d.stage] || d.stage);
    cell(tr, fmtDelay(d.p50_seconds)); cell(tr, fmtDelay(d.p99_seconds)); cell(tr, String(d.count));
    db.appendChild(tr);
  }
  const sb = document.querySelector("#switches tbody");
  sb.textContent = "";
  const sw = (st.switches || []).slice().reverse();
  if (sw.length === 0) { const tr = document.createElement("tr"); cell(tr, "none yet"); cell(tr, ""); cell(tr, ""); cell(tr, ""); sb.appendChild(tr); }
  for (const s of sw) {
    const tr = document.createElement("tr");
    cell(tr, s.at.replace("T", " ").replace(/\.\d+Z$/, "Z")); cell(tr, s.region); cell(tr, s.from); cell(tr, s.to);
    sb.appendChild(tr);
  }
}
const CHARTS = [
  { key: "lag_bytes", title: "lag (bytes)", cls: "c-bytes", fmt: v => fmtBytes(Math.round(v)) },
  { key: "lag_seconds", title: "lag (seconds)", cls: "c-seconds", fmt: v => v.toFixed(1) + " s" },
  { key: "apply_rate", title: "apply rate (WAL)", cls: "c-rate", fmt: v => fmtBytes(Math.round(v)) + "/s" },
];
// chart draws one series of a target's samples: the title and the current
// value above the plot, the time axis and the maximum below it, so no
// text lies on the line.
function chart(t, c, spanMs) {
  const left = 4, right = 236, top = 18, bottom = 62;
  const svg = el("svg", { width: 240, height: 80, viewBox: "0 0 240 80", "class": "chart", "data-region": t.region, "data-chart": c.key });
  const s = t.samples || [];
  const end = s.length ? Date.parse(s[s.length - 1].at) : 0;
  let max = 0;
  for (const p of s) max = Math.max(max, p[c.key] || 0);
  const cur = s.length ? (s[s.length - 1][c.key] || 0) : 0;
  svg.appendChild(el("text", { x: left, y: 12 }, c.title));
  svg.appendChild(el("text", { x: right, y: 12, "text-anchor": "end" }, c.fmt(cur)));
  svg.appendChild(el("rect", { x: left, y: top, width: right - left, height: bottom - top, "class": "plot" }));
  const scale = max > 0 ? max : 1;
  const pts = s.map(p => {
    const x = right - (end - Date.parse(p.at)) / spanMs * (right - left);
    const y = bottom - 2 - (p[c.key] || 0) / scale * (bottom - top - 4);
    return Math.max(x, left).toFixed(1) + "," + y.toFixed(1);
  });
  if (pts.length > 0) svg.appendChild(el("polyline", { points: pts.join(" "), "class": "series " + c.cls, "data-points": pts.length }));
  svg.appendChild(el("text", { x: left, y: 76, "class": "axis" }, "−" + Math.round(spanMs / 60000) + " min"));
  svg.appendChild(el("text", { x: (left + right) / 2, y: 76, "text-anchor": "middle", "class": "axis" }, "max " + c.fmt(max)));
  svg.appendChild(el("text", { x: right, y: 76, "text-anchor": "end", "class": "axis" }, "now"));
  return svg;
}
function drawHistory(h) {
  const box = document.getElementById("history");
  box.textContent = "";
  if ((h.targets || []).length === 0) { box.textContent = "no target region sampled yet"; return; }
  for (const t of h.targets) {
    const row = document.createElement("div");
    row.className = "hrow";
    row.setAttribute("data-region", t.region);
    const name = document.createElement("div");
    name.className = "hname";
    name.textContent = "region " + t.region;
    row.appendChild(name);
    for (const c of CHARTS) row.appendChild(chart(t, c, h.span_seconds * 1000));
    box.appendChild(row);
  }
}
async function pollHistory() {
  try {
    const r = await fetch("history", { cache: "no-store" });
    if (r.ok) drawHistory(await r.json());
  } catch (e) {}
}
async function poll() {
  try {
    const r = await fetch("status", { cache: "no-store" });
    if (!r.ok) throw new Error("HTTP " + r.status);
    last = await r.json();
    draw(last, "");
  } catch (e) {
    if (last) draw(last, String(e.message || e));
    else document.getElementById("summary").textContent = "node does not answer: " + e;
  }
}
poll();
setInterval(poll, 1000);
pollHistory();
setInterval(pollHistory, 5000);
</script>
</body>
</html>
`
