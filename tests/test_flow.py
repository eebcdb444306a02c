"""Following the motion: the input's optical flow, flow-warped feedback, warped noise, motion-aware
strength and scene cuts (stream/flow.py, stream/coherence.py, the motion part of stream/temporal.py)."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from stream import flow as flow_module
from stream import schedule, temporal
from stream.args import UsageError, add_config_arguments, config_from_args
from stream.clips import photo_clip
from stream.config import ConfigError, StreamConfig
from stream.denoiser import StreamDenoiser
from stream.flow import FlowTracker
from stream.frames import letterbox_geometry
from tests.conftest import STREAM, cpu_config, pan_clip, photo

SIZE = 128  # the tiny model's autoencoder downsamples by 16: 8x8 latents


def tiny_config(**changes: object) -> StreamConfig:
    return cpu_config(SIZE, **{**STREAM, **changes})


def shift_flow(h: int, w: int, dx: float, dy: float) -> torch.Tensor:
    flow = torch.zeros(h, w, 2)
    flow[..., 0], flow[..., 1] = dx, dy
    return flow


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std()))


# ---------------------------------------------------------------------- pure math
def test_warp_of_a_known_shift() -> None:
    x = torch.randn(1, 3, 8, 10, generator=torch.Generator().manual_seed(0))
    out = temporal.warp(x, shift_flow(8, 10, 2.0, 1.0))  # each pixel takes the content 2 right, 1 down
    torch.testing.assert_close(out[..., :7, :8], x[..., 1:, 2:])
    torch.testing.assert_close(out[..., -1, -1], x[..., -1, -1])  # from outside: the edge repeated
    half = temporal.warp(x, shift_flow(8, 10, 0.5, 0.0))
    torch.testing.assert_close(half[..., :-1], (x[..., :-1] + x[..., 1:]) / 2)
    torch.testing.assert_close(temporal.warp(x, torch.zeros(8, 10, 2)), x)


def test_warped_feedback_takes_the_current_latent_where_the_flow_is_not_trusted() -> None:
    latent = torch.zeros(1, 4, 6, 6)
    previous = torch.arange(4 * 36, dtype=torch.float32).view(1, 4, 6, 6)
    valid = torch.ones(6, 6)
    valid[:, 3:] = 0.0  # the right half occluded
    out = temporal.warped_feedback_blend(latent, previous, 0.5, shift_flow(6, 6, 1.0, 0.0), valid)
    assert torch.equal(out[..., 3:], latent[..., 3:])
    torch.testing.assert_close(out[..., :3], 0.5 * previous[..., 1:4])  # moved one pixel, then blended
    still = temporal.warped_feedback_blend(latent, previous, 0.3, torch.zeros(6, 6, 2), torch.ones(6, 6))
    torch.testing.assert_close(still, temporal.feedback_blend(latent, previous, 0.3))
    assert temporal.warped_feedback_blend(latent, None, 0.5, torch.zeros(6, 6, 2), valid) is latent


def test_noise_transport_of_a_known_shift_and_of_no_motion() -> None:
    g = torch.Generator().manual_seed(0)
    noise = [torch.randn(1, 4, 12, 12, generator=g), torch.randn(1, 4, 12, 12, generator=g)]
    residual, valid = torch.zeros(12, 12, 2), torch.ones(12, 12)
    moved, new_residual = temporal.transport_noise(noise, residual, shift_flow(12, 12, 2.0, 1.0), valid, g)
    for before, after in zip(noise, moved, strict=True):
        assert torch.equal(after[..., :11, :10], before[..., 1:, 2:])  # every tensor moves alike
        assert not torch.isin(after[..., :, 10:], before).any()  # what enters is fresh noise
    assert not new_residual.any()
    same, kept = temporal.transport_noise(noise, residual, torch.zeros(12, 12, 2), valid, g)
    assert all(torch.equal(a, b) for a, b in zip(same, noise, strict=True)) and not kept.any()
    occluded = valid.clone()
    occluded[4:8, 4:8] = 0.0
    holes, _ = temporal.transport_noise(noise, residual, torch.zeros(12, 12, 2), occluded, g)
    assert torch.equal(holes[0][..., :4, :], noise[0][..., :4, :])
    assert not torch.isin(holes[0][..., 4:8, 4:8], noise[0]).any()  # untrusted pixels: fresh noise


def test_slow_motion_moves_the_noise_after_enough_frames() -> None:
    """A quarter pixel a frame: rounding each frame alone would never move it; the residual does."""
    g = torch.Generator().manual_seed(1)
    noise = [torch.randn(1, 1, 16, 16, generator=g)]
    moved, residual = noise, torch.zeros(16, 16, 2)
    for _ in range(8):
        moved, residual = temporal.transport_noise(
            moved, residual, shift_flow(16, 16, 0.25, 0.0), torch.ones(16, 16), g
        )
    assert torch.equal(moved[0][..., :12], noise[0][..., 2:14])  # 8 x 0.25 = 2 pixels


def test_noise_transport_never_copies_a_sample_twice() -> None:
    """A zoom in spreads the content: a sample goes to one pixel, the others get fresh noise."""
    g = torch.Generator().manual_seed(2)
    n = 24
    noise = [torch.randn(1, 1, n, n, generator=g)]
    ys, xs = torch.meshgrid(torch.arange(n).float(), torch.arange(n).float(), indexing="ij")
    centre = (n - 1) / 2
    zoom = torch.stack([(xs - centre) * (1 / 1.3 - 1), (ys - centre) * (1 / 1.3 - 1)], dim=-1)
    moved, _ = temporal.transport_noise(noise, torch.zeros(n, n, 2), zoom, torch.ones(n, n), g)
    values = moved[0].flatten()
    assert values.unique().numel() == values.numel()
    assert torch.isin(values, noise[0]).float().mean() > 0.4  # most of it still the old noise


def test_noise_split_on_a_finer_grid_sums_back_and_stays_unit_gaussian() -> None:
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    fine = temporal.upsample_noise(noise, 8, g)  # (1, 4, 64, 64)
    assert fine.shape == (1, 4, 64, 64)
    torch.testing.assert_close(temporal.downsample_noise(fine, 8), noise, atol=1e-5, rtol=0)
    assert abs(float(fine.mean())) < 0.05 and abs(float(fine.std()) - 1.0) < 0.05


def test_warped_noise_stays_unit_gaussian_over_a_long_pan() -> None:
    """200 frames of a diagonal pan by fractions of a pixel, on the finer grid as the stream does."""
    g = torch.Generator().manual_seed(4)
    k, size = 4, 16
    noise = torch.randn(1, 4, size, size, generator=g)
    fine = [temporal.upsample_noise(noise, k, g)]
    residual = torch.zeros(size * k, size * k, 2)
    flow, valid = shift_flow(size * k, size * k, 0.7, 0.3), torch.ones(size * k, size * k)
    frames = []
    for _ in range(200):
        fine, residual = temporal.transport_noise(fine, residual, flow, valid, g)
        frames.append(temporal.downsample_noise(fine[0], k))
    late = torch.cat(frames[-50:])  # (50, 4, 16, 16)
    assert abs(float(late.mean())) < 0.05
    assert abs(float(late.std()) - 1.0) < 0.05
    for x in (frames[100], frames[-1]):
        assert abs(float(x.mean())) < 0.15 and abs(float(x.std()) - 1.0) < 0.12
        assert abs(correlation(x[..., 1:], x[..., :-1])) < 0.15  # neighbours independent: no blur
    assert correlation(frames[-1], frames[-2]) > 0.3  # ...and it is the same noise, moved


def test_motion_strength_is_bounded() -> None:
    assert temporal.motion_strength(0.6, 100.0, 0.0, 8.0, 0.01) == 0.6  # off
    assert temporal.motion_strength(0.6, 0.0, 0.5, 8.0, 0.01) == 0.6  # no motion
    assert temporal.motion_strength(0.6, 4.0, 0.5, 8.0, 0.01) == pytest.approx(0.45)
    assert temporal.motion_strength(0.6, 80.0, 0.5, 8.0, 0.01) == pytest.approx(0.3)  # the bound
    assert temporal.motion_strength(0.02, 80.0, 0.9, 8.0, 0.01) == 0.01  # never under the least


# ---------------------------------------------------------------------- the flow
def track(frames: list[np.ndarray], size: int = SIZE) -> list[flow_module.Motion]:
    tracker = FlowTracker((size // 16, size // 16), 16)
    geometry = letterbox_geometry(frames[0].shape[:2], (size, size))
    motions = []
    for frame in frames:
        tracker.submit(frame, geometry)
        motion = tracker.result()
        if motion is not None:
            motions.append(motion)
    return motions


def test_flow_of_a_pan_and_its_occlusion_mask() -> None:
    (motion,) = track(pan_clip(2, (SIZE, SIZE), step=8))  # the picture moves 8 px left
    assert motion.flow.shape == (SIZE, SIZE, 2) and motion.cell == 16  # 1 flow px = 1 canvas px here
    assert abs(float(np.median(motion.flow[..., 0])) - 8.0) < 0.5
    assert abs(float(np.median(motion.on_grid(1)[0][..., 0])) - 0.5) < 0.05  # in latent pixels
    assert abs(motion.speed - 8.0) < 1.0 and not motion.still and not motion.cut
    assert motion.valid[:, -6:].mean() < 0.2  # the strip that entered on the right: from outside
    assert motion.valid[:, :-12].mean() > 0.9
    assert motion.on_grid(1)[1].shape == (8, 8)


@pytest.mark.parametrize("step", [1, 3, 5])
def test_flow_of_a_slow_pan_is_more_accurate_than_the_preset_alone(
    step: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A feedback warped by a flow that is off drifts off its content: the stream refines DIS's
    # ultrafast preset (flow.dis_flow), which is off by 0.23-0.49 px (x and y) on these pans alone.
    def error() -> float:
        (motion,) = track(pan_clip(2, (SIZE, SIZE), step=step))
        inner = motion.flow[8:-8, 8:-8]  # clear of the strip that entered
        return float(np.abs(inner[..., 0] - step).mean() + np.abs(inner[..., 1]).mean())

    refined = error()
    monkeypatch.setattr(flow_module, "DIS_REFINEMENT", 0)
    preset = error()
    assert refined < 0.3 and refined < 0.75 * preset


def test_occlusion_mask_behind_a_moving_object() -> None:
    clip = photo_clip("object", 2, (SIZE, SIZE), step=12)  # a 42 px square moves 12 right, 6 down
    (motion,) = track(clip)
    uncovered = np.zeros((SIZE, SIZE), bool)
    side = SIZE // 3
    uncovered[0:side, 0:12] = True  # where the square was and is no more (it starts at the corner)
    assert motion.valid[uncovered].mean() < 0.5
    assert motion.valid[side + 20 :, side + 20 :].mean() > 0.9  # the still background far from it


def test_still_scene_scene_cut_and_too_fast() -> None:
    (still,) = track(photo_clip("static", 2, (SIZE, SIZE)))  # camera noise only
    assert still.still and not still.cut and still.speed < 0.5
    cut = track(
        [photo_clip("static", 1, (SIZE, SIZE))[0], photo_clip("static", 1, (SIZE, SIZE), photo="rocket")[0]]
    )
    assert cut[0].cut
    # Faster than the flow follows at its low resolution (an eighth of the width a frame): a cut too.
    assert all(m.cut for m in track(pan_clip(3, (SIZE, SIZE), step=24)))


def test_flow_threads_grow_with_the_cores() -> None:
    assert [flow_module.flow_threads(c) for c in (None, 1, 2, 4, 6, 16, 64)] == [2, 2, 2, 2, 3, 8, 8]


def test_flow_runs_off_the_calling_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    names = []
    original = flow_module.estimate_motion

    def spy(*args: object) -> flow_module.Motion:
        names.append(threading.current_thread().name)
        return original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(flow_module, "estimate_motion", spy)
    assert len(track(pan_clip(3, (SIZE, SIZE)))) == 2
    assert len(names) == 2 and all(n.startswith("stream-flow") for n in names)


# ---------------------------------------------------------------------- in the stream
def in_place_reference(denoiser: StreamDenoiser, clip: list[np.ndarray]) -> list[np.ndarray]:
    """In-place latent feedback and fixed noise, written out step by step over the engine's calls."""
    engine, sched, weight = denoiser.engine, denoiser._schedule, denoiser.config.latent_feedback
    geometry = letterbox_geometry(clip[0].shape[:2], (SIZE, SIZE))
    noise = torch.randn((1, 4, SIZE // 16, SIZE // 16), generator=torch.Generator().manual_seed(3))
    embeds = torch.cat([engine.encode_prompt(denoiser.config.prompt)])
    previous, outputs = None, []
    with torch.inference_mode():
        for frame in clip:
            latent = engine.encode(denoiser.preprocess(torch.from_numpy(frame), geometry))
            if previous is not None:
                latent = torch.lerp(latent, previous, weight)
            x = schedule.add_noise(latent, noise, sched.alphas[0])
            for i, t in enumerate(sched.timesteps):
                out = engine.run_unet(x, torch.tensor([t]), embeds, None)
                x, _ = schedule.ddim_step(x, out, sched.alphas[i], sched.alphas_prev[i], "epsilon", None)
            previous = x
            outputs.append(denoiser.postprocess(engine.decode(x), geometry))
    return outputs


def test_feedback_warp_off_is_the_in_place_feedback_exactly(tiny_model_dir: Path) -> None:
    clip = pan_clip(4, (SIZE, SIZE), step=8)
    denoiser = StreamDenoiser.from_pretrained("tiny", tiny_config(latent_feedback=0.5, feedback_warp=False))
    assert denoiser.engine.scheduler_config.get("prediction_type", "epsilon") == "epsilon"
    outputs = [denoiser(f) for f in clip]
    assert denoiser._state.coherence is None  # no flow is computed at all
    for ours, reference in zip(outputs, in_place_reference(denoiser, clip), strict=True):
        assert np.array_equal(ours, reference)
    warped = StreamDenoiser.from_pretrained("tiny", tiny_config(latent_feedback=0.5))
    moved = [warped(f) for f in clip]
    assert np.array_equal(moved[0], outputs[0])  # nothing to warp on the first frame
    assert np.abs(moved[-1].astype(np.int16) - outputs[-1]).mean() > 0.5  # on a pan, warping matters


def test_warped_noise_is_exactly_fixed_on_a_still_scene(tiny_model_dir: Path) -> None:
    clip = photo_clip("static", 5, (SIZE, SIZE), seed=2)  # one photo, camera noise on each frame
    warped = StreamDenoiser.from_pretrained("tiny", tiny_config(noise="warped", latent_feedback=0.4))
    fixed = StreamDenoiser.from_pretrained("tiny", tiny_config(noise="fixed", latent_feedback=0.4))
    for frame in clip:
        assert np.array_equal(warped(frame), fixed(frame))
    initial = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    assert torch.equal(warped._state.noise[0], initial)


def test_warped_noise_moves_with_the_content(tiny_model_dir: Path) -> None:
    size = 256  # 16x16 latents; the flow runs at 128 px, where DIS follows 8 px a frame well
    denoiser = StreamDenoiser.from_pretrained("tiny", tiny_config(noise="warped", width=size, height=size))
    clip = pan_clip(2, (size, size), step=16)  # one latent pixel a frame
    denoiser(clip[0])
    first = denoiser._state.noise[0].clone()
    denoiser(clip[1])
    second = denoiser._state.noise[0]
    assert correlation(second[..., 2:13], first[..., 3:14]) > 0.9  # moved one latent pixel left
    assert abs(correlation(second, first)) < 0.3


def test_a_scene_cut_starts_the_stream_over(tiny_model_dir: Path) -> None:
    config = tiny_config(latent_feedback=0.6, noise="warped")
    denoiser = StreamDenoiser.from_pretrained("tiny", config)
    other = np.ascontiguousarray(photo("rocket")[100 : 100 + SIZE, 100 : 100 + SIZE])
    for frame in pan_clip(3, (SIZE, SIZE), step=8):
        denoiser(frame)
    after_cut = denoiser(other)
    fresh = StreamDenoiser.from_pretrained("tiny", config)(other)
    assert np.array_equal(after_cut, fresh)  # no smear of the last scene, the noise drawn anew
    in_place = StreamDenoiser.from_pretrained("tiny", tiny_config(latent_feedback=0.6, feedback_warp=False))
    for frame in pan_clip(3, (SIZE, SIZE), step=8):
        in_place(frame)
    assert np.abs(in_place(other).astype(np.int16) - fresh).mean() > 0.5  # without a cut, it smears


def test_motion_strength_lowers_strength_when_the_input_moves_fast(tiny_model_dir: Path) -> None:
    denoiser = StreamDenoiser.from_pretrained("tiny", tiny_config(motion_strength=0.5))
    for frame in photo_clip("static", 3, (SIZE, SIZE)):
        denoiser(frame)
    assert denoiser._strength == 0.5  # still: full strength
    for frame in pan_clip(4, (SIZE, SIZE), step=8):  # 8 px a frame, over 3 % of 128 px
        denoiser(frame)
    assert denoiser._strength == 0.25  # lowered by the whole bound, no further
    assert denoiser.timesteps[0] < 500
    denoiser.update(denoiser.config.replace(motion_strength=0.0))
    denoiser(pan_clip(1, (SIZE, SIZE))[0])
    assert denoiser._strength == 0.5


# ---------------------------------------------------------------------- settings
def parse(*argv: str) -> StreamConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_flags_and_their_checks(capsys: pytest.CaptureFixture) -> None:
    assert parse().feedback_warp is True and parse().noise == "fixed" and parse().motion_strength == 0.0
    config = parse("--feedback-warp", "off", "--noise", "warped", "--motion-strength", "0.3")
    assert (config.feedback_warp, config.noise, config.motion_strength) == (False, "warped", 0.3)
    with pytest.raises(SystemExit):
        parse("--feedback-warp", "maybe")
    assert "must be on or off, got 'maybe'" in capsys.readouterr().err
    with pytest.raises(UsageError, match=r"motion_strength must be in \[0, 1\)"):
        parse("--motion-strength", "1")
    with pytest.raises(ConfigError, match="noise must be one of fixed, fresh, warped"):
        tiny_config(noise="flowing")
    with pytest.raises(ConfigError, match="feedback_warp must be true or false"):
        tiny_config(feedback_warp="on")
