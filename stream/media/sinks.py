"""Frame sinks: video files (PyAV), `window` (OpenCV imshow), `virtualcam` (media/virtualcam.py); and
`write_y4m` for Chromium's fake camera."""

from __future__ import annotations

import logging
import math
import os
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import av
import cv2
import numpy as np
from av.video.stream import VideoStream

from stream.media.common import (
    SinkError,
    check_frame,
    frame_to_av,
    short_reason,
)
from stream.media.virtualcam import VirtualCamSink

logger = logging.getLogger(__name__)

SINK_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi")
SINK_FORMS = (
    "a video file path (.mp4, .mkv, .webm, .mov, .avi), e.g. out.mp4, `window`, "
    "or `virtualcam` (optionally `virtualcam:DEVICE`, e.g. virtualcam:/dev/video2)"
)


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
            raise SinkError(f"cannot write '{self.path}': {short_reason(exc)}") from exc
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
        check_frame(frame)
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
                f"({short_reason(exc)}); {fix}"
            ) from exc
        self.title = title
        self.closed_by_user = False
        self._shown = False
        self._closed = False

    def write(self, frame: np.ndarray) -> None:
        if self._closed or self.closed_by_user:
            return
        check_frame(frame)
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
