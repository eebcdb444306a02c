"""The front's workers: their Ray actors (created per GPU or per `--workers`, found by name), what each
last reported, which worker holds which session, and why sessions ended. Ray failures surface here as
`RayActorError` and are handled here: the worker's sessions end with the reason, it takes no new ones,
and it is used again once Ray has restarted it and it reports ready."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from stream.cluster.actor import StreamWorker, WorkerSettings
from stream.cluster.placement import DOWN, READY, STARTING, WorkerView
from stream.models.base import first_line

logger = logging.getLogger(__name__)

PREFIX = "stream-worker-"  # worker actors are named PREFIX1, PREFIX2, ... in the front's Ray namespace
MAX_RESTARTS = 10  # Ray restarts a worker whose process died this many times
STATUS_TIMEOUT = 2.0  # seconds a poll waits for a worker's status (a late one is taken at the next poll)
RELAY_TIMEOUT = 30.0  # seconds a worker has to answer a relayed request (an offer gathers ICE candidates)
ENDED_KEPT = 1024  # the most recent ended sessions whose reason the front keeps


class WorkerLost(Exception):
    """A worker could not answer: its process stopped, or it did not answer in time."""


@dataclasses.dataclass
class Route:
    """Which worker (and which start of it) holds a session."""

    worker: str
    incarnation: str
    created: float  # time.monotonic() when the front placed or first saw it


class WorkerPool:
    """The workers behind one front."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        workers: int | None,
        gpu: bool,
        poll_interval: float = 1.0,
        scale_interval: float = 5.0,
    ) -> None:
        self.settings = settings
        self.workers = workers  # a fixed number, or None: one per GPU in the cluster, found as nodes join
        self.gpu = gpu
        self.poll_interval = poll_interval
        self.scale_interval = scale_interval
        self.views: dict[str, WorkerView] = {}
        self.handles: dict[str, Any] = {}
        self.inflight: dict[str, tuple[asyncio.Task[dict[str, Any]], float]] = {}
        self.asked: dict[str, float] = {}  # when the status now held for each worker was asked for
        self.routes: dict[str, Route] = {}
        self.ended: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.newest: str | None = None  # the newest session: `POST /whep` without a session plays it
        self.scaled = 0.0

    # ------------------------------------------------------------------ workers
    def wanted(self) -> int:
        if self.workers is not None:
            return self.workers
        return int(ray.cluster_resources().get("GPU", 0)) if self.gpu else 1

    def scale(self) -> None:
        """Create the workers the cluster has room for, and adopt workers started by name elsewhere."""
        for index in range(1, self.wanted() + 1):
            name = f"{PREFIX}{index}"
            if name not in self.handles:
                logger.info("starting %s", name)
                self.handles[name] = launch(name, self.settings, gpu=self.gpu)
        for name in ray.util.list_named_actors():
            if name.startswith(PREFIX) and name not in self.handles:
                logger.info("found %s", name)
                self.handles[name] = ray.get_actor(name)
        for name in self.handles:
            if name not in self.views:
                suffix = name[len(PREFIX) :]
                index = int(suffix) if suffix.isdigit() else len(self.views) + 1000
                self.views[name] = WorkerView(name=name, index=index)

    async def run(self) -> None:
        """Poll every worker's status; look for new workers now and then."""
        while True:
            if time.monotonic() - self.scaled >= self.scale_interval:
                self.scaled = time.monotonic()
                try:
                    await asyncio.to_thread(self.scale)
                except Exception as exc:  # the Ray head unreachable for a moment: try again later
                    logger.warning("could not look for workers: %s", first_line(exc))
            try:
                await asyncio.gather(*(self.refresh(name) for name in list(self.handles)))
            except Exception:  # a bug here must not stop the polling: log it, poll again
                logger.exception("polling the workers failed")
            await asyncio.sleep(self.poll_interval)

    def ordered(self) -> list[WorkerView]:
        return sorted(self.views.values(), key=lambda w: w.index)

    async def refresh(self, name: str) -> None:
        """Ask one worker for its status (one question at a time) and take its answer."""
        if name not in self.inflight:
            asked = time.monotonic()
            self.inflight[name] = (asyncio.ensure_future(call(self.handles[name].status)), asked)
        task, asked = self.inflight[name]
        await asyncio.wait({task}, timeout=STATUS_TIMEOUT)
        if not task.done():
            return  # busy or still starting: its answer is taken at a later poll
        del self.inflight[name]
        view = self.views[name]
        try:
            status = task.result()
        except RayActorError as exc:
            self.lost(view, exc)
            return
        except Exception as exc:
            view.state, view.reason = DOWN, f"its status failed: {first_line(exc)}"
            return
        if asked >= self.asked.get(name, 0.0):
            self.asked[name] = asked
            self.take(view, status, asked)

    def take(self, view: WorkerView, status: dict[str, Any], asked: float) -> None:
        if view.incarnation and status["incarnation"] != view.incarnation:
            self.end_sessions(view.name, f"{view.name} restarted (its process stopped); its sessions ended")
        if view.state != READY and status["available"]:
            logger.info("%s ready on %s: %d places", view.name, status["host"], status["max_sessions"])
        view.incarnation, view.status = status["incarnation"], status
        view.max_sessions, view.over_budget = status["max_sessions"], status["over_budget"]
        view.state = READY if status["available"] else DOWN
        view.reason = status["problem"] or ""
        held = set(status["sessions"])
        for session, route in list(self.routes.items()):
            if route.worker == view.name and route.created < asked and session not in held:
                self.end(session, status["ended"].get(session, "ended"))
        for session in held - set(self.routes):  # e.g. after the worker could not be reached for a while
            self.routes[session] = Route(view.name, view.incarnation, time.monotonic())
            self.ended.pop(session, None)
        view.sessions = sum(1 for r in self.routes.values() if r.worker == view.name)

    def lost(self, view: WorkerView, exc: RayActorError) -> None:
        """A call to the worker failed in Ray: its process stopped (Ray restarts it) or it is gone."""
        restarting = isinstance(exc, ActorUnavailableError)
        if view.state == READY or any(r.worker == view.name for r in self.routes.values()):
            logger.warning("%s stopped: %s", view.name, first_line(exc))
            self.end_sessions(
                view.name,
                f"{view.name} stopped (its process exited or cannot be reached)"
                + ("; it is being restarted" if restarting else ""),
            )
        view.state = STARTING if restarting else DOWN
        view.reason = "restarting" if restarting else f"stopped: {first_line(exc)}"
        view.sessions = 0

    def end_sessions(self, worker: str, reason: str) -> None:
        for session, route in list(self.routes.items()):
            if route.worker == worker:
                self.end(session, reason)

    def end(self, session: str, reason: str) -> None:
        route = self.routes.pop(session, None)
        if route is not None:
            logger.info("session %s on %s ended: %s", session, route.worker, reason)
        self.ended[session] = reason
        while len(self.ended) > ENDED_KEPT:
            self.ended.popitem(last=False)
        if self.newest == session:
            self.newest = max(self.routes, key=lambda s: self.routes[s].created, default=None)

    def placed(self, session: str, worker: WorkerView) -> None:
        self.routes[session] = Route(worker.name, worker.incarnation, time.monotonic())
        self.newest = session

    # ------------------------------------------------------------------ requests
    async def relay(
        self,
        view: WorkerView,
        method: str,
        path: str,
        query: str = "",
        content_type: str = "",
        body: bytes = b"",
        peer: str | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request to a worker's server (from the peer at `peer`): (status, headers, body);
        WorkerLost if it cannot answer."""
        handle = self.handles[view.name]
        try:
            return await asyncio.wait_for(
                call(handle.request, method, path, query, content_type, body, peer), RELAY_TIMEOUT
            )
        except RayActorError as exc:
            self.lost(view, exc)
            raise WorkerLost(view.reason) from exc
        except asyncio.TimeoutError as exc:
            raise WorkerLost(f"{view.name} did not answer in {RELAY_TIMEOUT:.0f} s") from exc


async def call(method: Any, *args: Any) -> Any:
    """An actor method's result, awaited on this event loop."""
    return await asyncio.wrap_future(method.remote(*args).future())


def launch(name: str, settings: WorkerSettings, *, gpu: bool) -> Any:
    """A worker actor: one GPU each (or one CPU slot), named so that the front finds it again, restarted
    by Ray when its process dies."""
    options: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": 1}
    return (
        ray.remote(StreamWorker)
        .options(name=name, max_restarts=MAX_RESTARTS, max_task_retries=0, get_if_exists=True, **options)
        .remote(name, settings)
    )
