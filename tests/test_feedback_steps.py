"""Latent feedback at the denoising steps (`feedback_at="steps"`), and the flow thread's share of the
work of following the motion (the flow on the latent grid and the warped noise, made there)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from stream import coherence, schedule, temporal
from stream.config import ConfigError, StreamConfig
from stream.denoiser import StreamDenoiser
from stream.frames import letterbox_geometry
from tests.conftest import STREAM, cpu_config, pan_clip
from tests.test_flow import parse

SIZE = 128  # 8x8 latents with the tiny model


def tiny_config(size: int = SIZE, **changes: object) -> StreamConfig:
    return cpu_config(size, **{**STREAM, **changes})


def steps_reference(denoiser: StreamDenoiser, clip: list[np.ndarray]) -> list[np.ndarray]:
    """Feedback at the steps in place (no flow), fixed noise, written out over the engine's calls: each
    DDIM step's x_0 moved toward the previous output latent by the feedback weight, its spread kept."""
    engine, sched, weight = denoiser.engine, denoiser._schedule, denoiser.config.latent_feedback
    geometry = letterbox_geometry(clip[0].shape[:2], (SIZE, SIZE))
    noise = torch.randn((1, 4, SIZE // 16, SIZE // 16), generator=torch.Generator().manual_seed(3))
    embeds = engine.encode_prompt(denoiser.config.prompt)
    previous, outputs = None, []
    with torch.inference_mode():
        for frame in clip:
            latent = engine.encode(denoiser.preprocess(torch.from_numpy(frame), geometry))
            x = schedule.add_noise(latent, noise, sched.alphas[0])
            for i, t in enumerate(sched.timesteps):
                out = engine.run_unet(x, torch.tensor([t]), embeds, None)
                alpha_prev = sched.alphas_prev[i]
                x, x0 = schedule.ddim_step(x, out, sched.alphas[i], alpha_prev, "epsilon", None)
                if previous is not None:  # x = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps, with x0 moved
                    pulled = x0 + weight * (previous - x0)
                    mean = pulled.mean(dim=(2, 3), keepdim=True)
                    pulled = mean + (pulled - mean) * x0.std(dim=(2, 3), keepdim=True) / pulled.std(
                        dim=(2, 3), keepdim=True
                    )  # each channel's spread put back to the model's own estimate's
                    x = x + alpha_prev.sqrt() * (pulled - x0)
            previous = x
            outputs.append(denoiser.postprocess(engine.decode(x), geometry))
    return outputs


def shift_error(outputs: list[np.ndarray], step: int) -> float:
    """Mean |output_t - output_t-1 moved with a pan of `step` px a frame| (the content moves left)."""
    return float(
        np.mean(
            [
                np.abs(b[:, :-step].astype(np.int16) - a[:, step:]).mean()
                for a, b in zip(outputs, outputs[1:], strict=False)
            ]
        )
    )


def test_feedback_at_the_steps_is_the_written_out_pull(tiny_model_dir: Path) -> None:
    clip = pan_clip(4, (SIZE, SIZE), step=8)
    config = tiny_config(latent_feedback=0.4, feedback_at="steps", feedback_warp=False)
    denoiser = StreamDenoiser.from_pretrained("tiny", config)
    outputs = [denoiser(f) for f in clip]
    assert denoiser._state.coherence is None  # in place: no flow at all
    for ours, reference in zip(outputs, steps_reference(denoiser, clip), strict=True):
        assert np.abs(ours.astype(np.int16) - reference).max() <= 1
    plain = StreamDenoiser.from_pretrained("tiny", tiny_config())
    assert np.array_equal(plain(clip[0]), outputs[0])  # the first frame has nothing to pull toward
    input_side = StreamDenoiser.from_pretrained("tiny", tiny_config(latent_feedback=0.4, feedback_warp=False))
    assert np.abs([input_side(f) for f in clip][-1].astype(np.int16) - outputs[-1]).mean() > 0.5


def test_feedback_at_the_steps_follows_the_motion(tiny_model_dir: Path) -> None:
    """On a pan, the pull toward the WARPED previous output moves the output with the content; in
    place it holds the output where the content was."""
    size, step = 256, 16  # one latent pixel a frame; the flow runs at 128 px
    clip = pan_clip(6, (size, size), step=step)
    runs = {}
    for warp in (True, False):
        config = tiny_config(size, latent_feedback=0.5, feedback_at="steps", feedback_warp=warp)
        denoiser = StreamDenoiser.from_pretrained("tiny", config)
        runs[warp] = [denoiser(f) for f in clip]
    assert shift_error(runs[True], step) < 0.8 * shift_error(runs[False], step)


def test_feedback_at_the_steps_steadies_a_still_scene(tiny_model_dir: Path) -> None:
    from stream.clips import photo_clip

    clip = photo_clip("static", 6, (SIZE, SIZE), seed=5)

    def change(**changes: object) -> float:
        denoiser = StreamDenoiser.from_pretrained("tiny", tiny_config(**changes))
        out = [denoiser(f).astype(np.int16) for f in clip]
        return float(np.mean([np.abs(b - a).mean() for a, b in zip(out, out[1:], strict=False)]))

    assert change(latent_feedback=0.5, feedback_at="steps", noise="warped") < 0.7 * change()


@pytest.mark.parametrize("changes", [{"stream_batch": True}, {"scheduler": "lcm", "steps": 2}])
def test_feedback_at_the_steps_with_stream_batch_and_lcm(tiny_model_dir: Path, changes: dict) -> None:
    clip = pan_clip(5, (SIZE, SIZE), step=8)
    pulled = StreamDenoiser.from_pretrained(
        "tiny", tiny_config(latent_feedback=0.5, feedback_at="steps", **changes)
    )
    plain = StreamDenoiser.from_pretrained("tiny", tiny_config(**changes))
    ours = [pulled.process(f) for f in clip]
    theirs = [plain.process(f) for f in clip]
    frames = [(a.frame, b.frame) for a, b in zip(ours, theirs, strict=True) if not a.pending]
    assert len(frames) >= 3 and all(a.shape == (SIZE, SIZE, 3) for a, _ in frames)
    assert np.array_equal(*frames[0])  # the first output had nothing to pull toward
    assert np.abs(frames[-1][0].astype(np.int16) - frames[-1][1]).mean() > 0.5


def test_the_flow_thread_moves_the_noise_as_the_model_thread_would(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The warped noise is moved on a flow thread, ready when the model needs it; moved on the model
    thread instead, it is exactly the same noise."""
    size = 256
    clip = pan_clip(6, (size, size), step=6)
    config = tiny_config(size, noise="warped", latent_feedback=0.3)
    threads: list[str] = []
    original = temporal.transport_noise

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(temporal, "transport_noise", spy)

    def noises() -> list[torch.Tensor]:
        denoiser = StreamDenoiser.from_pretrained("tiny", config)
        seen = []
        for frame in clip:
            denoiser(frame)
            seen.append(denoiser._state.noise[0].clone())
        return seen

    ahead = noises()
    assert threads[0] == threading.current_thread().name  # the first move splits the noise: here
    assert len(threads) == 5 and all(t.startswith("stream-flow") for t in threads[1:])
    submit = coherence.Coherence.submit
    monkeypatch.setattr(coherence.Coherence, "submit", lambda self, f, g, generator=None: submit(self, f, g))
    threads.clear()
    here = noises()
    assert threads == [threading.current_thread().name] * 5
    assert all(torch.equal(a, b) for a, b in zip(ahead, here, strict=True))
    assert not torch.equal(ahead[-1], ahead[0])  # and it did move


def test_feedback_at_flag_and_check() -> None:
    assert parse().feedback_at == "input"
    assert parse("--feedback-at", "steps").feedback_at == "steps"
    with pytest.raises(SystemExit):
        parse("--feedback-at", "output")
    with pytest.raises(ConfigError, match="feedback_at must be one of input, steps"):
        tiny_config(feedback_at="output")
