"""A session's peer connection: its video into the model worker's slot, its `control` and `telemetry`
data channels, and its end when the connection fails."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING

import av
from aiortc import MediaStreamTrack, RTCDataChannel
from aiortc.mediastreams import MediaStreamError

from stream.config import ConfigError
from stream.server.rtc import discard, low_latency_receiver
from stream.server.session import (
    MAX_BODY,
    TELEMETRY_INTERVAL,
    TEXT_SETTINGS,
    Session,
    apply_settings,
)

if TYPE_CHECKING:
    from stream.server.app import StreamServer

logger = logging.getLogger(__name__)

MAX_REFUSED_CHANNELS = 16  # data channels beyond control and telemetry a peer may open before it is closed


def wire(server: StreamServer, session: Session) -> None:
    """The session's peer connection: its video into the worker, its data channels, its end."""
    pc = session.pc

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        if track.kind == "video":
            low_latency_receiver(pc, track)
            if session.kind == "browser":  # the page shows the output; a WHIP encoder only sends
                pc.addTrack(server.output_track(session))
            session.tasks.append(asyncio.create_task(drain_video(server, session, track)))
        else:  # audio (OBS sends it): consumed and discarded, or it would pile up
            session.tasks.append(asyncio.create_task(discard(track)))

    @pc.on("datachannel")
    def on_datachannel(channel: RTCDataChannel) -> None:
        # One `control` and one `telemetry` channel a session; any other is closed at once.
        if channel.label == "control" and session.control is None:
            session.control = channel
            channel.on("message", lambda message: on_control(server, session, message, channel))
        elif channel.label == "telemetry" and session.telemetry is None:
            session.telemetry = channel
            session.tasks.append(asyncio.create_task(telemetry(session, channel)))
        else:
            refuse_channel(server, session, channel)

    @pc.on("connectionstatechange")
    async def on_state() -> None:
        logger.info("session %s: connection %s", session.id, pc.connectionState)
        if pc.connectionState == "connected":
            session.connected = True
        if pc.connectionState in ("failed", "closed"):
            await server.close_session(session, f"connection {pc.connectionState}")


def refuse_channel(server: StreamServer, session: Session, channel: RTCDataChannel) -> None:
    """Close a data channel beyond the session's one control and one telemetry channel; a peer that
    keeps opening them is closed."""
    session.refused_channels += 1
    channel.close()
    if session.refused_channels == 1:
        logger.info(
            "session %s: closed a data channel %r: one control and one telemetry channel are accepted",
            session.id,
            channel.label[:40],
        )
    if session.refused_channels == MAX_REFUSED_CHANNELS + 1:
        reason = f"opened more than {MAX_REFUSED_CHANNELS} data channels beyond control and telemetry"
        server.close_later(session, reason)


async def drain_video(server: StreamServer, session: Session, track: MediaStreamTrack) -> None:
    """Incoming frames into the latest-only slot; the worker takes the newest."""
    try:
        while not session.closed:
            frame = await track.recv()
            if not isinstance(frame, av.VideoFrame):
                continue
            side = server.limits.max_input_side
            if frame.width > side or frame.height > side:
                reason = (
                    f"the camera sends {frame.width}x{frame.height} frames; at most {side} pixels a side "
                    "are accepted: lower the camera resolution"
                )
                session.report(reason)
                server.close_later(session, reason)
                return
            session.last_input = time.monotonic()
            session.monitor.frame_in()
            session.inputs.put((frame, session.last_input))
            if server.worker:
                server.worker.notify()
    except MediaStreamError:
        pass


async def telemetry(session: Session, channel: RTCDataChannel) -> None:
    while not session.closed:
        await asyncio.sleep(TELEMETRY_INTERVAL)
        if channel.readyState == "open":
            channel.send(json.dumps({"type": "telemetry", **session.snapshot()}))


def on_control(server: StreamServer, session: Session, message: object, channel: RTCDataChannel) -> None:
    """A settings change from the page: validated here, applied by the worker from the next frame. The
    reply goes back on `channel`, the one the message came on."""
    try:
        data = json.loads(message) if isinstance(message, str) and len(message) <= MAX_BODY else None
    except (ValueError, RecursionError):  # not JSON, too deep, numbers too long
        data = None
    try:
        if not isinstance(data, dict) or data.get("type") != "settings":
            raise ConfigError('control messages are JSON {"type": "settings", ...} of at most 64 KiB')
        changes = {k: v for k, v in data.items() if k != "type"}
        base = session.pending or session.config
        new = apply_settings(base, changes, server.sizes, server.limits.max_prompt_chars)
        if session.pending is not None or any(
            getattr(new, k) != getattr(session.config, k) for k in TEXT_SETTINGS
        ):
            session.pending = new  # a new prompt: paced, tokenized off the model thread (apply_prompts)
            if session.prompts is None or session.prompts.done():
                session.prompts = asyncio.create_task(apply_prompts(server, session))
                session.tasks = [t for t in session.tasks if not t.done()] + [session.prompts]
        else:
            session.config = new
        reply = {"type": "applied", "settings": {k: getattr(new, k) for k in changes}}
    except ConfigError as exc:
        logger.info("session %s: change refused: %s", session.id, exc)
        reply = {"type": "error", "message": str(exc)}
    if channel.readyState == "open":
        channel.send(json.dumps(reply))


async def apply_prompts(server: StreamServer, session: Session) -> None:
    """A session's settings with a new prompt reach the worker at most once per `prompt_interval`; the
    newest pending settings win. The prompts are tokenized off the event loop and off the model thread
    (the worker then finds them in the engine's cache)."""
    interval = server.limits.prompt_interval
    while session.pending is not None and not session.closed:
        wait = session.last_prompt + interval - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        config = session.pending
        if config is None:
            return
        try:
            if server.tokenize is not None:
                for text in dict.fromkeys((config.prompt, config.negative_prompt)):
                    await asyncio.to_thread(server.tokenize, text)
        except Exception as exc:  # a tokenizer that refuses the text: this change only
            if session.pending is config:
                session.pending = None
            logger.info("session %s: prompt refused by the tokenizer: %s", session.id, exc)
            session.report(f"the prompt could not be tokenized: {exc}")
            continue
        if session.closed:
            return
        session.config = config
        session.prompt_changes += 1
        session.last_prompt = time.monotonic()
        if session.pending is config:
            session.pending = None
