// The stats: a compact line over the bottom of the restyled video (FPS in/out, latency p50/p95, whether
// the budget holds) and, behind its "details" button, a panel under the videos (counters, budget,
// adaptive level, glass-to-glass, per-stage latency). Neither covers the frame-ID stamp (top left).

import { g2g, latencyStats } from "./latency.js";

const $ = (id) => document.getElementById(id);
const DASH = "–";
// Stage latencies in pipeline order; `unet_<i>` (one per UNet call) sit between denoise and handoff.
// A stage the server reports that is not listed here is shown after these.
const STAGES = ["total", "round", "wait", "preprocess", "control", "encode", "denoise", "handoff", "decode", "postprocess"];
const COUNTERS = [["fps", "fps in / out"], ["browser", "browser fps"], ["drops", "drops"], ["skipped", "skipped"]];

const cells = {}; // counter name -> its cell
let lastTelemetry = null;

export const fmt = (x, decimals = 1) => (Number.isFinite(x) ? x.toFixed(decimals) : DASH);

export function buildStats() {
  const counters = document.querySelector("#stats-detail table.counters");
  for (const [key, label] of COUNTERS) {
    const row = counters.insertRow();
    row.insertCell().textContent = label;
    cells[key] = row.insertCell();
  }
  $("stats-more").addEventListener("click", () => showDetail($("stats-detail").hidden));
}

export function showDetail(open) {
  $("stats-detail").hidden = !open;
  $("stats-more").setAttribute("aria-expanded", String(open));
  $("stats-more").textContent = open ? "hide details" : "details";
  if (open) $("stats-detail").scrollIntoView({ block: "nearest" });
}

export function resetStats() {
  lastTelemetry = null;
  $("stat-fps").textContent = `${DASH}/${DASH} fps`;
  $("stat-latency").textContent = `p50/p95 ${DASH}/${DASH} ms`;
  $("stat-budget").hidden = true;
  for (const [key, cell] of Object.entries(cells)) cell.textContent = key === "fps" ? `${DASH} / ${DASH}` : DASH;
  for (const id of ["g2g", "budget", "adaptive"]) $(id).hidden = true;
  buildStageRows([]);
}

export function setBrowserFps(fps) {
  cells.browser.textContent = fmt(fps);
}

// Stage rows in pipeline order: the known stages, then unet_1..unet_k after denoise, then any others.
function stageOrder(names) {
  const rank = (name) => {
    const unet = /^unet_(\d+)$/.exec(name);
    if (unet) return [STAGES.indexOf("denoise") + 0.5, Number(unet[1])];
    const i = STAGES.indexOf(name);
    return [i < 0 ? STAGES.length : i, 0];
  };
  return [...names].sort((a, b) => {
    const [ra, sa] = rank(a), [rb, sb] = rank(b);
    return ra - rb || sa - sb || a.localeCompare(b);
  });
}

function buildStageRows(names, latency = {}) {
  const table = document.querySelector("#stats-detail table.detail");
  table.replaceChildren();
  const head = table.insertRow();
  head.className = "head";
  head.insertCell().textContent = "latency ms";
  head.insertCell().textContent = "p50 / p95";
  for (const name of stageOrder(names)) {
    const row = table.insertRow();
    if (name.startsWith("unet_")) row.className = "sub";
    row.insertCell().textContent = name;
    row.insertCell().textContent = `${fmt(latency[name]?.p50)} / ${fmt(latency[name]?.p95)}`;
  }
}

// The steps running now (the adaptive level's, else the session's): UNet rows above it are not live.
function runningSteps(t) {
  const steps = t.adaptive?.enabled !== false && Number.isFinite(t.adaptive?.steps) ? t.adaptive.steps : t.settings?.steps;
  return Number.isFinite(steps) ? steps : Infinity;
}

export function renderTelemetry(t) {
  lastTelemetry = t;
  $("stat-fps").textContent = `${fmt(t.fps_in)}/${fmt(t.fps_out)} fps`;
  cells.fps.textContent = `${fmt(t.fps_in)} / ${fmt(t.fps_out)}`;
  cells.drops.textContent = fmt(t.drops, 0);
  cells.skipped.textContent = fmt(t.skipped, 0);
  const latency = t.latency_ms && typeof t.latency_ms === "object" ? t.latency_ms : {};
  const steps = runningSteps(t);
  const live = Object.keys(latency).filter((name) => {
    const unet = /^unet_(\d+)$/.exec(name);
    return !unet || Number(unet[1]) <= steps;
  });
  buildStageRows(live, latency);
  renderLatency();
  renderBudget(t.budget);
  renderAdaptive(t.adaptive);
}

// The compact latency: glass-to-glass while measuring, else the model's time per frame.
function renderLatency() {
  const el = $("stat-latency");
  if (g2g.measuring) {
    const { p50, p95 } = latencyStats();
    el.textContent = `g2g ${fmt(p50, 0)}/${fmt(p95, 0)} ms`;
    el.title = "glass-to-glass latency, p50 / p95";
  } else {
    const total = lastTelemetry?.latency_ms?.total;
    el.textContent = `p50/p95 ${fmt(total?.p50, 0)}/${fmt(total?.p95, 0)} ms`;
    el.title = "model time per frame, p50 / p95";
  }
}

// "budget holds" / "budget over" in the compact line, "budget 41.7 ms: holds" in the details; hidden
// for a server without it.
function renderBudget(budget) {
  const known = Boolean(budget && typeof budget === "object");
  const verdict = !known ? DASH : budget.holds === true ? "holds" : budget.holds === false ? "over" : DASH;
  const title = known
    ? `p95 ${fmt(budget.p95_ms)} ms against ${fmt(budget.budget_ms)} ms for ${fmt(budget.target_fps, 0)} fps`
    : "";
  for (const [id, text] of [["stat-budget", `budget ${verdict}`], ["budget", `budget ${fmt(budget?.budget_ms)} ms: ${verdict}`]]) {
    const el = $(id);
    el.hidden = !known;
    el.textContent = text;
    el.title = title;
    el.classList.toggle("holds", known && budget.holds === true);
    el.classList.toggle("over", known && budget.holds === false);
  }
}

// "adaptive 4 steps, 256x256" and the newest change's reason; "adaptive off"; hidden for a server without it.
function renderAdaptive(adaptive) {
  const el = $("adaptive");
  el.hidden = !(adaptive && typeof adaptive === "object");
  if (el.hidden) return;
  if (adaptive.enabled === false) {
    el.textContent = "adaptive off";
    el.title = "";
    return;
  }
  const size = Number.isFinite(adaptive.width) && Number.isFinite(adaptive.height)
    ? `${adaptive.width}x${adaptive.height}` : DASH;
  const level = Number.isFinite(adaptive.level) && Number.isFinite(adaptive.levels)
    ? `level ${adaptive.level + 1} of ${adaptive.levels}; ` : "";
  const changes = Array.isArray(adaptive.changes) ? adaptive.changes : [];
  const last = changes[changes.length - 1];
  const head = document.createElement("div");
  const steps = adaptive.steps === 1 ? "1 step" : `${fmt(adaptive.steps, 0)} steps`;
  head.textContent = `adaptive ${steps}, ${size}`;
  el.replaceChildren(head);
  if (last?.reason) {
    const reason = document.createElement("div");
    reason.className = "reason";
    reason.textContent = Number.isFinite(last.at) ? `${fmt(last.at)} s: ${last.reason}` : String(last.reason);
    el.append(reason);
  }
  el.title = `${level}${changes.length ? `${changes.length} change(s) so far` : "no changes so far"}`;
}

export function renderG2G() {
  const el = $("g2g");
  el.hidden = !g2g.measuring;
  if (el.hidden) return;
  const { p50, p95 } = latencyStats();
  el.textContent = `glass-to-glass p50 ${fmt(p50, 0)} ms / p95 ${fmt(p95, 0)} ms`;
  el.title = `${g2g.latency.length} stamped frame(s) back of ${g2g.stampsSent} sent`;
  renderLatency();
}
