// Browser client of `stream`: camera -> WebRTC -> server (restyles each frame) -> video back.
// The page is the offerer; settings go on the `control` data channel, stats come on `telemetry`.
// stamp.js and latency.js: glass-to-glass latency; stats.js: the stats; capture.js: snapshot and recording.

import { Recording, download, fileName, snapshot } from "./capture.js";
import { g2g, latencyStats, resetLatency, startStamper, watchOutput } from "./latency.js";
import { STAMP_CELL, STAMP_GRID, STAMP_PATCH, decodeWord, drawStamp, encodeWord, readStamp } from "./stamp.js";
import { DEFAULTS, applySettingsToUI, bindSettings, onControlMessage, sendSettings, state as settings } from "./settings.js";
import { buildStats, renderG2G, renderTelemetry, resetStats, setBrowserFps, showDetail } from "./stats.js";
import { endReason, errorMessage, offerError, revealStatus, setConnection, setStatus } from "./status.js";
import { bindVideo, clearVideo, lowLatency, setAspect, showVideo } from "./video.js";
import { iceGatheringDone } from "./webrtc.js";

const $ = (id) => document.getElementById(id);

const ICE_CAP_MS = 3000;
const G2G_INTERVAL_MS = 333;

const state = {
  token: new URLSearchParams(location.search).get("token") || "",
  viewKey: "", // the running session's view key (from the server's answer)
  auth: false,
  maxSessions: 0,
  run: 0, // bumped by stop(); an older start() sees it and gives up
  pc: null,
  stream: null,
  session: "",
  statsTimer: 0,
  g2gTimer: 0,
  lastFrames: null,
  stamper: null, // the canvas that stamps camera frames, while this session measures latency
  recording: null,
};

// ---- buttons ----

function setRunning(running) {
  $("start").disabled = running;
  $("stop").disabled = !running;
  $("latency-stamp").disabled = running; // read at Start
  if (!running) setOutputLive(false);
}

function setOutputLive(live) {
  $("snapshot").disabled = !live;
  $("record").disabled = !live && !state.recording;
}

// ---- controls ----

function bindControls() {
  bindSettings();
  $("token").addEventListener("input", (e) => { state.token = e.target.value.trim(); });
  $("token-row").addEventListener("submit", (e) => { e.preventDefault(); start(); });
  $("camera").addEventListener("change", switchCamera);
  $("start").addEventListener("click", () => start());
  $("stop").addEventListener("click", () => stop());
  $("snapshot").addEventListener("click", takeSnapshot);
  $("record").addEventListener("click", () => (state.recording ? finishRecording() : startRecording()));
  $("controls-toggle").addEventListener("click", () => {
    const open = $("controls").hidden;
    $("controls").hidden = !open;
    $("controls-toggle").setAttribute("aria-expanded", String(open));
    $("controls-toggle").textContent = open ? "Hide controls" : "Show controls";
  });
}

// ---- snapshot and recording ----

async function takeSnapshot() {
  try {
    const blob = await snapshot($("output"));
    download(blob, fileName("snapshot", "image/png"));
    setStatus(`Snapshot saved (${$("output").videoWidth}x${$("output").videoHeight} PNG).`, "ok");
  } catch (err) {
    setStatus(`Could not take a snapshot: ${errorMessage(err)}`, "error");
  }
}

function startRecording() {
  try {
    state.recording = new Recording($("output"), $("record-camera").checked ? $("input") : null);
  } catch (err) {
    setStatus(`Could not record: ${errorMessage(err)}`, "error");
    return;
  }
  $("download").hidden = true;
  $("record").textContent = "Stop recording";
  $("record").setAttribute("aria-pressed", "true");
  $("record-camera").disabled = true;
  setStatus(`Recording${$("record-camera").checked ? " the camera and the restyled video" : ""}…`, "warn");
}

async function finishRecording() {
  const recording = state.recording;
  state.recording = null;
  $("record").textContent = "Record";
  $("record").setAttribute("aria-pressed", "false");
  $("record-camera").disabled = false;
  setOutputLive(Boolean(state.pc) && $("output").parentElement.classList.contains("live"));
  if (!recording) return;
  const blob = await recording.stop();
  const link = $("download");
  if (link.href) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(blob);
  link.download = fileName("recording", recording.type);
  link.textContent = `Download recording (${(blob.size / 1e6).toFixed(1)} MB)`;
  link.hidden = false;
  setStatus(`Recorded ${recording.seconds.toFixed(1)} s: use "Download recording" to save it.`, "ok");
}

// ---- cameras ----

async function openCamera(deviceId) {
  if (!navigator.mediaDevices?.getUserMedia) {
    throw new Error("The camera needs a secure page: open it over https:// or on http://localhost.");
  }
  const { width, height } = settings.server;
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
    throw new Error(offerError(res.status, data, Boolean(state.token), state.maxSessions));
  }
  if (!data?.sdp) throw new Error("The server's answer has no SDP.");
  return data;
}

function wireChannels(control, telemetry) {
  control.onopen = () => {
    if (control !== settings.control) return;
    const changes = settings.unsent;
    settings.unsent = {};
    if (Object.keys(changes).length) sendSettings(changes);
  };
  control.onmessage = (e) => { if (control === settings.control) onControlMessage(e.data); };
  control.onclose = () => {
    if (control === settings.control) stop("The server ended the session. Press Start to try again.", "error");
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
  const session = state.session;
  setConnection(s);
  if (s === "connected") setStatus(`Connected (session ${state.session}).`, "ok");
  else if (s === "disconnected") setStatus("Connection interrupted; waiting for it to recover…", "warn");
  else if (s === "failed" || s === "closed") stop(`Connection ${s}. Press Start to try again.`, "error");
  if (s === "disconnected" || s === "failed") explainEnd(pc, session);
}

// A session whose server-side worker stopped: say why, when the server knows (a cluster's front does).
async function explainEnd(pc, session) {
  const reason = await endReason(session, state.token);
  if (reason && (pc === state.pc || !state.pc)) stop(`The session ended: ${reason}. Press Start to try again.`, "error");
}

async function start() {
  if (state.pc || state.stream) return;
  if (state.auth && !state.token) {
    $("token-row").hidden = false;
    $("controls").hidden = false;
    $("token").focus();
    setStatus("This server needs an access token: add ?token=... to the address (or paste it in Controls), then press Start.", "warn");
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
      state.g2gTimer = setInterval(renderG2G, G2G_INTERVAL_MS);
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
    settings.control = pc.createDataChannel("control", { ordered: true });
    settings.negotiating = true;
    wireChannels(settings.control, pc.createDataChannel("telemetry", { ordered: true }));
    setStatus("Connecting to the server…");
    await pc.setLocalDescription(await pc.createOffer());
    await iceGatheringDone(pc, ICE_CAP_MS);
    if (stale()) return;

    // 3. signaling: the full local description (all candidates) plus the settings changed so far
    const body = { sdp: pc.localDescription.sdp, type: pc.localDescription.type };
    if (Object.keys(settings.edited).length) body.settings = { ...settings.edited };
    if (state.stamper) body.stamp = true; // the server copies each input frame's stamp into its output
    settings.unsent = {};
    const answer = await postOffer(body);
    if (stale()) return;
    await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
    state.session = answer.session || "";
    state.viewKey = answer.view_key || ""; // this session's alone: /view?session=ID&key=KEY shows its output
    if (state.viewKey) console.info(`watch this session: ${location.origin}/view?session=${state.session}&key=${state.viewKey}`);
    if (state.stamper) await keepResolution(sender);
    if (stale()) return;
    setStatus(`Session ${state.session} negotiated; waiting for video…`);
    state.statsTimer = setInterval(() => pollBrowserFps(pc), 1000);
  } catch (err) {
    if (!stale()) stop(errorMessage(err), "error");
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

// Frames the browser itself decoded per second, from the inbound video RTP stats.
async function pollBrowserFps(pc) {
  let report;
  try { report = await pc.getStats(); } catch { return; }
  if (pc !== state.pc) return;
  for (const r of report.values()) {
    if (r.type !== "inbound-rtp" || (r.kind ?? r.mediaType) !== "video" || r.framesDecoded === undefined) continue;
    const prev = state.lastFrames;
    if (prev && r.timestamp > prev.timestamp) setBrowserFps(((r.framesDecoded - prev.frames) * 1000) / (r.timestamp - prev.timestamp));
    state.lastFrames = { frames: r.framesDecoded, timestamp: r.timestamp };
    return;
  }
}

function stop(message = "Stopped. Press Start to go again.", kind = "info") {
  if (state.recording) finishRecording(); // the file is offered even when the session ends
  state.run++;
  clearInterval(state.statsTimer);
  clearInterval(state.g2gTimer);
  state.stamper?.stop();
  state.stamper = null;
  const pc = state.pc;
  state.pc = null;
  settings.control = null;
  settings.negotiating = false;
  settings.unsent = {};
  settings.inflight = [];
  state.session = "";
  state.viewKey = "";
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
  if (kind === "error") revealStatus();
}

// ---- startup ----

async function loadHealth() {
  try {
    // with the token, /health also carries the TURN credentials (it keeps them from everyone else)
    const headers = state.token ? { Authorization: `Bearer ${state.token}` } : {};
    const res = await fetch("/health", { cache: "no-store", headers });
    if (!res.ok) throw new Error(`the server answered /health with HTTP ${res.status}`);
    const health = await res.json();
    settings.server = { ...DEFAULTS, ...(health.settings || {}) };
    settings.sizes = Array.isArray(health.sizes) ? health.sizes.filter((s) => Array.isArray(s) && s.length === 2) : [];
    state.auth = Boolean(health.auth);
    state.maxSessions = Number(health.max_sessions) || 0;
    state.iceServers = Array.isArray(health.ice_servers) ? health.ice_servers : [];
    $("placeholder-banner").hidden = !health.placeholder;
    $("token-row").hidden = !(state.auth && !state.token);
    $("server-info").textContent = `model ${health.model}`;
    if (state.auth && !state.token) {
      setStatus("This server needs an access token: add ?token=... to the address (or paste it in Controls), then press Start.", "warn");
    }
  } catch (err) {
    $("server-info").textContent = "server unreachable";
    setStatus(errorMessage(err), "error");
  }
  applySettingsToUI({ ...settings.server, ...settings.edited });
  for (const id of ["input", "output"]) setAspect($(id), settings.server.width, settings.server.height);
}

function init() {
  buildStats();
  resetStats();
  applySettingsToUI(DEFAULTS);
  bindControls();
  bindVideo($("input"));
  bindVideo($("output"));
  $("output").addEventListener("playing", () => setOutputLive(true));
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
  renderTelemetry, // draws one telemetry message into the stats (for tests)
  showDetail,
  stamp: {
    PATCH: STAMP_PATCH, GRID: STAMP_GRID, CELL: STAMP_CELL, draw: drawStamp, read: readStamp, encodeWord, decodeWord,
  },
};

init();
