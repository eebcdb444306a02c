"""Frame geometry and timing: how a frame of any size maps into the model's canvas and back, and the
per-stage timer."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Geometry:
    """How a frame of one size maps into the model's canvas (letterbox) and back."""

    src: tuple[int, int]  # (h, w) of the incoming frame
    inner: tuple[int, int]  # (h, w) of the scaled frame inside the canvas
    offset: tuple[int, int]  # (top, left) of it
    canvas: tuple[int, int]  # (H, W) model size


def letterbox_geometry(src: tuple[int, int], canvas: tuple[int, int]) -> Geometry:
    """Fit an (h, w) frame inside the (H, W) canvas keeping its aspect ratio, centred."""
    h, w = int(src[0]), int(src[1])
    H, W = canvas
    scale = min(H / h, W / w)
    ih, iw = max(1, min(H, round(h * scale))), max(1, min(W, round(w * scale)))
    return Geometry(src=(h, w), inner=(ih, iw), offset=((H - ih) // 2, (W - iw) // 2), canvas=(H, W))


class StageTimer:
    """Milliseconds per stage, and the frame's wall-clock `total`.

    On the CPU each stage is wall-clock time. On CUDA each stage is the time between two CUDA events
    recorded around it (no synchronization in the middle of a frame); they are read once, at `finish`,
    which waits for the last stage's event only, never for the whole device.
    """

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._start = time.perf_counter()
        self._events: list[tuple[str, Any, Any]] = []
        self.timings: dict[str, float] = {}

    @property
    def started(self) -> float:
        """time.perf_counter() when the frame started."""
        return self._start

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if self._cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((stage, start, end))
            return
        begin = time.perf_counter()
        yield
        self.timings[stage] = (time.perf_counter() - begin) * 1000.0

    def finish(self) -> dict[str, float]:
        if self._cuda and self._events:
            self._events[-1][2].synchronize()  # the last stage's end: every stage before it is done too
            for stage, start, end in self._events:
                self.timings[stage] = float(start.elapsed_time(end))
        self.timings["total"] = (time.perf_counter() - self._start) * 1000.0
        return self.timings


def to_canvas(pixels: torch.Tensor, geometry: Geometry, dtype: torch.dtype) -> torch.Tensor:
    """(h, w, 3) uint8 -> (1, 3, H, W) in [-1, 1], letterboxed into the model canvas (edges replicated)."""
    x = pixels.permute(2, 0, 1).unsqueeze(0).to(dtype) / 127.5 - 1.0  # (1, 3, h, w)
    if geometry.inner != geometry.src:
        x = F.interpolate(
            x.float(), size=geometry.inner, mode="bilinear", antialias=True, align_corners=False
        ).to(dtype)
    (top, left), (ih, iw), (ch, cw) = geometry.offset, geometry.inner, geometry.canvas
    if (ih, iw) != (ch, cw):
        x = F.pad(x.float(), (left, cw - iw - left, top, ch - ih - top), mode="replicate").to(dtype)
    return x


def from_canvas(image: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1] -> (h, w, 3) uint8 at the frame's own size, on the image's device."""
    (top, left), (ih, iw) = geometry.offset, geometry.inner
    image = image[:, :, top : top + ih, left : left + iw]
    if geometry.inner != geometry.src:
        image = F.interpolate(
            image.float(), size=geometry.src, mode="bilinear", antialias=True, align_corners=False
        )
    return (image[0].float() * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)


def check_frame(frame: object) -> None:
    """A frame for a denoiser: HxWx3 uint8 RGB, not empty (the one input its caller cannot validate)."""
    if not (
        isinstance(frame, np.ndarray)
        and frame.dtype == np.uint8
        and frame.ndim == 3
        and frame.shape[2] == 3
        and frame.shape[0] > 0
        and frame.shape[1] > 0
    ):
        got = f"{frame.dtype} array of shape {frame.shape}" if isinstance(frame, np.ndarray) else type(frame)
        raise ValueError(f"frame must be an HxWx3 uint8 RGB array, got {got}")
