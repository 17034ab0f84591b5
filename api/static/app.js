// The rider page: nearby stations with live counts (SSE), freshness, detail, best time,
// problem reports. Talks only to this service; the map is drawn from the catalog.
"use strict";

const state = {
  all: [],            // every station (for the map)
  list: [],           // the stations listed, in order
  byId: new Map(),    // latest view per station id
  seenAt: new Map(),  // Date.now() when that view arrived (ages tick on from data_age_s)
  origin: null,       // [lat, lon] picked by the rider
  kind: "",
  arrive: "",
  detail: null,       // station id shown in detail
  detailView: null,
  source: null,
  proj: null,
};

const $ = (sel) => document.querySelector(sel);

async function getJSON(url) {
  const response = await fetch(url, { headers: { Accept: "application/json" } });
  if (!response.ok) throw new Error(`${response.status} ${url}`);
  return response.json();
}

function remember(view) {
  const old = state.byId.get(view.id) || {};
  // the stream carries no distance or arrival estimate: keep those of the listing
  const merged = { ...old, ...view };
  if (view.distance_m === null && old.distance_m !== undefined) merged.distance_m = old.distance_m;
  state.byId.set(view.id, merged);
  state.seenAt.set(view.id, Date.now());
  return merged;
}

function ageOf(view, field) {
  const age = field === undefined ? view.data_age_s : field;
  if (age === null || age === undefined) return null;
  return age + (Date.now() - (state.seenAt.get(view.id) || Date.now())) / 1000;
}

function distanceText(m) {
  if (m === null || m === undefined) return "";
  return m < 1000 ? `${Math.round(m)} ${t("m")}` : `${(m / 1000).toFixed(1)} ${t("km")}`;
}

function stationName(view) {
  return LANG === "zh" ? view.names.zh : view.names.en;
}

function freshness(view) {
  if (view.stale) {
    const known = view.last_known;
    if (!known) return el("span", { class: "stale" }, t("stale"));
    const parts = [];
    if (known.ports_free !== null) parts.push(`${known.ports_free} ${t("portsFree")}`);
    if (known.batteries_ready !== null) parts.push(`${known.batteries_ready} ${t("batteriesReady")}`);
    const age = ageText(ageOf(view, known.age_s));
    return el("span", { class: "stale", "data-stale": "true" },
      `${t("stale")} · ${t("lastKnown")}: ${parts.join(", ")} · ${t("updated", { age })}`);
  }
  const age = ageOf(view);
  return el("span", { class: "fresh" }, age === null ? "" : t("updated", { age: ageText(age) }));
}

function countBlock(view, kind) {
  const pile = kind === "pile";
  const group = pile ? view.piles : view.cabinets;
  if (!group.devices) return null;
  const value = pile ? group.ports_free : group.batteries_ready;
  const total = pile ? group.ports_total : group.slots_total;
  const cls = view.stale ? "count none" : value > 0 ? "count good" : "count zero";
  return el("div", { class: "count-block" },
    el("span", { class: cls, "data-count": pile ? "ports_free" : "batteries_ready" },
      view.stale ? "—" : String(value)),
    el("span", { class: "count-label" },
      `${pile ? t("portsFree") : t("batteriesReady")}`,
      pile ? "" : el("small", {}, ` (${t("of")} ${total})`)));
}

function card(view) {
  const kinds = state.kind ? [state.kind] : ["pile", "cabinet"];
  const chance = view.arrival
    ? el("div", { class: "chance" }, t("chance", {
      p: Math.round(100 * (state.kind === "pile" ? view.arrival.p_port
        : state.kind === "cabinet" ? view.arrival.p_battery : view.arrival.p_any) || 0),
    }))
    : null;
  const hint = [];
  if (!view.stale && view.cabinets.devices && view.cabinets.batteries_ready === 0
      && view.next_ready_in_s !== null && kinds.includes("cabinet")) {
    hint.push(t("nextReady", { t: ageText(view.next_ready_in_s) }));
  }
  return el("li", { class: view.stale ? "card is-stale" : "card", "data-station": view.id },
    el("button", { type: "button", class: "card-btn", onclick: () => openDetail(view.id) },
      el("div", { class: "card-head" },
        el("span", { class: "name" }, stationName(view)),
        el("span", { class: "dist" }, distanceText(view.distance_m))),
      el("div", { class: "counts" }, kinds.map((k) => countBlock(view, k))),
      hint.length ? el("div", { class: "hint" }, hint.join(" · ")) : null,
      chance,
      el("div", { class: "freshness" }, freshness(view))));
}

function renderList() {
  const list = $("#stations");
  list.replaceChildren();
  if (!state.list.length) list.append(el("li", { class: "empty" }, t("noStations")));
  for (const id of state.list) list.append(card(state.byId.get(id)));
}

function updateCard(id) {
  const old = document.querySelector(`#stations [data-station="${CSS.escape(id)}"]`);
  if (old) old.replaceWith(card(state.byId.get(id)));
}

// -- map --------------------------------------------------------------------------------

const MAP_W = 600, MAP_H = 440;

function projection(stations) {
  const lats = stations.map((s) => s.lat), lons = stations.map((s) => s.lon);
  const lat0 = (Math.min(...lats) + Math.max(...lats)) / 2;
  const k = Math.cos((lat0 * Math.PI) / 180);
  const pad = 0.0025;
  const minX = (Math.min(...lons) - pad) * k, maxX = (Math.max(...lons) + pad) * k;
  const minY = Math.min(...lats) - pad, maxY = Math.max(...lats) + pad;
  const scale = Math.min(MAP_W / (maxX - minX), MAP_H / (maxY - minY));
  const ox = (MAP_W - (maxX - minX) * scale) / 2, oy = (MAP_H - (maxY - minY) * scale) / 2;
  return {
    xy: (lat, lon) => [ox + (lon * k - minX) * scale, oy + (maxY - lat) * scale],
    latlon: (x, y) => [maxY - (y - oy) / scale, ((x - ox) / scale + minX) / k],
    metresPerUnit: 111320 / scale,
  };
}

function drawMap() {
  const svg = $("#map");
  const p = state.proj;
  svg.replaceChildren();
  svg.append(svgEl("rect", { x: 0, y: 0, width: MAP_W, height: MAP_H, class: "land" }));
  // a 250 m grid stands in for the streets: distance at a glance, no tiles needed
  const step = 250 / p.metresPerUnit;
  for (let x = 0; x < MAP_W; x += step) svg.append(svgEl("line", { x1: x, y1: 0, x2: x, y2: MAP_H, class: "grid" }));
  for (let y = 0; y < MAP_H; y += step) svg.append(svgEl("line", { x1: 0, y1: y, x2: MAP_W, y2: y, class: "grid" }));
  const bar = 500 / p.metresPerUnit;
  svg.append(svgEl("line", { x1: 16, y1: MAP_H - 14, x2: 16 + bar, y2: MAP_H - 14, class: "scale" }));
  svg.append(svgEl("text", { x: 16, y: MAP_H - 24, class: "scale-text" }, "500 m"));
  for (const s of state.all) {
    const view = state.byId.get(s.id) || s;
    const [x, y] = p.xy(s.lat, s.lon);
    const free = (view.piles.ports_free || 0) + (view.cabinets.batteries_ready || 0);
    const cls = view.stale ? "dot stale" : free > 0 ? "dot good" : "dot zero";
    const g = svgEl("g", { class: "station", "data-station": s.id, tabindex: 0 });
    g.append(svgEl("circle", { cx: x, cy: y, r: 24, class: cls }));
    const label = view.stale ? "—" : state.kind === "pile" ? view.piles.ports_free
      : state.kind === "cabinet" ? view.cabinets.batteries_ready : free;
    g.append(svgEl("text", { x, y: y + 9, class: "dot-text" }, String(label)));
    g.append(svgEl("text", { x, y: y + 44, class: "dot-name" }, shortName(view)));
    g.addEventListener("click", (ev) => { ev.stopPropagation(); openDetail(s.id); });
    svg.append(g);
  }
  if (state.origin) {
    const [x, y] = p.xy(state.origin[0], state.origin[1]);
    const me = svgEl("g", { class: "me" });
    me.append(svgEl("circle", { cx: x, cy: y, r: 10, class: "me-dot" }));
    me.append(svgEl("text", { x, y: y - 16, class: "me-text" }, t("youAreHere")));
    svg.append(me);
  }
}

function shortName(view) {
  const name = stationName(view);
  return LANG === "zh" ? name.slice(0, 6) : name.split(" ").slice(0, 2).join(" ");
}

function onMapTap(ev) {
  const svg = $("#map");
  const pt = svg.createSVGPoint();
  pt.x = ev.clientX; pt.y = ev.clientY;
  const local = pt.matrixTransform(svg.getScreenCTM().inverse());
  setOrigin(state.proj.latlon(local.x, local.y));
}

// -- data -------------------------------------------------------------------------------

function setOrigin(latlon) {
  state.origin = [Number(latlon[0].toFixed(6)), Number(latlon[1].toFixed(6))];
  document.body.dataset.origin = state.origin.join(",");
  loadList();
}

async function loadList() {
  const params = new URLSearchParams();
  if (state.origin) {
    params.set("lat", state.origin[0]);
    params.set("lon", state.origin[1]);
    params.set("radius_m", "5000");
  }
  if (state.kind) params.set("kind", state.kind);
  if (state.arrive) params.set("arrive_in_s", state.arrive);
  const body = await getJSON(`/v1/stations?${params}`);
  for (const view of body.stations) remember(view);
  state.list = body.stations.map((s) => s.id);
  renderList();
  drawMap();
  document.body.dataset.loaded = String(Date.now());
}

function subscribe() {
  if (state.source) state.source.close();
  const ids = state.all.map((s) => s.id).join(",");
  const source = new EventSource(`/v1/stations/stream?stations=${encodeURIComponent(ids)}`);
  source.addEventListener("open", () => { $("#live").textContent = `● ${t("live")}`; $("#live").className = "live on"; });
  source.addEventListener("error", () => { $("#live").textContent = t("liveLost"); $("#live").className = "live off"; });
  source.addEventListener("station", (ev) => {
    const view = remember(JSON.parse(ev.data));
    updateCard(view.id);
    drawMap();
    if (state.detail === view.id) refreshDetail();
    document.body.dataset.events = String(Number(document.body.dataset.events || 0) + 1);
  });
  state.source = source;
}

// -- detail -----------------------------------------------------------------------------

async function openDetail(id) {
  state.detail = id;
  $("#home").hidden = true;
  $("#detail").hidden = false;
  $("#report").hidden = true;
  $("#report-result").textContent = "";
  window.scrollTo(0, 0);
  await refreshDetail();
  loadChart(id);
}

function closeDetail() {
  state.detail = null;
  $("#detail").hidden = true;
  $("#home").hidden = false;
  loadMine();
}

async function refreshDetail() {
  const id = state.detail;
  if (!id) return;
  const view = await getJSON(`/v1/stations/${encodeURIComponent(id)}`);
  if (state.detail !== id) return;
  state.detailView = view;
  remember({ ...view, devices: undefined });
  renderDetail(view);
}

function unitBox(kind, unit, online) {
  const label = kind === "pile" ? `${unit.n}` : unit.soc !== null && unit.soc !== undefined ? `${Math.round(unit.soc)}%` : "";
  const state_ = !online ? "unknown" : kind === "cabinet" && unit.ready ? "ready" : unit.state;
  return el("span", { class: `unit u-${state_}`, title: `${unit.n}: ${t("state_" + unit.state)}`, "data-unit": unit.n },
    el("b", {}, label), el("i", {}, t("state_" + unit.state)));
}

function deviceCard(d) {
  const pile = d.kind === "pile";
  const units = pile ? d.ports : d.slots;
  const head = pile
    ? `${t("pile")} ${d.id} · ${d.online ? `${d.ports_free} ${t("portsFree")}` : t("offline")}`
    : `${t("cabinet")} ${d.id} · ${d.online ? `${d.batteries_ready} ${t("batteriesReady")}` : t("offline")}`;
  let next = null;
  if (d.online && !pile && d.next_ready_in_s !== null) next = t("nextReady", { t: ageText(d.next_ready_in_s) });
  if (d.online && pile && d.ports_free === 0 && d.next_free_in_s !== null) next = t("nextFree", { t: ageText(d.next_free_in_s) });
  return el("article", { class: d.online ? "device" : "device is-stale", "data-device": d.id },
    el("h4", {}, head),
    next ? el("p", { class: "next" }, next) : null,
    !d.online && d.last_known ? el("p", { class: "stale" }, `${t("lastKnown")}: ${d.last_known.text[LANG]}`) : null,
    el("div", { class: "units" }, units.map((u) => unitBox(d.kind, u, d.online))));
}

function renderDetail(view) {
  const body = $("#detail-body");
  body.replaceChildren(
    el("h2", { "data-station-title": view.id }, stationName(view)),
    el("p", { class: "addr" }, `${t("address")}: ${LANG === "zh" ? view.address.zh : view.address.en} · ${t("hours")}: ${view.hours}`),
    el("div", { class: "counts big-counts", "data-station": view.id },
      countBlock(view, "pile"), countBlock(view, "cabinet")),
    el("div", { class: "freshness" }, freshness(view)),
    ...view.devices.map(deviceCard));
  const select = $("#report-device");
  const current = select.value;
  select.replaceChildren(el("option", { value: "" }, t("wholeStation")),
    ...view.devices.map((d) => el("option", { value: d.id }, `${d.kind === "pile" ? t("pile") : t("cabinet")} ${d.id}`)));
  select.value = current;
}

async function loadChart(id) {
  const box = $("#chart");
  box.replaceChildren();
  $("#chart-note").textContent = "";
  let fc;
  try { fc = await getJSON(`/v1/stations/${encodeURIComponent(id)}/forecast`); } catch (e) { return; }
  if (state.detail !== id) return;
  if (!fc.samples) { $("#chart-note").textContent = t("noHistory"); return; }
  const series = [];
  if (fc.ports_total) series.push(["ports_free", fc.ports_total, t("portsAxis"), "bar-p", fc.best_hours.pile]);
  if (fc.slots_total) series.push(["batteries_ready", fc.slots_total, t("readyAxis"), "bar-c", fc.best_hours.cabinet]);
  for (const [field, total, name, cls, best] of series) {
    const svg = svgEl("svg", { viewBox: "0 0 480 150", class: "bars", "data-series": field, role: "img", "aria-label": name });
    const max = Math.max(1, ...fc.by_hour.map((h) => h[field] || 0));
    fc.by_hour.forEach((h, i) => {
      const v = h[field];
      const height = v === null ? 0 : (110 * v) / max;
      const rect = svgEl("rect", { x: 4 + i * 19.5, y: 120 - height, width: 15, height, class: best.includes(h.hour) ? `${cls} best` : cls, "data-hour": h.hour });
      rect.append(svgEl("title", {}, `${h.hour}:00 ${v === null ? "—" : v.toFixed(1)} (${h.samples})`));
      svg.append(rect);
      if (i % 3 === 0) svg.append(svgEl("text", { x: 4 + i * 19.5 + 7, y: 138, class: "axis" }, String(h.hour)));
    });
    svg.append(svgEl("text", { x: 4, y: 12, class: "axis-name" }, `${name} (max ${max.toFixed(1)} / ${total})`));
    box.append(svg);
  }
  $("#chart-note").textContent = t("samples", { days: fc.days, n: fc.samples });
}

async function sendReport(ev) {
  ev.preventDefault();
  const view = state.detailView;
  const device = $("#report-device").value || null;
  const unit = $("#report-unit").value ? Number($("#report-unit").value) : null;
  const body = { station: view.id, category: $("#report-category").value, text: $("#report-text").value };
  if (device) {
    body.device = device;
    const d = view.devices.find((x) => x.id === device);
    if (unit !== null) body[d.kind === "pile" ? "port" : "slot"] = unit;
  }
  const out = $("#report-result");
  const post = () => fetch("/v1/reports", {
    method: "POST", headers: { "Content-Type": "application/json", ...riderAuth() }, body: JSON.stringify(body),
  });
  try {
    let response = await post();
    if (response.status === 401 && localStorage.getItem(RIDER_TOKEN)) {
      // this phone's registration is gone (a reset service): a hazard report still goes
      // through, anonymous, and the panel asks to register again
      localStorage.removeItem(RIDER_TOKEN);
      state.riderLost = true;
      response = await post();
    }
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      const detail = Array.isArray(data.detail) ? data.detail.map((p) => `${p.field}: ${p.problem}`).join("; ") : data.detail || response.status;
      throw new Error(detail);
    }
    out.textContent = t("reportSent", { id: data.alert_id });
    out.className = "result ok";
    out.dataset.alertId = data.alert_id;
    if (data.report_id) out.dataset.reportId = data.report_id;
    loadMine();
  } catch (e) {
    out.textContent = t("reportFailed", { e: e.message });
    out.className = "result bad";
  }
}

// -- my reports (sentinels): the rider's token stays on this phone ------------------------

const RIDER_TOKEN = "cw-rider";
const CATEGORY_TEXT = {
  smoke: "catSmoke", fire: "catFire", water: "catWater", heat: "catHeat", damage: "catDamage",
  not_working: "catNotWorking", blocked: "catBlocked", other: "catOther",
};

function riderAuth() {
  const token = localStorage.getItem(RIDER_TOKEN);
  return token ? { Authorization: `Rider ${token}` } : {};
}

function problemText(data, response) {
  return Array.isArray(data.detail) ? data.detail.map((p) => p.problem).join("; ") : data.detail || response.status;
}

function showRegister(message) {
  $("#mine-body").hidden = true;
  $("#register").hidden = false;
  const select = $("#register-station");
  const current = select.value;
  select.replaceChildren(...state.all.map((s) => el("option", { value: s.id }, stationName(state.byId.get(s.id) || s))));
  if (current) select.value = current;
  $("#mine-status").textContent = message || "";
  $("#mine-status").className = message ? "result bad" : "result";
}

function reportLine(r) {
  const station = state.byId.get(r.station);
  const where = [station ? stationName(station) : r.station, r.device, r.port ? `#${r.port}` : r.slot ? `#${r.slot}` : null]
    .filter(Boolean).join(" ");
  const parts = [`#${r.id}`, t(CATEGORY_TEXT[r.category] || "catOther"), where, t("outcome_" + r.outcome)];
  if (r.points) parts.push(t("mineEarned", { n: r.points }));
  else if (r.no_points === "duplicate") parts.push(t("mineDuplicate"));
  else if (r.no_points === "known") parts.push(t("mineKnown"));
  if (r.decision_note) parts.push(r.decision_note);
  return el("li", { "data-report": r.id, "data-outcome": r.outcome, "data-points": r.points }, parts.join(" · "));
}

function ledgerLine(e) {
  const sign = e.delta > 0 ? `+${e.delta}` : String(e.delta);
  const parts = [sign, t("reason_" + e.reason), e.report_id ? `#${e.report_id}` : null, e.note];
  return el("li", { "data-entry": e.id }, parts.filter(Boolean).join(" · "));
}

async function loadMine() {
  if (!localStorage.getItem(RIDER_TOKEN)) { showRegister(state.riderLost ? t("mineLost") : ""); return; }
  let me, mine;
  try {
    const headers = { Accept: "application/json", ...riderAuth() };
    const [a, b] = await Promise.all([fetch("/v1/riders/me", { headers }), fetch("/v1/riders/me/reports", { headers })]);
    if (a.status === 401 || b.status === 401) {
      localStorage.removeItem(RIDER_TOKEN);
      showRegister(t("mineLost"));
      return;
    }
    if (!a.ok || !b.ok) throw new Error(String(a.ok ? b.status : a.status));
    [me, mine] = [await a.json(), await b.json()];
  } catch (e) {
    $("#mine-status").textContent = t("mineFailed", { e: e.message });
    $("#mine-status").className = "result bad";
    return;
  }
  $("#register").hidden = true;
  $("#mine-body").hidden = false;
  $("#mine-status").textContent = "";
  $("#mine-who").textContent = me.nickname;
  $("#mine-points").textContent = String(me.points);
  const list = $("#mine-reports");
  list.replaceChildren(...mine.reports.map(reportLine));
  if (!mine.reports.length) list.append(el("li", { class: "empty" }, t("mineNone")));
  $("#mine-ledger").replaceChildren(...me.ledger.map(ledgerLine));
  document.body.dataset.mineLoaded = String(Date.now());
}

async function register(ev) {
  ev.preventDefault();
  const out = $("#register-result");
  try {
    const response = await fetch("/v1/riders", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ station_id: $("#register-station").value, nickname: $("#register-nickname").value.trim() }),
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(problemText(data, response));
    localStorage.setItem(RIDER_TOKEN, data.token);  // shown once: this phone keeps it
    state.riderLost = false;
    out.textContent = "";
    out.className = "result";
    await loadMine();
  } catch (e) {
    out.textContent = t("registerFailed", { e: e.message });
    out.className = "result bad";
  }
}

// -- start ------------------------------------------------------------------------------

function tick() {
  for (const node of document.querySelectorAll("#stations .card")) {
    const view = state.byId.get(node.dataset.station);
    const slot = node.querySelector(".freshness");
    if (view && slot) slot.replaceChildren(freshness(view));
  }
  if (state.detail && state.byId.get(state.detail)) {
    const slot = document.querySelector("#detail-body > .freshness");
    if (slot) slot.replaceChildren(freshness(state.byId.get(state.detail)));
  }
}

async function start() {
  applyTexts();
  $("#lang").textContent = LANG === "zh" ? "EN" : "中文";
  $("#lang").addEventListener("click", () => {
    LANG = LANG === "zh" ? "en" : "zh";
    localStorage.setItem("cw-lang", LANG);
    $("#lang").textContent = LANG === "zh" ? "EN" : "中文";
    applyTexts();
    renderList();
    drawMap();
    if (state.detailView) renderDetail(state.detailView);
    loadMine();
  });
  $("#locate").addEventListener("click", () => {
    if (!navigator.geolocation) return;
    navigator.geolocation.getCurrentPosition(
      (pos) => setOrigin([pos.coords.latitude, pos.coords.longitude]),
      () => { $("#live").textContent = t("tapHint"); },
      { enableHighAccuracy: true, timeout: 10000 });
  });
  for (const b of document.querySelectorAll("#kind button")) {
    b.addEventListener("click", () => {
      for (const o of document.querySelectorAll("#kind button")) o.classList.toggle("on", o === b);
      state.kind = b.dataset.kind;
      loadList();
    });
  }
  $("#arrive").addEventListener("change", (ev) => { state.arrive = ev.target.value; loadList(); });
  $("#map").addEventListener("click", onMapTap);
  $("#back").addEventListener("click", closeDetail);
  $("#report-open").addEventListener("click", () => { $("#report").hidden = !$("#report").hidden; });
  $("#report").addEventListener("submit", sendReport);
  $("#register").addEventListener("submit", register);
  $("#mine-refresh").addEventListener("click", loadMine);
  $("#mine-link").addEventListener("click", () => { if (state.detail) closeDetail(); });
  $("#mine-forget").addEventListener("click", () => { localStorage.removeItem(RIDER_TOKEN); showRegister(); });
  const all = await getJSON("/v1/stations");
  state.all = all.stations;
  for (const view of all.stations) remember(view);
  state.proj = projection(state.all);
  await loadList();
  loadMine();
  subscribe();
  setInterval(tick, 1000);
}

start();
