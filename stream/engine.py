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

from stream import control
from stream.config import ConfigError, StreamConfig
from stream.devices import choose_cpu_convolutions, resolve_device, resolve_dtype, set_attention
from stream.graphs import GraphRunner, compile_module, use_graphs
from stream.models import Components, sdxl

logger = logging.getLogger(__name__)

PROMPT_CACHE = 32  # prompt embeddings kept per engine (sessions often share prompts)

_engines: weakref.WeakKeyDictionary[Any, dict[tuple[str, ...], Engine]] = weakref.WeakKeyDictionary()
_engines_lock = threading.Lock()


class Engine:
    """A loaded model's UNet, VAE and text encoder on one device, called on batches."""

    def __init__(
        self,
        components: Components,
        device: torch.device,
        dtype: torch.dtype,
        attention: str,
        graphs: bool = False,
        compile_mode: str = "off",
    ) -> None:
        self.device, self.dtype = device, dtype
        self.name, self.placeholder = components.name, components.placeholder
        self.unet = components.unet.to(device, dtype).eval()
        # An autoencoder whose config says force_upcast (SD's AutoencoderKL) overflows in fp16: it runs in
        # fp32, as diffusers' pipelines run it; TAESD (AutoencoderTiny) stays in the model's dtype.
        upcast = dtype == torch.float16 and bool(getattr(components.vae.config, "force_upcast", False))
        self.vae_dtype = torch.float32 if upcast else dtype
        self.vae = components.vae.to(device, self.vae_dtype).eval()
        self.text_encoder = components.text_encoder.to(device, dtype).eval()
        self.tokenizer = components.tokenizer
        # SDXL's second text encoder, a ControlNet, fused LoRAs (models/sdxl.py, control.py, models/lora.py)
        self.family = components.family
        self.force_zeros_for_empty_prompt = components.force_zeros_for_empty_prompt
        self.text_encoder_2 = _on(components.text_encoder_2, device, dtype)
        self.tokenizer_2 = components.tokenizer_2
        self.controlnet = _on(components.controlnet, device, dtype)
        self.lora = components.lora
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
        self._prompts: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self.prompt_version = 0  # bumped when cached embeddings go stale (a LoRA re-fused)
        self._tokens: OrderedDict[str, Any] = OrderedDict()
        self._tokens_lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        set_attention(self.unet, self.vae, attention)
        self._unet_forward = compile_module(self.unet, compile_mode, graphs)
        pool = torch.cuda.graph_pool_handle() if graphs else None  # one pool: the calls never overlap
        self.graph_runners = (
            {
                name: GraphRunner(fn, name, capture=True, pool=pool)
                for name, fn in (("unet", self._unet), ("encode", self._encode), ("decode", self._decode))
            }
            if graphs
            else {}
        )

    @classmethod
    def shared(cls, components: Components, config: StreamConfig) -> Engine:
        """The process's engine for these components on config's device, dtype and attention."""
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        graphs = use_graphs(config.cuda_graphs, device)
        key = (str(device), str(dtype), config.attention, str(graphs), config.compile)
        with _engines_lock:
            engines = _engines.setdefault(components.unet, {})
            engine = engines.get(key)
            if engine is None:
                engine = engines[key] = cls(
                    components, device, dtype, config.attention, graphs=graphs, compile_mode=config.compile
                )
                if device.type == "cpu":
                    choose_cpu_convolutions(engine.time_unet_call, config)
        return engine

    # ------------------------------------------------------------------ the three batched calls
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f) scaled latents (AutoencoderKL: its mode, no draw)."""
        runner = self.graph_runners.get("encode")
        return self._encode(images) if runner is None else runner(images)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        out = self.vae.encode(images.to(self.vae_dtype))
        latent = out.latents if hasattr(out, "latents") else out.latent_dist.mode()
        return (latent * self.scaling_factor).to(self.dtype)

    def run_unet(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        embeds: torch.Tensor,
        timestep_cond: torch.Tensor | None,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One UNet call over B rows: x (B, C, h, w), t (B,) one timestep a row, embeds (B, L, D),
        timestep_cond (B, dim) or None, `extra` rows of SDXL's added conditioning and ControlNet's
        image and scale (control.unet_kwargs). Rows are independent: any mix of streams and CFG halves."""
        self.calls += 1
        runner = self.graph_runners.get("unet")
        if runner is None or extra:  # SDXL's added conditioning and ControlNet rows run eagerly
            return self._unet(x, t, embeds, timestep_cond, extra)
        return runner(x, t, embeds, timestep_cond)

    def _unet(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        embeds: torch.Tensor,
        timestep_cond: torch.Tensor | None,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        kwargs = control.unet_kwargs(self.controlnet, x, t, embeds, timestep_cond, extra) if extra else {}
        out = self._unet_forward(
            x, t, encoder_hidden_states=embeds, timestep_cond=timestep_cond, return_dict=False, **kwargs
        )
        return out[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) scaled latents -> (B, 3, H, W) images in [0, 1].

        On a CPU the rows are decoded one by one: the decoder's full-resolution convolutions run slower
        in a batch there (measured on a 2-core machine, tiny model, 4 rows of 256x256: 42-52 ms batched
        against 26-37 ms one by one). On a GPU the batch is one call."""
        runner = self.graph_runners.get("decode")
        return self._decode(latents) if runner is None else runner(latents)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        rows = latents.split(1) if self.device.type == "cpu" else [latents]
        scaled = [(r / self.scaling_factor).to(self.vae_dtype) for r in rows]
        image = torch.cat([self.vae.decode(r, return_dict=False)[0] for r in scaled])
        return (image.to(self.dtype) / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------ prompts
    def tokenize(self, prompt: str) -> Any:
        """Text -> token ids and mask, as diffusers' SD pipelines tokenize. CPU only and safe on any
        thread: the server tokenizes a new prompt off the model thread, which then finds it cached."""
        with self._tokens_lock:
            cached = self._tokens.get(prompt)
        if cached is not None:
            return cached
        with self._tokenizer_lock:  # a fast tokenizer is not safe to call from two threads at once
            if self.text_encoder_2 is not None:
                tokens = sdxl.tokenize((self.tokenizer, self.tokenizer_2), prompt)
            else:
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
        return self.encode_prompt_pooled(prompt)[0]

    def encode_prompt_pooled(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text -> (1, L, D) embeddings and, for SDXL, (1, P) pooled embeddings (else None); cached."""
        cached = self._prompts.get(prompt)
        if cached is not None:
            self._prompts.move_to_end(prompt)
            return cached
        tokens = self.tokenize(prompt)
        pooled = None
        if self.text_encoder_2 is not None:
            encoders = (self.text_encoder, self.text_encoder_2)
            embeds, pooled = sdxl.encode_tokens(encoders, tokens, self.device, self.dtype)
        else:
            mask = None
            if getattr(self.text_encoder.config, "use_attention_mask", False):
                mask = tokens.attention_mask.to(self.device)
            with torch.inference_mode():
                embeds = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0].to(
                    self.dtype
                )
        self._prompts[prompt] = (embeds, pooled)
        while len(self._prompts) > PROMPT_CACHE:
            self._prompts.popitem(last=False)
        return embeds, pooled

    def forget_prompts(self) -> None:
        """Drop the cached prompt embeddings (the text encoder's weights changed: a LoRA re-fused); every
        stream of the engine re-encodes its prompt on its next frame."""
        self._prompts.clear()
        self.prompt_version += 1

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
        rows = 2 if config.cfg and config.cfg_mode == "full" and self.time_cond_dim is None else 1
        h, w = config.height // self.vae_factor, config.width // self.vae_factor
        x = torch.zeros(rows, self.latent_channels, h, w, device=self.device, dtype=self.dtype)
        embeds = self.encode_prompt("").expand(rows, -1, -1)
        t = torch.full((rows,), 500, device=self.device, dtype=torch.long)
        cond = None
        if self.time_cond_dim is not None:
            cond = torch.zeros(rows, self.time_cond_dim, device=self.device, dtype=self.dtype)
        extra = control.placeholder_extra(self, rows, config.height, config.width)
        best = float("inf")
        with torch.inference_mode():
            for _ in range(repeat):
                start = time.perf_counter()
                self._unet(x, t, embeds, cond, extra)
                best = min(best, time.perf_counter() - start)
        return best


def _alphas_cumprod(scheduler_config: dict[str, Any]) -> torch.Tensor:
    """alpha_cumprod over the training timesteps, from the model's own scheduler config."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler_config).alphas_cumprod.float()  # (T,)


def _on(module: Any, device: torch.device, dtype: torch.dtype) -> Any:
    return None if module is None else module.to(device, dtype).eval()
