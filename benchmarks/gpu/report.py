"""The GPU suite's record: the machine and versions, gpu_suite.json, and a readable table."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

# B's arithmetic per frame (SD 2.1 UNet at 512x512, 4 steps, CFG: 8 UNet rows) over an H200's dense fp16
# rate: the physical limit the issue of record gives for B, to state the share reached.
B_TFLOP_PER_FRAME = 5.7
H200_DENSE_TFLOPS = 800.0
B_LIMIT_FPS = H200_DENSE_TFLOPS / B_TFLOP_PER_FRAME


def environment(device: torch.device, command: str) -> dict[str, Any]:
    """Device name, driver, CUDA, torch, diffusers and Python versions, and the exact command."""
    import diffusers

    env: dict[str, Any] = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "driver": _driver() if device.type == "cuda" else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "command": command,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["multiprocessors"] = props.multi_processor_count
    return env


def _driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def write(out_dir: Path, record: dict[str, Any]) -> tuple[Path, Path]:
    """gpu_suite.json and gpu_suite.txt (the table) in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, table_path = out_dir / "gpu_suite.json", out_dir / "gpu_suite.txt"
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    table_path.write_text(table(record))
    return json_path, table_path


def _f(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(record: dict[str, Any]) -> str:
    """The record as text: one line per measured variant, then sessions and the comparisons."""
    env = record.get("environment", {})
    lines = [
        f"GPU suite on {env.get('gpu') or env.get('device')} (driver {env.get('driver')}), torch "
        f"{env.get('torch')}, diffusers {env.get('diffusers')}, Python {env.get('python')}",
        f"command: {env.get('command')}",
        "random weights: speed numbers only, the images mean nothing",
        "",
        f"{'model':<24} {'mode':<4} {'variant':<13} {'FPS':>7} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} "
        f"{'1st s':>6} {'GiB':>6} {'NaN':>4} {'max diff':>8}",
    ]
    for name, part in record.get("parts", {}).items():
        if not name.startswith("pipeline:"):
            continue
        for mode, variants in (part.get("modes") or {}).items():
            for variant, v in variants.items():
                if "summary" not in v:
                    lines.append(
                        f"{part.get('model', name):<24} {mode:<4} {variant:<13} {v.get('status', '')}"
                    )
                    continue
                s, d = v["summary"], v.get("vs_eager", {})
                lines.append(
                    f"{part.get('model', name):<24} {mode:<4} {variant:<13} {_f(s['fps']):>7} "
                    f"{_f(s['p50_ms'], 2):>7} {_f(s['p95_ms'], 2):>7} {_f(s['p99_ms'], 2):>7} "
                    f"{_f(s['first_frame_s'], 2):>6} {_f(s['gpu_memory_peak_gib'], 2):>6} "
                    f"{s['nan_frames']:>4} {_f(d.get('max_diff_uint8')):>8}"
                )
    sessions = record.get("parts", {}).get("sessions", {})
    if sessions.get("rows"):
        lines += ["", f"sessions batched (A), {sessions.get('model', '')}:"]
        lines.append(f"{'sessions':>8} {'frames/s':>9} {'per session':>11} {'p50 ms':>7} {'p95 ms':>7}")
        for r in sessions["rows"]:
            if "session_fps" not in r:
                lines.append(f"{r['sessions']:>8} {r.get('status', '')}")
                continue
            lines.append(
                f"{r['sessions']:>8} {_f(r['aggregate_fps']):>9} {_f(r['session_fps']):>11} "
                f"{_f(r['p50_ms'], 2):>7} {_f(r['p95_ms'], 2):>7}"
            )
        lines.append(f"largest N with {sessions.get('target')}: {sessions.get('max_sessions_at_target')}")
    lines += ["", "comparisons:"]
    for key, text in summary_lines(record).items():
        lines.append(f"  {key}: {text}")
    lines += ["", "targets (H200, 512x512):"]
    for name, t in record.get("targets", {}).items():
        figures = "" if t is None else json.dumps({k: v for k, v in t.items() if k != "holds"})
        verdict = "not measured" if t is None else "holds" if t["holds"] else "missed"
        lines.append(f"  {name}: {verdict} {figures}")
    lines += ["", "parts:"]
    for name, part in record.get("parts", {}).items():
        lines.append(
            f"  {name:<22} {part.get('status', '?'):<8} {_f(part.get('seconds'))} s  {part.get('error', '')}"
        )
    return "\n".join(lines) + "\n"


def summary_lines(record: dict[str, Any]) -> dict[str, str]:
    """The headline figures against the targets, where measured."""
    parts = record.get("parts", {})
    out: dict[str, str] = {}
    for name, part in parts.items():
        if not name.startswith("pipeline:"):
            continue
        for mode, variants in (part.get("modes") or {}).items():
            best = max((v["summary"]["fps"] for v in variants.values() if "summary" in v), default=None)
            if best is not None:
                out[f"{part.get('model')} {mode} best FPS"] = f"{best:.1f}"
                if mode == "B" and "sd-turbo" in str(part.get("model")):
                    out["B share of the physical limit"] = (
                        f"{best / B_LIMIT_FPS:.1%} of {B_LIMIT_FPS:.0f} FPS"
                    )
    for variant, r in (parts.get("features", {}).get("variants") or {}).items():
        calls = r["unet_calls_per_frame"]
        out[f"B, {variant}"] = (
            f"{r['fps']:.1f} FPS, call p95 {r['p95_ms']:.1f} ms, {calls} UNet calls a frame"
        )
    temporal = parts.get("temporal", {})
    for clip in ("pan", "zoom"):
        error = (temporal.get(clip) or {}).get("warp_error") or {}
        if error.get("no_feedback"):
            ratios = ", ".join(
                f"{s} {v / error['no_feedback']:.2f}x" for s, v in error.items() if s != "input"
            )
            out[f"temporal {clip} warp error of no feedback"] = ratios
        stuck = (temporal.get(clip) or {}).get("stuck") or {}
        if stuck:
            out[f"temporal {clip} warp/stuck (under 1: better than a still picture)"] = ", ".join(
                f"{s} {error[s] / v:.2f}" for s, v in stuck.items() if v and s in error
            )
    if temporal.get("added_pct"):
        out["temporal added time a frame"] = ", ".join(
            f"{s} {v:+.1f}%" for s, v in temporal["added_pct"].items()
        )
    for mode, r in (parts.get("diffusers", {}).get("modes") or {}).items():
        out[f"vs diffusers img2img {mode}"] = f"{r['speedup_fps']:.2f}x FPS"
    sd = parts.get("streamdiffusion", {})
    for mode, r in (sd.get("modes") or {}).items():
        if isinstance(r, dict) and "fps" in r:
            ours = r.get("stream_fps")
            ratio = f", stream {ours:.1f} FPS = {ours / r['fps']:.2f}x" if ours else ""
            out[f"StreamDiffusion {mode}"] = f"{r['fps']:.1f} FPS{ratio}"
    if "status" in sd and sd.get("status") != "ok":
        out["StreamDiffusion"] = f"{sd.get('status')}: {sd.get('error', sd.get('reason', ''))}"
    return out


def targets(record: dict[str, Any]) -> dict[str, Any]:
    """Each target of the product (H200, 512x512, uint8 in -> uint8 out): the figure and whether it
    holds; None where the part did not measure it."""
    parts = record.get("parts", {})
    turbo = (parts.get("pipeline:sd-turbo", {}).get("modes")) or {}

    def best(mode: str) -> dict[str, Any] | None:
        runs = [v["summary"] for v in (turbo.get(mode) or {}).values() if "summary" in v]
        return max(runs, key=lambda s: s["fps"]) if runs else None

    out: dict[str, Any] = {}
    a, b = best("A"), best("B")
    out["A >= 250 FPS, p50 <= 4 ms"] = (
        None
        if a is None
        else {"fps": a["fps"], "p50_ms": a["p50_ms"], "holds": a["fps"] >= 250 and a["p50_ms"] <= 4}
    )
    out["B >= 60 FPS, p99 <= 30 ms"] = (
        None
        if b is None
        else {
            "fps": b["fps"],
            "p99_ms": b["p99_ms"],
            "holds": b["fps"] >= 60 and b["p99_ms"] <= 30,
            "share_of_limit": round(b["fps"] / B_LIMIT_FPS, 3),
        }
    )
    sessions = parts.get("sessions", {})
    n = sessions.get("max_sessions_at_target")
    out[">= 20 sessions at 24 FPS, p95 <= 40 ms"] = None if n is None else {"sessions": n, "holds": n >= 20}
    sd = (parts.get("streamdiffusion", {}).get("modes")) or {}
    ratios = {m: r["stream_fps"] / r["fps"] for m, r in sd.items() if r.get("fps") and r.get("stream_fps")}
    out[">= 1.5x StreamDiffusion"] = (
        None
        if not ratios
        else {"ratio": {m: round(x, 2) for m, x in ratios.items()}, "holds": min(ratios.values()) >= 1.5}
    )
    diff = (parts.get("diffusers", {}).get("modes")) or {}
    speedups = {m: r["speedup_fps"] for m, r in diff.items() if "speedup_fps" in r}
    out[">= 10x diffusers img2img"] = (
        None if not speedups else {"ratio": speedups, "holds": min(speedups.values()) >= 10}
    )
    return out
