"""Loading a ControlNet (`--controlnet`): a folder or hub id, a single file, or `random` (one shaped
like the loaded UNet, random weights, for speed), checked against the model's family."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from stream.models.base import SINGLE_FILE_SUFFIXES, Components, ModelError, seeded
from stream.models.sdxl import family_words, unet_family_words

logger = logging.getLogger(__name__)


def load_controlnet(spec: str, components: Components, dtype: torch.dtype) -> Any:
    """The ControlNet `spec` names, refused in one line when it belongs to another model family."""
    from diffusers import ControlNetModel

    if spec == "random":
        return random_controlnet(components)
    path = Path(spec).expanduser()
    try:
        if path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
            controlnet = ControlNetModel.from_single_file(str(path), dtype=dtype)
        else:
            controlnet = ControlNetModel.from_pretrained(spec, dtype=dtype)
    except Exception as exc:
        from stream.models.hub import why_not_loaded

        raise ModelError(
            f"could not load controlnet '{spec}': it {why_not_loaded(spec, exc)}. Give a ControlNetModel "
            "folder (with config.json), a cached hub id such as lllyasviel/sd-controlnet-canny, or `random`"
        ) from exc
    check_family(controlnet, components, spec)
    return controlnet


def check_family(controlnet: Any, components: Components, spec: str) -> None:
    """A ControlNet works with UNets of its own family: same cross-attention width, same added
    conditioning (SDXL's), same latent channels and a conditioning image at the autoencoder's scale."""
    net, unet = controlnet.config, components.unet.config
    same = (
        int(net.cross_attention_dim) == int(unet.cross_attention_dim)
        and getattr(net, "addition_embed_type", None) == getattr(unet, "addition_embed_type", None)
        and int(net.in_channels) == int(unet.in_channels)
    )
    if not same:
        raise ModelError(
            f"controlnet '{spec}' is for {unet_family_words(net)} but the model is "
            f"{family_words(components)}; give a ControlNet trained for the model's family"
        )
    factor = 2 ** (len(net.conditioning_embedding_out_channels) - 1)
    blocks = getattr(components.vae.config, "encoder_block_out_channels", None)
    vae_factor = 2 ** (len(blocks or components.vae.config.block_out_channels) - 1)
    if factor != vae_factor:
        raise ModelError(
            f"controlnet '{spec}' takes conditioning images at 1/{factor} of the latent scale but the "
            f"model's autoencoder downsamples by {vae_factor}; give a ControlNet made for this model"
        )


def random_controlnet(components: Components) -> Any:
    """A ControlNet shaped like the model's UNet (its weights copied, as ControlNet training starts),
    its zero convolutions (the conditioning image's last one too) given small seeded random weights: for
    speed measurements and tests; its effect is not a trained one."""
    from diffusers import ControlNetModel

    blocks = getattr(components.vae.config, "encoder_block_out_channels", None)
    levels = int(math.log2(2 ** (len(blocks or components.vae.config.block_out_channels) - 1)))
    channels = tuple(16 * 2**i for i in range(levels + 1))  # one stride-2 level per autoencoder level
    with seeded(0):
        controlnet = ControlNetModel.from_unet(components.unet, conditioning_embedding_out_channels=channels)
        with torch.no_grad():
            # variance-keeping init in the conditioning image's embedding, so that the image (not only
            # the latent) changes the output, as in the built-in tiny model's autoencoder
            embedding = controlnet.controlnet_cond_embedding
            for conv in embedding.modules():
                if isinstance(conv, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            torch.nn.init.normal_(embedding.conv_out.weight, std=0.1)
            for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
                torch.nn.init.normal_(conv.weight, std=0.02)
    return controlnet.to(components.unet.dtype).eval()
