"""A round of several streams' frames through the shared engine together.

`process_batch` takes streams that share an engine and a latent shape (equal `batch_key()`): one VAE
encode for all, one UNet call per step for the rows of every stream still at that step (a stream with
Stream Batch joins the first call with all its frames in flight), one VAE decode. Each stream's own
work (preprocess, latent, step math, postprocess) stays on its StreamDenoiser; this module only
gathers and splits the batched calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from stream.config import MAX_STEPS
from stream.engine import Engine
from stream.frame_plan import concat_rows
from stream.frames import StageTimer

if TYPE_CHECKING:
    from stream.denoiser import StreamDenoiser
    from stream.stream_batch import InFlight

EMPTY = np.zeros((0, 0, 3), dtype=np.uint8)  # the frame of a result with nothing to show


@dataclass
class FrameResult:
    frame: np.ndarray  # HxWx3 uint8 RGB, the input's size
    timings: dict[str, float]  # ms per stage (STAGES), each step's UNet call (unet_1, ...), and "total"
    skipped: bool = False  # the similarity filter returned the previous output
    # the output canvas (1, 3, H, W) in [0, 1] (with image feedback blended in), before uint8
    image: torch.Tensor | None = None
    # Stream Batch: no frame left the pipeline on this call (its first k-1 calls, a frame the similarity
    # filter skipped, or an out-of-order one dropped); `frame` is EMPTY and nothing should be shown
    pending: bool = False
    tag: Any = None  # the label given with the input this frame came from (Stream Batch: an older input)


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
    tag: Any = None  # the caller's label of this input
    calls: int = 0  # UNet calls this job takes part in: its steps, or 1 with Stream Batch
    frame: InFlight | None = None  # the frame entering the denoising
    control: torch.Tensor | None = None  # (1, 3, H, W) the ControlNet's conditioning image in [0, 1]


def process_batch(
    denoisers: Sequence[StreamDenoiser], frames: Sequence[np.ndarray], tags: Sequence[Any] | None = None
) -> list[FrameResult | Exception]:
    """Frames of several streams that share an engine and a latent shape, through the model together.

    One VAE encode, one UNet call per step for the rows of every stream still at that step (streams
    with fewer steps leave early), one VAE decode. Returns one result per stream, in order: a
    FrameResult, or the exception that stream's own frame raised (a bad frame costs that stream only).
    An exception of a batched call propagates: the caller may run the streams one by one.
    `tags` label the inputs (e.g. their pts): a result's `tag` is its input's (with Stream Batch, the
    older input the frame came from).
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
        begun.tag = None if tags is None else tags[index]
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
            steps = max(job.calls for job in jobs)
            for i in range(steps):
                active = [job for job in jobs if i < job.calls]
                rows = [job.denoiser._rows(job, i) for job in active]
                x, t, embeds, cond, extra = concat_rows(rows)
                with timer(f"unet_{i + 1}"):
                    out = engine.run_unet(x, t, embeds, cond, extra or None)
                for job, part in zip(active, out.split([r[0].shape[0] for r in rows]), strict=True):
                    job.denoiser._step(job, i, part)
        # 5. decode: (B, C, h, w) -> (B, 3, H, W) in [0, 1]
        done = [job for job in jobs if job.result is not None]  # Stream Batch: maybe none left yet
        finals = [job.result for job in jobs if job.result is not None]
        with timer("decode"):
            images = engine.decode(torch.cat(finals)).split(1) if finals else []
        decoded = {id(job): image for job, image in zip(done, images, strict=True)}
        # 6. postprocess, per stream; the shared stages' timings are read after it (on CUDA reading them
        # waits for the device, which the frames' downloads have done by then)
        results = [job.denoiser._finish(job, decoded.get(id(job)), {}) for job in jobs]
        shared = timer.finish()
        del shared["total"]
        for result in results:
            result.timings = {**shared, **result.timings}
        return results


def drain(denoiser: StreamDenoiser, frame: np.ndarray) -> list[FrameResult]:
    """Stream Batch at the end of an input: the frames still in flight, each run to its last step and
    returned in input order. `frame` (the last input) is fed again as filler, past the similarity
    filter, until no real frame is left in flight; what the filler makes is not returned."""
    filler, done = object(), []
    for _ in range(MAX_STEPS):  # each call moves every frame in flight a step on
        if all(f.tag is filler for f in denoiser._state.pipeline.frames):
            break
        denoiser._state.last_input = None  # the filler is the last input again: it must not be skipped
        result = denoiser.process(frame, tag=filler)
        if not result.pending and result.tag is not filler:
            done.append(result)
    return done
