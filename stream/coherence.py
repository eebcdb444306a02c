"""One stream's temporal coherence that follows the motion.

In-place latent feedback blends the previous output where the content WAS, and fixed noise stays
glued to the screen while the content moves. Given the input's optical flow (stream/flow.py, computed
off the model thread while the batch is encoded), a stream's `Coherence`:

- warps the previous output latent into the current frame before the feedback blend, occluded and
  disoccluded pixels taking the current frame's latent (`feedback_warp`), whether the feedback is
  blended into the input latent or into each denoising step's clean-latent estimate (`feedback_at`);
- carries the stream's noise along the flow (`noise="warped"`): the noise is split into unit Gaussian
  sub-samples on the flow's finer grid (summing back to it exactly), those move by nearest-sample
  transport with fresh noise where the flow leaves holes, and each latent pixel is their block sum / k:
  every latent pixel stays unit Gaussian and the noise moves by a fraction of a latent pixel (a latent
  pixel is 8-16 canvas pixels) without blurring; exactly fixed on a still scene;
- moves the previous output IMAGE along the motion before `image_feedback` blends it into the new
  one after decoding: the flow is upsampled to the canvas, so the image moves by fractions of a latent
  pixel, which a decoder may not draw from a warped latent;
- lowers strength when the input moves fast, within the share the user allows (`motion_strength`);
- reports a scene cut (the flow fails almost everywhere), after which the stream starts over.

On a still frame (nothing moves by half a canvas pixel) the feedback blends in place and the noise does
not move, so a still scene behaves exactly as without any of this.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import cv2
import numpy as np
import torch

from stream import temporal
from stream.config import MAX_TRAIN_TIMESTEPS, StreamConfig
from stream.flow import FlowTracker, Motion, pixel_grid
from stream.frames import Geometry

NOISE_GRID = 4  # warped noise moves on a grid this many times finer than the latent (when the flow's is)
FULL_SPEED = 0.03  # motion-aware strength is lowered fully at this share of the canvas's longer side a frame
SPEED_SMOOTHING = 0.5  # exponential smoothing of the speed from frame to frame (0 = none)


def follows_motion(config: StreamConfig) -> bool:
    """Whether the stream needs the input's optical flow at all."""
    return (
        ((config.latent_feedback > 0 or config.image_feedback > 0) and config.feedback_warp)
        or config.noise == "warped"
        or config.motion_strength > 0
    )


def latent_feedback(
    config: StreamConfig, coherence: Coherence | None, latent: torch.Tensor, previous: torch.Tensor | None
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """The previous output latent fed back as the config says: blended into the new frame's `latent`
    (returned blended, no pull), or at the steps (`latent` returned as it is, with the pull that
    frame_plan.step applies); along the motion when `coherence` follows it and feedback_warp is on."""
    warp = coherence if config.feedback_warp else None
    weight = config.latent_feedback
    if config.feedback_at == "steps":
        pull = warp.pull if warp is not None else temporal.feedback_pull
        return latent, pull(latent, previous, weight)
    if warp is not None:
        return warp.blend(latent, previous, weight), None
    return temporal.feedback_blend(latent, previous, weight), None


def image_feedback(
    config: StreamConfig, motion: Motion | None, image: torch.Tensor, previous: torch.Tensor | None
) -> torch.Tensor:
    """The previous output image blended into the new one (both (1, 3, H, W) decoded canvases in [0, 1]),
    by `config.image_feedback`: moved along `motion` first with feedback_warp (occluded and disoccluded
    pixels keep the new image), in place on a still frame, with feedback_warp off, or without a motion;
    not at all after a scene cut."""
    weight = config.image_feedback
    if (
        previous is None
        or weight <= 0.0
        or previous.shape != image.shape
        or (motion is not None and motion.cut)
    ):
        return image
    if not config.feedback_warp or motion is None or not _moving(motion):
        return _blend(image, previous.to(image.dtype), weight)
    size = (image.shape[-2], image.shape[-1])
    if image.device.type == "cpu":  # OpenCV's remap is faster there than grid_sample
        return _warped_blend_cpu(image, previous, weight, motion, size)
    flow, valid = canvas_flow(motion, size, image.device)
    moved = temporal.warp(previous.to(image.dtype), flow)
    return _blend(image, moved, weight * valid.to(image.dtype)[None, None])


def _blend(image: torch.Tensor, moved: torch.Tensor, share: torch.Tensor | float) -> torch.Tensor:
    """image + share (moved - image), a non-finite value of the moved previous image taken as black: a
    failed (fp16) decode's NaN fades out over the next frames instead of being carried on for ever."""
    return torch.lerp(image, moved.nan_to_num(0.0, 1.0, 0.0), share)


def _warped_blend_cpu(
    image: torch.Tensor, previous: torch.Tensor, weight: float, motion: Motion, size: tuple[int, int]
) -> torch.Tensor:
    """The warped blend of a (1, 3, H, W) CPU image along the motion, the previous image moved with
    OpenCV (as canvas_flow and temporal.warp would move it)."""
    height, width = size
    grid_h, grid_w = motion.valid.shape
    flow = cv2.resize(motion.flow, (width, height), interpolation=cv2.INTER_LINEAR)
    valid = cv2.resize(motion.valid, (width, height), interpolation=cv2.INTER_LINEAR)
    xs, ys = pixel_grid(height, width)
    planes = previous[0].float().contiguous().numpy()  # (3, H, W): each plane moved alike
    map_x, map_y = xs + flow[..., 0] * (width / grid_w), ys + flow[..., 1] * (height / grid_h)
    moved = np.stack(
        [cv2.remap(p, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE) for p in planes]
    )
    share = torch.from_numpy(valid * weight)[None, None].to(image.dtype)
    return _blend(image, torch.from_numpy(moved)[None].to(image.dtype), share)


def canvas_flow(
    motion: Motion, size: tuple[int, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The motion's flow on the model canvas of `size` (H, W): (H, W, 2) in canvas px and the (H, W)
    share trusted, bilinear from the flow grid (each flow pixel's value at its centre, as cv2.resize)."""
    height, width = size
    grid_h, grid_w = motion.valid.shape
    flow = torch.from_numpy(motion.flow).to(device).permute(2, 0, 1)[None]  # (1, 2, h, w)
    flow = torch.nn.functional.interpolate(flow, size=size, mode="bilinear", align_corners=False)[0]
    flow = flow * torch.tensor([width / grid_w, height / grid_h], device=device).view(2, 1, 1)
    valid = torch.from_numpy(motion.valid).to(device)[None, None]
    valid = torch.nn.functional.interpolate(valid, size=size, mode="bilinear", align_corners=False)[0, 0]
    return flow.permute(1, 2, 0), valid


@dataclass(frozen=True)
class _Followed:
    """What a flow thread made of a frame's motion for the model thread (CPU tensors)."""

    flow: torch.Tensor  # (h, w, 2) in latent px
    valid: torch.Tensor  # (h, w) the share of each latent pixel the flow can be trusted on
    source: list[torch.Tensor] | None  # the warped noise's fine samples it moved, if it moved them
    moved: tuple[list[torch.Tensor], torch.Tensor] | None  # those moved, and their sub-pixel offsets


def _moving(motion: Motion) -> bool:
    return not motion.still and not motion.cut


def _noise_grid(motion: Motion) -> int:
    """How many times finer than the latent warped noise moves: the finest that divides the flow's."""
    return max(d for d in range(1, NOISE_GRID + 1) if motion.cell % d == 0)


class Coherence:
    """A stream's flow tracker, its warped noise's sub-pixel offsets, its smoothed speed."""

    def __init__(self, latent: tuple[int, int], vae_factor: int, device: torch.device) -> None:
        self.tracker = FlowTracker(latent, vae_factor)
        self.device = device
        self.canvas_side = max(latent) * vae_factor
        # Warped noise on the finer grid, kept on the CPU (where its generator is): (1, C, h k, w k) each.
        self.fine: list[torch.Tensor] | None = None
        self.residual = torch.zeros(0)  # (h k, w k, 2) its samples' sub-pixel offsets
        self._carried: torch.Tensor | None = None  # the noise `carry` returned last
        self.speed: float | None = None  # smoothed, canvas px a frame
        self.motion: Motion | None = None  # the current frame's (None: the stream's first frame)
        self._flow: tuple[torch.Tensor, torch.Tensor] | None = None
        self._followed: _Followed | None = None

    def submit(self, frame: np.ndarray, geometry: Geometry, generator: torch.Generator | None = None) -> None:
        """Start the flow from the previous frame the model ran on to this one on the flow threads, and
        there too the flow on the latent grid and, given the warped noise's `generator`, the noise
        moved along it: all the model thread has left to do is to use them."""
        fine = self.fine if generator is not None else None
        self.tracker.submit(frame, geometry, partial(self._follow, fine, self.residual, generator))

    def _follow(
        self,
        fine: list[torch.Tensor] | None,
        residual: torch.Tensor,
        generator: torch.Generator | None,
        motion: Motion,
    ) -> _Followed:
        """On a flow thread: what the model thread needs of the motion, made ready."""
        flow, valid = (torch.from_numpy(a) for a in motion.on_grid(1))
        moved = None
        if fine is not None and generator is not None and _moving(motion):
            fine_flow, fine_valid = (torch.from_numpy(a) for a in motion.on_grid(_noise_grid(motion)))
            moved = temporal.transport_noise(fine, residual, fine_flow, fine_valid, generator)
        return _Followed(flow, valid, fine, moved)

    def wait(self) -> Motion | None:
        """This frame's motion (waits for the flow); a scene cut forgets the noise offsets and speed."""
        motion = self.motion = self.tracker.result()
        followed = self.tracker.followed
        self._followed = followed if isinstance(followed, _Followed) else None
        self._flow = None
        if motion is None:
            return None
        if motion.cut:
            self.fine = None
            self.speed = None
        elif self.speed is None:
            self.speed = motion.speed
        else:
            self.speed = SPEED_SMOOTHING * self.speed + (1.0 - SPEED_SMOOTHING) * motion.speed
        return motion

    def moving(self) -> bool:
        return self.motion is not None and _moving(self.motion)

    def blend(self, latent: torch.Tensor, previous: torch.Tensor | None, weight: float) -> torch.Tensor:
        """Latent feedback into the input along the motion; in place on a still frame."""
        if not self.moving():
            return temporal.feedback_blend(latent, previous, weight)
        return temporal.warped_feedback_blend(latent, previous, weight, *self._latent_flow())

    def pull(
        self, latent: torch.Tensor, previous: torch.Tensor | None, weight: float
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Latent feedback at the steps along the motion (temporal.feedback_pull); in place on a still
        frame."""
        if not self.moving():
            return temporal.feedback_pull(latent, previous, weight)
        return temporal.feedback_pull(latent, previous, weight, *self._latent_flow())

    def _latent_flow(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This frame's flow (h, w, 2) in latent px and trusted share (h, w), on the device, made once."""
        assert self.motion is not None
        if self._flow is None:
            if self._followed is None:
                flow, valid = (torch.from_numpy(a) for a in self.motion.on_grid(1))
            else:
                flow, valid = self._followed.flow, self._followed.valid
            self._flow = (flow.to(self.device), valid.to(self.device))
        return self._flow

    def carry(self, noise: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
        """The stream's noise moved with the content; unchanged on a still frame."""
        if not self.moving():
            return noise
        assert self.motion is not None
        k = _noise_grid(self.motion)
        ready = self._followed.moved if self._followed is not None else None
        if self.fine is None or self._carried is not noise[0]:  # new noise: split it on the fine grid
            self.fine = [temporal.upsample_noise(n.cpu().float(), k, generator) for n in noise]
            self.residual = torch.zeros(*self.fine[0].shape[-2:], 2)
            ready = None
        elif self._followed is None or self._followed.source is not self.fine:
            ready = None  # moved on the flow thread from other noise than this: move it here
        if ready is None:
            flow, valid = (torch.from_numpy(a) for a in self.motion.on_grid(k))  # (h k, w k, 2), (h k, w k)
            ready = temporal.transport_noise(self.fine, self.residual, flow, valid, generator)
        self.fine, self.residual = ready
        moved = [
            temporal.downsample_noise(f, k).to(n.device, n.dtype)
            for f, n in zip(self.fine, noise, strict=True)
        ]
        self._carried = moved[0]
        return moved

    def strength(self, config: StreamConfig) -> float:
        """The frame's strength: config.strength lowered by up to config.motion_strength of it as the
        smoothed speed reaches FULL_SPEED (rounded to 0.01, so the schedule changes only that often)."""
        least = config.steps / MAX_TRAIN_TIMESTEPS
        lowered = temporal.motion_strength(
            config.strength, self.speed or 0.0, config.motion_strength, FULL_SPEED * self.canvas_side, least
        )
        if lowered >= config.strength:
            return config.strength
        return min(config.strength, max(least, round(lowered, 2)))
