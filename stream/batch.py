"""A round of several streams' frames through the shared engine together.

`process_batch` takes streams that share an engine and a latent shape (equal `batch_key()`): one VAE
encode for all, one UNet call per step for the rows of every stream still at that step, one VAE
decode. Each stream's own work (preprocess, latent, step math, postprocess) stays on its
StreamDenoiser; this module only gathers and splits the batched calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from stream.engine import Engine
from stream.frames import StageTimer

if TYPE_CHECKING:
    from stream.denoiser import StreamDenoiser


@dataclass
class FrameResult:
    frame: np.ndarray  # HxWx3 uint8 RGB, the input's size
    timings: dict[str, float]  # ms per stage (STAGES), each step's UNet call (unet_1, ...), and "total"
    skipped: bool = False  # the similarity filter returned the previous output
    image: torch.Tensor | None = None  # the decoded canvas (1, 3, H, W) in [0, 1], before uint8


@dataclass
class Job:
    """One stream's frame on its way through a batch."""

    denoiser: StreamDenoiser
    pixels: torch.Tensor
    image: torch.Tensor  # (1, 3, H, W) in [-1, 1]
    timer: StageTimer
    x: torch.Tensor | None = None  # (1, C, h, w) the sample being denoised
    noise: list[torch.Tensor] = field(default_factory=list)
    result: torch.Tensor | None = None  # the final latent
    control: torch.Tensor | None = None  # (1, 3, H, W) the ControlNet's conditioning image in [0, 1]


# A stream's rows of one UNet call: x, t, embeds, timestep_cond, extra (per-row added conditioning)
Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]


def process_batch(
    denoisers: Sequence[StreamDenoiser], frames: Sequence[np.ndarray]
) -> list[FrameResult | Exception]:
    """Frames of several streams that share an engine and a latent shape, through the model together.

    One VAE encode, one UNet call per step for the rows of every stream still at that step (streams
    with fewer steps leave early), one VAE decode. Returns one result per stream, in order: a
    FrameResult, or the exception that stream's own frame raised (a bad frame costs that stream only).
    An exception of a batched call propagates: the caller may run the streams one by one.
    """
    if len({d.batch_key() for d in denoisers}) > 1:
        raise ValueError("process_batch takes streams of one engine and one size; group them by batch_key()")
    results: list[FrameResult | Exception | None] = [None] * len(denoisers)
    jobs: list[tuple[int, Job]] = []
    for index, (denoiser, frame) in enumerate(zip(denoisers, frames, strict=True)):
        try:
            begun = denoiser._begin(frame)
        except Exception as exc:  # a bad frame of one stream
            results[index] = exc
            continue
        if isinstance(begun, FrameResult):
            results[index] = begun
        else:
            jobs.append((index, begun))
    if jobs:
        engine = jobs[0][1].denoiser.engine
        for (index, _), result in zip(jobs, _run(engine, [job for _, job in jobs]), strict=True):
            results[index] = result
    return [r for r in results if r is not None]


def _run(engine: Engine, jobs: list[Job]) -> list[FrameResult]:
    """Steps 2-6 for jobs that share the engine and shape."""
    timer = StageTimer(engine.device)
    with torch.inference_mode():
        # 2. encode: (B, 3, H, W) -> (B, C, H/f, W/f)
        with timer("encode"):
            latents = engine.encode(torch.cat([job.image for job in jobs]))
        # 3-4. denoise: each stream's latent and noise, then step i for every stream still at step i
        with timer("denoise"):
            for job, latent in zip(jobs, latents.split(1), strict=True):
                job.denoiser._start(job, latent)
            steps = max(len(job.denoiser.timesteps) for job in jobs)
            for i in range(steps):
                active = [job for job in jobs if i < len(job.denoiser.timesteps)]
                rows = [job.denoiser._rows(job, i) for job in active]
                conds = [r[3] for r in rows]
                extra = {key: torch.cat([r[4][key] for r in rows]) for key in rows[0][4]}
                with timer(f"unet_{i + 1}"):
                    out = engine.run_unet(
                        torch.cat([r[0] for r in rows]),
                        torch.cat([r[1] for r in rows]),
                        torch.cat([r[2] for r in rows]),
                        None if conds[0] is None else torch.cat([c for c in conds if c is not None]),
                        extra or None,
                    )
                for job, part in zip(active, out.split([r[0].shape[0] for r in rows]), strict=True):
                    job.denoiser._step(job, i, part)
        # 5. decode: (B, C, h, w) -> (B, 3, H, W) in [0, 1]
        with timer("decode"):
            images = engine.decode(torch.cat([job.result for job in jobs if job.result is not None]))
        shared = timer.finish()
        del shared["total"]
        # 6. postprocess, per stream
        return [
            job.denoiser._finish(job, image, shared) for job, image in zip(jobs, images.split(1), strict=True)
        ]
