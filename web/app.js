// Browser client of `stream`: camera -> WebRTC -> server (restyles each frame) -> video back.
// The page is the offerer; settings go on the `control` data channel, stats come on `telemetry`.

const $ = (id) => document.getElementById(id);

// [element id, settings key, decimals shown]
const SLIDERS = [
  ["strength", "strength", 2],
  ["guidance", "guidance_scale", 1],
  ["steps", "steps", 0],
  ["latent-feedback", "latent_feedback", 2],
];
const STAGES = ["total", "preprocess", "encode", "denoise", "decode", "postprocess"];
const DEFAULTS = {
  prompt: "", negative_prompt: "", strength: 0.5, guidance_scale: 1, steps: 4, seed: 0,
  latent_feedback: 0, width: 512, height: 512,
};
const TEXT_DELAY_MS = 300; // prompts are sent this long after typing stops
const SLIDER_DELAY_MS = 80; // coalesces a drag into a few messages
const ICE_CAP_MS = 3000;
const DASH = "–";

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
};
const statCells = {};
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

// Two blocks: rates and counters (always shown), stage latencies (click the overlay to hide).
function buildStats() {
  const block = (rows, cls) => {
    const table = document.createElement("table");
    table.className = cls;
    for (const [key, label] of rows) {
      const row = table.insertRow();
      row.insertCell().textContent = label;
      statCells[key] = row.insertCell();
    }
    return table;
  };
  const counters = [["fps", "fps in / out"], ["browser", "browser fps"], ["drops", "drops"], ["skipped", "skipped"]];
  const latency = block([["head", "latency ms"], ...STAGES.map((stage) => [stage, stage])], "detail");
  latency.rows[0].className = "head";
  statCells.head.textContent = "p50 / p95";
  $("stats").append(block(counters, "counters"), latency);
}

function resetStats() {
  for (const [key, cell] of Object.entries(statCells)) {
    if (key !== "head") cell.textContent = key === "fps" || STAGES.includes(key) ? `${DASH} / ${DASH}` : DASH;
  }
}

const fmt = (x, decimals = 1) => (Number.isFinite(x) ? x.toFixed(decimals) : DASH);

function renderTelemetry(t) {
  statCells.fps.textContent = `${fmt(t.fps_in)} / ${fmt(t.fps_out)}`;
  for (const stage of STAGES) {
    const l = t.latency_ms?.[stage];
    statCells[stage].textContent = `${fmt(l?.p50)} / ${fmt(l?.p95)}`;
  }
  statCells.drops.textContent = fmt(t.drops, 0);
  statCells.skipped.textContent = fmt(t.skipped, 0);
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

async function switchCamera() {
  const pc = state.pc;
  if (!pc || !state.stream) return; // not running: the choice is used at the next Start
  const run = state.run;
  try {
    const stream = await openCamera($("camera").value);
    if (run !== state.run) return stopTracks(stream);
    const sender = pc.getSenders().find((s) => s.track?.kind === "video");
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

function iceGatheringDone(pc, capMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", check);
      resolve();
    };
    const check = () => { if (pc.iceGatheringState === "complete") done(); };
    const timer = setTimeout(done, capMs);
    pc.addEventListener("icegatheringstatechange", check);
  });
}

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

    // 2. peer connection: one sendrecv video transceiver, two data channels, then the offer
    const pc = new RTCPeerConnection({ iceServers: state.iceServers || [] });
    state.pc = pc;
    pc.onconnectionstatechange = () => onConnectionState(pc);
    pc.ontrack = (e) => {
      if (e.track.kind === "video") showVideo($("output"), e.streams[0] || new MediaStream([e.track]));
    };
    pc.addTransceiver(track, { direction: "sendrecv" });
    state.control = pc.createDataChannel("control", { ordered: true });
    wireChannels(state.control, pc.createDataChannel("telemetry", { ordered: true }));
    setStatus("Connecting to the server…");
    await pc.setLocalDescription(await pc.createOffer());
    await iceGatheringDone(pc, ICE_CAP_MS);
    if (stale()) return;

    // 3. signaling: the full local description (all candidates) plus the settings changed so far
    const body = { sdp: pc.localDescription.sdp, type: pc.localDescription.type };
    if (Object.keys(state.edited).length) body.settings = { ...state.edited };
    state.unsent = {};
    const answer = await postOffer(body);
    if (stale()) return;
    await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
    state.session = answer.session || "";
    setStatus(`Session ${state.session} negotiated; waiting for video…`);
    state.statsTimer = setInterval(() => pollBrowserFps(pc), 1000);
  } catch (err) {
    if (!stale()) stop(`Could not start: ${errorMessage(err)}`, "error");
  }
}

function stop(message = "Stopped. Press Start to go again.", kind = "info") {
  state.run++;
  clearInterval(state.statsTimer);
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
};

init();
