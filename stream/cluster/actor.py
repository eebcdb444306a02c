"""The GPU worker: a Ray actor that owns one model (one GPU, or one CPU slot) and terminates WebRTC itself.

Inside, it runs the single-process server (`StreamServer`, with its scheduler worker thread) on
127.0.0.1 in a thread of its own; the front reaches it only through this actor's methods (`request`
relays one HTTP request to that server, `status` reports its sessions, budget and capacity). The media
goes straight between the browser and this process: its ICE candidates carry this node's addresses,
its UDP sockets bind in `--rtc-ports`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import os
import secrets
import socket
import time
from typing import Any

import aiohttp
from yarl import URL

from stream.cluster.ports import PortRangeLoop
from stream.config import StreamConfig
from stream.models import load_model
from stream.server import ServerThread, StreamServer
from stream.server.limits import Limits
from stream.server.session import Session
from stream.sizes import allowed_sizes, check_sides, components_multiple, native_side

logger = logging.getLogger(__name__)

ENDED_KEPT = 256  # reasons of the sessions that ended most recently, for the front
EXIT_DELAY = 1.0  # seconds between a dead model worker and this process exiting (Ray restarts it)
# Response headers the front passes on to the client.
RELAYED = (
    "Content-Type",
    "Location",
    "Link",
    "Allow",
    *(
        f"Access-Control-{name}"
        for name in ("Allow-Origin", "Allow-Methods", "Allow-Headers", "Expose-Headers")
    ),
)


@dataclasses.dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker needs to start: the front's settings, sent to every worker."""

    config: StreamConfig
    sized: bool  # --width/--height given: no size search in the warm-up
    target_fps: float = 24.0
    max_sessions: int = 4
    ice_servers: tuple[str, ...] = ()
    idle_timeout: float = 30.0
    adaptive: bool = True
    max_viewers: int = 16
    batching: bool = True
    rtc_ports: tuple[int, int] | None = None
    limits: Any = None  # stream/server/limits.py's Limits: what one peer may cost (None: the defaults)


class WorkerServer(StreamServer):
    """The single-process server, keeping why each session ended (the front asks for it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ended: collections.OrderedDict[str, str] = collections.OrderedDict()

    async def close_session(self, session: Session, reason: str) -> None:
        if not session.closed:
            self.ended[session.id] = reason
            while len(self.ended) > ENDED_KEPT:
                self.ended.popitem(last=False)
        await super().close_session(session, reason)


class WorkerThread(ServerThread):
    """The server's event loop in a thread; its UDP sockets bind in the port range, when one is set."""

    def __init__(self, server: StreamServer, ports: tuple[int, int] | None) -> None:
        super().__init__(server)
        if ports is not None:
            self.loop.close()
            self.loop = PortRangeLoop(ports)


class StreamWorker:
    """One model and its sessions. Created by the front with `ray.remote(StreamWorker).options(...)`."""

    def __init__(self, name: str, settings: WorkerSettings) -> None:
        from stream.serve import warm_up  # the same warm-up as `stream serve`

        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # in Ray's worker log
        logging.getLogger("stream").setLevel(logging.INFO)  # sessions joining and leaving, restarts
        self.name = name
        self.incarnation = secrets.token_hex(6)  # a new one after every restart: its sessions are gone
        self.secret = secrets.token_urlsafe(16)  # only this actor talks to its server
        self.exiting = False
        config = settings.config
        started = time.monotonic()
        components = load_model(config)
        multiple = components_multiple(components)
        check_sides(
            {"width": config.width, "height": config.height}, multiple, f"the model {components.name}"
        )
        sizes = allowed_sizes(multiple, native_side(components), (config.width, config.height))
        config, _, note = warm_up(components, config, settings.target_fps, sized=settings.sized)
        if note:
            logger.info("%s: %s", name, note)
        self.server: WorkerServer = WorkerServer.for_components(  # type: ignore[assignment]
            config,
            components,
            max_sessions=settings.max_sessions,
            token=self.secret,
            ice_servers=list(settings.ice_servers),
            idle_timeout=settings.idle_timeout,
            target_fps=settings.target_fps,
            adaptive=settings.adaptive,
            max_viewers=settings.max_viewers,
            sizes=sizes,
            batching=settings.batching,
            # every offer comes from the front, which caps the sessions of each peer address itself and
            # names the peer in X-Forwarded-For (`request`): kept with the session, reported in `status`
            limits=dataclasses.replace(
                settings.limits or Limits(), max_per_address=0, trusted_proxies=("127.0.0.1", "::1")
            ),
        )
        self.thread = WorkerThread(self.server, settings.rtc_ports).__enter__()
        self.client: aiohttp.ClientSession | None = None
        logger.info(
            "%s ready in %.1f s on %s (pid %d): %s at %dx%d, %d places",
            name, time.monotonic() - started, socket.gethostname(), os.getpid(),
            components.name, config.width, config.height, settings.max_sessions,
        )  # fmt: skip

    async def _on_server(self, coroutine: Any) -> Any:
        """Run a coroutine on the server's own event loop (sessions, tracks and the worker live there)."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self.thread.loop))

    async def request(
        self, method: str, path: str, query: str, content_type: str, body: bytes, peer: str | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request from the front to this worker's server: (status, headers, body); `peer`: the
        address of the peer the front got it from."""
        if self.client is None:
            self.client = aiohttp.ClientSession()
        url = URL(f"http://127.0.0.1:{self.thread.port}{path}" + (f"?{query}" if query else ""), encoded=True)
        headers = {"Authorization": f"Bearer {self.secret}"}
        if content_type:
            headers["Content-Type"] = content_type
        if peer:
            headers["X-Forwarded-For"] = peer
        started = time.perf_counter()
        async with self.client.request(method, url, headers=headers, data=body or None) as response:
            data = await response.read()
            kept = {k: response.headers[k] for k in RELAYED if k in response.headers}
        # the worker's own share of the answer's time (the rest is the front and Ray)
        kept["Server-Timing"] = f"worker;dur={(time.perf_counter() - started) * 1000.0:.2f}"
        return response.status, kept, data

    async def status(self) -> dict[str, Any]:
        """Sessions, budget state and capacity, for the front's placement (and its /health, /stats)."""
        return await self._on_server(self._status())  # type: ignore[no-any-return]

    async def _status(self) -> dict[str, Any]:
        server = self.server
        problem = server.unavailable()
        if problem is not None and not self.exiting:
            # the model worker stopped (a GPU error): end the sessions with the reason, then exit so that
            # Ray starts this worker again on a fresh process
            self.exiting = True
            logger.error("%s: %s; restarting", self.name, problem)
            for session in list(server.sessions.values()):
                await server.close_session(session, f"{self.name} stopped: {problem}")
            self.thread.loop.call_later(EXIT_DELAY, os._exit, 1)
        over = 0
        for session in server.sessions.values():
            holds = session.monitor.snapshot()["budget"]["holds"]
            over += holds is False
        response = await server.health(None)  # type: ignore[arg-type]
        return {
            "name": self.name,
            "incarnation": self.incarnation,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "port": self.thread.port,  # the server inside, on 127.0.0.1 (benchmarks compare with it)
            "available": problem is None,
            "problem": problem,
            "sessions": list(server.sessions),
            "addresses": {sid: session.address for sid, session in server.sessions.items()},  # their peers
            "max_sessions": server.max_sessions,
            "over_budget": over,  # sessions whose p95 frame time is over the budget now
            "viewers": len(server.viewers),
            "ended": dict(server.ended),
            "health": json_body(response),
        }

    async def pid(self) -> int:
        return os.getpid()


def json_body(response: Any) -> dict[str, Any]:
    return json.loads(response.body)  # type: ignore[no-any-return]
