"""Latency of the OBS paths: an encoder sending like OBS over WHIP -> `stream serve` -> a WHEP viewer.

In one process, on 127.0.0.1: an aiortc client sends what OBS 30+ sends (H.264 video, Opus audio, one
offer with every candidate) to `POST /whip`; a second client plays the session over `POST /whep`, as
the `/view` page does for an OBS Browser Source. Each sent frame carries a frame-ID stamp
(stream/stamp.py) that the server copies into the processed frame, so each frame's latency (handed to
the H.264 encoder -> decoded by the viewer) is measured on one clock. `--path offer` measures the
browser page's path instead (VP8 both ways over `POST /offer`) for comparison. Prints a table, then
one JSON object as the last line.

    python -m benchmarks.obs_e2e --model tiny --size 256 --seconds 15
    python -m benchmarks.obs_e2e --model tiny --size 256 --seconds 15 --path offer
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription, VideoStreamTrack
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError

from benchmarks.webrtc_e2e import add_stream_arguments, stream_config
from stream import stamp
from stream.bench import environment
from stream.clips import photo_clip
from stream.config import ConfigError
from stream.models import PLACEHOLDER_NOTE, load_model
from stream.monitor import percentile
from stream.server import ServerThread, StreamServer

FREEZE_MS = 100.0


class StampedClip(VideoStreamTrack):
    """A clip at `fps`, each frame stamped with its ID; remembers when each went to the encoder."""

    def __init__(self, frames: list[np.ndarray], fps: float) -> None:
        super().__init__()
        self.frames, self.period = frames, 1.0 / fps
        self.sent: dict[int, float] = {}
        self.count = 0
        self._next = 0.0

    async def recv(self) -> av.VideoFrame:
        now = time.monotonic()
        self._next = max(self._next + self.period, now) if self._next else now
        await asyncio.sleep(max(0.0, self._next - now))
        self.count += 1
        frame_id = self.count % stamp.ID_MODULO
        pixels = stamp.stamp(self.frames[self.count % len(self.frames)].copy(), frame_id)
        frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
        frame.pts, frame.time_base = round(self.count * self.period * 90000), Fraction(1, 90000)
        self.sent[frame_id] = time.monotonic()
        return frame


class Receiver:
    """Reads every frame of a track: arrival time and the stamped ID."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, int | None]] = []
        self.size: tuple[int, int] | None = None

    async def read(self, track: Any) -> None:
        try:
            while True:
                frame = await track.recv()
                pixels = frame.to_ndarray(format="rgb24")
                self.size = (pixels.shape[1], pixels.shape[0])
                self.arrivals.append((time.monotonic(), stamp.read(pixels)))
        except MediaStreamError:
            pass


async def post(url: str, body: Any, content_type: str) -> tuple[str, str]:
    async with aiohttp.ClientSession() as http:
        data = json.dumps(body) if content_type == "application/json" else body
        async with http.post(url, data=data, headers={"Content-Type": content_type}) as r:
            text = await r.text()
            if r.status not in (200, 201):
                raise RuntimeError(f"{url}: {r.status} {text}")
            return text, r.headers.get("Location", "")


async def measure(base: str, path: str, clip: StampedClip, warmup: float, seconds: float) -> dict[str, Any]:
    receiver = Receiver()
    tasks: list[asyncio.Task[None]] = []
    sender = RTCPeerConnection()
    peers = [sender]
    if path == "whip":
        video = sender.addTransceiver(clip, direction="sendonly")
        video.setCodecPreferences(
            [c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType == "video/H264"]
        )
        sender.addTransceiver(AudioStreamTrack(), direction="sendonly")
        await sender.setLocalDescription(await sender.createOffer())
        answer, location = await post(base + "/whip?stamp=1", sender.localDescription.sdp, "application/sdp")
        await sender.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        viewer = RTCPeerConnection()
        peers.append(viewer)
        viewer.addTransceiver("video", direction="recvonly")
        viewer.on("track", lambda track: tasks.append(asyncio.ensure_future(receiver.read(track))))
        await viewer.setLocalDescription(await viewer.createOffer())
        session = location.rsplit("/", 1)[-1]
        # POST /whep plays the newest session, this one (as /view does); /whep/{id} needs its view key
        body, _ = await post(f"{base}/whep", viewer.localDescription.sdp, "application/sdp")
        await viewer.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
    else:
        sender.addTransceiver(clip, direction="sendrecv")
        sender.on("track", lambda track: tasks.append(asyncio.ensure_future(receiver.read(track))))
        await sender.setLocalDescription(await sender.createOffer())
        offer = {"sdp": sender.localDescription.sdp, "type": "offer", "stamp": True}
        text, _ = await post(base + "/offer", offer, "application/json")
        answer = json.loads(text)
        session = answer["session"]
        await sender.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
    await asyncio.sleep(warmup)
    start = time.monotonic()
    await asyncio.sleep(seconds)
    end = time.monotonic()
    for peer in peers:
        await peer.close()
    for task in tasks:
        task.cancel()
    window = [(t, i) for t, i in receiver.arrivals if start <= t < end]
    latencies, seen = [], set()
    for t, frame_id in window:
        if frame_id is not None and frame_id not in seen and frame_id in clip.sent:
            seen.add(frame_id)
            latencies.append((t - clip.sent[frame_id]) * 1000.0)
    times = [t for t, _ in window]
    gaps = [(b - a) * 1000.0 for a, b in zip(times, times[1:], strict=False)]
    return {
        "session": session,
        "latencies": latencies,
        "received": len(window),
        "gaps": gaps,
        "size": receiver.size,
        "sent": sum(1 for t in clip.sent.values() if start <= t < end),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.obs_e2e",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--path", choices=["whip", "offer"], default="whip", help="WHIP -> WHEP, or the page's /offer"
    )
    add_stream_arguments(parser)
    parser.add_argument("--fps", type=float, default=24.0, help="the encoder's frame rate")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    args = parser.parse_args(argv)
    try:
        config = stream_config(args)
        if not (args.seconds > 0 and args.warmup >= 0 and args.fps > 0):
            raise ConfigError("--seconds and --fps must be > 0 and --warmup >= 0")
    except ConfigError as exc:
        print(f"obs_e2e: error: {exc}", file=sys.stderr)
        return 2
    components = load_model(config)
    server = StreamServer.for_components(config, components, adaptive=False)
    clip = StampedClip(photo_clip("pan", 96, (args.size, args.size), step=2), args.fps)
    with ServerThread(server) as running:
        base = f"http://127.0.0.1:{running.port}"
        found = asyncio.run(measure(base, args.path, clip, args.warmup, args.seconds))
    lat, gaps = found["latencies"], found["gaps"]
    result = {
        "benchmark": "obs_e2e",
        "path": "WHIP (H.264 + Opus) -> WHEP (VP8)" if args.path == "whip" else "/offer (VP8 both ways)",
        "model": components.name,
        "placeholder": components.placeholder,
        "size": args.size,
        "received_size": found["size"],
        "steps": args.steps,
        "guidance": args.guidance,
        "seconds": args.seconds,
        "latency_ms": {q: _round(percentile(lat, p)) for q, p in (("p50", 50), ("p95", 95), ("p99", 99))},
        "latency_count": len(lat),
        "sent_fps": round(found["sent"] / args.seconds, 2),
        "received_fps": round(found["received"] / args.seconds, 2),
        "freezes": sum(g > FREEZE_MS for g in gaps),
        "longest_gap_ms": _round(max(gaps)) if gaps else None,
        **environment(components.unet.device),
        "command": " ".join(["python -m benchmarks.obs_e2e", *(sys.argv[1:] if argv is None else argv)]),
    }
    print(
        f"{result['path']}: {components.name}, {args.size}x{args.size}, "
        f"{args.steps} steps, guidance {args.guidance}"
    )
    if components.placeholder:
        print(f"note: {PLACEHOLDER_NOTE}; only the timings mean something")
    lm = result["latency_ms"]
    print(f"{'':<24}{'p50':>9}{'p95':>9}{'p99':>9}")
    print(f"{'latency ms':<24}{lm['p50'] or 0:>9.1f}{lm['p95'] or 0:>9.1f}{lm['p99'] or 0:>9.1f}")
    print(
        f"sent {result['sent_fps']} fps, received {result['received_fps']} fps, {len(lat)} stamped frames "
        f"back; freezes over {FREEZE_MS:.0f} ms: {result['freezes']}"
    )
    print(json.dumps(result))
    return 0 if lat else 1


def _round(value: float) -> float | None:
    return None if value != value else round(value, 1)


if __name__ == "__main__":
    sys.exit(main())
