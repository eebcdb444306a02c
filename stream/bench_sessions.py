"""`stream bench --sessions 1,2,4,8 --batching on,off`: several sessions on one model, batched or not.

Each session has its own prompt and seed and its own clip (the same pan, started at another place).
A round is what the server's worker does: the newest frame of every session, through the model as one
batch per group of sessions (batching on) or one session after the other (off). Measured per variant,
after warm-up rounds: aggregate frames/s, each session's FPS and frame latency (from the round's start
to its own frame being done), round time and UNet calls per round. All variants run in one process,
each count with batching on, then off, on the same loaded model.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from stream.batch import FrameResult, process_batch
from stream.bench import BenchError
from stream.clips import photo_clip
from stream.config import StreamConfig
from stream.denoiser import StreamDenoiser
from stream.engine import Engine
from stream.models import load_model
from stream.monitor import percentile

PROMPTS = (
    "an oil painting of a cup of coffee",
    "a watercolor sketch",
    "a neon cyberpunk city at night",
    "an anime still, soft light",
    "a charcoal drawing",
    "a mosaic of coloured glass",
    "a pixel-art scene",
    "a marble sculpture",
)


def run(
    config: StreamConfig,
    sessions: list[int],
    batching: list[bool],
    *,
    rounds: int = 20,
    warmup: int = 3,
    progress: TextIO | None = None,
) -> dict[str, Any]:
    """Every (batching, sessions) variant; returns the summary with one row per variant."""
    components = load_model(config)
    engine = Engine.shared(components, config)
    clip = photo_clip("pan", rounds + warmup + 8 * max(sessions), (config.height, config.width), step=2)
    rows = []
    for count in sessions:  # both variants of one count next to each other: the machine's load drifts
        for batched in batching:
            denoisers = [
                StreamDenoiser(engine, config.replace(prompt=PROMPTS[i % len(PROMPTS)], seed=config.seed + i))
                for i in range(count)
            ]
            rows.append(_measure(engine, denoisers, clip, batched, rounds, warmup))
            if progress is not None:
                mode, fps = "on" if batched else "off", rows[-1]["aggregate_fps"]
                progress.write(f"batching {mode} sessions {count}: {fps:.1f} frames/s\n")
                progress.flush()
    return {"benchmark": "sessions", "rounds": rounds, "warmup": warmup, "rows": rows}


def _measure(
    engine: Engine, denoisers: list[StreamDenoiser], clip: list[Any], batched: bool, rounds: int, warmup: int
) -> dict[str, Any]:
    count = len(denoisers)
    latencies: list[list[float]] = [[] for _ in range(count)]
    round_ms: list[float] = []
    calls = 0
    elapsed = 0.0
    for r in range(warmup + rounds):
        frames = [clip[(r + 8 * i) % len(clip)] for i in range(count)]
        before = engine.calls
        start = time.perf_counter()
        if batched:
            results = process_batch(denoisers, frames)
            done = [time.perf_counter()] * count
        else:
            results, done = [], []
            for denoiser, frame in zip(denoisers, frames, strict=True):
                results.append(denoiser.process(frame))
                done.append(time.perf_counter())
        if not all(isinstance(x, FrameResult) for x in results):
            raise RuntimeError(
                f"a frame failed: {next(x for x in results if not isinstance(x, FrameResult))}"
            )
        if r < warmup:
            continue
        elapsed += done[-1] - start
        round_ms.append((done[-1] - start) * 1000.0)
        calls += engine.calls - before
        for i in range(count):
            latencies[i].append((done[i] - start) * 1000.0)
    every = [ms for per in latencies for ms in per]
    return {
        "batching": batched,
        "sessions": count,
        "aggregate_fps": round(count * rounds / elapsed, 2),
        "session_fps": round(rounds / elapsed, 2),
        "latency_p50_ms": round(percentile(every, 50), 2),
        "latency_p95_ms": round(percentile(every, 95), 2),
        "round_p50_ms": round(percentile(round_ms, 50), 2),
        "unet_calls_per_round": round(calls / rounds, 2),
    }


def print_table(summary: dict[str, Any], out: TextIO = sys.stdout) -> None:
    rows = summary["rows"]
    base = {r["sessions"]: r["aggregate_fps"] for r in rows if not r["batching"]}
    out.write(
        f"{'batching':>8} {'sessions':>8} {'frames/s':>9} {'per session':>11} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'UNet calls/round':>16} {'vs off':>7}\n"
    )
    for r in rows:
        ratio = r["aggregate_fps"] / base[r["sessions"]] if r["sessions"] in base else float("nan")
        out.write(
            f"{'on' if r['batching'] else 'off':>8} {r['sessions']:>8} {r['aggregate_fps']:>9.1f} "
            f"{r['session_fps']:>11.1f} {r['latency_p50_ms']:>8.1f} {r['latency_p95_ms']:>8.1f} "
            f"{r['unet_calls_per_round']:>16.1f} {ratio:>6.2f}x\n"
        )


def command(
    sessions: str, batching: str, config: StreamConfig, rounds: int, warmup: int, quiet: bool
) -> None:
    """`stream bench --sessions ...`: checks the flags, runs, prints the table and one JSON line."""
    try:
        counts = [int(n) for n in sessions.split(",")]
    except ValueError:
        raise BenchError(
            f"--sessions takes counts separated by commas, e.g. 1,2,4,8; got {sessions!r}"
        ) from None
    if not counts or min(counts) < 1 or max(counts) > 64:
        raise BenchError(f"--sessions: each count must be from 1 to 64, got {sessions!r}")
    modes = batching.split(",")
    if any(m not in ("on", "off") for m in modes):
        raise BenchError(f"--batching takes on, off or both (on,off), got {batching!r}")
    if rounds < 1 or warmup < 0:
        raise BenchError("--frames (rounds) must be at least 1 and --warmup 0 or more")
    summary = run(
        config,
        counts,
        [m == "on" for m in modes],
        rounds=rounds,
        warmup=warmup,
        progress=None if quiet else sys.stderr,
    )
    summary.update(
        {"model": config.model, "width": config.width, "height": config.height, "steps": config.steps}
    )
    summary.update({"guidance": config.guidance_scale, "command": " ".join(["stream", *sys.argv[1:]])})
    print_table(summary)
    print(json.dumps(summary))
