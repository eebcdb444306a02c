"""`stream bench --stream-batch on,off --cfg full,self,once,none`: Stream Batch and the CFG modes, compared
in one run on one loaded model.

Each variant is one stream (its own StreamDenoiser on the shared engine) fed the same clip: warm-up calls
first (with Stream Batch the pipeline fills), then N timed input frames. Per variant: UNet calls and
UNet rows per output frame, output frames per second, and each output's latency from the start of the
call its input went in with to the end of the call it came out of, so that Stream Batch's k-1 frames
of delay are included (p50/p95/p99).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from stream.batch import FrameResult
from stream.bench import BenchError, environment
from stream.clips import photo_clip
from stream.config import StreamConfig
from stream.denoiser import StreamDenoiser
from stream.engine import Engine
from stream.models import PLACEHOLDER_NOTE, load_model
from stream.monitor import percentile


def run(
    config: StreamConfig,
    variants: list[dict[str, object]],
    *,
    frames: int = 100,
    warmup: int = 10,
    progress: TextIO | None = None,
) -> dict[str, Any]:
    """Every variant (StreamConfig changes) in turn on one engine; returns the summary, one row each."""
    if frames < 1 or warmup < 0:
        raise BenchError("--frames must be at least 1 and --warmup 0 or more")
    components = load_model(config)
    engine = Engine.shared(components, config)
    clip = photo_clip("pan", min(frames + warmup, 240), (config.height, config.width))
    rows = []
    for changes in variants:
        variant = config.replace(**changes)
        rows.append(_measure(engine, StreamDenoiser(engine, variant), clip, frames, warmup))
        if progress is not None:
            progress.write(f"{_label(rows[-1])}: {rows[-1]['fps']:.1f} fps\n")
            progress.flush()
    return {
        "benchmark": "stream_batch",
        "model": components.name,
        "placeholder": components.placeholder,
        "width": config.width,
        "height": config.height,
        "steps": config.steps,
        "strength": config.strength,
        "guidance": config.guidance_scale,
        "delta": config.delta,
        "frames": frames,
        "warmup": warmup,
        "rows": rows,
        **environment(engine.device),
    }


def _measure(
    engine: Engine, denoiser: StreamDenoiser, clip: list[Any], frames: int, warmup: int
) -> dict[str, Any]:
    rows: list[int] = []
    hook = engine.unet.register_forward_pre_hook(lambda _m, args: rows.append(int(args[0].shape[0])))
    started: dict[int, float] = {}  # input index -> when its call started
    latency: list[float] = []
    try:
        for i in range(warmup):
            started[i] = time.perf_counter()
            _check(denoiser.process(clip[i % len(clip)], tag=i))
        calls, rows_before, outputs = engine.calls, len(rows), 0
        start = time.perf_counter()
        for i in range(warmup, warmup + frames):
            started[i] = time.perf_counter()
            result = _check(denoiser.process(clip[i % len(clip)], tag=i))  # a CPU array: synchronized
            if not result.pending:
                latency.append((time.perf_counter() - started.pop(result.tag)) * 1000.0)
                outputs += 1
        elapsed = time.perf_counter() - start
    finally:
        hook.remove()
    config = denoiser.config
    timed_rows = rows[rows_before:]
    return {
        "stream_batch": config.stream_batch,
        "cfg": config.cfg_mode,
        "outputs": outputs,
        "delay_frames": config.steps - 1 if config.stream_batch else 0,
        "unet_calls_per_frame": round((engine.calls - calls) / max(outputs, 1), 3),
        "unet_rows_per_frame": round(sum(timed_rows) / max(outputs, 1), 3),
        "unet_rows_per_call": round(sum(timed_rows) / max(len(timed_rows), 1), 3),
        "fps": round(outputs / elapsed, 2) if elapsed > 0 else 0.0,
        "latency_ms": {f"p{q}": round(percentile(latency, q), 2) for q in (50, 95, 99)},
    }


def _check(result: FrameResult | Exception) -> FrameResult:
    if not isinstance(result, FrameResult):
        raise RuntimeError(f"a frame failed: {result}")
    return result


def _label(row: dict[str, Any]) -> str:
    return f"stream batch {'on' if row['stream_batch'] else 'off'}, cfg {row['cfg']}"


def print_table(summary: dict[str, Any], out: TextIO = sys.stdout) -> None:
    s = summary
    out.write(
        f"{s['model']} on {s['device']}, {s['width']}x{s['height']}, {s['steps']} steps, strength "
        f"{s['strength']}, guidance {s['guidance']}, delta {s['delta']}; {s['frames']} frames after "
        f"{s['warmup']} warm-up; latency: input's call start to output, added frames included\n"
    )
    if s["placeholder"]:
        out.write(f"note: {PLACEHOLDER_NOTE}; only the timings mean something\n")
    out.write(
        f"{'stream batch':>12} {'cfg':>5} {'UNet calls/frame':>16} {'rows/frame':>10} {'rows/call':>9} "
        f"{'FPS':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'delay':>6}\n"
    )
    for r in s["rows"]:
        lat = r["latency_ms"]
        out.write(
            f"{'on' if r['stream_batch'] else 'off':>12} {r['cfg']:>5} {r['unet_calls_per_frame']:>16.2f} "
            f"{r['unet_rows_per_frame']:>10.2f} {r['unet_rows_per_call']:>9.2f} {r['fps']:>7.1f} "
            f"{lat['p50']:>8.1f} {lat['p95']:>8.1f} {lat['p99']:>8.1f} {r['delay_frames']:>6}\n"
        )
    out.write("delay: frames between an input and its output (Stream Batch: steps - 1)\n")


def command(
    config: StreamConfig, variants: list[dict[str, object]], frames: int, warmup: int, quiet: bool
) -> None:
    """`stream bench --stream-batch ... --cfg ...`: runs every variant, prints the table and one JSON line."""
    modes = {v.get("cfg_mode", config.cfg_mode) for v in variants}
    if len(modes) > 1 and not config.guidance_scale > 1.0:
        raise BenchError(
            f"--cfg variants differ only with guidance: set --guidance above 1, got {config.guidance_scale:g}"
        )
    summary = run(config, variants, frames=frames, warmup=warmup, progress=None if quiet else sys.stderr)
    summary["command"] = " ".join(["stream", *sys.argv[1:]])
    print_table(summary)
    print(json.dumps(summary))
