"""The batched model calls: encode a batch of frames, run one UNet call over a batch of rows, decode a batch.

One `Engine` per loaded model and device, shared by every stream of the process (`Engine.shared`): the
modules are moved, their attention backend set and the CPU convolution backend chosen once, not per
stream. A batch of rows may come from several streams: each row has its own timestep, its own prompt
embeddings and its own guidance embedding, so the per-stream settings stay per stream while the model
runs one call. The only module besides models/ that calls diffusers' modules.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict
from typing import Any

import torch

from stream.config import ConfigError, StreamConfig
from stream.devices import choose_cpu_convolutions, resolve_device, resolve_dtype, set_attention
from stream.models import Components

logger = logging.getLogger(__name__)

PROMPT_CACHE = 32  # prompt embeddings kept per engine (sessions often share prompts)

_engines: weakref.WeakKeyDictionary[Any, dict[tuple[str, str, str], Engine]] = weakref.WeakKeyDictionary()
_engines_lock = threading.Lock()


class Engine:
    """A loaded model's UNet, VAE and text encoder on one device, called on batches."""

    def __init__(
        self, components: Components, device: torch.device, dtype: torch.dtype, attention: str
    ) -> None:
        self.device, self.dtype = device, dtype
        self.name, self.placeholder = components.name, components.placeholder
        self.unet = components.unet.to(device, dtype).eval()
        self.vae = components.vae.to(device, dtype).eval()
        self.text_encoder = components.text_encoder.to(device, dtype).eval()
        self.tokenizer = components.tokenizer
        self.scheduler_config = dict(components.scheduler_config)
        self.scaling_factor = float(getattr(self.vae.config, "scaling_factor", 1.0))
        blocks = (
            getattr(self.vae.config, "encoder_block_out_channels", None) or self.vae.config.block_out_channels
        )
        self.vae_factor = 2 ** (len(blocks) - 1)  # pixels per latent pixel
        self.latent_channels = int(self.unet.config.in_channels)
        self.time_cond_dim: int | None = self.unet.config.time_cond_proj_dim  # guidance-distilled UNets (LCM)
        self.alphas_cumprod = _alphas_cumprod(self.scheduler_config)
        self.calls = 0  # UNet calls so far (benchmarks count them per round)
        self._prompts: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._tokens: OrderedDict[str, Any] = OrderedDict()
        self._tokens_lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        set_attention(self.unet, self.vae, attention)

    @classmethod
    def shared(cls, components: Components, config: StreamConfig) -> Engine:
        """The process's engine for these components on config's device, dtype and attention."""
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        key = (str(device), str(dtype), config.attention)
        with _engines_lock:
            engines = _engines.setdefault(components.unet, {})
            engine = engines.get(key)
            if engine is None:
                engine = engines[key] = cls(components, device, dtype, config.attention)
                if device.type == "cpu":
                    choose_cpu_convolutions(engine.time_unet_call, config)
        return engine

    # ------------------------------------------------------------------ the three batched calls
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f) scaled latents (AutoencoderKL: its mode, no draw)."""
        out = self.vae.encode(images)
        latent = out.latents if hasattr(out, "latents") else out.latent_dist.mode()
        return latent * self.scaling_factor

    def run_unet(
        self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, timestep_cond: torch.Tensor | None
    ) -> torch.Tensor:
        """One UNet call over B rows: x (B, C, h, w), t (B,) one timestep a row, embeds (B, L, D),
        timestep_cond (B, dim) or None. Rows are independent: any mix of streams and CFG halves."""
        self.calls += 1
        return self.unet(x, t, encoder_hidden_states=embeds, timestep_cond=timestep_cond, return_dict=False)[
            0
        ]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) scaled latents -> (B, 3, H, W) images in [0, 1].

        On a CPU the rows are decoded one by one: the decoder's full-resolution convolutions run slower
        in a batch there (measured on a 2-core machine, tiny model, 4 rows of 256x256: 42-52 ms batched
        against 26-37 ms one by one). On a GPU the batch is one call."""
        rows = latents.split(1) if self.device.type == "cpu" else [latents]
        image = torch.cat([self.vae.decode(r / self.scaling_factor, return_dict=False)[0] for r in rows])
        return (image / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------ prompts
    def tokenize(self, prompt: str) -> Any:
        """Text -> token ids and mask, as diffusers' SD pipelines tokenize. CPU only and safe on any
        thread: the server tokenizes a new prompt off the model thread, which then finds it cached."""
        with self._tokens_lock:
            cached = self._tokens.get(prompt)
        if cached is not None:
            return cached
        with self._tokenizer_lock:  # a fast tokenizer is not safe to call from two threads at once
            tokens = self.tokenizer(
                prompt,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
        with self._tokens_lock:
            self._tokens[prompt] = tokens
            while len(self._tokens) > PROMPT_CACHE:
                self._tokens.popitem(last=False)
        return tokens

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Text -> (1, L, D) embeddings; the last few prompts are cached (sessions often share them)."""
        cached = self._prompts.get(prompt)
        if cached is not None:
            self._prompts.move_to_end(prompt)
            return cached
        tokens = self.tokenize(prompt)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        with torch.inference_mode():
            embeds = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0].to(
                self.dtype
            )
        self._prompts[prompt] = embeds
        while len(self._prompts) > PROMPT_CACHE:
            self._prompts.popitem(last=False)
        return embeds

    # ------------------------------------------------------------------ checks and measurements
    def check_size(self, width: int, height: int) -> None:
        f = self.vae_factor
        if width % f or height % f:
            raise ConfigError(
                f"this model's autoencoder needs width and height that are multiples of {f}, "
                f"got {width}x{height}"
            )

    def time_unet_call(self, config: StreamConfig, repeat: int) -> float:
        """Best wall-clock seconds of `repeat` UNet calls at config's size (CFG rows included)."""
        rows = 2 if config.cfg and self.time_cond_dim is None else 1
        h, w = config.height // self.vae_factor, config.width // self.vae_factor
        x = torch.zeros(rows, self.latent_channels, h, w, device=self.device, dtype=self.dtype)
        embeds = self.encode_prompt("").expand(rows, -1, -1)
        t = torch.full((rows,), 500, device=self.device, dtype=torch.long)
        cond = None
        if self.time_cond_dim is not None:
            cond = torch.zeros(rows, self.time_cond_dim, device=self.device, dtype=self.dtype)
        best = float("inf")
        with torch.inference_mode():
            for _ in range(repeat):
                start = time.perf_counter()
                self.unet(x, t, encoder_hidden_states=embeds, timestep_cond=cond, return_dict=False)
                best = min(best, time.perf_counter() - start)
        return best


def _alphas_cumprod(scheduler_config: dict[str, Any]) -> torch.Tensor:
    """alpha_cumprod over the training timesteps, from the model's own scheduler config."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler_config).alphas_cumprod.float()  # (T,)
