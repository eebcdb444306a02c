"""The small pieces every benchmark here shares (the clips themselves are in stream/clips.py).

The rest (`ArgumentParser`, `environment`, `latency_stats`, ...) is what both benchmarks print the
same way: one-line usage errors with exit status 2, the machine and library versions, percentiles.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stream.bench import environment
from stream.bench import import_pyplot as pyplot
from stream.clips import CAMERA_NOISE_SIGMA, KINDS, PHOTOS, load_photo, photo_clip

__all__ = ["CAMERA_NOISE_SIGMA", "KINDS", "PHOTOS", "environment", "load_photo", "photo_clip", "pyplot"]

EXIT_USAGE = 2


# ---------------------------------------------------------------------- shared by the benchmarks
class UsageError(Exception):
    """Bad input: printed as one line on stderr, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors raise UsageError (one line, no usage dump) instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def usage_error(program: str, message: str) -> int:
    print(f"{program}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def command_line(module: str, argv: Sequence[str]) -> str:
    """The exact command that reproduces this run."""
    return shlex.join(["python", "-m", module, *argv])


def check_plot_target(path: str | None) -> None:
    """Refuse --plot early (before a long run) when matplotlib or the folder is missing."""
    if path is None:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise UsageError("--plot needs matplotlib: pip install matplotlib") from exc
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        raise UsageError(f"--plot {path}: folder {parent} does not exist")


def model_note(name: str, placeholder: bool) -> str:
    """What the table header must say about a model with random weights."""
    if name.startswith("tiny"):
        return "built-in tiny model, random weights: the images mean nothing, only the numbers do"
    if placeholder:
        return "full-size architecture with random weights: speed numbers only, the images mean nothing"
    return "real weights"


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latency_stats(ms: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/mean in milliseconds and frames per second (1000 / mean) of per-frame latencies."""
    values = np.asarray(ms, dtype=np.float64)
    p50, p95, p99 = (float(v) for v in np.percentile(values, [50, 95, 99]))  # linear interpolation
    mean = float(values.mean())
    return {"p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "mean_ms": mean, "fps": 1000.0 / mean}


def add_common_arguments(parser: argparse.ArgumentParser, frames: int, warmup: int) -> None:
    """The model, size, schedule, clip and output flags both benchmarks take (defaults: StreamConfig's)."""
    from stream.config import DTYPES, StreamConfig

    d = StreamConfig()
    parser.add_argument(
        "--model",
        default="tiny",
        help="anything StreamDenoiser loads: `tiny` (default; built-in, random weights, runs on a CPU), "
        "`random:sd-turbo` / `random:sd15` (full size, random weights), a hub id, a local diffusers folder "
        "or a single-file checkpoint",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N"
    )
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: float16 on CUDA, else float32")
    parser.add_argument("--width", type=int, default=d.width, help="model width in px (default %(default)s)")
    parser.add_argument(
        "--height", type=int, default=d.height, help="model height in px (default %(default)s)"
    )
    parser.add_argument("--steps", type=int, default=d.steps, help="denoising steps per frame, 1-5")
    parser.add_argument("--strength", type=float, default=d.strength, help="img2img strength in (0, 1]")
    parser.add_argument(
        "--guidance", type=float, default=d.guidance_scale, help="CFG scale; CFG (a batch of 2) runs when > 1"
    )
    parser.add_argument("--prompt", default="a watercolor painting", help="text prompt")
    parser.add_argument("--negative-prompt", default="", help="negative prompt (used when --guidance > 1)")
    parser.add_argument("--seed", type=int, default=d.seed, help="noise seed (the stream's fixed noise)")
    parser.add_argument("--frames", type=int, default=frames, help="measured frames (default %(default)s)")
    parser.add_argument(
        "--warmup", type=int, default=warmup, help="frames run first and not measured (default %(default)s)"
    )
    parser.add_argument(
        "--photo", default="coffee", choices=PHOTOS, help="scikit-image photo the clip is cut from"
    )
    parser.add_argument(
        "--plot", metavar="FILE.png", help="also draw a figure to this file (needs matplotlib)"
    )


def add_vae_argument(parser: argparse.ArgumentParser) -> None:
    """`--vae`, for the benchmarks that compare how autoencoders let the output follow the motion."""
    parser.add_argument(
        "--vae",
        default="auto",
        help="the autoencoder: `auto` (the model's own, default), `tiny` (TAESD-shaped AutoencoderTiny) "
        "or a folder or hub id, as `stream serve --vae`: to compare how well each lets the output follow "
        "the motion",
    )


def stream_config(args: argparse.Namespace, **changes: Any) -> Any:
    """A validated StreamConfig from the common flags; a bad value becomes a UsageError."""
    if args.frames < 1:
        raise UsageError(f"--frames must be at least 1, got {args.frames}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be 0 or more, got {args.warmup}")
    return model_config(args, guidance_scale=args.guidance, negative_prompt=args.negative_prompt, **changes)


def model_config(args: argparse.Namespace, **changes: Any) -> Any:
    """A validated StreamConfig from the flags of the model and its stream that every benchmark takes
    (model, device, dtype, size, steps, strength, prompt, seed); a bad value becomes a UsageError."""
    from stream.config import ConfigError, StreamConfig

    try:
        return StreamConfig(
            model=args.model,
            device=args.device,
            dtype=args.dtype,
            width=args.width,
            height=args.height,
            steps=args.steps,
            strength=args.strength,
            prompt=args.prompt,
            seed=args.seed,
            **changes,
        )
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
