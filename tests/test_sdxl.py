"""SDXL: parity with StableDiffusionXLImg2ImgPipeline, loading a saved folder, batching, the family and
its errors, random:sdxl-turbo's size, the autoencoder's force_upcast."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

from stream import schedule
from stream.batch import process_batch
from stream.config import StreamConfig
from stream.denoiser import StreamDenoiser
from stream.engine import Engine
from stream.models import ModelError, load_model, random_arch_configs
from stream.models.hub import load_vae
from tests import conftest
from tests.conftest import photo
from tests.test_engine import MIXED, TOLERANCE, canvas, frames
from tests.tiny_models import sdxl_pipeline

SIZE = 64  # the tiny autoencoder downsamples by 2: 32x32 latents


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    sdxl_pipeline().save_pretrained(folder)
    return folder


def config(folder: Path, **changes: object) -> StreamConfig:
    return conftest.cpu_config(SIZE, **{"model": str(folder), **conftest.CUP, **changes})


def square_photo() -> np.ndarray:
    return conftest.square_photo(SIZE)


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_sdxl_matches_sdxl_img2img_pipeline(sdxl_dir: Path, guidance: float) -> None:
    cfg = config(sdxl_dir, guidance_scale=guidance, timesteps="diffusers")
    denoiser = StreamDenoiser.from_pretrained(str(sdxl_dir), cfg)
    assert denoiser.engine.family == "sdxl" and denoiser.engine.text_encoder_2 is not None
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(sdxl_dir))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    frame = square_photo()
    with torch.inference_mode():
        # the AutoencoderKL's mode as the start (the pipeline would draw from the distribution)
        latent = denoiser.engine.encode(torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 127.5 - 1.0)
        expected = pipe(
            prompt=cfg.prompt,
            image=latent,
            strength=cfg.strength,
            num_inference_steps=schedule.inference_steps_for(cfg.steps, cfg.strength),
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(cfg.seed),
            output_type="pt",
        ).images
    ours = denoiser.process(frame).image
    assert ours is not None and ours.shape == expected.shape == (1, 3, SIZE, SIZE)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def test_sdxl_prompt_and_time_ids_condition_the_output(sdxl_dir: Path) -> None:
    components = load_model(config(sdxl_dir))
    frame = square_photo()
    base = canvas(StreamDenoiser(components, config(sdxl_dir)).process(frame))
    other_prompt = canvas(StreamDenoiser(components, config(sdxl_dir, prompt="a neon city")).process(frame))
    assert np.abs(base - other_prompt).mean() > 0.01


def test_sdxl_stream_is_the_same_alone_or_batched(sdxl_dir: Path) -> None:
    """The engine's shared alone-vs-batched check, on SDXL (pooled embeddings and time ids per row), with
    the built-in tiny SDXL model (8x8 latents: fast)."""
    components = load_model(config(sdxl_dir, model="tiny-sdxl"))
    engine = Engine(components, torch.device("cpu"), torch.float32, "sdpa")
    configs = [config(sdxl_dir, model="tiny-sdxl", **r) for r in MIXED]
    alone = [StreamDenoiser(engine, c) for c in configs]
    together = [StreamDenoiser(engine, c) for c in configs]
    for frame in frames(2):
        expected = [canvas(d.process(frame)) for d in alone]
        calls = engine.calls
        results = process_batch(together, [frame] * len(together))
        assert engine.calls - calls == max(c.steps for c in configs)
        for e, result in zip(expected, results, strict=True):
            assert np.abs(e - canvas(result)).max() <= TOLERANCE[torch.float32]


def test_unsupported_pipeline_class_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableVideoDiffusionPipeline"}))
    with pytest.raises(ModelError) as info:
        load_model(StreamConfig(model=str(tmp_path), device="cpu"))
    message = str(info.value)
    assert "\n" not in message
    assert "StableVideoDiffusionPipeline" in message and "StableDiffusionXLPipeline" in message


def test_random_sdxl_turbo_is_full_size() -> None:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**random_arch_configs("sdxl-turbo")["unet"])
    count = sum(p.numel() for p in unet.parameters())
    assert abs(count - 2.567e9) / 2.567e9 < 0.001  # SDXL's UNet: 2,567,463,684 parameters


def test_vae_tiny_on_sdxl_asks_for_taesdxl_and_float16_upcasts_the_autoencoder(sdxl_dir: Path) -> None:
    components = load_model(config(sdxl_dir))
    with pytest.raises(ModelError, match="madebyollin/taesdxl"):
        load_vae("tiny", components, torch.device("cpu"), torch.float32)  # offline: not in the cache
    components.vae.register_to_config(force_upcast=True)
    engine = Engine(components, torch.device("cpu"), torch.float16, "sdpa")
    assert engine.vae_dtype == torch.float32 and next(engine.vae.parameters()).dtype == torch.float32
    assert next(engine.unet.parameters()).dtype == torch.float16


def test_built_in_tiny_sdxl_runs_through_the_same_loading_path() -> None:
    cfg = StreamConfig(model="tiny-sdxl", width=64, height=64, device="cpu", steps=1, guidance_scale=2.0)
    denoiser = StreamDenoiser.from_pretrained("tiny-sdxl", cfg)
    assert denoiser.engine.family == "sdxl" and denoiser.placeholder
    assert denoiser.engine.vae_factor == 8 and denoiser.engine.vae.config.force_upcast
    result = denoiser.process(photo("coffee")[:48, :80])
    assert result.frame.shape == (48, 80, 3)


def test_a_single_file_checkpoint_is_told_sdxl_by_its_tensor_names(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from stream.models.hub import _single_file_family

    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)}, tmp_path / "xl.safetensors")
    save_file({"cond_stage_model.transformer.x": torch.zeros(2)}, tmp_path / "sd.safetensors")
    assert _single_file_family(tmp_path / "xl.safetensors") == "sdxl"
    assert _single_file_family(tmp_path / "sd.safetensors") == "sd"
    with pytest.raises(ModelError) as info:  # offline, its SDXL config is not in the cache
        load_model(StreamConfig(model=str(tmp_path / "xl.safetensors"), device="cpu"))
    assert "\n" not in str(info.value) and "SDXL" in str(info.value)
