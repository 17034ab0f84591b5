// Remote commands in the console (contract v1.1): buttons per port/slot and for the device
// in the device view, the device's commands with their states (polled while one is open),
// and the most recent commands of every device. Texts in i18n.js's style, Chinese first.
"use strict";
Object.assign(TEXTS.zh, {
  cmdTitle: "远程指令", cmdRecent: "最近的指令", cmdNone: "还没有指令", cmdUnit: "口/仓",
  cmdState: "状态", cmdType: "指令", cmdAsked: "谁、何时", cmdResult: "设备回复",
  cmd_disable_port: "停用此口", cmd_enable_port: "启用此口", cmd_disable_slot: "停用此仓",
  cmd_enable_slot: "启用此仓", cmd_lock_battery: "锁定电池", cmd_unlock_battery: "释放电池",
  cmd_open_door: "开柜门", cmd_reboot: "重启", cmd_resend: "重发状态",
  cmdSt_pending: "待发送", cmdSt_sent: "已发出", cmdSt_done: "已完成", cmdSt_rejected: "被拒绝",
  cmdSt_failed: "失败", cmdSt_expired: "已过期", cmdPort: "口 {n}", cmdSlot: "仓 {n}",
  cmdSendFailed: "发送失败：{e}", cmdConfirm: "确定对 {id} 执行“{what}”？",
  cmdLate: "过期后才回复：{r}", cmdSends: "发送 {n} 次",
});
Object.assign(TEXTS.en, {
  cmdTitle: "Remote commands", cmdRecent: "Recent commands", cmdNone: "no commands yet",
  cmdUnit: "port/slot", cmdState: "state", cmdType: "command", cmdAsked: "who, when",
  cmdResult: "device's answer",
  cmd_disable_port: "Disable", cmd_enable_port: "Enable", cmd_disable_slot: "Disable",
  cmd_enable_slot: "Enable", cmd_lock_battery: "Hold battery", cmd_unlock_battery: "Release battery",
  cmd_open_door: "Open door", cmd_reboot: "Reboot", cmd_resend: "Resend state",
  cmdSt_pending: "pending", cmdSt_sent: "sent", cmdSt_done: "done", cmdSt_rejected: "rejected",
  cmdSt_failed: "failed", cmdSt_expired: "expired", cmdPort: "port {n}", cmdSlot: "slot {n}",
  cmdSendFailed: "Could not send: {e}", cmdConfirm: "{what} on {id}?",
  cmdLate: "answered after it expired: {r}", cmdSends: "sent {n}×",
});

const OPEN_STATES = new Set(["pending", "sent"]);
const CONFIRM = new Set(["reboot", "open_door"]);
let commandsDevice = null;
let commandsTimer = null;
let commandsOpen = false;  // the device had an open command at the last look

function cmdButton(device, type, unit) {
  const label = t(`cmd_${type}`);
  return el("button", { class: "act cmd", type: "button", "data-cmd": type, "data-unit": unit ?? null,
    onclick: () => sendCommand(device, type, unit, label) }, label);
}

async function sendCommand(device, type, unit, label) {
  if (CONFIRM.has(type) && !confirm(t("cmdConfirm", { id: device, what: label }))) return;
  const body = { type };
  if (unit !== undefined && unit !== null) body[type.endsWith("_port") ? "port" : "slot"] = unit;
  try {
    await api(`/v1/devices/${encodeURIComponent(device)}/commands`, { method: "POST", body: JSON.stringify(body) });
  } catch (e) {
    alert(t("cmdSendFailed", { e: e.message }));
  }
  commandsOpen = true;
  await loadDeviceCommands(device);
}

function unitLabel(c) {
  if (c.port) return t("cmdPort", { n: c.port });
  if (c.slot) return t("cmdSlot", { n: c.slot });
  return "—";
}

function commandRow(c, withDevice) {
  return el("tr", { "data-command-id": c.id, "data-state": c.state, "data-type": c.type },
    withDevice ? el("td", {}, el("a", { href: "#", onclick: (ev) => { ev.preventDefault(); showDevice(c.device); } }, c.device)) : null,
    el("td", {}, t(`cmd_${c.type}`), el("div", { class: "hint mono" }, c.type)),
    el("td", {}, unitLabel(c)),
    el("td", { class: `cmd-state ${OPEN_STATES.has(c.state) ? "" : c.state === "done" ? "" : "stale"}` },
      t(`cmdSt_${c.state}`), el("div", { class: "hint" }, t("cmdSends", { n: c.sends }))),
    el("td", {}, c.requested_by, el("div", { class: "hint" }, when(c.requested_at))),
    el("td", {}, c.result ? `${c.result}${c.info ? ": " + c.info : ""}` : "—",
      c.late_result ? el("div", { class: "hint" }, t("cmdLate", { r: `${c.late_result}${c.late_info ? ": " + c.late_info : ""}` })) : null));
}

function commandTable(id, commands, withDevice) {
  const head = [withDevice ? "device" : null, t("cmdType"), t("cmdUnit"), t("cmdState"), t("cmdAsked"), t("cmdResult")];
  const rows = commands.length ? commands.map((c) => commandRow(c, withDevice))
    : [el("tr", {}, el("td", { colspan: head.filter(Boolean).length, class: "hint" }, t("cmdNone")))];
  return el("table", { id }, el("thead", {}, el("tr", {}, head.filter(Boolean).map((h) => el("th", {}, h)))), el("tbody", {}, rows));
}

// The device view calls this with the device it shows (console.js showDevice).
function showCommands(id, dev) {
  commandsDevice = id;
  const box = document.getElementById("device-commands");
  if (!box) return;
  box.replaceChildren(
    el("h3", {}, t("cmdTitle")),
    el("div", { class: "row", id: "device-command-buttons" }),
    el("table", { id: "device-units" }),
    el("div", { id: "device-commands-list" }));
  showUnits(id, dev);
  loadDeviceCommands(id);
}

function showUnits(id, dev) {
  const pile = dev.kind === "pile";
  const units = (pile ? dev.ports : dev.slots) || [];
  const unitRows = units.map((u) => {
    const off = u.state === "disabled";
    const buttons = pile
      ? [cmdButton(id, off ? "enable_port" : "disable_port", u.n)]
      : [cmdButton(id, off ? "enable_slot" : "disable_slot", u.n),
         u.state === "reserved" ? cmdButton(id, "unlock_battery", u.n) : cmdButton(id, "lock_battery", u.n)];
    return el("tr", { "data-unit": u.n, "data-state": u.state },
      el("td", {}, pile ? t("cmdPort", { n: u.n }) : t("cmdSlot", { n: u.n })),
      el("td", {}, t(`state_${u.state}`), el("div", { class: "hint" }, u.state)),
      el("td", {}, buttons));
  });
  const device = [cmdButton(id, "resend"), cmdButton(id, "reboot")];
  if (!pile) device.unshift(cmdButton(id, "open_door"));
  document.getElementById("device-command-buttons").replaceChildren(...device);
  document.getElementById("device-units").replaceChildren(el("tbody", {}, unitRows));
}

// After a command ended: the device's ports/slots again, past the browser's cache (the
// status showing the effect follows the answer, so twice).
async function refreshUnits(id) {
  for (const wait of [300, 1500]) {
    await new Promise((resolve) => setTimeout(resolve, wait));
    if (id !== commandsDevice) return;
    const response = await fetch(`/v1/devices/${encodeURIComponent(id)}`, { cache: "no-cache" });
    if (response.ok && id === commandsDevice) showUnits(id, await response.json());
  }
}

async function loadDeviceCommands(id) {
  if (id !== commandsDevice) return;
  clearTimeout(commandsTimer);
  let data;
  try {
    data = await api(`/v1/devices/${encodeURIComponent(id)}/commands?limit=20`);
  } catch (e) {
    const list = document.getElementById("device-commands-list");
    if (list) list.replaceChildren(el("p", { class: "stale" }, e.message));
    return;
  }
  const list = document.getElementById("device-commands-list");
  if (!list || id !== commandsDevice) return;
  list.replaceChildren(commandTable("device-commands-table", data.commands, false));
  const open = data.commands.some((c) => OPEN_STATES.has(c.state));
  if (open) {
    commandsOpen = true;
    commandsTimer = setTimeout(() => loadDeviceCommands(id), 1000);
  } else if (commandsOpen) {
    commandsOpen = false;
    loadRecentCommands();
    refreshUnits(id);
  }
}

async function loadRecentCommands() {
  const box = document.getElementById("commands");
  if (!box) return;
  try {
    const data = await api("/v1/commands?limit=30");
    box.replaceChildren(commandTable("recent-commands", data.commands, true));
  } catch (e) {
    box.replaceChildren(el("p", { class: "stale" }, e.message));
  }
}

loadRecentCommands();
setInterval(loadRecentCommands, 15000);
