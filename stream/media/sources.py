"""Frame sources: `synthetic` (a moving test pattern), `webcam:N` (OpenCV) and video files (PyAV)."""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import av
import cv2
import numpy as np

from stream.media.common import (
    SourceError,
    bgr_to_rgb,
    frame_from_av,
    short_reason,
)
from stream.media.slot import LatestFrameSlot

logger = logging.getLogger(__name__)

SOURCE_FORMS = "`webcam:N` (N >= 0, e.g. webcam:0), a video file path (e.g. clip.mp4), or `synthetic`"
_VIDEO_HINT = "Give a video file such as .mp4/.webm/.mkv/.y4m"


class FrameSource(Protocol):
    fps: float  # nominal frame rate

    def read(self) -> np.ndarray | None:
        """Next frame, or None when the source has ended."""
        ...

    def close(self) -> None: ...


class SyntheticSource:
    """A deterministic moving test pattern: frame i depends only on (i, width, height).

    Frames are produced as fast as they are read (no real-time pacing); infinite unless `frames`.
    """

    def __init__(
        self, width: int = 512, height: int = 512, fps: float = 24.0, frames: int | None = None
    ) -> None:
        if not isinstance(width, int) or not isinstance(height, int) or width < 1 or height < 1:
            raise SourceError(f"synthetic source size must be positive integers, got {width}x{height}")
        if not math.isfinite(fps) or fps <= 0:
            raise SourceError(f"synthetic source fps must be > 0, got {fps}")
        if frames is not None and frames < 0:
            raise SourceError(f"synthetic source frames must be >= 0 or None, got {frames}")
        self.width = width
        self.height = height
        self.fps = float(fps)
        self.frames = frames
        self._index = 0
        self._closed = False
        # Pixel grids, computed once: (1, W) and (H, 1).
        self._x = np.arange(width, dtype=np.float32)[None, :]
        self._y = np.arange(height, dtype=np.float32)[:, None]

    def frame(self, index: int) -> np.ndarray:
        """Frame `index` of the pattern: a drifting colour gradient, moving stripes, a disc and a bar."""
        w, h = self.width, self.height
        u, v = self._x / w, self._y / h  # (1, W), (H, 1) in [0, 1)
        p = index / 24.0  # pattern time; fixed per index, independent of fps
        two_pi = np.float32(2 * math.pi)
        # 1. smooth colour gradient that drifts slowly
        r = 0.5 + 0.35 * np.sin(two_pi * (u + 0.10 * p)) + 0.15 * v
        g = 0.5 + 0.35 * np.sin(two_pi * (v - 0.07 * p))
        b = 0.5 + 0.35 * np.sin(two_pi * (0.7 * (u + v) + 0.05 * p))
        img = np.stack(np.broadcast_arrays(r, g, b), axis=-1)  # (H, W, 3)
        # 2. diagonal stripes sliding along the diagonal
        stripes = np.sin(two_pi * (6 * u + 3 * v - 0.8 * p)) > 0.85  # (H, W)
        img[stripes] *= 0.35
        # 3. a disc on a Lissajous path
        cx = w * (0.5 + 0.3 * math.cos(1.3 * p))
        cy = h * (0.5 + 0.3 * math.sin(1.7 * p))
        radius = 0.12 * min(w, h)
        disc = (self._x - cx) ** 2 + (self._y - cy) ** 2 <= radius**2  # (H, W)
        img[disc] = (0.95, 0.9, 0.2)
        # 4. a vertical bar bouncing left to right
        phase = (0.5 * p) % 2.0
        left = w * 0.85 * (phase if phase <= 1.0 else 2.0 - phase)
        bar = (self._x >= left) & (self._x < left + max(1.0, 0.06 * w))  # (1, W)
        img[:, bar[0]] = (0.1, 0.2, 0.9)
        return np.ascontiguousarray(np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8))

    def read(self) -> np.ndarray | None:
        if self._closed or (self.frames is not None and self._index >= self.frames):
            return None
        out = self.frame(self._index)
        self._index += 1
        return out

    def close(self) -> None:
        self._closed = True


class WebcamSource:
    """Camera `index` via OpenCV; a background thread keeps only the newest frame.

    read() returns the newest frame (older unread frames are dropped and counted in `drops`), and
    None once the camera has delivered nothing for `stall_timeout` seconds or after close().
    `width`/`height` are requested from the camera as hints; frames come at the size it delivers.
    `capture` lets a caller pass an already opened cv2.VideoCapture (another backend, tests).
    """

    def __init__(
        self,
        index: int,
        width: int | None = None,
        height: int | None = None,
        *,
        stall_timeout: float = 2.0,
        first_frame_timeout: float = 10.0,
        capture: Any = None,
    ) -> None:
        self.index = index
        self.name = f"webcam:{index}"
        self._stall_timeout = stall_timeout
        self._first_frame_timeout = max(first_frame_timeout, stall_timeout)
        if capture is None:
            if not isinstance(index, int) or index < 0:
                raise SourceError(
                    f"webcam index must be an integer >= 0, got {index!r}; use the form webcam:N"
                )
            capture = _open_camera(index)
            if capture is None:
                raise SourceError(
                    f"{self.name} could not be opened: no camera at index {index}. Check that a camera is "
                    "connected and not used by another program, or use --source synthetic"
                )
            if width is not None:
                capture.set(cv2.CAP_PROP_FRAME_WIDTH, width)
            if height is not None:
                capture.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        self._capture = capture
        reported = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = reported if math.isfinite(reported) and 0 < reported <= 240 else 30.0
        self._slot: LatestFrameSlot[np.ndarray] = LatestFrameSlot()
        self._stop = threading.Event()
        self._frames_read = 0
        self._ended = False
        self._closed = False
        self._thread = threading.Thread(target=self._reader_loop, name=f"{self.name}-reader", daemon=True)
        self._thread.start()
        logger.info("opened %s (%s fps reported)", self.name, self.fps)

    @property
    def drops(self) -> int:
        """Camera frames that were replaced by a newer one before read() took them."""
        return self._slot.drops

    @property
    def captured(self) -> int:
        """Frames delivered by the camera so far."""
        return self._slot.puts

    def _reader_loop(self) -> None:
        last_frame = time.monotonic()
        try:
            while not self._stop.is_set():
                ok, image = self._capture.read()
                if ok and image is not None:
                    last_frame = time.monotonic()
                    self._slot.put(bgr_to_rgb(image))
                    continue
                if time.monotonic() - last_frame > self._stall_timeout:
                    logger.warning(
                        "%s delivered no frame for %.1f s; stopping", self.name, self._stall_timeout
                    )
                    break
                self._stop.wait(0.01)
        except Exception:
            logger.exception("%s reader thread failed", self.name)
        finally:
            self._slot.close()

    def read(self) -> np.ndarray | None:
        if self._ended or self._closed:
            return None
        timeout = self._first_frame_timeout if self._frames_read == 0 else self._stall_timeout
        frame = self._slot.get(timeout=timeout)
        if frame is None:
            self._ended = True
            logger.info("%s ended after %d frames (%d dropped)", self.name, self._frames_read, self.drops)
            return None
        self._frames_read += 1
        return frame

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._slot.close()
        self._thread.join(timeout=5.0)
        if self._thread.is_alive():
            # Releasing a capture that another thread is reading from can crash OpenCV; leak it instead.
            logger.warning("%s reader thread did not stop; not releasing the camera", self.name)
            return
        self._capture.release()


def _open_camera(index: int) -> Any:
    """cv2.VideoCapture(index) with OpenCV's own warnings silenced; None if it did not open."""
    cv_logging: Any = getattr(cv2, "utils", None)
    cv_logging = getattr(cv_logging, "logging", None)
    previous = cv_logging.getLogLevel() if cv_logging is not None else None
    if cv_logging is not None:
        cv_logging.setLogLevel(cv_logging.LOG_LEVEL_SILENT)
    try:
        capture = cv2.VideoCapture(index)
    except cv2.error as exc:
        logger.debug("cv2.VideoCapture(%d) raised: %s", index, exc)
        return None
    finally:
        if cv_logging is not None:
            cv_logging.setLogLevel(previous)
    if not capture.isOpened():
        capture.release()
        return None
    return capture


class VideoFileSource:
    """Every frame of the first video stream of a file, in order, decoded with PyAV."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise SourceError(f"video file '{path}' does not exist")
        if self.path.is_dir():
            raise SourceError(f"'{path}' is a directory, not a video file. {_VIDEO_HINT}")
        try:
            container = av.open(str(self.path), mode="r")
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise SourceError(f"cannot read '{path}' as video: {short_reason(exc)}. {_VIDEO_HINT}") from exc
        if not container.streams.video:
            kinds = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
            container.close()
            raise SourceError(f"'{path}' has no video stream (it has: {kinds}). {_VIDEO_HINT}")
        self._container = container
        self._stream = container.streams.video[0]
        self._stream.thread_type = "AUTO"
        rate = self._stream.average_rate or self._stream.guessed_rate
        self.fps = float(rate) if rate else 24.0
        self.width = self._stream.codec_context.width
        self.height = self._stream.codec_context.height
        self._frames = container.decode(self._stream)
        self._count = 0
        self._closed = False
        logger.info("opened '%s': %dx%d at %.3g fps", self.path, self.width, self.height, self.fps)

    def read(self) -> np.ndarray | None:
        if self._closed:
            return None
        try:
            frame = next(self._frames, None)
        except (av.FFmpegError, OSError) as exc:
            logger.warning(
                "stopped reading '%s' after %d frames: %s", self.path, self._count, short_reason(exc)
            )
            return None
        if frame is None:
            return None
        self._count += 1
        return frame_from_av(frame)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._container.close()


def open_source(spec: str, width: int = 512, height: int = 512, fps: float = 24.0) -> FrameSource:
    """Open `synthetic`, `webcam:N` or a video file path; SourceError with a one-line fix otherwise.

    `width`, `height` and `fps` shape the synthetic source; a webcam is asked for `width` x `height`.
    """
    text = spec.strip()
    if text.lower() == "synthetic":
        return SyntheticSource(width, height, fps)
    if text.lower() == "webcam" or text.lower().startswith("webcam:"):
        number = text.partition(":")[2].strip()
        if not re.fullmatch(r"\d+", number):
            raise SourceError(
                f"bad webcam source '{spec}': the form is webcam:N with N an integer >= 0, e.g. webcam:0"
            )
        return WebcamSource(int(number), width, height)
    path = Path(text)
    if text and path.exists():
        return VideoFileSource(path)
    if text and (path.suffix or "/" in text or os.sep in text):
        raise SourceError(f"video file '{spec}' does not exist")
    raise SourceError(f"unknown source '{spec}': use {SOURCE_FORMS}")
