"""A frame's denoising plan: the settings it is denoised with, its UNet rows at each step, and one step.

A `Plan` is a snapshot taken when a frame starts (schedule, prompt embeddings, guidance, CFG mode): a
frame keeps it to the end even if the stream's settings change meanwhile (with Stream Batch a frame is
denoised over several calls). `unet_rows` gives a frame's rows for one UNet call and `step` applies that
call's output. How guidance > 1 is computed (`--cfg`):

- `full`: an [uncond, cond] pair of rows every step, combined by classifier-free guidance;
- `self`: one cond row; the negative prediction is the virtual residual noise to the input latent
  (residual CFG, self-negative);
- `once`: an uncond row at the first step only; later steps use the residual to that step's
  negative-conditioned x_0 (residual CFG, onetime-negative);
- `none` (or guidance <= 1): one cond row, no guidance. A UNet that takes the guidance scale as an
  embedding (LCM's distilled UNets) always gets it that way, one row a step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stream import control, schedule
from stream.models import sdxl

# A UNet call's rows: x, t, embeds, timestep_cond, extra (per-row added conditioning: SDXL's pooled
# embeddings and time ids, the ControlNet's image and scale)
Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]
# Latent feedback at the steps: (target (1, C, h, w), weight (1, 1, h, w) in [0, 1)), see `step`
Pull = tuple[torch.Tensor, torch.Tensor]
MODES = ("full", "self", "once", "off")  # the mode a plan runs: `off` is no guidance at all


@dataclass(frozen=True)
class Plan:
    """What a frame is denoised with, fixed when it starts."""

    schedule: schedule.Schedule
    t: tuple[torch.Tensor, ...]  # (1,) timestep tensors on the device, one a step
    cond: torch.Tensor  # (1, L, D) prompt embeddings
    pair: torch.Tensor | None  # (2, L, D) [negative prompt, prompt] embeddings, for `full` and `once`
    guidance_embed: torch.Tensor | None  # (1, dim) for UNets that take the guidance as an embedding
    guidance_scale: float
    mode: str  # one of MODES
    delta: float  # residual CFG's scale of the residual noise
    prediction_type: str
    clip_sample: float | None
    pooled: torch.Tensor | None = None  # SDXL: (1, P) the prompt's pooled embeddings
    pooled_pair: torch.Tensor | None = None  # SDXL: (2, P) [negative prompt, prompt], as `pair`
    size: tuple[int, int] = (0, 0)  # the canvas (height, width): SDXL's time ids
    control_scale: float = 1.0  # the ControlNet's conditioning scale

    @property
    def steps(self) -> int:
        return len(self.schedule.timesteps)

    def uncond_row(self, i: int) -> bool:
        """Whether step i has a negative-prompt row before the prompt's row."""
        return self.mode == "full" or (self.mode == "once" and i == 0)

    def rows(self, i: int) -> int:
        """UNet rows of step i: 2 with an uncond row, else 1."""
        return 2 if self.uncond_row(i) else 1


def effective_mode(cfg_mode: str, guidance_scale: float, guidance_embedding: bool) -> str:
    """The mode a plan runs: `off` without guidance (scale <= 1, `none`, or a guidance-embedding UNet)."""
    if guidance_scale <= 1.0 or cfg_mode == "none" or guidance_embedding:
        return "off"
    return cfg_mode


def unet_rows(plan: Plan, x: torch.Tensor, i: int, control_image: torch.Tensor | None = None) -> Rows:
    """Step i's rows for a frame at sample x (1, C, h, w): [uncond, cond] or [cond]; `control_image`
    (1, 3, H, W) the frame's ControlNet conditioning image."""
    rows = plan.rows(i)
    embeds = plan.pair if rows == 2 and plan.pair is not None else plan.cond
    cond = None if plan.guidance_embed is None else plan.guidance_embed.expand(rows, -1)
    extra: dict[str, torch.Tensor] = {}
    if plan.pooled is not None:
        pooled = plan.pooled_pair if rows == 2 and plan.pooled_pair is not None else plan.pooled
        extra.update(sdxl.added_conditioning(pooled, *plan.size))
    if control_image is not None:
        extra.update(control.control_rows(control_image, plan.control_scale, rows))
    return x.expand(rows, -1, -1, -1), plan.t[i].expand(rows), embeds, cond, extra


def concat_rows(parts: list[Rows]) -> Rows:
    """Several frames' or streams' rows as one UNet call's."""
    conds = [r[3] for r in parts]
    return (
        torch.cat([r[0] for r in parts]),
        torch.cat([r[1] for r in parts]),
        torch.cat([r[2] for r in parts]),
        None if conds[0] is None else torch.cat([c for c in conds if c is not None]),
        {key: torch.cat([r[4][key] for r in parts]) for key in parts[0][4]},
    )


def step(
    plan: Plan,
    x: torch.Tensor,
    reference: torch.Tensor,
    noise: list[torch.Tensor],
    i: int,
    out: torch.Tensor,
    pull: Pull | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Step i of a frame from its rows of the UNet output `out`.

    `reference` is residual CFG's x_0 (the input latent; `once` replaces it with the negative x_0 at
    step 0); `noise` is [initial, LCM's step noises...]; `pull` = (target, weight): latent feedback at
    the steps, the step's clean-latent estimate moved by `weight` (a map) toward `target` before the
    next sample is made from it. Returns (x at the next timestep, the reference for the next step, the
    final latent after the last step or None).
    """
    sched = plan.schedule
    alpha = sched.alphas[i]
    pred_type = plan.prediction_type
    if plan.mode == "full":
        uncond, text = out.chunk(2)
        out = schedule.cfg_combine(uncond, text, plan.guidance_scale)
    elif plan.mode in ("self", "once"):
        if plan.uncond_row(i):  # onetime-negative: the one real negative prediction, at step 0
            out_uncond, out = out.chunk(2)
            _, eps_uncond = schedule.predict_x0_eps(x, out_uncond, alpha, pred_type)
            reference = schedule.negative_x0(x, eps_uncond, alpha)
        _, eps_cond = schedule.predict_x0_eps(x, out, alpha, pred_type)
        residual = schedule.residual_noise(x, reference, alpha)
        out = schedule.rcfg_combine(eps_cond, residual, plan.guidance_scale, plan.delta)
        pred_type = "epsilon"  # the combination is a noise prediction whatever the UNet predicts
    last = i + 1 == plan.steps
    if sched.c_skip is not None and sched.c_out is not None:
        step_noise = None if last else noise[i + 1]
        x, denoised = schedule.lcm_step(
            x, out, alpha, sched.alphas_prev[i], sched.c_skip[i], sched.c_out[i], step_noise, pred_type,
            plan.clip_sample,
        )  # fmt: skip
        if pull is not None:  # x is linear in the denoised sample: sqrt(a_prev) of it, all of it at the end
            x = x + (1.0 if last else sched.alphas_prev[i].sqrt()) * _pulled(denoised, pull)
        return x, reference, x if last else None  # LCM's result is its denoised sample
    x, x0 = schedule.ddim_step(x, out, alpha, sched.alphas_prev[i], pred_type, plan.clip_sample)
    if pull is not None:  # x = sqrt(a_prev) x_0 + sqrt(1 - a_prev) eps
        x = x + sched.alphas_prev[i].sqrt() * _pulled(x0, pull)
    return x, reference, x if last else None  # DDIM's last step lands on x_0 (t_prev < 0)


def _pulled(x0: torch.Tensor, pull: Pull) -> torch.Tensor:
    """How far latent feedback at the steps moves the clean-latent estimate x_0: toward the target by
    the weight, then each channel's spread around its mean put back to x_0's. Blending two estimates
    whose details do not line up (the noise's part of them) averages those details away: without the
    spread put back, a stream that keeps pulling turns dull, and looks steadier only for that. Where the
    details do line up the blend keeps the spread and this changes nothing."""
    target, weight = pull
    pulled = x0 + weight * (target.to(x0.dtype) - x0)
    mean = pulled.mean(dim=(-2, -1), keepdim=True)
    spread = x0.std(dim=(-2, -1), keepdim=True) / pulled.std(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    return mean + (pulled - mean) * spread - x0
