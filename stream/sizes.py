"""Model sizes: the multiple a model's width and height must be (its autoencoder's downsampling), known
before loading when the model says so up front; the nearest valid sizes; the sizes the page offers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stream.config import MAX_SIDE, ConfigError

MIN_SIDE = 64  # StreamConfig's smallest side
SD_MULTIPLE = 8  # every SD 1.x / 2.x / XL autoencoder downsamples by 8
# Square sizes the page offers, where the model takes them (multiples of 64: every UNet level halves cleanly).
COMMON_SIDES = (128, 192, 256, 320, 384, 448, 512, 576, 640, 768, 1024)


def vae_multiple(vae_config: Mapping[str, Any]) -> int:
    """Pixels per latent pixel of an autoencoder (AutoencoderKL or AutoencoderTiny), from its config."""
    blocks = vae_config.get("encoder_block_out_channels") or vae_config.get("block_out_channels") or (0,) * 4
    return int(2 ** (len(blocks) - 1))


def components_multiple(components: Any) -> int:
    """The size multiple of loaded components: what their autoencoder downsamples by."""
    return vae_multiple(dict(components.vae.config))


def native_side(components: Any) -> int:
    """The side the model was trained at (512 for SD 1.x / sd-turbo): the UNet's sample size in pixels."""
    sample = components.unet.config.sample_size
    side = max(sample) if isinstance(sample, (list, tuple)) else int(sample)
    return side * components_multiple(components)


def known_multiple(model: str, vae: str) -> tuple[int, str] | None:
    """(multiple, the model's name in words) when it is known without loading anything, else None.

    Known: the built-in models, a local diffusers folder, a single-file checkpoint, a hub id in the local
    cache. `auto` is not known up front (sd-turbo when it loads, else the built-in tiny model).
    """
    from stream.models.builtin import TINY_SIZE_MULTIPLE

    if vae == "tiny":
        return SD_MULTIPLE, "a TAESD autoencoder (--vae tiny)"
    if vae != "auto":
        found = _folder_multiple(Path(vae).expanduser(), "config.json")
        return (found, f"the autoencoder {vae}") if found else None
    if model == "tiny":
        return TINY_SIZE_MULTIPLE, "the built-in tiny model"
    if model.startswith("random:"):
        return SD_MULTIPLE, f"{model} (an SD architecture)"
    if model == "auto":
        return None
    path = Path(model).expanduser()
    if path.is_file():
        return SD_MULTIPLE, "an SD 1.x/2.x checkpoint"
    found = _folder_multiple(path, "vae/config.json") if path.is_dir() else _cached_multiple(model)
    return (found, f"the model {model}") if found else None


def nearest(value: int, multiple: int) -> list[int]:
    """The valid sides closest to `value`: the multiples of `multiple` just below and above it."""
    low = max(value // multiple * multiple, -(-MIN_SIDE // multiple) * multiple)
    high = min(-(-value // multiple) * multiple, MAX_SIDE // multiple * multiple)
    return sorted({side for side in (low, high) if MIN_SIDE <= side <= MAX_SIDE and side != value})


def check_sides(sides: Mapping[str, int], multiple: int, who: str, flag: bool = True) -> None:
    """Refuse a width or height that `who` cannot take, naming the nearest valid ones."""
    for name, value in sides.items():
        if isinstance(value, int) and not isinstance(value, bool) and value % multiple:
            options = " or ".join(str(v) for v in nearest(value, multiple))
            label = f"--{name} {value}" if flag else f"{name} {value}"
            raise ConfigError(
                f"{label} does not fit {who} (sizes must be multiples of {multiple}); nearest: {options}"
            )


def allowed_sizes(multiple: int, native: int, configured: tuple[int, int]) -> list[tuple[int, int]]:
    """The sizes offered in the page: common squares the model takes, up to its native side (or the
    configured size when that is larger), and the configured size itself; smallest first."""
    largest = max(native, *configured)
    sizes = {(s, s) for s in COMMON_SIDES if s % multiple == 0 and s <= largest}
    sizes.add(configured)
    return sorted(sizes, key=lambda wh: (wh[0] * wh[1], wh))


def _folder_multiple(path: Path, name: str) -> int | None:
    try:
        return vae_multiple(json.loads((path / name).read_text()))
    except (OSError, ValueError, AttributeError):
        return None


def _cached_multiple(repo: str) -> int | None:
    """From the Hugging Face cache only (never the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, "vae/config.json")
    except Exception:  # not a valid repo id, no cache: unknown up front
        return None
    return _folder_multiple(Path(found).parent, Path(found).name) if isinstance(found, str) else None
