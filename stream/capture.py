"""Frame sources, frame sinks and the latest-only hand-off between pipeline stages.

A frame is an ``(H, W, 3)`` C-contiguous ``uint8`` RGB numpy array everywhere in this module.

Sources (``open_source``): ``synthetic``, ``webcam:N`` (OpenCV) and video files (PyAV).
Sinks (``open_sink``): video files (PyAV) and ``window`` (OpenCV ``imshow``).
``LatestFrameSlot`` is the hand-off used between stages: a new item overwrites an unread one and the
overwrite is counted as a drop, so latency never grows when a consumer is slower than its producer.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import av
import cv2
import numpy as np
from av.video.stream import VideoStream

logger = logging.getLogger(__name__)

T = TypeVar("T")

SOURCE_FORMS = "`webcam:N` (N >= 0, e.g. webcam:0), a video file path (e.g. clip.mp4), or `synthetic`"
SINK_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi")
SINK_FORMS = "a video file path (.mp4, .mkv, .webm, .mov, .avi), e.g. out.mp4, or `window`"
_VIDEO_HINT = "Give a video file such as .mp4/.webm/.mkv/.y4m"


class SourceError(ValueError):
    """A frame source could not be opened; the message is one user-facing line saying what to do."""


class SinkError(ValueError):
    """A frame sink could not be opened; the message is one user-facing line saying what to do."""


# ----------------------------------------------------------------------------------------------------
# Latest-only hand-off
# ----------------------------------------------------------------------------------------------------


class LatestFrameSlot(Generic[T]):
    """Thread-safe latest-only hand-off: put() overwrites an unread item (counted as a drop).

    get() returns the newest item. The slot holds at most one item, so memory never grows.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: T | None = None
        self._has_item = False  # the slot holds at most this one item
        self._closed = False
        self._puts = 0
        self._drops = 0

    def put(self, item: T) -> None:
        """Store `item`, replacing (and dropping) an unread one; never blocks. Ignored after close()."""
        with self._cond:
            if self._closed:
                return
            if self._has_item:
                self._drops += 1
            self._item = item
            self._has_item = True
            self._puts += 1
            self._cond.notify_all()

    def get(self, timeout: float | None = None) -> T | None:
        """Take the newest unread item, waiting for one; None on timeout or when closed and empty."""
        with self._cond:
            self._cond.wait_for(lambda: self._has_item or self._closed, timeout)
            if not self._has_item:
                return None
            item = self._item
            self._item = None
            self._has_item = False
            return item

    def close(self) -> None:
        """Wake every waiter; an unread item can still be taken, later puts are ignored."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def ready(self) -> bool:
        """Whether an unread item is waiting."""
        return self._has_item

    @property
    def drops(self) -> int:
        """Items that were overwritten before anyone read them."""
        return self._drops

    @property
    def puts(self) -> int:
        """Items accepted by put()."""
        return self._puts


# ----------------------------------------------------------------------------------------------------
# Conversions
# ----------------------------------------------------------------------------------------------------


def frame_from_av(frame: av.VideoFrame) -> np.ndarray:
    """Convert a PyAV frame (any pixel format) to an (H, W, 3) uint8 RGB array."""
    return np.ascontiguousarray(frame.to_ndarray(format="rgb24"))


def frame_to_av(array: np.ndarray) -> av.VideoFrame:
    """Convert an (H, W, 3) uint8 RGB array to a PyAV rgb24 frame (pts is left unset)."""
    _check_frame(array)
    return av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")


def _check_frame(array: np.ndarray) -> None:
    if not isinstance(array, np.ndarray) or array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        got = f"{array.dtype} array of shape {array.shape}" if isinstance(array, np.ndarray) else type(array)
        raise ValueError(f"a frame must be an (H, W, 3) uint8 RGB array, got {got}")


def _bgr_to_rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _short_reason(exc: BaseException) -> str:
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    reason = str(reason).strip().splitlines()[0] if str(reason).strip() else type(exc).__name__
    return reason[:120]


# ----------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------


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
                    self._slot.put(_bgr_to_rgb(image))
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
            raise SourceError(f"cannot read '{path}' as video: {_short_reason(exc)}. {_VIDEO_HINT}") from exc
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
                "stopped reading '%s' after %d frames: %s", self.path, self._count, _short_reason(exc)
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


# ----------------------------------------------------------------------------------------------------
# Sinks
# ----------------------------------------------------------------------------------------------------


class FrameSink(Protocol):
    def write(self, frame: np.ndarray) -> None: ...

    def close(self) -> None: ...


def _pick_codec(suffix: str) -> tuple[str, dict[str, str]]:
    """(codec name, encoder options) for a container suffix, from what the installed PyAV offers."""
    available = av.codecs_available
    if suffix == ".webm":
        for name in ("libvpx", "libvpx-vp9"):
            if name in available:
                return name, {"deadline": "realtime", "cpu-used": "8", "crf": "10"}
        raise SinkError("cannot write .webm: this PyAV build has no VP8/VP9 encoder; use --sink out.mp4")
    if "libx264" in available:
        return "libx264", {"preset": "veryfast", "crf": "18"}
    return "mpeg4", {"qscale": "3"}


class VideoFileSink:
    """Encode frames into a video file with PyAV (H.264 for .mp4/.mkv/.mov/.avi, VP8 for .webm).

    The stream is created on the first frame, at that frame's size. Odd widths/heights are padded to
    even (yuv420p needs that) by repeating the last row/column. close() must be called (it is
    idempotent; call it from a `finally`) to flush the encoder and finalize the file.
    """

    def __init__(self, path: str | os.PathLike[str], fps: float = 24.0) -> None:
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in SINK_SUFFIXES:
            raise SinkError(f"cannot write video to '{path}': unsupported file type; use {SINK_FORMS}")
        if not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
            raise SinkError(f"video file sink fps must be > 0, got {fps}")
        parent = self.path.parent
        if not parent.is_dir():
            raise SinkError(
                f"cannot write '{path}': the directory '{parent}' does not exist; create it first"
            )
        if self.path.is_dir():
            raise SinkError(f"cannot write '{path}': it is a directory; give a file path such as out.mp4")
        if not os.access(parent, os.W_OK):
            raise SinkError(f"cannot write '{path}': the directory '{parent}' is not writable")
        self.codec, self._options = _pick_codec(suffix)
        self.fps = float(fps)
        self._rate = Fraction(fps).limit_denominator(1001)
        self._time_base = 1 / self._rate
        self._container: Any = None
        self._stream: VideoStream | None = None
        self._size: tuple[int, int] | None = None  # (H, W) of incoming frames
        self._pad = (0, 0)  # rows, columns added to reach even sizes
        self._frames = 0
        self._closed = False

    @property
    def frames_written(self) -> int:
        return self._frames

    def _open(self, height: int, width: int) -> VideoStream:
        try:
            self._container = av.open(str(self.path), mode="w")
        except (av.FFmpegError, OSError) as exc:
            raise SinkError(f"cannot write '{self.path}': {_short_reason(exc)}") from exc
        stream = self._container.add_stream(self.codec, rate=self._rate)
        self._pad = (height % 2, width % 2)
        stream.height = height + self._pad[0]
        stream.width = width + self._pad[1]
        stream.pix_fmt = "yuv420p"
        stream.options = dict(self._options)
        if self.codec != "libx264":
            stream.bit_rate = 8_000_000
        if any(self._pad):
            logger.info(
                "'%s': %dx%d is odd; padding to %dx%d for yuv420p",
                self.path,
                width,
                height,
                stream.width,
                stream.height,
            )
        logger.info("writing '%s' with %s at %.3g fps", self.path, self.codec, self.fps)
        return stream

    def write(self, frame: np.ndarray) -> None:
        if self._closed:
            raise SinkError(f"cannot write to '{self.path}': the sink is closed")
        _check_frame(frame)
        size = (frame.shape[0], frame.shape[1])
        if self._stream is None:
            self._size = size
            self._stream = self._open(*size)
        elif size != self._size:
            (h0, w0), (h1, w1) = self._size or (0, 0), size
            raise ValueError(
                f"frame size changed from {w0}x{h0} to {w1}x{h1}; all frames of one video file must have the "
                "same size"
            )
        if any(self._pad):
            frame = np.pad(frame, ((0, self._pad[0]), (0, self._pad[1]), (0, 0)), mode="edge")
        av_frame = frame_to_av(frame)
        av_frame.pts = self._frames
        av_frame.time_base = self._time_base
        for packet in self._stream.encode(av_frame):
            self._container.mux(packet)
        self._frames += 1

    def close(self) -> None:
        """Flush the encoder and finalize the file; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        if self._container is None:
            logger.warning("no frames were written; '%s' was not created", self.path)
            return
        try:
            if self._stream is not None:
                for packet in self._stream.encode(None):
                    self._container.mux(packet)
        finally:
            self._container.close()
            logger.info("wrote %d frames to '%s'", self._frames, self.path)


def _has_display() -> bool:
    if not sys.platform.startswith("linux"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


class WindowSink:
    """Show frames in an OpenCV window; `closed_by_user` turns True on q/Esc or when the window is closed."""

    def __init__(self, title: str = "stream") -> None:
        fix = "use a video file sink such as --sink out.mp4"
        if not _has_display():
            raise SinkError(
                f"the window sink needs a display: DISPLAY and WAYLAND_DISPLAY are not set "
                f"(headless machine or SSH without X forwarding); {fix}"
            )
        try:
            cv2.namedWindow(title, cv2.WINDOW_AUTOSIZE)
        except cv2.error as exc:
            raise SinkError(
                f"the window sink needs a display: OpenCV could not open a window "
                f"({_short_reason(exc)}); {fix}"
            ) from exc
        self.title = title
        self.closed_by_user = False
        self._shown = False
        self._closed = False

    def write(self, frame: np.ndarray) -> None:
        if self._closed or self.closed_by_user:
            return
        _check_frame(frame)
        cv2.imshow(self.title, cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        self._shown = True
        key = cv2.waitKey(1)
        if key != -1 and (key & 0xFF) in (ord("q"), ord("Q"), 27):
            logger.info("window '%s' closed by the user (key)", self.title)
            self.closed_by_user = True
            return
        try:
            visible = cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE)
        except cv2.error:
            visible = 0.0
        if visible < 1:
            logger.info("window '%s' closed by the user", self.title)
            self.closed_by_user = True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            cv2.destroyWindow(self.title)
            cv2.waitKey(1)
        except cv2.error:
            pass


def open_sink(spec: str, fps: float = 24.0) -> FrameSink:
    """Open `window` or a video file path; SinkError with a one-line fix otherwise."""
    text = spec.strip()
    if text.lower() == "window":
        return WindowSink()
    if Path(text).suffix.lower() in SINK_SUFFIXES:
        return VideoFileSink(text, fps)
    raise SinkError(f"unknown sink '{spec}': use {SINK_FORMS}")


def write_y4m(path: Path, frames: list[np.ndarray], fps: int = 24) -> None:
    """Write RGB frames as a YUV4MPEG2 clip (what Chromium's fake camera reads), even sizes only."""
    h, w = frames[0].shape[:2]
    with path.open("wb") as out:
        out.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for frame in frames:
            out.write(b"FRAME\n" + cv2.cvtColor(frame, cv2.COLOR_RGB2YUV_I420).tobytes())
