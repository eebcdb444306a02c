"""The batched engine: a stream's output is the same alone or batched with others; the streaming
timestep rule; the similarity filter's limits; the CPU convolution choice made once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from stream import devices, schedule
from stream.adaptive import build_ladder
from stream.batch import FrameResult, process_batch
from stream.config import ConfigError, StreamConfig
from stream.denoiser import StreamDenoiser
from stream.engine import Engine
from stream.models import Components, build_tiny_pipeline, load_model
from tests.conftest import cpu_config, pan_clip, photo

SIZE = 64


def config(**changes: object) -> StreamConfig:
    return cpu_config(SIZE, **changes)


@pytest.fixture(scope="module")
def components(tiny_model_dir: Path) -> Components:
    return load_model(config())


def lcm_unet_components() -> Components:
    """The tiny model with a guidance-embedding UNet (as LCM's distilled UNets take the guidance)."""
    base = build_tiny_pipeline()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
        time_cond_proj_dim=32,
    ).eval()
    return Components(
        unet, base.vae, base.text_encoder, base.tokenizer, dict(base.scheduler.config), "tiny-lcm"
    )


def frames(count: int) -> list[np.ndarray]:
    return pan_clip(count, (SIZE, SIZE), step=7)


def canvas(result: FrameResult | Exception) -> np.ndarray:
    """The decoded image before uint8 rounding, scaled to 0-255."""
    assert isinstance(result, FrameResult) and result.image is not None
    return result.image.double().numpy() * 255.0


MIXED = [  # different prompts, strengths, steps (1-5), guidance and seeds
    {"prompt": "a watercolor cup", "strength": 0.5, "steps": 1, "guidance_scale": 1.0, "seed": 1},
    {"prompt": "an oil painting", "strength": 0.8, "steps": 4, "guidance_scale": 7.5, "seed": 2},
    {"prompt": "", "strength": 0.3, "steps": 2, "guidance_scale": 3.0, "seed": 3, "latent_feedback": 0.4},
    {
        "prompt": "a neon city",
        "strength": 1.0,
        "steps": 5,
        "guidance_scale": 1.0,
        "seed": 4,
        "noise": "fresh",
    },
]


# A row's result alone and in a batch differs only by float rounding: MKL's GEMMs sum in an order that
# depends on the row count, and the random tiny network amplifies it (float32: measured up to 1.6e-3 on
# the 0-255 scale). In float64 the same comparison holds to 1e-4, which shows the rows are not mixed.
TOLERANCE = {torch.float32: 5e-3, torch.float64: 1e-4}


@pytest.mark.parametrize(
    "scheduler,rows",
    [("ddim", MIXED), ("lcm", [dict(r, strength=max(0.5, float(r["strength"]))) for r in MIXED])],  # type: ignore[arg-type]
)
@pytest.mark.parametrize("guidance_unet", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_stream_is_the_same_alone_or_batched(
    tiny_model_dir: Path,
    scheduler: str,
    rows: list[dict[str, object]],
    guidance_unet: bool,
    dtype: torch.dtype,
) -> None:
    model = lcm_unet_components() if guidance_unet else load_model(config())
    engine = Engine(model, torch.device("cpu"), dtype, "sdpa")  # its own: no other test's modules change
    configs = [config(scheduler=scheduler, **r) for r in rows]
    alone = [StreamDenoiser(engine, c) for c in configs]
    together = [StreamDenoiser(engine, c) for c in configs]
    for frame in frames(3):  # three frames: the temporal state (feedback, fresh noise) carries the same way
        expected = [canvas(d.process(frame)) for d in alone]
        calls = engine.calls
        results = process_batch(together, [frame] * len(together))
        assert engine.calls - calls == max(c.steps for c in configs)  # one UNet call per step for all
        for e, result in zip(expected, results, strict=True):
            assert np.abs(e - canvas(result)).max() <= TOLERANCE[dtype]
            assert isinstance(result, FrameResult) and result.frame.dtype == np.uint8


def test_batched_rows_keep_their_own_timesteps_and_embeddings(components: Components) -> None:
    """The batch really mixes: two streams of different prompts and strengths give different outputs."""
    a = StreamDenoiser(components, config(prompt="a cat", strength=0.4))
    b = StreamDenoiser(components, config(prompt="a dog", strength=0.9))
    frame = frames(1)[0]
    out_a, out_b = (canvas(r) for r in process_batch([a, b], [frame, frame]))
    assert np.abs(out_a - out_b).mean() > 1.0


def test_a_bad_frame_costs_its_own_stream_only(components: Components) -> None:
    a, b = StreamDenoiser(components, config()), StreamDenoiser(components, config())
    good = frames(1)[0]
    bad_result, good_result = process_batch([a, b], [good.astype(np.float32), good])
    assert isinstance(bad_result, ValueError) and "uint8" in str(bad_result)
    assert isinstance(good_result, FrameResult) and good_result.frame.shape == good.shape


def test_streams_of_another_size_are_refused_in_one_batch(components: Components) -> None:
    a, b = StreamDenoiser(components, config()), StreamDenoiser(components, config(width=128))
    assert a.batch_key() != b.batch_key()
    with pytest.raises(ValueError, match="batch_key"):
        process_batch([a, b], frames(2))


def test_the_engine_is_shared_and_set_up_once(
    components: Components, monkeypatch: pytest.MonkeyPatch
) -> None:
    StreamDenoiser(components, config())  # the engine exists
    calls: list[object] = []
    monkeypatch.setattr("stream.engine.set_attention", lambda *args: calls.append(args))
    monkeypatch.setattr("stream.engine.choose_cpu_convolutions", lambda *args: calls.append(args))
    a, b = StreamDenoiser(components, config()), StreamDenoiser(components, config(prompt="x"))
    assert calls == []  # a new session touches nothing shared: no attention reset, no timing
    assert a.engine is b.engine is Engine.shared(components, config())
    assert a.batch_key() == b.batch_key()


# ---------------------------------------------------------------------- the streaming timestep rule
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5])
def test_first_timestep_rises_strictly_with_strength(steps: int) -> None:
    strengths = np.linspace(0.01, 1.0, 100)
    firsts = []
    for strength in strengths:
        timesteps, prev = schedule.streaming_timesteps(steps, float(strength), 1000)
        assert len(set(timesteps)) == steps and list(timesteps) == sorted(timesteps, reverse=True)
        assert prev[:-1] == timesteps[1:] and prev[-1] == -1
        firsts.append(timesteps[0])
    assert all(b > a for a, b in zip(firsts, firsts[1:], strict=False))
    assert firsts[-1] == 999  # strength 1 starts at the last training timestep


def test_a_strength_too_low_for_the_steps_is_refused() -> None:
    with pytest.raises(ValueError, match="too low for 5 distinct steps"):
        schedule.streaming_timesteps(5, 0.002, 1000)


def output(
    components: Components, frame: np.ndarray, steps: int, strength: float, **changes: object
) -> np.ndarray:
    c = config(width=128, height=128, steps=steps, strength=strength).replace(**changes)
    return StreamDenoiser(components, c)(frame).astype(np.int16)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return np.ascontiguousarray(photo("astronaut")[100:356:2, 100:356:2])


@pytest.mark.parametrize("steps", [1, 4])
def test_output_moves_further_from_the_input_as_strength_rises(
    components: Components, astronaut: np.ndarray, steps: int
) -> None:
    """Measured from the strength-0 limit (the autoencoder's round trip of the input: the random tiny
    autoencoder does not reproduce a photo, so the photo itself is not the reference)."""
    base = output(components, astronaut, 1, 0.001)
    changes = [np.abs(output(components, astronaut, steps, s) - base).mean() for s in (0.15, 0.45, 0.75, 1.0)]
    assert all(b > a + 1 for a, b in zip(changes, changes[1:], strict=False)), changes


def test_every_adaptive_level_still_runs_the_unet(components: Components, astronaut: np.ndarray) -> None:
    """The controller's floor is 1 step: with the streaming rule even that step starts at the strength's
    timestep, so the UNet changes the frame; the img2img grid starts a 1-step frame at t=1 here."""
    for level in build_ladder(4, 128, 128, min_side=64):
        size = {"width": level.width, "height": level.height}
        c = config(steps=level.steps, strength=0.5).replace(**size)
        assert StreamDenoiser(components, c).timesteps[0] == round(0.5 * 999)
        frame = astronaut[: level.height, : level.width]
        base = output(components, frame, 1, 0.001, **size)
        assert np.abs(output(components, frame, level.steps, 0.5, **size) - base).mean() > 10
    legacy = StreamDenoiser(components, config(steps=1, strength=0.5, timesteps="diffusers"))
    assert legacy.timesteps[0] <= 1  # what the streaming rule replaces
    assert (
        np.abs(
            output(components, astronaut, 1, 0.5, timesteps="diffusers")
            - output(components, astronaut, 1, 0.001)
        ).mean()
        < 1
    )


# ---------------------------------------------------------------------- the similarity filter
@pytest.mark.parametrize(
    ("change", "differs"),
    # fresh noise's first draw is the fixed noise (same seed): the frame is made anew, alike
    [({"prompt": "a completely different prompt"}, True), ({"noise": "fresh"}, False), ({"seed": 7}, True)],
)
def test_a_setting_change_is_never_hidden_by_the_similarity_filter(
    components: Components, change: dict[str, object], differs: bool
) -> None:
    denoiser = StreamDenoiser(components, config(similarity_threshold=0.5, max_skip=100))
    still = frames(1)[0]
    first = denoiser.process(still)
    assert denoiser.process(still).skipped
    denoiser.update(denoiser.config.replace(**change))
    after = denoiser.process(still)
    assert not after.skipped
    assert np.array_equal(after.frame, first.frame) != differs


def test_at_most_max_skip_frames_in_a_row_are_skipped(components: Components) -> None:
    denoiser = StreamDenoiser(components, config(similarity_threshold=0.5, max_skip=3))
    still = frames(1)[0]
    skipped = [denoiser.process(still).skipped for _ in range(9)]
    assert skipped == [False, True, True, True, False, True, True, True, False]


def test_max_skip_is_checked() -> None:
    with pytest.raises(ConfigError, match="max_skip"):
        config(max_skip=-1)


# ---------------------------------------------------------------------- once per process
def test_cpu_convolutions_are_chosen_once_and_never_flipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "_cpu_convolutions", None)
    flips: list[bool] = []
    original = torch._C._set_mkldnn_enabled
    monkeypatch.setattr(torch._C, "_set_mkldnn_enabled", lambda on: flips.append(on) or original(on))
    first = StreamDenoiser(load_model(config()), config())  # fresh components: a new engine
    chosen = len(flips)
    assert chosen >= 1 and devices.cpu_convolutions() in ("oneDNN", "native")
    second = StreamDenoiser(load_model(config()), config())
    clip = frames(3)
    for frame in clip:
        assert np.array_equal(first(frame), second(frame))
    assert len(flips) == chosen  # no switch around frames, none for the second model
