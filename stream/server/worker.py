"""The scheduler worker: the one thread that owns the model.

Each round it takes the newest frame of every session that has one, applies each session's settings
(at its adaptive level), groups the sessions that can share a batch (the same engine and size) and runs
each group through the model as one batch (`--batching off`: one session at a time). A round's time is
what every session in it waits for its next frame, so the adaptive controller judges `round` (README,
"How it works"). The worker never dies of a frame: a failing batch is run again one session at a
time, a failing session loses that frame (the page is told), and a session that keeps failing is closed
with the reason. If the thread stops anyway, `failure` says why (/health reports it, offers are refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np

from stream import stamp
from stream.batch import FrameResult, process_batch
from stream.config import ConfigError, StreamConfig
from stream.devices import release_device_memory
from stream.models.base import first_line
from stream.server.limits import fit_side
from stream.server.rtc import to_video
from stream.server.session import Denoiser, DenoiserFactory, Processed, Session

logger = logging.getLogger(__name__)

MAX_FAILURES = 3  # frames in a row a session may fail before it is closed


@dataclass
class _Frame:
    """One session's frame in a round."""

    session: Session
    frame: av.VideoFrame
    arrival: float
    denoiser: Denoiser
    pixels: np.ndarray
    taken: float  # time.monotonic() when the round took it from the slot
    result: FrameResult | Exception | None = None

    @property
    def source(self) -> _Source:
        return _Source(self.frame, self.pixels, self.arrival, self.taken)


@dataclass(frozen=True)
class _Source:
    """What an output needs of the input it came from (with Stream Batch, an input of an earlier round):
    its timestamp, its pixels (the stamp's frame ID) and its wait in the slot."""

    frame: av.VideoFrame
    pixels: np.ndarray
    arrival: float
    taken: float


class ModelWorker:
    """The one thread that owns the model: each round, the newest frame of every session, batched."""

    def __init__(
        self,
        factory: DenoiserFactory,
        loop: asyncio.AbstractEventLoop,
        fallback: StreamConfig,
        on_frame: Callable[[float], None] | None = None,
        on_output: Callable[[Session, np.ndarray], None] | None = None,
        *,
        batching: bool = True,
        on_failed: Callable[[Session, str], None] | None = None,
        max_side: int = 640,
    ) -> None:
        self.factory = factory
        self.max_side = max_side  # larger frames are scaled down on arrival, to no less than the model size
        self.on_frame = on_frame  # called with each processed frame's model time in seconds
        self.on_output = on_output  # called with each processed frame (the virtual camera), on this thread
        self.on_failed = on_failed  # called on the loop for a session that keeps failing: close it
        self.fallback = fallback  # the server's settings, for a session whose own cannot run
        self.batching = batching
        self.loop = loop
        self.sessions: dict[str, Session] = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.failure: str | None = None  # why the thread stopped, if it did
        self.rounds = 0
        self.thread = threading.Thread(target=self._run, name="stream-model", daemon=True)

    @property
    def alive(self) -> bool:
        return self.failure is None and self.thread.is_alive()

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
        self.wake.set()

    def notify(self) -> None:
        self.wake.set()

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        try:
            while not self.stopping:
                self.wake.wait(timeout=0.5)
                self.wake.clear()
                self._round()  # in its own frame: no session stays referenced between rounds
        except BaseException as exc:  # a bug outside any one frame: say so everywhere
            self.failure = f"the model worker stopped: {first_line(exc)}"
            logger.exception("the model worker stopped")
        finally:
            with self.lock:
                for session in self.sessions.values():
                    session.denoiser = None

    def _round(self) -> None:
        """The newest frame of each session: settings, then the model in batches, then delivery."""
        with self.lock:
            sessions = list(self.sessions.values())
        start = time.perf_counter()
        # 1. take each session's newest frame and apply its settings
        frames = [f for f in (self._take(s) for s in sessions if not self.stopping) if f is not None]
        # 2. the model: one batch per group of sessions that can share one, else one by one
        for group in self._groups(frames):
            self._run_group(group)
        round_ms = (time.perf_counter() - start) * 1000.0
        # 3. deliver, and let the adaptive controller judge the round
        for item in frames:
            self._deliver(item, round_ms)
        for session in sessions:
            if session.closed:
                session.denoiser = None  # free its latents, noise and embeddings now
        if any(s.closed for s in sessions):
            release_device_memory()
        self.rounds += 1
        # A frame that arrived during the round is picked up at once, not after the next wake.
        if any(s.inputs.ready for s in sessions if not s.closed):
            self.wake.set()

    def _take(self, session: Session) -> _Frame | None:
        item = session.inputs.get(timeout=0)
        if item is None or session.closed:
            return None
        frame, arrival = item
        try:
            denoiser = self._settings(session)
            if denoiser is None:
                return None
            pixels = _pixels(frame, max(self.max_side, session.config.width, session.config.height))
        except Exception as exc:  # e.g. out of memory making its denoiser: this session only
            self._failed(session, exc)
            return None
        return _Frame(session, frame, arrival, denoiser, pixels, time.monotonic())

    def _settings(self, session: Session) -> Denoiser | None:
        """The session's denoiser, running the user's settings at the adaptive controller's level."""
        requested, version = session.requested
        ladder = session.adaptive.ladder
        config = session.adaptive.apply(requested)
        if session.adaptive.ladder is not ladder:  # new steps or size: the loop sees the new ladder
            session.publish_adaptive()
        try:
            denoiser = session.denoiser
            if denoiser is None:
                denoiser = session.denoiser = self.factory(config)
            elif config is not session.applied:
                denoiser.update(config)
            session.applied, session.accepted = config, requested
            return denoiser
        except ConfigError as exc:
            if config is not requested:  # the model cannot run this adaptive level: never try it again
                session.adaptive.drop_level(str(exc))
                session.publish_adaptive()
                logger.warning("session %s: adaptive level refused by the model: %s", session.id, exc)
                return None
            # a setting this model cannot run (e.g. LCM at a too low strength): roll it back, unless the
            # page has sent newer settings since; tell the page either way
            self._call(session.refuse, str(exc), version, session.accepted or self.fallback)
            return None

    def _groups(self, frames: list[_Frame]) -> list[list[_Frame]]:
        if not self.batching:
            return [[f] for f in frames]
        groups: dict[Any, list[_Frame]] = {}
        for f in frames:
            key = f.denoiser.batch_key() if hasattr(f.denoiser, "batch_key") else id(f)
            groups.setdefault(key, []).append(f)
        return list(groups.values())

    def _run_group(self, group: list[_Frame]) -> None:
        if len(group) > 1:
            try:
                results = process_batch(
                    [f.denoiser for f in group],  # type: ignore[misc]
                    [f.pixels for f in group],
                    [f.source for f in group],
                )
            except Exception as exc:  # e.g. out of memory at this batch size: one by one instead
                logger.warning("a batch of %d sessions failed (%s): running them one by one", len(group), exc)
            else:
                for item, result in zip(group, results, strict=True):
                    item.result = result
                return
        for item in group:
            try:
                item.result = item.denoiser.process(item.pixels, item.source)  # the input rides along
            except Exception as exc:
                item.result = exc

    def _deliver(self, item: _Frame, round_ms: float) -> None:
        session, result = item.session, item.result
        if session.closed:
            return
        if not isinstance(result, FrameResult):
            self._failed(session, result or RuntimeError("no result"))
            return
        session.failures = 0
        if result.pending:  # Stream Batch: nothing left the pipeline this round; nothing is sent
            if not result.skipped:
                self._observe(session, result, round_ms)
            return
        try:
            self._send(item, result, round_ms)
        except Exception as exc:  # encoding, stamping, the virtual camera: this frame only
            self._failed(session, exc)

    def _observe(self, session: Session, result: FrameResult, round_ms: float) -> None:
        """The model ran for this session: its time, and the adaptive controller's judgement of the round."""
        if self.on_frame is not None:
            self.on_frame(result.timings["total"] / 1000.0)
        change = session.adaptive.observe(round_ms)
        if change is not None:
            session.publish_adaptive()
            before, after = (_level(change[k]) for k in ("from", "to"))
            logger.info("session %s: adaptive %s -> %s: %s", session.id, before, after, change["reason"])

    def _send(self, item: _Frame, result: FrameResult, round_ms: float) -> None:
        # The input this output came from: this round's, or with Stream Batch an earlier round's.
        source = result.tag if isinstance(result.tag, _Source) else item.source
        session, pixels, frame = item.session, source.pixels, source.frame
        out = result.frame
        if session.stamp and out.shape == pixels.shape:
            out = stamp.copy_patch(pixels, out.copy())
        timings = {**result.timings, "wait": (source.taken - source.arrival) * 1000.0}
        if not result.skipped:
            timings["round"] = round_ms
            self._observe(session, result, round_ms)
        if self.on_output is not None:
            try:
                self.on_output(session, out)
            except Exception:  # the virtual camera failing must not stop the stream
                logger.exception("session %s: publishing a frame failed", session.id)
        video = to_video(out) if session.source is not None else None  # someone sends it: convert here
        time_base = frame.time_base or Fraction(1, 90000)
        processed = Processed(out, frame.pts, time_base, time.perf_counter(), video)
        self._call(session.deliver, processed, timings, result.skipped)

    def _failed(self, session: Session, exc: BaseException) -> None:
        """A frame of this session failed: tell the page; close the session when it keeps failing."""
        session.failures += 1
        message = f"processing a frame failed: {first_line(exc)}"
        logger.warning("session %s: %s", session.id, message, exc_info=session.failures == 1)
        self._call(session.report, message)
        if session.failures >= MAX_FAILURES and self.on_failed is not None:
            self._call(
                self.on_failed, session, f"{session.failures} frames in a row failed: {first_line(exc)}"
            )

    def _call(self, callback: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed (shutdown)
            self.loop.call_soon_threadsafe(callback, *args)


def _pixels(frame: av.VideoFrame, side: int) -> np.ndarray:
    """The frame as HxWx3 uint8 RGB, no larger than `side` on either side: a larger frame is scaled down
    in the same step that converts it from YUV (one libswscale call), before any float work."""
    width, height = fit_side(frame.width, frame.height, side)
    if (width, height) == (frame.width, frame.height):
        return frame.to_ndarray(format="rgb24")
    return frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA").to_ndarray()


def _level(level: dict[str, int]) -> str:
    return f"{level['steps']} step{'s' if level['steps'] != 1 else ''} at {level['width']}x{level['height']}"
