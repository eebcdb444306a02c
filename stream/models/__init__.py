"""Model loading: `load_model(config)` resolves `--model` and `--vae` to loaded components.

`tiny` and `random:<arch>` are built here (models/builtin.py); hub ids, folders, single files and
`auto` go through diffusers (models/hub.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from stream.config import StreamConfig
from stream.devices import resolve_device, resolve_dtype
from stream.models.base import (
    DEFAULT_MODEL,
    PLACEHOLDER_NOTE,
    RANDOM_ARCHS,
    SINGLE_FILE_SUFFIXES,
    TAESD_MODEL,
    TINY_MODEL_VERSION,
    Components,
    ModelError,
)
from stream.models.builtin import (
    build_random,
    build_tiny_pipeline,
    build_tokenizer,
    cache_dir,
    ensure_tiny_model,
    random_arch_configs,
)
from stream.models.controlnet import load_controlnet
from stream.models.hub import load_auto, load_pipeline, load_single_file, load_vae, quiet_libraries
from stream.models.lora import load_loras
from stream.models.sdxl import TINY_SDXL_VERSION, build_tiny_sdxl_pipeline

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL",
    "PLACEHOLDER_NOTE",
    "RANDOM_ARCHS",
    "SINGLE_FILE_SUFFIXES",
    "TAESD_MODEL",
    "TINY_MODEL_VERSION",
    "Components",
    "ModelError",
    "build_random",
    "build_tiny_pipeline",
    "build_tokenizer",
    "cache_dir",
    "ensure_tiny_model",
    "load_components",
    "load_model",
    "load_vae",
    "random_arch_configs",
]


def load_model(config: StreamConfig) -> Components:
    """The components for config.model and config.vae, on the config's device and dtype.

    One set can serve several StreamDenoisers (one per stream), each with its own settings and state.
    """
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    components = load_components(config.model, device, dtype)
    components.vae = load_vae(config.vae, components, device, dtype)
    if config.controlnet:
        components.controlnet = load_controlnet(config.controlnet, components, dtype)
    if config.lora:
        components.lora = load_loras(config.lora, components, config.lora_scale)
    logger.info("loaded %s on %s (%s)", components.name, device, str(dtype).removeprefix("torch."))
    if components.placeholder and config.model != "auto":  # `auto` said so already, with the reason
        logger.warning("running the %s", PLACEHOLDER_NOTE)
    return components


def load_components(model: str, device: torch.device, dtype: torch.dtype) -> Components:
    """Resolve `model` to components: tiny, random:<arch>, auto, a local folder/file, or a hub id."""
    quiet_libraries()
    if model == "tiny":
        return load_pipeline(str(ensure_tiny_model()), dtype, name="tiny (built-in)", placeholder=True)
    if model == "tiny-sdxl":
        folder = str(ensure_tiny_model(TINY_SDXL_VERSION, build_tiny_sdxl_pipeline))
        return load_pipeline(folder, dtype, name="tiny-sdxl (built-in)", placeholder=True)
    if model.startswith("random:"):
        return build_random(model.removeprefix("random:"), device, dtype)
    if model == "auto":
        return load_auto(dtype)
    path = Path(model).expanduser()
    if path.is_file():
        return load_single_file(path, dtype)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(
                f"model folder '{model}' has no model_index.json: give a diffusers pipeline folder "
                "(as written by save_pretrained), a single .safetensors/.ckpt file, or a hub id"
            )
        return load_pipeline(str(path), dtype, name=str(path))
    if model.startswith((".", "/", "~")) or path.suffix in SINGLE_FILE_SUFFIXES or model.count("/") > 1:
        raise ModelError(
            f"model path '{model}' does not exist; give an existing folder or file, a hub id such as "
            f"{DEFAULT_MODEL}, or `tiny`"
        )
    return load_pipeline(model, dtype, name=model)
