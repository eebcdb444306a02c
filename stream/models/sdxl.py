"""SDXL and SDXL-Turbo: telling the family from the model, the two text encoders' conditioning (prompt
embeddings, pooled embeddings, time ids) as diffusers' SDXL pipelines make it, and `random:sdxl-turbo`."""

from __future__ import annotations

import logging
from typing import Any

import torch

from stream.models.base import Components, ModelError, seeded

logger = logging.getLogger(__name__)

TINY_SDXL_VERSION = "tiny-sdxl-v1"  # the built-in tiny SDXL model's cache folder
TAESDXL_MODEL = "madebyollin/taesdxl"  # real TAESDXL weights for `--vae tiny` on a real SDXL model
# Pipeline classes (model_index.json's `_class_name`) by the family this stream runs them as.
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "LatentConsistencyModelPipeline": "sd",
    "LatentConsistencyModelImg2ImgPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
}
# Key prefixes that only an SDXL single-file checkpoint has (its second, OpenCLIP-bigG text encoder).
SDXL_CHECKPOINT_KEYS = ("conditioner.embedders.1.model.", "conditioner.embedders.1.")


def family_of(class_name: object, source: str) -> str:
    """`sd` or `sdxl` for a pipeline class name; any other class is refused in one line."""
    family = PIPELINE_FAMILIES.get(str(class_name))
    if family is None:
        raise ModelError(
            f"model '{source}' is a {class_name}, which this stream cannot run; supported pipelines: "
            f"{', '.join(PIPELINE_FAMILIES)} (SD 1.x/2.x, SDXL, SDXL-Turbo)"
        )
    return family


def pipeline_class(family: str) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def checkpoint_family(keys: list[str]) -> str:
    """`sdxl` when a single-file checkpoint's tensor names are SDXL's, else `sd`."""
    return "sdxl" if any(k.startswith(SDXL_CHECKPOINT_KEYS) for k in keys) else "sd"


def family_words(components: Components) -> str:
    """The model's family in words, for errors: SDXL, SD 2.x, SD 1.x, or its cross-attention width."""
    return unet_family_words(components.unet.config)


def unet_family_words(config: Any) -> str:
    if getattr(config, "addition_embed_type", None) == "text_time":
        return f"SDXL (cross-attention {config.cross_attention_dim})"
    known = {768: "SD 1.x", 1024: "SD 2.x"}.get(int(config.cross_attention_dim))
    return f"{known or 'SD-family'} (cross-attention {config.cross_attention_dim})"


# ---------------------------------------------------------------------- text conditioning
def tokenize(tokenizers: tuple[Any, Any], prompt: str) -> tuple[Any, Any]:
    """Both tokenizers' ids, padded to their own max length, as the SDXL pipelines tokenize."""
    return tuple(  # type: ignore[return-value]
        tok(
            prompt,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        for tok in tokenizers
    )


def encode_tokens(
    text_encoders: tuple[Any, Any], tokens: tuple[Any, Any], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (1, L, D1 + D2) penultimate hidden states of both encoders side by side, (1, P) pooled embeddings
    of the second (its projection), as `StableDiffusionXLPipeline.encode_prompt` (no clip skip)."""
    hidden: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    with torch.inference_mode():
        for encoder, ids in zip(text_encoders, tokens, strict=True):
            out = encoder(ids.input_ids.to(device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
    if pooled is None:
        raise ModelError("this SDXL model's second text encoder gives no pooled projection")
    return torch.cat(hidden, dim=-1).to(dtype), pooled.to(dtype)


def prompt_rows(
    engine: Any, prompt: str, negative_prompt: str, cfg: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """A stream's (rows, L, D) prompt embeddings and (rows, P) pooled ones: [uncond, cond] with CFG, else
    [cond]. An empty negative prompt is zeros where the model asks for it (force_zeros_for_empty_prompt),
    as the pipelines do when no negative prompt is given."""
    embeds, pooled = engine.encode_prompt_pooled(prompt)
    if not cfg:
        return embeds, pooled
    if negative_prompt == "" and engine.force_zeros_for_empty_prompt:
        neg, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    else:
        neg, neg_pooled = engine.encode_prompt_pooled(negative_prompt)
    return torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled])


def added_conditioning(pooled: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
    """The UNet's added conditioning for rows of one stream: pooled text embeddings and the time ids
    (original size, crop top-left, target size = the canvas), as the img2img pipeline makes them."""
    ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=pooled.dtype, device=pooled.device)
    return {"text_embeds": pooled, "time_ids": ids.expand(pooled.shape[0], -1)}  # (rows, P), (rows, 6)


# ---------------------------------------------------------------------- the built-in tiny SDXL model
def build_tiny_sdxl_pipeline() -> Any:
    """`--model tiny-sdxl`: a seeded random-weight SDXL pipeline that runs on a CPU (the SDXL code path:
    two text encoders, pooled embeddings, time ids; an AutoencoderKL that downsamples by 8 and asks for
    force_upcast like SDXL's). Shaped for speed, not images: its output is not a picture of anything."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from stream.models.builtin import build_tokenizer

    text = CLIPTextConfig(
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
        hidden_act="gelu",
        projection_dim=32,
    )
    with seeded(0):
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids, then the pooled text
            cross_attention_dim=64,  # both text encoders side by side
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            layers_per_block=1,
            block_out_channels=(4, 8, 8, 8),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            norm_num_groups=4,
            scaling_factor=0.13025,
            force_upcast=True,
        )
        text_encoder = CLIPTextModel(text)
        text_encoder_2 = CLIPTextModelWithProjection(text)
    scheduler = DDIMScheduler(**{**random_configs()["scheduler"]})
    return StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=build_tokenizer(),
        tokenizer_2=build_tokenizer(),
        unet=unet.eval(),
        scheduler=scheduler,
    )


# ---------------------------------------------------------------------- full-size random architecture
def random_configs() -> dict[str, dict[str, Any]]:
    """SDXL-Turbo's UNet, VAE, both text encoders and scheduler configs (full size, for speed only)."""
    unet = {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10),
        "attention_head_dim": (5, 10, 20),
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
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
        "scaling_factor": 0.13025,
        "force_upcast": True,
    }
    text = {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
    }
    text_2 = {
        "vocab_size": 49408,
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 20,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "projection_dim": 1280,
    }
    scheduler = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "epsilon",
        "timestep_spacing": "trailing",
    }
    return {"unet": unet, "vae": vae, "text_encoder": text, "text_encoder_2": text_2, "scheduler": scheduler}


def build_random(device: torch.device, dtype: torch.dtype) -> Components:
    """random:sdxl-turbo: SDXL-Turbo's full-size architecture with seeded random weights, on `device`."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from stream.models.builtin import build_tokenizer

    configs = random_configs()
    logger.info("building random:sdxl-turbo (full-size architecture, random weights) on %s", device)
    with seeded(0), device:
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
    scheduler = DDIMScheduler(**configs["scheduler"])
    return Components(
        unet=unet.to(dtype),
        vae=vae.to(dtype),
        text_encoder=text_encoder.to(dtype),
        tokenizer=build_tokenizer(),
        scheduler_config=dict(scheduler.config),
        name="random:sdxl-turbo (random weights, for speed only)",
        placeholder=True,
        family="sdxl",
        text_encoder_2=text_encoder_2.to(dtype),
        tokenizer_2=build_tokenizer(),
        force_zeros_for_empty_prompt=True,
    )
