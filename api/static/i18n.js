// Texts of the rider page and the console: Chinese first, English on request.
"use strict";
const TEXTS = {
  zh: {
    title: "骑手充换电", locate: "◎ 用我的位置", tapHint: "或在地图上点一下你所在的位置",
    kindAll: "全部", kindPile: "充电", kindCabinet: "换电", arrive: "到达",
    arriveNow: "现在", arrive5: "5 分钟后", arrive10: "10 分钟后", arrive20: "20 分钟后",
    back: "← 返回", bestTime: "什么时候来最好", report: "⚠ 报告问题",
    reportWhat: "哪台设备", reportUnit: "第几个口/仓（可不填）", reportCategory: "什么问题",
    reportText: "说明", reportSend: "提交", catNotWorking: "不能用", catDamage: "损坏",
    catBlocked: "被占用/堵住", catSmoke: "冒烟", catFire: "起火", catHeat: "发烫",
    catWater: "进水", catOther: "其他", foot: "数据来自设备实时上报；离线设备不计入可用数量。",
    console: "运维", portsFree: "空闲充电口", batteriesReady: "满电电池", of: "共",
    updated: "{age}前更新", stale: "离线", lastKnown: "最后已知", live: "实时更新中",
    liveLost: "实时连接中断，正在重连…", youAreHere: "你在这里", km: "公里", m: "米",
    nextReady: "下一块满电约 {t}", nextFree: "约 {t} 后有空口", none: "—",
    pile: "充电桩", cabinet: "换电柜", offline: "离线", online: "在线",
    hours: "营业时间", address: "地址", chance: "到达时还有的把握 {p}%",
    wholeStation: "整个站点", reportSent: "已提交，谢谢！编号 #{id}", reportFailed: "提交失败：{e}",
    samples: "根据 {days} 天、{n} 个采样", noHistory: "历史数据还不够", portsAxis: "空闲口",
    readyAxis: "满电", sec: "{n} 秒", min: "{n} 分钟", hour: "{n} 小时", day: "{n} 天",
    noStations: "附近没有符合条件的站点", state_available: "空闲", state_charging: "充电中",
    state_finished: "已充满待拔", state_reserved: "已预约", state_faulted: "故障",
    state_disabled: "停用", state_empty: "空仓", state_ready: "满电",
    inTime: "{t}后", dueNow: "现在",
  },
  en: {
    title: "Rider charging & swaps", locate: "◎ Use my location",
    tapHint: "or tap the map where you are", kindAll: "All", kindPile: "Charge",
    kindCabinet: "Swap", arrive: "Arriving", arriveNow: "now", arrive5: "in 5 min",
    arrive10: "in 10 min", arrive20: "in 20 min", back: "← Back", bestTime: "Best time to come",
    report: "⚠ Report a problem", reportWhat: "Which device",
    reportUnit: "Port/slot number (optional)", reportCategory: "What is wrong",
    reportText: "Details", reportSend: "Send", catNotWorking: "Not working", catDamage: "Damaged",
    catBlocked: "Blocked", catSmoke: "Smoke", catFire: "Fire", catHeat: "Too hot",
    catWater: "Water", catOther: "Other",
    foot: "Live data from the devices; offline devices never count as available.",
    console: "Maintenance", portsFree: "free ports", batteriesReady: "ready batteries", of: "of",
    updated: "updated {age} ago", stale: "offline", lastKnown: "last known", live: "live",
    liveLost: "live updates lost, reconnecting…", youAreHere: "You are here", km: "km", m: "m",
    nextReady: "next ready in ~{t}", nextFree: "a port frees in ~{t}", none: "—",
    pile: "Charging pile", cabinet: "Swap cabinet", offline: "offline", online: "online",
    hours: "Hours", address: "Address", chance: "{p}% chance it is still there",
    wholeStation: "Whole station", reportSent: "Sent, thank you! Ref #{id}",
    reportFailed: "Could not send: {e}", samples: "from {days} day(s), {n} samples",
    noHistory: "not enough history yet", portsAxis: "free ports", readyAxis: "ready",
    sec: "{n} s", min: "{n} min", hour: "{n} h", day: "{n} d",
    noStations: "No matching station nearby", state_available: "free",
    state_charging: "charging", state_finished: "done, plugged", state_reserved: "reserved",
    state_faulted: "fault", state_disabled: "disabled", state_empty: "empty",
    state_ready: "ready", inTime: "in {t}", dueNow: "now",
  },
};
let LANG = localStorage.getItem("cw-lang") || "zh";

function t(key, vars) {
  let text = (TEXTS[LANG] && TEXTS[LANG][key]) || TEXTS.zh[key] || key;
  for (const [k, v] of Object.entries(vars || {})) text = text.replace("{" + k + "}", v);
  return text;
}

function applyTexts(root) {
  document.documentElement.lang = LANG === "zh" ? "zh-CN" : "en";
  for (const el of (root || document).querySelectorAll("[data-i18n]")) {
    el.textContent = t(el.dataset.i18n);
  }
}

function ageText(seconds) {
  const s = Math.max(0, seconds);
  if (s < 60) return t("sec", { n: Math.floor(s) });
  if (s < 3600) return t("min", { n: Math.floor(s / 60) });
  if (s < 86400) return t("hour", { n: Math.floor(s / 3600) });
  return t("day", { n: Math.floor(s / 86400) });
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svgEl(tag, attrs, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
