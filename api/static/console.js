// The maintenance console: alerts with ack/resolve/notes, undelivered webhook notifications,
// station health, offline devices, dead letters, and a device's recent history plotted.
// Needs an API key (Bearer).
"use strict";
const $ = (sel) => document.querySelector(sel);
const SEVERITY = { critical: 0, major: 1, minor: 2, warning: 3 };
let KEY = localStorage.getItem("cw-key") || "";
const PLACES = {}; // station id -> {names, address}, from the rider API

// An alert in words of the chosen language (the words of ingest/alerts/messages.py).
function has(key) { return Boolean(TEXTS[LANG] && TEXTS[LANG][key]); }
function ruleWord(a) {
  if (a.rule === "fault") return has(`fault_${a.code}`) ? t(`fault_${a.code}`) : a.code;
  if (!has(`rule_${a.rule}`)) return t("c_unknownRule", { rule: a.rule });
  if (a.rule === "rider_report") return `${t("rule_rider_report")}${LANG === "zh" ? "：" : ": "}${has(`cat${camel(a.code)}`) ? t(`cat${camel(a.code)}`) : a.code}`;
  if (a.code && a.code !== a.rule) return `${t(`rule_${a.rule}`)}${LANG === "zh" ? "：" : ": "}${a.code}`;
  return t(`rule_${a.rule}`);
}
function camel(code) { return (code || "").split("_").map((w) => w.charAt(0).toUpperCase() + w.slice(1)).join(""); }
function stationName(id) {
  if (id === "service") return t("c_service");
  const p = PLACES[id];
  return p ? p.names[LANG] || p.names.zh : id;
}
function unitText(a) {
  if (a.port) return t("c_port", { n: a.port });
  if (a.slot) return t("c_slot", { n: a.slot });
  return null;
}
function sevWord(sev) { return has(`sev_${sev}`) ? t(`sev_${sev}`) : sev; }
function word(prefix, value) { return has(prefix + value) ? t(prefix + value) : value; }

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

// Times as the district reads them: its clock (the catalog's time zone, Asia/Shanghai).
const DISTRICT_TZ = "Asia/Shanghai";
function local(iso) {
  try {
    return new Date(iso).toLocaleString("sv-SE", { timeZone: DISTRICT_TZ, hourCycle: "h23" });
  } catch (e) {
    return `${iso.replace("T", " ").slice(0, 19)} UTC`;
  }
}

function when(iso) {
  if (!iso) return "—";
  const age = (Date.now() - Date.parse(iso)) / 1000;
  return `${local(iso)} (${ageText(age)})`;
}

async function loadAlerts() {
  const body = $("#alerts tbody");
  let data;
  try {
    data = await api("/v1/alerts?status=active&limit=500");
  } catch (e) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 7, class: "stale" }, e.status === 401 || e.status === 403 ? t("c_keyNeeded", { e: e.message }) : t("c_alertsUnavailable", { e: e.message }))));
    $("#who").textContent = KEY ? t("c_keyRejected", { e: e.message }) : t("c_notLoggedIn");
    document.body.dataset.auth = "no";
    return;
  }
  document.body.dataset.auth = "yes";
  $("#who").textContent = t("c_loggedIn");
  const alerts = data.alerts.sort((a, b) => (SEVERITY[a.severity] - SEVERITY[b.severity]) || (b.id - a.id));
  $("#alerts-count").textContent = `(${alerts.length})`;
  body.replaceChildren(...alerts.map((a) => el("tr", { "data-alert-id": a.id, "data-status": a.status },
    el("td", {}, el("span", { class: `sev-${a.severity}`, "data-severity": a.severity }, sevWord(a.severity))),
    el("td", {}, el("span", { class: "what" }, ruleWord(a)), el("div", { class: "hint mono" }, a.code !== a.rule ? `${a.rule} · ${a.code}` : a.rule), a.info && !["fault", "rider_report"].includes(a.rule) ? el("div", { class: "hint" }, a.info) : null),
    el("td", {}, el("span", { class: "place" }, stationName(a.station)), el("div", { class: "hint" }, [a.device, unitText(a)].filter(Boolean).join(" · ") || null)),
    el("td", {}, when(a.opened_at)),
    el("td", { class: "status" }, word("status_", a.status), a.acknowledged_by ? el("div", { class: "hint" }, t("c_by", { by: a.acknowledged_by })) : null),
    el("td", {}, a.count),
    el("td", {},
      a.status === "open" ? el("button", { class: "act ack", type: "button", onclick: () => act(a.id, "ack") }, t("c_ack")) : null,
      el("button", { class: "act resolve", type: "button", onclick: () => act(a.id, "resolve") }, t("c_resolve")),
      el("button", { class: "act note", type: "button", onclick: () => note(a.id) }, t("c_note")),
      el("button", { class: "act order", type: "button", onclick: () => createOrder(a.id) }, t("c_createOrder")),
      a.device ? el("button", { class: "act", type: "button", onclick: () => showDevice(a.device) }, t("c_plot")) : null))));
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

function until(iso) {
  if (!iso) return "—";
  const left = (Date.parse(iso) - Date.now()) / 1000;
  return `${local(iso)} (${left > 0 ? t("inTime", { t: ageText(left) }) : t("dueNow")})`;
}

async function loadNotifications() {
  const body = $("#notifications tbody");
  let data;
  try {
    data = await api("/v1/notifications?limit=200");
  } catch (e) {
    $("#notifications-count").textContent = "";
    body.replaceChildren(el("tr", {}, el("td", { colspan: 8, class: "stale" }, t("c_notificationsUnavailable", { e: e.message }))));
    return;
  }
  const givenUp = data.notifications.filter((n) => n.state !== "pending").length;
  $("#notifications-count").textContent = `(${t("c_pendingCount", { p: data.pending, g: givenUp })})`;
  const rows = data.notifications.map((n) => el("tr", { "data-delivery-id": n.id, "data-state": n.state, "data-alert-id": n.alert_id },
    el("td", { class: n.state === "pending" ? "" : "stale" }, word("c_d", n.state)),
    el("td", {}, n.alert.severity ? el("span", { class: `sev-${n.alert.severity}` }, sevWord(n.alert.severity)) : null, " ",
      el("a", { href: `#alert-${n.alert_id}` }, n.alert.rule ? ruleWord(n.alert) : n.alert.title || t("c_alertN", { n: n.alert_id })),
      el("div", { class: "hint" }, [n.alert.station ? stationName(n.alert.station) : null, n.alert.device, unitText(n.alert)].filter(Boolean).join(" · "))),
    el("td", {}, n.subscription.name || `#${n.subscription.id}`, el("div", { class: "hint" }, t("c_webhook", { n: n.subscription.id }))),
    el("td", {}, word("event_", n.event)),
    el("td", {}, n.attempts),
    el("td", { class: "mono" }, n.last_error || "—"),
    el("td", {}, n.state === "pending" ? until(n.next_try_at) : when(n.finished_at)),
    el("td", {}, n.state === "pending" ? until(n.deadline) : "—")));
  if (!data.complete) rows.push(el("tr", {}, el("td", { colspan: 8, class: "stale" }, t("c_storeUnreadable"))));
  body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 8, class: "hint" }, t("c_allDelivered")))]));
}

async function act(id, what) {
  try {
    await api(`/v1/alerts/${id}/${what}`, { method: "POST", body: JSON.stringify({}) });
  } catch (e) {
    alert(t("c_actFailed", { e: `${what}: ${e.message}` }));
  }
  await loadAlerts();
}

async function note(id) {
  const text = prompt(t("c_notePrompt"));
  if (!text) return;
  await api(`/v1/alerts/${id}/notes`, { method: "POST", body: JSON.stringify({ text }) });
  await loadAlerts();
}

// Work orders: mine (assigned to the key's name), or every unclosed one; an alert's row
// makes one, and each order's buttons are the moves its state allows (order_model.MANUAL).
const NEXT = { open: ["assigned", "on_site", "fixed"], assigned: ["assigned", "on_site", "fixed"], on_site: ["fixed"], fixed: ["closed"], closed: [] };

async function loadOrders() {
  const body = $("#orders tbody");
  const all = $("#orders-all").checked;
  let data;
  try {
    data = await api(`/v1/work-orders?state=open,assigned,on_site,fixed&limit=200${all ? "" : "&mine=true"}`);
  } catch (e) {
    $("#orders-count").textContent = "";
    body.replaceChildren(el("tr", {}, el("td", { colspan: 7, class: "stale" }, t("c_ordersUnavailable", { e: e.message }))));
    return;
  }
  const orders = data.work_orders;
  $("#orders-count").textContent = `(${orders.length})`;
  const rows = orders.map((o) => el("tr", { "data-order-id": o.id, "data-state": o.state, "data-alert-id": o.alert_id },
    el("td", {}, `#${o.id}`),
    el("td", {}, el("span", { class: `sev-${o.severity}` }, sevWord(o.severity)), " ", el("a", { href: `#alert-${o.alert_id}` }, ruleWord(o))),
    el("td", {}, stationName(o.station), el("div", { class: "hint" }, o.device || null)),
    el("td", { class: "status" }, word("order_", o.state), o.on_site_how === "door" ? el("div", { class: "hint" }, t("c_byDoor")) : null),
    el("td", {}, o.assignee || "—"),
    el("td", { class: o.overdue ? "stale" : "" }, until(o.due_at), o.overdue ? el("div", { class: "hint" }, t("c_overdue")) : null),
    el("td", {}, ...(NEXT[o.state] || []).map((s) => el("button", { class: `act to-${s}`, type: "button", onclick: () => moveOrder(o, s) }, t(`c_to_${s}`))))));
  body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 7, class: "hint" }, t("c_noOrders")))]));
}

async function createOrder(alertId) {
  const assignee = prompt(t("c_assigneePrompt"));
  if (assignee === null) return;
  try {
    await api(`/v1/alerts/${alertId}/work-order`, { method: "POST", body: JSON.stringify(assignee.trim() ? { assignee: assignee.trim() } : {}) });
  } catch (e) {
    alert(t("c_actFailed", { e: e.message }));
  }
  await loadOrders();
}

async function moveOrder(order, state) {
  const body = { state };
  if (state === "assigned") {
    const who = prompt(t("c_assignPrompt"), order.assignee || "");
    if (!who || !who.trim()) return;
    body.assignee = who.trim();
  }
  try {
    await api(`/v1/work-orders/${order.id}/state`, { method: "POST", body: JSON.stringify(body) });
  } catch (e) {
    alert(t("c_actFailed", { e: e.message }));
  }
  await loadOrders();
}
$("#orders-all").addEventListener("change", () => loadOrders());

async function loadStations() {
  const list = await api("/v1/stations");
  const details = await Promise.all(list.stations.map((s) => api(`/v1/stations/${encodeURIComponent(s.id)}`)));
  for (const s of details) PLACES[s.id] = { names: s.names, address: s.address };
  $("#health").replaceChildren(...details.map((s) => {
    const total = s.piles.devices + s.cabinets.devices;
    const online = s.piles.online + s.cabinets.online;
    const faults = s.devices.filter((d) => d.faults.length).length;
    const cls = s.stale || online < total / 2 ? "health bad" : online < total || faults ? "health warn" : "health";
    return el("div", { class: cls, "data-station": s.id },
      el("b", {}, s.names[LANG] || s.names.zh), el("div", { class: "hint" }, s.address[LANG] || s.address.zh),
      el("div", {}, t("c_healthOnline", { o: online, t: total, f: faults })),
      el("div", {}, t("c_healthPorts", { f: s.piles.ports_free, t: s.piles.ports_total, r: s.cabinets.batteries_ready })),
      el("div", { class: "hint" }, t("c_updated", { t: when(s.updated_at) })));
  }));
  const offline = details.flatMap((s) => s.devices.filter((d) => !d.online).map((d) => [s, d]));
  $("#offline-count").textContent = `(${offline.length})`;
  $("#offline tbody").replaceChildren(...offline.slice(0, 200).map(([s, d]) => el("tr", { "data-device": d.id },
    el("td", {}, el("a", { href: "#", onclick: (ev) => { ev.preventDefault(); showDevice(d.id); } }, d.id)),
    el("td", {}, s.names[LANG] || s.id),
    el("td", {}, when(d.last_seen)),
    el("td", {}, d.last_known ? d.last_known.text[LANG] || d.last_known.text.zh : t("c_neverHeard")))));
}

async function loadDeadLetters() {
  try {
    const data = await api("/v1/deadletters?limit=20");
    const counts = Object.entries(data.counts).map(([k, v]) => `${k}: ${v}`).join(" · ") || t("c_none");
    $("#deadletters").replaceChildren(el("p", {}, counts),
      el("table", {}, el("tbody", {}, data.dead_letters.map((d) => el("tr", {},
        el("td", {}, when(d.received_at)), el("td", {}, d.reason), el("td", { class: "mono" }, d.topic),
        el("td", { class: "mono" }, d.detail))))));
  } catch (e) {
    $("#deadletters").replaceChildren(el("p", { class: "stale" }, t("c_deadUnavailable", { e: e.message })));
  }
}

function plot(points, fields) {
  const w = 900, h = 220, pad = 30;
  const svg = svgEl("svg", { viewBox: `0 0 ${w} ${h}`, class: "plot", role: "img" });
  if (!points.length) { svg.append(svgEl("text", { x: 20, y: 40 }, t("c_noHistory"))); return svg; }
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
    ? [["power_w", "l1", t("c_powerW")], ["ports_free", "l2", t("c_portsFree")], ["temp_c", "l3", t("c_tempC")]]
    : [["power_w", "l1", t("c_powerW")], ["soc_mean", "l2", t("c_socMean")], ["temp_c", "l3", t("c_tempC")]];
  $("#device").replaceChildren(
    el("h3", { "data-device": id }, `${id} · ${t(dev.kind)} · ${dev.online ? t("c_online") : t("c_offlineState")} · ${t("c_faults")}: ${dev.faults.map((f) => word("fault_", f)).join(", ") || t("c_none")}`),
    el("p", { class: "hint" }, t("c_lastSeen", { t: when(dev.last_seen), n: hist.points.length, s: hist.every_s })),
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
    await Promise.allSettled([loadAlerts(), loadNotifications(), loadOrders()]);
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
  const stations = loadStations();
  await stations.catch(() => {}); // names for the alerts' rows; failures are shown in place
  const more = typeof loadRecentCommands === "function" ? [loadRecentCommands()] : []; // commands.js
  await Promise.allSettled([loadAlerts(), loadNotifications(), loadDeadLetters(), loadOrders(), ...more]);
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
// Chinese by default; the English switch is remembered (the rider page shares it).
function showLanguage() {
  applyTexts();
  document.title = `${t("c_title")} · chargewatch`;
  $("#lang").textContent = LANG === "zh" ? "EN" : "中文";
  document.body.dataset.lang = LANG;
}
$("#lang").addEventListener("click", () => {
  LANG = LANG === "zh" ? "en" : "zh";
  localStorage.setItem("cw-lang", LANG);
  showLanguage();
  refresh();
  const shown = $("#device h3");
  if (shown) showDevice(shown.dataset.device);
});
showLanguage();
refresh();
follow();
setInterval(refresh, 15000);
