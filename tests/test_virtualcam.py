"""Tests for stream.media.VirtualCamSink: fixed-rate sending, repeats, resizing, closing, errors.

A fake backend is registered through pyvirtualcam's real backend registry, so every frame goes
through the real `pyvirtualcam.Camera` (its shape checks and flattening) before the fake records it.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

pyvirtualcam = pytest.importorskip("pyvirtualcam")
from pyvirtualcam import camera as pyvirtualcam_camera  # noqa: E402
from pyvirtualcam.util import encode_fourcc  # noqa: E402

from stream.media import (  # noqa: E402
    SinkError,
    SyntheticSource,
    VirtualCamSink,
    open_sink,
    virtualcam,  # noqa: E402
)

BACKEND = "stream-test"


class FakeBackend:
    """A pyvirtualcam backend that records every frame it receives with a time.monotonic() stamp."""

    instances: list[FakeBackend] = []
    send_delay = 0.0  # seconds each send() takes (a slow device)
    fail_on_send: int | None = None  # the n-th send() (1-based) raises, like an unplugged device
    broken_device = "/dev/video-broken"  # opening this device fails

    def __init__(self, *, width: int, height: int, fps: float, fourcc: int, device: str | None, **kw: Any):
        if device == self.broken_device:
            raise OSError(f"cannot open {device}: not a v4l2 loopback device")
        self.width = width
        self.height = height
        self.fps = fps
        self.fourcc = fourcc
        self.device_name = device
        self.frames: list[np.ndarray] = []
        self.stamps: list[float] = []
        self.sends = 0
        self.closes = 0
        FakeBackend.instances.append(self)

    def send(self, frame: np.ndarray) -> None:
        self.sends += 1
        if self.fail_on_send is not None and self.sends >= self.fail_on_send:
            raise OSError("device unplugged")
        if self.send_delay:
            time.sleep(self.send_delay)
        self.stamps.append(time.monotonic())
        self.frames.append(frame.reshape(self.height, self.width, 3).copy())  # (H, W, 3)

    def close(self) -> None:
        self.closes += 1

    def device(self) -> str:
        return self.device_name or "fake-camera"

    def native_fourcc(self) -> int | None:
        return None


@pytest.fixture(autouse=True)
def fake_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[FakeBackend]]:
    monkeypatch.setattr(FakeBackend, "instances", [])
    pyvirtualcam.register_backend(BACKEND, FakeBackend)
    yield FakeBackend
    pyvirtualcam_camera.BACKENDS.pop(BACKEND, None)


def frames(count: int, width: int = 64, height: int = 48) -> list[np.ndarray]:
    source = SyntheticSource(width, height)
    return [source.frame(i * 7) for i in range(count)]


def wait_until(predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def only_backend() -> FakeBackend:
    assert len(FakeBackend.instances) == 1
    return FakeBackend.instances[0]


# ----------------------------------------------------------------------------------------------------
# fixed-rate sending
# ----------------------------------------------------------------------------------------------------


def test_sends_at_the_configured_rate_while_the_model_is_slower() -> None:
    fps, duration = 30.0, 1.0
    clip = frames(12)
    with VirtualCamSink(fps=fps, backend=BACKEND) as sink:
        start = time.monotonic()
        for i, frame in enumerate(clip):  # a model at ~10 fps, a third of the camera's rate
            sink.write(frame)
            time.sleep(max(0.0, start + (i + 1) * 0.1 - time.monotonic()))
        assert wait_until(lambda: only_backend().stamps[-1] - only_backend().stamps[0] >= duration)
    backend = only_backend()
    assert backend.fps == fps and backend.fourcc == encode_fourcc(pyvirtualcam.PixelFormat.RGB.value)
    stamps = np.array(backend.stamps)
    in_window = int(np.sum(stamps < stamps[0] + duration))
    assert abs(in_window - fps * duration) <= 0.2 * fps * duration, in_window
    gaps = np.diff(stamps)
    assert abs(float(np.median(gaps)) - 1 / fps) <= 0.2 / fps, np.median(gaps)
    assert float(np.percentile(gaps, 95)) < 2 / fps  # never waits for the model (its gaps are 3 / fps)
    assert all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in backend.frames)
    # Every written frame was sent, in order; the rest are repeats.
    assert sink.frames_written == len(clip) and sink.drops == 0
    assert sink.frames_sent == len(backend.frames) == len(clip) + sink.repeats
    firsts = [next(i for i, f in enumerate(backend.frames) if np.array_equal(f, c)) for c in clip]
    assert firsts == sorted(firsts)


def test_last_frame_repeats_when_writes_stop() -> None:
    fps = 40.0
    first, last, resumed = frames(3)
    with VirtualCamSink(fps=fps, backend=BACKEND) as sink:
        sink.write(first)
        sink.write(last)
        assert wait_until(lambda: sink.frames_sent >= 2)
        repeats_before = sink.repeats
        time.sleep(0.4)  # the model is stuck
        backend = only_backend()
        sent_while_stuck = sink.frames_sent
        assert sink.repeats - repeats_before >= 0.6 * 0.4 * fps
        assert all(np.array_equal(f, last) for f in backend.frames[-10:])
        assert float(np.percentile(np.diff(backend.stamps), 95)) < 2 / fps  # no stall

        sink.write(resumed)  # the model is back: the new frame replaces the repeated one
        assert wait_until(lambda: np.array_equal(backend.frames[-1], resumed))
        assert sink.frames_sent > sent_while_stuck
    assert sink.frames_written == 3
    # The two back-to-back writes may have collapsed into one send (a drop); nothing else was lost.
    assert sink.frames_sent == sink.frames_written - sink.drops + sink.repeats


def test_write_never_blocks_on_a_slow_camera(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeBackend, "send_delay", 0.15)
    clip = frames(20)
    with VirtualCamSink(fps=30.0, backend=BACKEND) as sink:
        sink.write(clip[0])
        durations = []
        for frame in clip[1:]:
            start = time.monotonic()
            sink.write(frame)
            durations.append(time.monotonic() - start)
            time.sleep(0.005)
        assert max(durations) < 0.05, max(durations)
        assert sink.drops > 0  # frames the slow camera had no time for were replaced, not queued
    assert only_backend().closes == 1


# ----------------------------------------------------------------------------------------------------
# size changes
# ----------------------------------------------------------------------------------------------------


def test_frame_of_a_new_size_is_resized_to_the_camera(caplog: pytest.LogCaptureFixture) -> None:
    small = frames(1, 64, 48)[0]
    large = frames(1, 128, 96)[0]
    other = frames(1, 40, 40)[0]
    sink = VirtualCamSink(fps=50.0, backend=BACKEND)
    with caplog.at_level(logging.INFO, logger="stream.media.virtualcam"), sink:
        sink.write(small)
        assert wait_until(lambda: sink.frames_sent >= 1)
        sink.write(large)
        expected = cv2.resize(large, (64, 48), interpolation=cv2.INTER_AREA)
        assert wait_until(lambda: np.array_equal(only_backend().frames[-1], expected))
        sink.write(other)
        assert wait_until(lambda: sink.frames_written == 3 and sink.frames_sent >= 4)
    backend = only_backend()
    assert (backend.width, backend.height) == (64, 48)
    assert all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in backend.frames)
    resize_logs = [r for r in caplog.records if "resizing" in r.getMessage()]
    assert len(resize_logs) == 1 and resize_logs[0].levelno == logging.INFO
    assert "64x48" in resize_logs[0].getMessage() and "128x96" in resize_logs[0].getMessage()


def test_written_frame_is_copied() -> None:
    frame = frames(1)[0]
    original = frame.copy()
    with VirtualCamSink(fps=50.0, backend=BACKEND) as sink:
        sink.write(frame)
        frame[:] = 0  # the caller reuses its buffer
        assert wait_until(lambda: sink.frames_sent >= 3)
    assert all(np.array_equal(f, original) for f in only_backend().frames)


def test_rejects_a_non_frame() -> None:
    with VirtualCamSink(backend=BACKEND) as sink, pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        sink.write(np.zeros((48, 64, 3), dtype=np.float32))
    assert FakeBackend.instances == []


# ----------------------------------------------------------------------------------------------------
# closing
# ----------------------------------------------------------------------------------------------------


def test_close_stops_the_thread_and_closes_the_camera_once() -> None:
    sink = VirtualCamSink(fps=30.0, backend=BACKEND)
    sink.write(frames(1)[0])
    assert wait_until(lambda: sink.frames_sent >= 2)
    thread = sink._thread
    assert thread is not None and thread.is_alive()
    start = time.monotonic()
    sink.close()
    assert time.monotonic() - start < 1.0
    assert not thread.is_alive()
    backend = only_backend()
    assert backend.closes == 1
    sent = sink.frames_sent
    sink.close()  # idempotent
    time.sleep(0.1)
    assert backend.closes == 1 and sink.frames_sent == sent == len(backend.frames)
    with pytest.raises(SinkError, match="closed"):
        sink.write(frames(1)[0])


def test_close_without_any_frame() -> None:
    threads_before = threading.active_count()
    sink = VirtualCamSink(backend=BACKEND)
    sink.close()
    sink.close()
    assert FakeBackend.instances == [] and sink.frames_sent == 0
    assert threading.active_count() == threads_before
    with VirtualCamSink(backend=BACKEND):
        pass
    assert FakeBackend.instances == []


# ----------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------


def test_send_error_surfaces_on_the_next_write(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeBackend, "fail_on_send", 3)
    sink = VirtualCamSink(fps=50.0, backend=BACKEND)
    sink.write(frames(1)[0])
    thread = sink._thread
    assert thread is not None and wait_until(lambda: not thread.is_alive())
    for _ in range(2):  # the sink stays broken
        with pytest.raises(SinkError, match="device unplugged") as info:
            sink.write(frames(1)[0])
        assert "\n" not in str(info.value)
    sink.close()  # already reported by write(): close() does not raise it again
    assert only_backend().closes == 1


def test_send_error_surfaces_on_close(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeBackend, "fail_on_send", 2)
    sink = VirtualCamSink(fps=50.0, backend=BACKEND)
    sink.write(frames(1)[0])
    thread = sink._thread
    assert thread is not None and wait_until(lambda: not thread.is_alive())
    with pytest.raises(SinkError, match="device unplugged"):
        sink.close()
    assert only_backend().closes == 1
    sink.close()


def test_camera_that_cannot_open_keeps_pyvirtualcam_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.platform", "linux")
    sink = VirtualCamSink(device=FakeBackend.broken_device, backend=BACKEND)
    with pytest.raises(SinkError) as info:
        sink.write(frames(1)[0])
    message = str(info.value)
    assert f"'{BACKEND}' backend: cannot open {FakeBackend.broken_device}" in message
    assert "v4l2loopback-dkms" in message and "sudo modprobe v4l2loopback devices=1" in message
    assert "--virtualcam-device /dev/videoN" in message and "\n" not in message
    sink.close()


@pytest.mark.parametrize(
    ("platform", "expected"),
    [
        (
            "linux",
            ['modprobe v4l2loopback devices=1 exclusive_caps=1 card_label="stream"', "v4l2loopback-dkms"],
        ),
        ("win32", ["OBS Studio 26+", "Virtual Camera"]),
        ("darwin", ["OBS Studio 30+", "Virtual Camera"]),
    ],
)
def test_unknown_backend_fails_fast_with_the_fix(
    monkeypatch: pytest.MonkeyPatch, platform: str, expected: list[str]
) -> None:
    monkeypatch.setattr("sys.platform", platform)
    start = time.monotonic()
    with pytest.raises(SinkError) as info:
        VirtualCamSink(backend="no-such-backend")
    assert time.monotonic() - start < 1.0
    message = str(info.value)
    assert "no-such-backend" in message and BACKEND in message and "\n" not in message
    for text in expected:
        assert text in message


def test_missing_v4l2loopback_device_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Only the built-in Linux backend (played by the fake), and a /dev without any videoN.
    monkeypatch.setattr(pyvirtualcam_camera, "BACKENDS", {"v4l2loopback": FakeBackend})
    monkeypatch.setattr(virtualcam, "_DEV_DIR", tmp_path)
    monkeypatch.setattr("sys.platform", "linux")
    with pytest.raises(SinkError, match="no v4l2loopback device") as info:
        VirtualCamSink()
    assert "sudo modprobe v4l2loopback" in str(info.value)
    device = tmp_path / "video7"
    with pytest.raises(SinkError, match="does not exist") as info:
        VirtualCamSink(device=str(device))
    assert "modprobe" in str(info.value)

    device.touch()  # once a device exists, the sink opens the camera on it
    with VirtualCamSink(device=str(device)) as sink:
        sink.write(frames(1)[0])
    assert only_backend().device_name == str(device) and sink.device == str(device)


def test_pyvirtualcam_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyvirtualcam", None)
    for make in (VirtualCamSink, lambda: open_sink("virtualcam")):
        with pytest.raises(SinkError, match=r"pyvirtualcam.*pip install 'stream\[obs\]'"):
            make()


@pytest.mark.parametrize("fps", [0.0, -5.0, float("nan"), float("inf")])
def test_bad_fps(fps: float) -> None:
    with pytest.raises(SinkError, match="fps must be > 0"):
        VirtualCamSink(fps=fps, backend=BACKEND)


# ----------------------------------------------------------------------------------------------------
# open_sink
# ----------------------------------------------------------------------------------------------------


def test_open_sink_virtualcam(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pyvirtualcam_camera, "BACKENDS", {BACKEND: FakeBackend})
    sink = open_sink("virtualcam")
    assert isinstance(sink, VirtualCamSink) and sink.device is None and sink.fps == 24.0
    sink.close()

    sink = open_sink(" virtualcam:/dev/video9 ", fps=30.0)
    assert isinstance(sink, VirtualCamSink) and sink.device == "/dev/video9" and sink.fps == 30.0
    with sink:
        sink.write(frames(1)[0])
    assert only_backend().device_name == "/dev/video9" and only_backend().fps == 30.0

    sink = open_sink("VirtualCam", device="/dev/video4")
    assert isinstance(sink, VirtualCamSink) and sink.device == "/dev/video4"
    sink.close()
    with pytest.raises(SinkError, match="two virtual camera devices"):
        open_sink("virtualcam:/dev/video9", device="/dev/video4")


def test_unknown_sink_names_virtualcam() -> None:
    with pytest.raises(SinkError, match="virtualcam"):
        open_sink("virtual")
