"""Frame sources, frame sinks and the latest-only hand-off between pipeline stages.

A frame is an ``(H, W, 3)`` C-contiguous ``uint8`` RGB numpy array everywhere in this module.

Sources (``open_source``): ``synthetic``, ``webcam:N`` (OpenCV) and video files (PyAV).
Sinks (``open_sink``): video files (PyAV), ``window`` (OpenCV ``imshow``) and ``virtualcam`` /
``virtualcam:DEVICE`` (a virtual camera for OBS and video-call apps through pyvirtualcam, the optional
extra ``stream[obs]``; frames are sent at a fixed rate, the last one repeated while the model is slow).
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
from typing import Any, Generic, NoReturn, Protocol, TypeVar

import av
import cv2
import numpy as np
from av.video.stream import VideoStream

logger = logging.getLogger(__name__)

T = TypeVar("T")

SOURCE_FORMS = "`webcam:N` (N >= 0, e.g. webcam:0), a video file path (e.g. clip.mp4), or `synthetic`"
SINK_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi")
SINK_FORMS = (
    "a video file path (.mp4, .mkv, .webm, .mov, .avi), e.g. out.mp4, `window`, "
    "or `virtualcam` (optionally `virtualcam:DEVICE`, e.g. virtualcam:/dev/video2)"
)
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


_DEV_DIR = Path("/dev")  # where v4l2loopback devices appear; a module constant so tests can move it
_OBS_EXTRA = "pip install 'stream[obs]'"


def _import_pyvirtualcam() -> Any:
    """The pyvirtualcam module (the optional extra `obs`), or SinkError saying how to install it."""
    try:
        import pyvirtualcam
    except ImportError as exc:
        raise SinkError(
            f"the virtualcam sink needs pyvirtualcam, which is not installed: {_OBS_EXTRA}"
        ) from exc
    return pyvirtualcam


def _virtualcam_fix() -> str:
    """How to get a working virtual camera on this platform, as one sentence."""
    if sys.platform.startswith("linux"):
        return (
            "On Linux, install the v4l2loopback-dkms package, run "
            '`sudo modprobe v4l2loopback devices=1 exclusive_caps=1 card_label="stream"` and pass the '
            "device it created with --virtualcam-device /dev/videoN (or --sink virtualcam:/dev/videoN)"
        )
    if sys.platform == "win32":
        return (
            "On Windows, install OBS Studio 26+ and start its Virtual Camera once "
            "(Controls > Start Virtual Camera), then stop it and retry"
        )
    if sys.platform == "darwin":
        return (
            "On macOS, install OBS Studio 30+ and start its Virtual Camera once "
            "(this installs the camera extension), then stop it and retry"
        )
    return (
        "virtual cameras work on Linux (v4l2loopback), Windows and macOS (OBS Studio), "
        f"not on {sys.platform}; use a video file sink such as --sink out.mp4"
    )


def _one_line(exc: BaseException) -> str:
    """An exception's whole message on one line (pyvirtualcam puts one line per backend it tried)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines).rstrip(".") or type(exc).__name__


def _v4l2loopback_problem(device: str | None) -> str | None:
    """Why v4l2loopback certainly cannot work (no such device file), or None when it may."""
    if device is not None:
        return None if os.path.exists(device) else f"device {device} does not exist"
    if any(_DEV_DIR.glob("video[0-9]*")):
        return None  # one of them may be a loopback device; pyvirtualcam finds out when it opens
    return f"no v4l2loopback device: there is no {_DEV_DIR / 'videoN'}"


class VirtualCamSink:
    """Send frames to a virtual camera (OBS, video-call apps) through pyvirtualcam, at a fixed rate.

    The constructor fails fast (SinkError with the fix for this platform) when pyvirtualcam is not
    installed, `backend` is not one of pyvirtualcam's registered backends, or, on Linux, there is no
    v4l2loopback device file; nothing is opened yet. The camera opens at the first write(), at that
    frame's size, in RGB; later frames of another size are resized to it (a virtual camera cannot
    change size mid-stream). A sender thread sends the newest frame every 1/fps seconds on a monotonic
    clock and repeats the last one when none arrived, so the camera never stalls when the model is
    slow; write() only hands a copy over through a latest-only slot and never waits for the camera.
    An error in the sender thread is raised as SinkError by the next write() (and every one after
    it) or by close(). close() is idempotent; the sink is also a context manager.
    """

    def __init__(self, fps: float = 24.0, device: str | None = None, backend: str | None = None) -> None:
        if not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
            raise SinkError(f"virtual camera fps must be > 0, got {fps}")
        if device is not None and (not isinstance(device, str) or not device.strip()):
            raise SinkError(f"virtual camera device must be a name such as /dev/video2, got {device!r}")
        self.fps = float(fps)
        self.backend = backend
        self._device = device
        self._pyvirtualcam = _import_pyvirtualcam()
        self.check()
        self._camera: Any = None  # pyvirtualcam.Camera, opened at the first write()
        self._size: tuple[int, int] | None = None  # (H, W) of the open camera
        self._slot: LatestFrameSlot[np.ndarray] = LatestFrameSlot()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None  # what stopped the sender thread
        self._error_reported = False
        self._resize_logged = False
        self._frames_written = 0
        self._frames_sent = 0
        self._repeats = 0
        self._closed = False

    def check(self) -> None:
        """Fail fast, without opening a camera: SinkError with the fix when none can open for sure.

        Passing this does not guarantee the first write() opens one (a /dev/videoN may be a real
        webcam, OBS's camera may not be installed); that error carries the same fix.
        """
        registered = sorted(self._pyvirtualcam.camera.BACKENDS)
        if self.backend is not None and self.backend not in registered:
            raise SinkError(
                f"pyvirtualcam has no virtual camera backend '{self.backend}' "
                f"(registered: {', '.join(registered) or 'none'}). {_virtualcam_fix()}"
            )
        candidates = [self.backend] if self.backend is not None else registered
        if not candidates:
            raise SinkError(
                f"pyvirtualcam has no virtual camera backend on {sys.platform}. {_virtualcam_fix()}"
            )
        if candidates == ["v4l2loopback"]:
            problem = _v4l2loopback_problem(self._device)
            if problem is not None:
                raise SinkError(f"cannot open the virtual camera: {problem}. {_virtualcam_fix()}")

    @property
    def device(self) -> str | None:
        """The device asked for, or once the camera is open the one in use (e.g. /dev/video2)."""
        return self._device

    @property
    def frames_written(self) -> int:
        """Frames received by write()."""
        return self._frames_written

    @property
    def frames_sent(self) -> int:
        """Frames sent to the camera, repeats included."""
        return self._frames_sent

    @property
    def repeats(self) -> int:
        """Sends of the previous frame again because no new one had arrived in time."""
        return self._repeats

    @property
    def drops(self) -> int:
        """Written frames replaced by a newer one before the sender took them."""
        return self._slot.drops

    def write(self, frame: np.ndarray) -> None:
        """Hand `frame` to the sender thread (the newest one wins); the first call opens the camera."""
        if self._error is not None:
            self._raise_error()
        if self._closed:
            raise SinkError("cannot write to the virtual camera: the sink is closed")
        _check_frame(frame)
        if self._camera is None:
            self._open_camera(frame.shape[0], frame.shape[1])
        if (frame.shape[0], frame.shape[1]) != self._size:
            frame = self._resize_to_camera(frame)
        else:
            frame = frame.copy()  # the caller may reuse its buffer; the sender may send this one again
        self._frames_written += 1
        self._slot.put(frame)

    def _open_camera(self, height: int, width: int) -> None:
        pyvirtualcam = self._pyvirtualcam
        try:
            camera = pyvirtualcam.Camera(
                width,
                height,
                self.fps,
                fmt=pyvirtualcam.PixelFormat.RGB,
                device=self._device,
                backend=self.backend,
            )
        except Exception as exc:  # pyvirtualcam turns every backend's failure into one RuntimeError
            raise SinkError(
                f"cannot open the virtual camera at {width}x{height}: {_one_line(exc)}. {_virtualcam_fix()}"
            ) from exc
        self._camera = camera
        self._size = (height, width)
        self._device = camera.device
        logger.info(
            "virtual camera %s (%s backend) opened at %dx%d, %.3g fps",
            camera.device,
            camera.backend,
            width,
            height,
            self.fps,
        )
        self._thread = threading.Thread(
            target=self._send_loop, args=(camera,), name="virtualcam-sender", daemon=True
        )
        self._thread.start()

    def _resize_to_camera(self, frame: np.ndarray) -> np.ndarray:
        height, width = self._size or frame.shape[:2]
        if not self._resize_logged:
            self._resize_logged = True
            logger.info(
                "virtual camera is %dx%d; resizing frames of %dx%d to it (a virtual camera cannot change "
                "size mid-stream)",
                width,
                height,
                frame.shape[1],
                frame.shape[0],
            )
        shrink = frame.shape[0] * frame.shape[1] > height * width
        interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        return np.ascontiguousarray(cv2.resize(frame, (width, height), interpolation=interpolation))

    def _send_loop(self, camera: Any) -> None:
        """Send the newest frame every 1/fps s on a monotonic deadline; repeat the last if none came."""
        period = 1.0 / self.fps
        frame = self._slot.get()  # the first frame; None when closed before it came
        fresh = True
        deadline = time.monotonic()
        try:
            while frame is not None:
                camera.send(frame)
                self._frames_sent += 1
                if not fresh:
                    self._repeats += 1
                deadline += period
                now = time.monotonic()
                if now - deadline > period:  # more than a frame late (a slow send): resync, no burst
                    deadline = now
                if self._stop.wait(max(0.0, deadline - now)):
                    return
                newest = self._slot.get(timeout=0)
                fresh = newest is not None
                frame = newest if newest is not None else frame
        except Exception as exc:
            self._error = exc
            logger.error("virtual camera %s stopped: %s", self._device, _one_line(exc))

    def _raise_error(self) -> NoReturn:
        self._error_reported = True
        name = f"virtual camera {self._device}" if self._device else "virtual camera"
        raise SinkError(f"the {name} failed: {_one_line(self._error or Exception())}") from self._error

    def close(self) -> None:
        """Stop the sender thread and close the camera; idempotent, fine if nothing was ever written.

        Raises SinkError for a sender-thread error that no write() has raised yet.
        """
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._slot.close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            if self._thread.is_alive():
                # Closing a camera that another thread is sending to can crash the backend; leak it.
                logger.warning("virtual camera sender did not stop; not closing the camera")
                return
        if self._camera is not None:
            try:
                self._camera.close()
            except Exception as exc:
                self._error = self._error or exc
            logger.info(
                "virtual camera %s closed: %d frames written, %d sent (%d repeats), %d dropped",
                self._device,
                self._frames_written,
                self._frames_sent,
                self._repeats,
                self.drops,
            )
        if self._error is not None and not self._error_reported:
            self._raise_error()

    def __enter__(self) -> VirtualCamSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_sink(spec: str, fps: float = 24.0, *, device: str | None = None) -> FrameSink:
    """Open `window`, `virtualcam[:DEVICE]` or a video file path; SinkError with a one-line fix otherwise.

    `device` picks the virtual camera device (e.g. /dev/video2, `OBS Virtual Camera`); the
    `virtualcam:DEVICE` form is a shorthand for it. Other sinks ignore it.
    """
    text = spec.strip()
    if text.lower() == "window":
        return WindowSink()
    kind, _, named = text.partition(":")
    if kind.lower() == "virtualcam":
        named = named.strip()
        if named and device is not None and named != device:
            raise SinkError(
                f"two virtual camera devices were given: '{named}' in --sink {spec} and '{device}'; give one"
            )
        return VirtualCamSink(fps, device=named or device)
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
