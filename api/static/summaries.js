// Operator reports: GET /v1/summaries/stations (or /devices: the "by" switch, one station's
// devices) per day/week/month, a small hand-drawn SVG bar chart per metric (no library: the
// page's CSP allows only our own scripts) and the rows as a table; CSV downloaded with the
// key. The key is the console's (localStorage "cw-key").
"use strict";
const $ = (sel) => document.querySelector(sel);
const SVG = "http://www.w3.org/2000/svg";
const KEY = localStorage.getItem("cw-key") || "";
let ROWS = [];  // the stations' rows
let DEVICE_ROWS = [];  // the chosen station's devices' rows (by device)
const byDevice = () => $("#scope").value === "devices";

const pct = (v) => (v === null ? "–" : `${(v * 100).toFixed(1)}%`);
const minutes = (s) => (s === null ? "–" : (s / 60).toFixed(1));
const faults = (r) => Object.values(r.faults).reduce((a, b) => a + b, 0);
const METRICS = [
  { key: "port_free_share", title: "有空闲端口的营业时间占比 · open time with a free port", value: (r) => r.port_free_share, text: pct, max: 1 },
  { key: "battery_ready_share", title: "有可换电池的营业时间占比 · open time with a ready battery", value: (r) => r.battery_ready_share, text: pct, max: 1 },
  { key: "offline_minutes", title: "离线设备分钟 · device-minutes offline", value: (r) => r.offline_minutes, text: String },
  { key: "energy_kwh", title: "充电量 kWh · energy delivered", value: (r) => r.energy_wh / 1000, text: (v) => v.toFixed(1) },
  { key: "sessions", title: "充电次数 · charging sessions", value: (r) => r.sessions, text: String },
  { key: "swaps", title: "换电次数 · swaps", value: (r) => r.swaps, text: String },
  { key: "faults", title: "故障 · faults raised", value: faults, text: String },
  { key: "mttr_min", title: "平均修复时间（分钟）· mean time to repair, min", value: (r) => (r.mttr_s === null ? null : r.mttr_s / 60), text: (v) => v.toFixed(1) },
  { key: "reports", title: "骑手报告 · riders' reports", value: (r) => r.reports, text: String },
];

function el(name, attrs, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

// One bar per period; a period without a value (no open minute, nothing repaired) has none.
function chart(metric, rows) {
  const W = 640, H = 180, PAD = 28, n = Math.max(rows.length, 1);
  const values = rows.map(metric.value);
  const max = metric.max || Math.max(1, ...values.filter((v) => v !== null));
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": metric.title });
  svg.append(el("line", { x1: PAD, y1: H - PAD, x2: W, y2: H - PAD, class: "axis" }));
  svg.append(el("text", { x: 0, y: 12, class: "tick" }, metric.text(max)));
  const step = (W - PAD) / n;
  rows.forEach((row, i) => {
    const v = values[i];
    const x = PAD + i * step + step * 0.1;
    if (i === 0 || i === rows.length - 1 || rows.length <= 12) {
      svg.append(el("text", { x, y: H - 8, class: "tick" }, row.start.slice(5, 10)));
    }
    if (v === null) return;
    const h = Math.max(0, (v / max) * (H - 2 * PAD));
    const bar = el("rect", { x, y: H - PAD - h, width: step * 0.8, height: h, class: "bar-p", "data-value": v });
    bar.append(el("title", {}, `${row.start.slice(0, 10)}: ${metric.text(v)}`));
    svg.append(bar);
  });
  const fig = document.createElement("figure");
  fig.dataset.metric = metric.key;
  const cap = document.createElement("figcaption");
  cap.textContent = metric.title;
  fig.append(cap, svg);
  return fig;
}

function option(value, text) {
  const node = document.createElement("option");
  node.value = value;
  node.textContent = text;
  return node;
}

function show() {
  const station = $("#station").value;
  const device = $("#device").value;
  const rows = byDevice()
    ? DEVICE_ROWS.filter((r) => r.device_id === device)
    : ROWS.filter((r) => r.station_id === station);
  $("#charts").replaceChildren(...METRICS.map((m) => chart(m, rows)));
  const body = $("#rows tbody");
  body.replaceChildren(...rows.map((r) => {
    const tr = document.createElement("tr");
    tr.dataset.start = r.start.slice(0, 10);
    const cells = [
      r.start.slice(0, 10), pct(r.port_free_share), pct(r.battery_ready_share), r.offline_minutes,
      (r.energy_wh / 1000).toFixed(1), r.sessions, r.swaps, faults(r), r.alerts, minutes(r.mtta_s),
      minutes(r.mttr_s), r.reports,
      `${r.reports_confirmed}/${r.reports_rejected}/${r.reports_expired}/${r.reports_pending}`,
    ];
    for (const c of cells) { const td = document.createElement("td"); td.textContent = String(c); tr.append(td); }
    return tr;
  }));
  document.body.dataset.state = "shown";
}

function query(scope) {
  const q = new URLSearchParams({ period: $("#period").value, from: $("#from").value, to: $("#to").value });
  if (scope === "devices") q.set("station", $("#station").value);
  return q;
}

async function get(accept, scope) {
  const response = await fetch(`/v1/summaries/${scope}?${query(scope)}`, {
    headers: { Accept: accept, Authorization: `Bearer ${KEY}` },
  });
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    throw new Error(typeof data.detail === "string" ? data.detail : `HTTP ${response.status}`);
  }
  return response;
}

async function load(event) {
  if (event) event.preventDefault();
  if (!KEY) { $("#status").textContent = "API key: 在控制台登录 · log in at the console"; return; }
  $("#status").textContent = "…";
  try {
    const data = await (await get("application/json", "stations")).json();
    ROWS = data.rows;
    const chosen = $("#station").value;
    const ids = [...new Set(ROWS.map((r) => r.station_id))];
    $("#station").replaceChildren(...ids.map((id) => {
      const r = ROWS.find((x) => x.station_id === id);
      return option(id, `${r.name_zh} · ${r.name_en}`);
    }));
    if (ids.includes(chosen)) $("#station").value = chosen;
    $("#status").textContent = `${data.from} – ${data.to} (${data.timezone}); rolled up to ${data.rolled_through || "–"}`;
    await loadDevices();
  } catch (err) {
    $("#status").textContent = `错误 error: ${err.message}`;
    document.body.dataset.state = "error";
  }
}

// By device: the chosen station's devices (one request per station chosen).
async function loadDevices() {
  $("#device-box").hidden = !byDevice();
  if (byDevice()) {
    const data = await (await get("application/json", "devices")).json();
    DEVICE_ROWS = data.rows;
    const chosen = $("#device").value;
    const ids = [...new Set(DEVICE_ROWS.map((r) => r.device_id))];
    $("#device").replaceChildren(...ids.map((id) => option(id, `${id} · ${DEVICE_ROWS.find((x) => x.device_id === id).kind}`)));
    if (ids.includes(chosen)) $("#device").value = chosen;
  }
  show();
}

async function changed() {
  try {
    await loadDevices();
  } catch (err) {
    $("#status").textContent = `错误 error: ${err.message}`;
    document.body.dataset.state = "error";
  }
}

async function csv() {
  try {
    const response = await get("text/csv", byDevice() ? "devices" : "stations");
    const name = (response.headers.get("Content-Disposition") || "").split('filename="')[1] || "summaries.csv";
    const a = document.createElement("a");
    a.href = URL.createObjectURL(await response.blob());
    a.download = name.replace(/"$/, "");
    a.click();
    URL.revokeObjectURL(a.href);
  } catch (err) {
    $("#status").textContent = `错误 error: ${err.message}`;
  }
}

const today = new Date();
const ago = new Date(today.getTime() - 7 * 86400000);
$("#to").value = today.toISOString().slice(0, 10);
$("#from").value = ago.toISOString().slice(0, 10);
$("#filters").addEventListener("submit", load);
$("#station").addEventListener("change", () => { document.body.dataset.state = "loading"; changed(); });
$("#scope").addEventListener("change", () => { document.body.dataset.state = "loading"; changed(); });
$("#device").addEventListener("change", show);
$("#csv").addEventListener("click", csv);
load();
