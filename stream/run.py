"""`stream run`'s frame loop: source -> denoiser -> sink, one frame at a time, with the latency monitor,
the adaptive controller and a live status line."""

from __future__ import annotations

import logging
import time
from typing import Any, TextIO

import cv2

from stream.adaptive import AdaptiveController
from stream.batch import FrameResult, drain
from stream.config import ConfigError
from stream.denoiser import STAGES, StreamDenoiser
from stream.monitor import LatencyMonitor, RollingStats, stage_names

logger = logging.getLogger("stream.cli")

EXIT_INTERRUPTED = 130


def run_loop(
    source: Any,
    sink: Any,
    denoiser: StreamDenoiser,
    limit: int | None,
    status: TextIO | None,
    monitor: LatencyMonitor | None = None,
    controller: AdaptiveController | None = None,
) -> int:
    monitor = monitor or LatencyMonitor()
    stats = monitor.out
    requested = denoiser.config
    line = StatusLine(status)
    start = time.perf_counter()
    frames = 0
    size: tuple[int, ...] | None = None
    interrupted = stopped = False
    last = None

    def write(result: FrameResult) -> bool:
        """One output to the sink; False when the sink's window was closed."""
        nonlocal frames, size
        out = result.frame
        if size is None:
            size = out.shape[:2]
        elif out.shape[:2] != size:  # the source changed size: the file keeps its first size
            out = cv2.resize(out, (size[1], size[0]), interpolation=cv2.INTER_AREA)
        sink.write(out)
        frames += 1
        monitor.frame_out(result.timings, result.skipped)
        line.update(frames, stats, denoiser.skipped, getattr(source, "drops", 0))
        return not getattr(sink, "closed_by_user", False)

    try:
        while limit is None or frames < limit:
            frame = source.read()
            if frame is None:
                break
            last = frame
            if controller is not None:
                config = controller.apply(requested)
                if config is not denoiser.config:
                    try:
                        denoiser.update(config)
                    except ConfigError as exc:  # the model cannot run this level: never try it again
                        controller.drop_level(str(exc))
                        denoiser.update(controller.apply(requested))
            result = denoiser.process(frame)
            if controller is not None and not result.skipped:
                change = controller.observe(result.timings["total"])
                if change is not None:
                    logger.warning("adaptive: %s -> %s: %s", change["from"], change["to"], change["reason"])
            if result.pending:  # Stream Batch: nothing left the pipeline yet (or a skipped input)
                continue
            if not write(result):
                stopped = True
                break
        if last is not None and not stopped and (limit is None or frames < limit):
            for result in drain(denoiser, last):  # Stream Batch: the last inputs' frames still in flight
                if (limit is not None and frames >= limit) or not write(result):
                    break
    except KeyboardInterrupt:
        interrupted = True
    elapsed = time.perf_counter() - start
    line.finish(frames, elapsed, stats, denoiser.skipped, getattr(source, "drops", 0), interrupted)
    return EXIT_INTERRUPTED if interrupted else 0


class StatusLine:
    """One live line on a terminal (redrawn twice a second), or a plain line every few seconds in a log."""

    def __init__(self, out: TextIO | None) -> None:
        self.out = out
        self.tty = bool(out is not None and out.isatty())
        self.every = 0.5 if self.tty else 5.0
        self.last = time.perf_counter()

    def update(self, frames: int, stats: RollingStats, skipped: int, drops: int) -> None:
        now = time.perf_counter()
        if self.out is None or now - self.last < self.every:
            return
        self.last = now
        text = describe(frames, stats.fps(), stats, skipped, drops)
        self.out.write(f"\r{text}\033[K" if self.tty else text + "\n")
        self.out.flush()

    def finish(
        self, frames: int, elapsed: float, stats: RollingStats, skipped: int, drops: int, interrupted: bool
    ) -> None:
        if self.out is None:
            return
        if self.tty:
            self.out.write("\r\033[K")
        fps = frames / elapsed if elapsed > 0 else 0.0
        shown = [s for s in stage_names(stats.samples) if s in (*STAGES, "control")]  # control: ControlNet's
        stages = "  ".join(f"{s} {stats.percentiles(s, (50,))[0]:.1f}" for s in shown)
        self.out.write(
            f"{'interrupted: ' if interrupted else ''}{describe(frames, fps, stats, skipped, drops)}\n"
            f"  p50 ms by stage: {stages}\n"
        )
        self.out.flush()


def describe(frames: int, fps: float, stats: RollingStats, skipped: int, drops: int) -> str:
    p50, p95, _ = stats.percentiles("total")
    return (
        f"frames {frames}  {fps:.1f} fps  latency p50 {p50:.1f} ms  p95 {p95:.1f} ms  "
        f"skipped {skipped}  dropped {drops}"
    )
