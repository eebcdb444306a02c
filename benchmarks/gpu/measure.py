"""The GPU suite's measurements: one stream eager vs CUDA graphs vs compile, sessions batched on one
GPU, and diffusers' img2img pipeline, each from a uint8 frame in to a uint8 frame out.

Every variant runs on the same loaded components (the engine moves them in place once); its outputs
are checked for NaN (the decoded canvas, before uint8) and compared with the eager outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from benchmarks.common import latency_stats, synchronize
from stream.batch import FrameResult, process_batch
from stream.config import StreamConfig
from stream.denoiser import StreamDenoiser
from stream.engine import Engine
from stream.graphs import GraphRunner
from stream.models import Components

TARGET_FPS = 24.0
SESSION_P95_MS = 40.0
COMPARED_FRAMES = 24  # outputs kept per variant to compare with eager's
PROMPTS = ("an oil painting of a cup of coffee", "a watercolor sketch", "a neon city at night", "")


@dataclass(frozen=True)
class Mode:
    """A workload the suite measures: A = 1 step, no CFG; B = 4 steps, CFG as one batched call."""

    name: str
    steps: int
    guidance: float
    strength: float


MODES = (Mode("A", 1, 1.0, 0.5), Mode("B", 4, 2.0, 0.5))


class Deadline:
    """A part's time budget: loops ask `left()` and stop early, saying so in their results."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def make_engine(components: Components, config: StreamConfig, variant: str) -> tuple[Engine, str]:
    """An engine of its own for `variant` (eager, graphs, channels_last or compile), and a note on how
    it ran. channels_last changes the shared modules in place: `contiguous` puts them back.

    On a CPU (the suite's rehearsal) `graphs` runs the same padded calls eagerly: CUDA graphs need CUDA.
    """
    from stream.devices import resolve_device, resolve_dtype

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    cuda = device.type == "cuda"
    if variant == "eager":
        return Engine(components, device, dtype, config.attention, graphs=False), "eager"
    if variant == "graphs":
        engine = Engine(components, device, dtype, config.attention, graphs=cuda)
        if cuda:
            return engine, "CUDA graphs per row bucket"
        engine.graph_runners = {
            name: GraphRunner(fn, name, capture=False)
            for name, fn in (("unet", engine._unet), ("encode", engine._encode), ("decode", engine._decode))
        }
        return engine, "rehearsal: the bucket padding run eagerly (CUDA graphs need CUDA)"
    if variant == "channels_last":  # measured only: the product does not use it (yet)
        engine, note = make_engine(components, config, "graphs")
        engine.unet.to(memory_format=torch.channels_last)
        engine.vae.to(memory_format=torch.channels_last)
        return engine, f"{note}, UNet and VAE weights channels_last"
    if variant == "compile":
        engine = Engine(components, device, dtype, config.attention, graphs=cuda, compile_mode="default")
        return engine, "torch.compile (default) + CUDA graphs" if cuda else "torch.compile (default)"
    raise ValueError(f"unknown variant {variant!r}")


def contiguous(components: Components) -> None:
    """The modules' weights back in the default memory format (after a channels_last variant)."""
    for module in (components.unet, components.vae):
        module.to(memory_format=torch.contiguous_format)


def _canvas_nan(result: FrameResult) -> bool:
    return result.image is not None and bool(torch.isnan(result.image).any())


def measure_stream(
    engine: Engine,
    config: StreamConfig,
    clip: list[np.ndarray],
    warmup: int,
    frames: int,
    deadline: Deadline,
) -> dict[str, Any]:
    """One stream on `engine`: warm-up frames (graph capture / compile inside them, timed as the first
    frame), then measured frames until `frames` or the deadline. Keeps the outputs for comparisons."""
    device = engine.device
    denoiser = StreamDenoiser(engine, config)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first_s = 0.0
    outputs: list[np.ndarray] = []
    canvases: list[torch.Tensor] = []
    latencies: list[float] = []
    nan_frames = 0
    for i in range(warmup + frames):
        if i >= warmup and deadline.left() <= 0:
            break
        frame = clip[i % len(clip)]
        synchronize(device)
        start = time.perf_counter()
        result = denoiser.process(frame)
        synchronize(device)
        ms = (time.perf_counter() - start) * 1000.0
        nan_frames += _canvas_nan(result)
        if i == 0:
            first_s = ms / 1000.0
        if i >= warmup:
            latencies.append(ms)
            if len(outputs) < COMPARED_FRAMES:
                outputs.append(result.frame)
                if result.image is not None:
                    canvases.append(result.image.float().cpu())
    if not latencies:
        raise TimeoutError("no frame was measured within the part's budget (warm-up took it all)")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    summary = {
        **{k: round(v, 3) for k, v in latency_stats(latencies).items()},
        "frames": len(latencies),
        "truncated": len(latencies) < frames,
        "first_frame_s": round(first_s, 3),
        "gpu_memory_peak_gib": None if peak is None else round(peak, 3),
        "nan_frames": nan_frames,
        "capture_s": round(sum(r.capture_seconds for r in engine.graph_runners.values()), 3),
    }
    return {"summary": summary, "outputs": outputs, "canvases": canvases}


def compare_outputs(reference: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Max difference of another variant's outputs from the eager ones, frame for frame."""
    pairs = list(zip(reference["outputs"], other["outputs"], strict=False))
    canvases = list(zip(reference["canvases"], other["canvases"], strict=False))
    if not pairs:
        return {"frames_compared": 0}
    uint8 = max(int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) for a, b in pairs)
    canvas = max(float((a - b).abs().max()) for a, b in canvases) if canvases else None
    return {
        "frames_compared": len(pairs),
        "max_diff_uint8": uint8,
        "max_diff_canvas": None if canvas is None else round(canvas, 5),
    }


def measure_sessions(
    engine: Engine,
    config: StreamConfig,
    counts: list[int],
    clip: list[np.ndarray],
    warmup: int,
    rounds: int,
    deadline: Deadline,
) -> dict[str, Any]:
    """N sessions batched in one round (every session's frame through the model together), per N:
    aggregate frames/s, per-session FPS, round latency p50/p95 (each session's frame latency)."""
    rows = []
    for count in counts:
        if deadline.left() <= 0:
            rows.append({"sessions": count, "status": "skipped: out of time"})
            continue
        denoisers = [
            StreamDenoiser(engine, config.replace(prompt=PROMPTS[i % len(PROMPTS)], seed=config.seed + i))
            for i in range(count)
        ]
        round_ms: list[float] = []
        nan = 0
        for r in range(warmup + rounds):
            if r >= warmup and deadline.left() <= 0:
                break
            frames = [clip[(r + 3 * i) % len(clip)] for i in range(count)]
            synchronize(engine.device)
            start = time.perf_counter()
            results = process_batch(denoisers, frames)
            synchronize(engine.device)
            ms = (time.perf_counter() - start) * 1000.0
            failed = [x for x in results if not isinstance(x, FrameResult)]
            if failed:
                raise RuntimeError(f"a frame of {count} sessions failed: {failed[0]}")
            nan += sum(_canvas_nan(x) for x in results if isinstance(x, FrameResult))
            if r >= warmup:
                round_ms.append(ms)
        if not round_ms:
            rows.append({"sessions": count, "status": "skipped: out of time"})
            continue
        stats = latency_stats(round_ms)
        rows.append(
            {
                "sessions": count,
                "rounds": len(round_ms),
                "aggregate_fps": round(count * stats["fps"], 2),
                "session_fps": round(stats["fps"], 2),
                "p50_ms": round(stats["p50_ms"], 3),
                "p95_ms": round(stats["p95_ms"], 3),
                "nan_frames": nan,
            }
        )
    ok = [
        r["sessions"]
        for r in rows
        if "session_fps" in r and r["session_fps"] >= TARGET_FPS and r["p95_ms"] <= SESSION_P95_MS
    ]
    return {
        "rows": rows,
        "max_sessions_at_target": max(ok) if ok else 0,
        "target": f"every session >= {TARGET_FPS:g} FPS with p95 <= {SESSION_P95_MS:g} ms",
    }


def measure_diffusers(
    components: Components,
    config: StreamConfig,
    clip: list[np.ndarray],
    warmup: int,
    frames: int,
    deadline: Deadline,
) -> dict[str, Any]:
    """diffusers' StableDiffusionImg2ImgPipeline (prompt embeddings cached, its own DDIM grid) against
    the stream on the same components, steps, strength, guidance and size, interleaved frame by frame."""
    from benchmarks.compare_diffusers import Benchmark

    bench = Benchmark(components, config)
    fns: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "stream": bench.stream,
        "pipeline": bench.pipeline_cached_prompt,
    }
    latencies: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + frames):
        if i >= warmup and deadline.left() <= 0:
            break
        for name, fn in fns.items():
            synchronize(bench.device)
            start = time.perf_counter()
            fn(clip[i % len(clip)])
            synchronize(bench.device)
            if i >= warmup:
                latencies[name].append((time.perf_counter() - start) * 1000.0)
    if not latencies["stream"]:
        raise TimeoutError("no frame was measured within the part's budget")
    stats = {name: latency_stats(ms) for name, ms in latencies.items()}
    return {
        "frames": len(latencies["stream"]),
        "pipeline_num_inference_steps": bench.inference_steps,
        **{name: {k: round(v, 3) for k, v in s.items()} for name, s in stats.items()},
        "speedup_fps": round(stats["stream"]["fps"] / stats["pipeline"]["fps"], 2),
    }
