"""StreamDenoiser: one stream's settings and temporal state; frames through the shared engine in batches.

A frame goes through numbered steps: 1. preprocess (letterbox into the model canvas) and the similarity
filter, 2. encode (one VAE call for the batch), 3. prepare the latent (feedback blend, noise to the first
timestep; per stream), 4. denoise (step i: one UNet call for the rows of every stream still at step i),
5. decode (one VAE call), 6. postprocess (back to the frame's size, uint8). `process_batch` runs frames of
several streams together (stream/batch.py); `process` is a batch of one. A frame's rows and step math
follow the plan it started with (stream/frame_plan.py: CFG full/self/once/none); with Stream Batch
(`stream_batch`) step 4 is one UNet call for every frame of the stream in flight (stream/stream_batch.py).
Synchronous; the caller owns threading.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from stream import control, frame_plan, schedule, temporal
from stream.batch import EMPTY, FrameResult, Job, process_batch
from stream.coherence import Coherence, follows_motion, image_feedback, latent_feedback
from stream.config import OUTPUT_FIELDS, RELOAD_FIELDS, ConfigError, StreamConfig
from stream.engine import Engine
from stream.frames import Geometry, StageTimer, check_frame, from_canvas, letterbox_geometry, to_canvas
from stream.models import Components, load_model, sdxl
from stream.stream_batch import InFlight, StreamBatch
from stream.transfer import FrameTransfer

logger = logging.getLogger(__name__)

STAGES = ("preprocess", "encode", "denoise", "decode", "postprocess")


@dataclass
class _StreamState:
    """What carries from frame to frame: noise, the last output latent, the similarity reference."""

    geometry: Geometry | None = None
    noise: list[torch.Tensor] = field(default_factory=list)  # [initial, step noises...] for `fixed`, `warped`
    generator: torch.Generator | None = None  # for `fresh`, and `warped`'s holes
    coherence: Coherence | None = None  # the input's motion, when a setting follows it
    prev_latent: torch.Tensor | None = None  # (1, C, H/f, W/f) last denoised latent
    prev_image: torch.Tensor | None = None  # (1, 3, H, W) last output canvas in [0, 1], for image feedback
    last_input: torch.Tensor | None = None  # uint8 frame the model last ran on
    last_output: np.ndarray | None = None
    skips: int = 0  # frames skipped in a row
    pipeline: StreamBatch = field(default_factory=StreamBatch)  # Stream Batch's frames in flight


class StreamDenoiser:
    """Per-frame img2img with a fixed schedule, cached prompt embeddings and temporal state."""

    def __init__(self, model: Components | Engine, config: StreamConfig) -> None:
        self.engine = model if isinstance(model, Engine) else Engine.shared(model, config)
        self.config = config
        self.device, self.dtype = self.engine.device, self.engine.dtype
        self.name, self.placeholder = self.engine.name, self.engine.placeholder
        self.engine.check_size(config.width, config.height)
        self.frames = 0
        self.skipped = 0
        self._embeds: torch.Tensor | None = None  # (2 or 1, L, D) [uncond, cond] or [cond]
        self._pooled: torch.Tensor | None = None  # SDXL: (2 or 1, P) pooled embeddings, rows as _embeds
        self._prompt: tuple[str, str, bool, int] | None = None
        self._guidance_embed: torch.Tensor | None = None
        self._plan: frame_plan.Plan | None = None  # what a frame starting now is denoised with
        self._state = _StreamState()
        self._transfer = FrameTransfer(self.device)  # uint8 frames up and down (pinned buffers on CUDA)
        self._set_schedule(config)
        self.prepare(config.prompt, config.negative_prompt)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model: str, config: StreamConfig) -> StreamDenoiser:
        """Load `model` (hub id, local folder, single file, `tiny`, `random:<arch>`, `auto`) for `config`."""
        if config.model != model:
            config = config.replace(model=model)
        return cls(load_model(config), config)

    @property
    def vae_factor(self) -> int:
        return self.engine.vae_factor

    @property
    def last_latent(self) -> torch.Tensor | None:
        """The last frame's denoised latent (1, C, h, w), the one its output was decoded from."""
        return self._state.prev_latent

    # ------------------------------------------------------------------ live settings
    def prepare(self, prompt: str, negative_prompt: str = "") -> None:
        """Encode and cache the prompt embeddings; a no-op when the prompt has not changed."""
        cfg = self._uses_cfg_batch(self.config)
        key = (prompt, negative_prompt, cfg, self.engine.prompt_version)
        if key == self._prompt and self._embeds is not None:
            return
        self._plan = None
        if self.engine.family == "sdxl":
            self._embeds, self._pooled = sdxl.prompt_rows(self.engine, prompt, negative_prompt, cfg)
        else:
            cond = self.encode_prompt(prompt)
            self._embeds = torch.cat([self.encode_prompt(negative_prompt), cond]) if cfg else cond
        self._prompt = key

    def update(self, config: StreamConfig) -> None:
        """Apply a live change from the next frame on; settings that need a reload are refused."""
        changed = [name for name in RELOAD_FIELDS if getattr(config, name) != getattr(self.config, name)]
        if changed:
            raise ConfigError(
                f"{', '.join(changed)} cannot change while streaming; restart with the new value"
            )
        self.engine.check_size(config.width, config.height)
        old, self.config = self.config, config
        self._plan = None  # frames already in flight (Stream Batch) keep theirs
        if (config.steps, config.strength, config.scheduler, config.timesteps) != (
            old.steps,
            old.strength,
            old.scheduler,
            old.timesteps,
        ):
            try:
                self._set_schedule(config)
            except ConfigError:
                self.config = old
                raise
        lora = self.engine.lora  # fused into the model: a new scale is re-fused for every stream of it
        if config.lora_scale != old.lora_scale and lora is not None and lora.set_scale(config.lora_scale):
            self.engine.forget_prompts()  # a text encoder LoRA changes the embeddings
        self.prepare(config.prompt, config.negative_prompt)
        if (config.seed, config.noise, config.steps, config.scheduler) != (
            old.seed,
            old.noise,
            old.steps,
            old.scheduler,
        ):
            self._state.noise, self._state.generator = [], None
        if (config.width, config.height, config.stream_batch) != (old.width, old.height, old.stream_batch):
            self.reset()
        if config.guidance_scale != old.guidance_scale:
            self._guidance_embed = None
        if any(getattr(config, name) != getattr(old, name) for name in OUTPUT_FIELDS):
            self._state.last_input = None  # the last output no longer answers this input

    def reset(self) -> None:
        """Forget the temporal state (previous latent, noise, similarity reference)."""
        self._state = _StreamState()

    # ------------------------------------------------------------------ per frame
    def __call__(self, frame: np.ndarray) -> np.ndarray:
        return self.process(frame).frame

    def process(self, frame: np.ndarray, tag: object = None) -> FrameResult:
        """One frame through the whole pipeline (a batch of one), with per-stage timings. With Stream
        Batch the result is an older input's frame (its `tag` is that input's), or `pending`."""
        (result,) = process_batch([self], [frame], [tag])
        if isinstance(result, BaseException):
            raise result
        return result

    def batch_key(self) -> tuple[int, int, int]:
        """Streams with equal keys can share a batch: the same engine and latent shape."""
        return (id(self.engine), self.config.height, self.config.width)

    # 1. preprocess and the similarity filter
    def _begin(self, frame: np.ndarray) -> Job | FrameResult:
        check_frame(frame)
        timer = StageTimer(self.device)
        state = self._state
        with timer("preprocess"):
            pixels = self._transfer.upload(frame)
            if state.geometry is None or state.geometry.src != frame.shape[:2]:
                self.reset()
                state = self._state
                state.geometry = letterbox_geometry(frame.shape[:2], (self.config.height, self.config.width))
            if self._similar(pixels, state):
                state.skips += 1
                self.skipped += 1
                self.frames += 1
                assert state.last_output is not None
                if self.config.stream_batch:  # nothing enters, nothing leaves: the last output stays shown
                    return FrameResult(EMPTY, timer.finish(), skipped=True, pending=True)
                return FrameResult(state.last_output, timer.finish(), skipped=True)
            image = self.preprocess(pixels, state.geometry)
            self._track_motion(frame, state)
        self.prepare(
            self.config.prompt, self.config.negative_prompt
        )  # no-op unless the embeddings went stale
        job = Job(self, pixels, image, timer)
        if self.engine.controlnet is not None:
            with timer("control"):  # the ControlNet's conditioning image, from the canvas
                job.control = control.condition_image(image, self.config.control)
        return job

    # 3. the latent: blend with the previous output, noise to the first timestep
    def _start(self, job: Job, latent: torch.Tensor) -> None:
        state, config = self._state, self.config
        motion = state.coherence.wait() if state.coherence is not None else None
        if motion is not None and motion.cut:  # a scene cut: start over instead of smearing the last scene
            state.prev_latent, state.noise = None, []
        latent, pull = latent_feedback(config, state.coherence, latent, state.prev_latent)
        job.noise = self._noise(latent, state)
        if state.coherence is not None and config.motion_strength > 0:
            self._use_strength(state.coherence.strength(config))
        else:
            self._use_strength(config.strength)
        plan = self.plan()  # after the strength: a new schedule makes a new plan
        job.x = schedule.add_noise(latent, job.noise[0], plan.schedule.alphas[0])
        job.frame = InFlight(
            job.tag,
            plan,
            job.x,
            latent,
            job.noise,
            entered=job.timer.started,
            control=job.control,
            pull=pull,
            motion=motion,
        )
        job.calls = 1 if config.stream_batch else plan.steps

    def _rows(self, job: Job, i: int) -> frame_plan.Rows:
        """Step i's UNet rows for this stream (frame_plan.Rows), 2 with full CFG, else 1; with Stream
        Batch, the rows of every frame in flight and of the one entering, in one call."""
        assert job.frame is not None
        if self.config.stream_batch:
            return self._state.pipeline.rows(job.frame)
        return job.frame.rows()

    # 4. step i from this stream's rows of the UNet output
    def _step(self, job: Job, i: int, out: torch.Tensor) -> None:
        frame = job.frame
        assert frame is not None
        if self.config.stream_batch:
            left = self._state.pipeline.advance(frame, out)
            job.frame = left  # the frame that leaves, an older input's; None in the first k-1 calls
        else:
            frame.commit(frame.advanced(out))
        job.x = frame.x
        if job.frame is not None and job.frame.result is not None:
            job.result = self._state.prev_latent = job.frame.result

    # 6. postprocess
    def _finish(self, job: Job, image: torch.Tensor | None, shared: dict[str, float]) -> FrameResult:
        state = self._state
        assert state.geometry is not None
        state.last_input = job.pixels  # the newest input that went in: the similarity filter's reference
        self.frames += 1
        if image is None or job.frame is None:  # Stream Batch: nothing left the pipeline this call
            return FrameResult(EMPTY, {**shared, **job.timer.finish()}, pending=True)
        with job.timer("postprocess"):
            previous = None if job.frame.after_drop else state.prev_image  # that one moved further
            image = image_feedback(self.config, job.frame.motion, image, previous)
            state.prev_image = image if self.config.image_feedback > 0 else None
            out = self.postprocess(image, state.geometry)
        state.last_output, state.skips = out, 0
        timings = {**shared, **job.timer.finish()}
        if self.config.stream_batch:  # from its input's call to this one: the delay Stream Batch adds
            timings["in_flight"] = (time.perf_counter() - job.frame.entered) * 1000.0
        return FrameResult(out, timings, image=image, tag=job.frame.tag)

    def preprocess(self, pixels: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """(h, w, 3) uint8 on the device -> (1, 3, H, W) in [-1, 1], letterboxed into the model canvas."""
        return to_canvas(pixels, geometry, self.dtype)

    def postprocess(self, image: torch.Tensor, geometry: Geometry) -> np.ndarray:
        """(1, 3, H, W) in [0, 1] -> (h, w, 3) uint8 RGB numpy at the frame's own size."""
        return self._transfer.download(from_canvas(image, geometry))

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Text -> (1, L, D) embeddings, tokenized and encoded as diffusers' SD pipelines do."""
        return self.engine.encode_prompt(prompt)

    # ------------------------------------------------------------------ internals
    def _set_schedule(self, config: StreamConfig) -> None:
        engine = self.engine
        try:
            self._schedule = schedule.for_stream(
                engine.scheduler_config,
                engine.alphas_cumprod,
                config.scheduler,
                config.timesteps,
                config.steps,
                config.strength,
                self.device,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self._t = [torch.tensor([t], device=self.device) for t in self._schedule.timesteps]
        self._plan = None
        self._strength = config.strength  # what the schedule was made for (motion may lower it a frame)
        sc = engine.scheduler_config
        clip = sc.get("clip_sample", False)
        self._clip_sample = float(sc.get("clip_sample_range", 1.0)) if clip else None

    @property
    def timesteps(self) -> tuple[int, ...]:
        """The timesteps each frame is denoised through, first (noisiest) first."""
        return self._schedule.timesteps

    def _uses_cfg_batch(self, config: StreamConfig) -> bool:
        """Whether frames have negative-prompt rows: CFG `full`, or `once` (first step); a UNet that takes
        the guidance scale as an embedding (LCM) gets it that way instead."""
        return self._cfg_mode(config) in ("full", "once")

    def _cfg_mode(self, config: StreamConfig) -> str:
        guidance_embedding = self.engine.time_cond_dim is not None
        return frame_plan.effective_mode(config.cfg_mode, config.guidance_scale, guidance_embedding)

    def plan(self) -> frame_plan.Plan:
        """What a frame starting now is denoised with (made again after a settings change)."""
        if self._plan is None:
            assert self._embeds is not None
            config = self.config
            self._plan = frame_plan.Plan(
                schedule=self._schedule,
                t=tuple(self._t),
                cond=self._embeds[-1:],
                pair=self._embeds if self._embeds.shape[0] == 2 else None,
                pooled=None if self._pooled is None else self._pooled[-1:],
                pooled_pair=self._pooled if self._pooled is not None and self._pooled.shape[0] == 2 else None,
                size=(config.height, config.width),
                control_scale=config.controlnet_conditioning_scale,
                guidance_embed=self._timestep_cond(),
                guidance_scale=config.guidance_scale,
                mode=self._cfg_mode(config),
                delta=config.delta,
                prediction_type=self.engine.scheduler_config.get("prediction_type", "epsilon"),
                clip_sample=self._clip_sample,
            )
        return self._plan

    def _timestep_cond(self) -> torch.Tensor | None:
        dim = self.engine.time_cond_dim
        if dim is None:
            return None
        if self._guidance_embed is None:
            w = torch.tensor([self.config.guidance_scale - 1.0])
            self._guidance_embed = schedule.guidance_scale_embedding(w, dim).to(self.device, self.dtype)
        return self._guidance_embed

    def _noise(self, latent: torch.Tensor, state: _StreamState) -> list[torch.Tensor]:
        """The initial noise and LCM's per-step noises: fixed for the stream, moved with the content
        (`warped`; fresh noise from a second seeded generator where the flow leaves holes), or fresh."""
        count = len(self._schedule.timesteps) if self.config.scheduler == "lcm" else 1
        shape = tuple(latent.shape)
        if self.config.noise in ("fixed", "warped"):
            if len(state.noise) != count or tuple(state.noise[0].shape) != shape:
                state.noise = self._draw(torch.Generator("cpu").manual_seed(self.config.seed), shape, count)
            elif self.config.noise == "warped" and state.coherence is not None:
                if state.generator is None:
                    state.generator = torch.Generator("cpu").manual_seed(self.config.seed + 1)
                state.noise = state.coherence.carry(state.noise, state.generator)
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

    def _track_motion(self, frame: np.ndarray, state: _StreamState) -> None:
        """Start this frame's optical flow (on the flow threads) when a setting follows the motion."""
        if not follows_motion(self.config):
            state.coherence = None
            return
        assert state.geometry is not None
        if state.coherence is None:
            latent = (self.config.height // self.vae_factor, self.config.width // self.vae_factor)
            state.coherence = Coherence(latent, self.vae_factor, self.device)
        warped_noise = self.config.noise == "warped" and state.generator is not None
        state.coherence.submit(frame, state.geometry, state.generator if warped_noise else None)

    def _use_strength(self, strength: float) -> None:
        if strength != self._strength:
            # No schedule at that strength (LCM's grid): keep the current one.
            with contextlib.suppress(ConfigError):
                self._set_schedule(self.config.replace(strength=strength))

    def _similar(self, pixels: torch.Tensor, state: _StreamState) -> bool:
        threshold = self.config.similarity_threshold
        if threshold <= 0 or state.last_input is None or state.last_output is None:
            return False
        if state.skips >= self.config.max_skip:  # a still scene still gets a fresh frame now and then
            return False
        return temporal.frame_similarity(pixels, state.last_input) >= threshold
