"""Optical flow of a stream's input, at latent resolution, off the model thread.

Each frame the model runs on is letterboxed into a small grayscale copy of the model canvas (the
latent grid times `cell`, the longer side near FLOW_SIDE px), and OpenCV's DIS optical flow (Kroeger
et al. 2016: its ultrafast preset with variational refinement, see `dis_flow`) runs both ways
between it and the previous one on a small shared thread pool (`flow_threads`): `FlowTracker.submit`
starts it as the frame is preprocessed, `FlowTracker.result` waits for it after the batch's VAE
encode, so the flow overlaps the encode instead of adding to it (for a single stream the encode is
short, and the model thread waits for most of the flow).

The backward flow (current -> previous) says where each pixel's content was; pixels failing the
forward-backward consistency test of Sundaram et al. 2010, warping from outside the frame, or whose
brightness does not match where the flow says they came from are occluded or disoccluded. At latent
resolution both are averaged over each latent pixel's `cell` x `cell` block: a flow in latent pixels
and the share of each latent pixel that can be trusted. A frame where almost no pixel can be trusted
is a scene cut; a frame where almost nothing moves is still.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from stream.frames import Geometry

FLOW_SIDE = 128  # the flow runs at about this many pixels on the canvas's longer side (or the latent's)
STILL_PX = 0.5  # still: 99 % of pixels move less than this many canvas pixels
CUT_VALID = 0.25  # scene cut: fewer than this share of pixels follow the flow
PHOTO_TOLERANCE = 24.0  # brightness (0-255) a pixel may differ from where the flow says it came from
DIS_REFINEMENT = 5  # DIS's variational refinement iterations at each scale (the ultrafast preset: none)

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


@dataclass(frozen=True)
class Motion:
    """How the previous frame maps into the current one, on the flow grid (the latent grid x `cell`)."""

    flow: np.ndarray  # (H, W, 2) float32, flow px: the previous frame holds pixel x's content at x + flow
    valid: np.ndarray  # (H, W) float32, 1 where the flow can be trusted, else 0
    cell: int  # flow pixels per latent pixel, per side
    speed: float  # mean |flow| in canvas pixels a frame, over the trusted pixels
    still: bool  # nothing moves (99 % of pixels under STILL_PX canvas pixels)
    cut: bool  # a scene cut: the flow fails almost everywhere

    def on_grid(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The flow on the latent grid times k (k divides `cell`): (h k, w k, 2) float32 in that grid's
        pixels (each cell's mean) and (h k, w k) float32 in [0, 1], the share of each cell trusted."""
        if self.cell % k:
            raise ValueError(f"the flow's grid ({self.cell} per latent pixel) cannot be split in {k}")
        r = self.cell // k
        if r == 1:
            return self.flow, self.valid
        H, W = self.valid.shape
        size = (W // r, H // r)  # an area resize by a whole factor is the mean of each r x r block
        flow = cv2.resize(self.flow, size, interpolation=cv2.INTER_AREA) / r
        return flow, cv2.resize(self.valid, size, interpolation=cv2.INTER_AREA)


def dis_flow() -> Any:
    """A cv2.DISOpticalFlow for images of about FLOW_SIDE px: the ultrafast preset, with variational
    refinement. Over sub-pixel pans, zooms and a turn of three photos the preset's mean endpoint error
    is 0.34 px, and a feedback warped by its flow drifts off its content; the refinement brings it to
    0.22 px for about 0.6 ms instead of 0.4 ms of one CPU core for the two ways at 128 x 128. Going
    down to half the image's resolution as well would bring it to 0.10 px, but for about 1.8 ms: the
    model waits for the flow after the VAE encode, which hides little of it for a single stream, so
    that would add about 1.2 ms to every frame (`python -m benchmarks.flow_accuracy`).
    """
    dis = cv2.DISOpticalFlow.create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)
    dis.setVariationalRefinementIterations(DIS_REFINEMENT)
    return dis


def flow_cell(latent: tuple[int, int], vae_factor: int) -> int:
    """Flow pixels per latent pixel (per side): the flow grid is the latent grid times this (never
    finer than the canvas itself)."""
    return max(1, min(vae_factor, FLOW_SIDE // max(latent)))


def canvas_gray(frame: np.ndarray, geometry: Geometry, size: tuple[int, int]) -> np.ndarray:
    """An HxWx3 uint8 RGB frame letterboxed (as the model sees it) into a (h, w) uint8 gray image."""
    h, w = size
    (H, W), (ih, iw), (top, left) = geometry.canvas, geometry.inner, geometry.offset
    sy, sx = h / H, w / W
    y0, x0 = round(top * sy), round(left * sx)
    y1, x1 = max(y0 + 1, round((top + ih) * sy)), max(x0 + 1, round((left + iw) * sx))
    gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    inner = cv2.resize(gray, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
    if (y1 - y0, x1 - x0) == (h, w):
        return inner
    return cv2.copyMakeBorder(inner, y0, h - y1, x0, w - x1, cv2.BORDER_REPLICATE)


def estimate_motion(dis: Any, previous: np.ndarray, current: np.ndarray, cell: int, scale: float) -> Motion:
    """DIS flow both ways (`dis`: a cv2.DISOpticalFlow) between two gray images whose sides are the
    latent's times `cell`; `scale`: canvas pixels per flow pixel."""
    H, W = current.shape
    backward = dis.calc(current, previous, None)  # (H, W, 2): current pixel x came from x + backward
    forward = dis.calc(previous, current, None)
    xs, ys = pixel_grid(H, W)
    bx, by = cv2.split(backward)
    map_x, map_y = xs + bx, ys + by
    fx, fy = cv2.split(cv2.remap(forward, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE))
    loop = (fx + bx) ** 2 + (fy + by) ** 2  # 0 where the two flows agree
    moved2 = bx * bx + by * by
    consistent = loop <= 0.01 * (fx * fx + fy * fy + moved2) + 0.5
    inside = (map_x >= 0) & (map_x <= W - 1) & (map_y >= 0) & (map_y <= H - 1)
    came_from = cv2.remap(previous, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    matches = cv2.absdiff(current, came_from) <= PHOTO_TOLERANCE
    trusted = consistent & inside
    valid = trusted.astype(np.float32)
    followed = float((trusted & matches).mean())  # the brightness check only decides a cut
    magnitude = np.sqrt(moved2) * scale  # canvas px
    return Motion(
        flow=backward,
        valid=valid,
        cell=cell,
        speed=float((magnitude * valid).sum() / max(valid.sum(), 1.0)),
        still=bool(np.count_nonzero(magnitude >= STILL_PX) < 0.01 * magnitude.size),
        cut=bool(followed < CUT_VALID),
    )


@functools.lru_cache(maxsize=8)
def pixel_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(h, w) float32 x and y coordinates of each pixel (read only)."""
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    xs.flags.writeable = ys.flags.writeable = False
    return xs, ys


def flow_threads(cores: int | None) -> int:
    """How many flow threads the streams share on a machine with `cores` CPU cores: half of them, at
    least 2 and at most 8 (a stream's flow and warped noise take about 1.5 ms of a core a frame at
    128 x 128, so 2 threads keep up with about 50 streams at 24 FPS, if the machine has the cores)."""
    return max(2, min(8, (cores or 2) // 2))


def _executor() -> ThreadPoolExecutor:
    """The flow threads every stream shares (OpenCV releases the GIL while it computes)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            threads = flow_threads(os.cpu_count())
            _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="stream-flow")
        return _pool


class FlowTracker:
    """One stream's flow: the previous gray image and at most one flow in flight."""

    def __init__(self, latent: tuple[int, int], vae_factor: int) -> None:
        self.latent = latent
        self.cell = flow_cell(latent, vae_factor)
        self.size = (latent[0] * self.cell, latent[1] * self.cell)
        self.scale = vae_factor / self.cell  # canvas px per flow px
        self._dis: Any = dis_flow()
        self._previous: np.ndarray | None = None
        self._pending: Future[tuple[Motion, object]] | None = None
        self.followed: object = None  # what `then` made of the last result's motion

    def submit(
        self, frame: np.ndarray, geometry: Geometry, then: Callable[[Motion], object] | None = None
    ) -> None:
        """Start the flow from the last submitted frame to this one (the first frame has none), and
        `then(motion)` after it on the same flow thread (work that needs only the motion)."""
        current = canvas_gray(frame, geometry, self.size)
        previous, self._previous = self._previous, current
        if previous is None:
            self._pending = None
            return
        self._pending = _executor().submit(self._run, previous, current, then)

    def _run(
        self, previous: np.ndarray, current: np.ndarray, then: Callable[[Motion], object] | None
    ) -> tuple[Motion, object]:
        motion = estimate_motion(self._dis, previous, current, self.cell, self.scale)
        return motion, None if then is None else then(motion)

    def result(self) -> Motion | None:
        """The flow of the last submitted frame (None for a stream's first frame); waits for it."""
        pending, self._pending = self._pending, None
        if pending is None:
            self.followed = None
            return None
        motion, self.followed = pending.result()
        return motion
