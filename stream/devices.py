"""Device, dtype and attention choices, made once per process."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

from stream.config import ConfigError, StreamConfig

logger = logging.getLogger(__name__)

_cpu_convolutions: bool | None = None  # oneDNN (True) or PyTorch's own, once chosen for the process
_cpu_lock = threading.Lock()


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


def choose_cpu_convolutions(time_call: Callable[[StreamConfig, int], float], config: StreamConfig) -> bool:
    """oneDNN or PyTorch's own CPU convolutions, whichever runs the first model's UNet faster (small
    models differ), chosen once per process and set process-wide: never flipped around a frame, so every
    stream of the process computes the same way. `time_call(config, repeat)` times UNet calls."""
    global _cpu_convolutions
    with _cpu_lock:
        if _cpu_convolutions is None:
            _cpu_convolutions = _measure_cpu_convolutions(time_call, config)
            torch._C._set_mkldnn_enabled(_cpu_convolutions)
        return _cpu_convolutions


def cpu_convolutions() -> str | None:
    """The CPU convolution backend this process chose ("oneDNN" or "native"), None before any model ran."""
    return None if _cpu_convolutions is None else ("oneDNN" if _cpu_convolutions else "native")


def _measure_cpu_convolutions(time_call: Callable[[StreamConfig, int], float], config: StreamConfig) -> bool:
    previous = torch._C._get_mkldnn_enabled()
    try:
        torch._C._set_mkldnn_enabled(True)
        time_call(config, 1)  # the first call allocates
        if time_call(config, 1) > 0.2:  # a large model: oneDNN is the better choice, and timing it is slow
            return True
        onednn = time_call(config, 3)
        torch._C._set_mkldnn_enabled(False)
        native = time_call(config, 4)
    finally:
        torch._C._set_mkldnn_enabled(previous)
    logger.debug("CPU convolutions: oneDNN %.1f ms, native %.1f ms per UNet call", onednn * 1e3, native * 1e3)
    return onednn <= native
