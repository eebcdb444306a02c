"""LoRA: a tiny LoRA saved with peft, loaded through --lora, changes the output and equals the img2img
pipeline with the same LoRA; the live scale re-fuses; a LoRA of another model is refused in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from PIL import Image

from stream import schedule
from stream.args import config_from_args
from stream.cli import build_parser
from stream.config import StreamConfig
from stream.denoiser import StreamDenoiser
from stream.models import ModelError, build_tiny_pipeline
from stream.models.lora import parse_lora
from tests import conftest
from tests.tiny_models import sd_pipeline

SIZE = 128


def save_lora(pipe: Any, folder: Path) -> Path:
    """A LoRA on the UNet's attention and the text encoder's, random (non-zero) weights, as diffusers'
    LoRA tests make one; saved with the pipeline's own save_lora_weights."""
    torch.manual_seed(1)
    attention = ["to_q", "to_k", "to_v", "to_out.0"]
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=attention, init_lora_weights=False))
    text = ["q_proj", "k_proj", "v_proj", "out_proj"]
    inject_adapter_in_model(
        LoraConfig(r=4, lora_alpha=4, target_modules=text, init_lora_weights=False), pipe.text_encoder
    )
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        safe_serialization=True,
    )
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_lora(build_tiny_pipeline(), tmp_path_factory.mktemp("lora"))


def config(**changes: object) -> StreamConfig:
    base: dict[str, object] = {
        "model": "tiny",
        "width": SIZE,
        "height": SIZE,
        "steps": 2,
        "strength": 0.5,
        "device": "cpu",
        "prompt": "a watercolor cup",
        "seed": 3,
        "timesteps": "diffusers",
    }
    base.update(changes)
    return StreamConfig(**base)  # type: ignore[arg-type]


def square_photo() -> np.ndarray:
    return conftest.square_photo(SIZE)


def test_parse_lora() -> None:
    assert parse_lora("owner/name") == ("owner/name", 1.0)
    assert parse_lora("style.safetensors:0.7") == ("style.safetensors", 0.7)
    assert parse_lora("C:\\loras\\style.safetensors") == ("C:\\loras\\style.safetensors", 1.0)
    with pytest.raises(ValueError, match="finite"):
        parse_lora("style.safetensors:nan")


@pytest.mark.parametrize("suffix,scale", [("", 1.0), (":0.5", 0.5)])
def test_lora_changes_the_output_and_matches_the_pipeline(
    tiny_model_dir: Path, lora_file: Path, suffix: str, scale: float
) -> None:
    args = build_parser().parse_args(
        ["bench", "--model", "tiny", "--lora", f"{lora_file}{suffix}", "--width", "128", "--height", "128"]
    )
    assert config_from_args(args).lora == (f"{lora_file}{suffix}",)
    cfg = config(lora=(f"{lora_file}{suffix}",))
    denoiser = StreamDenoiser.from_pretrained("tiny", cfg)
    assert denoiser.engine.lora is not None
    assert set(denoiser.engine.lora.components) == {"unet", "text_encoder"}
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        str(tiny_model_dir), safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora_file.parent))
    frame = square_photo()
    expected = pipe(
        prompt=cfg.prompt,
        image=Image.fromarray(frame),
        strength=cfg.strength,
        num_inference_steps=schedule.inference_steps_for(cfg.steps, cfg.strength),
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(cfg.seed),
        output_type="pt",
        cross_attention_kwargs={"scale": scale},
    ).images
    ours = denoiser.process(frame).image
    plain = StreamDenoiser.from_pretrained("tiny", config()).process(frame).image
    assert ours is not None and plain is not None
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    assert (ours - plain).abs().mean() > 1e-3  # the LoRA changes the output


def test_lora_scale_is_live_and_refuses_back(tiny_model_dir: Path, lora_file: Path) -> None:
    frame = square_photo()
    plain = StreamDenoiser.from_pretrained("tiny", config()).process(frame).image
    denoiser = StreamDenoiser.from_pretrained("tiny", config(lora=(str(lora_file.parent),)))
    other = StreamDenoiser(denoiser.engine, denoiser.config)  # another session of the same model
    full = denoiser.process(frame).image
    denoiser.update(denoiser.config.replace(lora_scale=0.0))
    off = denoiser.process(frame).image
    other_off = other.process(frame).image  # the fused LoRA is the model's: every session sees the change
    assert other_off is not None and plain is not None
    torch.testing.assert_close(other_off, plain, atol=1e-4, rtol=0)
    denoiser.update(denoiser.config.replace(lora_scale=1.0))
    again = denoiser.process(frame).image
    assert full is not None and off is not None and again is not None and plain is not None
    torch.testing.assert_close(off, plain, atol=1e-4, rtol=0)  # scale 0: the model without the LoRA
    torch.testing.assert_close(again, full, atol=1e-4, rtol=0)  # re-fused at 1: as loaded


def test_a_lora_of_another_model_is_refused_in_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    other = save_lora(sd_pipeline(), tmp_path)  # its attention layers are 64 wide, the tiny model's 16
    with pytest.raises(ModelError) as info:
        StreamDenoiser.from_pretrained("tiny", config(lora=(str(other),)))
    message = str(info.value)
    assert "\n" not in message and "does not match the model" in message and "where the model's is" in message
    with pytest.raises(ModelError, match="does not exist"):
        StreamDenoiser.from_pretrained("tiny", config(lora=("./no/such/lora.safetensors",)))


def test_several_loras_add_up(tiny_model_dir: Path, lora_file: Path) -> None:
    frame = square_photo()
    once = StreamDenoiser.from_pretrained("tiny", config(lora=(str(lora_file),))).process(frame).image
    halves = (f"{lora_file}:0.5", f"{lora_file}:0.5")  # --lora given twice
    twice = StreamDenoiser.from_pretrained("tiny", config(lora=halves)).process(frame).image
    assert once is not None and twice is not None
    torch.testing.assert_close(twice, once, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "changes,words",
    [
        ({"lora_scale": 9.0}, "lora_scale must be in [-4, 4]"),
        ({"lora": ["a.safetensors"]}, "lora must be a tuple"),
        ({"control": "depth"}, "control must be one of canny, none"),
    ],
)
def test_adapter_settings_are_checked(changes: dict[str, object], words: str) -> None:
    from stream.config import ConfigError

    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        StreamConfig(**changes)  # type: ignore[arg-type]


def test_a_lora_that_cannot_be_found_says_so(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelError) as info:  # the tests run with HF_HUB_OFFLINE=1
        StreamDenoiser.from_pretrained("tiny", config(lora=("someone/not-cached-lora",)))
    message = str(info.value)
    assert "\n" not in message and message.startswith("could not load LoRA 'someone/not-cached-lora'")
    assert "does not match" not in message


def test_adapter_scales_are_live_settings_and_the_adapters_are_not() -> None:
    from stream.config import ConfigError
    from stream.server.session import apply_settings

    new = apply_settings(StreamConfig(), {"lora_scale": 0.5, "controlnet_conditioning_scale": 0.3})
    assert (new.lora_scale, new.controlnet_conditioning_scale) == (0.5, 0.3)
    with pytest.raises(ConfigError, match="unknown setting"):
        apply_settings(StreamConfig(), {"controlnet": "random"})
