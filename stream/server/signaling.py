"""Signaling: `POST /offer` (the page), WHIP ingest and WHEP playback (RFC 9725); no trickle ICE."""

from __future__ import annotations

import json
import logging
import secrets
import time
from typing import TYPE_CHECKING

from aiohttp import web
from aiortc import (
    RTCConfiguration,
    RTCPeerConnection,
    RTCSessionDescription,
)

from stream.config import ConfigError, StreamConfig
from stream.server import auth, peer
from stream.server.limits import MAX_MEDIA_SECTIONS, address_full
from stream.server.rtc import check_offer
from stream.server.session import Session, Viewer, apply_settings

if TYPE_CHECKING:
    from stream.server.app import StreamServer

logger = logging.getLogger(__name__)

SDP = "application/sdp"
# WHIP/WHEP answers are read by OBS and by pages on other origins.
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type",
    "Access-Control-Expose-Headers": "Location, Link",
}


def error(status: int, message: str, cors: bool = False) -> web.Response:
    headers = {**(CORS if cors else {}), "X-Content-Type-Options": "nosniff"}
    return web.json_response({"error": message}, status=status, headers=headers)


async def read_sdp(request: web.Request) -> str | web.Response:
    """A WHIP/WHEP request body: an SDP offer as application/sdp text."""
    if request.content_type != SDP:
        got = request.content_type or "none"
        return error(415, f"the body must be an SDP offer with Content-Type: {SDP}, got {got}", cors=True)
    try:
        sdp = (await request.read()).decode("utf-8")
    except UnicodeDecodeError:
        return error(400, "the SDP offer is not UTF-8 text", cors=True)
    if not sdp.strip():
        return error(400, "the body is empty: send the SDP offer", cors=True)
    return sdp


async def offer(server: StreamServer, request: web.Request) -> web.Response:
    # 1. check the request: JSON {sdp, type: "offer", settings?}
    try:
        body = await request.json()
    except web.HTTPRequestEntityTooLarge:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        return error(400, 'the body must be JSON: {"sdp": "...", "type": "offer"}')
    except RecursionError:  # nested deeper than the JSON parser goes
        return error(400, 'the body is JSON nested too deeply: send {"sdp": "...", "type": "offer"}')
    if not isinstance(body, dict):
        return error(400, 'the body must be a JSON object: {"sdp": "...", "type": "offer"}')
    for field in ("sdp", "type"):
        if not isinstance(body.get(field), str) or not body[field]:
            return error(400, f"missing or empty field '{field}' (a string)")
    if body["type"] != "offer":
        return error(400, f"type must be 'offer', got {body['type']!r}")
    stamped = body.get("stamp", False)
    if not isinstance(stamped, bool):
        return error(400, f"stamp must be true or false, got {stamped!r}")
    problem = check_offer(body["sdp"], MAX_MEDIA_SECTIONS)
    if problem:
        return error(400, problem)
    try:
        config = apply_settings(
            server.config, body.get("settings") or {}, server.sizes, server.limits.max_prompt_chars
        )
    except ConfigError as exc:
        return error(400, f"bad settings: {exc}")
    address = peer_address(server, request)
    started = await start_session(server, body["sdp"], config, stamp=stamped, address=address)
    if isinstance(started, web.Response):
        return started
    answer = started.pc.localDescription
    # the view key goes only to this page: /view?session=ID&key=KEY (or WHEP with it as the Bearer token)
    return web.json_response(
        {"sdp": answer.sdp, "type": answer.type, "session": started.id, "view_key": started.view_key}
    )


async def start_session(
    server: StreamServer,
    sdp: str,
    config: StreamConfig,
    *,
    stamp: bool = False,
    kind: str = "browser",
    address: str | None = None,
) -> Session | web.Response:
    """Negotiate a new session from a checked offer (from the peer at `address`); an error response
    when it cannot start."""
    problem = server.unavailable()
    if problem is not None:
        return error(503, f"the server cannot take sessions now: {problem}", cors=True)
    if len(server.sessions) >= server.max_sessions:
        logger.info("%s session refused: all %d places are taken", kind, server.max_sessions)
        return error(503, f"the server is full: {server.max_sessions} sessions at once; try again later")
    held = (other.address for other in server.sessions.values())
    crowded = address_full(address, held, server.limits.max_per_address)
    if crowded is not None:
        logger.info("%s session from %s refused: %s", kind, address, crowded)
        return error(429, crowded, cors=True)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=server.ice_servers))
    session = Session(
        secrets.token_urlsafe(8),
        pc,
        config,
        target_fps=server.target_fps,
        adaptive=server.adaptive,
        stamp=stamp,
        kind=kind,
        address=address,
    )
    server.sessions_started += 1
    server.sessions[session.id] = session  # holds its place while negotiating (closing frees it)
    peer.wire(server, session)
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        answer = await pc.createAnswer()
        await pc.setLocalDescription(answer)
    except Exception as exc:  # aiortc raises ValueError, KeyError, ... on malformed SDP
        await server.close_session(session, "bad offer")
        return error(400, f"invalid SDP offer: {exc or type(exc).__name__}")
    if not any(t.kind == "video" for t in pc.getTransceivers()):
        await server.close_session(session, "no video")
        return error(400, "the offer has no video track: send the camera as a video track")
    assert server.worker is not None
    server.worker.add(session)
    server.published = session
    logger.info(
        "%s session %s from %s joined (%d of %d places): %s",
        kind,
        session.id,
        address,
        len(server.sessions),
        server.max_sessions,
        describe(config),
    )
    return session


def peer_address(server: StreamServer, request: web.Request) -> str | None:
    """The address of the peer behind a request: its connection's, or, from a trusted proxy
    (--trusted-proxy), the one its X-Forwarded-For names (Limits.peer)."""
    return server.limits.peer(request.remote, request.headers.getall("X-Forwarded-For", []))


def describe(config: StreamConfig) -> str:
    """A session's settings in one line, for the server's log."""
    prompt = config.prompt if len(config.prompt) <= 60 else config.prompt[:57] + "..."
    return (
        f"{config.width}x{config.height}, {config.steps} steps, strength {config.strength:g}, "
        f"guidance {config.guidance_scale:g}, seed {config.seed}, prompt {prompt!r}"
    )


# ------------------------------------------------------------------ WHIP, WHEP, /view


async def whip(server: StreamServer, request: web.Request) -> web.Response:
    """WHIP ingest (RFC 9725): an SDP offer in, 201 with the answer and the session's Location.

    `?stamp=1` copies the sender's frame-ID patch into the output (stream/stamp.py), for latency
    measurements.
    """
    sdp = await read_sdp(request)
    if isinstance(sdp, web.Response):
        return sdp
    problem = check_offer(sdp, MAX_MEDIA_SECTIONS)
    if problem:
        return error(400, problem, cors=True)
    stamped = request.query.get("stamp", "0")
    if stamped not in ("0", "1"):
        return error(400, f"stamp must be 0 or 1, got {stamped!r}", cors=True)
    started = await start_session(
        server, sdp, server.config, kind="whip", stamp=stamped == "1", address=peer_address(server, request)
    )
    if isinstance(started, web.Response):
        started.headers.update(CORS)
        return started
    return created(server, started.pc, f"/whip/{started.id}")


async def whip_delete(server: StreamServer, request: web.Request) -> web.Response:
    session = server.sessions.get(request.match_info["session"])
    if session is None or session.kind != "whip":
        return error(404, f"no WHIP session {request.match_info['session']!r} (ended already?)", cors=True)
    await server.close_session(session, "ended by its WHIP client (DELETE)")
    return web.Response(status=200, headers=CORS)


async def whep(server: StreamServer, request: web.Request) -> web.Response:
    """WHEP playback: an SDP offer in, 201 with an answer that sends a session's processed output."""
    sdp = await read_sdp(request)
    if isinstance(sdp, web.Response):
        return sdp
    wanted = request.match_info.get("session")
    if wanted is not None:
        session = server.sessions.get(wanted)
        if session is None:
            return error(404, f"no session {wanted!r}: see /stats for the running ones", cors=True)
        if not auth.may_watch(server, request, session):
            return error(
                401,
                f"watching session {wanted!r} needs its view key (given to its page) or the server's "
                "token: send 'Authorization: Bearer <key>' or add ?key=<key>",
                cors=True,
            )
    elif server.published is not None and not server.published.closed:
        session = server.published
    else:
        return error(404, "no session is running yet: start one in the page or send with WHIP", cors=True)
    problem = check_offer(sdp, MAX_MEDIA_SECTIONS)
    if problem:
        return error(400, problem, cors=True)
    if len(server.viewers) >= server.max_viewers:
        return error(503, f"too many viewers: {server.max_viewers} at once; try again later", cors=True)
    address = peer_address(server, request)
    held = (other.address for other in server.viewers.values())
    cap = server.limits.max_viewers_per_address
    crowded = address_full(address, held, cap, "viewer", "--max-viewers-per-address")
    if crowded is not None:
        logger.info("viewer of session %s from %s refused: %s", session.id, address, crowded)
        return error(429, crowded, cors=True)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=server.ice_servers))
    viewer = Viewer(secrets.token_urlsafe(8), session, pc, server.output_track(session), address=address)
    server.viewers[viewer.id] = viewer
    session.viewers[viewer.id] = viewer

    @pc.on("connectionstatechange")
    async def on_state() -> None:
        if pc.connectionState in ("failed", "closed"):
            await server.close_viewer(viewer, f"connection {pc.connectionState}")

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
        await server.close_viewer(viewer, "bad offer")
        return error(400, f"invalid SDP offer: {exc or type(exc).__name__}", cors=True)
    if viewer.closed:  # its session ended while the answer was being made
        return error(404, f"session {session.id!r} ended", cors=True)
    viewer.answered = time.monotonic()  # it has app.VIEWER_CONNECT_TIMEOUT from its answer on
    logger.info("viewer %s of session %s started", viewer.id, session.id)
    return created(server, pc, f"/whep/{session.id}/{viewer.id}")


async def whep_delete(server: StreamServer, request: web.Request) -> web.Response:
    viewer = server.viewers.get(request.match_info["viewer"])
    if viewer is None or viewer.session.id != request.match_info["session"]:
        return error(404, f"no viewer {request.match_info['viewer']!r} (ended already?)", cors=True)
    if server.token and not auth.may_watch(server, request, viewer.session):
        return error(401, "ending a viewer needs its session's view key or the server's token", cors=True)
    await server.close_viewer(viewer, "ended by its WHEP client (DELETE)")
    return web.Response(status=200, headers=CORS)


async def preflight(server: StreamServer, request: web.Request) -> web.Response:
    return web.Response(status=204, headers=CORS)  # no ICE servers here: they may carry credentials


async def no_trickle(server: StreamServer, request: web.Request) -> web.Response:
    response = error(
        405,
        "trickle ICE and ICE restarts (PATCH) are not supported: send every candidate in the offer",
        cors=True,
    )
    response.headers["Allow"] = "POST, DELETE, OPTIONS"
    return response


def created(server: StreamServer, pc: RTCPeerConnection, location: str) -> web.Response:
    headers = {**CORS, "Location": location, **ice_links(server)}
    return web.Response(status=201, text=pc.localDescription.sdp, content_type=SDP, headers=headers)


def ice_links(server: StreamServer) -> dict[str, str]:
    """RFC 9725 section 4.6: the ICE servers as Link headers (one header, comma-separated)."""
    links = []
    for ice in server.ice_servers:
        urls = ice.urls if isinstance(ice.urls, list) else [ice.urls]
        for url in urls:
            link = f'<{url}>; rel="ice-server"'
            if ice.username:
                link += f'; username="{ice.username}"; credential="{ice.credential}"'
            links.append(link)
    return {"Link": ", ".join(links)} if links else {}
