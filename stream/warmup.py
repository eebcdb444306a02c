"""The warm-up: how fast the loaded model runs here, and (on a CPU) the largest size that holds the
target frame rate, measured before the server takes its first session."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

# A size holds when the model's median frame time is within this share of the budget: the rest is for
# decoding and encoding the video, which on a CPU share the same cores.
HEADROOM = 0.6


@dataclasses.dataclass(frozen=True)
class Measured:
    """The model's median time per frame at one size."""

    width: int
    height: int
    ms: float

    @property
    def fps(self) -> float:
        return 1000.0 / self.ms if self.ms > 0 else float("inf")

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


def median_ms(
    run_frame: Callable[[], object],
    *,
    warmup: int = 2,
    frames: int = 5,
    max_seconds: float = 4.0,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Median milliseconds of `frames` calls after `warmup` untimed ones. A slow model (seconds a frame on
    a CPU) gets fewer: the warm-up stops once it has taken half of `max_seconds`, the timed calls once
    all have taken `max_seconds`; at least one timed call."""
    spent = 0.0
    for _ in range(warmup):
        if spent >= max_seconds / 2:
            break
        start = clock()
        run_frame()
        spent += clock() - start
    times: list[float] = []
    while len(times) < frames and (not times or spent < max_seconds):
        start = clock()
        run_frame()
        times.append((clock() - start) * 1000.0)
        spent += times[-1] / 1000.0
    return statistics.median(times)


def pick_size(
    measure: Callable[[int, int], float],
    candidates: list[tuple[int, int]],
    budget_ms: float,
    headroom: float = HEADROOM,
) -> tuple[Measured, list[Measured]]:
    """The largest of `candidates` (sizes, any order) whose measured frame time is within `headroom` of
    the budget; the smallest one when none is. Also returns every measurement made, largest first.

    The largest candidate is always measured. A smaller one is skipped when the frame time scaled by area
    from the last measurement says it is still over twice the limit (the smallest is always tried).
    """
    if not candidates:
        raise ValueError("pick_size needs at least one candidate size")
    ordered = sorted(set(candidates), key=lambda wh: (wh[0] * wh[1], wh), reverse=True)
    limit = headroom * budget_ms
    measured: list[Measured] = []
    for i, (width, height) in enumerate(ordered):
        if measured and i < len(ordered) - 1:
            last = measured[-1]
            predicted = last.ms * (width * height) / (last.width * last.height)
            if predicted > 2 * limit:
                continue
        measured.append(Measured(width, height, measure(width, height)))
        if measured[-1].ms <= limit:
            break
    return measured[-1], measured
