"""Image feedback (`image_feedback`): the previous output image, moved along the input's optical flow,
blended into each new one after decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stream import temporal
from stream.args import UsageError
from stream.clips import photo_clip
from stream.coherence import canvas_flow, follows_motion, image_feedback
from stream.config import ConfigError, StreamConfig
from stream.denoiser import StreamDenoiser
from stream.flow import Motion
from tests.conftest import STREAM, cpu_config, pan_clip, photo
from tests.test_feedback_steps import shift_error
from tests.test_flow import parse, track

SIZE = 128  # 8x8 latents with the tiny model


def tiny_config(size: int = SIZE, **changes: object) -> StreamConfig:
    return cpu_config(size, **{**STREAM, **changes})


def motion(flow: tuple[float, float], grid: int = 8, cell: int = 2, still: bool = False) -> Motion:
    """A uniform motion on a grid x grid flow grid: the previous frame holds pixel x's content at x + flow."""
    field = np.empty((grid, grid, 2), np.float32)
    field[...] = flow
    valid = np.ones((grid, grid), np.float32)
    return Motion(field, valid, cell, speed=float(np.hypot(*flow)), still=still, cut=False)


# ---------------------------------------------------------------------- the math
def test_canvas_flow_scales_the_flow_grid_up_to_the_canvas() -> None:
    moved = motion((1.5, -0.5))  # in flow px, on an 8x8 grid
    moved.valid[2:4, 4:6] = 0.0
    flow, valid = canvas_flow(moved, (32, 64), torch.device("cpu"))  # 4 canvas px a flow px down, 8 across
    assert flow.shape == (32, 64, 2) and valid.shape == (32, 64)
    assert torch.allclose(flow[..., 0], torch.full((32, 64), 12.0)) and torch.allclose(
        flow[..., 1], torch.full((32, 64), -2.0)
    )
    assert valid[12, 40] == 0.0 and valid[28, 8] == 1.0  # untrusted at that block's middle only
    assert 0.0 < valid[12, 30] < 1.0  # soft at its edge


def test_canvas_flow_of_an_affine_motion_on_a_canvas_no_whole_multiple_of_the_grid() -> None:
    """A flow grid of 20x30 on a 48x80 canvas (2.4 and 2.67 canvas px a flow px): the flow each canvas
    pixel gets is the affine motion's at that pixel's centre; OpenCV's warp (CPU) and grid_sample's
    (elsewhere) move the image alike."""
    (grid_h, grid_w), (height, width) = (20, 30), (48, 80)
    gy, gx = np.mgrid[0:grid_h, 0:grid_w].astype(np.float32)
    field = np.stack([0.3 + 0.05 * gx - 0.02 * gy, -0.4 + 0.03 * gx + 0.04 * gy], axis=-1)  # flow px
    moved = Motion(field.astype(np.float32), np.ones((grid_h, grid_w), np.float32), 2, 1.0, False, False)
    flow, _ = canvas_flow(moved, (height, width), torch.device("cpu"))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy = (xs + 0.5) * grid_w / width - 0.5, (ys + 0.5) * grid_h / height - 0.5  # on the grid
    truth = np.stack(
        [(0.3 + 0.05 * cx - 0.02 * cy) * width / grid_w, (-0.4 + 0.03 * cx + 0.04 * cy) * height / grid_h],
        axis=-1,
    )
    inside = (slice(3, -3), slice(3, -3))  # the grid's outer half pixel holds its edge value
    assert np.abs(flow.numpy()[inside] - truth[inside]).max() < 1e-4
    image = torch.rand((1, 3, height, width), generator=torch.Generator().manual_seed(1))
    smooth = torch.rand((1, 3, 6, 10), generator=torch.Generator().manual_seed(2))
    previous = torch.nn.functional.interpolate(smooth, size=(height, width), mode="bilinear")
    fused = image_feedback(StreamConfig(image_feedback=0.5), moved, image, previous)
    reference = torch.lerp(image, temporal.warp(previous, flow), 0.5)
    assert (fused - reference).abs().max() < 0.01


def test_a_non_finite_previous_image_is_not_carried_on() -> None:
    image, previous = torch.rand((1, 3, 16, 16)), torch.rand((1, 3, 16, 16))
    previous[..., 4:8, 4:8] = float("nan")
    # warped 2 px left (1 flow px of 8 on a 16 px canvas): the hole is at columns 2-5; in place 4-7
    for moved, hole in ((motion((1.0, 0.0)), slice(2, 6)), (None, slice(4, 8))):
        fused = image_feedback(StreamConfig(image_feedback=0.5), moved, image, previous)
        assert fused.isfinite().all()
        assert torch.allclose(fused[..., 4:8, hole], 0.5 * image[..., 4:8, hole])  # taken as black
        assert not torch.equal(fused[..., 10:, :], image[..., 10:, :])  # blended elsewhere


def test_image_feedback_moves_the_previous_image_with_the_content() -> None:
    config = StreamConfig(image_feedback=0.5)
    pattern = torch.rand((1, 3, 32, 44), generator=torch.Generator().manual_seed(0))
    previous, image = pattern[..., 0:32], pattern[..., 6:38]  # the content moved 6 px left
    moved = motion((6.0 / 4, 0.0))  # 6 canvas px (4 per flow px)
    fused = image_feedback(config, moved, image, previous)
    assert torch.allclose(fused[..., :26], image[..., :26], atol=1e-5)  # lined up: nothing blurs
    in_place = image_feedback(config.replace(feedback_warp=False), moved, image, previous)
    assert torch.allclose(in_place, torch.lerp(image, previous, 0.5))
    assert (in_place - image).abs().mean() > 0.1
    # untrusted pixels keep the new image; trusted ones blend
    moved.valid[:, :4] = 0.0
    fused = image_feedback(config, moved, image, torch.zeros_like(previous))
    assert torch.equal(fused[..., :12], image[..., :12])
    assert torch.allclose(fused[..., 20:], 0.5 * image[..., 20:])


def test_image_feedback_in_place_when_still_and_off_at_zero() -> None:
    config = StreamConfig(image_feedback=0.25)
    image, previous = torch.rand((1, 3, 16, 16)), torch.rand((1, 3, 16, 16))
    blended = torch.lerp(image, previous, 0.25)
    assert torch.equal(image_feedback(config, motion((0.0, 0.0), still=True), image, previous), blended)
    assert torch.equal(image_feedback(config, None, image, previous), blended)  # no motion yet
    assert image_feedback(config.replace(image_feedback=0.0), None, image, previous) is image
    assert image_feedback(config, None, image, None) is image  # nothing to blend on the first frame
    cut = Motion(np.zeros((8, 8, 2), np.float32), np.zeros((8, 8), np.float32), 2, 0.0, still=False, cut=True)
    assert image_feedback(config, cut, image, previous) is image  # a scene cut starts over
    assert follows_motion(config) and not follows_motion(config.replace(feedback_warp=False))


def test_the_cpu_warp_is_the_device_warp() -> None:
    """On a CPU the image moves with OpenCV; elsewhere with canvas_flow and grid_sample: alike."""
    moved = motion((0.0, 0.0))
    moved.flow[...] = np.random.default_rng(0).uniform(-2.0, 2.0, moved.flow.shape)
    moved.valid[:3, :3] = 0.0
    image = torch.rand((1, 3, 32, 32), generator=torch.Generator().manual_seed(1))
    smooth = torch.rand((1, 3, 8, 8), generator=torch.Generator().manual_seed(2))
    previous = torch.nn.functional.interpolate(smooth, size=(32, 32), mode="bilinear")
    fused = image_feedback(StreamConfig(image_feedback=0.6), moved, image, previous)
    flow, valid = canvas_flow(moved, (32, 32), torch.device("cpu"))
    reference = temporal.warped_feedback_blend(image, previous, 0.6, flow, valid)
    assert (fused - reference).abs().max() < 0.01
    assert (fused - torch.lerp(image, previous, 0.6)).abs().mean() > 0.02  # it did move


def test_on_an_output_that_follows_the_content_it_steadies_without_smearing() -> None:
    """The stream's own flow of a 4 px/frame pan (a quarter of the tiny model's latent pixel) and, as
    the outputs, the input frames with fresh flicker (sigma 0.05 of full scale) each frame: an output
    that moves with the content, as a model's should. Image feedback along the motion then halves the
    flicker the viewer sees along the motion and brings the output nearer the true frame; in place it
    smears the pan and does neither as well."""
    step = 4
    clip = pan_clip(10, (SIZE, SIZE), step=step)
    motions = [None, *track(clip)]
    rng = np.random.default_rng(0)
    truth = [torch.from_numpy(f).permute(2, 0, 1)[None].float() / 255.0 for f in clip]
    flicker = [t + torch.from_numpy(rng.normal(0.0, 0.05, t.shape)).float() for t in truth]

    def run(config: StreamConfig) -> tuple[float, float]:
        previous, outputs = None, []
        for image, moved in zip(flicker, motions, strict=True):
            previous = image_feedback(config, moved, image, previous)
            outputs.append(previous)
        along = np.mean(
            [
                (b[..., :-step] - a[..., step:]).abs().mean()
                for a, b in zip(outputs, outputs[1:], strict=False)
            ]
        )
        off = np.mean(
            [(o - t)[..., 8:-8, 8:-8].abs().mean() for o, t in zip(outputs[1:], truth[1:], strict=True)]
        )
        return float(along), float(off)

    config = StreamConfig(image_feedback=0.5)
    raw, warped, in_place = (
        run(c) for c in (config.replace(image_feedback=0.0), config, config.replace(feedback_warp=False))
    )
    assert warped[0] < 0.6 * raw[0] and warped[0] < 0.8 * in_place[0]
    assert warped[1] < 0.7 * raw[1] and warped[1] < 0.8 * in_place[1]


# ---------------------------------------------------------------------- in the stream
def test_image_feedback_in_place_is_the_written_out_blend(tiny_model_dir: Path) -> None:
    clip = pan_clip(4, (SIZE, SIZE), step=8)
    plain = StreamDenoiser.from_pretrained("tiny", tiny_config())
    blended = StreamDenoiser.from_pretrained("tiny", tiny_config(image_feedback=0.4, feedback_warp=False))
    fused: torch.Tensor | None = None
    for frame in clip:
        decoded = plain.process(frame).image  # the decoded canvas: image feedback does not change it
        assert decoded is not None
        fused = decoded if fused is None else torch.lerp(decoded, fused, 0.4)
        geometry = plain._state.geometry
        assert geometry is not None
        reference = plain.postprocess(fused, geometry)
        assert np.abs(blended(frame).astype(np.int16) - reference).max() <= 1
    assert blended._state.coherence is None  # in place: no flow at all
    blended.update(blended.config.replace(image_feedback=0.0))
    assert np.array_equal(blended(clip[0]), plain(clip[0]))  # off: the model's own output again
    assert blended._state.prev_image is None


def test_image_feedback_along_the_flow_beats_in_place_on_a_pan(tiny_model_dir: Path) -> None:
    """On a pan, the output differs less from the previous output moved with the content when the
    blend moves it along the flow than when it blends in place. (A blur along the motion lowers this
    too; that it steadies without smearing is the test on an output that follows the content.)"""
    step = 4  # a quarter of a latent pixel a frame
    clip = pan_clip(8, (SIZE, SIZE), step=step)
    runs = {}
    for name, changes in {
        "none": {},
        "warped": {"image_feedback": 0.5},
        "in_place": {"image_feedback": 0.5, "feedback_warp": False},
    }.items():
        denoiser = StreamDenoiser.from_pretrained("tiny", tiny_config(**changes))
        runs[name] = [denoiser(f) for f in clip]
    assert shift_error(runs["warped"], step) < 0.8 * shift_error(runs["in_place"], step)
    assert shift_error(runs["warped"], step) < 0.8 * shift_error(runs["none"], step)


def test_image_feedback_steadies_a_still_scene_and_a_cut_starts_over(tiny_model_dir: Path) -> None:
    still = photo_clip("static", 6, (SIZE, SIZE), seed=5)

    def change(**changes: object) -> float:
        denoiser = StreamDenoiser.from_pretrained("tiny", tiny_config(**changes))
        out = [denoiser(f).astype(np.int16) for f in still]
        return float(np.mean([np.abs(b - a).mean() for a, b in zip(out, out[1:], strict=False)]))

    assert change(image_feedback=0.5) < 0.7 * change()
    config = tiny_config(image_feedback=0.6)
    denoiser = StreamDenoiser.from_pretrained("tiny", config)
    for frame in pan_clip(3, (SIZE, SIZE), step=8):
        denoiser(frame)
    other = np.ascontiguousarray(photo("rocket")[100 : 100 + SIZE, 100 : 100 + SIZE])
    assert np.array_equal(denoiser(other), StreamDenoiser.from_pretrained("tiny", config)(other))


def test_image_feedback_with_stream_batch_uses_each_leaving_frames_motion(tiny_model_dir: Path) -> None:
    """With Stream Batch the frame that leaves is an older input's: it is moved by the motion into THAT
    input (from the one before it), not by the entering frame's."""
    clip = pan_clip(4, (SIZE, SIZE), step=8)
    clip += [clip[-1]] * 2  # then the camera stops: the entering frame's motion is not the leaving one's
    config = tiny_config(image_feedback=0.5, stream_batch=True)
    fed = StreamDenoiser.from_pretrained("tiny", config)
    plain = StreamDenoiser.from_pretrained("tiny", tiny_config(stream_batch=True))
    motions = [None, *track(clip)]  # motions[i]: from input i-1 to input i
    fused: torch.Tensor | None = None
    compared, apart = 0, []
    for i, frame in enumerate(clip):
        ours, theirs = fed.process(frame, tag=i), plain.process(frame, tag=i)
        assert ours.pending == theirs.pending
        if ours.pending:
            continue
        assert ours.tag == theirs.tag < i and theirs.image is not None  # an older input's output
        entering = image_feedback(config, motions[i], theirs.image, fused)  # the wrong motion's
        fused = image_feedback(config, motions[ours.tag], theirs.image, fused)
        apart.append(float((entering - fused).abs().max()) * 255)
        geometry = plain._state.geometry
        assert geometry is not None
        assert np.abs(ours.frame.astype(np.int16) - plain.postprocess(fused, geometry)).max() <= 1
        compared += 1
    assert compared >= 4 and max(apart) > 10  # the entering frame's motion would have been told apart


def test_after_stream_batch_drops_frames_the_next_output_is_not_blended(tiny_model_dir: Path) -> None:
    """Fewer steps let a newer frame leave before older ones, which are dropped: the previous output is
    then more than one input behind the frame leaving, and its motion does not cover the gap."""
    clip = pan_clip(7, (SIZE, SIZE), step=8)
    fed = StreamDenoiser.from_pretrained("tiny", tiny_config(image_feedback=0.5, stream_batch=True, steps=3))
    plain = StreamDenoiser.from_pretrained("tiny", tiny_config(stream_batch=True, steps=3))
    differs = []
    for i, frame in enumerate(clip):
        if i == 4:
            for d in (fed, plain):
                d.update(d.config.replace(steps=1))
        dropped = fed._state.pipeline.dropped
        ours, theirs = fed.process(frame), plain.process(frame)
        if ours.pending:
            continue
        same = np.array_equal(ours.frame, theirs.frame)
        if fed._state.pipeline.dropped > dropped:
            assert same  # right after the drop: the model's own output
        else:
            differs.append(not same)
    assert fed._state.pipeline.dropped >= 1 and sum(differs) >= 3  # blended before and after


def test_image_feedback_flag_and_check() -> None:
    assert parse().image_feedback == 0.0
    assert parse("--image-feedback", "0.3").image_feedback == 0.3
    with pytest.raises(UsageError, match=r"image_feedback must be in \[0, 1\)"):
        parse("--image-feedback", "1")
    with pytest.raises(ConfigError, match="image_feedback"):
        tiny_config(image_feedback=float("nan"))
