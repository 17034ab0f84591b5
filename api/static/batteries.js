// The console's battery passports: the flagged packs, one pack's passport by serial (where
// it is, its stays, its safety events, its clearances) and clearing a flag with a note.
// Uses console.js's api/when and i18n.js's t/el; refreshed with the console.
"use strict";

function reasonWord(kind) {
  if (!kind) return "—";
  if (kind === "appeared") return t("c_appeared");
  if (has(`rule_${kind}`)) return t(`rule_${kind}`);
  return word("fault_", kind);
}
function placeText(device, slot) {
  return device ? `${device} · ${t("c_slot", { n: slot })}` : t("c_inNoSlot");
}
function tempText(v) { return v === null || v === undefined ? "—" : `${v} °C`; }

async function loadFlagged() {
  try {
    const data = await api("/v1/batteries?flagged=true&limit=200");
    $("#flagged-count").textContent = `(${data.batteries.length})`;
    $("#flagged tbody").replaceChildren(...data.batteries.map((b) => el("tr", { "data-serial": b.serial },
      el("td", {}, el("a", { href: "#", onclick: (ev) => { ev.preventDefault(); showBattery(b.serial); } }, b.serial)),
      el("td", {}, when(b.flagged_at)),
      el("td", {}, reasonWord(b.flag_reason)),
      el("td", {}, b.current ? placeText(b.current.device_id, b.current.slot) : t("c_inNoSlot")),
      el("td", {}, tempText(b.max_temp_c)))));
  } catch (e) {
    $("#flagged-count").textContent = "";
    $("#flagged tbody").replaceChildren();
  }
}

function table(heads, rows) {
  return el("table", {}, el("thead", {}, el("tr", {}, heads.map((h) => el("th", {}, t(h))))),
    el("tbody", {}, rows));
}

async function showBattery(serial) {
  if (!serial) return;
  $("#battery-serial").value = serial;
  let p;
  try {
    p = await api(`/v1/batteries/${encodeURIComponent(serial)}`);
  } catch (e) {
    const text = e.status === 404 ? t("c_noBattery", { s: serial }) : e.message;
    $("#battery").replaceChildren(el("p", { class: "stale", "data-missing": serial }, text));
    return;
  }
  const rise = p.max_rise_c_per_min === null ? "—" : t("c_perMin", { v: p.max_rise_c_per_min });
  const head = el("h3", { "data-serial": p.serial, "data-flagged": p.flagged ? "yes" : "no" },
    `${p.serial} · `, el("span", { class: p.flagged ? "flag bad" : "flag" }, p.flagged ? t("c_flagged") : t("c_notFlagged")),
    p.flagged ? ` · ${reasonWord(p.flag_reason)} · ${when(p.flagged_at)}` : "");
  const facts = el("p", {}, `${t("c_thNow")}: ${p.current ? placeText(p.current.device_id, p.current.slot) : t("c_inNoSlot")}`
    + ` · ${t("c_thMaxTemp")}: ${tempText(p.max_temp_c)} · ${t("c_thMaxRise")}: ${rise}`);
  const clear = p.flagged
    ? el("button", { class: "act clear-flag", type: "button", onclick: () => clearFlag(p.serial) }, t("c_clearFlag"))
    : null;
  $("#battery").replaceChildren(...[head, facts, clear,
    el("h4", {}, t("c_events")),
    table(["c_thKind", "c_thWhere", "c_thOpened", "c_thAlert"], p.events.map((e) => el("tr", { "data-kind": e.kind },
      el("td", {}, reasonWord(e.kind)), el("td", {}, placeText(e.device_id, e.slot)), el("td", {}, when(e.at)),
      el("td", {}, e.alert_id ? el("a", { href: `#alert-${e.alert_id}` }, t("c_alertN", { n: e.alert_id })) : "—")))),
    el("h4", {}, t("c_stays")),
    table(["c_thWhere", "c_thFrom", "c_thTo"], p.stays.map((s) => el("tr", { "data-stay": `${s.device_id}/${s.slot}` },
      el("td", {}, placeText(s.device_id, s.slot)), el("td", {}, when(s.since)),
      el("td", {}, s.until ? when(s.until) : t("c_stillThere"))))),
    p.clearances.length ? el("h4", {}, t("c_clearances")) : null,
    p.clearances.length ? table(["c_thOpened", "c_thBy", "c_thNote", "c_thReason"], p.clearances.map((c) => el("tr", {},
      el("td", {}, when(c.at)), el("td", {}, c.by), el("td", {}, c.note), el("td", {}, reasonWord(c.flag_reason))))) : null,
  ].filter((node) => node !== null));
  document.body.dataset.battery = p.serial;
}

async function clearFlag(serial) {
  const note = prompt(t("c_clearPrompt"));
  if (!note) return;
  await api(`/v1/batteries/${encodeURIComponent(serial)}/clear`, { method: "POST", body: JSON.stringify({ note }) });
  await Promise.all([showBattery(serial), loadFlagged()]);
}

function batteriesRefresh() {
  loadFlagged();
  const shown = $("#battery h3");
  if (shown) showBattery(shown.dataset.serial);
}

$("#battery-form").addEventListener("submit", (ev) => { ev.preventDefault(); showBattery($("#battery-serial").value.trim()); });
$("#login").addEventListener("submit", () => loadFlagged());
$("#logout").addEventListener("click", () => { $("#battery").replaceChildren(); loadFlagged(); });
$("#lang").addEventListener("click", batteriesRefresh);
loadFlagged();
setInterval(loadFlagged, 15000);
