"""Pure per-step math for streaming img2img: timestep rules, add-noise, DDIM/LCM steps, CFG.

Every input is in the signature, tensors out; nothing here holds state. The denoiser precomputes a
`Schedule` once per (steps, strength, scheduler) and runs the step functions on it frame after frame;
tests compare each function with diffusers' `DDIMScheduler` / `LCMScheduler`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class Schedule:
    """Everything a frame's denoising loop needs, precomputed: k timesteps and their coefficients."""

    timesteps: tuple[int, ...]  # (k,) descending
    alphas: torch.Tensor  # (k,) alpha_cumprod at each timestep
    alphas_prev: torch.Tensor  # (k,) alpha_cumprod at the step each one lands on
    c_skip: torch.Tensor | None = None  # (k,) LCM boundary-condition scalings; None for DDIM
    c_out: torch.Tensor | None = None


def inference_steps_for(steps: int, strength: float) -> int:
    """The total DDIM step count N whose last `steps` timesteps an img2img run at `strength` uses.

    diffusers' img2img keeps int(N * strength) of N steps; this is the smallest N for which that is `steps`.
    """
    if steps < 1 or not 0.0 < strength <= 1.0:
        raise ValueError(f"need steps >= 1 and strength in (0, 1], got steps={steps}, strength={strength}")
    total = max(steps, math.ceil(steps / strength - 1e-9))
    while min(int(total * strength), total) < steps:
        total += 1
    if min(int(total * strength), total) != steps:
        raise ValueError(f"no DDIM schedule gives exactly {steps} steps at strength {strength}")
    return total


def streaming_timesteps(
    steps: int, strength: float, num_train_timesteps: int = 1000
) -> tuple[list[int], list[int]]:
    """The streaming rule: the first timestep follows strength continuously, then `steps` evenly below.

    t_1 = round(strength * (T - 1)) (strength 1 starts at the last training timestep) and
    t_i = round(t_1 * (steps - i + 1) / steps); the last step lands on -1 (the final alpha, x_0).
    Unlike diffusers' img2img grid, which snaps the start to a multiple of T // N (with `leading`
    spacing a 1-step frame starts at t=1 whatever the strength), every strength gets its own start.
    Returns (timesteps, the timestep each step lands on).
    """
    if steps < 1 or not 0.0 < strength <= 1.0:
        raise ValueError(f"need steps >= 1 and strength in (0, 1], got steps={steps}, strength={strength}")
    first = round(strength * (num_train_timesteps - 1))
    if first < steps:
        raise ValueError(
            f"strength {strength} is too low for {steps} distinct steps: "
            f"at least {steps / (num_train_timesteps - 1):.4f} is needed"
        )
    timesteps = [round(first * (steps - i) / steps) for i in range(steps)]
    return timesteps, [*timesteps[1:], -1]


def ddim_timesteps(
    steps: int,
    strength: float,
    num_train_timesteps: int = 1000,
    spacing: str = "leading",
    steps_offset: int = 0,
) -> tuple[list[int], list[int]]:
    """Timesteps and the ones each DDIM step lands on, for `steps` steps at img2img `strength`.

    Same grid as `DDIMScheduler.set_timesteps(N)` (DDIM, Song et al. 2021, eq. 12) truncated as in
    `StableDiffusionImg2ImgPipeline.get_timesteps`; the landing step is t - T // N as in diffusers.
    """
    total = inference_steps_for(steps, strength)
    T = num_train_timesteps
    if total > T:
        raise ValueError(
            f"strength {strength} is too low for {steps} steps: at least {steps / T:g} is needed"
        )
    if spacing == "linspace":
        grid = np.linspace(0, T - 1, total).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        grid = (np.arange(0, total) * (T // total)).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        grid = np.round(np.arange(T, 0, -T / total)).astype(np.int64) - 1
    else:
        raise ValueError(f"timestep spacing must be one of {', '.join(TIMESTEP_SPACINGS)}, got {spacing!r}")
    timesteps = [int(t) for t in grid[total - steps :]]
    return timesteps, [t - T // total for t in timesteps]


def lcm_timesteps(
    steps: int, strength: float, num_train_timesteps: int = 1000, original_steps: int = 50
) -> list[int]:
    """LCM inference timesteps (Luo et al. 2023, sec. 4.3) as `LCMScheduler.set_timesteps(k, strength=s)`."""
    skip = num_train_timesteps // original_steps
    origin = np.arange(1, int(original_steps * strength) + 1) * skip - 1
    if len(origin) // steps < 1:
        raise ValueError(
            f"LCM with strength {strength} keeps {len(origin)} of {original_steps} training timesteps, fewer "
            f"than steps={steps}: raise strength to at least {steps / original_steps:.2f} or lower steps"
        )
    origin = origin[::-1]
    indices = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return [int(t) for t in origin[indices]]


def alpha_at(alphas_cumprod: torch.Tensor, timesteps: Sequence[int], final_alpha: float) -> torch.Tensor:
    """alpha_cumprod at each timestep; `final_alpha` where a step lands below 0 (DDIM's final step)."""
    return torch.stack(
        [
            alphas_cumprod[t] if t >= 0 else torch.tensor(final_alpha, dtype=alphas_cumprod.dtype)
            for t in timesteps
        ]
    )


def lcm_boundary_scalings(
    timesteps: Sequence[int], timestep_scaling: float = 10.0, sigma_data: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Consistency-model boundary condition c_skip, c_out (Song et al. 2023, eq. 6; LCM's discrete form)."""
    t = torch.tensor(timesteps, dtype=torch.float64) * timestep_scaling
    c_skip = sigma_data**2 / (t**2 + sigma_data**2)
    c_out = t / (t**2 + sigma_data**2) ** 0.5
    return c_skip.float(), c_out.float()


def for_stream(
    scheduler_config: Mapping[str, Any],
    alphas_cumprod: torch.Tensor,
    scheduler: str,
    timesteps_rule: str,
    steps: int,
    strength: float,
    device: torch.device,
) -> Schedule:
    """The `Schedule` a stream denoises every frame with, from a model's scheduler config: LCM's
    timesteps and boundary scalings (`scheduler="lcm"`), the streaming rule (`timesteps_rule=
    "streaming"`), or DDIM's with the config's spacing. Raises ValueError for steps and strength that
    give no schedule."""
    sc = scheduler_config
    T = int(sc.get("num_train_timesteps", 1000))
    c_skip: torch.Tensor | None = None
    c_out: torch.Tensor | None = None
    if scheduler == "lcm":
        timesteps = lcm_timesteps(steps, strength, T, int(sc.get("original_inference_steps", 50)))
        prev = timesteps[1:] + timesteps[-1:]
        c_skip, c_out = lcm_boundary_scalings(timesteps, float(sc.get("timestep_scaling", 10.0)))
    elif timesteps_rule == "streaming":
        timesteps, prev = streaming_timesteps(steps, strength, T)
    else:
        spacing, offset = sc.get("timestep_spacing", "leading"), int(sc.get("steps_offset", 0))
        timesteps, prev = ddim_timesteps(steps, strength, T, spacing, offset)
    final_alpha = 1.0 if sc.get("set_alpha_to_one", True) else float(alphas_cumprod[0])

    def on_device(x: torch.Tensor) -> torch.Tensor:
        return x.to(device, torch.float32)

    return Schedule(
        timesteps=tuple(timesteps),
        alphas=on_device(alpha_at(alphas_cumprod, timesteps, final_alpha)),
        alphas_prev=on_device(alpha_at(alphas_cumprod, prev, final_alpha)),
        c_skip=None if c_skip is None else on_device(c_skip),
        c_out=None if c_out is None else on_device(c_out),
    )


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Forward diffusion q(x_t | x_0) = sqrt(a) x_0 + sqrt(1 - a) eps (Ho et al. 2020, eq. 4)."""
    alpha = alpha.to(device=x0.device, dtype=x0.dtype)
    return alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise


def predict_x0_eps(
    sample: torch.Tensor, model_output: torch.Tensor, alpha: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_0, eps) from a model output of the given parameterization (Salimans & Ho 2022 for v)."""
    a, b = alpha.sqrt(), (1 - alpha).sqrt()
    if prediction_type == "epsilon":
        return (sample - b * model_output) / a, model_output
    if prediction_type == "v_prediction":
        return a * sample - b * model_output, a * model_output + b * sample
    if prediction_type == "sample":
        return model_output, (sample - a * model_output) / b
    raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")


def ddim_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    alpha: torch.Tensor,
    alpha_prev: torch.Tensor,
    prediction_type: str = "epsilon",
    clip_sample: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic DDIM step x_t -> x_prev, eta = 0 (Song et al. 2021, eq. 12); returns (x_prev, x_0)."""
    x0, eps = predict_x0_eps(sample, model_output, alpha, prediction_type)
    if clip_sample is not None:
        x0 = x0.clamp(-clip_sample, clip_sample)
    return alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps, x0


def lcm_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    alpha: torch.Tensor,
    alpha_prev: torch.Tensor,
    c_skip: torch.Tensor,
    c_out: torch.Tensor,
    noise: torch.Tensor | None,
    prediction_type: str = "epsilon",
    clip_sample: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM multistep step (Luo et al. 2023, alg. 3): boundary-conditioned x_0, re-noised to the next timestep.

    Returns (x_prev, denoised); `noise` is None on the last step, where x_prev is the denoised sample.
    """
    x0, _ = predict_x0_eps(sample, model_output, alpha, prediction_type)
    if clip_sample is not None:
        x0 = x0.clamp(-clip_sample, clip_sample)
    denoised = c_out * x0 + c_skip * sample
    if noise is None:
        return denoised, denoised
    return alpha_prev.sqrt() * denoised + (1 - alpha_prev).sqrt() * noise, denoised


def cfg_combine(noise_uncond: torch.Tensor, noise_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance e_u + w (e_c - e_u) (Ho & Salimans 2022, eq. 6)."""
    return noise_uncond + guidance_scale * (noise_cond - noise_uncond)


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the guidance weight w for guidance-distilled UNets (LCM, Luo et al. 2023)."""
    w = w * 1000.0
    half = embedding_dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = w.float()[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb  # (B, embedding_dim)


# ---------------------------------------------------------------------- residual CFG (StreamDiffusion)
def residual_noise(sample: torch.Tensor, reference: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The virtual residual noise eps' = (x_tau - sqrt(a_tau) x_0) / sqrt(1 - a_tau): the noise that takes
    the reference latent x_0 to the current sample at this timestep (StreamDiffusion, arXiv 2312.12491,
    sec. 3.2 "Residual Classifier-Free Guidance"). Self-negative RCFG takes the input latent as x_0 (at the
    first step eps' is then the stream's own noise); onetime-negative takes `negative_x0`."""
    alpha = alpha.to(device=sample.device, dtype=sample.dtype)
    return (sample - alpha.sqrt() * reference) / (1 - alpha).sqrt()


def negative_x0(sample: torch.Tensor, noise_uncond: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """x_0 denoised with the negative condition at the first step, (x_tau0 - sqrt(1 - a) eps_neg) / sqrt(a):
    onetime-negative RCFG's reference for every later residual (arXiv 2312.12491, sec. 3.2); its residual
    at the first step is eps_neg itself."""
    alpha = alpha.to(device=sample.device, dtype=sample.dtype)
    return (sample - (1 - alpha).sqrt() * noise_uncond) / alpha.sqrt()


def rcfg_combine(
    noise_cond: torch.Tensor, residual: torch.Tensor, guidance_scale: float, delta: float
) -> torch.Tensor:
    """Residual CFG delta eps' + w (eps_c - delta eps') (arXiv 2312.12491, sec. 3.2): CFG whose negative
    prediction is the virtual residual noise eps' scaled by the magnitude moderation coefficient delta,
    so that no UNet row is spent on the negative condition. delta = 0 leaves w eps_c."""
    negative = delta * residual
    return negative + guidance_scale * (noise_cond - negative)
