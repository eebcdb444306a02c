"""schedule.py against diffusers' own schedulers, to 1e-6."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler
from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_img2img import (
    LatentConsistencyModelImg2ImgPipeline,
)

from stream import schedule

SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def ddim(spacing: str, **extra: object) -> DDIMScheduler:
    return DDIMScheduler(
        **SD_BETAS, clip_sample=False, set_alpha_to_one=False, timestep_spacing=spacing, **extra
    )


def img2img_timesteps(scheduler: DDIMScheduler, total: int, strength: float) -> list[int]:
    """What StableDiffusionImg2ImgPipeline.get_timesteps keeps of an N-step schedule."""
    scheduler.set_timesteps(total)
    keep = min(int(total * strength), total)
    return [int(t) for t in scheduler.timesteps[total - keep :]]


@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("leading", 0), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("strength", [0.2, 0.35, 0.5, 0.7, 0.9, 1.0])
def test_ddim_grid_matches_img2img_pipeline(spacing: str, offset: int, steps: int, strength: float) -> None:
    scheduler = ddim(spacing, steps_offset=offset)
    total = schedule.inference_steps_for(steps, strength)
    ours, prev = schedule.ddim_timesteps(steps, strength, 1000, spacing, offset)
    assert len(ours) == steps
    assert ours == img2img_timesteps(scheduler, total, strength)
    assert prev == [t - 1000 // total for t in ours]


def test_inference_steps_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="strength"):
        schedule.inference_steps_for(2, 0.0)
    with pytest.raises(ValueError, match="steps"):
        schedule.inference_steps_for(0, 0.5)


@pytest.mark.parametrize("steps,strength", [(1, 1.0), (2, 0.5), (4, 0.6), (4, 1.0), (5, 0.3), (3, 0.11)])
def test_lcm_grid_matches_lcm_scheduler(steps: int, strength: float) -> None:
    scheduler = LCMScheduler(**SD_BETAS)
    scheduler.set_timesteps(steps, strength=strength)
    assert schedule.lcm_timesteps(steps, strength) == [int(t) for t in scheduler.timesteps]


def test_lcm_grid_refuses_too_low_strength() -> None:
    with pytest.raises(ValueError, match="raise strength"):
        schedule.lcm_timesteps(5, 0.05)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_add_noise_and_ddim_steps_match_ddim_scheduler(prediction_type: str, spacing: str) -> None:
    scheduler = ddim(spacing, steps_offset=1, prediction_type=prediction_type)
    steps, strength = 4, 0.6
    total = schedule.inference_steps_for(steps, strength)
    timesteps, prev = schedule.ddim_timesteps(steps, strength, 1000, spacing, 1)
    scheduler.set_timesteps(total)
    final = float(scheduler.alphas_cumprod[0])
    alphas = schedule.alpha_at(scheduler.alphas_cumprod, timesteps, final)
    alphas_prev = schedule.alpha_at(scheduler.alphas_cumprod, prev, final)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    ref = scheduler.add_noise(x0, noise, torch.tensor([timesteps[0]]))
    x = schedule.add_noise(x0, noise, alphas[0])
    torch.testing.assert_close(x, ref, atol=1e-6, rtol=0)
    for i, t in enumerate(timesteps):
        out = torch.randn(1, 4, 8, 8, generator=g)
        expected = scheduler.step(out, t, ref, eta=0.0)
        ref = expected.prev_sample
        x, x0_pred = schedule.ddim_step(x, out, alphas[i], alphas_prev[i], prediction_type)
        torch.testing.assert_close(x, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(x0_pred, expected.pred_original_sample, atol=1e-6, rtol=0)


def test_ddim_clip_sample_matches() -> None:
    scheduler = DDIMScheduler(**SD_BETAS, clip_sample=True, clip_sample_range=0.5)
    scheduler.set_timesteps(10)
    t = int(scheduler.timesteps[3])
    alphas = schedule.alpha_at(scheduler.alphas_cumprod, [t, t - 100], 1.0)
    g = torch.Generator().manual_seed(1)
    x, out = torch.randn(1, 4, 8, 8, generator=g) * 3, torch.randn(1, 4, 8, 8, generator=g)
    ours, _ = schedule.ddim_step(x, out, alphas[0], alphas[1], "epsilon", clip_sample=0.5)
    torch.testing.assert_close(ours, scheduler.step(out, t, x, eta=0.0).prev_sample, atol=1e-6, rtol=0)


def test_lcm_steps_match_lcm_scheduler() -> None:
    scheduler = LCMScheduler(**SD_BETAS)
    steps, strength = 4, 0.8
    scheduler.set_timesteps(steps, strength=strength)
    timesteps = schedule.lcm_timesteps(steps, strength)
    prev = timesteps[1:] + timesteps[-1:]
    alphas = schedule.alpha_at(scheduler.alphas_cumprod, timesteps, 1.0)
    alphas_prev = schedule.alpha_at(scheduler.alphas_cumprod, prev, 1.0)
    c_skip, c_out = schedule.lcm_boundary_scalings(timesteps)
    for i, t in enumerate(timesteps):
        ref_skip, ref_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        assert abs(float(c_skip[i]) - float(ref_skip)) < 1e-6 and abs(float(c_out[i]) - float(ref_out)) < 1e-6
    ref_gen = torch.Generator().manual_seed(5)
    our_gen = torch.Generator().manual_seed(5)
    g = torch.Generator().manual_seed(2)
    ref = x = torch.randn(1, 4, 8, 8, generator=g)
    for i, t in enumerate(timesteps):
        out = torch.randn(1, 4, 8, 8, generator=g)
        ref, ref_denoised = scheduler.step(out, t, ref, generator=ref_gen, return_dict=False)
        last = i == len(timesteps) - 1
        noise = None if last else torch.randn(out.shape, generator=our_gen)
        x, denoised = schedule.lcm_step(x, out, alphas[i], alphas_prev[i], c_skip[i], c_out[i], noise)
        torch.testing.assert_close(x, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(denoised, ref_denoised, atol=1e-6, rtol=0)


def test_guidance_embedding_matches_lcm_pipeline() -> None:
    w = torch.tensor([6.5])
    ref = LatentConsistencyModelImg2ImgPipeline.get_guidance_scale_embedding(None, w, embedding_dim=32)  # type: ignore[arg-type]
    torch.testing.assert_close(schedule.guidance_scale_embedding(w, 32), ref, atol=1e-6, rtol=0)


def test_cfg_combine() -> None:
    uncond, cond = torch.zeros(2, 3), torch.ones(2, 3)
    torch.testing.assert_close(schedule.cfg_combine(uncond, cond, 7.5), torch.full((2, 3), 7.5))
    torch.testing.assert_close(schedule.cfg_combine(uncond, cond, 1.0), cond)
