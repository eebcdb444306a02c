// Snapshot (the current restyled frame as a PNG) and recording (the restyled video, optionally with the
// camera side by side, with MediaRecorder), each offered as a file to download.

import { everyVideoFrame } from "./video.js";

const TYPES = ["video/webm;codecs=vp9", "video/webm;codecs=vp8", "video/webm", "video/mp4"];

// "stream-snapshot-2025-01-31-14-05-09.png"
export function fileName(kind, type) {
  const stamp = new Date().toISOString().slice(0, 19).replace(/[T:]/g, "-");
  const ext = type.includes("mp4") ? "mp4" : type.includes("webm") ? "webm" : "png";
  return `stream-${kind}-${stamp}.${ext}`;
}

export function download(blob, name) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
}

// The frame `video` shows now, at its own size, as a PNG blob.
export function snapshot(video) {
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  if (!canvas.width || !canvas.height) return Promise.reject(new Error("there is no restyled frame yet"));
  canvas.getContext("2d").drawImage(video, 0, 0);
  return new Promise((resolve, reject) =>
    canvas.toBlob((blob) => (blob ? resolve(blob) : reject(new Error("the browser could not encode the PNG"))), "image/png"));
}

export function recordingType() {
  return TYPES.find((t) => window.MediaRecorder?.isTypeSupported?.(t)) || "";
}

// Records `output` (a <video> showing the restyled stream), or `camera` and `output` side by side
// (the camera scaled to the output's height), until stop(); stop() resolves to the recording's blob.
export class Recording {
  constructor(output, camera = null) {
    this.type = recordingType();
    if (!this.type) throw new Error("this browser cannot record video (no MediaRecorder for WebM or MP4)");
    this.started = performance.now();
    this.stopDrawing = null;
    let stream = output.srcObject;
    if (camera) stream = this.sideBySide(camera, output);
    if (!stream) throw new Error("there is no restyled video to record yet");
    this.recorder = new MediaRecorder(stream, { mimeType: this.type });
    this.chunks = [];
    this.recorder.ondataavailable = (e) => { if (e.data.size) this.chunks.push(e.data); };
    this.recorder.start(1000); // a chunk a second: a long recording is not one huge buffer at the end
  }

  sideBySide(camera, output) {
    const canvas = document.createElement("canvas");
    const ctx = canvas.getContext("2d", { alpha: false });
    const draw = () => {
      const h = output.videoHeight, wo = output.videoWidth;
      if (!h || !wo) return;
      const wc = camera.videoHeight ? Math.round((camera.videoWidth * h) / camera.videoHeight) : 0;
      if (canvas.width !== wc + wo || canvas.height !== h) Object.assign(canvas, { width: wc + wo, height: h });
      if (wc) ctx.drawImage(camera, 0, 0, wc, h);
      ctx.drawImage(output, wc, 0, wo, h);
    };
    draw();
    this.stopDrawing = everyVideoFrame(output, draw);
    return canvas.captureStream(30);
  }

  get seconds() {
    return (performance.now() - this.started) / 1000;
  }

  stop() {
    return new Promise((resolve) => {
      this.recorder.onstop = () => {
        this.stopDrawing?.();
        this.recorder.stream.getTracks().forEach((t) => { if (t.kind === "video" && this.stopDrawing) t.stop(); });
        resolve(new Blob(this.chunks, { type: this.type.split(";")[0] }));
      };
      if (this.recorder.state === "inactive") this.recorder.onstop();
      else this.recorder.stop();
    });
  }
}
