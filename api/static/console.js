// The maintenance console: alerts with ack/resolve/notes, undelivered webhook notifications,
// station health, offline devices, dead letters, and a device's recent history plotted.
// Needs an API key (Bearer).
"use strict";
const $ = (sel) => document.querySelector(sel);
const SEVERITY = { critical: 0, major: 1, minor: 2, warning: 3 };
let KEY = localStorage.getItem("cw-key") || "";

async function api(path, options) {
  const headers = { Accept: "application/json", ...(options && options.body ? { "Content-Type": "application/json" } : {}) };
  if (KEY) headers.Authorization = `Bearer ${KEY}`;
  const response = await fetch(path, { ...(options || {}), headers });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const err = new Error(typeof data.detail === "string" ? data.detail : `${response.status}`);
    err.status = response.status;
    throw err;
  }
  return data;
}

function when(iso) {
  if (!iso) return "—";
  const age = (Date.now() - Date.parse(iso)) / 1000;
  return `${iso.replace("T", " ").slice(0, 19)} (${ageText(age)})`;
}

async function loadAlerts() {
  const body = $("#alerts tbody");
  let data;
  try {
    data = await api("/v1/alerts?status=active&limit=500");
  } catch (e) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 7, class: "stale" }, e.status === 401 || e.status === 403 ? `API key needed (${e.message})` : `alerts unavailable: ${e.message}`)));
    $("#who").textContent = KEY ? `key rejected: ${e.message}` : "not logged in";
    document.body.dataset.auth = "no";
    return;
  }
  document.body.dataset.auth = "yes";
  $("#who").textContent = "logged in";
  const alerts = data.alerts.sort((a, b) => (SEVERITY[a.severity] - SEVERITY[b.severity]) || (b.id - a.id));
  $("#alerts-count").textContent = `(${alerts.length})`;
  body.replaceChildren(...alerts.map((a) => el("tr", { "data-alert-id": a.id, "data-status": a.status },
    el("td", {}, el("span", { class: `sev-${a.severity}` }, a.severity)),
    el("td", {}, a.title, a.info ? el("div", { class: "hint" }, a.info) : null),
    el("td", {}, [a.station, a.device, a.port ? `port ${a.port}` : null, a.slot ? `slot ${a.slot}` : null].filter(Boolean).join(" / ")),
    el("td", {}, when(a.opened_at)),
    el("td", { class: "status" }, a.status, a.acknowledged_by ? el("div", { class: "hint" }, `by ${a.acknowledged_by}`) : null),
    el("td", {}, a.count),
    el("td", {},
      a.status === "open" ? el("button", { class: "act ack", type: "button", onclick: () => act(a.id, "ack") }, "确认 Ack") : null,
      el("button", { class: "act resolve", type: "button", onclick: () => act(a.id, "resolve") }, "解决 Resolve"),
      el("button", { class: "act note", type: "button", onclick: () => note(a.id) }, "备注 Note"),
      el("button", { class: "act", type: "button", onclick: () => showDevice(a.device) }, "plot")))));
  focusLinkedAlert();
}

// A notification links to /console#alert-ID: mark that row, and scroll to it once.
let scrolledTo = null;
function focusLinkedAlert() {
  const m = /^#alert-(\d+)$/.exec(location.hash);
  const row = m && $(`#alerts tr[data-alert-id="${m[1]}"]`);
  if (!row) return;
  row.classList.add("focus");
  if (scrolledTo !== m[1]) {
    scrolledTo = m[1];
    row.scrollIntoView({ block: "center" });
  }
}
window.addEventListener("hashchange", () => { document.querySelectorAll("#alerts tr.focus").forEach((r) => r.classList.remove("focus")); focusLinkedAlert(); });

// Webhook notifications that did not arrive: waiting for their next try, or given up.
const DELIVERY_STATE = {
  pending: "等待重试 pending", failed: "被拒绝 refused", expired: "已过期 expired", dropped: "已丢弃 dropped",
};

function until(iso) {
  if (!iso) return "—";
  const left = (Date.parse(iso) - Date.now()) / 1000;
  return `${iso.replace("T", " ").slice(0, 19)} (${left > 0 ? t("inTime", { t: ageText(left) }) : t("dueNow")})`;
}

async function loadNotifications() {
  const body = $("#notifications tbody");
  let data;
  try {
    data = await api("/v1/notifications?limit=200");
  } catch (e) {
    $("#notifications-count").textContent = "";
    body.replaceChildren(el("tr", {}, el("td", { colspan: 8, class: "stale" }, `notifications unavailable: ${e.message}`)));
    return;
  }
  const givenUp = data.notifications.filter((n) => n.state !== "pending").length;
  $("#notifications-count").textContent = `(${data.pending} 等待 pending · ${givenUp} 放弃 given up)`;
  const rows = data.notifications.map((n) => el("tr", { "data-delivery-id": n.id, "data-state": n.state, "data-alert-id": n.alert_id },
    el("td", { class: n.state === "pending" ? "" : "stale" }, DELIVERY_STATE[n.state] || n.state),
    el("td", {}, n.alert.severity ? el("span", { class: `sev-${n.alert.severity}` }, n.alert.severity) : null, " ",
      el("a", { href: `#alert-${n.alert_id}` }, n.alert.title || `alert ${n.alert_id}`),
      el("div", { class: "hint" }, [n.alert.station, n.alert.device].filter(Boolean).join(" / "))),
    el("td", {}, n.subscription.name || `#${n.subscription.id}`, el("div", { class: "hint" }, `webhook ${n.subscription.id}`)),
    el("td", {}, n.event),
    el("td", {}, n.attempts),
    el("td", { class: "mono" }, n.last_error || "—"),
    el("td", {}, n.state === "pending" ? until(n.next_try_at) : when(n.finished_at)),
    el("td", {}, n.state === "pending" ? until(n.deadline) : "—")));
  if (!data.complete) rows.push(el("tr", {}, el("td", { colspan: 8, class: "stale" }, "告警库暂不可读：只显示内存中的 · alert store unreadable: only those in memory")));
  body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 8, class: "hint" }, "全部送达 all delivered"))]));
}

async function act(id, what) {
  try {
    await api(`/v1/alerts/${id}/${what}`, { method: "POST", body: JSON.stringify({}) });
  } catch (e) {
    alert(`${what} failed: ${e.message}`);
  }
  await loadAlerts();
}

async function note(id) {
  const text = prompt("Note / 备注");
  if (!text) return;
  await api(`/v1/alerts/${id}/notes`, { method: "POST", body: JSON.stringify({ text }) });
  await loadAlerts();
}

async function loadStations() {
  const list = await api("/v1/stations");
  const details = await Promise.all(list.stations.map((s) => api(`/v1/stations/${encodeURIComponent(s.id)}`)));
  $("#health").replaceChildren(...details.map((s) => {
    const total = s.piles.devices + s.cabinets.devices;
    const online = s.piles.online + s.cabinets.online;
    const faults = s.devices.filter((d) => d.faults.length).length;
    const cls = s.stale || online < total / 2 ? "health bad" : online < total || faults ? "health warn" : "health";
    return el("div", { class: cls, "data-station": s.id },
      el("b", {}, s.names.zh), el("div", { class: "hint" }, s.names.en),
      el("div", {}, `online ${online}/${total} · faults ${faults}`),
      el("div", {}, `ports free ${s.piles.ports_free}/${s.piles.ports_total} · ready ${s.cabinets.batteries_ready}`),
      el("div", { class: "hint" }, `updated ${when(s.updated_at)}`));
  }));
  const offline = details.flatMap((s) => s.devices.filter((d) => !d.online).map((d) => [s, d]));
  $("#offline-count").textContent = `(${offline.length})`;
  $("#offline tbody").replaceChildren(...offline.slice(0, 200).map(([s, d]) => el("tr", { "data-device": d.id },
    el("td", {}, el("a", { href: "#", onclick: (ev) => { ev.preventDefault(); showDevice(d.id); } }, d.id)),
    el("td", {}, s.id),
    el("td", {}, when(d.last_seen)),
    el("td", {}, d.last_known ? d.last_known.text.en : "never heard from"))));
}

async function loadDeadLetters() {
  try {
    const data = await api("/v1/deadletters?limit=20");
    const counts = Object.entries(data.counts).map(([k, v]) => `${k}: ${v}`).join(" · ") || "none";
    $("#deadletters").replaceChildren(el("p", {}, counts),
      el("table", {}, el("tbody", {}, data.dead_letters.map((d) => el("tr", {},
        el("td", {}, when(d.received_at)), el("td", {}, d.reason), el("td", { class: "mono" }, d.topic),
        el("td", { class: "mono" }, d.detail))))));
  } catch (e) {
    $("#deadletters").replaceChildren(el("p", { class: "stale" }, `dead letters unavailable: ${e.message}`));
  }
}

function plot(points, fields) {
  const w = 900, h = 220, pad = 30;
  const svg = svgEl("svg", { viewBox: `0 0 ${w} ${h}`, class: "plot", role: "img" });
  if (!points.length) { svg.append(svgEl("text", { x: 20, y: 40 }, "no history in this span")); return svg; }
  const ts = points.map((p) => Date.parse(p.t));
  const t0 = Math.min(...ts), t1 = Math.max(...ts) || t0 + 1;
  fields.forEach(([field, cls, label], i) => {
    const vals = points.map((p) => p[field]).filter((v) => v !== null && v !== undefined);
    if (!vals.length) return;
    const lo = Math.min(...vals), hi = Math.max(...vals);
    const span = hi - lo || 1;
    const d = points.map((p, j) => p[field] === null || p[field] === undefined ? null
      : `${pad + ((ts[j] - t0) / (t1 - t0 || 1)) * (w - 2 * pad)},${h - pad - ((p[field] - lo) / span) * (h - 2 * pad)}`).filter(Boolean);
    svg.append(svgEl("polyline", { points: d.join(" "), class: cls, "data-field": field }));
    svg.append(svgEl("text", { x: pad + i * 240, y: 16, class: cls.replace("l", "t") }, `${label}: ${lo.toFixed(1)}–${hi.toFixed(1)}`));
  });
  return svg;
}

async function showDevice(id) {
  if (!id) return;
  $("#device-id").value = id;
  const span = Number($("#device-span").value);
  const to = new Date(), from = new Date(to.getTime() - span);
  const [dev, hist] = await Promise.all([
    api(`/v1/devices/${encodeURIComponent(id)}`),
    api(`/v1/devices/${encodeURIComponent(id)}/history?from=${from.toISOString()}&to=${to.toISOString()}`),
  ]);
  const fields = dev.kind === "pile"
    ? [["power_w", "l1", "power W"], ["ports_free", "l2", "free ports"], ["temp_c", "l3", "temp °C"]]
    : [["power_w", "l1", "power W"], ["soc_mean", "l2", "mean soc %"], ["temp_c", "l3", "temp °C"]];
  $("#device").replaceChildren(
    el("h3", { "data-device": id }, `${id} · ${dev.kind} · ${dev.online ? "online" : "OFFLINE"} · faults: ${dev.faults.join(", ") || "none"}`),
    el("p", { class: "hint" }, `last seen ${when(dev.last_seen)} · ${hist.points.length} points every ${hist.every_s}s (last status per bucket)`),
    plot(hist.points, fields),
    el("table", {}, el("tbody", {}, hist.changes.slice(-30).reverse().map((c) => el("tr", {},
      el("td", {}, when(c.t)), el("td", {}, c.type),
      el("td", { class: "mono" }, Object.entries(c).filter(([k]) => !["t", "type", "device_id"].includes(k)).map(([k, v]) => `${k}=${v}`).join(" ")))))));
  document.body.dataset.device = id;
  if (typeof showCommands === "function") showCommands(id, dev);  // commands.js
}

// Alert changes as they happen: the SSE stream read with fetch, because a browser's
// EventSource cannot send the Authorization header. Resumes with Last-Event-ID; the
// periodic refresh below stays as a safety net.
let following = null;
let alertsTimer = null;

function alertsSoon() {
  if (alertsTimer) return;
  alertsTimer = setTimeout(async () => {
    alertsTimer = null;
    await Promise.allSettled([loadAlerts(), loadNotifications()]);
    document.body.dataset.streamLoads = String(Number(document.body.dataset.streamLoads || 0) + 1);
  }, 150);
}

async function follow() {
  if (following) following.abort();
  following = null;
  document.body.dataset.live = "no";
  if (!KEY) return;
  const ctrl = new AbortController();
  following = ctrl;
  let lastId = null;
  while (!ctrl.signal.aborted) {
    try {
      const headers = { Authorization: `Bearer ${KEY}`, Accept: "text/event-stream" };
      if (lastId) headers["Last-Event-ID"] = lastId;
      const response = await fetch("/v1/alerts/stream", { headers, signal: ctrl.signal });
      if (!response.ok || !response.body) throw new Error(String(response.status));
      document.body.dataset.live = "yes";
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const lines = buffer.slice(0, cut).split("\n");
          buffer = buffer.slice(cut + 2);
          const id = lines.find((l) => l.startsWith("id:"));
          if (id) lastId = id.slice(3).trim();
          if (lines.some((l) => l.startsWith("event:"))) alertsSoon();
        }
      }
    } catch (err) {
      if (ctrl.signal.aborted) return;
    }
    document.body.dataset.live = "no";
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

async function refresh() {
  await Promise.allSettled([loadAlerts(), loadNotifications(), loadStations(), loadDeadLetters()]);
  document.body.dataset.refreshed = String(Date.now());
}

$("#login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  KEY = $("#key").value.trim();
  localStorage.setItem("cw-key", KEY);
  $("#key").value = "";
  refresh();
  follow();
});
$("#logout").addEventListener("click", () => { KEY = ""; localStorage.removeItem("cw-key"); refresh(); follow(); });
$("#device-form").addEventListener("submit", (ev) => { ev.preventDefault(); showDevice($("#device-id").value.trim()); });
refresh();
follow();
setInterval(refresh, 15000);
