"""The cluster's front: the same aiohttp app as `stream serve` (page, /view, auth, errors), whose
signaling goes to the workers (stream/cluster/relay.py) and whose /health, /stats and /metrics add up
every worker's, each labelled with its worker. It runs no model and carries no media."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from stream.cluster import relay
from stream.cluster.placement import READY, WorkerView, why_full
from stream.cluster.pool import WorkerLost, WorkerPool
from stream.config import LIVE_SETTINGS, StreamConfig
from stream.server import StreamServer
from stream.server.session import Denoiser
from stream.server.signaling import error

logger = logging.getLogger(__name__)


def no_model(config: StreamConfig) -> Denoiser:
    raise RuntimeError("the cluster's front runs no model: its workers do")


class ClusterFront(StreamServer):
    """Signaling, placement and aggregated stats for the workers of a `WorkerPool`."""

    signaling = relay

    def __init__(self, pool: WorkerPool, config: StreamConfig, **options: Any) -> None:
        super().__init__(config, no_model, model_name="", placeholder=False, **options)
        self.view_keys: dict[str, str] = {}  # session -> its view key (from its /offer answer)
        self.addresses: dict[str, str | None] = {}  # session -> its peer's address (the per-address cap)
        self.placing: list[str | None] = []  # the addresses of the offers being placed now
        self.pool = pool
        self.poller: asyncio.Task[None] | None = None
        self.own = CollectorRegistry(auto_describe=True)  # the front's own metrics (no session metrics)
        self.own.register(WorkerStates(pool))
        self.offers = Counter(
            "stream_cluster_sessions_placed", "Sessions placed on each worker", ["worker"], registry=self.own
        )
        self.signaling_seconds = Histogram(
            "stream_cluster_signaling_seconds",
            "Time from an offer reaching the front to its answer leaving it (placement + the worker)",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.own,
        )

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_get("/sessions/{session}", self.session_state)
        return app

    async def _startup(self, app: web.Application) -> None:
        await asyncio.to_thread(self.pool.scale)
        self.pool.scaled = time.monotonic()
        self.poller = asyncio.create_task(self.pool.run())

    async def _shutdown(self, app: web.Application) -> None:
        if self.poller is not None:
            self.poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.poller

    def unavailable(self) -> str | None:
        workers = self.pool.ordered()
        return None if any(w.state == READY for w in workers) else why_full(workers)

    async def ask_all(self, path: str) -> list[tuple[WorkerView, bytes]]:
        """GET `path` from every ready worker at once; workers that fail to answer are left out."""
        ready = [w for w in self.pool.ordered() if w.state == READY]

        async def ask(worker: WorkerView) -> tuple[WorkerView, bytes] | None:
            try:
                status, _, body = await self.pool.relay(worker, "GET", path)
            except WorkerLost:
                return None
            return (worker, body) if status == 200 else None

        return [answer for answer in await asyncio.gather(*(ask(w) for w in ready)) if answer is not None]

    # ------------------------------------------------------------------ handlers
    async def health(self, request: web.Request) -> web.Response:
        workers = self.pool.ordered()
        ready = [w for w in workers if w.state == READY]
        problem = self.unavailable()
        first = ready[0].status.get("health", {}) if ready else {}
        return web.json_response(
            {
                "status": "ok" if problem is None else "error",
                **({"error": problem} if problem else {}),
                "model": first.get("model", ""),
                "placeholder": first.get("placeholder", False),
                "sessions": sum(w.sessions for w in ready),
                "max_sessions": sum(w.max_sessions for w in ready),
                "auth": bool(self.token),
                "ice_servers": self.ice_servers_for(request),
                "settings": first.get("settings", {n: getattr(self.config, n) for n in LIVE_SETTINGS}),
                "sizes": first.get("sizes", [[w, h] for w, h in self.sizes]),
                "workers": [w.summary() for w in workers],
            },
            status=200 if problem is None else 503,
        )

    async def stats(self, request: web.Request) -> web.Response:
        answers = [(worker, json.loads(body)) for worker, body in await self.ask_all("/stats")]
        sessions = [{**s, "worker": worker.name} for worker, stats in answers for s in stats["sessions"]]
        first = answers[0][1] if answers else {}
        per_worker = {worker.name: stats for worker, stats in answers}
        body = self.stats_body(request, sessions, first.get("model", ""), first.get("placeholder", False))
        return web.json_response(
            {
                **body,
                "workers": [
                    {
                        **w.summary(),
                        "fps_out": per_worker.get(w.name, {}).get("fps_out", 0.0),
                    }
                    for w in self.pool.ordered()
                ],
            }
        )

    async def metrics(self, request: web.Request) -> web.Response:
        answers = await self.ask_all("/metrics")
        merged = WorkerMetrics([(w.name, body.decode("utf-8")) for w, body in answers])
        registry = CollectorRegistry(auto_describe=False)
        registry.register(merged)
        body = generate_latest(self.own) + generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def session_state(self, request: web.Request) -> web.Response:
        """`GET /sessions/ID`: which worker runs a session, or why it ended (the page asks when its
        connection drops)."""
        if self.token and not secrets.compare_digest(
            request.headers.get("Authorization", "").encode("utf-8", "surrogateescape"),
            f"Bearer {self.token}".encode(),
        ):
            return error(401, "missing or wrong token: send the header 'Authorization: Bearer <token>'")
        session = request.match_info["session"]
        route = self.pool.routes.get(session)
        if route is not None:
            return web.json_response({"session": session, "state": "running", "worker": route.worker})
        reason = self.pool.ended.get(session)
        if reason is not None:
            return web.json_response({"session": session, "state": "ended", "reason": reason})
        return error(404, f"no session {session!r}: see /stats for the running ones")


class WorkerStates(Collector):
    """The workers the front knows: how many places each offers, and whether it is ready."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def collect(self) -> Any:
        up = GaugeMetricFamily(
            "stream_cluster_worker_up", "1 when the worker takes sessions", labels=["worker"]
        )
        places = GaugeMetricFamily(
            "stream_cluster_worker_places", "Sessions a worker takes at once", labels=["worker"]
        )
        for worker in self.pool.ordered():
            up.add_metric([worker.name], float(worker.state == READY))
            places.add_metric([worker.name], worker.max_sessions)
        yield up
        yield places


class WorkerMetrics(Collector):
    """Every worker's /metrics as one exposition, each sample labelled with its worker."""

    def __init__(self, texts: list[tuple[str, str]]) -> None:
        self.texts = texts

    def collect(self) -> Any:
        families: dict[str, Metric] = {}
        for worker, text in self.texts:
            for family in text_string_to_metric_families(text):
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type, family.unit)
                )
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "worker": worker}, sample.value)
        yield from families.values()
