"""Device, dtype and attention choices, made once per process."""

from __future__ import annotations

from typing import Any

import torch

from stream.config import ConfigError


def release_device_memory() -> None:
    """Return cached GPU memory to the driver (after a stream's tensors have been dropped)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but CUDA is not available here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' was asked for but is not available here; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def set_attention(unet: Any, vae: Any, backend: str) -> None:
    """PyTorch SDPA (default) or xformers' memory-efficient attention on the UNet and VAE."""
    if backend == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                "attention 'xformers' needs the xformers package: pip install 'stream[cuda]', "
                "or use --attention sdpa"
            ) from exc
        unet.enable_xformers_memory_efficient_attention()
        if hasattr(vae, "enable_xformers_memory_efficient_attention"):
            vae.enable_xformers_memory_efficient_attention()
        return
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
