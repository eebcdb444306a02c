// The page's <video> elements: showing a stream, fitting the frame to its aspect, and a callback per new frame.

export function showVideo(video, stream) {
  video.srcObject = stream;
  video.play().catch(() => {}); // autoplay may wait for metadata; "interrupted" rejections are harmless
}

export function clearVideo(video) {
  video.srcObject = null;
  video.parentElement.classList.remove("live");
}

export function setAspect(video, width, height) {
  if (width > 0 && height > 0) video.parentElement.style.aspectRatio = `${width} / ${height}`;
}

// The frame around `video` takes the video's aspect, and is marked live once it plays.
export function bindVideo(video) {
  const fit = () => setAspect(video, video.videoWidth, video.videoHeight);
  video.addEventListener("loadedmetadata", () => { fit(); video.play().catch(() => {}); });
  video.addEventListener("resize", fit);
  video.addEventListener("playing", () => video.parentElement.classList.add("live"));
}

// Calls `onFrame(now, meta)` once per new frame of `video` until the returned function is called:
// requestVideoFrameCallback where there is one, else every animation frame (that shows a new frame
// when the browser counts them).
export function everyVideoFrame(video, onFrame) {
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

// Live video: show each frame as soon as it is decoded instead of buffering for smoothness
// (Chromium's jitter buffer otherwise holds frames back by up to a few hundred ms).
export function lowLatency(receiver) {
  try {
    if ("jitterBufferTarget" in receiver) receiver.jitterBufferTarget = 0;
    else if ("playoutDelayHint" in receiver) receiver.playoutDelayHint = 0;
  } catch (err) {
    console.warn("could not lower the receiver's jitter buffer:", err);
  }
}
