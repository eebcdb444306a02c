"""benchmarks/temporal.py's measures: the warp error of consecutive frames along the input's own optical
flow (DIS, medium preset, with the forward-backward occlusion test), the change between them, and each
frame's contrast."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np


@dataclass(frozen=True)
class Warp:
    """How frame t-1 maps into frame t: remap coordinates and the pixels where that can be trusted."""

    map_x: np.ndarray  # (H, W) float32, x + backward flow
    map_y: np.ndarray  # (H, W) float32
    valid: np.ndarray  # (H, W) bool: consistent forward/backward flow, source inside the frame


# ---------------------------------------------------------------------- measures
def input_warps(frames: Sequence[np.ndarray]) -> list[Warp]:
    """DIS optical flow between consecutive input frames, as warps of frame t-1 into frame t."""
    dis = cv2.DISOpticalFlow.create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)  # = DISOpticalFlow_create
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    return [warp_between(dis, gray[t - 1], gray[t]) for t in range(1, len(gray))]


def warp_between(dis: Any, previous: np.ndarray, current: np.ndarray) -> Warp:
    """Backward flow current -> previous with the forward-backward occlusion test (Sundaram et al. 2010)."""
    h, w = current.shape
    backward = dis.calc(current, previous, None)  # (H, W, 2): current(x) ~ previous(x + backward(x))
    forward = dis.calc(previous, current, None)  # (H, W, 2): previous(y) ~ current(y + forward(y))
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    map_x, map_y = xs + backward[..., 0], ys + backward[..., 1]
    forward_there = cv2.remap(forward, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    loop = np.sum((forward_there + backward) ** 2, axis=-1)  # 0 where the two flows agree
    scale = np.sum(forward_there**2, axis=-1) + np.sum(backward**2, axis=-1)
    consistent = loop <= 0.01 * scale + 0.5
    inside = (map_x >= 0) & (map_x <= w - 1) & (map_y >= 0) & (map_y <= h - 1)
    return Warp(map_x, map_y, consistent & inside)


def warp_errors(frames: Sequence[np.ndarray], warps: Sequence[Warp]) -> list[float]:
    """Per pair: mean |frame_t - frame_t-1 warped into t| over valid pixels, on 0-255 (nan if none)."""
    errors = []
    for t, warp in enumerate(warps, start=1):
        warped = cv2.remap(
            frames[t - 1].astype(np.float32),
            warp.map_x,
            warp.map_y,
            cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )
        diff = np.abs(frames[t].astype(np.float32) - warped)[warp.valid]  # (N, 3)
        errors.append(float(diff.mean()) if diff.size else float("nan"))
    return errors


def stuck_errors(frames: Sequence[np.ndarray], warps: Sequence[Warp]) -> list[float]:
    """Per pair: the warp error frame t would have if frame t-1 had been the same picture, i.e. frame t
    against itself warped: what an output standing still on the screen scores. Below it, the output
    moved with the content better than a still picture would; at or above it, no better."""
    return [warp_errors([frames[t], frames[t]], [warp])[0] for t, warp in enumerate(warps, start=1)]


def frame_changes(frames: Sequence[np.ndarray]) -> list[float]:
    """Per pair: mean |frame_t - frame_t-1| on 0-255."""
    return [
        float(np.abs(b.astype(np.float32) - a.astype(np.float32)).mean())
        for a, b in zip(frames, frames[1:], strict=False)
    ]


def contrasts(frames: Sequence[np.ndarray]) -> list[float]:
    """Per frame: mean |value - the frame's mean colour| on 0-255. Blending frames whose details do not
    line up dulls them, which lowers the warp error and the change by itself (a grey output is
    perfectly steady): the warp error is read against this."""
    out = []
    for f in frames:
        values = f.astype(np.float32)
        out.append(float(np.abs(values - values.mean(axis=(0, 1))).mean()))
    return out


def mean_of(values: Sequence[float]) -> float:
    return float(np.nanmean(values)) if len(values) else float("nan")
