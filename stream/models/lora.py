"""LoRA (`--lora SOURCE[:SCALE]`, repeatable): loaded through diffusers' own LoRA loading (peft), fused
into the UNet and text encoder(s) for speed; the overall scale can change live (re-fused between frames).

A LoRA that does not fit the model (another family, other layer names or sizes) is refused in one line.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
import threading
from pathlib import Path
from typing import Any

from stream.models.base import Components, ModelError, first_line
from stream.models.sdxl import family_words

logger = logging.getLogger(__name__)

# What diffusers / peft say when a LoRA's layers do not fit the model's
MISMATCH_WORDS = ("size mismatch", "state_dict", "target modules", "Target modules", "shape")


def parse_lora(text: str) -> tuple[str, float]:
    """`SOURCE[:SCALE]` -> (source, scale); the scale is 1 when not given. A colon inside the source (a
    Windows drive) is kept: only a number after the last colon is a scale."""
    source, sep, tail = text.rpartition(":")
    if sep and source:
        try:
            scale = float(tail)
        except ValueError:
            return text, 1.0
        if not math.isfinite(scale):
            raise ValueError(f"LoRA scale must be a finite number, got {tail!r} in {text!r}")
        return source, scale
    return text, 1.0


class FusedLoras:
    """LoRAs fused into a model's modules; `set_scale` re-fuses them at a new overall scale."""

    def __init__(
        self, pipe: Any, names: list[str], weights: list[float], components: list[str], scale: float
    ) -> None:
        self._pipe, self.names, self.weights, self.components = pipe, names, weights, components
        self.scale = scale
        self._lock = threading.Lock()
        self._fuse(scale)

    def _fuse(self, scale: float) -> None:
        # Each adapter's weight set absolutely (fuse_lora's own lora_scale sticks to the layers: a fuse at
        # 0 could never come back), then merged into the base weights.
        self._pipe.set_adapters(self.names, adapter_weights=[w * scale for w in self.weights])
        self._pipe.fuse_lora(components=self.components, lora_scale=1.0, adapter_names=self.names)

    def set_scale(self, scale: float) -> bool:
        """Re-fuse at `scale` (unfuse, fuse); False when it already is. The caller runs this between
        frames and then forgets cached prompt embeddings (a text encoder LoRA changes them)."""
        with self._lock:
            if scale == self.scale:
                return False
            self._pipe.unfuse_lora(components=self.components)
            self._fuse(scale)
            self.scale = scale
            return True


def load_loras(specs: tuple[str, ...], components: Components, scale: float) -> FusedLoras | None:
    """Load every `SOURCE[:SCALE]` into the components' modules (in place) and fuse them at `scale`."""
    if not specs:
        return None
    if importlib.util.find_spec("peft") is None:
        raise ModelError("--lora needs the peft package: pip install peft (or the `lora` extra)")
    pipe = _pipeline(components)
    names: list[str] = []
    weights: list[float] = []
    for i, spec in enumerate(specs):
        source, weight = parse_lora(spec)
        name = f"lora{i}"
        _load_one(pipe, source, name, components)
        names.append(name)
        weights.append(weight)
    adapters = pipe.get_list_adapters()
    targets = [
        c for c in ("unet", "text_encoder", "text_encoder_2") if any(n in adapters.get(c, []) for n in names)
    ]
    logger.info("fused %d LoRA(s) into %s at scale %g", len(names), ", ".join(targets), scale)
    return FusedLoras(pipe, names, weights, targets, scale)


def _load_one(pipe: Any, source: str, name: str, components: Components) -> None:
    path = Path(source).expanduser()
    where, kwargs = source, {}
    if path.is_file():
        where, kwargs = str(path.parent), {"weight_name": path.name}
    elif path.is_dir():
        where = str(path)
    elif source.startswith((".", "/", "~")) or path.suffix == ".safetensors":
        raise ModelError(f"LoRA '{source}' does not exist; give a .safetensors file, a folder or a hub id")
    import diffusers

    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity(logging.CRITICAL)  # its multi-line error: ours says it in one
    try:
        pipe.load_lora_weights(where, adapter_name=name, **kwargs)
    except Exception as exc:
        if not any(words in str(exc) for words in MISMATCH_WORDS):  # not found, not readable, offline...
            from stream.models.hub import why_not_loaded

            raise ModelError(
                f"could not load LoRA '{source}': it {why_not_loaded(source, exc)}. Give a .safetensors "
                "file, a folder or a cached hub id"
            ) from exc
        raise ModelError(
            f"LoRA '{source}' does not match the model {components.name}, which is "
            f"{family_words(components)}: {_mismatch(exc)}. Give a LoRA trained for this model's family"
        ) from exc
    finally:
        diffusers.utils.logging.set_verbosity(level)
    adapters = pipe.get_list_adapters()
    if not any(name in names for names in adapters.values()):
        raise ModelError(
            f"LoRA '{source}' has no layer this model has (the model is {family_words(components)}); "
            "give a LoRA trained for this model's family"
        )


def _mismatch(exc: BaseException) -> str:
    """The first layer whose shape differs, in a few words, else the error's first line."""
    found = re.search(
        r"size mismatch for (\S+): copying a param with shape torch.Size\(\[([^\]]*)\]\) from checkpoint, "
        r"the shape in current model is torch.Size\(\[([^\]]*)\]\)",
        str(exc),
    )
    if found is None:
        return first_line(exc)
    layer, theirs, ours = found.groups()
    return f"its layer {layer} is [{theirs}] where the model's is [{ours}]"


def _pipeline(components: Components) -> Any:
    """A diffusers pipeline around the components' own modules (for its LoRA loading methods)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DDIMScheduler.from_config(components.scheduler_config)
    if components.family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=components.vae,
            text_encoder=components.text_encoder,
            text_encoder_2=components.text_encoder_2,
            tokenizer=components.tokenizer,
            tokenizer_2=components.tokenizer_2,
            unet=components.unet,
            scheduler=scheduler,
        )
    return StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
