"""Frame geometry and timing: how a frame of any size maps into the model's canvas and back, and the
per-stage timer."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


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
