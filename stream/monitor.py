"""Rolling latency statistics: per-stage percentiles and frame rate over a recent window."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between closest ranks; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class RollingStats:
    """The last `window` samples of each timing (ms) and frame times, for p50/p95/p99 and FPS."""

    def __init__(self, window: int = 240) -> None:
        self.window = window
        self.samples: dict[str, deque[float]] = {}
        self.stamps: deque[float] = deque(maxlen=window)
        self.count = 0

    def add(self, timings: Mapping[str, float], now: float | None = None) -> None:
        for key, value in timings.items():
            self.samples.setdefault(key, deque(maxlen=self.window)).append(value)
        self.stamps.append(time.perf_counter() if now is None else now)
        self.count += 1

    def percentiles(self, key: str, qs: tuple[float, ...] = (50, 95, 99)) -> tuple[float, ...]:
        values = list(self.samples.get(key, ()))
        return tuple(percentile(values, q) for q in qs)

    def fps(self) -> float:
        """Frames per second over the window (0 until two frames have been seen)."""
        if len(self.stamps) < 2 or self.stamps[-1] <= self.stamps[0]:
            return 0.0
        return (len(self.stamps) - 1) / (self.stamps[-1] - self.stamps[0])
