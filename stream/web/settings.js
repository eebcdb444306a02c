// The settings controls (prompt and presets, size, sliders, seed) and sending them: on the `control`
// data channel while a session runs, else with the next offer.

import { setStatus } from "./status.js";

const $ = (id) => document.getElementById(id);

// [element id, settings key, decimals shown]
const SLIDERS = [
  ["strength", "strength", 2],
  ["guidance", "guidance_scale", 1],
  ["steps", "steps", 0],
  ["latent-feedback", "latent_feedback", 2],
  ["image-feedback", "image_feedback", 2],
  ["motion-strength", "motion_strength", 2],
];
// [element id, settings key] of the choices (select elements)
const CHOICES = [
  ["feedback-at", "feedback_at"],
  ["noise", "noise"],
];
export const DEFAULTS = {
  prompt: "", negative_prompt: "", strength: 0.5, guidance_scale: 1, steps: 4, seed: 0,
  latent_feedback: 0, image_feedback: 0, width: 512, height: 512,
  feedback_warp: true, feedback_at: "input", noise: "fixed", motion_strength: 0,
};
// A click fills the prompt box (and sends it).
const PRESETS = [
  ["Oil painting", "an oil painting, thick impasto brush strokes, warm light"],
  ["Anime", "anime style, cel shading, clean line art, vibrant colors"],
  ["Watercolor", "a watercolor painting, soft washes of color, paper texture"],
  ["Cyberpunk", "cyberpunk city at night, neon lights, rain, cinematic"],
  ["Pencil sketch", "a pencil sketch, graphite, cross-hatching, white paper"],
];
const TEXT_DELAY_MS = 300; // prompts are sent this long after typing stops
const SLIDER_DELAY_MS = 80; // coalesces a drag into a few messages
const MAX_SEED = Number.MAX_SAFE_INTEGER;

export const state = {
  server: { ...DEFAULTS }, // settings reported by /health
  sizes: [], // [[w, h], ...] the server offers for its model
  edited: {}, // every key changed on this page; sent with each new offer
  unsent: {}, // changes made after the offer went out, before `control` opened
  inflight: [], // changes sent on `control`, oldest first, each awaiting its reply
  control: null, // the session's `control` channel
  negotiating: false, // a session is starting or running: changes wait for its channel
};
const sendTimers = {};

export function applySettingsToUI(s) {
  $("prompt").value = s.prompt;
  $("negative-prompt").value = s.negative_prompt;
  for (const [id, key] of SLIDERS) {
    $(id).value = s[key] ?? DEFAULTS[key];
    showSliderValue(id);
  }
  for (const [id, key] of CHOICES) $(id).value = s[key] ?? DEFAULTS[key];
  $("feedback-warp").checked = s.feedback_warp ?? DEFAULTS.feedback_warp;
  $("seed").value = s.seed;
  fillSizes(s.width, s.height);
}

function fillSizes(width, height) {
  const sizes = state.sizes.length ? state.sizes : [[width, height]];
  const options = sizes.map(([w, h]) => new Option(`${w} x ${h}`, `${w}x${h}`));
  if (!sizes.some(([w, h]) => w === width && h === height)) options.push(new Option(`${width} x ${height}`, `${width}x${height}`));
  $("size").replaceChildren(...options);
  $("size").value = `${width}x${height}`;
}

function showSliderValue(id) {
  const decimals = SLIDERS.find(([sid]) => sid === id)[2];
  $(`${id}-value`).textContent = Number($(id).value).toFixed(decimals);
}

// Send `changes` now if the control channel is open; otherwise keep them for the next offer
// (or for the moment the channel opens). Returns whether they went out now.
export function sendSettings(changes) {
  Object.assign(state.edited, changes);
  const channel = state.control;
  if (channel && channel.readyState === "open") {
    channel.send(JSON.stringify({ type: "settings", ...changes }));
    state.inflight.push(changes);
    return true;
  }
  if (state.negotiating) Object.assign(state.unsent, changes);
  return false;
}

function queueSetting(key, value, delay) {
  state.edited[key] = value; // a Start pressed within the delay still carries it
  clearTimeout(sendTimers[key]);
  sendTimers[key] = setTimeout(() => sendSettings({ [key]: value }), delay);
}

function current(key) {
  return key in state.edited ? state.edited[key] : state.server[key];
}

// A seed the server cannot take is refused here, visibly: red field, and the seed still in use said.
function onSeedInput(e) {
  const text = e.target.value.trim();
  const seed = Number(text);
  if (text !== "" && Number.isSafeInteger(seed) && seed >= 0 && seed <= MAX_SEED) {
    queueSetting("seed", seed, TEXT_DELAY_MS);
    return;
  }
  clearTimeout(sendTimers.seed);
  const shown = text === "" ? "an empty seed" : `"${text}"`;
  setStatus(`Seed must be a whole number, 0 or more: ${shown} was not applied; the stream keeps seed ${current("seed")}.`, "error");
}

export function bindSettings() {
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
  for (const [label, prompt] of PRESETS) {
    const button = Object.assign(document.createElement("button"), { type: "button", textContent: label, title: prompt });
    button.addEventListener("click", () => {
      $("prompt").value = prompt;
      queueSetting("prompt", prompt, 0);
    });
    $("presets").append(button);
  }
  for (const [id, key] of CHOICES) {
    $(id).addEventListener("change", (e) => queueSetting(key, e.target.value, 0));
  }
  $("feedback-warp").addEventListener("change", (e) => queueSetting("feedback_warp", e.target.checked, 0));
  $("size").addEventListener("change", (e) => {
    const [width, height] = e.target.value.split("x").map(Number);
    for (const key of ["width", "height"]) clearTimeout(sendTimers[key]);
    sendSettings({ width, height });
  });
  $("seed").addEventListener("input", onSeedInput);
  $("seed-random").addEventListener("click", () => {
    const seed = Math.floor(Math.random() * 2 ** 31);
    $("seed").value = seed;
    queueSetting("seed", seed, 0);
  });
}

export function onControlMessage(data) {
  let msg;
  try { msg = JSON.parse(data); } catch { return; }
  const sent = state.inflight.shift() || {};
  if (msg?.type === "applied") {
    const s = { ...(msg.settings || {}) };
    const parts = [];
    if ("width" in s || "height" in s) {
      parts.push(`size ${s.width ?? current("width")}x${s.height ?? current("height")}`);
      delete s.width;
      delete s.height;
    }
    parts.push(...Object.entries(s).map(([k, v]) => (typeof v === "string" ? k : `${k} ${v}`)));
    setStatus(`Applied: ${parts.join(", ") || "settings"}`, "ok");
  } else if (msg?.type === "error") {
    // Refused values are not carried into the next offer (the server would refuse that too).
    for (const [key, value] of Object.entries(sent)) if (state.edited[key] === value) delete state.edited[key];
    if ("width" in sent || "height" in sent) fillSizes(current("width"), current("height"));
    setStatus(`The server refused the change: ${msg.message}`, "error");
  }
}
