"""Loading a model: a hub id, a local diffusers folder, a single-file checkpoint, or `auto`."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from stream.models.base import (
    DEFAULT_MODEL,
    SINGLE_FILE_SUFFIXES,
    TAESD_MODEL,
    Components,
    ModelError,
    first_line,
    seeded,
)
from stream.models.builtin import ensure_tiny_model
from stream.models.sdxl import TAESDXL_MODEL, checkpoint_family, family_of, pipeline_class

logger = logging.getLogger(__name__)


def load_auto(dtype: torch.dtype) -> Components:
    reason: BaseException | None = None
    for local_only in (True, False):
        if not local_only and os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
            break
        try:
            return load_pipeline(DEFAULT_MODEL, dtype, name=DEFAULT_MODEL, local_files_only=local_only)
        except ModelError as exc:
            reason = exc.__cause__ or exc
    why = why_not_loaded(DEFAULT_MODEL, reason) if reason is not None else "is not available"
    logger.warning(
        "model auto: %s %s; running the built-in tiny model instead (random weights: the output is not a "
        "picture of anything). For real output: connect to the network once to download it, set HF_HOME to "
        "a cache that has it, or pass --model with a local folder",
        DEFAULT_MODEL,
        why,
    )
    return load_pipeline(
        str(ensure_tiny_model()), dtype, name="tiny (built-in, auto fallback)", placeholder=True
    )


def why_not_loaded(source: str, exc: BaseException) -> str:
    """Why `source` did not load, in a few words (what follows the model's name in a sentence)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    chain = _causes(exc)
    text = " ".join(str(e) for e in chain)
    if any(isinstance(e, GatedRepoError) for e in chain):
        return "is gated: accept its license on huggingface.co, then log in with `hf auth login`"
    if any(isinstance(e, RepositoryNotFoundError) for e in chain) or "not a valid model identifier" in text:
        return "is not a model on huggingface.co (check the id; a private one needs `hf auth login`)"
    if any(isinstance(e, HFValidationError) for e in chain):
        return "is not a hub id (owner/name), nor an existing folder or file"
    if "model_index.json" in text:
        return "is not a diffusers pipeline (it has no model_index.json)"
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    unreachable = (
        offline
        or any(isinstance(e, (ConnectionError, TimeoutError)) for e in chain)
        or any(type(e).__name__ in ("ConnectError", "ConnectTimeout", "gaierror") for e in chain)
    )
    if unreachable or "outgoing traffic has been disabled" in text or "not fully cached" in text:
        where = "HF_HUB_OFFLINE is set" if offline else "huggingface.co could not be reached"
        return f"is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {where}"
    return f"could not be loaded: {first_line(exc)}"


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and what caused it, outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def load_pipeline(
    source: str, dtype: torch.dtype, name: str, placeholder: bool = False, local_files_only: bool = False
) -> Components:
    class_name = _pipeline_class_name(source, local_files_only)
    family = "sd" if class_name is None else family_of(class_name, source)
    try:
        pipe = pipeline_class(family).from_pretrained(
            source, dtype=dtype, local_files_only=local_files_only, **_no_safety_checker(family)
        )
    except Exception as exc:  # diffusers raises OSError, ValueError, HTTP errors... all mean "cannot load"
        raise _not_loaded(source, exc) from exc
    return _from_pipeline(pipe, name, placeholder, family)


def _pipeline_class_name(source: str, local_files_only: bool) -> str | None:
    """model_index.json's `_class_name` (a local folder, the cache, else the hub when allowed); None when
    it cannot be read: the pipeline's own loading then says why."""
    path = Path(source).expanduser()
    try:
        if path.is_dir():
            index = path / "model_index.json"
        else:
            from huggingface_hub import hf_hub_download, try_to_load_from_cache

            cached = try_to_load_from_cache(source, "model_index.json")
            if isinstance(cached, str):
                index = Path(cached)
            elif local_files_only or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
                return None
            else:
                index = Path(hf_hub_download(source, "model_index.json"))
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except Exception:
        return None
    return str(name) if name else None


def _not_loaded(source: str, exc: BaseException) -> ModelError:
    return ModelError(
        f"could not load model '{source}': it {why_not_loaded(source, exc)}. Give a hub id that is "
        "cached or downloadable, a local diffusers folder or .safetensors file, set HF_HOME to a cache "
        "that has it, "
        "or try everything with --model tiny"
    )


def _no_safety_checker(family: str) -> dict[str, Any]:
    if family == "sdxl":  # SDXL pipelines have none
        return {}
    return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def load_single_file(path: Path, dtype: torch.dtype) -> Components:
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise ModelError(
            f"model file '{path}' is not a checkpoint; give a {'/'.join(SINGLE_FILE_SUFFIXES)} file, "
            "a diffusers folder, or a hub id"
        )
    family = _single_file_family(path)
    try:
        kwargs = _no_safety_checker(family)
        kwargs.pop("feature_extractor", None)
        pipe = pipeline_class(family).from_single_file(str(path), dtype=dtype, **kwargs)
    except Exception as exc:
        raise ModelError(
            f"could not load checkpoint '{path}': {first_line(exc)}. It must be an SD 1.x/2.x or SDXL "
            "checkpoint; without network its config must be in the local cache"
        ) from exc
    return _from_pipeline(pipe, str(path), placeholder=False, family=family)


def _single_file_family(path: Path) -> str:
    """SDXL or SD, from a .safetensors file's tensor names (other formats: SD, as before)."""
    if path.suffix != ".safetensors":
        return "sd"
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return checkpoint_family(list(f.keys()))
    except Exception as exc:
        raise ModelError(
            f"could not load checkpoint '{path}': {first_line(exc)}. It must be an SD 1.x/2.x or SDXL "
            ".safetensors checkpoint"
        ) from exc


def _from_pipeline(pipe: Any, name: str, placeholder: bool, family: str = "sd") -> Components:
    if pipe.text_encoder is None or pipe.unet is None:
        raise ModelError(
            f"model '{name}' has no text_encoder or no unet (an SDXL refiner?); give a base SD 1.x/2.x, "
            "SDXL or SDXL-Turbo pipeline"
        )
    return Components(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler_config=dict(pipe.scheduler.config),
        name=name,
        placeholder=placeholder,
        family=family,
        text_encoder_2=getattr(pipe, "text_encoder_2", None),
        tokenizer_2=getattr(pipe, "tokenizer_2", None),
        force_zeros_for_empty_prompt=bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False)),
    )


def load_vae(spec: str, components: Components, device: torch.device, dtype: torch.dtype) -> Any:
    """`auto` keeps the model's own VAE; `tiny` is a TAESD-shaped AutoencoderTiny (TAESDXL for SDXL); else a
    path or hub id (e.g. an fp16-safe SDXL VAE)."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    if spec == "auto":
        return components.vae
    if spec == "tiny" and components.placeholder:
        with seeded(0):
            return AutoencoderTiny()  # TAESD shape, random weights, like the model itself
    taesd = TAESDXL_MODEL if components.family == "sdxl" else TAESD_MODEL
    source = taesd if spec == "tiny" else spec
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
