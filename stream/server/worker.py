"""The scheduler worker: the one thread that owns the model."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import av
import numpy as np

from stream import stamp
from stream.config import ConfigError, StreamConfig
from stream.devices import release_device_memory
from stream.server.rtc import to_video
from stream.server.session import DenoiserFactory, Processed, Session

logger = logging.getLogger(__name__)


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
        video = to_video(out) if session.source is not None else None  # someone sends it: convert here
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
