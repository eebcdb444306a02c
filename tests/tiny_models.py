"""Tiny random SDXL / SD / ControlNet components, built as diffusers' own pipeline tests build them."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from stream.models import build_tokenizer


def scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def text_config(**changes: Any) -> CLIPTextConfig:
    values: dict[str, Any] = {
        "bos_token_id": 0,
        "eos_token_id": 2,
        "hidden_size": 32,
        "intermediate_size": 37,
        "layer_norm_eps": 1e-05,
        "num_attention_heads": 4,
        "num_hidden_layers": 5,
        "pad_token_id": 1,
        "vocab_size": 1000,
        "hidden_act": "gelu",
        "projection_dim": 32,
    }
    values.update(changes)
    return CLIPTextConfig(**values)


def vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        sample_size=64,
    ).eval()


def sdxl_pipeline() -> StableDiffusionXLPipeline:
    """A tiny SDXL pipeline: text_time added conditioning, two text encoders (the second projected)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + 32 pooled
        cross_attention_dim=64,  # 32 + 32: both encoders side by side
    ).eval()
    torch.manual_seed(0)
    autoencoder = vae()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(text_config()).eval()
    text_encoder_2 = CLIPTextModelWithProjection(text_config()).eval()
    return StableDiffusionXLPipeline(
        vae=autoencoder,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=build_tokenizer(),
        tokenizer_2=build_tokenizer(),
        unet=unet,
        scheduler=scheduler(),
    )


def sd_unet(cross_attention_dim: int = 32) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=8,
    ).eval()


def sd_pipeline() -> StableDiffusionPipeline:
    """A tiny SD pipeline with an AutoencoderKL (downsamples by 2) and a 5-layer CLIP text encoder."""
    unet = sd_unet()
    torch.manual_seed(0)
    autoencoder = vae()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(text_config()).eval()
    return StableDiffusionPipeline(
        vae=autoencoder,
        text_encoder=text_encoder,
        tokenizer=build_tokenizer(),
        unet=unet,
        scheduler=scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def controlnet(cross_attention_dim: int = 32) -> ControlNetModel:
    """A tiny ControlNet for sd_pipeline()'s UNet (its conditioning embedding downsamples by 2)."""
    torch.manual_seed(0)
    net = ControlNetModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        in_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        cross_attention_dim=cross_attention_dim,
        conditioning_embedding_out_channels=(16, 32),
        norm_num_groups=8,
    )
    # diffusers' tests give the zero convolutions weights, so that the ControlNet changes the output
    with torch.no_grad():
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            torch.nn.init.normal_(conv.weight, std=0.1)
    return net.eval()
