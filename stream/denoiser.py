"""StreamDenoiser: one frame in, one restyled frame out, in a few DDIM/LCM steps with a cached prompt.

The only module that imports diffusers and transformers. Synchronous; the caller owns threading.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stream import schedule, temporal
from stream.config import RELOAD_FIELDS, ConfigError, StreamConfig
from stream.devices import resolve_device, resolve_dtype, set_attention
from stream.frames import Geometry, StageTimer, letterbox_geometry
from stream.models import Components, load_model

logger = logging.getLogger(__name__)

STAGES = ("preprocess", "encode", "denoise", "decode", "postprocess")


@dataclass
class FrameResult:
    frame: np.ndarray  # HxWx3 uint8 RGB, the input's size
    timings: dict[str, float]  # ms per stage (STAGES), each step's UNet call (unet_1, ...), and "total"
    skipped: bool = False  # the similarity filter returned the previous output


@dataclass
class _StreamState:
    """What carries from frame to frame: noise, the last output latent, the similarity reference."""

    geometry: Geometry | None = None
    noise: list[torch.Tensor] = field(default_factory=list)  # [initial, step noises...] for `fixed`
    generator: torch.Generator | None = None  # for `fresh`
    prev_latent: torch.Tensor | None = None  # (1, 4, H/8, W/8) last denoised latent
    last_input: torch.Tensor | None = None  # uint8 frame the model last ran on
    last_output: np.ndarray | None = None


class StreamDenoiser:
    """Per-frame img2img with a fixed schedule, cached prompt embeddings and temporal state."""

    def __init__(self, components: Components, config: StreamConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.name = components.name
        self.placeholder = components.placeholder
        self.unet = components.unet.to(self.device, self.dtype).eval()
        self.vae = components.vae.to(self.device, self.dtype).eval()
        self.text_encoder = components.text_encoder.to(self.device, self.dtype).eval()
        self.tokenizer = components.tokenizer
        self.scheduler_config = dict(components.scheduler_config)
        self.scaling_factor = float(getattr(self.vae.config, "scaling_factor", 1.0))
        blocks = (
            getattr(self.vae.config, "encoder_block_out_channels", None) or self.vae.config.block_out_channels
        )
        self.vae_factor = 2 ** (len(blocks) - 1)  # pixels per latent pixel
        self._check_size(config)
        set_attention(self.unet, self.vae, config.attention)
        self._mkldnn = True  # oneDNN convolutions on the CPU; see _pick_cpu_convolutions
        self.frames = 0
        self.skipped = 0
        self._embeds: torch.Tensor | None = None  # (2 or 1, L, D) [uncond, cond] or [cond]
        self._prompt: tuple[str, str] | None = None
        self._guidance_embed: torch.Tensor | None = None
        self._state = _StreamState()
        self._set_schedule(config)
        self.prepare(config.prompt, config.negative_prompt)
        if self.device.type == "cpu":
            self._mkldnn = self._pick_cpu_convolutions()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model: str, config: StreamConfig) -> StreamDenoiser:
        """Load `model` (hub id, local folder, single file, `tiny`, `random:<arch>`, `auto`) for `config`."""
        if config.model != model:
            config = config.replace(model=model)
        return cls(load_model(config), config)

    # ------------------------------------------------------------------ live settings
    def prepare(self, prompt: str, negative_prompt: str = "") -> None:
        """Encode and cache the prompt embeddings; a no-op when the prompt has not changed."""
        key = (prompt, negative_prompt)
        if key == self._prompt and self._embeds is not None:
            return
        with torch.inference_mode():
            cond = self.encode_prompt(prompt)
            if self._uses_cfg_batch(self.config):
                self._embeds = torch.cat([self.encode_prompt(negative_prompt), cond])  # (2, L, D)
            else:
                self._embeds = cond  # (1, L, D)
        self._prompt = key

    def update(self, config: StreamConfig) -> None:
        """Apply a live change from the next frame on; settings that need a reload are refused."""
        changed = [name for name in RELOAD_FIELDS if getattr(config, name) != getattr(self.config, name)]
        if changed:
            raise ConfigError(
                f"{', '.join(changed)} cannot change while streaming; restart with the new value"
            )
        self._check_size(config)
        old, self.config = self.config, config
        if (config.steps, config.strength, config.scheduler) != (old.steps, old.strength, old.scheduler):
            try:
                self._set_schedule(config)
            except ConfigError:
                self.config = old
                raise
        cfg_changed = self._uses_cfg_batch(config) != self._uses_cfg_batch(old)
        if cfg_changed:
            self._prompt = None
        self.prepare(config.prompt, config.negative_prompt)
        if (config.seed, config.noise, config.steps, config.scheduler) != (
            old.seed,
            old.noise,
            old.steps,
            old.scheduler,
        ):
            self._state.noise, self._state.generator = [], None
        if (config.width, config.height) != (old.width, old.height):
            self.reset()
        if config.guidance_scale != old.guidance_scale:
            self._guidance_embed = None

    def reset(self) -> None:
        """Forget the temporal state (previous latent, noise, similarity reference)."""
        self._state = _StreamState()

    # ------------------------------------------------------------------ per frame
    def __call__(self, frame: np.ndarray) -> np.ndarray:
        return self.process(frame).frame

    def process(self, frame: np.ndarray) -> FrameResult:
        """One frame through the whole pipeline, with per-stage timings."""
        # 0. check input (cheap, and the one thing the caller cannot have validated)
        if not (
            isinstance(frame, np.ndarray)
            and frame.dtype == np.uint8
            and frame.ndim == 3
            and frame.shape[2] == 3
            and frame.shape[0] > 0
            and frame.shape[1] > 0
        ):
            got = (
                f"{frame.dtype} array of shape {frame.shape}"
                if isinstance(frame, np.ndarray)
                else type(frame)
            )
            raise ValueError(f"frame must be an HxWx3 uint8 RGB array, got {got}")
        timer = StageTimer(self.device)
        state = self._state
        with torch.inference_mode(), self._convolutions():
            # 1. preprocess: uint8 HWC -> (1, 3, H, W) in [-1, 1], letterboxed to the model size
            with timer("preprocess"):
                pixels = torch.from_numpy(np.ascontiguousarray(frame)).to(self.device, non_blocking=True)
                if state.geometry is None or state.geometry.src != frame.shape[:2]:
                    self.reset()
                    state = self._state
                    state.geometry = letterbox_geometry(
                        frame.shape[:2], (self.config.height, self.config.width)
                    )
                skip = self._similar(pixels, state)
                if not skip:
                    image = self.preprocess(pixels, state.geometry)
            if skip:
                self.skipped += 1
                self.frames += 1
                assert state.last_output is not None
                return FrameResult(state.last_output, timer.finish(), skipped=True)
            # 2. encode: (1, 3, H, W) -> (1, 4, H/8, W/8)
            with timer("encode"):
                latent = self.encode_image(image)
            # 3. denoise: blend with the previous output, noise to the strength's timestep, run the steps
            with timer("denoise"):
                latent = temporal.feedback_blend(latent, state.prev_latent, self.config.latent_feedback)
                noise = self._noise(latent, state)
                latent = self.denoise(latent, noise, timer)
                state.prev_latent = latent
            # 4. decode: (1, 4, H/8, W/8) -> (1, 3, H, W) in [0, 1]
            with timer("decode"):
                image = self.decode_latents(latent)
            # 5. postprocess: crop the letterbox, back to the frame's size, uint8 HWC on the CPU
            with timer("postprocess"):
                out = self.postprocess(image, state.geometry)
        state.last_input = pixels
        state.last_output = out
        self.frames += 1
        return FrameResult(out, timer.finish())

    def preprocess(self, pixels: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """(h, w, 3) uint8 on the device -> (1, 3, H, W) in [-1, 1], letterboxed into the model canvas."""
        x = pixels.permute(2, 0, 1).unsqueeze(0).to(self.dtype) / 127.5 - 1.0  # (1, 3, h, w)
        if geometry.inner != geometry.src:
            x = F.interpolate(
                x.float(), size=geometry.inner, mode="bilinear", antialias=True, align_corners=False
            ).to(self.dtype)
        (top, left), (ih, iw), (ch, cw) = geometry.offset, geometry.inner, geometry.canvas
        if (ih, iw) != (ch, cw):
            x = F.pad(x.float(), (left, cw - iw - left, top, ch - ih - top), mode="replicate").to(self.dtype)
        return x

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """VAE encode to scaled latents: the distribution's mode for AutoencoderKL (deterministic)."""
        out = self.vae.encode(image)
        latent = out.latents if hasattr(out, "latents") else out.latent_dist.mode()
        return latent * self.scaling_factor

    def denoise(
        self, latent: torch.Tensor, noise: list[torch.Tensor], timer: StageTimer | None = None
    ) -> torch.Tensor:
        """Noise the clean latent to the first timestep, then run the DDIM/LCM steps; returns the result.

        With a `timer`, each step's UNet call is timed as `unet_1`, `unet_2`, ...
        """
        sched = self._schedule
        x = schedule.add_noise(latent, noise[0], sched.alphas[0])
        pred_type = self.scheduler_config.get("prediction_type", "epsilon")
        clip = self._clip_sample
        cfg = self._uses_cfg_batch(self.config)
        embeds = self._embeds
        assert embeds is not None
        cond = self._timestep_cond(x)
        denoised = x
        for i in range(len(sched.timesteps)):
            model_in = torch.cat([x, x]) if cfg else x  # (B, 4, h, w), B = 2 with CFG
            with timer(f"unet_{i + 1}") if timer else contextlib.nullcontext():
                out = self.unet(
                    model_in, self._t[i], encoder_hidden_states=embeds, timestep_cond=cond, return_dict=False
                )[0]
            if cfg:
                uncond, text = out.chunk(2)
                out = schedule.cfg_combine(uncond, text, self.config.guidance_scale)
            if sched.c_skip is not None and sched.c_out is not None:
                step_noise = noise[i + 1] if i + 1 < len(sched.timesteps) else None
                x, denoised = schedule.lcm_step(
                    x,
                    out,
                    sched.alphas[i],
                    sched.alphas_prev[i],
                    sched.c_skip[i],
                    sched.c_out[i],
                    step_noise,
                    pred_type,
                    clip,
                )
            else:
                x, denoised = schedule.ddim_step(
                    x, out, sched.alphas[i], sched.alphas_prev[i], pred_type, clip
                )
        # DDIM's last step lands on x at t_prev (x_0 when t_prev < 0); LCM returns its denoised sample.
        return denoised if sched.c_skip is not None else x

    def decode_latents(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> (1, 3, H, W) image in [0, 1]."""
        image = self.vae.decode(latent / self.scaling_factor, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)

    def postprocess(self, image: torch.Tensor, geometry: Geometry) -> np.ndarray:
        """(1, 3, H, W) in [0, 1] -> (h, w, 3) uint8 RGB numpy at the frame's own size."""
        (top, left), (ih, iw) = geometry.offset, geometry.inner
        image = image[:, :, top : top + ih, left : left + iw]
        if geometry.inner != geometry.src:
            image = F.interpolate(
                image.float(), size=geometry.src, mode="bilinear", antialias=True, align_corners=False
            )
        out = (image[0].float() * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)  # (h, w, 3)
        return out.contiguous().cpu().numpy()

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Text -> (1, L, D) embeddings, tokenized and encoded as diffusers' SD pipelines do."""
        tokens = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        return self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0].to(self.dtype)

    # ------------------------------------------------------------------ internals
    def _check_size(self, config: StreamConfig) -> None:
        f = self.vae_factor
        if config.width % f or config.height % f:
            raise ConfigError(
                f"this model's autoencoder needs width and height that are multiples of {f}, "
                f"got {config.width}x{config.height}"
            )

    @contextlib.contextmanager
    def _convolutions(self) -> Iterator[None]:
        """On the CPU, the convolution backend picked for this model (a process-wide torch switch)."""
        if self.device.type != "cpu":
            yield
            return
        previous = torch._C._get_mkldnn_enabled()
        torch._C._set_mkldnn_enabled(self._mkldnn)
        try:
            yield
        finally:
            torch._C._set_mkldnn_enabled(previous)

    def _pick_cpu_convolutions(self) -> bool:
        """oneDNN or PyTorch's own CPU convolutions, whichever runs this UNet faster (small models differ)."""
        batch = 2 if self._uses_cfg_batch(self.config) else 1
        h, w = self.config.height // self.vae_factor, self.config.width // self.vae_factor
        x = torch.zeros(batch, int(self.unet.config.in_channels), h, w, device=self.device, dtype=self.dtype)
        embeds = self._embeds[:1].expand(batch, -1, -1) if self._embeds is not None else None
        cond = self._timestep_cond(x)
        cond = cond.expand(batch, -1) if cond is not None else None

        def run(enabled: bool, repeat: int) -> float:
            best = float("inf")
            self._mkldnn = enabled
            with torch.inference_mode(), self._convolutions():
                for _ in range(repeat):
                    start = time.perf_counter()
                    self.unet(
                        x, self._t[0], encoder_hidden_states=embeds, timestep_cond=cond, return_dict=False
                    )
                    best = min(best, time.perf_counter() - start)
            return best

        run(True, 1)
        if run(True, 1) > 0.2:  # a large model: oneDNN is the better choice, and timing it is slow
            return True
        onednn, native = run(True, 3), run(False, 4)
        logger.debug(
            "CPU convolutions: oneDNN %.1f ms, native %.1f ms per UNet call", onednn * 1e3, native * 1e3
        )
        return onednn <= native

    def _set_schedule(self, config: StreamConfig) -> None:
        sc = self.scheduler_config
        T = int(sc.get("num_train_timesteps", 1000))
        alphas_cumprod = _alphas_cumprod(sc)
        c_skip: torch.Tensor | None = None
        c_out: torch.Tensor | None = None
        try:
            if config.scheduler == "lcm":
                timesteps = schedule.lcm_timesteps(
                    config.steps, config.strength, T, int(sc.get("original_inference_steps", 50))
                )
                prev = timesteps[1:] + timesteps[-1:]
                c_skip, c_out = schedule.lcm_boundary_scalings(
                    timesteps, float(sc.get("timestep_scaling", 10.0))
                )
            else:
                timesteps, prev = schedule.ddim_timesteps(
                    config.steps,
                    config.strength,
                    T,
                    sc.get("timestep_spacing", "leading"),
                    int(sc.get("steps_offset", 0)),
                )
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        final_alpha = 1.0 if sc.get("set_alpha_to_one", True) else float(alphas_cumprod[0])

        def on_device(x: torch.Tensor) -> torch.Tensor:
            return x.to(self.device, torch.float32)

        self._schedule = schedule.Schedule(
            timesteps=tuple(timesteps),
            alphas=on_device(schedule.alpha_at(alphas_cumprod, timesteps, final_alpha)),
            alphas_prev=on_device(schedule.alpha_at(alphas_cumprod, prev, final_alpha)),
            c_skip=None if c_skip is None else on_device(c_skip),
            c_out=None if c_out is None else on_device(c_out),
        )
        self._t = [torch.tensor(t, device=self.device) for t in timesteps]
        clip = sc.get("clip_sample", False)
        self._clip_sample = float(sc.get("clip_sample_range", 1.0)) if clip else None

    def _uses_cfg_batch(self, config: StreamConfig) -> bool:
        """CFG as an [uncond, cond] batch, unless the UNet takes the guidance scale as an embedding (LCM)."""
        return config.cfg and self.unet.config.time_cond_proj_dim is None

    def _timestep_cond(self, x: torch.Tensor) -> torch.Tensor | None:
        dim = self.unet.config.time_cond_proj_dim
        if dim is None:
            return None
        if self._guidance_embed is None:
            w = torch.tensor([self.config.guidance_scale - 1.0])
            self._guidance_embed = schedule.guidance_scale_embedding(w, dim).to(self.device, x.dtype)
        return self._guidance_embed

    def _noise(self, latent: torch.Tensor, state: _StreamState) -> list[torch.Tensor]:
        """The initial noise and LCM's per-step noises: fixed for the stream, or fresh every frame."""
        count = len(self._schedule.timesteps) if self.config.scheduler == "lcm" else 1
        shape = tuple(latent.shape)
        if self.config.noise == "fixed":
            if len(state.noise) != count or tuple(state.noise[0].shape) != shape:
                state.noise = self._draw(torch.Generator("cpu").manual_seed(self.config.seed), shape, count)
            return state.noise
        if state.generator is None:
            state.generator = torch.Generator("cpu").manual_seed(self.config.seed)
        return self._draw(state.generator, shape, count)

    def _draw(self, generator: torch.Generator, shape: tuple[int, ...], count: int) -> list[torch.Tensor]:
        # Drawn on the CPU in float32, in the order diffusers' pipelines draw them, then moved.
        return [
            torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device, self.dtype)
            for _ in range(count)
        ]

    def _similar(self, pixels: torch.Tensor, state: _StreamState) -> bool:
        threshold = self.config.similarity_threshold
        if threshold <= 0 or state.last_input is None or state.last_output is None:
            return False
        return temporal.frame_similarity(pixels, state.last_input) >= threshold


def _alphas_cumprod(scheduler_config: dict[str, Any]) -> torch.Tensor:
    """alpha_cumprod over the training timesteps, from the model's own scheduler config."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler_config).alphas_cumprod.float()  # (T,)
