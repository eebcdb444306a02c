"""`stream bench`: the per-frame pipeline's latency with no network, stage by stage.

A clip made from a real photo (scikit-image's sample photos, panned or zoomed with known motion) goes
through one `StreamDenoiser`: a warm-up, then N timed frames. The report is a table of p50/p95/p99 per
stage (each UNet step on its own line), FPS, whether the 24 FPS budget holds, and the pipeline
overhead: the share of frame time that is not a model forward pass (VAE encode, UNet calls, VAE
decode). `--json` adds one JSON object as the last line; `--plot` draws latency over time by stage and
its distribution.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from stream.clips import photo_clip
from stream.config import StreamConfig
from stream.denoiser import StreamDenoiser
from stream.models import PLACEHOLDER_NOTE, load_model
from stream.monitor import percentile, stage_names


class BenchError(ValueError):
    """Bad benchmark input; the message says what to change."""


def run(
    config: StreamConfig,
    *,
    frames: int = 100,
    warmup: int = 10,
    motion: str = "pan",
    photo: str = "coffee",
    target_fps: float = 24.0,
    progress: TextIO | None = None,
) -> dict[str, Any]:
    """Warm up, time `frames` frames; returns the per-frame records and the summary (see `summarize`)."""
    # 1. check inputs
    if frames < 1:
        raise BenchError(f"--frames must be at least 1, got {frames}")
    if warmup < 0:
        raise BenchError(f"--warmup must be 0 or more, got {warmup}")
    if not target_fps > 0:
        raise BenchError(f"--target-fps must be > 0, got {target_fps}")
    clip = photo_clip(motion, min(frames + warmup, 240), (config.height, config.width), photo=photo)
    # 2. load the model (the slow part)
    components = load_model(config)
    denoiser = StreamDenoiser(components, config)
    # 3. warm up: kernels chosen, caches filled, CPU convolutions picked
    for i in range(warmup):
        denoiser.process(clip[i % len(clip)])
    # 4. timed frames: the process() call is the frame; its stages come from the denoiser's own timer
    records: list[dict[str, float]] = []
    nan_frames = 0  # outputs whose decoded canvas holds NaN (an fp16 overflow shows as black frames)
    start = time.perf_counter()
    last_shown = start
    for i in range(frames):
        t0 = time.perf_counter()
        result = denoiser.process(clip[(warmup + i) % len(clip)])  # returns a CPU array: synchronized
        records.append({**result.timings, "frame": (time.perf_counter() - t0) * 1000.0})
        nan_frames += result.image is not None and bool(result.image.isnan().any())
        now = time.perf_counter()
        if progress is not None and (now - last_shown > 1.0 or i + 1 == frames):
            progress.write(f"\rframe {i + 1}/{frames}  {(i + 1) / (now - start):.1f} fps")
            progress.flush()
            last_shown = now
    elapsed = time.perf_counter() - start
    if progress is not None:
        progress.write("\n")
    summary = summarize(records, elapsed, target_fps)
    summary.update(
        {
            "benchmark": "latency",
            "model": components.name,
            "placeholder": components.placeholder,
            "dtype": str(denoiser.dtype).replace("torch.", ""),
            "width": config.width,
            "height": config.height,
            "steps": config.steps,
            "strength": config.strength,
            "guidance": config.guidance_scale,
            "cfg_batched": config.guidance_scale > 1.0,
            "scheduler": config.scheduler,
            "vae": config.vae,
            "lora": list(config.lora),
            "controlnet": config.controlnet or None,
            "control": config.control if config.controlnet else None,
            "frames": frames,
            "warmup": warmup,
            "nan_frames": nan_frames,
            "cuda_graphs": bool(denoiser.engine.graph_runners),
            "compile": config.compile,
            "clip": f"{motion} over scikit-image's {photo}",
            **environment(denoiser.device),
        }
    )
    summary["records"] = records
    return summary


def summarize(records: list[dict[str, float]], elapsed: float, target_fps: float = 24.0) -> dict[str, Any]:
    """Per-stage p50/p95/p99/mean (ms), FPS, the budget, and the share of frame time in model forwards."""
    keys = stage_names({k for r in records for k in r} - {"frame"})
    latency = {}
    for key in [*keys, "frame"]:
        values = [r[key] for r in records if key in r]
        latency[key] = {
            "p50": round(percentile(values, 50), 3),
            "p95": round(percentile(values, 95), 3),
            "p99": round(percentile(values, 99), 3),
            "mean": round(sum(values) / len(values), 3),
        }
    forward_keys = ["encode", "decode", *(k for k in keys if k.startswith("unet_"))]
    forward = sum(r.get(k, 0.0) for r in records for k in forward_keys)
    total = sum(r["frame"] for r in records)
    budget_ms = 1000.0 / target_fps
    return {
        "fps": round(len(records) / elapsed, 2) if elapsed > 0 else 0.0,
        "latency_ms": latency,
        "model_forward_share": round(forward / total, 4) if total else None,
        "pipeline_overhead_share": round(1.0 - forward / total, 4) if total else None,
        "target_fps": target_fps,
        "budget_ms": round(budget_ms, 2),
        "budget_holds": latency["frame"]["p95"] <= budget_ms,
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: Any) -> dict[str, Any]:
    """Versions and hardware of a run on `device` (a torch.device), for a benchmark's JSON line."""
    import diffusers
    import torch

    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def print_table(summary: dict[str, Any], out: TextIO = sys.stdout) -> None:
    s = summary
    cfg = "CFG batched" if s["cfg_batched"] else "no CFG"
    out.write(
        f"{s['model']} on {s['device']} ({s['dtype']}), {s['width']}x{s['height']}, {s['steps']} steps, "
        f"strength {s['strength']}, guidance {s['guidance']} ({cfg}), {s['frames']} frames after "
        f"{s['warmup']} warm-up, clip: {s['clip']}\n"
    )
    if s.get("controlnet"):
        out.write(f"controlnet {s['controlnet']}, conditioning image: {s['control']} (stage `control`)\n")
    if s.get("lora"):
        out.write(f"LoRA fused: {', '.join(s['lora'])}\n")
    if s["placeholder"]:
        out.write(f"note: {PLACEHOLDER_NOTE}; only the timings mean something\n")
    out.write(f"{'stage':<14}{'p50':>9}{'p95':>9}{'p99':>9}{'mean':>9}   ms\n")
    for stage, v in s["latency_ms"].items():
        label = "  " + stage if stage.startswith("unet_") else stage
        if stage == "frame":
            label = "frame (wall)"
        out.write(f"{label:<14}{v['p50']:>9.2f}{v['p95']:>9.2f}{v['p99']:>9.2f}{v['mean']:>9.2f}\n")
    holds = "holds" if s["budget_holds"] else "does NOT hold"
    out.write(
        f"FPS {s['fps']:.1f}; budget {s['budget_ms']:.1f} ms ({s['target_fps']:g} FPS) {holds} at p95; "
        f"model forward passes {s['model_forward_share']:.0%} of frame time, "
        f"pipeline overhead {s['pipeline_overhead_share']:.0%}\n"
    )


def plot(summary: dict[str, Any], path: str | Path) -> None:
    """Latency over time, stacked by stage, and the frame-time distribution with the budget."""
    plt = import_pyplot()
    records = summary["records"]
    unets = [k for k in summary["latency_ms"] if k.startswith("unet_")]
    other = [max(0.0, r["denoise"] - sum(r.get(k, 0.0) for k in unets)) for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    x = np.arange(len(records))
    series = {key: [r.get(key, 0.0) for r in records] for key in ("preprocess", "encode", *unets)}
    series["steps: scheduler, CFG"] = other
    series.update({key: [r.get(key, 0.0) for r in records] for key in ("decode", "postprocess")})
    layers, labels = list(series.values()), list(series)
    left.stackplot(x, layers, labels=labels, alpha=0.85)
    left.plot(x, [r["frame"] for r in records], color="black", linewidth=0.8, label="frame (wall)")
    left.axhline(summary["budget_ms"], color="red", linestyle="--", linewidth=1, label="budget")
    left.set(xlabel="frame", ylabel="ms", title="latency over time by stage")
    left.legend(fontsize=7, loc="upper right", ncol=2)
    frame = [r["frame"] for r in records]
    right.hist(frame, bins=min(40, max(5, len(frame) // 3)), color="tab:blue", alpha=0.8)
    for q, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
        right.axvline(summary["latency_ms"]["frame"][q], color="black", linestyle=style, label=q)
    right.axvline(summary["budget_ms"], color="red", linestyle="--", label="budget")
    right.set(xlabel="frame time, ms", ylabel="frames", title="distribution")
    right.legend(fontsize=7)
    size = f"{summary['width']}x{summary['height']}"
    fig.suptitle(f"{summary['model']} {size} {summary['steps']} steps on {summary['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def import_pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise BenchError("--plot needs matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def report(
    summary: dict[str, Any], *, as_json: bool, plot_path: str | None, command: Sequence[str], out: TextIO
) -> None:
    print_table(summary, out)
    if plot_path:
        plot(summary, plot_path)
        out.write(f"plot written to {plot_path}\n")
    if as_json:
        data = {k: v for k, v in summary.items() if k != "records"}
        data["command"] = " ".join(command)
        out.write(json.dumps(data) + "\n")
