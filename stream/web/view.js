// Output-only player of `stream`, made for an OBS Browser Source: plays one session's processed video
// over WHEP (POST an SDP offer, get 201 + the SDP answer + a Location naming this viewer; DELETE it to
// leave) and fills the window with it. Anything that goes wrong (no session yet, server restarting, the
// connection dropping, the video stalling) tears the viewer down and tries again, forever.
//
//   /view?session=ID   that session's output (default: the newest session, POST /whep)
//        &key=K        that session's view key (its page has it; needed for session=ID unless token=)
//        &token=T      sent as "Authorization: Bearer T"
//        &retry=S      seconds between tries (default 2)
//
// window.streamView lets a test wait for playback: {pc, state, location, attempts, framesDecoded()}.

import { iceGatheringDone } from "./webrtc.js";

const $ = (id) => document.getElementById(id);

const DEFAULT_RETRY_S = 2;
const MIN_RETRY_S = 0.5;
const ICE_CAP_MS = 2000; // non-trickle: the offer goes out with what was gathered by then
const HEALTH_TIMEOUT_MS = 2000;
const POST_TIMEOUT_MS = 15000;
const DISCONNECT_GRACE_MS = 4000; // a "disconnected" connection that has not recovered by then is retried
const STALL_MS = 10000; // no new decoded frame for this long (or none at all since connecting): retry
const POLL_MS = 500;

// ---- page parameters ----

const params = new URLSearchParams(location.search);
const SESSION = params.get("session") || "";
const TOKEN = params.get("token") || "";
const KEY = params.get("key") || "";
const RETRY_MS = retrySeconds(params.get("retry")) * 1000;
const WHEP_URL = SESSION ? `/whep/${encodeURIComponent(SESSION)}` : "/whep";

function retrySeconds(text) {
  if (text === null || text === "") return DEFAULT_RETRY_S;
  const seconds = Number(text);
  if (Number.isFinite(seconds) && seconds >= MIN_RETRY_S) return seconds;
  console.warn(`retry must be a number of seconds >= ${MIN_RETRY_S}, got "${text}"; using ${DEFAULT_RETRY_S}`);
  return DEFAULT_RETRY_S;
}

const view = {
  state: "connecting", // 'connecting' | 'playing' | 'waiting' | 'error'
  message: "",
  run: 0, // bumped by teardown(); an older connect() sees it and gives up
  pc: null,
  location: null, // absolute URL of this viewer's WHEP resource, while the server holds one
  iceServers: null, // from /health, once it answers
  attempts: 0, // WHEP POSTs sent
  retryTimer: 0,
  graceTimer: 0,
  pollTimer: 0,
  frames: 0, // framesDecoded at the last poll
  progressAt: 0, // performance.now() when framesDecoded last grew (or the answer came)
};

// ---- status line: shown while not playing, hidden while the video plays ----

// `message` null keeps the line as it is: a retry's "connecting" does not blink over "waiting for …".
function setState(state, message = null) {
  view.state = state;
  if (message !== null && message !== view.message) {
    view.message = message;
    if (message) console.info(`stream view: ${message}`);
  }
  const el = $("status");
  el.textContent = view.message;
  el.dataset.state = state;
  el.hidden = state === "playing" || !view.message;
}

function failure(state, message) {
  return Object.assign(new Error(message), { state });
}

// ---- signaling ----

function authHeaders() {
  const bearer = TOKEN || KEY;
  return bearer ? { Authorization: `Bearer ${bearer}` } : {};
}

function timeoutSignal(ms) {
  if (AbortSignal.timeout) return AbortSignal.timeout(ms);
  const controller = new AbortController();
  setTimeout(() => controller.abort(), ms);
  return controller.signal;
}

// The server's ICE servers (like the main page); null when /health does not answer.
async function loadIceServers() {
  try {
    const res = await fetch("/health", { cache: "no-store", headers: authHeaders(), signal: timeoutSignal(HEALTH_TIMEOUT_MS) });
    if (!res.ok) return null;
    const health = await res.json();
    if (!Array.isArray(health.ice_servers)) return [];
    // {urls, username: null, credential: null} -> {urls}: a null would be taken as the string "null"
    return health.ice_servers.map((s) =>
      Object.fromEntries(Object.entries(s).filter(([, v]) => v !== null && v !== undefined)));
  } catch {
    return null;
  }
}

// POSTs the offer; returns {sdp, location} or throws failure(state, message).
async function postOffer(sdp) {
  view.attempts++;
  let res;
  try {
    res = await fetch(WHEP_URL, {
      method: "POST",
      headers: { "Content-Type": "application/sdp", ...authHeaders() },
      body: sdp,
      cache: "no-store",
      signal: timeoutSignal(POST_TIMEOUT_MS),
    });
  } catch (err) {
    const why = err?.name === "TimeoutError" || err?.name === "AbortError" ? "does not answer" : "is unreachable";
    throw failure("waiting", `the server ${why}`);
  }
  const text = await res.text().catch(() => "");
  if (!res.ok) throw refusal(res, text);
  if (!text.trim()) throw failure("error", `the server's answer has no SDP (HTTP ${res.status})`);
  // A relative Location is relative to the URL it answers (RFC 9110); "/whep/…" resolves the same either way.
  const where = res.headers.get("Location");
  return { sdp: text, location: where ? new URL(where, res.url).href : null };
}

function refusal(res, text) {
  let error = "";
  try { error = JSON.parse(text)?.error || ""; } catch { /* not JSON: use the HTTP status */ }
  const said = error ? ` (${error})` : "";
  if (res.status === 404) {
    return failure("waiting", SESSION ? `waiting for session ${SESSION}…${said}` : `no stream yet${said}`);
  }
  if (res.status === 401 || res.status === 403) {
    const hint = TOKEN ? "check the token= in this page's URL" : "add token=… to this page's URL";
    return failure("error", `${error || "not allowed"} (HTTP ${res.status}): ${hint}`);
  }
  return failure(res.status >= 500 ? "waiting" : "error", `${error || res.statusText || "refused"} (HTTP ${res.status})`);
}

// Ends a viewer on the server; keepalive lets it outlive the page.
function deleteViewer(url) {
  if (!url) return;
  fetch(url, { method: "DELETE", headers: authHeaders(), keepalive: true }).catch(() => {});
}

// ---- one viewer: connect, watch, tear down ----

async function connect() {
  clearTimeout(view.retryTimer);
  const run = ++view.run;
  const stale = () => run !== view.run;
  setState("connecting", view.message ? null : SESSION ? `connecting to session ${SESSION}…` : "connecting…");
  try {
    // 1. ICE servers from /health (asked again on each try until it answers)
    if (!view.iceServers) view.iceServers = await loadIceServers();
    if (stale()) return;

    // 2. peer connection: one recvonly video transceiver, then the offer with all its candidates
    const pc = new RTCPeerConnection({ iceServers: view.iceServers || [] });
    view.pc = pc;
    pc.addTransceiver("video", { direction: "recvonly" });
    pc.ontrack = (e) => { if (pc === view.pc && e.track.kind === "video") showTrack(e.track, e.streams[0]); };
    pc.onconnectionstatechange = () => onConnectionState(pc);
    await pc.setLocalDescription(await pc.createOffer());
    await iceGatheringDone(pc, ICE_CAP_MS);
    if (stale()) return;

    // 3. WHEP: the offer out, the answer and this viewer's URL back
    const answer = await postOffer(pc.localDescription.sdp);
    if (stale()) return deleteViewer(answer.location);
    view.location = answer.location;
    await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
    if (stale()) return;
    watchTransport(pc);

    // 4. wait for frames: the poll moves the state to 'playing' (or retries on a stall)
    view.frames = 0;
    view.progressAt = performance.now();
    view.pollTimer = setInterval(() => poll(pc), POLL_MS);
  } catch (err) {
    if (!stale()) retry(err.state || "error", err.message || String(err));
  }
}

function showTrack(track, stream) {
  const video = $("video");
  video.srcObject = stream || new MediaStream([track]);
  video.play().catch(() => {}); // autoplay may wait for metadata; "interrupted" rejections are harmless
  track.addEventListener("ended", () => {
    if (view.pc && view.pc.getReceivers().some((r) => r.track === track)) retry("waiting", "the stream ended");
  });
}

function onConnectionState(pc) {
  if (pc !== view.pc) return;
  const s = pc.connectionState;
  if (s === "connected") {
    clearTimeout(view.graceTimer);
    view.graceTimer = 0;
  } else if (s === "disconnected" && !view.graceTimer) {
    view.graceTimer = setTimeout(() => { if (pc === view.pc) retry("waiting", "connection lost"); }, DISCONNECT_GRACE_MS);
  } else if (s === "failed" || s === "closed") {
    retry("waiting", `connection ${s}`);
  }
}

// The server closing its end (DTLS close_notify) shows here at once; ICE notices it only seconds later.
function watchTransport(pc) {
  const transport = pc.getReceivers()[0]?.transport;
  transport?.addEventListener("statechange", () => {
    if (pc !== view.pc) return;
    if (transport.state === "closed") retry("waiting", "the server ended the stream");
    else if (transport.state === "failed") retry("waiting", "connection failed");
  });
}

async function poll(pc) {
  const frames = await countFrames(pc);
  if (pc !== view.pc) return;
  const now = performance.now();
  if (frames > view.frames) {
    view.frames = frames;
    view.progressAt = now;
    if (view.state !== "playing") {
      setState("playing", "");
      $("video").play().catch(() => {});
    }
  } else if (now - view.progressAt > STALL_MS) {
    const seconds = STALL_MS / 1000;
    retry("waiting", view.state === "playing" ? `no new video for ${seconds} s` : `no video within ${seconds} s`);
  }
}

async function countFrames(pc) {
  if (!pc) return 0;
  let n = 0;
  try {
    const stats = await pc.getStats();
    stats.forEach((r) => { if (r.type === "inbound-rtp" && r.kind === "video") n = r.framesDecoded || 0; });
  } catch { /* closed meanwhile */ }
  return n;
}

// Closes the current viewer (and tells the server), stops any pending try.
function teardown() {
  view.run++;
  clearTimeout(view.retryTimer);
  clearTimeout(view.graceTimer);
  clearInterval(view.pollTimer);
  view.graceTimer = view.pollTimer = 0;
  const pc = view.pc;
  view.pc = null;
  if (pc) {
    pc.ontrack = null;
    pc.onconnectionstatechange = null;
    pc.close();
  }
  deleteViewer(view.location);
  view.location = null;
  $("video").srcObject = null;
}

function retry(state, message) {
  teardown();
  const seconds = RETRY_MS / 1000;
  setState(state, `${message} — retrying ${seconds === 1 ? "every second" : `every ${seconds} s`}`);
  view.retryTimer = setTimeout(connect, RETRY_MS);
}

// ---- startup ----

window.addEventListener("beforeunload", teardown);
window.addEventListener("pagehide", teardown);
window.addEventListener("pageshow", (e) => { if (e.persisted) connect(); }); // back from the bfcache

window.streamView = {
  get pc() { return view.pc; },
  get state() { return view.state; },
  get location() { return view.location; },
  get attempts() { return view.attempts; }, // WHEP POSTs sent so far
  get message() { return view.message; }, // the status line's text ("" while playing)
  framesDecoded: () => countFrames(view.pc), // Promise<number>: inbound-rtp video framesDecoded, 0 without a pc
};

connect();
