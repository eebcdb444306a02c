"""Temporal coherence of StreamDenoiser's output, with latent feedback off and on.

Latent feedback (`StreamConfig.latent_feedback`, default 0 = off) blends that share of the previous
output latent into each new frame's latent. This runs the same model twice on each of two clips cut
from a real photo, once with feedback 0 and once with `--feedback` (default 0.5), and measures:

- moving clip (`--motion pan`, a window moving right by `--pan-step` px a frame; or `zoom`): the warp
  error. For each consecutive pair, OpenCV's DIS optical flow (medium preset) on the grayscale INPUT
  frames gives the backward flow t -> t-1, which warps the previous OUTPUT frame into frame t
  (cv2.remap). Pixels failing the forward-backward consistency test of Sundaram et al. 2010
  (|w_f(x + w_b(x)) + w_b(x)|^2 > 0.01 (|w_f(x + w_b(x))|^2 + |w_b(x)|^2) + 0.5), and pixels that
  warp from outside the frame, are masked out; the error is the mean |output_t - warped output_t-1|
  (on 0-255, over the RGB values of the unmasked pixels), averaged over the clip. The same error of
  the input itself is the floor: what the flow cannot explain even for the input.
- static clip (one frame repeated, each copy with seeded Gaussian camera noise of sigma 2): the mean
  absolute change between consecutive outputs (0-255); the input's own change is the camera noise.

Noise is StreamConfig's default: `fixed` (one noise tensor for the whole stream, from `--seed`), so
the change between frames comes from the input and the feedback, not from fresh noise. Lower is
steadier; steadier is not better by itself (an output that ignores the input is perfectly steady).

Prints a table, then one JSON object as the last line. Example:

    python -m benchmarks.temporal --model tiny --width 256 --height 256 --frames 48 --feedback 0.5
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from benchmarks.common import (
    CAMERA_NOISE_SIGMA,
    ArgumentParser,
    UsageError,
    add_common_arguments,
    check_plot_target,
    command_line,
    environment,
    model_note,
    photo_clip,
    pyplot,
    stream_config,
    usage_error,
)

PROG = "temporal"
MODULE = "benchmarks.temporal"
MOTIONS = ("pan", "zoom")
SETTINGS = ("feedback_off", "feedback_on")


@dataclass(frozen=True)
class Warp:
    """How frame t-1 maps into frame t: remap coordinates and the pixels where that can be trusted."""

    map_x: np.ndarray  # (H, W) float32, x + backward flow
    map_y: np.ndarray  # (H, W) float32
    valid: np.ndarray  # (H, W) bool: consistent forward/backward flow, source inside the frame


# ---------------------------------------------------------------------- measures
def input_warps(frames: Sequence[np.ndarray]) -> list[Warp]:
    """DIS optical flow between consecutive input frames, as warps of frame t-1 into frame t."""
    dis = cv2.DISOpticalFlow.create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)  # = DISOpticalFlow_create
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    return [warp_between(dis, gray[t - 1], gray[t]) for t in range(1, len(gray))]


def warp_between(dis: Any, previous: np.ndarray, current: np.ndarray) -> Warp:
    """Backward flow current -> previous with the forward-backward occlusion test (Sundaram et al. 2010)."""
    h, w = current.shape
    backward = dis.calc(current, previous, None)  # (H, W, 2): current(x) ~ previous(x + backward(x))
    forward = dis.calc(previous, current, None)  # (H, W, 2): previous(y) ~ current(y + forward(y))
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    map_x, map_y = xs + backward[..., 0], ys + backward[..., 1]
    forward_there = cv2.remap(forward, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    loop = np.sum((forward_there + backward) ** 2, axis=-1)  # 0 where the two flows agree
    scale = np.sum(forward_there**2, axis=-1) + np.sum(backward**2, axis=-1)
    consistent = loop <= 0.01 * scale + 0.5
    inside = (map_x >= 0) & (map_x <= w - 1) & (map_y >= 0) & (map_y <= h - 1)
    return Warp(map_x, map_y, consistent & inside)


def warp_errors(frames: Sequence[np.ndarray], warps: Sequence[Warp]) -> list[float]:
    """Per pair: mean |frame_t - frame_t-1 warped into t| over valid pixels, on 0-255 (nan if none)."""
    errors = []
    for t, warp in enumerate(warps, start=1):
        warped = cv2.remap(
            frames[t - 1].astype(np.float32),
            warp.map_x,
            warp.map_y,
            cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )
        diff = np.abs(frames[t].astype(np.float32) - warped)[warp.valid]  # (N, 3)
        errors.append(float(diff.mean()) if diff.size else float("nan"))
    return errors


def frame_changes(frames: Sequence[np.ndarray]) -> list[float]:
    """Per pair: mean |frame_t - frame_t-1| on 0-255."""
    return [
        float(np.abs(b.astype(np.float32) - a.astype(np.float32)).mean())
        for a, b in zip(frames, frames[1:], strict=False)
    ]


def _mean(values: Sequence[float]) -> float:
    return float(np.nanmean(values)) if len(values) else float("nan")


# ---------------------------------------------------------------------- the run
def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=f"python -m {MODULE}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser, frames=48, warmup=2)
    parser.add_argument(
        "--feedback",
        type=float,
        default=0.5,
        help="latent feedback to compare against 0 (off), in (0, 1): the share of the previous output "
        "latent blended into each frame (StreamConfig.latent_feedback; default %(default)s)",
    )
    parser.add_argument("--motion", default="pan", choices=MOTIONS, help="the moving clip (default pan)")
    parser.add_argument("--pan-step", type=int, default=4, help="pan speed in px a frame (default 4)")
    parser.add_argument(
        "--zoom-rate", type=float, default=0.01, help="zoom: extra magnification a frame (default 0.01)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        if not 0.0 < args.feedback < 1.0:
            raise UsageError(f"--feedback must be in (0, 1) (it is compared against 0), got {args.feedback}")
        if args.frames < 2:
            raise UsageError(
                f"--frames must be at least 2 (measures compare consecutive frames), got {args.frames}"
            )
        if args.pan_step < 0:
            raise UsageError(f"--pan-step must be 0 or more px a frame, got {args.pan_step}")
        if not 0.0 <= args.zoom_rate <= 1.0:
            raise UsageError(f"--zoom-rate must be in [0, 1], got {args.zoom_rate}")
        config = stream_config(args, noise="fixed", latent_feedback=0.0)
        check_plot_target(args.plot)
        denoiser = load(config)
    except UsageError as exc:
        return usage_error(PROG, str(exc))
    except SystemExit as exc:  # --help
        return int(exc.code or 0)

    size = (config.height, config.width)
    moving = photo_clip(
        args.motion, args.frames, size, photo=args.photo, step=args.pan_step, zoom_rate=args.zoom_rate
    )
    static = photo_clip("static", args.frames, size, photo=args.photo, seed=args.seed)
    warps = input_warps(moving)
    for frame in static[: args.warmup]:
        denoiser(frame)
    curves: dict[str, dict[str, list[float]]] = {
        "warp_error": {"input": warp_errors(moving, warps)},
        "change": {"input": frame_changes(static)},
    }
    for setting, weight in zip(SETTINGS, (0.0, args.feedback), strict=True):
        denoiser.update(config.replace(latent_feedback=weight))
        denoiser.reset()
        curves["warp_error"][setting] = warp_errors([denoiser(f) for f in moving], warps)
        denoiser.reset()
        curves["change"][setting] = frame_changes([denoiser(f) for f in static])
    occluded = float(np.mean([1.0 - w.valid.mean() for w in warps]))
    report = build_report(denoiser, args, curves, occluded, command_line(MODULE, argv))
    print_table(report)
    if args.plot:
        plot(curves, report, args.plot)
        print(f"plot: {args.plot}")
    print(json.dumps(report))
    return 0


def load(config: Any) -> Any:
    from stream.config import ConfigError
    from stream.denoiser import StreamDenoiser
    from stream.models import ModelError, load_model

    try:
        return StreamDenoiser(load_model(config), config)
    except (ModelError, ConfigError) as exc:
        raise UsageError(str(exc)) from exc


def build_report(
    denoiser: Any, args: Any, curves: dict[str, dict[str, list[float]]], occluded: float, command: str
) -> dict[str, Any]:
    c = denoiser.config
    motion = {"pan_px_per_frame": args.pan_step} if args.motion == "pan" else {"zoom_rate": args.zoom_rate}

    def r(x: float) -> float:
        return round(x, 4)

    warp, change = curves["warp_error"], curves["change"]
    return {
        "benchmark": "temporal",
        "model": denoiser.name,
        "model_arg": c.model,
        "random_weights": bool(denoiser.placeholder),
        "note": model_note(denoiser.name, denoiser.placeholder),
        **environment(denoiser.device),
        "dtype": str(denoiser.dtype).removeprefix("torch."),
        "width": c.width,
        "height": c.height,
        "steps": c.steps,
        "strength": c.strength,
        "guidance": c.guidance_scale,
        "scheduler": c.scheduler,
        "prompt": c.prompt,
        "noise": c.noise,
        "seed": c.seed,
        "feedback": args.feedback,
        "frames": args.frames,
        "warmup": args.warmup,
        "photo": args.photo,
        "motion": args.motion,
        **motion,
        "moving": {
            "input_warp_error": r(_mean(warp["input"])),
            "warp_error": {s: r(_mean(warp[s])) for s in SETTINGS},
            "occluded_fraction": r(occluded),
        },
        "static": {
            "camera_noise_sigma": CAMERA_NOISE_SIGMA,
            "input_change": r(_mean(change["input"])),
            "change": {s: r(_mean(change[s])) for s in SETTINGS},
        },
        "command": command,
    }


# ---------------------------------------------------------------------- output
def print_table(r: dict[str, Any]) -> None:
    fb = r["feedback"]
    print(f"temporal: {r['model']} on {r['gpu'] or r['device']} ({r['dtype']}) -- {r['note']}")
    print(
        f"{r['width']}x{r['height']}, {r['steps']} {r['scheduler'].upper()} steps at strength "
        f"{r['strength']}, "
        f"guidance {r['guidance']}, {r['frames']} frames a clip from '{r['photo']}'; noise {r['noise']} "
        f"(seed {r['seed']}, StreamConfig's default)"
    )
    print(f"latent feedback 0 (off) vs {fb:g}; L1 on 0-255, lower = steadier")
    print()
    motion = (
        f"pan {r['pan_px_per_frame']} px/frame"
        if r["motion"] == "pan"
        else f"zoom x{1 + r['zoom_rate']:g}/frame"
    )
    moving, static = r["moving"], r["static"]
    rows = [
        (
            motion,
            f"warp error ({moving['occluded_fraction']:.0%} masked)",
            moving["input_warp_error"],
            moving["warp_error"],
        ),
        (
            f"static, noise sigma {static['camera_noise_sigma']:g}",
            "change between frames",
            static["input_change"],
            static["change"],
        ),
    ]
    header = f"{'clip':<24}{'measure':<28}{'input':>8}{'feedback 0':>12}{f'feedback {fb:g}':>14}"
    print(header)
    print("-" * len(header))
    for clip, measure, floor, values in rows:
        print(
            f"{clip:<24}{measure:<28}{floor:>8.2f}{values['feedback_off']:>12.2f}{values['feedback_on']:>14.2f}"
        )
    print()
    print("warp error: previous output warped into the current frame by the INPUT's optical flow; the")
    print("input's own warp error is the floor the flow leaves unexplained.")


def plot(curves: dict[str, dict[str, list[float]]], report: dict[str, Any], path: str) -> None:
    plt = pyplot()
    from matplotlib import ticker

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    labels = {
        "input": "input",
        "feedback_off": "feedback 0",
        "feedback_on": f"feedback {report['feedback']:g}",
    }
    styles = {"input": {"color": "grey", "ls": "--"}, "feedback_off": {}, "feedback_on": {}}
    for ax, key, title in (
        (top, "warp_error", f"{report['motion']} clip: warp error (occlusions masked)"),
        (bottom, "change", "static clip: change between consecutive frames"),
    ):
        for name, values in curves[key].items():
            frames = range(1, len(values) + 1)
            ax.plot(frames, values, label=labels[name], lw=1.2, **styles[name])
        ax.set_ylabel("mean |difference| (0-255)")
        ax.set_ylim(bottom=0)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
    bottom.set_xlabel("frame t (compared with frame t-1)")
    bottom.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    fig.suptitle(
        f"{report['model']}, {report['width']}x{report['height']}, {report['steps']} steps, "
        f"strength {report['strength']}, noise {report['noise']}\n{report['note']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
