// Browser client of `stream`: camera -> WebRTC -> server (restyles each frame) -> video back.
// The page is the offerer; settings go on the `control` data channel, stats come on `telemetry`.
// With "Measure glass-to-glass latency" on, each camera frame is redrawn into a canvas with a frame-ID
// stamp in its top-left corner (stream/stamp.py describes the layout); the server copies the stamp into
// the processed frame and the page reads it back from the video it receives: one clock, both ends.

import { iceGatheringDone } from "./webrtc.js";

const $ = (id) => document.getElementById(id);

// [element id, settings key, decimals shown]
const SLIDERS = [
  ["strength", "strength", 2],
  ["guidance", "guidance_scale", 1],
  ["steps", "steps", 0],
  ["latent-feedback", "latent_feedback", 2],
];
// Stage latencies in pipeline order; `unet_<i>` (one per UNet call) sit between denoise and handoff.
// A stage the server reports that is not listed here is shown after these.
const STAGES = ["total", "wait", "preprocess", "encode", "denoise", "handoff", "decode", "postprocess"];
const DEFAULTS = {
  prompt: "", negative_prompt: "", strength: 0.5, guidance_scale: 1, steps: 4, seed: 0,
  latent_feedback: 0, width: 512, height: 512,
};
const TEXT_DELAY_MS = 300; // prompts are sent this long after typing stops
const SLIDER_DELAY_MS = 80; // coalesces a drag into a few messages
const ICE_CAP_MS = 3000;
const DASH = "–";
const KEEP_SAMPLES = 10000; // latency samples and received-frame times kept for window.streamApp
const STATS_WINDOW = 240; // latencyStats() covers the newest this many samples
const G2G_INTERVAL_MS = 333;

// ---- frame-ID stamp: the same layout as stream/stamp.py (encode and decode) ----

const STAMP_GRID = 4; // cells per side
const STAMP_CELL = 16; // px per cell side
const STAMP_PATCH = STAMP_GRID * STAMP_CELL; // px per patch side
const STAMP_ID_BITS = 12;
const STAMP_ID_MODULO = 1 << STAMP_ID_BITS;
const STAMP_INSET = STAMP_CELL / 4; // a read averages the cell's central (CELL - 2 * INSET)^2 px

function checkNibble(id) {
  return ~((id & 0xf) ^ ((id >> 4) & 0xf) ^ ((id >> 8) & 0xf)) & 0xf;
}

function encodeWord(id) {
  const n = ((id % STAMP_ID_MODULO) + STAMP_ID_MODULO) % STAMP_ID_MODULO;
  return n | (checkNibble(n) << STAMP_ID_BITS);
}

function decodeWord(word) {
  const id = word & (STAMP_ID_MODULO - 1);
  return word >> STAMP_ID_BITS === checkNibble(id) ? id : null;
}

// Draws `id` (mod 4096) into the top-left STAMP_PATCH px of a 2D context: bit k in cell k = row * 4 + col, white = 1.
function drawStamp(ctx, id) {
  const word = encodeWord(id);
  for (let k = 0; k < STAMP_GRID * STAMP_GRID; k++) {
    const row = Math.floor(k / STAMP_GRID), col = k % STAMP_GRID;
    ctx.fillStyle = (word >> k) & 1 ? "#fff" : "#000";
    ctx.fillRect(col * STAMP_CELL, row * STAMP_CELL, STAMP_CELL, STAMP_CELL);
  }
}

// The ID stamped in an ImageData (or any {data: RGBA bytes, width, height}), or null when there is none.
// A cell is white when the mean over its central 8x8 px of (R + G + B) / 3 is above 127.5.
function readStamp(image) {
  const { data, width, height } = image;
  if (!(width >= STAMP_PATCH && height >= STAMP_PATCH)) return null;
  const side = STAMP_CELL - 2 * STAMP_INSET;
  const threshold = 127.5 * 3 * side * side; // on the sum of R + G + B over the cell's centre
  let word = 0;
  for (let k = 0; k < STAMP_GRID * STAMP_GRID; k++) {
    const row = Math.floor(k / STAMP_GRID), col = k % STAMP_GRID;
    let sum = 0;
    for (let y = row * STAMP_CELL + STAMP_INSET; y < (row + 1) * STAMP_CELL - STAMP_INSET; y++) {
      let i = (y * width + col * STAMP_CELL + STAMP_INSET) * 4;
      for (let x = 0; x < side; x++, i += 4) sum += data[i] + data[i + 1] + data[i + 2];
    }
    if (sum > threshold) word |= 1 << k;
  }
  return decodeWord(word);
}

// Linear-interpolated percentile of ascending `sorted` (numpy's default), q in [0, 1].
function percentile(sorted, q) {
  if (!sorted.length) return null;
  const pos = (sorted.length - 1) * q;
  const lo = Math.floor(pos), hi = Math.ceil(pos);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
}

function pushBounded(list, item) {
  list.push(item);
  if (list.length > KEEP_SAMPLES) list.splice(0, list.length - KEEP_SAMPLES);
}

const state = {
  token: new URLSearchParams(location.search).get("token") || "",
  auth: false,
  server: { ...DEFAULTS }, // settings reported by /health
  edited: {}, // every key changed on this page; sent with each new offer
  unsent: {}, // changes made after the offer went out, before `control` opened
  inflight: [], // changes sent on `control`, oldest first, each awaiting its reply
  run: 0, // bumped by stop(); an older start() sees it and gives up
  pc: null,
  control: null,
  stream: null,
  session: "",
  statsTimer: 0,
  lastFrames: null,
  stamper: null, // the canvas that stamps camera frames, while this session measures latency
  sentSize: null, // {width, height} of the frames the stamper sends
};
// Glass-to-glass measurements, reset by each Start (window.streamApp exposes them).
const g2g = {
  sentAt: new Map(), // stamp ID -> performance.now() when drawn; taken out when first seen back
  latency: [], // {id, ms, t}: ms from stamping to the stamped frame showing in #output, t when it showed
  received: [], // performance.now() of every frame shown in #output
  stampsSent: 0,
  timer: 0,
};
const statCells = {};
const stageCells = {}; // stage name -> its cell in the latency table
const sendTimers = {};

// ---- status line and connection pill ----

function setStatus(message, kind = "info") {
  const el = $("status");
  el.textContent = message;
  el.dataset.kind = kind;
}

function setConnection(label) {
  const el = $("connection");
  el.textContent = label;
  el.dataset.state = label;
}

function setRunning(running) {
  $("start").disabled = running;
  $("stop").disabled = !running;
  $("latency-stamp").disabled = running; // read at Start
}

function errorMessage(err) {
  const byName = {
    NotAllowedError: "Camera permission was denied: allow the camera for this page and press Start again.",
    NotFoundError: "No camera was found.",
    NotReadableError: "The camera is busy (used by another application?).",
    OverconstrainedError: "The selected camera is not available: pick another one.",
  };
  return byName[err?.name] || err?.message || String(err);
}

// ---- settings: UI <-> values, sending ----

function applySettingsToUI(s) {
  $("prompt").value = s.prompt;
  $("negative-prompt").value = s.negative_prompt;
  for (const [id, key] of SLIDERS) {
    $(id).value = s[key];
    showSliderValue(id);
  }
  $("seed").value = s.seed;
}

function showSliderValue(id) {
  const decimals = SLIDERS.find(([sid]) => sid === id)[2];
  $(`${id}-value`).textContent = Number($(id).value).toFixed(decimals);
}

// Send `changes` now if the control channel is open; otherwise keep them for the next offer
// (or for the moment the channel opens). Returns whether they went out now.
function sendSettings(changes) {
  Object.assign(state.edited, changes);
  const channel = state.control;
  if (channel && channel.readyState === "open") {
    channel.send(JSON.stringify({ type: "settings", ...changes }));
    state.inflight.push(changes);
    return true;
  }
  if (state.pc) Object.assign(state.unsent, changes);
  return false;
}

function queueSetting(key, value, delay) {
  state.edited[key] = value; // a Start pressed within the delay still carries it
  clearTimeout(sendTimers[key]);
  sendTimers[key] = setTimeout(() => sendSettings({ [key]: value }), delay);
}

function bindControls() {
  $("prompt").addEventListener("input", (e) => queueSetting("prompt", e.target.value, TEXT_DELAY_MS));
  $("negative-prompt").addEventListener("input", (e) =>
    queueSetting("negative_prompt", e.target.value, TEXT_DELAY_MS));
  for (const [id, key] of SLIDERS) {
    $(id).addEventListener("input", (e) => {
      showSliderValue(id);
      const value = key === "steps" ? parseInt(e.target.value, 10) : Number(e.target.value);
      queueSetting(key, value, SLIDER_DELAY_MS);
    });
  }
  $("seed").addEventListener("input", (e) => {
    const text = e.target.value.trim();
    const seed = Number(text);
    if (text !== "" && Number.isSafeInteger(seed) && seed >= 0) queueSetting("seed", seed, TEXT_DELAY_MS);
  });
  $("seed-random").addEventListener("click", () => {
    const seed = Math.floor(Math.random() * 2 ** 31);
    $("seed").value = seed;
    queueSetting("seed", seed, 0);
  });
  $("token").addEventListener("input", (e) => { state.token = e.target.value.trim(); });
  $("token-row").addEventListener("submit", (e) => { e.preventDefault(); start(); });
  $("camera").addEventListener("change", switchCamera);
  $("start").addEventListener("click", () => start());
  $("stop").addEventListener("click", () => stop());
  $("stats").addEventListener("click", () => $("stats").classList.toggle("collapsed"));
}

function onControlMessage(data) {
  let msg;
  try { msg = JSON.parse(data); } catch { return; }
  const sent = state.inflight.shift() || {};
  if (msg?.type === "applied") {
    const parts = Object.entries(msg.settings || {}).map(([k, v]) =>
      (typeof v === "string" ? k : `${k} ${v}`));
    setStatus(`Applied: ${parts.join(", ") || "settings"}`, "ok");
  } else if (msg?.type === "error") {
    // Refused values are not carried into the next offer (the server would refuse that too).
    for (const [key, value] of Object.entries(sent)) if (state.edited[key] === value) delete state.edited[key];
    setStatus(`Server refused the change: ${msg.message}`, "error");
  }
}

// ---- stats overlay ----

// Two blocks: rates, counters and the glass-to-glass / budget / adaptive lines (always shown), and
// stage latencies (click the overlay to hide).
function buildStats() {
  const counters = document.createElement("table");
  counters.className = "counters";
  const rows = [["fps", "fps in / out"], ["browser", "browser fps"], ["drops", "drops"], ["skipped", "skipped"]];
  for (const [key, label] of rows) {
    const row = counters.insertRow();
    row.insertCell().textContent = label;
    statCells[key] = row.insertCell();
  }
  const summary = document.createElement("div");
  summary.className = "summary";
  const line = (id) => Object.assign(document.createElement("div"), { id, className: "line", hidden: true });
  summary.append(counters, line("g2g"), line("budget"), line("adaptive"));
  const latency = document.createElement("table");
  latency.className = "detail";
  $("stats").append(summary, latency);
  buildStageRows(STAGES);
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

function buildStageRows(names) {
  const table = document.querySelector("#stats table.detail");
  table.replaceChildren();
  for (const key of Object.keys(stageCells)) delete stageCells[key];
  const head = table.insertRow();
  head.className = "head";
  head.insertCell().textContent = "latency ms";
  head.insertCell().textContent = "p50 / p95";
  for (const name of stageOrder(names)) {
    const row = table.insertRow();
    if (name.startsWith("unet_")) row.className = "sub";
    row.insertCell().textContent = name;
    stageCells[name] = row.insertCell();
    stageCells[name].textContent = `${DASH} / ${DASH}`;
  }
}

function resetStats() {
  for (const [key, cell] of Object.entries(statCells)) cell.textContent = key === "fps" ? `${DASH} / ${DASH}` : DASH;
  buildStageRows(STAGES);
  for (const id of ["g2g", "budget", "adaptive"]) $(id).hidden = true;
}

const fmt = (x, decimals = 1) => (Number.isFinite(x) ? x.toFixed(decimals) : DASH);

function renderTelemetry(t) {
  statCells.fps.textContent = `${fmt(t.fps_in)} / ${fmt(t.fps_out)}`;
  const latency = t.latency_ms && typeof t.latency_ms === "object" ? t.latency_ms : {};
  const names = new Set([...STAGES, ...Object.keys(latency)]);
  const shown = Object.keys(stageCells);
  if (names.size !== shown.length || shown.some((name) => !names.has(name))) buildStageRows(names);
  for (const [stage, cell] of Object.entries(stageCells)) {
    const l = latency[stage];
    cell.textContent = `${fmt(l?.p50)} / ${fmt(l?.p95)}`;
  }
  statCells.drops.textContent = fmt(t.drops, 0);
  statCells.skipped.textContent = fmt(t.skipped, 0);
  renderBudget(t.budget);
  renderAdaptive(t.adaptive);
}

// "budget 41.7 ms: holds" (class "holds") or "...: over" (class "over"); hidden for a server without it.
function renderBudget(budget) {
  const el = $("budget");
  el.hidden = !(budget && typeof budget === "object");
  if (el.hidden) return;
  const verdict = budget.holds === true ? "holds" : budget.holds === false ? "over" : DASH;
  el.textContent = `budget ${fmt(budget.budget_ms)} ms: ${verdict}`;
  el.classList.toggle("holds", budget.holds === true);
  el.classList.toggle("over", budget.holds === false);
  el.title = `p95 ${fmt(budget.p95_ms)} ms against ${fmt(budget.budget_ms)} ms for ${fmt(budget.target_fps, 0)} fps`;
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

function renderG2G() {
  const el = $("g2g");
  el.hidden = !state.stamper;
  if (el.hidden) return;
  const { p50, p95 } = latencyStats();
  el.textContent = `glass-to-glass p50 ${fmt(p50, 0)} ms / p95 ${fmt(p95, 0)} ms`;
  el.title = `${g2g.latency.length} stamped frame(s) back of ${g2g.stampsSent} sent`;
}

// Percentiles of the newest STATS_WINDOW glass-to-glass samples (null when there are none).
function latencyStats() {
  const sorted = g2g.latency.slice(-STATS_WINDOW).map((s) => s.ms).sort((a, b) => a - b);
  return {
    count: sorted.length,
    p50: percentile(sorted, 0.5),
    p95: percentile(sorted, 0.95),
    p99: percentile(sorted, 0.99),
  };
}

// Frames the browser itself decoded per second, from the inbound video RTP stats.
async function pollBrowserFps(pc) {
  let report;
  try { report = await pc.getStats(); } catch { return; }
  if (pc !== state.pc) return;
  for (const r of report.values()) {
    if (r.type !== "inbound-rtp" || (r.kind ?? r.mediaType) !== "video" || r.framesDecoded === undefined) continue;
    const prev = state.lastFrames;
    if (prev && r.timestamp > prev.timestamp) {
      const fps = ((r.framesDecoded - prev.frames) * 1000) / (r.timestamp - prev.timestamp);
      statCells.browser.textContent = fmt(fps);
    }
    state.lastFrames = { frames: r.framesDecoded, timestamp: r.timestamp };
    return;
  }
}

// ---- cameras and video elements ----

async function openCamera(deviceId) {
  if (!navigator.mediaDevices?.getUserMedia) {
    throw new Error("The camera needs a secure page: open it over https:// or on http://localhost.");
  }
  const { width, height } = state.server;
  const video = { width: { ideal: width }, height: { ideal: height }, frameRate: { ideal: 24 } };
  if (deviceId) video.deviceId = { exact: deviceId };
  return navigator.mediaDevices.getUserMedia({ video, audio: false });
}

async function refreshCameras(selectedId) {
  if (!navigator.mediaDevices?.enumerateDevices) return;
  const select = $("camera");
  const keep = selectedId ?? select.value;
  const devices = await navigator.mediaDevices.enumerateDevices();
  const options = [new Option("Default camera", "")];
  devices
    .filter((d) => d.kind === "videoinput" && d.deviceId)
    .forEach((d, i) => options.push(new Option(d.label || `Camera ${i + 1}`, d.deviceId)));
  select.replaceChildren(...options);
  select.value = options.some((o) => o.value === keep) ? keep : "";
}

function stopTracks(stream) {
  stream?.getTracks().forEach((t) => t.stop());
}

function showVideo(video, stream) {
  video.srcObject = stream;
  video.play().catch(() => {}); // autoplay may wait for metadata; "interrupted" rejections are harmless
}

function clearVideo(video) {
  video.srcObject = null;
  video.parentElement.classList.remove("live");
}

function setAspect(video, width, height) {
  if (width > 0 && height > 0) video.parentElement.style.aspectRatio = `${width} / ${height}`;
}

function bindVideo(video) {
  const fit = () => setAspect(video, video.videoWidth, video.videoHeight);
  video.addEventListener("loadedmetadata", () => { fit(); video.play().catch(() => {}); });
  video.addEventListener("resize", fit);
  video.addEventListener("playing", () => video.parentElement.classList.add("live"));
}

// Calls `onFrame(now)` once per new frame of `video` until the returned function is called:
// requestVideoFrameCallback where there is one, else every animation frame (that shows a new frame
// when the browser counts them).
function everyVideoFrame(video, onFrame) {
  let handle = 0;
  let stopped = false;
  if ("requestVideoFrameCallback" in HTMLVideoElement.prototype) {
    const tick = (now, meta) => {
      if (stopped) return;
      handle = video.requestVideoFrameCallback(tick);
      onFrame(now, meta);
    };
    handle = video.requestVideoFrameCallback(tick);
    return () => { stopped = true; video.cancelVideoFrameCallback(handle); };
  }
  let lastCount = -1;
  const tick = (now) => {
    if (stopped) return;
    handle = requestAnimationFrame(tick);
    if (video.readyState < 2) return;
    const count = video.getVideoPlaybackQuality?.().totalVideoFrames;
    if (count !== undefined && count > 0 && count === lastCount) return;
    lastCount = count ?? -1;
    onFrame(now, null);
  };
  handle = requestAnimationFrame(tick);
  return () => { stopped = true; cancelAnimationFrame(handle); };
}

// Redraws each new camera frame shown in `video` into a canvas of the camera's size with the next
// frame ID stamped in, and sends exactly that frame on the returned track.
function startStamper(video) {
  const canvas = document.createElement("canvas");
  const ctx = canvas.getContext("2d", { alpha: false });
  const track = canvas.captureStream(0).getVideoTracks()[0];
  let next = 1;
  const stopFrames = everyVideoFrame(video, (now, meta) => {
    const { videoWidth: width, videoHeight: height } = video;
    if (!(width >= STAMP_PATCH && height >= STAMP_PATCH) || track.readyState !== "live") return;
    if (canvas.width !== width || canvas.height !== height) Object.assign(canvas, { width, height });
    ctx.drawImage(video, 0, 0, width, height);
    const id = next;
    next = (next + 1) % STAMP_ID_MODULO;
    drawStamp(ctx, id);
    // The camera's capture time when the browser gives it (same clock), else now: glass-to-glass
    // then runs from capture to the processed frame's expected display.
    const captured = meta?.captureTime;
    g2g.sentAt.set(id, captured > 0 && captured <= performance.now() ? captured : performance.now());
    track.requestFrame();
    g2g.stampsSent++;
    state.sentSize = { width, height };
  });
  return { track, stop: () => { stopFrames(); track.stop(); } };
}

// Every frame shown in #output: its time, and (while measuring) the stamp it carries.
function watchOutput(video) {
  const patch = document.createElement("canvas");
  patch.width = patch.height = STAMP_PATCH;
  const ctx = patch.getContext("2d", { willReadFrequently: true });
  everyVideoFrame(video, (now, meta) => {
    // When the frame is expected on screen (rVFC's expectedDisplayTime), else when it was handed over.
    const shown = meta?.expectedDisplayTime ?? now;
    pushBounded(g2g.received, shown);
    const sent = state.sentSize;
    if (!state.stamper || !sent || !video.videoWidth || !video.videoHeight) return;
    // The patch is STAMP_PATCH px of the sent frame: scale by how the frame was resized on the way.
    const sx = video.videoWidth / sent.width, sy = video.videoHeight / sent.height;
    ctx.drawImage(video, 0, 0, STAMP_PATCH * sx, STAMP_PATCH * sy, 0, 0, STAMP_PATCH, STAMP_PATCH);
    const id = readStamp(ctx.getImageData(0, 0, STAMP_PATCH, STAMP_PATCH));
    if (id === null || !g2g.sentAt.has(id)) return;
    const ms = shown - g2g.sentAt.get(id);
    g2g.sentAt.delete(id); // first sighting only; the ID is stamped again 4096 frames later
    pushBounded(g2g.latency, { id, ms, t: shown });
  });
}

async function switchCamera() {
  const pc = state.pc;
  if (!pc || !state.stream) return; // not running: the choice is used at the next Start
  const run = state.run;
  try {
    const stream = await openCamera($("camera").value);
    if (run !== state.run) return stopTracks(stream);
    // While stamping, the sender's track is the stamper's canvas, which draws whatever #input shows.
    const sender = state.stamper ? null : pc.getSenders().find((s) => s.track?.kind === "video");
    await sender?.replaceTrack(stream.getVideoTracks()[0]);
    if (run !== state.run) return stopTracks(stream);
    stopTracks(state.stream);
    state.stream = stream;
    showVideo($("input"), stream);
  } catch (err) {
    setStatus(`Could not switch the camera: ${errorMessage(err)}`, "error");
  }
}

// ---- WebRTC session ----

async function postOffer(body) {
  const headers = { "Content-Type": "application/json" };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  const res = await fetch("/offer", { method: "POST", headers, body: JSON.stringify(body) });
  let data = null;
  try { data = await res.json(); } catch { /* not JSON: use the HTTP status */ }
  if (!res.ok) {
    if (res.status === 401) $("token-row").hidden = false;
    throw new Error(`${data?.error || res.statusText || "request failed"} (HTTP ${res.status})`);
  }
  if (!data?.sdp) throw new Error("The server's answer has no SDP.");
  return data;
}

function wireChannels(control, telemetry) {
  control.onopen = () => {
    if (control !== state.control) return;
    const changes = state.unsent;
    state.unsent = {};
    if (Object.keys(changes).length) sendSettings(changes);
  };
  control.onmessage = (e) => { if (control === state.control) onControlMessage(e.data); };
  control.onclose = () => {
    if (control === state.control) stop("The server ended the session. Press Start to try again.", "error");
  };
  telemetry.onmessage = (e) => {
    let msg;
    try { msg = JSON.parse(e.data); } catch { return; }
    if (msg?.type === "telemetry" && telemetry.readyState === "open") renderTelemetry(msg);
  };
}

function onConnectionState(pc) {
  if (pc !== state.pc) return;
  const s = pc.connectionState;
  setConnection(s);
  if (s === "connected") setStatus(`Connected (session ${state.session}).`, "ok");
  else if (s === "disconnected") setStatus("Connection interrupted; waiting for it to recover…", "warn");
  else if (s === "failed" || s === "closed") stop(`Connection ${s}. Press Start to try again.`, "error");
}

async function start() {
  if (state.pc || state.stream) return;
  if (state.auth && !state.token) {
    $("token-row").hidden = false;
    $("token").focus();
    setStatus("This server needs an access token: paste it above, then press Start.", "warn");
    return;
  }
  const run = ++state.run;
  const stale = () => run !== state.run;
  const stamping = $("latency-stamp").checked;
  setRunning(true);
  setConnection("connecting");
  try {
    // 1. camera
    setStatus("Opening the camera…");
    const stream = await openCamera($("camera").value);
    if (stale()) return stopTracks(stream);
    state.stream = stream;
    showVideo($("input"), stream);
    const track = stream.getVideoTracks()[0];
    refreshCameras(track.getSettings().deviceId).catch(() => {}); // labels appear after permission
    resetLatency();
    if (stamping) {
      state.stamper = startStamper($("input"));
      g2g.timer = setInterval(renderG2G, G2G_INTERVAL_MS);
      renderG2G();
    }

    // 2. peer connection: one sendrecv video transceiver, two data channels, then the offer
    const pc = new RTCPeerConnection({ iceServers: state.iceServers || [] });
    state.pc = pc;
    pc.onconnectionstatechange = () => onConnectionState(pc);
    pc.ontrack = (e) => {
      if (e.track.kind !== "video") return;
      lowLatency(e.receiver);
      showVideo($("output"), e.streams[0] || new MediaStream([e.track]));
    };
    const { sender } = pc.addTransceiver(state.stamper?.track || track, { direction: "sendrecv" });
    state.control = pc.createDataChannel("control", { ordered: true });
    wireChannels(state.control, pc.createDataChannel("telemetry", { ordered: true }));
    setStatus("Connecting to the server…");
    await pc.setLocalDescription(await pc.createOffer());
    await iceGatheringDone(pc, ICE_CAP_MS);
    if (stale()) return;

    // 3. signaling: the full local description (all candidates) plus the settings changed so far
    const body = { sdp: pc.localDescription.sdp, type: pc.localDescription.type };
    if (Object.keys(state.edited).length) body.settings = { ...state.edited };
    if (state.stamper) body.stamp = true; // the server copies each input frame's stamp into its output
    state.unsent = {};
    const answer = await postOffer(body);
    if (stale()) return;
    await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
    state.session = answer.session || "";
    if (state.stamper) await keepResolution(sender);
    if (stale()) return;
    setStatus(`Session ${state.session} negotiated; waiting for video…`);
    state.statsTimer = setInterval(() => pollBrowserFps(pc), 1000);
  } catch (err) {
    if (!stale()) stop(`Could not start: ${errorMessage(err)}`, "error");
  }
}

// A stamp read back must line up with the cells drawn: ask the encoder to drop frames, not pixels.
async function keepResolution(sender) {
  try {
    const params = sender.getParameters();
    params.degradationPreference = "maintain-resolution";
    await sender.setParameters(params);
  } catch { /* not supported here: a downscale is still read back, scaled */ }
}

function resetLatency() {
  g2g.sentAt.clear();
  g2g.latency = [];
  g2g.received = [];
  g2g.stampsSent = 0;
  state.sentSize = null;
}

function stop(message = "Stopped. Press Start to go again.", kind = "info") {
  state.run++;
  clearInterval(state.statsTimer);
  clearInterval(g2g.timer);
  state.stamper?.stop();
  state.stamper = null;
  const pc = state.pc;
  state.pc = null;
  state.control = null;
  state.unsent = {};
  state.inflight = [];
  state.session = "";
  state.lastFrames = null;
  if (pc) {
    pc.onconnectionstatechange = null;
    pc.ontrack = null;
    pc.close();
  }
  stopTracks(state.stream);
  state.stream = null;
  clearVideo($("input"));
  clearVideo($("output"));
  resetStats();
  setRunning(false);
  setConnection("idle");
  setStatus(message, kind);
}

// ---- startup ----

async function loadHealth() {
  try {
    const res = await fetch("/health", { cache: "no-store" });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const health = await res.json();
    state.server = { ...DEFAULTS, ...(health.settings || {}) };
    state.auth = Boolean(health.auth);
    state.iceServers = Array.isArray(health.ice_servers) ? health.ice_servers : [];
    $("placeholder-banner").hidden = !health.placeholder;
    $("token-row").hidden = !(state.auth && !state.token);
    $("server-info").textContent = `model ${health.model}`;
  } catch (err) {
    $("server-info").textContent = "server unreachable";
    setStatus(`Cannot reach the server (/health): ${errorMessage(err)}`, "error");
  }
  applySettingsToUI({ ...state.server, ...state.edited });
  for (const id of ["input", "output"]) setAspect($(id), state.server.width, state.server.height);
}

function init() {
  buildStats();
  resetStats();
  applySettingsToUI(DEFAULTS);
  bindControls();
  bindVideo($("input"));
  bindVideo($("output"));
  watchOutput($("output"));
  setRunning(false);
  navigator.mediaDevices?.addEventListener?.("devicechange", () => refreshCameras().catch(() => {}));
  refreshCameras().catch(() => {});
  window.addEventListener("pagehide", () => { if (state.pc || state.stream) stop(); });
  loadHealth();
}

window.streamApp = {
  get pc() { return state.pc; },
  start,
  stop,
  sendSettings,
  // glass-to-glass latency (with "Measure glass-to-glass latency" on; reset by each Start)
  get latency() { return g2g.latency; }, // [{id, ms, t}], the newest KEEP_SAMPLES
  get received() { return g2g.received; }, // performance.now() of each frame shown in #output
  get stampsSent() { return g2g.stampsSent; },
  latencyStats,
  renderTelemetry, // draws one telemetry message into the overlay (for tests)
  stamp: {
    PATCH: STAMP_PATCH, GRID: STAMP_GRID, CELL: STAMP_CELL, draw: drawStamp, read: readStamp, encodeWord, decodeWord,
  },
};

init();

// Live video: show each frame as soon as it is decoded instead of buffering for smoothness
// (Chromium's jitter buffer otherwise holds frames back by up to a few hundred ms).
function lowLatency(receiver) {
  try {
    if ("jitterBufferTarget" in receiver) receiver.jitterBufferTarget = 0;
    else if ("playoutDelayHint" in receiver) receiver.playoutDelayHint = 0;
  } catch (err) {
    console.warn("could not lower the receiver's jitter buffer:", err);
  }
}
