"""The uint8 frame path: through the staging buffers (pinned on CUDA) a stream gets the same frames as
through the plain copies, downloaded frames are the caller's own, and stage timings need no device-wide
synchronize."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stream.config import StreamConfig
from stream.denoiser import StreamDenoiser
from stream.engine import Engine
from stream.frames import StageTimer
from stream.models import Components, load_model
from stream.transfer import FrameTransfer
from tests.conftest import cpu_config, pan_clip, photo

SIZE = 64


def config(**changes: object) -> StreamConfig:
    return cpu_config(SIZE, **changes)


@pytest.fixture(scope="module")
def components(tiny_model_dir: Path) -> Components:
    return load_model(config())


def test_staging_round_trip_keeps_every_byte_and_the_frames_do_not_alias() -> None:
    transfer = FrameTransfer(torch.device("cpu"), staging=True)
    rng = np.random.default_rng(0)
    kept = []
    for shape in [(48, 64, 3), (48, 64, 3), (31, 17, 3), (48, 64, 3)]:
        frame = rng.integers(0, 256, shape, dtype=np.uint8)
        up = transfer.upload(frame[:, ::-1])  # a non-contiguous view too
        down = transfer.download(up)
        assert down.dtype == np.uint8 and np.array_equal(down, frame[:, ::-1])
        kept.append((frame[:, ::-1].copy(), down, up.clone()))
    for frame, down, up in kept:  # later frames went through the same buffers: earlier results unchanged
        assert np.array_equal(down, frame) and np.array_equal(up.numpy(), frame)


def test_the_staged_path_gives_the_frames_of_the_plain_path(components: Components) -> None:
    """The same streams (a letterboxed 4:3 photo and a square clip, CFG on one) through the staging
    buffers and through today's plain copies: byte-identical frames."""
    engine = Engine.shared(components, config())
    clip = pan_clip(3, (48, 64), step=5) + [photo()[:120, :160]] + pan_clip(2, (SIZE, SIZE), step=3)
    outputs = []
    for staging in (False, True):
        streams = [StreamDenoiser(engine, config(seed=1)), StreamDenoiser(engine, config(guidance_scale=3.0))]
        for stream in streams:
            stream._transfer = FrameTransfer(torch.device("cpu"), staging=staging)
        outputs.append([stream(frame) for frame in clip for stream in streams])
    for plain, staged in zip(*outputs, strict=True):
        assert plain.shape == staged.shape and np.array_equal(plain, staged)


def test_the_default_transfer_stages_on_cuda_only() -> None:
    assert not FrameTransfer(torch.device("cpu")).staging
    assert FrameTransfer(torch.device("cuda")).staging  # decided without touching the device


def test_stage_timer_on_cpu_times_each_stage() -> None:
    timer = StageTimer(torch.device("cpu"))
    with timer("encode"):
        pass
    timings = timer.finish()
    assert set(timings) == {"encode", "total"} and timings["total"] >= timings["encode"] >= 0


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_frames_come_through_pinned_buffers_with_event_timings() -> None:
    transfer = FrameTransfer(torch.device("cuda"))
    frame = np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    timer = StageTimer(torch.device("cuda"))
    with timer("up"):
        pixels = transfer.upload(frame)
    with timer("down"):
        out = transfer.download(pixels)
    assert transfer._up is not None and transfer._up.is_pinned()
    assert np.array_equal(out, frame)
    timings = timer.finish()
    assert timings["up"] >= 0 and timings["down"] >= 0
