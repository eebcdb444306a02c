"""One peer's session: its settings, slots, tracks and stats; WHEP viewers; the outgoing track."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import secrets
import time
from collections.abc import Callable
from fractions import Fraction
from typing import Any, Protocol

import av
import numpy as np
from aiortc import (
    MediaStreamTrack,
    RTCDataChannel,
    RTCPeerConnection,
)
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamError

from stream.adaptive import AdaptiveController, build_ladder
from stream.batch import FrameResult
from stream.config import LIVE_SETTINGS, ConfigError, StreamConfig
from stream.media import LatestFrameSlot
from stream.monitor import LatencyMonitor
from stream.server.rtc import to_video

logger = logging.getLogger(__name__)

TELEMETRY_INTERVAL = 0.33  # seconds: about 3 messages a second
MAX_BODY = 64 * 1024  # bytes: the largest request body or data-channel message
TEXT_SETTINGS = ("prompt", "negative_prompt")  # settings the model re-encodes when they change
MAX_PTS_JUMP = 3  # seconds: a larger jump of the input's timestamps is a restarted clock, not time


# What the page may change live, with the names it uses; anything else is refused.
class Denoiser(Protocol):
    """What the worker needs of a per-session denoiser (StreamDenoiser, or a stand-in in tests)."""

    skipped: int

    def process(self, frame: np.ndarray, tag: object = None) -> FrameResult:
        """The frame's result; `tag` (the input it came from) rides along to the result's `tag`."""
        ...

    def update(self, config: StreamConfig) -> None: ...


DenoiserFactory = Callable[[StreamConfig], Denoiser]


@dataclasses.dataclass
class Processed:
    frame: np.ndarray  # HxWx3 uint8 RGB
    pts: int | None  # the input frame's, None when it had none
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
        address: str | None = None,
    ) -> None:
        self.id = session_id
        self.address = address  # the peer's network address (for the per-address cap), None if unknown
        self.view_key = secrets.token_urlsafe(16)  # for its own page: watching it (WHEP) needs this key
        self.kind = kind  # "browser" (POST /offer) or "whip" (POST /whip: OBS and other encoders)
        self.pc = pc
        # The user's settings, validated, and their version (one more with every change): the worker
        # applies them before the next frame, and rolls back only the version it refused.
        self.requested: tuple[StreamConfig, int] = (config, 0)
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
        # The controller belongs to the worker thread; the loop reads only this snapshot, replaced whole.
        self.adaptive_state: dict[str, Any] = self.adaptive.snapshot()
        self.failures = 0  # frames in a row that failed
        self.stamp = stamp  # copy the page's frame-ID patch from each input into its output
        self.tasks: list[asyncio.Task[Any]] = []
        self.control: RTCDataChannel | None = None
        self.telemetry: RTCDataChannel | None = None
        self.refused_channels = 0  # data channels beyond control and telemetry, closed at once
        # Settings with a new prompt wait here for their turn (at most one a --prompt-interval)
        self.pending: StreamConfig | None = None
        self.prompts: asyncio.Task[None] | None = None  # peer.apply_prompts, while some are pending
        self.last_prompt = -math.inf  # time.monotonic() of the last prompt change handed to the worker
        self.prompt_changes = 0
        self.last_input = time.monotonic()
        self.created = time.monotonic()
        self.closed = False
        self.connected = False  # its peer connection has connected (else it is freed after a while)
        self.last_pts = -1  # pts of the last frame sent
        self.last_input_pts: int | None = None

    @property
    def config(self) -> StreamConfig:
        return self.requested[0]

    @config.setter
    def config(self, config: StreamConfig) -> None:
        self.requested = (config, self.requested[1] + 1)

    def output_pts(self, input_pts: int | None, time_base: Fraction = Fraction(1, 90000)) -> int:
        """The input's timing, kept strictly increasing across the 32-bit RTP clock's wrap-around.

        A missing pts, or a jump of more than MAX_PTS_JUMP seconds either way (a sender that restarted
        its clock), continues from the last output pts one nominal frame on instead of jumping.
        """
        step = max(1, round(Fraction(1, 30) / time_base))  # a nominal frame, in the time base's ticks
        if input_pts is None or self.last_input_pts is None:
            pts = input_pts if self.last_pts < 0 and input_pts is not None else self.last_pts + step
        else:
            delta = (input_pts - self.last_input_pts) % 2**32
            pts = self.last_pts + (max(1, delta) if delta * time_base <= MAX_PTS_JUMP else step)
        self.last_input_pts, self.last_pts = input_pts, max(pts, self.last_pts + 1)
        return self.last_pts

    def publish_adaptive(self) -> None:
        """On the worker thread: a new immutable view of the adaptive controller for the loop."""
        self.adaptive_state = self.adaptive.snapshot()

    def deliver(self, processed: Processed, timings: dict[str, float], skipped: bool) -> None:
        """Called on the event loop by the worker: newest processed frame wins."""
        if self.closed:
            return
        self.output = processed
        self.monitor.frame_out(timings, skipped)
        self.output_ready.set()

    def refuse(self, message: str, version: int, accepted: StreamConfig) -> None:
        """The worker could not apply settings `version`: roll back to `accepted` unless the page has sent
        newer settings since (those get their own try), and tell the page."""
        if self.requested[1] == version:
            self.config = accepted
            logger.info("session %s: settings refused by the model and rolled back: %s", self.id, message)
        else:
            logger.info("session %s: settings refused by the model: %s", self.id, message)
        self.report(message)

    def report(self, message: str) -> None:
        """An error for the page, on its control channel."""
        if self.control is not None and self.control.readyState == "open":
            self.control.send(json.dumps({"type": "error", "message": message}))

    def snapshot(self) -> dict[str, Any]:
        self.monitor.drops = self.inputs.drops
        return {
            "session": self.id,
            "kind": self.kind,
            "viewers": len(self.viewers),
            **self.monitor.snapshot(time.perf_counter()),  # rates fall to 0 when frames stop
            "adaptive": self.adaptive_state,
            "stamp": self.stamp,
            "prompt_changes": self.prompt_changes,
            "settings": {name: getattr(self.config, name) for name in LIVE_SETTINGS},
            # Stream Batch delays each output by steps - 1 frames (`in_flight` in latency_ms shows it)
            "stream_batch": {
                "on": self.config.stream_batch,
                "cfg": self.config.cfg_mode,
                "delta": self.config.delta,
            },
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
    address: str | None = None  # the peer's network address (the per-address cap counts by it)


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
        frame = out.video or to_video(out.frame)  # made by the worker, unless nobody was sending then
        frame.pts, frame.time_base = session.output_pts(out.pts, out.time_base), out.time_base
        session.monitor.sample("handoff", (time.perf_counter() - out.ready) * 1000.0)
        return frame


def apply_settings(
    config: StreamConfig,
    changes: object,
    sizes: list[tuple[int, int]] | None = None,
    max_text: int | None = None,
) -> StreamConfig:
    """Validated live settings: only LIVE_SETTINGS, each checked by StreamConfig; a new size must be one
    of `sizes` (when given: the sizes the server offers for its model); prompts of at most `max_text`
    characters (when given)."""
    if not isinstance(changes, dict):
        raise ConfigError("settings must be a JSON object")
    unknown = sorted(set(changes) - set(LIVE_SETTINGS))
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(unknown)}; live settings: {', '.join(LIVE_SETTINGS)}"
        )
    for name in TEXT_SETTINGS:
        text = changes.get(name)
        if max_text is not None and isinstance(text, str) and len(text) > max_text:
            raise ConfigError(
                f"{name} is {len(text)} characters long; at most {max_text} are accepted: shorten it"
            )
    if not changes:
        return config
    new = config.replace(**changes)
    if (
        sizes
        and (new.width, new.height) != (config.width, config.height)
        and (new.width, new.height) not in sizes
    ):
        offered = ", ".join(f"{w}x{h}" for w, h in sizes)
        raise ConfigError(
            f"size {new.width}x{new.height} is not offered for this model; pick one of {offered}"
        )
    return new
