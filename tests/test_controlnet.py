"""ControlNet: parity with StableDiffusionControlNetImg2ImgPipeline (canny from the frame), loading saved
folders, the conditioning scale per row, batching, the control stage's timing, another family refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetImg2ImgPipeline
from PIL import Image

from stream import control, schedule
from stream.batch import FrameResult, process_batch
from stream.config import ConfigError, StreamConfig
from stream.denoiser import StreamDenoiser
from stream.engine import Engine
from stream.models import ModelError, load_model
from tests import conftest
from tests.conftest import photo
from tests.test_engine import MIXED, TOLERANCE, canvas, frames
from tests.tiny_models import controlnet, sd_pipeline, sdxl_pipeline

SIZE = 64


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-controlnet")
    sd_pipeline().save_pretrained(root / "sd")
    controlnet().save_pretrained(root / "controlnet")
    torch.manual_seed(0)
    sdxl_net = ControlNetModel.from_unet(sdxl_pipeline().unet, conditioning_embedding_out_channels=(16, 32))
    sdxl_net.save_pretrained(root / "controlnet-sdxl")
    return {"sd": root / "sd", "controlnet": root / "controlnet", "controlnet-sdxl": root / "controlnet-sdxl"}


def config(folders: dict[str, Path], **changes: object) -> StreamConfig:
    adapter = {"model": str(folders["sd"]), "controlnet": str(folders["controlnet"])}
    return conftest.cpu_config(SIZE, **{**adapter, **conftest.CUP, **changes})


def pipeline_images(
    pipe: Any, denoiser: StreamDenoiser, cfg: StreamConfig, frame: np.ndarray
) -> torch.Tensor:
    """The ControlNet img2img pipeline's output for `frame` at cfg's settings, from the stream's own
    latent and canny edges as diffusers' ControlNet examples make them."""
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    edges = cv2.Canny(frame, 100, 200)
    with torch.inference_mode():
        latent = denoiser.engine.encode(torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 127.5 - 1.0)
        return pipe(
            prompt=cfg.prompt,
            image=latent,
            control_image=Image.fromarray(np.stack([edges] * 3, axis=-1)),
            strength=cfg.strength,
            num_inference_steps=schedule.inference_steps_for(cfg.steps, cfg.strength),
            guidance_scale=cfg.guidance_scale,
            controlnet_conditioning_scale=cfg.controlnet_conditioning_scale,
            generator=torch.Generator().manual_seed(cfg.seed),
            output_type="pt",
        ).images


def square_photo() -> np.ndarray:
    return conftest.square_photo(SIZE)


@pytest.mark.parametrize("guidance,scale", [(1.0, 1.0), (5.0, 0.7)])
def test_controlnet_matches_controlnet_img2img_pipeline(
    folders: dict[str, Path], guidance: float, scale: float
) -> None:
    cfg = config(folders, guidance_scale=guidance, controlnet_conditioning_scale=scale, timesteps="diffusers")
    denoiser = StreamDenoiser.from_pretrained(cfg.model, cfg)
    pipe = StableDiffusionControlNetImg2ImgPipeline.from_pretrained(
        str(folders["sd"]),
        controlnet=ControlNetModel.from_pretrained(str(folders["controlnet"])),
        safety_checker=None,
        requires_safety_checker=False,
    )
    frame = square_photo()
    expected = pipeline_images(pipe, denoiser, cfg, frame)
    result = denoiser.process(frame)
    assert result.image is not None
    torch.testing.assert_close(result.image, expected, atol=1e-4, rtol=0)
    assert result.timings["control"] >= 0.0  # the canny stage is timed on its own


def test_the_controlnet_steers_and_its_scale_is_live(folders: dict[str, Path]) -> None:
    components = load_model(config(folders))
    frame = square_photo()
    steered = StreamDenoiser(components, config(folders))
    off = StreamDenoiser(components, config(folders, controlnet_conditioning_scale=0.0))
    plain = StreamDenoiser(load_model(config(folders, controlnet="")), config(folders, controlnet=""))
    a, b, c = (canvas(d.process(frame)) for d in (steered, off, plain))
    assert np.abs(a - c).mean() > 0.05  # the ControlNet changes the output
    assert np.abs(b - c).max() <= 1e-3  # at scale 0 it adds nothing
    steered.update(steered.config.replace(controlnet_conditioning_scale=0.0))
    assert np.abs(canvas(steered.process(frame)) - c).max() <= 1e-3
    with pytest.raises(ConfigError, match="controlnet_conditioning_scale"):
        steered.config.replace(controlnet_conditioning_scale=9.0)


def test_canny_and_none_conditioning_images() -> None:
    frame = square_photo()
    image = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    edges = control.condition_image(image, "canny")
    assert edges.shape == (1, 3, SIZE, SIZE)
    expected = torch.from_numpy(cv2.Canny(frame, 100, 200)).float() / 255.0
    assert torch.equal(edges[0, 1], expected) and set(edges.unique().tolist()) <= {0.0, 1.0}
    same = control.condition_image(image, "none")
    assert torch.allclose(same[0].permute(1, 2, 0) * 255.0, torch.from_numpy(frame).float(), atol=1e-3)


def test_controlnet_stream_is_the_same_alone_or_batched(folders: dict[str, Path]) -> None:
    """The engine's shared alone-vs-batched check with a ControlNet: each row its image and scale (the
    built-in tiny model with a random ControlNet: 4x4 latents, fast)."""
    tiny = {"model": "tiny", "controlnet": "random"}
    engine = Engine(load_model(config(folders, **tiny)), torch.device("cpu"), torch.float32, "sdpa")
    scales = (1.0, 0.5, 1.5, 0.0)
    modes = ("canny", "none", "canny", "canny")
    configs = [
        config(folders, controlnet_conditioning_scale=s, control=m, **tiny, **r)
        for r, s, m in zip(MIXED, scales, modes, strict=True)
    ]
    alone = [StreamDenoiser(engine, c) for c in configs]
    together = [StreamDenoiser(engine, c) for c in configs]
    batch = frames(4)  # a different image (and so a different control image) on every stream
    expected = [canvas(d.process(f)) for d, f in zip(alone, batch, strict=True)]
    calls = engine.calls
    results = process_batch(together, batch)
    assert engine.calls - calls == max(c.steps for c in configs)
    for e, result in zip(expected, results, strict=True):
        assert isinstance(result, FrameResult)
        assert np.abs(e - canvas(result)).max() <= TOLERANCE[torch.float32]


def test_a_controlnet_of_another_family_is_refused_in_one_line(folders: dict[str, Path]) -> None:
    with pytest.raises(ModelError) as info:
        load_model(config(folders, controlnet=str(folders["controlnet-sdxl"])))
    message = str(info.value)
    assert "\n" not in message and "is for SDXL" in message and "cross-attention 32" in message
    with pytest.raises(ModelError) as info:  # offline: not in the cache
        load_model(config(folders, controlnet="someone/not-cached-controlnet"))
    assert str(info.value).startswith("could not load controlnet 'someone/not-cached-controlnet': it is not")


def test_sdxl_controlnet_matches_sdxl_controlnet_img2img_pipeline(tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLControlNetImg2ImgPipeline

    pipe_parts = sdxl_pipeline()
    pipe_parts.save_pretrained(tmp_path / "sdxl")
    torch.manual_seed(0)
    net = ControlNetModel.from_unet(pipe_parts.unet, conditioning_embedding_out_channels=(16, 32))
    with torch.no_grad():  # give the zero convolutions weights, as diffusers' tests do
        for conv in [
            net.controlnet_cond_embedding.conv_out,
            *net.controlnet_down_blocks,
            net.controlnet_mid_block,
        ]:
            torch.nn.init.normal_(conv.weight, std=0.1)
    net.save_pretrained(tmp_path / "controlnet")
    cfg = conftest.cpu_config(
        SIZE,
        model=str(tmp_path / "sdxl"),
        controlnet=str(tmp_path / "controlnet"),
        guidance_scale=5.0,
        controlnet_conditioning_scale=0.8,
        timesteps="diffusers",
        **conftest.CUP,
    )
    denoiser = StreamDenoiser.from_pretrained(cfg.model, cfg)
    pipe = StableDiffusionXLControlNetImg2ImgPipeline.from_pretrained(
        str(tmp_path / "sdxl"), controlnet=ControlNetModel.from_pretrained(str(tmp_path / "controlnet"))
    )
    frame = square_photo()
    expected = pipeline_images(pipe, denoiser, cfg, frame)
    ours = denoiser.process(frame).image
    assert ours is not None
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def test_sdxl_runs_with_its_controlnet_and_random_controlnet_fits_the_tiny_model(
    folders: dict[str, Path], tmp_path: Path, tiny_model_dir: Path
) -> None:
    sdxl_dir = tmp_path / "sdxl"
    sdxl_pipeline().save_pretrained(sdxl_dir)
    cfg = config(folders, model=str(sdxl_dir), controlnet=str(folders["controlnet-sdxl"]))
    result = StreamDenoiser.from_pretrained(cfg.model, cfg).process(square_photo())
    assert result.frame.shape == (SIZE, SIZE, 3) and "control" in result.timings
    tiny = StreamConfig(model="tiny", controlnet="random", width=128, height=128, device="cpu", steps=1)
    frame = photo("coffee")[:96, :160]
    canny = StreamDenoiser.from_pretrained("tiny", tiny).process(frame)
    none = StreamDenoiser.from_pretrained("tiny", tiny.replace(control="none")).process(frame)
    assert canny.frame.shape == (96, 160, 3)
    assert np.abs(canvas(canny) - canvas(none)).max() > 0.05  # the conditioning image matters


def test_controlnet_benchmark_quick_run(tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    from benchmarks import controlnet as bench

    argv = ["--model", "tiny", "--device", "cpu", "--width", "64", "--height", "64", "--frames", "2"]
    assert bench.main([*argv, "--warmup", "1", "--steps", "1"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["benchmark"] == "controlnet" and report["model"] == "tiny (built-in)"
    for name in bench.VARIANTS:
        assert report[name]["frame"]["p50_ms"] > 0 and report[name]["unet_p50_ms"] > 0
    assert report["alone"]["control_p50_ms"] == 0.0 and report["canny_ms_p50"] > 0.0
    assert report["command"].startswith("python -m benchmarks.controlnet --model tiny")
