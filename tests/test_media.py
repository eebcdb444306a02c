"""Tests for stream.media: the latest-only slot, sources, sinks and their error messages."""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from pathlib import Path

import cv2
import numpy as np
import pytest

from stream.clips import window_pan
from stream.media import (
    LatestFrameSlot,
    SinkError,
    SourceError,
    SyntheticSource,
    VideoFileSink,
    VideoFileSource,
    WebcamSource,
    WindowSink,
    frame_from_av,
    frame_to_av,
    open_sink,
    open_source,
)

# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


class Item:
    """A weak-referenceable payload with an id."""

    def __init__(self, index: int) -> None:
        self.index = index


def pan_clip(height: int, width: int, count: int, dx: int = 4, dy: int = 2) -> list[np.ndarray]:
    """`count` crops of a real photo, panning by (dx, dy) pixels per frame."""
    return window_pan(count, (height, width), step=(dx, dy), origin=(30, 20))


def write_clip(path: Path, frames: list[np.ndarray], fps: float = 24.0) -> None:
    sink = VideoFileSink(path, fps)
    try:
        for frame in frames:
            sink.write(frame)
    finally:
        sink.close()


def read_all(path: Path) -> tuple[list[np.ndarray], float]:
    source = VideoFileSource(path)
    frames = []
    while (frame := source.read()) is not None:
        frames.append(frame)
    source.close()
    return frames, source.fps


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ----------------------------------------------------------------------------------------------------
# LatestFrameSlot
# ----------------------------------------------------------------------------------------------------


def test_slot_slow_consumer_sees_newest_and_counts_drops() -> None:
    slot: LatestFrameSlot[Item] = LatestFrameSlot()
    total = 200
    refs: list[weakref.ref[Item]] = []
    max_alive = 0
    seen: list[int] = []

    def produce() -> None:
        nonlocal max_alive
        for i in range(total):
            item = Item(i)
            refs.append(weakref.ref(item))
            slot.put(item)
            del item
            # Alive: the one in the slot and at most one the consumer is holding.
            max_alive = max(max_alive, sum(r() is not None for r in refs))
            time.sleep(0.0005)
        slot.close()

    def consume() -> None:
        while (item := slot.get(timeout=2.0)) is not None:
            seen.append(item.index)
            time.sleep(0.005)  # a slow stage
            del item

    producer = threading.Thread(target=produce)
    consumer = threading.Thread(target=consume)
    consumer.start()
    producer.start()
    producer.join(5)
    consumer.join(5)
    assert not producer.is_alive() and not consumer.is_alive()

    assert slot.puts == total
    assert 1 < len(seen) < total  # the consumer got some, not all
    assert all(a < b for a, b in itertools.pairwise(seen)), "frames went backwards"
    assert seen[-1] == total - 1, "the last frame put must reach the consumer"
    assert slot.drops == slot.puts - len(seen)
    assert max_alive <= 2, f"overwritten items were kept alive ({max_alive} at once)"
    assert sum(r() is not None for r in refs) == 0  # nothing retained once consumed


def test_slot_single_thread_semantics() -> None:
    slot: LatestFrameSlot[int] = LatestFrameSlot()
    slot.put(1)
    slot.put(2)
    slot.put(3)
    assert (slot.puts, slot.drops) == (3, 2)
    assert slot.get(timeout=0) == 3
    start = time.monotonic()
    assert slot.get(timeout=0.05) is None  # empty: times out
    assert 0.04 <= time.monotonic() - start < 1.0
    slot.put(4)
    slot.close()
    assert slot.closed
    assert slot.get() == 4  # an unread item survives close()
    assert slot.get() is None  # closed and empty: returns at once
    slot.put(5)  # ignored after close
    assert slot.get(timeout=0) is None
    assert slot.puts == 4


def test_slot_close_wakes_blocked_get() -> None:
    slot: LatestFrameSlot[int] = LatestFrameSlot()
    results: list[int | None] = []
    waiters = [threading.Thread(target=lambda: results.append(slot.get())) for _ in range(3)]
    for t in waiters:
        t.start()
    time.sleep(0.05)
    assert not results  # all blocked
    slot.close()
    for t in waiters:
        t.join(1.0)
    assert results == [None, None, None]


# ----------------------------------------------------------------------------------------------------
# SyntheticSource
# ----------------------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_moves() -> None:
    a = SyntheticSource(96, 64, fps=30.0)
    b = SyntheticSource(96, 64, fps=12.0, frames=10)
    frames_a = [a.read() for _ in range(10)]
    frames_b = [b.read() for _ in range(10)]
    assert b.read() is None  # `frames` ends it
    for fa, fb in zip(frames_a, frames_b, strict=True):
        assert fa is not None and fb is not None
        assert fa.shape == (64, 96, 3) and fa.dtype == np.uint8 and fa.flags.c_contiguous
        np.testing.assert_array_equal(fa, fb)
    for prev, nxt in itertools.pairwise(frames_a):
        assert prev is not None and nxt is not None
        assert mad(prev, nxt) > 1.0, "consecutive synthetic frames must differ"
    np.testing.assert_array_equal(a.frame(123), SyntheticSource(96, 64).frame(123))
    assert frames_a[0] is not None and frames_a[0].std() > 20  # a pattern, not a flat colour
    a.close()
    assert a.read() is None


def test_open_source_synthetic_uses_size_and_fps() -> None:
    source = open_source("synthetic", width=33, height=17, fps=12.0)
    frame = source.read()
    assert frame is not None and frame.shape == (17, 33, 3)
    assert source.fps == 12.0
    source.close()


# ----------------------------------------------------------------------------------------------------
# Video files
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "height", "width"), [(".mp4", 96, 128), (".webm", 96, 128), (".mkv", 64, 80)]
)
def test_video_file_round_trip_with_known_motion(
    tmp_path: Path, suffix: str, height: int, width: int
) -> None:
    clip = pan_clip(height, width, 24)
    path = tmp_path / f"pan{suffix}"
    write_clip(path, clip, fps=24.0)

    frames, fps = read_all(path)
    assert len(frames) == len(clip)
    assert fps == pytest.approx(24.0)
    for i, (got, want) in enumerate(zip(frames, clip, strict=True)):
        assert got.shape == want.shape and got.dtype == np.uint8 and got.flags.c_contiguous
        assert mad(got, want) < 8.0, f"frame {i} differs too much"
    # Order and motion survive: frame 12 matches clip frame 12 far better than its neighbours.
    assert mad(frames[12], clip[12]) < 0.5 * min(mad(frames[12], clip[9]), mad(frames[12], clip[15]))


def test_video_file_odd_size(tmp_path: Path) -> None:
    clip = pan_clip(65, 97, 12)
    path = tmp_path / "odd.mp4"
    write_clip(path, clip, fps=30.0)
    frames, fps = read_all(path)
    assert len(frames) == 12
    assert fps == pytest.approx(30.0)
    # Padded to even by repeating the edge; the original pixels are all there.
    assert frames[0].shape == (66, 98, 3)
    for got, want in zip(frames, clip, strict=True):
        assert mad(got[:65, :97], want) < 8.0
        assert mad(got[65, :97], want[64]) < 12.0  # the padded row repeats the last row


def test_video_file_sink_close_after_partial_write_and_interrupt(tmp_path: Path) -> None:
    clip = pan_clip(64, 64, 30)
    path = tmp_path / "partial.mp4"
    sink = VideoFileSink(path, fps=24.0)
    with pytest.raises(KeyboardInterrupt):
        try:
            for i, frame in enumerate(clip):
                if i == 7:
                    raise KeyboardInterrupt
                sink.write(frame)
        finally:
            sink.close()
    sink.close()  # idempotent
    frames, _ = read_all(path)
    assert len(frames) == 7
    assert mad(frames[-1], clip[6]) < 8.0
    with pytest.raises(SinkError, match="closed"):
        sink.write(clip[0])


def test_video_file_sink_rejects_size_change(tmp_path: Path) -> None:
    sink = VideoFileSink(tmp_path / "x.mp4")
    sink.write(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="size changed"):
        sink.write(np.zeros((32, 48, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        sink.write(np.zeros((32, 32, 3), np.float32))
    sink.close()


def test_open_source_and_sink_by_path(tmp_path: Path) -> None:
    path = tmp_path / "clip.mkv"
    sink = open_sink(str(path), fps=15.0)
    assert isinstance(sink, VideoFileSink)
    for frame in pan_clip(32, 48, 5):
        sink.write(frame)
    sink.close()
    source = open_source(str(path))
    assert isinstance(source, VideoFileSource)
    assert source.fps == pytest.approx(15.0)
    count = 0
    while source.read() is not None:
        count += 1
    assert count == 5
    source.close()
    assert source.read() is None


def test_av_frame_conversions_round_trip() -> None:
    array = pan_clip(24, 40, 1)[0]
    av_frame = frame_to_av(array)
    assert (av_frame.width, av_frame.height) == (40, 24)
    np.testing.assert_array_equal(frame_from_av(av_frame), array)
    yuv = av_frame.reformat(format="yuv420p")
    assert mad(frame_from_av(yuv), array) < 8.0
    with pytest.raises(ValueError, match="uint8"):
        frame_to_av(np.zeros((4, 4), np.uint8))


# ----------------------------------------------------------------------------------------------------
# Webcam reader thread (driven by a cv2.VideoCapture on a file: no camera on test machines)
# ----------------------------------------------------------------------------------------------------


def test_webcam_reader_keeps_newest_frame_and_ends(tmp_path: Path) -> None:
    # Frame i is a flat colour with red = 4 * i and blue = 0, so order and channel order can be read back.
    clip = [np.full((32, 48, 3), (4 * i, 100, 0), np.uint8) for i in range(60)]
    path = tmp_path / "ramp.mp4"
    write_clip(path, clip)
    capture = cv2.VideoCapture(str(path))
    assert capture.isOpened()

    source = WebcamSource(0, capture=capture, stall_timeout=0.3)
    reds: list[float] = []
    while (frame := source.read()) is not None:
        assert frame.shape == (32, 48, 3) and frame.dtype == np.uint8
        assert frame[..., 2].mean() < 10  # RGB, not BGR
        reds.append(float(frame[..., 0].mean()))
        time.sleep(0.02)  # slower than the "camera": stale frames must be dropped
    source.close()
    source.close()

    assert 1 <= len(reds) < 60
    assert all(a < b for a, b in itertools.pairwise(reds)), "frames went backwards"
    assert source.captured == 60
    assert source.drops == source.captured - len(reds)
    assert reds[-1] == pytest.approx(4 * 59, abs=4)  # the newest frame is delivered last
    assert source.read() is None


# ----------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------


def test_missing_file_source(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist") as info:
        open_source(str(tmp_path / "nope.mp4"))
    assert "nope.mp4" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(SourceError, match="does not exist"):
        open_source("videos/clip")  # a slash: looks like a path


def test_text_file_renamed_mp4(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 50)
    with pytest.raises(SourceError) as info:
        open_source(str(path))
    message = str(info.value)
    assert "cannot read" in message and "notes.mp4" in message and ".mp4" in message
    assert "\n" not in message


def test_directory_source(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="directory"):
        open_source(str(tmp_path))


def test_file_without_video_stream(tmp_path: Path) -> None:
    import wave

    path = tmp_path / "tone.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(np.zeros(800, np.int16).tobytes())
    with pytest.raises(SourceError, match="no video stream") as info:
        open_source(str(path))
    assert "audio" in str(info.value)


def test_webcam_without_camera_fails_fast() -> None:
    start = time.monotonic()
    with pytest.raises(SourceError) as info:
        open_source("webcam:99")
    assert time.monotonic() - start < 5.0
    message = str(info.value)
    assert "webcam:99" in message and "could not be opened" in message and "synthetic" in message


@pytest.mark.parametrize("spec", ["webcam:abc", "webcam:-1", "webcam:", "webcam", "webcam:1.5"])
def test_bad_webcam_spec(spec: str) -> None:
    with pytest.raises(SourceError, match="webcam:N") as info:
        open_source(spec)
    assert ">= 0" in str(info.value)


def test_unknown_source_lists_forms() -> None:
    with pytest.raises(SourceError) as info:
        open_source("camera")
    message = str(info.value)
    assert "webcam:N" in message and "video file" in message and "synthetic" in message


@pytest.mark.parametrize("spec", ["screen", "out.gif", "virtual"])
def test_unknown_sink_lists_forms(spec: str) -> None:
    with pytest.raises(SinkError) as info:
        open_sink(spec)
    message = str(info.value)
    assert ".mp4" in message and ".webm" in message and "window" in message


def test_sink_into_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(SinkError, match="does not exist") as info:
        open_sink(str(tmp_path / "missing" / "out.mp4"))
    assert "missing" in str(info.value) and "\n" not in str(info.value)


def test_window_sink_without_display(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(SinkError, match="needs a display") as info:
        open_sink("window")
    assert "out.mp4" in str(info.value)
    with pytest.raises(SinkError, match="needs a display"):
        WindowSink("preview")
