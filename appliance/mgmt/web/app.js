// The operator's page: draws the map, alarms, inventory and charts from /api/state and
// redraws on every server-sent "state" event. No key material or key IDs ever reach it.
"use strict";
const $ = (sel) => document.querySelector(sel);
const SVG = "http://www.w3.org/2000/svg";
let state = null;
let picked = "";

function el(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function linkClass(name, ends) {
  // an open link alarm (pushed at once) wins over the last poll (every few seconds)
  if (state.alarms.some((a) => a.kind === "link" && a.resource === name)) return "down";
  if (!ends.length) return "unknown";
  if (ends.some((l) => l.state !== "up")) return ends.some((l) => l.state === "unknown") ? "unknown" : "down";
  if (ends.some((l) => l.level < 8)) return "low";
  return "up";
}

const COLOURS = { up: "#1a7f37", low: "#b7791f", down: "#c62828", unknown: "#999" };

function drawMap() {
  const svg = $("#map");
  svg.replaceChildren();
  const nodes = state.nodes;
  const pos = {};
  nodes.forEach((n, i) => {
    const a = (2 * Math.PI * i) / Math.max(nodes.length, 1) - Math.PI / 2;
    pos[n.id] = [400 + 330 * Math.cos(a), 260 + 220 * Math.sin(a)];
  });
  const byName = {};
  for (const l of state.links) (byName[l.link] = byName[l.link] || []).push(l);
  for (const [a, b, name] of state.topology) {
    if (!pos[a] || !pos[b]) continue;
    const cls = linkClass(name, byName[name] || []);
    const line = el("line", { x1: pos[a][0], y1: pos[a][1], x2: pos[b][0], y2: pos[b][1],
      stroke: COLOURS[cls], "data-link": name, "data-state": cls, class: "link " + cls });
    line.appendChild(el("title", {}, name + ": " + cls));
    line.addEventListener("click", () => pick(name));
    svg.appendChild(line);
  }
  for (const n of nodes) {
    const [x, y] = pos[n.id];
    const ok = n.reachable ? "up" : "down";
    svg.appendChild(el("circle", { cx: x, cy: y, r: 13, fill: COLOURS[ok], class: "node " + ok, "data-node": n.node }));
    svg.appendChild(el("text", { x: x, y: y + 26 }, n.node));
  }
}

function drawAlarms() {
  const body = $("#alarms tbody");
  body.replaceChildren();
  $("#alarm-count").textContent = "(" + state.alarms.length + " open)";
  for (const a of state.alarms) {
    const row = body.insertRow();
    row.className = a.severity + (a.acked ? " acked" : "");
    row.dataset.alarm = a.id;
    row.dataset.kind = a.kind;
    row.dataset.resource = a.resource;
    cell(row, a.id);
    cell(row, a.severity, "severity");
    cell(row, a.kind);
    cell(row, a.resource);
    const from = a.sources ? "; from " + a.sources.split(",").join(", ") : "";
    cell(row, a.text + (a.reports > 1 ? " (" + a.reports + " reports" + from + ")" : ""));
    cell(row, new Date(a.raised * 1000).toLocaleTimeString());
    const td = row.insertCell();
    if (a.acked) td.textContent = "by " + a.acked_by;
    else if (state.role === "ack") {
      const b = document.createElement("button");
      b.textContent = "Acknowledge";
      b.className = "ack";
      b.addEventListener("click", () => ack(a.id));
      td.appendChild(b);
    }
  }
}

function drawInventory() {
  const body = $("#inventory tbody");
  body.replaceChildren();
  for (const n of state.nodes) {
    const row = body.insertRow();
    cell(row, n.node);
    cell(row, n.role);
    cell(row, n.software);
    cell(row, n.slot);
    cell(row, n.reachable ? "answers" : "silent", n.reachable ? "up" : "down");
    cell(row, n.cert_expiry ? new Date(n.cert_expiry * 1000).toISOString().slice(0, 10) : "");
  }
}

function drawAccounting() {
  const body = $("#accounting tbody");
  body.replaceChildren();
  const rows = state.accounting || [];
  $("#acct-note").textContent = rows.length ? "" : "(no AAA device, or nothing accounted yet)";
  for (const u of rows) {
    const row = body.insertRow();
    row.dataset.user = u.user;
    cell(row, u.user);
    cell(row, u.contracts.join(", "));
    cell(row, u.allowed);
    cell(row, u.keys);
    cell(row, u.bits);
    cell(row, u.failed);
    cell(row, u.refused_limits + u.refused_unauthorised + u.refused_quota);
  }
}

function drawPicker() {
  const sel = $("#link-pick");
  const names = [...new Set(state.links.map((l) => l.link))].sort();
  if (!picked && names.length) picked = names[0];
  if (sel.options.length !== names.length) {
    sel.replaceChildren(...names.map((n) => new Option(n, n)));
  }
  sel.value = picked;
}

function chart(id, points, scale) {
  const svg = $(id);
  svg.replaceChildren();
  if (!points.length) return;
  const ys = points.map((p) => p[1] * scale);
  const hi = Math.max(...ys, 1e-9);
  const t0 = points[0][0], t1 = points[points.length - 1][0] || t0 + 1;
  const xy = points.map((p, i) => [((p[0] - t0) / Math.max(t1 - t0, 1)) * 290 + 5, 95 - (ys[i] / hi) * 85]);
  svg.appendChild(el("polyline", { points: xy.map((p) => p.join(",")).join(" ") }));
  svg.appendChild(el("text", { x: 5, y: 10 }, hi.toPrecision(3)));
}

async function drawCharts() {
  if (!picked) return;
  const r = await fetch("/api/history?link=" + encodeURIComponent(picked), { credentials: "same-origin" });
  if (!r.ok) return;
  const doc = await r.json();
  const first = doc.samples.length ? doc.samples[0].node : "";
  const mine = doc.samples.filter((s) => s.node === first);
  chart("#chart-skr", mine.map((s) => [s.ts, s.skr]), 1);
  chart("#chart-qber", mine.map((s) => [s.ts, s.qber_ppm]), 1e-4);
  chart("#chart-level", mine.map((s) => [s.ts, s.level]), 1);
  await drawTkey();
}

let pickedNode = "";
async function drawTkey() {
  const sel = $("#node-pick");
  const names = (state.tkey_nodes || []).slice().sort();
  if (!pickedNode && names.length) pickedNode = names[0];
  if (sel.options.length !== names.length) sel.replaceChildren(...names.map((n) => new Option(n, n)));
  sel.value = pickedNode;
  if (!pickedNode) return;
  const r = await fetch("/api/tkey?node=" + encodeURIComponent(pickedNode), { credentials: "same-origin" });
  if (!r.ok) return;
  const doc = await r.json();
  chart("#chart-tkey", doc.samples.map((s) => [s.ts, s.tkey_p50_us]), 1e-3);
  chart("#chart-tkey99", doc.samples.map((s) => [s.ts, s.tkey_p99_us]), 1e-3);
}

function pick(name) {
  picked = name;
  drawPicker();
  drawCharts();
}

function draw() {
  $("#who").textContent = state.user + " (" + state.role + ")";
  drawMap();
  drawAlarms();
  drawInventory();
  drawAccounting();
  drawPicker();
}

async function ack(id) {
  const r = await fetch("/api/alarms/" + id + "/ack", { method: "POST", credentials: "same-origin", headers: { "X-Qkdn": "1" } });
  if (r.status === 401) location.href = "/login";
}

let charted = 0;
function listen() {
  const source = new EventSource("/api/events");
  source.addEventListener("state", (e) => {
    state = JSON.parse(e.data);
    $("#live").textContent = "live";
    $("#live").className = "ok";
    draw();
    if (Date.now() - charted > 5000) { charted = Date.now(); drawCharts(); }
  });
  source.onerror = async () => {
    $("#live").textContent = "reconnecting";
    $("#live").className = "stale";
    const r = await fetch("/api/state", { credentials: "same-origin" });
    if (r.status === 401) { source.close(); location.href = "/login"; }
  };
}

$("#link-pick").addEventListener("change", (e) => pick(e.target.value));
$("#node-pick").addEventListener("change", (e) => { pickedNode = e.target.value; drawTkey(); });
listen();
