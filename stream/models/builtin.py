"""The built-in tiny model (seeded random weights, runs on a CPU) and full-size random architectures."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from stream.models.base import RANDOM_ARCHS, TINY_MODEL_VERSION, Components, ModelError, seeded

logger = logging.getLogger(__name__)

TINY_VAE_LEVELS = 5  # the tiny autoencoder's blocks: it downsamples by 2 ** (5 - 1) = 16
TINY_SIZE_MULTIPLE = 2 ** (TINY_VAE_LEVELS - 1)  # so the tiny model's width and height are multiples of 16


def cache_dir() -> Path:
    """Where generated models live: $STREAM_CACHE, else ~/.cache/stream."""
    return Path(os.environ.get("STREAM_CACHE", Path.home() / ".cache" / "stream"))


def ensure_tiny_model(version: str = TINY_MODEL_VERSION, build: Callable[[], Any] | None = None) -> Path:
    """The built-in tiny pipeline folder, written once (seeded, so every machine gets the same weights)."""
    target = cache_dir() / "models" / version
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("writing the built-in tiny model to %s", target)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        (build or build_tiny_pipeline)().save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny_pipeline() -> Any:
    """A seeded random-weight SD pipeline small enough for real-time on a 2-core CPU at 256x256.

    Shaped for speed, not images: a two-level UNet (8/16 channels, cross-attention in the mid block) and
    a 4-channel AutoencoderTiny that downsamples by 16, so 256x256 frames become 16x16 latents.
    """
    from diffusers import AutoencoderTiny, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with seeded(0):
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderTiny(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            encoder_block_out_channels=(4,) * TINY_VAE_LEVELS,
            decoder_block_out_channels=(4,) * TINY_VAE_LEVELS,
            num_encoder_blocks=(0, 0, 0, 0, 1),
            num_decoder_blocks=(1, 0, 0, 0, 0),
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=1000,
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=5,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=0,
                eos_token_id=2,
                pad_token_id=1,
                layer_norm_eps=1e-5,
            )
        )
        # PyTorch's default init shrinks the signal layer by layer: the output would be a flat grey that
        # ignores the input and the prompt. Variance-keeping init on the autoencoder (its last layer damped
        # to avoid saturation) and a stronger text cross-attention make both visibly change the output.
        with torch.no_grad():
            convs = [m for m in vae.modules() if isinstance(m, torch.nn.Conv2d)]
            for conv in convs:
                torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv2d)][-1].weight.mul_(0.1)
            for name, module in unet.named_modules():
                if name.endswith("attn2.to_out.0"):
                    module.weight.mul_(8.0)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=build_tokenizer(),
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tokenizer() -> Any:
    """A byte-level CLIP tokenizer generated locally (no merges: a token per byte) for tiny/random models."""
    from transformers import CLIPTokenizer

    folder = cache_dir() / "tokenizers" / "clip-bytes-v1"
    if not (folder / "tokenizer_config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        chars = list(_bytes_to_unicode().values())
        vocab = {c: i for i, c in enumerate(chars)}
        vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
        vocab.update({"<|startoftext|>": 2 * len(chars), "<|endoftext|>": 2 * len(chars) + 1})
        (folder / "vocab.json").write_text(json.dumps(vocab))
        (folder / "merges.txt").write_text("#version: 0.2\n")
        special = {
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
        }
        (folder / "tokenizer_config.json").write_text(
            json.dumps({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", **special})
        )
    return CLIPTokenizer.from_pretrained(str(folder))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


# ---------------------------------------------------------------------- full-size random architectures
def random_arch_configs(arch: str) -> dict[str, dict[str, Any]]:
    """UNet, VAE, text encoder and scheduler configs of a full-size architecture (for speed, not images)."""
    sd2 = arch == "sd-turbo"
    if arch == "sdxl-turbo":
        from stream.models.sdxl import random_configs

        return random_configs()
    if arch not in RANDOM_ARCHS:
        raise ModelError(
            f"unknown random architecture '{arch}'; use one of "
            + ", ".join(f"random:{a}" for a in RANDOM_ARCHS)
        )
    unet = {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 1024 if sd2 else 768,
        "attention_head_dim": (5, 10, 20, 20) if sd2 else 8,
        "use_linear_projection": sd2,
    }
    vae = {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": (128, 256, 512, 512),
        "sample_size": 512,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
    }
    text = {
        "vocab_size": 49408,
        "hidden_size": 1024 if sd2 else 768,
        "intermediate_size": 4096 if sd2 else 3072,
        "num_hidden_layers": 23 if sd2 else 12,
        "num_attention_heads": 16 if sd2 else 12,
        "max_position_embeddings": 77,
        "hidden_act": "gelu" if sd2 else "quick_gelu",
        "projection_dim": 512 if sd2 else 768,
    }
    scheduler = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "epsilon",
        "timestep_spacing": "trailing" if sd2 else "leading",
    }
    return {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": scheduler}


def build_random(arch: str, device: torch.device, dtype: torch.dtype) -> Components:
    """A full-size architecture with seeded random weights, built on the target device."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if arch == "sdxl-turbo":
        from stream.models.sdxl import build_random as build_random_sdxl

        return build_random_sdxl(device, dtype)
    configs = random_arch_configs(arch)
    logger.info("building random:%s (full-size architecture, random weights) on %s", arch, device)
    with seeded(0), device:
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    scheduler = DDIMScheduler(**configs["scheduler"])
    return Components(
        unet=unet.to(dtype),
        vae=vae.to(dtype),
        text_encoder=text_encoder.to(dtype),
        tokenizer=build_tokenizer(),
        scheduler_config=dict(scheduler.config),
        name=f"random:{arch} (random weights, for speed only)",
        placeholder=True,
    )
