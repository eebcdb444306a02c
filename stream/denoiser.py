"""StreamDenoiser: one frame in, one restyled frame out, in a few DDIM/LCM steps with a cached prompt.

The only module that imports diffusers and transformers. Synchronous; the caller owns threading.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stream import temporal
from stream.config import ConfigError, StreamConfig

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "stabilityai/sd-turbo"  # what `auto` loads when it is cached or can be downloaded
TAESD_MODEL = "madebyollin/taesd"  # real TAESD weights for `--vae tiny` on a real SD 1.x/2.x model
TINY_MODEL_VERSION = "tiny-v1"
RANDOM_ARCHS = ("sd-turbo", "sd15")
STAGES = ("preprocess", "encode", "denoise", "decode", "postprocess")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")
# Settings that need the model to be loaded again; everything else can change live.
RELOAD_FIELDS = ("model", "vae", "device", "dtype", "attention")

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


@dataclass
class FrameResult:
    frame: np.ndarray  # HxWx3 uint8 RGB, the input's size
    timings: dict[str, float]  # ms per stage (STAGES), each step's UNet call (unet_1, ...), and "total"
    skipped: bool = False  # the similarity filter returned the previous output


@dataclass
class _Geometry:
    """How a frame of one size maps into the model's canvas (letterbox) and back."""

    src: tuple[int, int]  # (h, w) of the incoming frame
    inner: tuple[int, int]  # (h, w) of the scaled frame inside the canvas
    offset: tuple[int, int]  # (top, left) of it
    canvas: tuple[int, int]  # (H, W) model size


@dataclass
class _StreamState:
    """What carries from frame to frame: noise, the last output latent, the similarity reference."""

    geometry: _Geometry | None = None
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
        timer = _StageTimer(self.device)
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

    def preprocess(self, pixels: torch.Tensor, geometry: _Geometry) -> torch.Tensor:
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
        self, latent: torch.Tensor, noise: list[torch.Tensor], timer: _StageTimer | None = None
    ) -> torch.Tensor:
        """Noise the clean latent to the first timestep, then run the DDIM/LCM steps; returns the result.

        With a `timer`, each step's UNet call is timed as `unet_1`, `unet_2`, ...
        """
        sched = self._schedule
        x = temporal.add_noise(latent, noise[0], sched.alphas[0])
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
                out = temporal.cfg_combine(uncond, text, self.config.guidance_scale)
            if sched.c_skip is not None and sched.c_out is not None:
                step_noise = noise[i + 1] if i + 1 < len(sched.timesteps) else None
                x, denoised = temporal.lcm_step(
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
                x, denoised = temporal.ddim_step(
                    x, out, sched.alphas[i], sched.alphas_prev[i], pred_type, clip
                )
        # DDIM's last step lands on x at t_prev (x_0 when t_prev < 0); LCM returns its denoised sample.
        return denoised if sched.c_skip is not None else x

    def decode_latents(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> (1, 3, H, W) image in [0, 1]."""
        image = self.vae.decode(latent / self.scaling_factor, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)

    def postprocess(self, image: torch.Tensor, geometry: _Geometry) -> np.ndarray:
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
                timesteps = temporal.lcm_timesteps(
                    config.steps, config.strength, T, int(sc.get("original_inference_steps", 50))
                )
                prev = timesteps[1:] + timesteps[-1:]
                c_skip, c_out = temporal.lcm_boundary_scalings(
                    timesteps, float(sc.get("timestep_scaling", 10.0))
                )
            else:
                timesteps, prev = temporal.ddim_timesteps(
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

        self._schedule = temporal.Schedule(
            timesteps=tuple(timesteps),
            alphas=on_device(temporal.alpha_at(alphas_cumprod, timesteps, final_alpha)),
            alphas_prev=on_device(temporal.alpha_at(alphas_cumprod, prev, final_alpha)),
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
            self._guidance_embed = temporal.guidance_scale_embedding(w, dim).to(self.device, x.dtype)
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


# ---------------------------------------------------------------------- geometry and timing
def letterbox_geometry(src: tuple[int, int], canvas: tuple[int, int]) -> _Geometry:
    """Fit an (h, w) frame inside the (H, W) canvas keeping its aspect ratio, centred."""
    h, w = int(src[0]), int(src[1])
    H, W = canvas
    scale = min(H / h, W / w)
    ih, iw = max(1, min(H, round(h * scale))), max(1, min(W, round(w * scale)))
    return _Geometry(src=(h, w), inner=(ih, iw), offset=((H - ih) // 2, (W - iw) // 2), canvas=(H, W))


class _StageTimer:
    """Milliseconds per stage, and the frame's wall-clock `total`.

    On the CPU each stage is wall-clock time. On CUDA each stage is the time between two CUDA events
    recorded around it (no synchronization in the middle of a frame); they are read once, at `finish`.
    """

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._start = time.perf_counter()
        self._events: list[tuple[str, Any, Any]] = []
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if self._cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((stage, start, end))
            return
        begin = time.perf_counter()
        yield
        self.timings[stage] = (time.perf_counter() - begin) * 1000.0

    def finish(self) -> dict[str, float]:
        if self._cuda:
            torch.cuda.synchronize()
            for stage, start, end in self._events:
                self.timings[stage] = float(start.elapsed_time(end))
        self.timings["total"] = (time.perf_counter() - self._start) * 1000.0
        return self.timings


# ---------------------------------------------------------------------- devices, attention
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


def _alphas_cumprod(scheduler_config: dict[str, Any]) -> torch.Tensor:
    """alpha_cumprod over the training timesteps, from the model's own scheduler config."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler_config).alphas_cumprod.float()  # (T,)


# ---------------------------------------------------------------------- model loading
def load_model(config: StreamConfig) -> Components:
    """The components for config.model and config.vae, on the config's device and dtype.

    One set can serve several StreamDenoisers (one per stream), each with its own settings and state.
    """
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    components = load_components(config.model, device, dtype)
    components.vae = load_vae(config.vae, components, device, dtype)
    logger.info("loaded %s on %s (%s)", components.name, device, str(dtype).removeprefix("torch."))
    if components.placeholder:
        logger.warning("running the %s", PLACEHOLDER_NOTE)
    return components


def load_components(model: str, device: torch.device, dtype: torch.dtype) -> Components:
    """Resolve `model` to components: tiny, random:<arch>, auto, a local folder/file, or a hub id."""
    _quiet_libraries()
    if model == "tiny":
        return _load_pipeline(str(ensure_tiny_model()), dtype, name="tiny (built-in)", placeholder=True)
    if model.startswith("random:"):
        return build_random(model.removeprefix("random:"), device, dtype)
    if model == "auto":
        return _load_auto(dtype)
    path = Path(model).expanduser()
    if path.is_file():
        return _load_single_file(path, dtype)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(
                f"model folder '{model}' has no model_index.json: give a diffusers pipeline folder "
                "(as written by save_pretrained), a single .safetensors/.ckpt file, or a hub id"
            )
        return _load_pipeline(str(path), dtype, name=str(path))
    if model.startswith((".", "/", "~")) or path.suffix in SINGLE_FILE_SUFFIXES or model.count("/") > 1:
        raise ModelError(
            f"model path '{model}' does not exist; give an existing folder or file, a hub id such as "
            f"{DEFAULT_MODEL}, or `tiny`"
        )
    return _load_pipeline(model, dtype, name=model)


def _load_auto(dtype: torch.dtype) -> Components:
    reason: Exception | None = None
    for local_only in (True, False):
        if not local_only and os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
            break
        try:
            return _load_pipeline(DEFAULT_MODEL, dtype, name=DEFAULT_MODEL, local_files_only=local_only)
        except ModelError as exc:
            reason = exc
    logger.warning(
        "model auto: %s is not cached and could not be downloaded (%s); falling back to the %s",
        DEFAULT_MODEL,
        reason,
        PLACEHOLDER_NOTE,
    )
    return _load_pipeline(
        str(ensure_tiny_model()), dtype, name="tiny (built-in, auto fallback)", placeholder=True
    )


def _load_pipeline(
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
            f"could not load model '{source}': {_first_line(exc)}. Check the hub id or path; "
            "without network only cached models load (try --model tiny)"
        ) from exc
    return _from_pipeline(pipe, name, placeholder)


def _load_single_file(path: Path, dtype: torch.dtype) -> Components:
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
            f"could not load checkpoint '{path}': {_first_line(exc)}. It must be an SD 1.x/2.x "
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
        with _seeded(0):
            return AutoencoderTiny()  # TAESD shape, random weights, like the model itself
    source = TAESD_MODEL if spec == "tiny" else spec
    errors = []
    for cls in (AutoencoderTiny, AutoencoderKL):
        try:
            return cls.from_pretrained(source, dtype=dtype)
        except Exception as exc:
            errors.append(_first_line(exc))
    raise ModelError(
        f"could not load vae '{source}': {errors[-1]}. Use --vae auto (the model's own), or a cached "
        "AutoencoderTiny / AutoencoderKL folder or hub id"
    )


def _quiet_libraries() -> None:
    """diffusers/transformers log notes and progress bars per component; our own log says what loaded."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------------- the built-in tiny model
def cache_dir() -> Path:
    """Where generated models live: $STREAM_CACHE, else ~/.cache/stream."""
    return Path(os.environ.get("STREAM_CACHE", Path.home() / ".cache" / "stream"))


def ensure_tiny_model() -> Path:
    """The built-in tiny pipeline folder, written once (seeded, so every machine gets the same weights)."""
    target = cache_dir() / "models" / TINY_MODEL_VERSION
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("writing the built-in tiny model to %s", target)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        build_tiny_pipeline().save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny_pipeline() -> Any:
    """A seeded random-weight SD pipeline small enough for real-time on a 2-core CPU at 256x256.

    Shaped for speed, not images: a two-level UNet (8/16 channels, cross-attention in the mid block) and
    a 4-channel AutoencoderTiny that downsamples by 16, so 256x256 frames become 16x16 latents.
    """
    from diffusers import AutoencoderTiny, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with _seeded(0):
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderTiny(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            encoder_block_out_channels=(4,) * 5,
            decoder_block_out_channels=(4,) * 5,
            num_encoder_blocks=(0, 0, 0, 0, 1),
            num_decoder_blocks=(1, 0, 0, 0, 0),
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=1000,
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=5,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=0,
                eos_token_id=2,
                pad_token_id=1,
                layer_norm_eps=1e-5,
            )
        )
        # PyTorch's default init shrinks the signal layer by layer: the output would be a flat grey that
        # ignores the input and the prompt. Variance-keeping init on the autoencoder (its last layer damped
        # to avoid saturation) and a stronger text cross-attention make both visibly change the output.
        with torch.no_grad():
            convs = [m for m in vae.modules() if isinstance(m, torch.nn.Conv2d)]
            for conv in convs:
                torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv2d)][-1].weight.mul_(0.1)
            for name, module in unet.named_modules():
                if name.endswith("attn2.to_out.0"):
                    module.weight.mul_(8.0)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=build_tokenizer(),
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tokenizer() -> Any:
    """A byte-level CLIP tokenizer generated locally (no merges: a token per byte) for tiny/random models."""
    from transformers import CLIPTokenizer

    folder = cache_dir() / "tokenizers" / "clip-bytes-v1"
    if not (folder / "tokenizer_config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        chars = list(_bytes_to_unicode().values())
        vocab = {c: i for i, c in enumerate(chars)}
        vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
        vocab.update({"<|startoftext|>": 2 * len(chars), "<|endoftext|>": 2 * len(chars) + 1})
        (folder / "vocab.json").write_text(json.dumps(vocab))
        (folder / "merges.txt").write_text("#version: 0.2\n")
        special = {
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
        }
        (folder / "tokenizer_config.json").write_text(
            json.dumps({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", **special})
        )
    return CLIPTokenizer.from_pretrained(str(folder))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


# ---------------------------------------------------------------------- full-size random architectures
def random_arch_configs(arch: str) -> dict[str, dict[str, Any]]:
    """UNet, VAE, text encoder and scheduler configs of a full-size architecture (for speed, not images)."""
    sd2 = arch == "sd-turbo"
    if arch not in RANDOM_ARCHS:
        raise ModelError(
            f"unknown random architecture '{arch}'; use one of "
            + ", ".join(f"random:{a}" for a in RANDOM_ARCHS)
        )
    unet = {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 1024 if sd2 else 768,
        "attention_head_dim": (5, 10, 20, 20) if sd2 else 8,
        "use_linear_projection": sd2,
    }
    vae = {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": (128, 256, 512, 512),
        "sample_size": 512,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
    }
    text = {
        "vocab_size": 49408,
        "hidden_size": 1024 if sd2 else 768,
        "intermediate_size": 4096 if sd2 else 3072,
        "num_hidden_layers": 23 if sd2 else 12,
        "num_attention_heads": 16 if sd2 else 12,
        "max_position_embeddings": 77,
        "hidden_act": "gelu" if sd2 else "quick_gelu",
        "projection_dim": 512 if sd2 else 768,
    }
    scheduler = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "epsilon",
        "timestep_spacing": "trailing" if sd2 else "leading",
    }
    return {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": scheduler}


def build_random(arch: str, device: torch.device, dtype: torch.dtype) -> Components:
    """A full-size architecture with seeded random weights, built on the target device."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = random_arch_configs(arch)
    logger.info("building random:%s (full-size architecture, random weights) on %s", arch, device)
    with _seeded(0), device:
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    scheduler = DDIMScheduler(**configs["scheduler"])
    return Components(
        unet=unet.to(dtype),
        vae=vae.to(dtype),
        text_encoder=text_encoder.to(dtype),
        tokenizer=build_tokenizer(),
        scheduler_config=dict(scheduler.config),
        name=f"random:{arch} (random weights, for speed only)",
        placeholder=True,
    )
