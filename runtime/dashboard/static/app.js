// The status page: polls the scheduler's JSON endpoints and renders them.
// No libraries, no network access beyond this server.
"use strict";

const POLL_MS = 500;
const WINDOW_S = 20;
const tasks = [];            // [key, prefix, worker, start, stop, ok]
let nextIndex = -1;
const colors = {};
const palette = ["#4c8df6", "#f5b14c", "#3dbb84", "#a86ef2", "#ef6f6c", "#2bb7c9", "#d9a02b",
                 "#7b8ff7", "#e0629e", "#6fae3e"];
let serverOffset = 0;        // server time - browser time, seconds

function colorOf(prefix) {
  if (!(prefix in colors)) colors[prefix] = palette[Object.keys(colors).length % palette.length];
  return colors[prefix];
}

function fmtBytes(n) {
  if (!n) return "0 B";
  const u = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : n.toFixed(0)) + " " + u[i];
}

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

async function getJSON(path) {
  const r = await fetch(path, { cache: "no-store" });
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

function renderIdentity(info) {
  serverOffset = info.time - Date.now() / 1000;
  document.getElementById("address").textContent = info.address;
  const t = info.tasks || {};
  const total = Object.values(t).reduce((a, b) => a + b, 0);
  const s = document.getElementById("summary");
  s.textContent = `${info.workers} workers · ${info.threads} threads · ${total} tasks · ` +
    `${info.completed} completed · ${info.erred} erred`;
  s.dataset.workers = info.workers;
  s.dataset.completed = info.completed;
}

function renderWorkers(rows) {
  const body = document.querySelector("#workers tbody");
  body.replaceChildren();
  for (const w of rows) {
    const tr = el("tr", { "data-address": w.address });
    const cells = [
      [w.name], [w.address], [w.status, "state-" + w.status], [w.nthreads, "num"],
      [w.cpu.toFixed(0) + " %", "num"], [fmtBytes(w.memory), "num"],
      [w.memory_limit ? fmtBytes(w.memory_limit) : "none", "num"], [w.processing, "num"],
      [w.executing, "num"], [w.in_memory, "num"], [fmtBytes(w.managed_bytes), "num"],
      [fmtBytes(w.spilled_bytes), "num"],
    ];
    for (const [text, cls] of cells) {
      const td = el("td", cls ? { class: cls } : {}, String(text));
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
  document.getElementById("nworkers").textContent = `(${rows.length})`;
  const mem = document.getElementById("memory");
  mem.replaceChildren();
  const max = Math.max(1, ...rows.map(w => w.memory_limit || w.memory));
  for (const w of rows) {
    const row = el("div", { class: "memrow" });
    row.appendChild(el("span", { class: "label", title: w.address }, w.name));
    const bar = el("div", { class: "bar" });
    const limit = w.memory_limit || max;
    const proc = el("span", { class: "proc" });
    proc.style.width = Math.min(100, 100 * w.memory / limit) + "%";
    const managed = el("span", { class: "mem" });
    managed.style.width = Math.min(100, 100 * w.managed_bytes / limit) + "%";
    bar.append(proc, managed);
    row.appendChild(bar);
    row.appendChild(el("span", { class: "muted" },
      `${fmtBytes(w.memory)} / ${w.memory_limit ? fmtBytes(w.memory_limit) : "no limit"}`));
    mem.appendChild(row);
  }
}

function renderProgress(byPrefix) {
  const body = document.querySelector("#progress tbody");
  body.replaceChildren();
  const names = Object.keys(byPrefix).sort();
  for (const p of names) {
    const c = byPrefix[p];
    const total = Object.values(c).reduce((a, b) => a + b, 0) || 1;
    const memory = c.memory || 0, erred = c.erred || 0, processing = c.processing || 0;
    const waiting = (c.waiting || 0) + (c.queued || 0) + (c["no-worker"] || 0) + (c.released || 0);
    const tr = el("tr", { "data-prefix": p });
    const name = el("td");
    name.appendChild(el("i", { style: `display:inline-block;width:10px;height:10px;margin-right:4px;background:${colorOf(p)}` }));
    name.appendChild(document.createTextNode(p));
    tr.appendChild(name);
    const bartd = el("td");
    const bar = el("div", { class: "bar", title: `${memory} of ${total} in memory` });
    const m = el("span", { class: "mem" }); m.style.width = (100 * memory / total) + "%";
    const pr = el("span", { class: "proc" });
    pr.style.left = (100 * memory / total) + "%"; pr.style.width = (100 * processing / total) + "%";
    const er = el("span", { class: "err" });
    er.style.left = (100 * (memory + processing) / total) + "%"; er.style.width = (100 * erred / total) + "%";
    bar.append(m, pr, er);
    bartd.appendChild(bar);
    tr.appendChild(bartd);
    for (const v of [memory, processing, waiting, erred]) tr.appendChild(el("td", { class: "num" }, String(v)));
    body.appendChild(tr);
  }
}

function renderStream() {
  const canvas = document.getElementById("stream");
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== w * dpr) { canvas.width = w * dpr; canvas.height = h * dpr; }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const now = Date.now() / 1000 + serverOffset;
  const t0 = now - WINDOW_S;
  // Lanes: a worker's tasks overlap when it has several threads; give each
  // overlapping task the first free lane of its worker.
  const workers = [...new Set(tasks.map(t => t[2]))].sort();
  const laneEnds = {};
  const placed = [];
  for (const t of tasks) {
    if (t[4] < t0) continue;
    const ends = laneEnds[t[2]] || (laneEnds[t[2]] = []);
    let lane = ends.findIndex(e => e <= t[3]);
    if (lane < 0) { lane = ends.length; ends.push(0); }
    ends[lane] = t[4];
    placed.push([t, lane]);
  }
  const rows = [];
  for (const wk of workers) for (let i = 0; i < Math.max(1, (laneEnds[wk] || []).length); i++) rows.push(wk + "#" + i);
  const rowH = Math.max(4, Math.min(24, (h - 20) / Math.max(1, rows.length)));
  const index = Object.fromEntries(rows.map((r, i) => [r, i]));
  const x = s => (s - t0) / WINDOW_S * w;
  for (const [t, lane] of placed) {
    const r = index[t[2] + "#" + lane];
    ctx.fillStyle = t[5] ? colorOf(t[1]) : "#111";
    ctx.fillRect(x(t[3]), r * rowH + 1, Math.max(1, x(t[4]) - x(t[3])), rowH - 2);
  }
  ctx.fillStyle = "#6b7280";
  ctx.font = "11px system-ui, sans-serif";
  for (let s = 0; s <= WINDOW_S; s += 5) ctx.fillText(`-${WINDOW_S - s}s`, Math.min(w - 28, x(t0 + s)), h - 4);
  const legend = document.getElementById("legend");
  legend.replaceChildren();
  for (const [p, c] of Object.entries(colors)) {
    const item = el("span");
    item.appendChild(el("i", { style: "background:" + c }));
    item.appendChild(document.createTextNode(p));
    legend.appendChild(item);
  }
  canvas.dataset.tasks = tasks.length;
}

async function pollStream() {
  const data = await getJSON("/json/task-stream.json?since=" + nextIndex);
  nextIndex = data.next;
  for (const t of data.tasks) tasks.push(t);
  const cutoff = Date.now() / 1000 + serverOffset - WINDOW_S - 5;
  let drop = 0;
  while (drop < tasks.length && tasks[drop][4] < cutoff) drop++;
  if (drop) tasks.splice(0, drop);
  if (tasks.length > 20000) tasks.splice(0, tasks.length - 20000);
  document.getElementById("stream").dataset.seen = nextIndex;
}

function renderProfile(data) {
  const div = document.getElementById("profile");
  const prefixes = Object.keys(data).sort((a, b) => data[b].count - data[a].count);
  if (!prefixes.length) { div.textContent = "no samples"; return; }
  div.replaceChildren();
  div.className = "";
  for (const p of prefixes.slice(0, 8)) {
    div.appendChild(el("h2", {}, `${p} — ${data[p].count} samples`));
    const t = el("table");
    for (const [fn, n] of data[p].functions.slice(0, 5)) {
      const tr = el("tr");
      tr.appendChild(el("td", { class: "num" }, (100 * n / data[p].count).toFixed(0) + " %"));
      tr.appendChild(el("td", {}, fn));
      t.appendChild(tr);
    }
    div.appendChild(t);
  }
}

let tick = 0;
async function poll() {
  try {
    const [info, workers, progress] = await Promise.all([
      getJSON("/json/identity.json"), getJSON("/json/workers.json"), getJSON("/json/progress.json")]);
    renderIdentity(info);
    renderWorkers(workers);
    renderProgress(progress);
    await pollStream();
    if (tick++ % 10 === 0) renderProfile(await getJSON("/json/profile.json"));
    document.getElementById("error").textContent = "";
    document.body.dataset.polls = tick;
  } catch (e) {
    document.getElementById("error").textContent = "scheduler unreachable: " + e.message;
  }
  renderStream();
  setTimeout(poll, POLL_MS);
}

document.getElementById("window").textContent = WINDOW_S;
poll();
