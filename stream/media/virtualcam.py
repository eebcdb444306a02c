"""A virtual camera sink for OBS and video-call apps, through pyvirtualcam (the optional extra `stream[obs]`);
frames are sent at a fixed rate, the last one repeated while the model is slow."""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

import cv2
import numpy as np

from stream.media.common import (
    SinkError,
    check_frame,
)
from stream.media.slot import LatestFrameSlot

logger = logging.getLogger(__name__)

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
        check_frame(frame)
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
