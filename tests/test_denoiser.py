"""StreamDenoiser: parity with diffusers' img2img pipelines, loading, temporal behaviour, live changes."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    LatentConsistencyModelImg2ImgPipeline,
    LCMScheduler,
    StableDiffusionImg2ImgPipeline,
    UNet2DConditionModel,
)
from PIL import Image

from stream import schedule
from stream.config import ConfigError, StreamConfig
from stream.denoiser import STAGES, StreamDenoiser
from stream.models import Components, ModelError, build_tiny_pipeline, random_arch_configs
from tests.conftest import STREAM, cpu_config, pan_clip, photo

SIZE = 128  # the tiny model's autoencoder downsamples by 16: 8x8 latents


def tiny_config(**changes: object) -> StreamConfig:
    return cpu_config(SIZE, **{**STREAM, **changes})


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> StreamDenoiser:
    return StreamDenoiser.from_pretrained("tiny", tiny_config())


def square_photo(size: int = SIZE) -> np.ndarray:
    image = photo("coffee")
    return np.ascontiguousarray(image[:size, 100 : 100 + size])


def float_output(denoiser: StreamDenoiser, frame: np.ndarray) -> torch.Tensor:
    """The decoded image in [0, 1] before uint8 quantization, through the denoiser's own path."""
    image = denoiser.process(frame).image
    assert image is not None
    return image


# ---------------------------------------------------------------------- parity with diffusers
@pytest.mark.parametrize("guidance", [1.0, 7.5])
@pytest.mark.parametrize("steps,strength", [(1, 0.5), (2, 0.5), (4, 0.6), (3, 1.0)])
def test_ddim_matches_img2img_pipeline(
    tiny_model_dir: Path, guidance: float, steps: int, strength: float
) -> None:
    config = tiny_config(
        steps=steps, strength=strength, guidance_scale=guidance, negative_prompt="", timesteps="diffusers"
    )
    denoiser = StreamDenoiser.from_pretrained(str(tiny_model_dir), config)
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        str(tiny_model_dir), safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    frame = square_photo()
    total = schedule.inference_steps_for(steps, strength)
    expected = pipe(
        prompt=config.prompt,
        image=Image.fromarray(frame),
        strength=strength,
        num_inference_steps=total,
        guidance_scale=guidance,
        eta=0.0,
        generator=torch.Generator().manual_seed(config.seed),
        output_type="pt",
    ).images
    ours = float_output(denoiser, frame)
    assert ours.shape == expected.shape == (1, 3, SIZE, SIZE)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    # The whole per-frame path (uint8 in, uint8 out) agrees up to rounding.
    reference = (expected[0].permute(1, 2, 0).numpy() * 255).round().astype(np.int16)
    assert np.abs(denoiser(frame).astype(np.int16) - reference).max() <= 1


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_ddim_with_autoencoder_kl_matches_img2img_pipeline(guidance: float) -> None:
    """The AutoencoderKL path (real models' VAE): latents from the distribution's mode, decoded the same."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()
    base = build_tiny_pipeline()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    components = Components(
        unet=unet,
        vae=vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        scheduler_config=dict(scheduler.config),
        name="test-kl",
    )
    config = tiny_config(
        width=64, height=64, steps=3, strength=0.7, guidance_scale=guidance, timesteps="diffusers"
    )
    denoiser = StreamDenoiser(components, config)
    pipe = StableDiffusionImg2ImgPipeline(
        vae=vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    frame = square_photo(64)
    with torch.inference_mode():
        latent = denoiser.engine.encode(torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 127.5 - 1.0)
        expected = pipe(
            prompt=config.prompt,
            image=latent,
            strength=0.7,
            num_inference_steps=schedule.inference_steps_for(3, 0.7),
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(config.seed),
            output_type="pt",
        ).images
    torch.testing.assert_close(float_output(denoiser, frame), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("steps,strength,guidance", [(1, 0.6, 1.0), (2, 0.5, 7.5), (4, 0.8, 7.5)])
def test_lcm_matches_lcm_img2img_pipeline(steps: int, strength: float, guidance: float) -> None:
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
    scheduler = LCMScheduler.from_config(base.scheduler.config)
    components = Components(
        unet=unet,
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        scheduler_config=dict(scheduler.config),
        name="test-lcm",
    )
    config = tiny_config(scheduler="lcm", steps=steps, strength=strength, guidance_scale=guidance)
    denoiser = StreamDenoiser(components, config)
    pipe = LatentConsistencyModelImg2ImgPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    frame = square_photo()
    expected = pipe(
        prompt=config.prompt,
        image=Image.fromarray(frame),
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(config.seed),
        output_type="pt",
    ).images
    torch.testing.assert_close(float_output(denoiser, frame), expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------- loading
def test_saved_pipeline_folder_loads_through_from_pretrained(tmp_path: Path, tiny: StreamDenoiser) -> None:
    folder = tmp_path / "my-model"
    build_tiny_pipeline().save_pretrained(folder)
    assert (folder / "model_index.json").is_file() and (folder / "unet").is_dir()
    loaded = StreamDenoiser.from_pretrained(str(folder), tiny_config())
    assert loaded.name == str(folder) and not loaded.placeholder
    frame = square_photo()
    # The built-in `tiny` is the same seeded pipeline loaded through the same path: the same weights, and
    # exactly the same output (the CPU convolution backend is chosen once per process, not per denoiser).
    builtin = StreamDenoiser.from_pretrained("tiny", tiny_config())
    for name, value in builtin.engine.unet.state_dict().items():
        assert torch.equal(value, loaded.engine.unet.state_dict()[name]), name
    assert np.array_equal(loaded(frame), builtin(frame))
    assert tiny.placeholder and "tiny" in tiny.name


@pytest.mark.parametrize(
    "model,words",
    [
        ("/no/such/model", "does not exist"),
        ("./missing-folder", "does not exist"),
        ("weights.safetensors", "does not exist"),
        ("random:sd99", "unknown random architecture"),
        ("someone/not-cached-model", "could not load model"),
    ],
)
def test_bad_model_gives_clear_error(model: str, words: str) -> None:
    with pytest.raises(ModelError, match=words):
        StreamDenoiser.from_pretrained(model, tiny_config())


def test_folder_without_model_index_and_non_checkpoint_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="model_index.json"):
        StreamDenoiser.from_pretrained(str(tmp_path), tiny_config())
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelError, match="not a checkpoint"):
        StreamDenoiser.from_pretrained(str(text), tiny_config())
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="could not load checkpoint"):
        StreamDenoiser.from_pretrained(str(broken), tiny_config())


def test_auto_falls_back_to_tiny_with_a_warning(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        denoiser = StreamDenoiser.from_pretrained("auto", tiny_config(model="auto"))
    assert denoiser.placeholder and "auto fallback" in denoiser.name
    assert any("random weights" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("arch,params", [("sd-turbo", 865.9e6), ("sd15", 859.5e6)])
def test_random_architectures_are_full_size(arch: str, params: float) -> None:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**random_arch_configs(arch)["unet"])
    count = sum(p.numel() for p in unet.parameters())
    assert abs(count - params) / params < 0.001


def test_vae_tiny_on_the_tiny_model_is_taesd_shaped() -> None:
    denoiser = StreamDenoiser.from_pretrained("tiny", tiny_config(vae="tiny", steps=1))
    assert type(denoiser.engine.vae).__name__ == "AutoencoderTiny"
    assert tuple(denoiser.engine.vae.config.encoder_block_out_channels) == (64, 64, 64, 64)
    assert denoiser(square_photo()).shape == (SIZE, SIZE, 3)


# ---------------------------------------------------------------------- per-frame behaviour
def test_output_shape_dtype_and_timings(tiny: StreamDenoiser) -> None:
    result = tiny.process(square_photo())
    assert result.frame.shape == (SIZE, SIZE, 3) and result.frame.dtype == np.uint8 and not result.skipped
    assert set(result.timings) == {*STAGES, "unet_1", "unet_2", "total"}  # 2 steps: 2 UNet calls
    assert all(v > 0 for v in result.timings.values())  # every stage ran and was timed


@pytest.mark.parametrize("steps,guidance", [(1, 1.0), (4, 2.0)])
def test_stage_timings_add_up_to_the_frame_time(tiny_model_dir: Path, steps: int, guidance: float) -> None:
    """The stages account for most of the frame's time and never more than it; UNet calls sit inside
    `denoise`. (Bounds, not timings: on a loaded machine the gaps between stages grow.)"""
    denoiser = StreamDenoiser.from_pretrained(
        "tiny", tiny_config(width=128, height=128, steps=steps, guidance_scale=guidance)
    )
    frame = square_photo(128)
    for _ in range(3):  # warm up
        denoiser.process(frame)
    for _ in range(5):
        start = time.perf_counter()
        t = denoiser.process(frame).timings
        measured = (time.perf_counter() - start) * 1000.0
        stages = sum(t[s] for s in STAGES)
        unets = [t[f"unet_{i + 1}"] for i in range(steps)]
        assert 0.5 * t["total"] <= stages <= t["total"] + 0.5, (t, measured)
        assert t["total"] <= measured + 0.5
        assert 0 < sum(unets) <= t["denoise"] and f"unet_{steps + 1}" not in t


def test_frame_size_change_mid_stream(tiny: StreamDenoiser) -> None:
    image = photo("rocket")
    for h, w in [(SIZE, SIZE), (240, 320), (61, 100), (300, 90), (SIZE, SIZE)]:
        out = tiny(np.ascontiguousarray(image[:h, :w]))
        assert out.shape == (h, w, 3)


def test_bad_frames_are_refused(tiny: StreamDenoiser) -> None:
    for bad in [
        np.zeros((8, 8), np.uint8),
        np.zeros((8, 8, 4), np.uint8),
        np.zeros((8, 8, 3), np.float32),
        np.zeros((0, 8, 3), np.uint8),
    ]:
        with pytest.raises(ValueError, match="HxWx3 uint8"):
            tiny(bad)


def test_static_input_gives_a_stable_output(tiny: StreamDenoiser) -> None:
    frame = square_photo()
    tiny.update(tiny.config.replace(latent_feedback=0.0))
    outputs = [tiny(frame) for _ in range(3)]
    assert all(np.array_equal(outputs[0], o) for o in outputs[1:])  # fixed noise: identical frames
    tiny.update(tiny.config.replace(latent_feedback=0.5))
    outputs = [tiny(frame).astype(np.float32) for _ in range(8)]
    changes = [np.abs(a - b).mean() for a, b in zip(outputs, outputs[1:], strict=False)]
    assert changes[-1] < 1.0 and changes[-1] <= changes[0]  # with feedback it settles
    tiny.update(tiny.config.replace(latent_feedback=0.0, noise="fresh"))
    fresh = [tiny(frame) for _ in range(2)]
    assert not np.array_equal(fresh[0], fresh[1])  # fresh noise is what fixed noise avoids
    tiny.update(tiny.config.replace(noise="fixed"))


def test_latent_feedback_changes_the_output_of_moving_input(tiny_model_dir: Path) -> None:
    clip = pan_clip(6, (SIZE, SIZE), step=6)
    plain = StreamDenoiser.from_pretrained("tiny", tiny_config(latent_feedback=0.0))
    blended = StreamDenoiser.from_pretrained("tiny", tiny_config(latent_feedback=0.6))
    a = [plain(f).astype(np.float32) for f in clip]
    b = [blended(f).astype(np.float32) for f in clip]
    assert np.array_equal(a[0], b[0])  # nothing to blend with on the first frame
    assert min(np.abs(x - y).mean() for x, y in zip(a[1:], b[1:], strict=True)) > 1.0


def test_similarity_filter_skips_and_counts(tiny_model_dir: Path) -> None:
    denoiser = StreamDenoiser.from_pretrained("tiny", tiny_config(similarity_threshold=0.98))
    frame = square_photo()
    first = denoiser.process(frame)
    nearly = frame.copy()
    nearly[0, 0] = 255 - nearly[0, 0]
    second = denoiser.process(nearly)
    assert not first.skipped and second.skipped and denoiser.skipped == 1 and denoiser.frames == 2
    assert second.frame is first.frame
    third = denoiser.process(255 - frame)
    assert not third.skipped and denoiser.skipped == 1


def test_prompt_is_cached_and_changes_the_output(
    tiny: StreamDenoiser, monkeypatch: pytest.MonkeyPatch
) -> None:
    frame = square_photo()
    tiny.update(tiny.config.replace(latent_feedback=0.0, guidance_scale=3.0))
    before = tiny(frame)
    calls = []
    original = tiny.encode_prompt
    monkeypatch.setattr(tiny, "encode_prompt", lambda p: calls.append(p) or original(p))
    tiny.prepare(tiny.config.prompt, tiny.config.negative_prompt)
    tiny.update(tiny.config.replace(strength=0.6))
    assert calls == []  # same prompt: no re-encoding
    tiny.update(tiny.config.replace(strength=0.5, prompt="a neon city at night"))
    assert calls == ["a neon city at night", ""]
    after = tiny(frame)
    assert np.abs(after.astype(np.int16) - before.astype(np.int16)).mean() > 0.5
    tiny.update(tiny.config.replace(prompt="a watercolor painting of a cup", guidance_scale=1.0))


def test_live_update_of_steps_and_refusals(tiny: StreamDenoiser) -> None:
    tiny.update(tiny.config.replace(steps=4, strength=0.6))
    assert len(tiny._schedule.timesteps) == 4
    tiny.update(tiny.config.replace(steps=2, strength=0.5))
    assert len(tiny._schedule.timesteps) == 2
    with pytest.raises(ConfigError, match="cannot change while streaming"):
        tiny.update(tiny.config.replace(model="random:sd15"))
    with pytest.raises(ConfigError, match="multiples of 16"):
        tiny.update(tiny.config.replace(width=136))
    assert tiny.config.width == SIZE


def test_size_must_fit_the_autoencoder() -> None:
    with pytest.raises(ConfigError, match="multiples of 16"):
        StreamDenoiser.from_pretrained("tiny", tiny_config(width=264))
