"""One frozen configuration for a stream, validated once; live changes go through `dataclasses.replace`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

SCHEDULERS = ("ddim", "lcm")
TIMESTEP_RULES = ("streaming", "diffusers")
NOISE_MODES = ("fixed", "fresh", "warped")
FEEDBACK_AT = ("input", "steps")  # where latent feedback is blended (see StreamConfig.feedback_at)
ATTENTION_BACKENDS = ("sdpa", "xformers")
DTYPES = ("auto", "float32", "float16", "bfloat16")
CFG_MODES = ("full", "self", "once", "none")  # how guidance > 1 is computed (see StreamConfig.cfg_mode)
MAX_STEPS = 5
MAX_SIDE = 2048
MAX_TRAIN_TIMESTEPS = 1000  # SD-family models are trained on 1000 timesteps
# Settings that need the model to be loaded again; everything else can change live.
RELOAD_FIELDS = (
    "model",
    "vae",
    "device",
    "dtype",
    "attention",
    "cuda_graphs",
    "compile",
    "lora",
    "controlnet",
)
# Settings whose change makes the last output stale: the similarity filter must not hand it back.
OUTPUT_FIELDS = (
    "prompt",
    "negative_prompt",
    "strength",
    "guidance_scale",
    "steps",
    "seed",
    "latent_feedback",
    "image_feedback",
    "lora_scale",
    "control",
    "controlnet_conditioning_scale",
    "feedback_warp",
    "feedback_at",
    "noise",
    "motion_strength",
)
# What a page or control message may change live, by the names the page uses; anything else is refused.
LIVE_SETTINGS = (
    "prompt",
    "negative_prompt",
    "strength",
    "guidance_scale",
    "steps",
    "seed",
    "latent_feedback",
    "image_feedback",
    "width",  # a new size applies from the next frame (the server may offer only some sizes)
    "height",
    "lora_scale",  # the LoRAs are fused into the model every session shares: a change applies to all
    "controlnet_conditioning_scale",
    "feedback_warp",  # following the motion: from the next frame (the flow starts when first needed)
    "feedback_at",
    "noise",
    "motion_strength",
)
CONTROL_MODES = ("canny", "none")  # how a ControlNet's conditioning image is made from each frame


class ConfigError(ValueError):
    """A configuration value is out of range; the message says what was received and what is allowed."""


@dataclass(frozen=True)
class StreamConfig:
    model: str = (
        "auto"  # hub id, local diffusers folder, single-file checkpoint, `tiny`, `random:<arch>`, `auto`
    )
    vae: str = "auto"  # `auto` = the model's own, `tiny` = TAESD-shaped AutoencoderTiny, or a path/hub id
    width: int = 512  # model resolution in pixels, multiple of 8; frames are letterboxed into it
    height: int = 512
    steps: int = 4  # denoising steps per frame, 1-5
    strength: float = 0.5  # img2img strength in (0, 1]: how far each frame is noised before denoising
    guidance_scale: float = 1.0  # classifier-free guidance; on when > 1 (one batched UNet call)
    scheduler: str = "ddim"  # `ddim` (eta 0) or `lcm`
    # `streaming`: the first timestep follows strength continuously, then `steps` evenly below it;
    # `diffusers`: StableDiffusionImg2ImgPipeline's grid (for parity). LCM always uses its own grid.
    timesteps: str = "streaming"
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = 0
    latent_feedback: float = 0.0  # share of the previous output latent blended into the new one, in [0, 1)
    # share of the previous output image blended into the new one after decoding, in [0, 1): moved along
    # the motion first (with feedback_warp), by fractions of a latent pixel too
    image_feedback: float = 0.0
    # `fixed`: one noise tensor per stream (stable output); `fresh`: new noise each frame; `warped`: the
    # stream's noise moves with the content (the input's optical flow; exactly fixed on a still scene)
    noise: str = "fixed"
    similarity_threshold: float = 0.0  # skip the model when input similarity >= this; 0 = off
    max_skip: int = 10  # at most this many frames in a row are skipped by the similarity filter
    device: str = "auto"  # `auto` (cuda if available, else cpu), `cpu`, `cuda`, `cuda:N`, `mps`
    dtype: str = "auto"  # `auto` = float16 on CUDA, float32 elsewhere
    attention: str = "sdpa"  # `sdpa` (PyTorch scaled-dot-product attention) or `xformers`
    # GPU speed: static shape buckets with CUDA graphs, and torch.compile on the UNet (stream/graphs.py)
    cuda_graphs: str = "auto"  # `auto` (on for CUDA, off elsewhere), `on` (CUDA only), `off`
    compile: str = "off"  # torch.compile on the UNet: `off`, `default`, `max-autotune` (slow first frame)
    # Stream Batch and residual CFG (StreamDiffusion's throughput features)
    stream_batch: bool = False  # the k steps of k consecutive frames as one UNet call; k-1 frames of delay
    # how CFG runs when guidance > 1: `full` (uncond + cond rows every step), `self` (residual CFG, no
    # extra row), `once` (one uncond row at the first step, residual after), `none` (no CFG)
    cfg_mode: str = "full"
    delta: float = 1.0  # residual CFG: scale of the virtual residual noise used as the negative prediction
    # LoRA and ControlNet (models/lora.py, models/controlnet.py, control.py)
    lora: tuple[str, ...] = ()  # LoRAs fused into the model, each `SOURCE[:SCALE]` (file, folder, hub id)
    lora_scale: float = 1.0  # overall LoRA scale (each LoRA's own scale times this), re-fused on change
    controlnet: str = ""  # a ControlNet folder / hub id / file, or `random`; empty = none
    control: str = "canny"  # the conditioning image from each frame: `canny` edges, `none` = the frame
    controlnet_conditioning_scale: float = 1.0  # how strongly the ControlNet steers, in [0, 5]
    # Temporal coherence that follows the motion (the input's optical flow: stream/flow.py, coherence.py)
    feedback_warp: bool = True  # latent and image feedback warp the previous output along the motion first
    # `input`: the previous output is blended into the new frame's latent before it is noised; `steps`:
    # into the model's estimate of the clean latent at every denoising step (it also steadies the noise)
    feedback_at: str = "input"
    motion_strength: float = 0.0  # fast motion lowers strength by up to this share of it, [0, 1); 0 = off

    def __post_init__(self) -> None:
        # 1. strings that name something
        _require(
            isinstance(self.model, str) and self.model.strip() != "",
            "model",
            self.model,
            "a hub id, a local folder or file, `tiny`, `tiny-sdxl`, `random:sd-turbo`, `random:sd15`, "
            "`random:sdxl-turbo` or `auto`",
        )
        _require(
            isinstance(self.vae, str) and self.vae.strip() != "",
            "vae",
            self.vae,
            "`auto`, `tiny`, or a path / hub id of an autoencoder",
        )
        _choice("scheduler", self.scheduler, SCHEDULERS)
        _choice("noise", self.noise, NOISE_MODES)
        _choice("timesteps", self.timesteps, TIMESTEP_RULES)
        _choice("attention", self.attention, ATTENTION_BACKENDS)
        _choice("dtype", self.dtype, DTYPES)
        _choice("cfg_mode", self.cfg_mode, CFG_MODES)
        _require(isinstance(self.stream_batch, bool), "stream_batch", self.stream_batch, "true or false")
        _require(isinstance(self.prompt, str), "prompt", self.prompt, "a string")
        _require(isinstance(self.negative_prompt, str), "negative_prompt", self.negative_prompt, "a string")
        _text("prompt", self.prompt)
        _text("negative_prompt", self.negative_prompt)
        _require(_is_device(self.device), "device", self.device, "`auto`, `cpu`, `cuda`, `cuda:N` or `mps`")
        # 2. sizes and counts
        for name in ("width", "height"):
            value = getattr(self, name)
            _require(
                _is_int(value) and 64 <= value <= MAX_SIDE and value % 8 == 0,
                name,
                value,
                f"a multiple of 8 from 64 to {MAX_SIDE}",
            )
        _require(
            _is_int(self.steps) and 1 <= self.steps <= MAX_STEPS,
            "steps",
            self.steps,
            f"an integer from 1 to {MAX_STEPS}",
        )
        _require(
            _is_int(self.max_skip) and 0 <= self.max_skip <= 1000,
            "max_skip",
            self.max_skip,
            "an integer from 0 to 1000 (frames in a row the similarity filter may skip)",
        )
        _require(
            _is_int(self.seed) and 0 <= self.seed < 2**63, "seed", self.seed, "an integer from 0 to 2**63 - 1"
        )
        # 3. real-valued knobs
        _require(
            _is_real(self.strength) and 0.0 < self.strength <= 1.0, "strength", self.strength, "in (0, 1]"
        )
        # A schedule of steps / strength DDIM steps must fit in the 1000 training timesteps.
        _require(
            self.strength * MAX_TRAIN_TIMESTEPS >= self.steps,
            "strength",
            self.strength,
            f"at least steps / {MAX_TRAIN_TIMESTEPS} = {self.steps / MAX_TRAIN_TIMESTEPS:g} for {self.steps} "
            "steps",
        )
        _require(
            _is_real(self.guidance_scale) and 0.0 <= self.guidance_scale <= 30.0,
            "guidance_scale",
            self.guidance_scale,
            "in [0, 30] (CFG is on when > 1)",
        )
        _require(
            _is_real(self.latent_feedback) and 0.0 <= self.latent_feedback < 1.0,
            "latent_feedback",
            self.latent_feedback,
            "in [0, 1)",
        )
        _require(
            _is_real(self.image_feedback) and 0.0 <= self.image_feedback < 1.0,
            "image_feedback",
            self.image_feedback,
            "in [0, 1) (0 turns it off)",
        )
        _require(
            _is_real(self.similarity_threshold) and 0.0 <= self.similarity_threshold < 1.0,
            "similarity_threshold",
            self.similarity_threshold,
            "in [0, 1) (0 turns the filter off)",
        )
        # 4. following the motion
        _require(isinstance(self.feedback_warp, bool), "feedback_warp", self.feedback_warp, "true or false")
        _choice("feedback_at", self.feedback_at, FEEDBACK_AT)
        _require(
            _is_real(self.motion_strength) and 0.0 <= self.motion_strength < 1.0,
            "motion_strength",
            self.motion_strength,
            "in [0, 1) (the most share of strength fast motion takes away; 0 turns it off)",
        )

        # 4. GPU speed
        _choice("cuda_graphs", self.cuda_graphs, ("auto", "on", "off"))
        _choice("compile", self.compile, ("off", "default", "max-autotune"))

        # 5. Stream Batch and residual CFG
        _require(
            _is_real(self.delta) and 0.0 <= self.delta <= 2.0,
            "delta",
            self.delta,
            "in [0, 2] (the residual CFG's scale of the residual noise; 1 is the paper's default)",
        )

        # 6. LoRA and ControlNet
        _require(
            isinstance(self.lora, tuple) and all(isinstance(x, str) and x.strip() for x in self.lora),
            "lora",
            self.lora,
            "a tuple of `SOURCE[:SCALE]` strings",
        )
        _require(
            _is_real(self.lora_scale) and -4.0 <= self.lora_scale <= 4.0,
            "lora_scale",
            self.lora_scale,
            "in [-4, 4]",
        )
        _require(isinstance(self.controlnet, str), "controlnet", self.controlnet, "a string")
        _choice("control", self.control, CONTROL_MODES)
        _require(
            _is_real(self.controlnet_conditioning_scale) and 0.0 <= self.controlnet_conditioning_scale <= 5.0,
            "controlnet_conditioning_scale",
            self.controlnet_conditioning_scale,
            "in [0, 5]",
        )

    @property
    def cfg(self) -> bool:
        """Whether classifier-free guidance runs (guidance > 1 and `cfg_mode` not `none`)."""
        return self.guidance_scale > 1.0 and self.cfg_mode != "none"

    def replace(self, **changes: object) -> StreamConfig:
        """A validated copy with `changes` applied; unknown names are refused."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {', '.join(unknown)}; known settings: {', '.join(sorted(known))}"
            )
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _require(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {allowed}, got {value!r}")


def _text(name: str, value: str) -> None:
    """Text a tokenizer can take: valid Unicode (a lone surrogate from JSON's \\ud800 is not)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = value[exc.start]
        raise ConfigError(
            f"{name} must be valid Unicode text: character {exc.start + 1} is a lone surrogate "
            f"(U+{ord(bad):04X}); send the text as UTF-8"
        ) from None


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, name, value, "one of " + ", ".join(allowed))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _is_device(value: object) -> bool:
    if not isinstance(value, str):
        return False
    if value in ("auto", "cpu", "cuda", "mps"):
        return True
    prefix, _, index = value.partition(":")
    return prefix == "cuda" and index.isdigit()
