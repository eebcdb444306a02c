// The status line under the videos, the connection pill, and the words of errors: what happened and
// what to do.

const $ = (id) => document.getElementById(id);

export function setStatus(message, kind = "info") {
  const el = $("status");
  el.textContent = message;
  el.dataset.kind = kind;
}

// An error the user must read (a session that could not start, or ended): on a phone the status line
// is below the fold, under the camera; bring it into view (above the sticky action bar: its scroll margin).
export function revealStatus() {
  const el = $("status");
  const box = el.getBoundingClientRect();
  if (box.top < 0 || box.bottom > window.innerHeight) el.scrollIntoView({ block: "nearest" });
}

export function setConnection(label) {
  const el = $("connection");
  el.textContent = label;
  el.dataset.state = label;
}

export function errorMessage(err) {
  const byName = {
    NotAllowedError: "Camera permission was denied: allow the camera for this page and press Start again.",
    NotFoundError: "No camera was found.",
    NotReadableError: "The camera is busy (used by another application?).",
    OverconstrainedError: "The selected camera is not available: pick another one.",
  };
  if (err instanceof TypeError && /fetch|network/i.test(err.message)) {
    return "The server cannot be reached: is `stream serve` still running? Start it, then press Start again.";
  }
  return byName[err?.name] || err?.message || String(err);
}

// What a refused offer means for the user, and what to do. `token`: whether the page sent one.
export function offerError(status, data, token, maxSessions) {
  const reason = data?.error || "";
  if (status === 401) {
    return token
      ? "The access token was not accepted: check it (add ?token=... to the address, or paste it in Controls), then press Start."
      : "This server needs an access token: add ?token=... to the address (or paste it in Controls), then press Start.";
  }
  if (status === 503) {
    const places = data?.max_sessions || maxSessions;
    return `All ${places || "the"} places are taken; try again in a moment.`;
  }
  if (status === 429) {
    return "Your network already holds as many sessions on this server as one address may: close one (another tab or device), or wait a few seconds for a page you just closed to free its place, then press Start.";
  }
  if (status === 400 && reason.startsWith("bad settings")) return `The server refused the settings: ${reason.replace(/^bad settings: /, "")}.`;
  return `The server could not start a session: ${reason || "no reason given"} (HTTP ${status}).`;
}

// Why a session ended, when the server knows: on a cluster (`stream serve --cluster`) the front answers
// GET /sessions/ID for a session whose worker stopped. "" when it does not know (or has no such route).
export async function endReason(session, token) {
  if (!session) return "";
  try {
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    const res = await fetch(`/sessions/${encodeURIComponent(session)}`, { headers, cache: "no-store" });
    if (!res.ok) return "";
    const data = await res.json();
    return data?.state === "ended" && data.reason ? String(data.reason) : "";
  } catch {
    return "";
  }
}
