"""What a loaded model is, and the errors and names every loader shares."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_MODEL = "stabilityai/sd-turbo"  # what `auto` loads when it is cached or can be downloaded
TAESD_MODEL = "madebyollin/taesd"  # real TAESD weights for `--vae tiny` on a real SD 1.x/2.x model
TINY_MODEL_VERSION = "tiny-v1"
RANDOM_ARCHS = ("sd-turbo", "sd15", "sdxl-turbo")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")

PLACEHOLDER_NOTE = "built-in tiny model with random weights: the output is not a picture of anything"


class ModelError(ValueError):
    """A model could not be found or loaded; the message says what was tried and what to do."""


@dataclass
class Components:
    """The parts of an SD-family pipeline the stream uses."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]
    name: str  # what was loaded, for logs and the page
    placeholder: bool = False  # random weights: output is not an image of anything
    # SDXL (models/sdxl.py): the second text encoder with its pooled projection
    family: str = "sd"  # `sd` (SD 1.x/2.x) or `sdxl`
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = False  # SDXL: an empty negative prompt is zero embeddings
    # ControlNet and LoRA (control.py, models/lora.py)
    controlnet: Any = None
    lora: Any = None  # the fused LoRAs (models.lora.FusedLoras), whose scale can change live


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
