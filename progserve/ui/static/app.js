// progserve tracing UI: program list, program DAG + Gantt timeline, bench comparison.
// Vanilla JS, no build step. Data comes from /ui/api/* (same origin).
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const POLL_MS = 1000;
const $ = (sel) => document.querySelector(sel);
const state = { view: "programs", programId: null, tenant: null, timer: null, programs: [] };

// ---------------------------------------------------------------- helpers
function el(tag, attrs = {}, parent = null, text = null) {
  const node = tag.startsWith("svg:")
    ? document.createElementNS(SVG_NS, tag.slice(4))
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== undefined && v !== null) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}
function fmtMs(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return "–";
  if (ms === 0) return "0";
  if (ms < 1) return ms.toFixed(2) + " ms";
  if (ms < 1000) return ms.toFixed(ms < 10 ? 1 : 0) + " ms";
  return (ms / 1000).toFixed(ms < 10000 ? 2 : 1) + " s";
}
function fmtNum(x) {
  if (x === null || x === undefined) return "–";
  if (Math.abs(x) >= 1e6) return (x / 1e6).toFixed(1) + "M";
  if (Math.abs(x) >= 1e4) return (x / 1e3).toFixed(1) + "k";
  return Number.isInteger(x) ? String(x) : x.toPrecision(3);
}
function short(s, n) { s = String(s); return s.length > n ? s.slice(0, n - 1) + "…" : s; }
function statusBadge(status) { return `<span class="status ${status}">${status}</span>`; }
function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function tooltip(node, text) {
  node.addEventListener("mousemove", (e) => {
    const tip = $("#tooltip");
    tip.textContent = text; tip.hidden = false;
    tip.style.left = e.clientX + 12 + "px"; tip.style.top = e.clientY + 12 + "px";
  });
  node.addEventListener("mouseleave", () => { $("#tooltip").hidden = true; });
}

async function api(path) {
  const headers = {};
  const key = localStorage.getItem("progserve.key");
  if (key) headers["Authorization"] = "Bearer " + key;
  const res = await fetch("api/" + path, { headers });
  if (!res.ok) {
    let detail = res.statusText;
    try { const body = await res.json(); detail = body.detail || body.title || (body.error && body.error.message) || detail; } catch (_) { /* not JSON */ }
    throw new Error(`${res.status}: ${detail}`);
  }
  return res.json();
}

// ---------------------------------------------------------------- routing
function route() {
  const hash = location.hash || "#/programs";
  const [path, query] = hash.slice(1).split("?");
  const parts = path.split("/").filter(Boolean);
  state.view = parts[0] === "compare" ? "compare" : "programs";
  // #/program/<id> or #/program/<tenant>/<id> (ids may repeat across tenants)
  const named = parts[0] === "program" ? parts.slice(1).map(decodeURIComponent) : [];
  state.programId = named.length ? named[named.length - 1] : null;
  state.tenant = named.length > 1 ? named[0] : null;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === state.view);
  $("#view-programs").hidden = state.view !== "programs";
  $("#view-compare").hidden = state.view !== "compare";
  clearTimeout(state.timer);
  if (state.view === "compare") {
    const bench = new URLSearchParams(query || "").get("bench");
    if (bench) fetch(bench).then((r) => r.json()).then(renderBench).catch((e) => showBenchError(e));
  } else {
    poll();
  }
}

async function poll() {
  clearTimeout(state.timer);
  try {
    await refreshPrograms();
    if (state.programId) await refreshProgram(state.programId, state.tenant);
  } catch (e) {
    $("#program-count").innerHTML = `<span class="error">${escapeHtml(e.message)}</span>`;
  }
  if (state.view === "programs") state.timer = setTimeout(poll, POLL_MS);
}

// ---------------------------------------------------------------- program list
async function refreshPrograms() {
  const data = await api("programs?limit=200");
  state.programs = data.programs;
  $("#instance").textContent = data.instance ? `instance ${data.instance}` + (data.shared ? (data.redis_ok ? " · redis" : " · redis down: local view") : "") : "";
  $("#program-count").textContent = `(${data.programs.length})`;
  $("#programs-empty").hidden = data.programs.length > 0;
  const tbody = $("#programs tbody");
  tbody.replaceChildren();
  for (const p of data.programs) {
    const tr = el("tr", { "data-program": p.id, "data-tenant": p.tenant }, tbody);
    if (p.id === state.programId && (!state.tenant || p.tenant === state.tenant)) tr.classList.add("selected");
    tr.innerHTML = `<td class="id" title="${escapeHtml(p.id)}">${escapeHtml(p.id)}</td><td>${statusBadge(p.status)}</td>` +
      `<td>${escapeHtml(p.tenant)}</td><td class="num">${p.calls}</td>` +
      `<td class="num">${fmtNum(p.prompt_tokens + p.completion_tokens)}</td><td class="num">${fmtMs(p.latency_ms)}</td>`;
    tr.addEventListener("click", () => { location.hash = `#/program/${encodeURIComponent(p.tenant)}/${encodeURIComponent(p.id)}`; });
  }
}

// ---------------------------------------------------------------- program view
async function refreshProgram(id, tenant) {
  let data;
  try {
    data = await api("programs/" + encodeURIComponent(id) + (tenant ? "?tenant=" + encodeURIComponent(tenant) : ""));
  } catch (e) {
    $("#program-hint").hidden = false;
    $("#program-hint").innerHTML = `<span class="error">${escapeHtml(e.message)}</span>`;
    $("#program-view").hidden = true;
    return;
  }
  $("#program-hint").hidden = true;
  $("#program-view").hidden = false;
  const p = data.program;
  $("#program-title").innerHTML = `${escapeHtml(p.id)} ${statusBadge(p.status)}`;
  const cached = p.prompt_tokens ? (100 * p.cached_tokens / p.prompt_tokens).toFixed(0) + "%" : "–";
  $("#program-summary").innerHTML = [
    ["tenant", escapeHtml(p.tenant)], ["calls", `${p.llm_calls} llm + ${p.tool_calls} tool`],
    ["prompt", fmtNum(p.prompt_tokens)], ["cached", cached], ["decode", fmtNum(p.completion_tokens)],
    ["latency", fmtMs(p.latency_ms)],
    ["token latency", p.completion_tokens ? fmtMs(p.latency_ms / p.completion_tokens) + "/tok" : "–"],
    ["trace", `<code>${escapeHtml(data.trace_id || "")}</code>`],
    ["instances", escapeHtml((p.instances || []).join(", "))],
  ].map(([k, v]) => `<span>${k} <b>${v}</b></span>`).join("");
  renderDag($("#dag"), data.calls);
  renderGantt($("#gantt"), data.calls, data.now_ms);
  renderCallTable(data.calls);
}

function renderCallTable(calls) {
  const tbody = $("#calls tbody");
  tbody.replaceChildren();
  for (const c of calls) {
    const tr = el("tr", {}, tbody);
    tr.innerHTML = `<td class="id">${escapeHtml(c.id)}</td><td>${c.kind}${c.tool ? " · " + escapeHtml(c.tool) : ""}</td>` +
      `<td>${statusBadge(c.status)}</td><td>${c.replica ?? "–"}</td>` +
      `<td class="num">${c.queue_wait_s != null ? fmtMs(c.queue_wait_s * 1000) : "–"}</td>` +
      `<td class="num">${c.ttft_s != null ? fmtMs(c.ttft_s * 1000) : "–"}</td>` +
      `<td class="num">${fmtNum(c.prompt_tokens)}</td><td class="num">${fmtNum(c.cached_tokens)}</td>` +
      `<td class="num">${fmtNum(c.decode_tokens)}</td><td class="num">${fmtNum(c.priority)} / ${c.queue_level}</td>`;
  }
}

// Layered DAG layout: columns by depth (longest path from a root), rows ordered by the
// mean row of each node's parents (one barycentre pass keeps fan-in edges short).
function layoutDag(calls) {
  const byId = new Map(calls.map((c) => [c.id, c]));
  const depth = new Map();
  const depthOf = (c, seen = new Set()) => {
    if (depth.has(c.id)) return depth.get(c.id);
    if (seen.has(c.id)) return 0; // defensive: a cycle never reaches the UI
    seen.add(c.id);
    const parents = (c.parents || []).filter((p) => byId.has(p));
    const d = parents.length ? 1 + Math.max(...parents.map((p) => depthOf(byId.get(p), seen))) : 0;
    depth.set(c.id, d);
    return d;
  };
  const layers = [];
  for (const c of calls) (layers[depthOf(c)] ||= []).push(c);
  const row = new Map();
  const natural = (a, b) => a.id.localeCompare(b.id, undefined, { numeric: true });
  layers.forEach((layer, i) => {
    if (i === 0) layer.sort(natural);
    else {
      const bary = (c) => {
        const ps = (c.parents || []).filter((p) => row.has(p));
        return ps.length ? ps.reduce((s, p) => s + row.get(p), 0) / ps.length : 0;
      };
      layer.sort((a, b) => bary(a) - bary(b) || natural(a, b));
    }
    layer.forEach((c, j) => row.set(c.id, j));
  });
  return { layers, byId };
}

function renderDag(svg, calls) {
  svg.replaceChildren();
  const W = 132, H = 34, GX = 56, GY = 10, PAD = 12;
  const { layers, byId } = layoutDag(calls);
  const tallest = Math.max(1, ...layers.map((l) => l.length));
  const height = PAD * 2 + tallest * (H + GY) - GY;
  const width = PAD * 2 + layers.length * (W + GX) - GX;
  svg.setAttribute("width", Math.max(width, 200));
  svg.setAttribute("height", Math.max(height, 60));
  const defs = el("svg:defs", {}, svg);
  const marker = el("svg:marker", { id: "arrow", viewBox: "0 0 8 8", refX: 8, refY: 4, markerWidth: 7, markerHeight: 7, orient: "auto" }, defs);
  el("svg:path", { d: "M0,0 L8,4 L0,8 z", fill: "#94a3b8" }, marker);
  // y: the first layer stacks; a later node sits at the mean y of its parents (so edges
  // that skip a layer pass beside, not through, the nodes in between), then a sweep
  // pushes nodes apart to keep the spacing, and pulls the layer back inside the box.
  const pos = new Map();
  layers.forEach((layer, i) => {
    const x = PAD + i * (W + GX);
    const want = layer.map((c, j) => {
      const ps = (c.parents || []).filter((p) => pos.has(p));
      return i === 0 || !ps.length ? PAD + j * (H + GY) : ps.reduce((s, p) => s + pos.get(p).y, 0) / ps.length;
    });
    for (let j = 1; j < want.length; j++) want[j] = Math.max(want[j], want[j - 1] + H + GY);
    const overflow = want.length ? want[want.length - 1] - (PAD + (tallest - 1) * (H + GY)) : 0;
    layer.forEach((c, j) => pos.set(c.id, { x, y: Math.max(PAD, want[j] - Math.max(0, overflow)) }));
  });
  const edges = el("svg:g", {}, svg);
  for (const c of calls) {
    for (const p of c.parents || []) {
      if (!byId.has(p)) continue;
      const a = pos.get(p), b = pos.get(c.id);
      const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2, mx = (x1 + x2) / 2;
      el("svg:path", { class: "edge", d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2 - 1},${y2}`, "marker-end": "url(#arrow)", "data-edge": `${p}->${c.id}` }, edges);
    }
  }
  for (const c of calls) {
    const { x, y } = pos.get(c.id);
    const g = el("svg:g", { class: `node node-${c.kind} ${c.status}`, transform: `translate(${x},${y})`, "data-call": c.id }, svg);
    el("svg:rect", { width: W, height: H, rx: 6 }, g);
    el("svg:text", { x: 8, y: 14 }, g, short(c.id, 20));
    const sub = c.kind === "tool"
      ? `tool ${c.tool || ""}`
      : `${c.replica != null ? "r" + c.replica + " · " : ""}${fmtNum(c.decode_tokens || 0)} tok`;
    el("svg:text", { x: 8, y: 27, class: "sub" }, g, short(sub, 24));
    tooltip(g, callTooltip(c));
  }
}

function callTooltip(c) {
  const lines = [`${c.kind} ${c.id}${c.tool ? " (" + c.tool + ")" : ""}: ${c.status}`];
  if (c.replica != null) lines.push(`replica ${c.replica}${c.instance ? " @ " + c.instance : ""}`);
  if (c.queue_wait_s != null) lines.push(`queue wait ${fmtMs(c.queue_wait_s * 1000)}`);
  if (c.ttft_s != null) lines.push(`TTFT ${fmtMs(c.ttft_s * 1000)}`);
  if (c.end_ms && c.queued_ms) lines.push(`total ${fmtMs(c.end_ms - c.queued_ms)}`);
  if (c.kind === "llm") lines.push(`prompt ${c.prompt_tokens} (cached ${c.cached_tokens}) · decode ${c.decode_tokens}`);
  lines.push(`priority ${fmtNum(c.priority)} · queue level ${c.queue_level}`);
  if (c.partial_start_s != null) lines.push(`partial start ${fmtMs(c.partial_start_s * 1000)} before args done`);
  if (c.preemptions) lines.push(`preempted ${c.preemptions}×`);
  if (c.error) lines.push(`error: ${c.error}`);
  return lines.join("\n");
}

// Gantt: one lane per engine replica (and one for tools); overlapping calls stack in rows.
function renderGantt(svg, calls, nowMs) {
  svg.replaceChildren();
  const timed = calls.filter((c) => c.queued_ms != null);
  const LABEL = 92, ROW = 18, LANE_GAP = 8, AXIS = 22, PAD = 8;
  const width = Math.max(640, (svg.parentElement.clientWidth || 800) - 4);
  if (!timed.length) { svg.setAttribute("width", width); svg.setAttribute("height", 30); el("svg:text", { x: 8, y: 18 }, svg, "no timed calls yet"); return; }
  const instances = new Set(timed.map((c) => c.instance).filter(Boolean));
  const laneOf = (c) => {
    const where = instances.size > 1 && c.instance ? short(c.instance, 10) + " " : "";
    return c.kind === "tool" ? where + "tools" : where + (c.replica != null ? "replica " + c.replica : "queued");
  };
  const endOf = (c) => c.end_ms ?? nowMs;
  const t0 = Math.min(...timed.map((c) => c.queued_ms));
  const t1 = Math.max(t0 + 1, ...timed.map(endOf));
  const lanes = new Map();
  for (const c of [...timed].sort((a, b) => a.queued_ms - b.queued_ms)) {
    const name = laneOf(c);
    if (!lanes.has(name)) lanes.set(name, []);
    const rows = lanes.get(name);
    let r = rows.findIndex((end) => end <= c.queued_ms);
    if (r < 0) { r = rows.length; rows.push(0); }
    rows[r] = endOf(c);
    c._lane = name; c._row = r;
  }
  const laneNames = [...lanes.keys()].sort((a, b) => (a.endsWith("tools") - b.endsWith("tools")) || a.localeCompare(b, undefined, { numeric: true }));
  const laneY = new Map();
  let y = AXIS;
  for (const name of laneNames) { laneY.set(name, y); y += lanes.get(name).length * ROW + LANE_GAP; }
  const height = y + PAD;
  svg.setAttribute("width", width); svg.setAttribute("height", height);
  const plotW = width - LABEL - PAD;
  const X = (t) => LABEL + ((t - t0) / (t1 - t0)) * plotW;
  // axis
  const axis = el("svg:g", { class: "axis" }, svg);
  const step = niceStep((t1 - t0) / 8);
  for (const name of laneNames) {
    const ly = laneY.get(name), lh = lanes.get(name).length * ROW;
    el("svg:rect", { class: "lane-bg", x: LABEL, y: ly - 2, width: plotW, height: lh }, axis);
    el("svg:text", { class: "lane-label", x: 4, y: ly + 12, "data-lane": name }, axis, name);
  }
  for (let t = 0; t <= t1 - t0 + 1e-9; t += step) {
    el("svg:line", { x1: X(t0 + t), x2: X(t0 + t), y1: AXIS - 4, y2: height - PAD }, axis);
    if (X(t0 + t) + 44 < width) el("svg:text", { x: X(t0 + t) + 2, y: AXIS - 8 }, axis, fmtMs(t));
  }
  for (const c of timed) {
    const by = laneY.get(c._lane) + c._row * ROW, bh = ROW - 5;
    const g = el("svg:g", { class: "bar", "data-call": c.id, "data-lane": c._lane }, svg);
    const seg = (cls, a, b) => { if (a != null && b != null && b > a) el("svg:rect", { class: cls, x: X(a), y: by, width: Math.max(1, X(b) - X(a)), height: bh }, g); };
    const end = endOf(c);
    const start = c.dispatched_ms ?? end;
    seg("seg-queue", c.queued_ms, start);
    if (c.kind === "tool") {
      seg("seg-tool", start, end);
    } else {
      const first = c.first_token_ms ?? end;
      seg("seg-prefill", start, first);
      if (c.prompt_tokens && c.cached_tokens && first > start) {
        const frac = Math.min(1, c.cached_tokens / c.prompt_tokens);
        el("svg:rect", { class: "seg-cache", x: X(start), y: by + bh - 4, width: Math.max(1, (X(first) - X(start)) * frac), height: 4 }, g);
      }
      seg("seg-decode", first, end);
    }
    const x0 = X(c.queued_ms), x1 = X(end);
    if (c.status === "running") el("svg:rect", { class: "bar-running", x: x0, y: by, width: Math.max(1, x1 - x0), height: bh }, g);
    if (c.status === "failed" || c.status === "cancelled") el("svg:rect", { class: "bar-failed", x: x0, y: by, width: Math.max(1, x1 - x0), height: bh }, g);
    const label = short(c.id, 18);
    const runStart = X(start);
    if (x1 - runStart > label.length * 6 + 6) el("svg:text", { class: "bar-label", x: runStart + 3, y: by + bh - 3 }, g, label);
    else if (width - x1 > label.length * 6 + 6) el("svg:text", { class: "bar-label outside", x: x1 + 3, y: by + bh - 3 }, g, label);
    tooltip(g, callTooltip(c));
  }
}

function niceStep(raw) {
  const p = Math.pow(10, Math.floor(Math.log10(Math.max(raw, 1e-6))));
  for (const m of [1, 2, 5, 10]) if (raw <= m * p) return m * p;
  return 10 * p;
}

function renderLegend() {
  $("#legend").innerHTML = [
    ["var(--queue)", "queue wait"], ["var(--llm-light)", "prefill"], ["var(--cache)", "cache hit (share of prompt)"],
    ["var(--llm)", "decode"], ["var(--tool)", "tool"],
  ].map(([c, t]) => `<span><i style="background:${c}"></i>${t}</span>`).join("");
}

// ---------------------------------------------------------------- compare view
const SERIES_COLORS = ["#2563eb", "#ea580c", "#16a34a", "#9333ea", "#dc2626", "#0891b2", "#ca8a04"];

function showBenchError(e) { $("#bench-meta").innerHTML = `<span class="error">${escapeHtml(e.message || e)}</span>`; }

function renderBench(bench) {
  const box = $("#bench-charts");
  box.replaceChildren();
  if (!bench || typeof bench.policies !== "object") { showBenchError("not a progserve bench JSON: no `policies`"); return; }
  const names = Object.keys(bench.policies);
  const pol = (n) => bench.policies[n] || {};
  $("#bench-meta").textContent = ["workload", "programs", "replicas", "seed", "load_point"]
    .filter((k) => bench[k] !== undefined).map((k) => `${k}: ${typeof bench[k] === "object" ? JSON.stringify(bench[k]) : bench[k]}`).join(" · ");
  const base = names.includes("fcfs") ? "fcfs" : null;
  barChart(box, "Throughput at SLO (programs/s, higher is better)", names,
    [{ name: "max_rate_at_slo", values: names.map((n) => pol(n).max_rate_at_slo) }], { base, higher: true });
  barChart(box, "Token latency at the fixed load (s/token, lower is better)", names,
    ["mean_token_latency", "p50_token_latency", "p95_token_latency"].map((k) => ({ name: k.replace("_token_latency", ""), values: names.map((n) => (pol(n).at_load || {})[k]) })), { base });
  const types = [...new Set(names.flatMap((n) => Object.keys((pol(n).at_load || {}).p95_by_type || {})))];
  if (types.length) {
    barChart(box, "p95 token latency by program type at the fixed load (s/token)", types,
      names.map((n) => ({ name: n, values: types.map((t) => ((pol(n).at_load || {}).p95_by_type || {})[t]) })), {});
  }
  barChart(box, "Token latency over the sweep (s/token)", names,
    ["mean_token_latency", "p50_token_latency", "p95_token_latency", "p99_token_latency"].map((k) => ({ name: k.replace("_token_latency", ""), values: names.map((n) => pol(n)[k]) })), { base });
  barChart(box, "Prefix-cache hit rate (%)", names,
    [{ name: "cache_hit_rate", values: names.map((n) => pol(n).cache_hit_rate != null ? 100 * pol(n).cache_hit_rate : null) }], { base, higher: true });
  const curves = names.map((n) => ({ name: n, points: curvePoints(pol(n)) })).filter((c) => c.points.length > 1);
  if (curves.length) lineChart(box, "p95 token latency vs arrival rate", curves);
  retentionChart(box, bench.retention);
}

// The KV-retention ablation: cache hit rate per KV capacity, plain LRU vs retention.
function retentionChart(box, ret) {
  if (!ret || typeof ret !== "object") return;
  const points = Array.isArray(ret.curve) && ret.curve.length ? ret.curve
    : [{ kv_capacity_tokens: ret.kv_capacity_tokens, lru_cache_hit_rate: (ret.lru || {}).cache_hit_rate,
         retention_cache_hit_rate: (ret.retention || {}).cache_hit_rate }];
  const pct = (v) => (typeof v === "number" ? 100 * v : null);
  const gain = typeof ret.cache_hit_gain_points === "number" ? `, ${ret.cache_hit_gain_points >= 0 ? "+" : ""}${ret.cache_hit_gain_points.toFixed(1)} points at ${fmtNum(ret.kv_capacity_tokens / 1000)}k` : "";
  barChart(box, `KV retention: cache hit rate (%) by KV tokens per replica${gain}`,
    points.map((q) => `${fmtNum(q.kv_capacity_tokens / 1000)}k`),
    [{ name: "plain LRU", values: points.map((q) => pct(q.lru_cache_hit_rate)) },
     { name: "retention", values: points.map((q) => pct(q.retention_cache_hit_rate)) },
     ...(points.some((q) => typeof q.ended_first_cache_hit_rate === "number")
       ? [{ name: "hint alone", values: points.map((q) => pct(q.ended_first_cache_hit_rate)) }] : [])], {});
  if (points.some((q) => typeof q.retention_mean_token_latency === "number")) {
    // Hits bought with waiting (KV admission holds programs) would show here.
    barChart(box, "KV retention: mean program token latency (s/token, lower is better) by KV tokens per replica",
      points.map((q) => `${fmtNum(q.kv_capacity_tokens / 1000)}k`),
      [{ name: "plain LRU", values: points.map((q) => q.lru_mean_token_latency) },
       { name: "retention", values: points.map((q) => q.retention_mean_token_latency) },
       ...(points.some((q) => typeof q.ended_first_mean_token_latency === "number")
         ? [{ name: "hint alone", values: points.map((q) => q.ended_first_mean_token_latency) }] : [])], {});
  }
}

// A policy's latency-vs-rate curve, if the bench recorded one (any list of {rate, p95...}).
function curvePoints(p) {
  for (const key of ["sweep", "curve", "points", "rates"]) {
    const list = p[key];
    if (Array.isArray(list) && list.length && typeof list[0] === "object") {
      return list.map((q) => [q.rate ?? q.arrival_rate, q.p95_token_latency ?? q.p95]).filter(([x, y]) => x != null && y != null).sort((a, b) => a[0] - b[0]);
    }
  }
  return [];
}

function chartFrame(box, title, legendNames) {
  const div = el("div", { class: "chart" }, box);
  el("h4", {}, div, title);
  if (legendNames.length > 1) {
    const leg = el("div", { class: "legend" }, div);
    leg.innerHTML = legendNames.map((n, i) => `<span><i style="background:${SERIES_COLORS[i % SERIES_COLORS.length]}"></i>${escapeHtml(n)}</span>`).join("");
  }
  const svg = el("svg:svg", { width: 460, height: 230 }, div);
  return svg;
}

function barChart(box, title, categories, series, { base = null, higher = false }) {
  const all = series.flatMap((s) => s.values).filter((v) => typeof v === "number" && Number.isFinite(v));
  if (!all.length) return;
  const svg = chartFrame(box, title, series.map((s) => s.name));
  svg.setAttribute("data-chart", title);
  const W = 460, H = 230, L = 48, B = 28, T = 14;
  const max = Math.max(...all) * 1.15 || 1;
  const Y = (v) => H - B - (v / max) * (H - B - T);
  const step = niceStep(max / 4);
  for (let v = 0; v <= max; v += step) {
    el("svg:line", { x1: L, x2: W - 4, y1: Y(v), y2: Y(v), stroke: "#e5e7eb" }, svg);
    el("svg:text", { x: L - 4, y: Y(v) + 4, "text-anchor": "end", class: "lane-label" }, svg, fmtNum(v));
  }
  const groupW = (W - L - 8) / categories.length;
  const barW = Math.min(36, (groupW - 10) / series.length);
  categories.forEach((cat, i) => {
    const gx = L + 4 + i * groupW + (groupW - barW * series.length) / 2;
    series.forEach((s, j) => {
      const v = s.values[i];
      if (typeof v !== "number" || !Number.isFinite(v)) return;
      const x = gx + j * barW;
      const rect = el("svg:rect", { x, y: Y(v), width: barW - 2, height: Math.max(0, Y(0) - Y(v)), fill: SERIES_COLORS[(series.length > 1 ? j : i) % SERIES_COLORS.length], "data-series": s.name, "data-category": cat }, svg);
      tooltip(rect, `${cat} · ${s.name}: ${fmtNum(v)}`);
      let label = fmtNum(v);
      if (base && series.length === 1 && categories.includes(base) && cat !== base) {
        const b = s.values[categories.indexOf(base)];
        if (b) label += ` (${(higher ? v / b : b / v).toFixed(2)}×)`;
      }
      if (series.length <= 2) el("svg:text", { x: x + (barW - 2) / 2, y: Y(v) - 3, "text-anchor": "middle", class: "lane-label" }, svg, label);
    });
    el("svg:text", { x: L + 4 + i * groupW + groupW / 2, y: H - B + 14, "text-anchor": "middle" }, svg, short(cat, 14));
  });
}

function lineChart(box, title, curves) {
  const svg = chartFrame(box, title, curves.map((c) => c.name));
  const W = 460, H = 230, L = 48, B = 28, T = 14;
  const xs = curves.flatMap((c) => c.points.map((p) => p[0])), ys = curves.flatMap((c) => c.points.map((p) => p[1]));
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y1 = Math.max(...ys) * 1.1 || 1;
  const X = (x) => L + ((x - x0) / (x1 - x0 || 1)) * (W - L - 8), Y = (y) => H - B - (y / y1) * (H - B - T);
  const step = niceStep(y1 / 4);
  for (let v = 0; v <= y1; v += step) {
    el("svg:line", { x1: L, x2: W - 4, y1: Y(v), y2: Y(v), stroke: "#e5e7eb" }, svg);
    el("svg:text", { x: L - 4, y: Y(v) + 4, "text-anchor": "end", class: "lane-label" }, svg, fmtNum(v));
  }
  el("svg:text", { x: W / 2, y: H - 6, "text-anchor": "middle", class: "lane-label" }, svg, `arrival rate (programs/s) ${fmtNum(x0)} – ${fmtNum(x1)}`);
  curves.forEach((c, i) => {
    el("svg:path", { d: c.points.map((p, k) => `${k ? "L" : "M"}${X(p[0])},${Y(p[1])}`).join(" "), fill: "none", stroke: SERIES_COLORS[i % SERIES_COLORS.length], "stroke-width": 2 }, svg);
  });
}

// ---------------------------------------------------------------- start
function init() {
  const key = $("#api-key");
  key.value = localStorage.getItem("progserve.key") || "";
  key.addEventListener("change", () => { localStorage.setItem("progserve.key", key.value.trim()); poll(); });
  $("#bench-file").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (!file) return;
    try { renderBench(JSON.parse(await file.text())); } catch (err) { showBenchError(err); }
  });
  renderLegend();
  window.addEventListener("hashchange", route);
  route();
}
init();
