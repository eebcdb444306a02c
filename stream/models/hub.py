"""Loading a model: a hub id, a local diffusers folder, a single-file checkpoint, or `auto`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from stream.models.base import (
    DEFAULT_MODEL,
    PLACEHOLDER_NOTE,
    SINGLE_FILE_SUFFIXES,
    TAESD_MODEL,
    Components,
    ModelError,
    first_line,
    seeded,
)
from stream.models.builtin import ensure_tiny_model

logger = logging.getLogger(__name__)


def load_auto(dtype: torch.dtype) -> Components:
    reason: Exception | None = None
    for local_only in (True, False):
        if not local_only and os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
            break
        try:
            return load_pipeline(DEFAULT_MODEL, dtype, name=DEFAULT_MODEL, local_files_only=local_only)
        except ModelError as exc:
            reason = exc
    logger.warning(
        "model auto: %s is not cached and could not be downloaded (%s); falling back to the %s",
        DEFAULT_MODEL,
        reason,
        PLACEHOLDER_NOTE,
    )
    return load_pipeline(
        str(ensure_tiny_model()), dtype, name="tiny (built-in, auto fallback)", placeholder=True
    )


def load_pipeline(
    source: str, dtype: torch.dtype, name: str, placeholder: bool = False, local_files_only: bool = False
) -> Components:
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source,
            dtype=dtype,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            local_files_only=local_files_only,
        )
    except Exception as exc:  # diffusers raises OSError, ValueError, HTTP errors... all mean "cannot load"
        raise ModelError(
            f"could not load model '{source}': {first_line(exc)}. Check the hub id or path; "
            "without network only cached models load (try --model tiny)"
        ) from exc
    return _from_pipeline(pipe, name, placeholder)


def load_single_file(path: Path, dtype: torch.dtype) -> Components:
    from diffusers import StableDiffusionPipeline

    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise ModelError(
            f"model file '{path}' is not a checkpoint; give a {'/'.join(SINGLE_FILE_SUFFIXES)} file, "
            "a diffusers folder, or a hub id"
        )
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
    except Exception as exc:
        raise ModelError(
            f"could not load checkpoint '{path}': {first_line(exc)}. It must be an SD 1.x/2.x "
            "checkpoint; without network its config must be in the local cache"
        ) from exc
    return _from_pipeline(pipe, str(path), placeholder=False)


def _from_pipeline(pipe: Any, name: str, placeholder: bool) -> Components:
    return Components(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler_config=dict(pipe.scheduler.config),
        name=name,
        placeholder=placeholder,
    )


def load_vae(spec: str, components: Components, device: torch.device, dtype: torch.dtype) -> Any:
    """`auto` keeps the model's own VAE; `tiny` is a TAESD-shaped AutoencoderTiny; else a path or hub id."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    if spec == "auto":
        return components.vae
    if spec == "tiny" and components.placeholder:
        with seeded(0):
            return AutoencoderTiny()  # TAESD shape, random weights, like the model itself
    source = TAESD_MODEL if spec == "tiny" else spec
    errors = []
    for cls in (AutoencoderTiny, AutoencoderKL):
        try:
            return cls.from_pretrained(source, dtype=dtype)
        except Exception as exc:
            errors.append(first_line(exc))
    raise ModelError(
        f"could not load vae '{source}': {errors[-1]}. Use --vae auto (the model's own), or a cached "
        "AutoencoderTiny / AutoencoderKL folder or hub id"
    )


def quiet_libraries() -> None:
    """diffusers/transformers log notes and progress bars per component; our own log says what loaded."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
