"""`stream serve`: the browser app over WebRTC. The only module with asyncio.

Frame path (DESIGN.md "Decisions"): each session's incoming video is drained into a latest-only slot;
one worker thread owns the model and processes the newest frame of each session in turn; the
outgoing track waits for a new processed frame and carries the input's timestamp, strictly
increasing. The event loop only moves frames and messages; it never runs the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import av
import numpy as np
from aiohttp import web
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.contrib.media import MediaRelay
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import SessionDescription
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from stream import stamp
from stream.capture import FrameSink, LatestFrameSlot, SinkError
from stream.config import ConfigError, StreamConfig
from stream.denoiser import FrameResult, StreamDenoiser
from stream.devices import release_device_memory
from stream.models import Components
from stream.monitor import AdaptiveController, LatencyMonitor, build_ladder

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
MAX_BODY = 64 * 1024
SDP = "application/sdp"
VIEWER_CONNECT_TIMEOUT = 15.0  # seconds a WHEP viewer may take to connect before its place is freed
# WHIP/WHEP answers are read by OBS and by pages on other origins.
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type",
    "Access-Control-Expose-Headers": "Location, Link",
}
TELEMETRY_INTERVAL = 0.33  # seconds: about 3 messages a second
# What the page may change live, with the names it uses; anything else is refused.
LIVE_SETTINGS = (
    "prompt",
    "negative_prompt",
    "strength",
    "guidance_scale",
    "steps",
    "seed",
    "latent_feedback",
)


class Denoiser(Protocol):
    """What the worker needs of a per-session denoiser (StreamDenoiser, or a stand-in in tests)."""

    skipped: int

    def process(self, frame: np.ndarray) -> FrameResult: ...

    def update(self, config: StreamConfig) -> None: ...


DenoiserFactory = Callable[[StreamConfig], Denoiser]


@dataclasses.dataclass
class Processed:
    frame: np.ndarray  # HxWx3 uint8 RGB
    pts: int
    time_base: Fraction
    ready: float  # time.perf_counter() when the worker finished it, for the hand-off timing
    video: av.VideoFrame | None = None  # `frame` as the encoders take it (yuv420p), made on the worker


class Session:
    """One peer: its settings, temporal state (inside its denoiser), slots, tracks and stats."""

    def __init__(
        self,
        session_id: str,
        pc: RTCPeerConnection,
        config: StreamConfig,
        *,
        target_fps: float = 24.0,
        adaptive: bool = True,
        stamp: bool = False,
        kind: str = "browser",
    ) -> None:
        self.id = session_id
        self.kind = kind  # "browser" (POST /offer) or "whip" (POST /whip: OBS and other encoders)
        self.pc = pc
        self.config = config  # the user's settings, validated; the worker applies them before the next frame
        self.applied: StreamConfig | None = None  # what the worker's denoiser runs with (adaptive level)
        self.accepted: StreamConfig | None = None  # the user's settings behind `applied`
        self.denoiser: Denoiser | None = None  # created and used only by the worker thread
        self.inputs: LatestFrameSlot[tuple[av.VideoFrame, float]] = LatestFrameSlot()  # (frame, arrival)
        self.output: Processed | None = None
        self.output_ready = asyncio.Event()
        self.source: ProcessedTrack | None = None  # read once, relayed to the page and every WHEP viewer
        self.relay = MediaRelay()  # per session: it keeps its source until the source ends
        self.viewers: dict[str, Viewer] = {}
        self.monitor = LatencyMonitor(target_fps)
        self.adaptive = AdaptiveController(
            self.monitor.budget_ms, build_ladder(config.steps, config.width, config.height), enabled=adaptive
        )
        self.stamp = stamp  # copy the page's frame-ID patch from each input into its output
        self.tasks: list[asyncio.Task[Any]] = []
        self.control: RTCDataChannel | None = None
        self.telemetry: RTCDataChannel | None = None
        self.last_input = time.monotonic()
        self.created = time.monotonic()
        self.closed = False
        self.last_pts = -1  # pts of the last frame sent
        self.last_input_pts: int | None = None

    def output_pts(self, input_pts: int) -> int:
        """The input's timing, kept strictly increasing across the 32-bit RTP clock's wrap-around."""
        if self.last_input_pts is None:
            pts = input_pts
        else:
            pts = self.last_pts + max(1, (input_pts - self.last_input_pts) % 2**32)
        self.last_input_pts, self.last_pts = input_pts, pts
        return pts

    def deliver(self, processed: Processed, timings: dict[str, float], skipped: bool) -> None:
        """Called on the event loop by the worker: newest processed frame wins."""
        if self.closed:
            return
        self.output = processed
        self.monitor.frame_out(timings, skipped)
        self.output_ready.set()

    def refuse(self, message: str) -> None:
        """Tell the page that the worker could not apply its last settings (they were rolled back)."""
        if self.control is not None and self.control.readyState == "open":
            self.control.send(json.dumps({"type": "error", "message": message}))

    def snapshot(self) -> dict[str, Any]:
        self.monitor.drops = self.inputs.drops
        return {
            "session": self.id,
            "kind": self.kind,
            "viewers": len(self.viewers),
            **self.monitor.snapshot(),
            "adaptive": self.adaptive.snapshot(),
            "stamp": self.stamp,
            "settings": {name: getattr(self.config, name) for name in LIVE_SETTINGS},
        }


@dataclasses.dataclass
class Viewer:
    """A WHEP playback peer: receives one session's processed output through the relay."""

    id: str
    session: Session
    pc: RTCPeerConnection
    track: MediaStreamTrack
    closed: bool = False
    answered: float = float("inf")  # time.monotonic() when its answer went out


class FrameEndJitterBuffer(JitterBuffer):
    """aiortc's video jitter buffer, but a frame leaves as soon as its last packet is in.

    aiortc hands a frame to the decoder only when the first packet of the NEXT frame arrives: one
    frame interval (42 ms at 24 FPS) of latency on every frame received. The RTP marker bit flags the
    last packet of a video frame (RFC 7741 for VP8, RFC 6184 for H.264), so a complete run of packets
    from the oldest one up to a marked packet is a whole frame, released at once.
    """

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        frame = super()._remove_frame(sequence_number)  # a frame followed by the next one's packets
        if frame is not None or self._origin is None:
            return frame
        packets: list[Any] = []
        for count in range(self.capacity):
            packet = self._packets[(self._origin + count) % self.capacity]
            if packet is None or (packets and packet.timestamp != packets[0].timestamp):
                return None  # a gap: wait for the missing packet (or the next frame, as aiortc does)
            packets.append(packet)
            if packet.marker:
                self.remove(count + 1)
                data = b"".join(p._data for p in packets)  # type: ignore[attr-defined]
                return JitterFrame(data=data, timestamp=packets[0].timestamp)
        return None


def _low_latency_receiver(pc: RTCPeerConnection, track: MediaStreamTrack) -> None:
    """Give the receiver of `track` the jitter buffer that releases frames at their last packet."""
    for transceiver in pc.getTransceivers():
        receiver = transceiver.receiver
        if receiver.track is track and hasattr(receiver, "_RTCRtpReceiver__jitter_buffer"):
            receiver._RTCRtpReceiver__jitter_buffer = FrameEndJitterBuffer(capacity=512, is_video=True)
            return
    logger.warning("could not lower the receive latency: this aiortc version is not the one expected")


class ModelWorker:
    """The one thread that owns the model: the newest frame of each session, round robin."""

    def __init__(
        self,
        factory: DenoiserFactory,
        loop: asyncio.AbstractEventLoop,
        fallback: StreamConfig,
        on_frame: Callable[[float], None] | None = None,
        on_output: Callable[[Session, np.ndarray], None] | None = None,
    ) -> None:
        self.factory = factory
        self.on_frame = on_frame  # called with each processed frame's model time in seconds
        self.on_output = on_output  # called with each processed frame (the virtual camera), on this thread
        self.fallback = fallback  # the server's settings, for a session whose own cannot run
        self.loop = loop
        self.sessions: dict[str, Session] = {}
        self.recent: dict[str, tuple[float, float]] = {}  # session id -> (model ms of its last frame, when)
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="stream-model", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=10)

    def add(self, session: Session) -> None:
        with self.lock:
            self.sessions[session.id] = session
        self.wake.set()

    def remove(self, session: Session) -> None:
        with self.lock:
            self.sessions.pop(session.id, None)
            self.recent.pop(session.id, None)
        self.wake.set()

    def notify(self) -> None:
        self.wake.set()

    def _run(self) -> None:
        while not self.stopping:
            self.wake.wait(timeout=0.5)
            self.wake.clear()
            self._pass()  # in its own frame: no session stays referenced between passes
        with self.lock:
            for session in self.sessions.values():
                session.denoiser = None

    def _pass(self) -> None:
        """The newest frame of each session, once round."""
        with self.lock:
            sessions = list(self.sessions.values())
        for session in sessions:
            if self.stopping:
                break
            item = session.inputs.get(timeout=0)
            if item is not None and not session.closed:
                self._process(session, *item)
            if session.closed:
                session.denoiser = None  # free its latents, noise and embeddings now
                release_device_memory()
        # A frame that arrived during the pass is picked up at once, not after the next wake.
        if any(s.inputs.ready for s in sessions if not s.closed):
            self.wake.set()

    def _process(self, session: Session, frame: av.VideoFrame, arrival: float) -> None:
        # 1. settings: the user's, at the adaptive controller's current level
        requested = session.config
        config = session.adaptive.apply(requested)
        try:
            denoiser = session.denoiser
            if denoiser is None:
                denoiser = session.denoiser = self.factory(config)
            elif config is not session.applied:
                denoiser.update(config)
            session.applied, session.accepted = config, requested
        except ConfigError as exc:
            if config is not requested:  # the model cannot run this adaptive level: never try it again
                session.adaptive.drop_level(str(exc))
                logger.warning("session %s: adaptive level refused by the model: %s", session.id, exc)
                return
            # a setting this model cannot run (e.g. LCM at a too low strength): roll back, tell the page
            session.config = session.accepted or self.fallback
            self._call(session.refuse, str(exc))
            return
        # 2. the frame through the model
        waited = (time.monotonic() - arrival) * 1000.0  # how long the frame sat in the slot
        try:
            pixels = frame.to_ndarray(format="rgb24")
            result = denoiser.process(pixels)
        except Exception:  # a bad frame must not take the worker down
            logger.exception("session %s: processing a frame failed", session.id)
            return
        out = result.frame
        if session.stamp and out.shape == pixels.shape:
            out = stamp.copy_patch(pixels, out.copy())
        # 3. the budget: adapt steps and size to the model time of a round over all active sessions
        timings = {**result.timings, "wait": waited}
        if not result.skipped:
            if self.on_frame is not None:
                self.on_frame(result.timings["total"] / 1000.0)
            timings["round"] = self._round_ms(session, result.timings["total"])
            change = session.adaptive.observe(timings["round"])
            if change is not None:
                logger.info(
                    "session %s: adaptive %s -> %s: %s",
                    session.id,
                    change["from"],
                    change["to"],
                    change["reason"],
                )
        if self.on_output is not None:
            try:
                self.on_output(session, out)
            except Exception:  # the virtual camera failing must not stop the stream
                logger.exception("session %s: publishing a frame failed", session.id)
        video = _to_video(out) if session.source is not None else None  # someone sends it: convert here
        processed = Processed(
            out, int(frame.pts or 0), frame.time_base or Fraction(1, 90000), time.perf_counter(), video
        )
        self._call(session.deliver, processed, timings, result.skipped)

    def _round_ms(self, session: Session, total: float) -> float:
        """Model ms of one round-robin round: the last frame of each session active in the last second.

        Sessions share the worker, so each gets a frame per round; a session alone: its own time.
        """
        now = time.monotonic()
        with self.lock:
            self.recent[session.id] = (total, now)
            stale = [sid for sid, (_, at) in self.recent.items() if now - at > 1.0]
            for sid in stale:
                del self.recent[sid]
            return sum(ms for ms, _ in self.recent.values())

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed (shutdown)
            self.loop.call_soon_threadsafe(callback, *args)


class ProcessedTrack(MediaStreamTrack):
    """The outgoing video: waits for the session's next processed frame; input timing, strictly increasing."""

    kind = "video"

    def __init__(self, session: Session) -> None:
        super().__init__()
        self.session = session

    async def recv(self) -> av.VideoFrame:
        session = self.session
        while True:
            if self.readyState != "live" or session.closed:
                raise MediaStreamError
            await session.output_ready.wait()
            session.output_ready.clear()
            if session.output is not None:
                break
        out = session.output
        frame = out.video or _to_video(out.frame)  # made by the worker, unless nobody was sending then
        frame.pts, frame.time_base = session.output_pts(out.pts), out.time_base
        session.monitor.sample("handoff", (time.perf_counter() - out.ready) * 1000.0)
        return frame


class StreamServer:
    """Sessions, signaling and stats for one loaded model."""

    def __init__(
        self,
        config: StreamConfig,
        factory: DenoiserFactory,
        *,
        model_name: str,
        placeholder: bool,
        max_sessions: int = 4,
        token: str | None = None,
        ice_servers: list[str] | None = None,
        idle_timeout: float = 30.0,
        target_fps: float = 24.0,
        adaptive: bool = True,
        max_viewers: int = 16,
        virtualcam: FrameSink | None = None,
    ) -> None:
        self.config = config
        self.max_viewers = max_viewers
        self.virtualcam = virtualcam  # gets the output of the newest session (`published`)
        self.published: Session | None = None
        self.viewers: dict[str, Viewer] = {}
        self.target_fps = LatencyMonitor(target_fps).target_fps  # validated
        self.adaptive = adaptive
        self.factory = factory
        self.model_name = model_name
        self.placeholder = placeholder
        self.max_sessions = max_sessions
        self.token = token
        self.ice_servers = [parse_ice_server(s) for s in ice_servers or []]
        self.idle_timeout = idle_timeout
        self.sessions: dict[str, Session] = {}
        self.worker: ModelWorker | None = None
        self._reaper: asyncio.Task[None] | None = None
        self.started = time.monotonic()
        self.sessions_started = 0
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Metrics(self))
        self.frame_seconds = Histogram(
            "stream_frame_seconds",
            "Model time per processed frame (preprocess to postprocess), all sessions",
            buckets=(0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )

    @classmethod
    def for_components(cls, config: StreamConfig, components: Components, **options: Any) -> StreamServer:
        """A server whose sessions each get a StreamDenoiser over the one loaded set of `components`."""
        return cls(
            config,
            lambda session_config: StreamDenoiser(components, session_config),
            model_name=components.name,
            placeholder=components.placeholder,
            **options,
        )

    # ------------------------------------------------------------------ app
    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._errors, self._auth])
        app.router.add_get("/", self.index)
        app.router.add_get("/health", self.health)
        app.router.add_get("/stats", self.stats)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/offer", self.offer)
        app.router.add_get("/view", self.view)
        # WHIP (RFC 9725) ingest and WHEP playback; no trickle ICE: offers carry all their candidates
        app.router.add_post("/whip", self.whip)
        app.router.add_delete("/whip/{session}", self.whip_delete)
        app.router.add_post("/whep", self.whep)
        app.router.add_post("/whep/{session}", self.whep)
        app.router.add_delete("/whep/{session}/{viewer}", self.whep_delete)
        for path in ("/whip", "/whip/{session}", "/whep", "/whep/{session}", "/whep/{session}/{viewer}"):
            app.router.add_route("OPTIONS", path, self.preflight)
            app.router.add_route("PATCH", path, self.no_trickle)
        if WEB_DIR.is_dir():
            app.router.add_static("/static", WEB_DIR, follow_symlinks=False)
        app.on_startup.append(self._startup)
        app.on_shutdown.append(self._shutdown)
        return app

    async def _startup(self, app: web.Application) -> None:
        self.worker = ModelWorker(
            self.factory,
            asyncio.get_running_loop(),
            self.config,
            on_frame=self.frame_seconds.observe,
            on_output=self._publish if self.virtualcam is not None else None,
        )
        self.worker.start()
        self._reaper = asyncio.create_task(self._reap())

    async def _shutdown(self, app: web.Application) -> None:
        if self._reaper:
            self._reaper.cancel()
        await asyncio.gather(
            *(self.close_session(s, "server shutting down") for s in list(self.sessions.values()))
        )
        if self.worker:
            await asyncio.to_thread(self.worker.stop)

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        cors = request.path.startswith(("/whip", "/whep"))  # cross-origin clients must see the status
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"request body too large: at most {MAX_BODY // 1024} KiB", cors=cors)
        except web.HTTPException as exc:
            if exc.status >= 400 and exc.content_type != "application/json":
                response = _error(exc.status, exc.reason, cors=cors)
                if "Allow" in exc.headers:  # 405 says which methods are
                    response.headers["Allow"] = exc.headers["Allow"]
                return response
            raise

    @web.middleware
    async def _auth(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        guarded = request.path in ("/offer", "/stats", "/metrics") or request.path.startswith(
            ("/whip", "/whep")
        )
        if self.token and guarded and request.method != "OPTIONS":  # CORS preflights carry no token
            given = request.headers.get("Authorization", "")
            expected = f"Bearer {self.token}".encode()
            if not secrets.compare_digest(given.encode("utf-8", "surrogateescape"), expected):
                return _error(
                    401,
                    "missing or wrong token: send the header 'Authorization: Bearer <token>'",
                    cors=request.path.startswith(("/whip", "/whep")),
                )
        return await handler(request)

    # ------------------------------------------------------------------ handlers
    async def index(self, request: web.Request) -> web.StreamResponse:
        page = WEB_DIR / "index.html"
        if not page.is_file():
            return _error(404, "the web page is not installed (web/index.html is missing)")
        return web.FileResponse(page)

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "ok",
                "model": self.model_name,
                "placeholder": self.placeholder,
                "sessions": len(self.sessions),
                "max_sessions": self.max_sessions,
                "auth": bool(self.token),
                "ice_servers": [
                    {"urls": s.urls, "username": s.username, "credential": s.credential}
                    for s in self.ice_servers
                ],
                "settings": {
                    name: getattr(self.config, name) for name in (*LIVE_SETTINGS, "width", "height")
                },
            }
        )

    async def stats(self, request: web.Request) -> web.Response:
        sessions = [s.snapshot() for s in self.sessions.values()]
        return web.json_response(
            {
                "model": self.model_name,
                "placeholder": self.placeholder,
                "uptime_s": round(time.monotonic() - self.started, 1),
                "target_fps": self.target_fps,
                "budget_ms": round(1000.0 / self.target_fps, 2),
                "adaptive": self.adaptive,
                "sessions": sessions,
                "session_count": len(sessions),
                "fps_out": round(sum(s["fps_out"] for s in sessions), 2),
                "fps_in": round(sum(s["fps_in"] for s in sessions), 2),
                "drops": sum(s["drops"] for s in sessions),
                "skipped": sum(s["skipped"] for s in sessions),
            }
        )

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def offer(self, request: web.Request) -> web.Response:
        # 1. check the request: JSON {sdp, type: "offer", settings?}
        try:
            body = await request.json()
        except web.HTTPRequestEntityTooLarge:
            raise
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            return _error(400, 'the body must be JSON: {"sdp": "...", "type": "offer"}')
        if not isinstance(body, dict):
            return _error(400, 'the body must be a JSON object: {"sdp": "...", "type": "offer"}')
        for field in ("sdp", "type"):
            if not isinstance(body.get(field), str) or not body[field]:
                return _error(400, f"missing or empty field '{field}' (a string)")
        if body["type"] != "offer":
            return _error(400, f"type must be 'offer', got {body['type']!r}")
        stamped = body.get("stamp", False)
        if not isinstance(stamped, bool):
            return _error(400, f"stamp must be true or false, got {stamped!r}")
        problem = _check_offer(body["sdp"])
        if problem:
            return _error(400, problem)
        try:
            config = apply_settings(self.config, body.get("settings") or {})
        except ConfigError as exc:
            return _error(400, f"bad settings: {exc}")
        started = await self.start_session(body["sdp"], config, stamp=stamped)
        if isinstance(started, web.Response):
            return started
        answer = started.pc.localDescription
        return web.json_response({"sdp": answer.sdp, "type": answer.type, "session": started.id})

    async def start_session(
        self, sdp: str, config: StreamConfig, *, stamp: bool = False, kind: str = "browser"
    ) -> Session | web.Response:
        """Negotiate a new session from a checked offer; an error response when it cannot start."""
        if len(self.sessions) >= self.max_sessions:
            return _error(503, f"the server is full: {self.max_sessions} sessions at once; try again later")
        pc = RTCPeerConnection(RTCConfiguration(iceServers=self.ice_servers))
        session = Session(
            secrets.token_urlsafe(8),
            pc,
            config,
            target_fps=self.target_fps,
            adaptive=self.adaptive,
            stamp=stamp,
            kind=kind,
        )
        self.sessions_started += 1
        self.sessions[session.id] = session  # holds its place while negotiating (closing frees it)
        self._wire(session)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
        except Exception as exc:  # aiortc raises ValueError, KeyError, ... on malformed SDP
            await self.close_session(session, "bad offer")
            return _error(400, f"invalid SDP offer: {exc or type(exc).__name__}")
        if not any(t.kind == "video" for t in pc.getTransceivers()):
            await self.close_session(session, "no video")
            return _error(400, "the offer has no video track: send the camera as a video track")
        assert self.worker is not None
        self.worker.add(session)
        self.published = session
        logger.info("%s session %s started (%d/%d)", kind, session.id, len(self.sessions), self.max_sessions)
        return session

    # ------------------------------------------------------------------ WHIP, WHEP, /view
    async def view(self, request: web.Request) -> web.StreamResponse:
        page = WEB_DIR / "view.html"
        if not page.is_file():
            return _error(404, "the viewer page is not installed (web/view.html is missing)")
        return web.FileResponse(page)

    async def whip(self, request: web.Request) -> web.Response:
        """WHIP ingest (RFC 9725): an SDP offer in, 201 with the answer and the session's Location.

        `?stamp=1` copies the sender's frame-ID patch into the output (stream/stamp.py), for latency
        measurements.
        """
        sdp = await _read_sdp(request)
        if isinstance(sdp, web.Response):
            return sdp
        problem = _check_offer(sdp)
        if problem:
            return _error(400, problem, cors=True)
        stamped = request.query.get("stamp", "0")
        if stamped not in ("0", "1"):
            return _error(400, f"stamp must be 0 or 1, got {stamped!r}", cors=True)
        started = await self.start_session(sdp, self.config, kind="whip", stamp=stamped == "1")
        if isinstance(started, web.Response):
            started.headers.update(CORS)
            return started
        return self._created(started.pc, f"/whip/{started.id}")

    async def whip_delete(self, request: web.Request) -> web.Response:
        session = self.sessions.get(request.match_info["session"])
        if session is None or session.kind != "whip":
            return _error(
                404, f"no WHIP session {request.match_info['session']!r} (ended already?)", cors=True
            )
        await self.close_session(session, "ended by its WHIP client (DELETE)")
        return web.Response(status=200, headers=CORS)

    async def whep(self, request: web.Request) -> web.Response:
        """WHEP playback: an SDP offer in, 201 with an answer that sends a session's processed output."""
        sdp = await _read_sdp(request)
        if isinstance(sdp, web.Response):
            return sdp
        wanted = request.match_info.get("session")
        if wanted is not None:
            session = self.sessions.get(wanted)
            if session is None:
                return _error(404, f"no session {wanted!r}: see /stats for the running ones", cors=True)
        elif self.published is not None and not self.published.closed:
            session = self.published
        else:
            return _error(
                404, "no session is running yet: start one in the page or send with WHIP", cors=True
            )
        problem = _check_offer(sdp)
        if problem:
            return _error(400, problem, cors=True)
        if len(self.viewers) >= self.max_viewers:
            return _error(503, f"too many viewers: {self.max_viewers} at once; try again later", cors=True)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=self.ice_servers))
        viewer = Viewer(secrets.token_urlsafe(8), session, pc, self._output_track(session))
        self.viewers[viewer.id] = viewer
        session.viewers[viewer.id] = viewer

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await self.close_viewer(viewer, f"connection {pc.connectionState}")

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            video = [t for t in pc.getTransceivers() if t.kind == "video"]
            if not video:
                raise ValueError("the offer has no video section to play the stream into")
            pc.addTrack(viewer.track)
            for transceiver in pc.getTransceivers():
                if transceiver.kind != "video":
                    transceiver.direction = "inactive"
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:
            await self.close_viewer(viewer, "bad offer")
            return _error(400, f"invalid SDP offer: {exc or type(exc).__name__}", cors=True)
        if viewer.closed:  # its session ended while the answer was being made
            return _error(404, f"session {session.id!r} ended", cors=True)
        viewer.answered = time.monotonic()  # it has VIEWER_CONNECT_TIMEOUT from its answer on
        logger.info("viewer %s of session %s started", viewer.id, session.id)
        return self._created(pc, f"/whep/{session.id}/{viewer.id}")

    async def whep_delete(self, request: web.Request) -> web.Response:
        viewer = self.viewers.get(request.match_info["viewer"])
        if viewer is None or viewer.session.id != request.match_info["session"]:
            return _error(404, f"no viewer {request.match_info['viewer']!r} (ended already?)", cors=True)
        await self.close_viewer(viewer, "ended by its WHEP client (DELETE)")
        return web.Response(status=200, headers=CORS)

    async def preflight(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers=CORS)  # no ICE servers here: they may carry credentials

    async def no_trickle(self, request: web.Request) -> web.Response:
        response = _error(
            405,
            "trickle ICE and ICE restarts (PATCH) are not supported: send every candidate in the offer",
            cors=True,
        )
        response.headers["Allow"] = "POST, DELETE, OPTIONS"
        return response

    def _created(self, pc: RTCPeerConnection, location: str) -> web.Response:
        headers = {**CORS, "Location": location, **self._ice_links()}
        return web.Response(status=201, text=pc.localDescription.sdp, content_type=SDP, headers=headers)

    def _ice_links(self) -> dict[str, str]:
        """RFC 9725 section 4.6: the ICE servers as Link headers (one header, comma-separated)."""
        links = []
        for server in self.ice_servers:
            urls = server.urls if isinstance(server.urls, list) else [server.urls]
            for url in urls:
                link = f'<{url}>; rel="ice-server"'
                if server.username:
                    link += f'; username="{server.username}"; credential="{server.credential}"'
                links.append(link)
        return {"Link": ", ".join(links)} if links else {}

    def _output_track(self, session: Session) -> MediaStreamTrack:
        """A consumer's view of the session's output: one processed track, relayed without buffering."""
        if session.source is None:
            session.source = ProcessedTrack(session)
        return session.relay.subscribe(session.source, buffered=False)

    def _publish(self, session: Session, frame: np.ndarray) -> None:
        """On the worker thread: the newest session's output goes to the virtual camera."""
        camera = self.virtualcam
        if session is self.published and camera is not None:
            try:
                camera.write(frame)
            except SinkError as exc:  # the camera went away: say so once, keep streaming
                logger.error("virtual camera stopped, no longer publishing: %s", exc)
                self.virtualcam = None

    async def close_viewer(self, viewer: Viewer, reason: str) -> None:
        if viewer.closed:
            return
        viewer.closed = True
        logger.info("viewer %s closed: %s", viewer.id, reason)
        self.viewers.pop(viewer.id, None)
        viewer.session.viewers.pop(viewer.id, None)
        viewer.track.stop()
        with contextlib.suppress(Exception):
            await viewer.pc.close()

    # ------------------------------------------------------------------ sessions
    def _wire(self, session: Session) -> None:
        pc = session.pc

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "video":
                _low_latency_receiver(pc, track)
                if session.kind == "browser":  # the page shows the output; a WHIP encoder only sends
                    pc.addTrack(self._output_track(session))
                session.tasks.append(asyncio.create_task(self._drain_video(session, track)))
            else:  # audio (OBS sends it): consumed and discarded, or it would pile up
                session.tasks.append(asyncio.create_task(_discard(track)))

        @pc.on("datachannel")
        def on_datachannel(channel: RTCDataChannel) -> None:
            if channel.label == "control":
                session.control = channel
                channel.on("message", lambda message: self.on_control(session, message))
            elif channel.label == "telemetry":
                session.telemetry = channel
                session.tasks.append(asyncio.create_task(self._telemetry(session, channel)))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            logger.info("session %s: connection %s", session.id, pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                await self.close_session(session, f"connection {pc.connectionState}")

    async def _drain_video(self, session: Session, track: MediaStreamTrack) -> None:
        """Incoming frames into the latest-only slot; the worker takes the newest."""
        try:
            while not session.closed:
                frame = await track.recv()
                if not isinstance(frame, av.VideoFrame):
                    continue
                session.last_input = time.monotonic()
                session.monitor.frame_in()
                session.inputs.put((frame, session.last_input))
                if self.worker:
                    self.worker.notify()
        except MediaStreamError:
            pass

    async def _telemetry(self, session: Session, channel: RTCDataChannel) -> None:
        while not session.closed:
            await asyncio.sleep(TELEMETRY_INTERVAL)
            if channel.readyState == "open":
                channel.send(json.dumps({"type": "telemetry", **session.snapshot()}))

    def on_control(self, session: Session, message: object) -> None:
        """A settings change from the page: validated here, applied by the worker from the next frame."""
        channel = session.control
        try:
            data = json.loads(message) if isinstance(message, str) and len(message) <= MAX_BODY else None
        except (ValueError, RecursionError):  # not JSON, too deep, numbers too long
            data = None
        try:
            if not isinstance(data, dict) or data.get("type") != "settings":
                raise ConfigError('control messages are JSON {"type": "settings", ...} of at most 64 KiB')
            changes = {k: v for k, v in data.items() if k != "type"}
            session.config = apply_settings(session.config, changes)
            reply = {"type": "applied", "settings": {k: getattr(session.config, k) for k in changes}}
        except ConfigError as exc:
            reply = {"type": "error", "message": str(exc)}
        if channel is not None and channel.readyState == "open":
            channel.send(json.dumps(reply))

    async def close_session(self, session: Session, reason: str) -> None:
        if session.closed:
            return
        session.closed = True
        logger.info("session %s closed: %s", session.id, reason)
        self.sessions.pop(session.id, None)
        if self.published is session:  # the virtual camera and `POST /whep` move to the newest one left
            self.published = max(self.sessions.values(), key=lambda s: s.created, default=None)
        await asyncio.gather(
            *(self.close_viewer(v, "its session ended") for v in list(session.viewers.values()))
        )
        if self.worker:
            self.worker.remove(session)
        session.inputs.close()
        session.denoiser = None  # the worker drops its own reference after any frame in flight
        session.output = None
        session.output_ready.set()
        for task in session.tasks:
            task.cancel()
        await asyncio.gather(*session.tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await session.pc.close()

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self._reap_once()  # its own frame: no session stays referenced between rounds

    async def _reap_once(self) -> None:
        """Close sessions whose peer went quiet (no video for idle_timeout seconds), and viewers that
        never connected."""
        now = time.monotonic()
        for session in list(self.sessions.values()):
            if now - session.last_input > self.idle_timeout:
                await self.close_session(session, f"idle for {self.idle_timeout:.0f} s")
        for viewer in list(self.viewers.values()):
            if viewer.pc.connectionState != "connected" and now - viewer.answered > VIEWER_CONNECT_TIMEOUT:
                await self.close_viewer(viewer, f"not connected after {VIEWER_CONNECT_TIMEOUT:.0f} s")


class _Metrics(Collector):
    """`/metrics`: the server's and each open session's numbers, read at scrape time."""

    def __init__(self, server: StreamServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server = self.server
        info = GaugeMetricFamily("stream_model_info", "The loaded model", labels=["model", "placeholder"])
        info.add_metric([server.model_name, str(server.placeholder).lower()], 1)
        yield info
        yield GaugeMetricFamily("stream_sessions", "Open sessions", value=len(server.sessions))
        yield GaugeMetricFamily("stream_max_sessions", "Sessions allowed at once", value=server.max_sessions)
        yield CounterMetricFamily(
            "stream_sessions_started",
            "Sessions started since the server started",
            value=server.sessions_started,
        )
        yield GaugeMetricFamily(
            "stream_budget_seconds", "Frame-time budget: 1 / target FPS", value=1.0 / server.target_fps
        )
        labels = ["session"]
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            "frames_in": CounterMetricFamily("stream_frames_in", "Frames received", labels=labels),
            "frames": CounterMetricFamily("stream_frames_out", "Frames processed and sent", labels=labels),
            "drops": CounterMetricFamily(
                "stream_dropped_frames", "Input frames replaced before the model took them", labels=labels
            ),
            "skipped": CounterMetricFamily(
                "stream_skipped_frames",
                "Frames the similarity filter answered without the model",
                labels=labels,
            ),
            "fps_in": GaugeMetricFamily(
                "stream_fps_in", "Input frame rate over the recent window", labels=labels
            ),
            "fps_out": GaugeMetricFamily(
                "stream_fps_out", "Output frame rate over the recent window", labels=labels
            ),
        }
        holds = GaugeMetricFamily(
            "stream_budget_holds", "1 when p95 frame time is within budget", labels=labels
        )
        stages = GaugeMetricFamily(
            "stream_stage_latency_seconds",
            "Recent per-stage latency quantiles",
            labels=["session", "stage", "quantile"],
        )
        level = GaugeMetricFamily(
            "stream_adaptive_level", "Adaptive level (0 = the configured steps and size)", labels=labels
        )
        steps = GaugeMetricFamily("stream_steps", "Denoising steps now run per frame", labels=labels)
        width = GaugeMetricFamily("stream_model_width", "Model width now used, px", labels=labels)
        height = GaugeMetricFamily("stream_model_height", "Model height now used, px", labels=labels)
        changes = CounterMetricFamily("stream_adaptive_changes", "Adaptive level changes", labels=labels)
        for session in list(server.sessions.values()):
            snap = session.snapshot()
            key = [session.id]
            for name, family in families.items():
                family.add_metric(key, snap[name])
            if snap["budget"]["holds"] is not None:
                holds.add_metric(key, float(snap["budget"]["holds"]))
            for stage, values in snap["latency_ms"].items():
                for q, name in (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99")):
                    if values[name] is not None:
                        stages.add_metric([session.id, stage, q], values[name] / 1000.0)
            adaptive = snap["adaptive"]
            level.add_metric(key, adaptive["level"])
            steps.add_metric(key, adaptive["steps"])
            width.add_metric(key, adaptive["width"])
            height.add_metric(key, adaptive["height"])
            changes.add_metric(key, adaptive["change_count"])
        yield from families.values()
        yield from (holds, stages, level, steps, width, height, changes)


def apply_settings(config: StreamConfig, changes: object) -> StreamConfig:
    """Validated live settings: only LIVE_SETTINGS, each checked by StreamConfig."""
    if not isinstance(changes, dict):
        raise ConfigError("settings must be a JSON object")
    unknown = sorted(set(changes) - set(LIVE_SETTINGS))
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(unknown)}; live settings: {', '.join(LIVE_SETTINGS)}"
        )
    if not changes:
        return config
    return config.replace(**changes)


def parse_ice_server(text: str) -> RTCIceServer:
    """`stun:host:port` or `turn:user:password@host:port` (also turns:)."""
    scheme, sep, rest = text.partition(":")
    if not sep or scheme not in ("stun", "turn", "turns") or not rest:
        raise ConfigError(
            f"ice server must look like stun:host:port or turn:user:pass@host:port, got {text!r}"
        )
    if "@" in rest:
        creds, _, host = rest.rpartition("@")
        user, _, password = creds.partition(":")
        return RTCIceServer(urls=f"{scheme}:{host}", username=user, credential=password)
    return RTCIceServer(urls=text)


async def _discard(track: MediaStreamTrack) -> None:
    with contextlib.suppress(MediaStreamError):
        while True:
            await track.recv()


def _error(status: int, message: str, cors: bool = False) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=CORS if cors else None)


def _to_video(frame: np.ndarray) -> av.VideoFrame:
    """An RGB frame as the video encoders take it: yuv420p, converted once.

    The relay hands this one frame object to every consumer's encoder thread; a frame each encoder had
    to convert itself would share PyAV's converter between threads (which breaks the second viewer).
    """
    return av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")


def _check_offer(sdp: str) -> str | None:
    """What is wrong with an SDP offer before negotiating it, or None."""
    try:
        kinds = [media.kind for media in SessionDescription.parse(sdp).media]
    except Exception as exc:  # aiortc's parser asserts on malformed lines
        return f"invalid SDP offer: {exc or type(exc).__name__}"
    if not kinds:
        return "invalid SDP offer: it has no media sections (m= lines)"
    if "video" not in kinds:
        return "the offer has no video track: send the camera as a video track"
    return None


async def _read_sdp(request: web.Request) -> str | web.Response:
    """A WHIP/WHEP request body: an SDP offer as application/sdp text."""
    if request.content_type != SDP:
        got = request.content_type or "none"
        return _error(415, f"the body must be an SDP offer with Content-Type: {SDP}, got {got}", cors=True)
    try:
        sdp = (await request.read()).decode("utf-8")
    except UnicodeDecodeError:
        return _error(400, "the SDP offer is not UTF-8 text", cors=True)
    if not sdp.strip():
        return _error(400, "the body is empty: send the SDP offer", cors=True)
    return sdp


class ServerThread:
    """`stream serve`'s app on 127.0.0.1 in a thread with its own event loop."""

    def __init__(self, server: StreamServer) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.runner = web.AppRunner(self.server.app())
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())

    def __enter__(self) -> ServerThread:
        self.thread.start()
        assert self.ready.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
