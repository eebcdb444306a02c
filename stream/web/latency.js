// Glass-to-glass latency: each camera frame is redrawn into a canvas with a frame-ID stamp in its
// top-left corner and sent instead of the camera; the server copies the stamp into the processed frame
// and the page reads it back from the video it receives: one clock, both ends.

import { STAMP_ID_MODULO, STAMP_PATCH, drawStamp, percentile, readStamp } from "./stamp.js";
import { everyVideoFrame } from "./video.js";

const KEEP_SAMPLES = 10000; // latency samples and received-frame times kept (window.streamApp shows them)
const STATS_WINDOW = 240; // latencyStats() covers the newest this many samples

// Measurements, reset by each Start.
export const g2g = {
  measuring: false, // a stamper is sending
  sentAt: new Map(), // stamp ID -> performance.now() when drawn; taken out when first seen back
  latency: [], // {id, ms, t}: ms from stamping to the stamped frame showing in #output, t when it showed
  received: [], // performance.now() of every frame shown in #output
  stampsSent: 0,
  sentSize: null, // {width, height} of the frames the stamper sends
};

function pushBounded(list, item) {
  list.push(item);
  if (list.length > KEEP_SAMPLES) list.splice(0, list.length - KEEP_SAMPLES);
}

export function resetLatency() {
  g2g.sentAt.clear();
  g2g.latency = [];
  g2g.received = [];
  g2g.stampsSent = 0;
  g2g.sentSize = null;
}

// Percentiles of the newest STATS_WINDOW glass-to-glass samples (null when there are none).
export function latencyStats() {
  const sorted = g2g.latency.slice(-STATS_WINDOW).map((s) => s.ms).sort((a, b) => a - b);
  return {
    count: sorted.length,
    p50: percentile(sorted, 0.5),
    p95: percentile(sorted, 0.95),
    p99: percentile(sorted, 0.99),
  };
}

// Redraws each new camera frame shown in `video` into a canvas of the camera's size with the next
// frame ID stamped in, and sends exactly that frame on the returned track.
export function startStamper(video) {
  const canvas = document.createElement("canvas");
  const ctx = canvas.getContext("2d", { alpha: false });
  const track = canvas.captureStream(0).getVideoTracks()[0];
  let next = 1;
  g2g.measuring = true;
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
    g2g.sentSize = { width, height };
  });
  return {
    track,
    stop: () => { g2g.measuring = false; stopFrames(); track.stop(); },
  };
}

// Every frame shown in #output: its time, and (while measuring) the stamp it carries.
export function watchOutput(video) {
  const patch = document.createElement("canvas");
  patch.width = patch.height = STAMP_PATCH;
  const ctx = patch.getContext("2d", { willReadFrequently: true });
  everyVideoFrame(video, (now, meta) => {
    // When the frame is expected on screen (rVFC's expectedDisplayTime), else when it was handed over.
    const shown = meta?.expectedDisplayTime ?? now;
    pushBounded(g2g.received, shown);
    const sent = g2g.sentSize;
    if (!g2g.measuring || !sent || !video.videoWidth || !video.videoHeight) return;
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
