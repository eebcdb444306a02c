"""The latency budget monitor: per-stage timings, rolling p50/p95/p99, FPS in and out and the budget.
The adaptive controller that keeps a stream inside its budget is in adaptive.py.

Stages of one frame (milliseconds): `wait` (in the input slot), `preprocess`, `encode` (VAE),
`unet_1` ... `unet_k` (each step's UNet call; they are part of `denoise`), `denoise`, `decode` (VAE),
`postprocess`, `handoff` (from the processed frame to the video encoder taking it), `total` (the
model worker's time on the frame: preprocess to postprocess) and, in the server, `round` (the model
time of one round over every active stream sharing the worker: `total` when a stream is alone). The
budget is 1000 / target_fps ms of `round` (else `total`): the work one frame may take so that the
stream keeps its frame rate.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

SILENCE_S = 2.0  # seconds without a frame after which a stream's rate is 0

# The order in which stages are shown; unet_N stages sit after `denoise`'s other parts.
STAGE_ORDER = (
    "total",
    "round",
    "wait",
    "preprocess",
    "control",
    "encode",
    "denoise",
    "decode",
    "postprocess",
    "handoff",
)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between closest ranks; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def stage_names(keys: list[str] | tuple[str, ...] | Any) -> list[str]:
    """Stage names in display order: the fixed stages, then unet_1, unet_2, ... by number."""
    keys = set(keys)
    ordered = [k for k in STAGE_ORDER if k in keys]
    unets = sorted((k for k in keys if k.startswith("unet_") and k[5:].isdigit()), key=lambda k: int(k[5:]))
    rest = sorted(keys - set(ordered) - set(unets))
    return ordered + unets + rest


class RollingStats:
    """The last `window` samples of each timing (ms) and frame times, for p50/p95/p99 and FPS."""

    def __init__(self, window: int = 240) -> None:
        self.window = window
        self.samples: dict[str, deque[float]] = {}
        self.last: dict[str, int] = {}  # stage -> `count` when it was last sampled
        self.stamps: deque[float] = deque(maxlen=window)
        self.count = 0

    def add(self, timings: Mapping[str, float], now: float | None = None) -> None:
        """One frame: its timings, and its time for the frame rate."""
        self.count += 1
        for key, value in timings.items():
            self.sample(key, value)
        self.stamps.append(time.perf_counter() if now is None else now)

    def sample(self, key: str, value: float) -> None:
        """One timing that is not tied to a frame's arrival (e.g. a hand-off measured later)."""
        self.samples.setdefault(key, deque(maxlen=self.window)).append(value)
        self.last[key] = self.count

    def live(self, key: str, within: int) -> bool:
        """Whether `key` was sampled in the last `within` frames (e.g. unet_3 after steps went 4 -> 2: no)."""
        return key in self.last and self.count - self.last[key] <= within

    def percentiles(self, key: str, qs: tuple[float, ...] = (50, 95, 99)) -> tuple[float, ...]:
        values = list(self.samples.get(key, ()))
        return tuple(percentile(values, q) for q in qs)

    def fps(self, now: float | None = None) -> float:
        """Frames per second over the window (0 until two frames have been seen). With `now` (on the
        clock of the stamps), the rate as of then: a pause longer than a frame interval lowers it, and
        after SILENCE_S (or three intervals of a slow stream) without a frame it is 0."""
        if len(self.stamps) < 2 or self.stamps[-1] <= self.stamps[0]:
            return 0.0
        frames, span = len(self.stamps) - 1, self.stamps[-1] - self.stamps[0]
        if now is None:
            return frames / span
        interval, gap = span / frames, now - self.stamps[-1]
        if gap > max(SILENCE_S, 3 * interval):
            return 0.0
        return frames / (span + max(0.0, gap - interval))


# ---------------------------------------------------------------------- the monitor
class LatencyMonitor:
    """One stream's timings, frame rates, drops and skips, judged against its budget."""

    STALE_FRAMES = 24  # a stage not timed in this many frames no longer runs: left out of `latency()`

    def __init__(self, target_fps: float = 24.0, window: int = 240) -> None:
        if not (isinstance(target_fps, (int, float)) and math.isfinite(target_fps) and target_fps > 0):
            raise ValueError(f"target FPS must be a positive number, got {target_fps!r}")
        self.target_fps = float(target_fps)
        self.budget_ms = 1000.0 / self.target_fps
        self.out = RollingStats(window)  # processed frames and their stage timings
        self.inputs = RollingStats(window)  # arrivals
        self.frame_ms: deque[float] = deque(maxlen=window)  # what the budget judges, frames the model ran
        self.skipped = 0
        self.drops = 0

    def frame_in(self, now: float | None = None) -> None:
        self.inputs.add({}, now)

    def frame_out(
        self, timings: Mapping[str, float], skipped: bool = False, now: float | None = None
    ) -> None:
        """A processed frame. The budget judges its `round` (the model time of one round over every
        active stream sharing the model; `total` when there is no such figure), unless the similarity
        filter skipped the model for it."""
        self.out.add(timings, now)
        if skipped:
            self.skipped += 1
        else:
            self.frame_ms.append(timings.get("round", timings["total"]))

    def sample(self, stage: str, ms: float) -> None:
        self.out.sample(stage, ms)

    def budget_p95(self) -> float:
        return percentile(list(self.frame_ms), 95)

    def holds(self) -> bool | None:
        """Whether p95 of the frame time is within the budget (None before any frame)."""
        p95 = self.budget_p95()
        return None if math.isnan(p95) else p95 <= self.budget_ms

    def latency(self) -> dict[str, dict[str, float | None]]:
        table: dict[str, dict[str, float | None]] = {}
        for stage in stage_names(k for k in self.out.samples if self.out.live(k, self.STALE_FRAMES)):
            p50, p95, p99 = self.out.percentiles(stage)
            table[stage] = {"p50": _num(p50), "p95": _num(p95), "p99": _num(p99)}
        return table

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """Figures for /stats and telemetry; rates as of `now` (time.perf_counter()) when given."""
        p95 = self.budget_p95()
        return {
            "frames": self.out.count,
            "frames_in": self.inputs.count,
            "fps_in": round(self.inputs.fps(now), 2),
            "fps_out": round(self.out.fps(now), 2),
            "drops": self.drops,
            "skipped": self.skipped,
            "latency_ms": self.latency(),
            "budget": {
                "target_fps": self.target_fps,
                "budget_ms": round(self.budget_ms, 2),
                "p95_ms": _num(p95),
                "holds": self.holds(),
            },
        }


def _num(value: float) -> float | None:
    return None if value != value else round(value, 2)  # NaN (no samples yet) -> null
