"""`stream serve`: the aiohttp app. Routes, auth, lifecycle, /health and /stats; sessions' data channels
and clean-up. The event loop only moves frames and messages; it never runs the model (server/worker.py)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.resources
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web
from aiortc import (
    MediaStreamTrack,
)
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest

from stream.config import LIVE_SETTINGS, StreamConfig
from stream.denoiser import StreamDenoiser
from stream.engine import Engine
from stream.media import FrameSink, SinkError
from stream.models import Components
from stream.monitor import LatencyMonitor
from stream.server import auth, signaling
from stream.server.limits import Limits
from stream.server.listen import ReadingGuard, read_whole
from stream.server.metrics import Metrics
from stream.server.rtc import parse_ice_server, quick_consent
from stream.server.session import (
    MAX_BODY,
    TEXT_SETTINGS,
    DenoiserFactory,
    ProcessedTrack,
    Session,
    Viewer,
)
from stream.server.signaling import error
from stream.server.worker import ModelWorker
from stream.sizes import allowed_sizes, components_multiple, native_side

logger = logging.getLogger(__name__)

VIEWER_CONNECT_TIMEOUT = 15.0  # seconds a WHEP viewer may take to connect before its place is freed

# The page ships inside the package (package data), so a plain `pip install .` serves it too.
WEB_DIR = Path(str(importlib.resources.files("stream") / "web"))


class StreamServer:
    """Sessions, signaling and stats for one loaded model."""

    # The signaling handlers the routes call; the cluster's front (stream/cluster/) routes them to workers.
    signaling: Any = signaling

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
        batching: bool = True,
        sizes: list[tuple[int, int]] | None = None,
        limits: Limits | None = None,
        tokenize: Callable[[str], object] | None = None,
    ) -> None:
        self.config = config
        self.limits = limits or Limits()  # what one peer may cost (stream/server/limits.py)
        self.tokenize = tokenize  # text -> tokens, safe off the model thread (Engine.tokenize), or None
        self.batching = batching  # sessions of one size share one batch per round (False: one at a time)
        # the sizes a session may pick (the page's size menu); the server's own size is one of them
        self.sizes = sorted(
            {*(sizes or []), (config.width, config.height)}, key=lambda wh: (wh[0] * wh[1], wh)
        )
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
        self._closing: set[asyncio.Future[None]] = set()  # close_later's tasks, held until done
        self.reading: ReadingGuard | None = None  # set by listen.serve: slow requests are bounded
        self.started = time.monotonic()
        self.sessions_started = 0
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(Metrics(self))
        self.frame_seconds = Histogram(
            "stream_frame_seconds",
            "Model time per processed frame (preprocess to postprocess), all sessions",
            buckets=(0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )

    @classmethod
    def for_components(cls, config: StreamConfig, components: Components, **options: Any) -> StreamServer:
        """A server whose sessions each get a StreamDenoiser over the one loaded set of `components`."""
        if "sizes" not in options:
            multiple, native = components_multiple(components), native_side(components)
            options["sizes"] = allowed_sizes(multiple, native, (config.width, config.height))
        options.setdefault("tokenize", lambda text: Engine.shared(components, config).tokenize(text))
        return cls(
            config,
            lambda session_config: StreamDenoiser(components, session_config),
            model_name=components.name,
            placeholder=components.placeholder,
            **options,
        )

    # ------------------------------------------------------------------ app
    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=MAX_BODY, middlewares=[self._errors, read_whole(self), auth.middleware(self)]
        )
        signaling = self.signaling  # the module's handlers, or the cluster front's
        app.router.add_get("/", self.index)
        app.router.add_get("/health", self.health)
        app.router.add_get("/stats", self.stats)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/offer", functools.partial(signaling.offer, self))
        app.router.add_get("/view", self.view)
        # WHIP (RFC 9725) ingest and WHEP playback; no trickle ICE: offers carry all their candidates
        app.router.add_post("/whip", functools.partial(signaling.whip, self))
        app.router.add_delete("/whip/{session}", functools.partial(signaling.whip_delete, self))
        app.router.add_post("/whep", functools.partial(signaling.whep, self))
        app.router.add_post("/whep/{session}", functools.partial(signaling.whep, self))
        app.router.add_delete("/whep/{session}/{viewer}", functools.partial(signaling.whep_delete, self))
        for path in ("/whip", "/whip/{session}", "/whep", "/whep/{session}", "/whep/{session}/{viewer}"):
            app.router.add_route("OPTIONS", path, functools.partial(signaling.preflight, self))
            app.router.add_route("PATCH", path, functools.partial(signaling.no_trickle, self))
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
            batching=self.batching,
            on_failed=self._session_failed,
            max_side=self.limits.max_output_side,
        )
        self.worker.start()
        quick_consent()  # a peer that vanishes is noticed in seconds, not 30 s
        self._reaper = asyncio.create_task(self._reap())

    def _session_failed(self, session: Session, reason: str) -> None:
        """On the loop: the worker gave up on a session that kept failing."""
        self.close_later(session, reason)

    def close_later(self, session: Session, reason: str) -> None:
        """Close a session from a callback (not in one of its own tasks, which closing cancels)."""
        task = asyncio.ensure_future(self.close_session(session, reason))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def unavailable(self) -> str | None:
        """Why the server cannot take sessions now (its model worker stopped), or None."""
        if self.worker is not None and not self.worker.alive:
            return self.worker.failure or "the model worker is not running"
        return None

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
            return error(413, f"request body too large: at most {MAX_BODY // 1024} KiB", cors=cors)
        except web.HTTPException as exc:
            if exc.status >= 400 and exc.content_type != "application/json":
                response = error(exc.status, exc.reason, cors=cors)
                if "Allow" in exc.headers:  # 405 says which methods are
                    response.headers["Allow"] = exc.headers["Allow"]
                return response
            raise

    # ------------------------------------------------------------------ handlers
    async def index(self, request: web.Request) -> web.StreamResponse:
        page = WEB_DIR / "index.html"
        if not page.is_file():
            return error(
                404,
                "the web page is not installed (stream/web/index.html is missing)",
            )
        return web.FileResponse(page)

    async def health(self, request: web.Request) -> web.Response:
        problem = self.unavailable()
        return web.json_response(
            {
                "status": "ok" if problem is None else "error",
                **({"error": problem} if problem else {}),
                "model": self.model_name,
                "placeholder": self.placeholder,
                "sessions": len(self.sessions),
                "max_sessions": self.max_sessions,
                "auth": bool(self.token),
                "ice_servers": self.ice_servers_for(request),
                "settings": {name: getattr(self.config, name) for name in LIVE_SETTINGS},
                "sizes": [[w, h] for w, h in self.sizes],
            },
            status=200 if problem is None else 503,
        )

    def ice_servers_for(self, request: web.Request) -> list[dict[str, Any]]:
        """The ICE servers: credentials (TURN) only to those who may start sessions; the rest get the
        addresses."""
        return [
            {"urls": s.urls, "username": s.username, "credential": s.credential}
            if self.token is None or auth.is_admin(self, request)
            else {"urls": s.urls}
            for s in self.ice_servers
        ]

    async def stats(self, request: web.Request) -> web.Response:
        sessions = [s.snapshot() for s in self.sessions.values()]
        return web.json_response(self.stats_body(request, sessions, self.model_name, self.placeholder))

    def stats_body(
        self, request: web.Request, sessions: list[dict[str, Any]], model: str, placeholder: bool
    ) -> dict[str, Any]:
        """/stats of these sessions' snapshots; users' prompts only to the server's token."""
        if not auth.is_admin(self, request):
            for snap in sessions:
                snap["settings"] = {k: v for k, v in snap["settings"].items() if k not in TEXT_SETTINGS}
        return {
            "model": model,
            "placeholder": placeholder,
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

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def view(self, request: web.Request) -> web.StreamResponse:
        page = WEB_DIR / "view.html"
        if not page.is_file():
            return error(
                404,
                "the viewer page is not installed (stream/web/view.html is missing)",
            )
        return web.FileResponse(page)

    def output_track(self, session: Session) -> MediaStreamTrack:
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
    async def close_session(self, session: Session, reason: str) -> None:
        if session.closed:
            return
        session.closed = True
        logger.info(
            "session %s left after %.0f s and %d frames: %s",
            session.id,
            time.monotonic() - session.created,
            session.monitor.out.count,
            reason,
        )
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
        """Close sessions that did not connect within --connect-timeout, sessions whose peer went quiet
        (no video for idle_timeout seconds), and viewers that never connected. (A peer that vanishes
        fails its ICE consent checks within seconds: its connection fails, which closes the session.)"""
        now = time.monotonic()
        connect = self.limits.connect_timeout
        for session in list(self.sessions.values()):
            if not session.connected and now - session.created > connect:
                await self.close_session(session, f"not connected within {connect:g} s")
            elif now - session.last_input > self.idle_timeout:
                await self.close_session(session, f"idle for {self.idle_timeout:.0f} s")
        for viewer in list(self.viewers.values()):
            if viewer.pc.connectionState != "connected" and now - viewer.answered > VIEWER_CONNECT_TIMEOUT:
                await self.close_viewer(viewer, f"not connected after {VIEWER_CONNECT_TIMEOUT:.0f} s")


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
