"""Stream Batch: the k denoising steps of k consecutive frames of one stream, as one UNet call.

Each call a new frame enters at its first step and every frame in flight advances one step, in the same
UNet call (one row, or two with full CFG, per frame, each at its own timestep); the frame that has done
its last step leaves (StreamDiffusion, arXiv 2312.12491, sec. 3.1 "Batching the denoise step"). It trades
k-1 frames of delay for one UNet call per frame instead of k.

Unlike StreamDiffusion's demo:
- the first k-1 calls emit nothing (no warm-up frames made from noise);
- each frame keeps the settings it entered with (its `Plan`): a prompt or setting change applies to the
  frames entering after it;
- each frame carries its caller's label (`tag`: the server passes the input frame, whose pts the output
  takes) and the time it entered, so the output has its own input's timing and the added delay is
  measured (`in_flight`, ms);
- outputs leave in input order: when a step-count change lets a newer frame finish first, the older
  ones still in flight are dropped (counted in `dropped`) rather than sent late.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from stream import frame_plan
from stream.flow import Motion
from stream.frame_plan import Plan, Pull, Rows


@dataclass
class InFlight:
    """One input frame being denoised, with its own plan, noise and label."""

    tag: Any  # the caller's label of the input (the server: the input frame, for its pts)
    plan: Plan
    x: torch.Tensor  # (1, C, h, w) the sample, at timestep plan.t[step]
    reference: torch.Tensor  # (1, C, h, w) residual CFG's x_0
    noise: list[torch.Tensor]  # [initial, LCM's step noises...]
    entered: float = field(default_factory=time.perf_counter)  # when the frame's call started
    step: int = 0  # steps done
    result: torch.Tensor | None = None  # (1, C, h, w) the final latent, once the last step is done
    control: torch.Tensor | None = None  # (1, 3, H, W) the frame's ControlNet conditioning image
    pull: Pull | None = None  # latent feedback at the steps: (target, weight), see frame_plan.step
    motion: Motion | None = None  # how the input moved from the frame before it (image feedback)
    after_drop: bool = False  # it leaves after frames dropped before it: no output of its previous input

    def rows(self) -> Rows:
        return frame_plan.unet_rows(self.plan, self.x, self.step, self.control)

    def row_count(self) -> int:
        return self.plan.rows(self.step)

    def advanced(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(x, reference, result) after this frame's step from its rows `out` of the UNet output."""
        return frame_plan.step(self.plan, self.x, self.reference, self.noise, self.step, out, self.pull)

    def commit(self, advanced: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]) -> None:
        self.x, self.reference, self.result = advanced
        self.step += 1


class StreamBatch:
    """One stream's frames in flight, oldest first; at most one per step of their plans."""

    def __init__(self) -> None:
        self.frames: list[InFlight] = []
        self.dropped = 0  # frames dropped so that outputs leave in input order

    def __len__(self) -> int:
        return len(self.frames)

    def clear(self) -> None:
        self.frames = []

    def rows(self, entering: InFlight) -> Rows:
        """One UNet call's rows for every frame in flight and the one entering."""
        return frame_plan.concat_rows([f.rows() for f in (*self.frames, entering)])

    def advance(self, entering: InFlight, out: torch.Tensor) -> InFlight | None:
        """Apply the UNet output of `rows(entering)`: every frame one step on, `entering` joins; returns
        the frame that leaves (its `result` is the final latent), or None. Nothing changes until every
        frame's step is computed, so a failure leaves the pipeline as it was."""
        frames = [*self.frames, entering]
        parts = out.split([f.row_count() for f in frames])
        advanced = [f.advanced(part) for f, part in zip(frames, parts, strict=True)]
        for f, new in zip(frames, advanced, strict=True):
            f.commit(new)
        done = [i for i, f in enumerate(frames) if f.result is not None]
        if not done:
            self.frames = frames
            return None
        newest = done[-1]  # older frames, finished or not, would leave out of order: dropped
        self.dropped += newest
        frames[newest].after_drop = newest > 0
        self.frames = frames[newest + 1 :]
        return frames[newest]
