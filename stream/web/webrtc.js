// WebRTC helpers shared by the main page (app.js) and the output-only player (view.js).

// Resolves when the peer connection has gathered all its ICE candidates, or after capMs at most:
// the server takes one offer with every candidate in it (no trickle ICE).
export function iceGatheringDone(pc, capMs) {
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
