"""The front's signaling: `/offer` and WHIP go to the worker with a free place; DELETE and WHEP go to the
worker that holds the session. The same routes and answers as the single-process server
(stream/server/signaling.py): the worker's own server answers, the front passes its answer on."""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

from aiohttp import web

from stream.cluster.placement import WorkerView, pick, why_full
from stream.cluster.pool import WorkerLost
from stream.server import auth
from stream.server.limits import address_full
from stream.server.signaling import error, no_trickle, peer_address, preflight

if TYPE_CHECKING:
    from stream.cluster.front import ClusterFront

logger = logging.getLogger(__name__)

__all__ = ["no_trickle", "offer", "preflight", "whep", "whep_delete", "whip", "whip_delete"]


async def offer(front: ClusterFront, request: web.Request) -> web.Response:
    return await place(front, request, kind="browser")


async def whip(front: ClusterFront, request: web.Request) -> web.Response:
    return await place(front, request, kind="whip")


async def place(front: ClusterFront, request: web.Request, *, kind: str) -> web.Response:
    """A new session on the least loaded worker with a place; the next one if that one turns out full."""
    started = time.perf_counter()
    body = await request.read()
    address = peer_address(front, request)
    for gone in [s for s in front.addresses if s not in front.pool.routes]:
        del front.addresses[gone]
    # the workers' statuses name each session's peer, including sessions the front did not place itself
    # (taken back after a worker could not be reached); offers still being placed count too
    known = {s: a for view in front.pool.views.values() for s, a in view.status.get("addresses", {}).items()}
    known.update(front.addresses)
    held = [a for s, a in known.items() if s in front.pool.routes] + front.placing
    crowded = address_full(address, held, front.limits.max_per_address)
    if crowded is not None:
        logger.info("%s session from %s refused: %s", kind, address, crowded)
        return error(429, crowded, cors=True)
    front.placing.append(address)
    try:
        return await place_on_a_worker(front, request, kind, body, started, address)
    finally:
        front.placing.remove(address)


async def place_on_a_worker(
    front: ClusterFront, request: web.Request, kind: str, body: bytes, started: float, address: str | None
) -> web.Response:
    """The offer `body` (from the peer at `address`) to each worker with a place in turn, until one takes
    it or none can."""
    cors = kind == "whip"
    tried: set[str] = set()
    last: web.Response | None = None
    while (worker := pick(front.pool.ordered(), tried)) is not None:
        tried.add(worker.name)
        worker.sessions += 1  # held until its next status: offers arriving meanwhile go elsewhere
        try:
            query = request.rel_url.raw_query_string
            status, headers, data = await front.pool.relay(
                worker, "POST", request.path, query, request.content_type, body, address
            )
        except WorkerLost as exc:
            logger.warning("%s session not placed on %s: %s", kind, worker.name, exc)
            continue
        response = web.Response(status=status, body=data, headers=headers)
        session = session_of(status, headers, data)
        if session is not None:
            front.pool.placed(session, worker)
            front.addresses[session] = address
            remember_view_key(front, session, data)
            front.offers.labels(worker.name).inc()
            front.signaling_seconds.observe(time.perf_counter() - started)
            logger.info("%s session %s from %s placed on %s", kind, session, address, worker.name)
            return response
        worker.sessions -= 1
        if status != 503:  # a bad offer: the same on every worker
            return response
        last = response  # full or stopping after all: try the next one
    if last is not None and len(tried) == len(front.pool.views):
        return last
    reason = why_full(front.pool.ordered())
    logger.info("%s session refused: %s", kind, reason)
    return error(503, reason, cors=cors)


def session_of(status: int, headers: dict[str, str], data: bytes) -> str | None:
    """The new session's id in a worker's answer: JSON `session` (/offer) or the WHIP Location."""
    if status == 201 and headers.get("Location", "").startswith("/whip/"):
        return headers["Location"].rsplit("/", 1)[1]
    if status == 200:
        try:
            session = json.loads(data).get("session")
        except (ValueError, AttributeError):
            return None
        return session if isinstance(session, str) else None
    return None


def remember_view_key(front: ClusterFront, session: str, data: bytes) -> None:
    """The new session's view key from its worker's answer (/offer): the front checks it for WHEP, as the
    single-process server does (the worker sees only the front's own credentials)."""
    try:
        key = json.loads(data).get("view_key")
    except (ValueError, AttributeError):  # WHIP: no view key
        return
    if isinstance(key, str):
        for gone in [s for s in front.view_keys if s not in front.pool.routes]:
            del front.view_keys[gone]
        front.view_keys[session] = key


def may_watch(front: ClusterFront, request: web.Request, session: str) -> bool:
    """The session's view key (Bearer or ?key=) or the front's token, as auth.may_watch."""
    key = front.view_keys.get(session)
    given = (auth.bearer(request), request.query.get("key", ""))
    return auth.is_admin(front, request) or (key is not None and any(auth.same(g, key) for g in given))


def holder(front: ClusterFront, session: str) -> WorkerView | web.Response:
    """The worker that holds `session`, or a 404 that says why it is not running."""
    route = front.pool.routes.get(session)
    if route is None:
        reason = front.pool.ended.get(session)
        if reason is not None:
            return error(404, f"session {session!r} ended: {reason}", cors=True)
        return error(404, f"no session {session!r}: see /stats for the running ones", cors=True)
    return front.pool.views[route.worker]


async def forward(
    front: ClusterFront, request: web.Request, session: str, path: str | None = None, peer: bool = False
) -> web.Response:
    """The request, to the worker that holds `session` (at `path`, when given), and its answer back;
    with `peer`, naming the peer's address to the worker (which caps its viewers by it)."""
    worker = holder(front, session)
    if isinstance(worker, web.Response):
        return worker
    body = await request.read()
    query = request.rel_url.raw_query_string
    try:
        status, headers, data = await front.pool.relay(
            worker,
            request.method,
            path or request.path,
            query,
            request.content_type,
            body,
            peer_address(front, request) if peer else None,
        )
    except WorkerLost as exc:
        return error(503, f"session {session!r} is not reachable: {exc}", cors=True)
    return web.Response(status=status, body=data, headers=headers)


async def whip_delete(front: ClusterFront, request: web.Request) -> web.Response:
    return await forward(front, request, request.match_info["session"])


async def whep(front: ClusterFront, request: web.Request) -> web.Response:
    """WHEP playback from the worker that holds the session (without one: the newest session)."""
    session = request.match_info.get("session") or front.pool.newest
    if session is None:
        return error(404, "no session is running yet: start one in the page or send with WHIP", cors=True)
    if "session" not in request.match_info:  # the worker's own `POST /whep` plays its newest, not ours
        return await forward(front, request, session, f"/whep/{session}", peer=True)
    if not may_watch(front, request, session):
        return error(
            401,
            f"watching session {session!r} needs its view key (given to its page) or the server's "
            "token: send 'Authorization: Bearer <key>' or add ?key=<key>",
            cors=True,
        )
    return await forward(front, request, session, peer=True)


async def whep_delete(front: ClusterFront, request: web.Request) -> web.Response:
    session = request.match_info["session"]
    if front.token and not may_watch(front, request, session):
        return error(401, "ending a viewer needs its session's view key or the server's token", cors=True)
    return await forward(front, request, session)
