"""Temporal coherence of StreamDenoiser's output: latent feedback in place, along the motion, and noise
that moves with the content, on moving clips cut from real photos (or any video file).

Seven settings of the same model run frame by frame side by side (interleaved, so that they share the
machine's state and their timings compare):

- no_feedback: latent feedback 0, fixed noise (StreamConfig's defaults);
- in_place: feedback `--feedback` blended where the content WAS (`--feedback-warp off`, the old way);
- warped_feedback: the previous output latent warped along the input's optical flow first (occluded
  pixels take the new frame), fixed noise;
- warped_noise: no feedback; the stream's noise moves with the content (`--noise warped`);
- both: warped feedback and warped noise;
- steps: the warped previous output pulled into each denoising step's clean-latent estimate instead
  (`--feedback-at steps`), fixed noise;
- both_steps: feedback at the steps and warped noise;
- with `--motion-strength S` (> 0), also both_motion: both_steps, and strength lowered by up to S of it
  when the input moves fast;
- with `--image-feedback W` (> 0), also image: no latent feedback, the previous output image moved along
  the flow and blended into each new one by W after decoding; and both_image: both_steps with it.

Clips (`--clips`, any of pan, zoom, object; `--clip FILE` adds a video file): a window panning right by
`--pan-step` px a frame; a zoom on the photo's centre; a second photo's crop moving over a still photo.
A still clip (one frame with seeded camera noise of sigma 2 a frame) always runs too.

Measures, per clip and setting, L1 on 0-255, averaged over the clip:
- warp error: for each consecutive pair, OpenCV's DIS optical flow (medium preset) on the grayscale
  INPUT frames gives the backward flow t -> t-1, which warps the previous OUTPUT frame into frame t
  (cv2.remap). Pixels failing the forward-backward consistency test of Sundaram et al. 2010
  (|w_f(x + w_b(x)) + w_b(x)|^2 > 0.01 (|w_f(x + w_b(x))|^2 + |w_b(x)|^2) + 0.5), and pixels that
  warp from outside the frame, are masked out; the error is the mean |output_t - warped output_t-1|
  over the RGB values of the other pixels. The same error of the input itself is the floor. (This
  measuring flow is independent of the stream's own, cheaper flow.)
- change: mean |output_t - output_t-1|, what a viewer sees as flicker on the still clip.
- contrast: mean |value - the frame's mean colour|. Blending outputs whose details do not line up
  dulls them, and a duller output has a lower warp error and change by itself (a grey one is perfectly
  steady): `warp/contrast` is the warp error in units of the output's own contrast.
- if stuck: each output frame against itself warped along the same flow: the warp error the frame
  would have had if the previous output had been the same picture, standing still. `warp/stuck`
  under 1: the output moved with the content better than a still picture would; 1 or more: no better
  (it stayed on the screen, moved in jumps, or flickered). Read it where the whole frame moves (pan,
  zoom): where most of it stands still (object), that part scores 0 if stuck and any flicker there
  counts against the output.
- time: wall-clock ms a frame (p50, p95) per setting over all clips, and the time each adds to
  no_feedback's p50.

Lower is steadier; steadier is not better by itself (an output that ignores the input is perfectly
steady). The table ends with the targets: with warped feedback and noise (both, both_steps), warp
error <= 0.85x of no feedback on pan and zoom, the still clip's change <= 0.5x, <= 15 % added time a
frame; and, not a target, their warp/stuck (and both_image's). both_image is not held to the targets:
image feedback blends in the previous output moved along the motion, the very picture the warp error
compares each output with, so it lowers the warp error by construction.
`--strip FILE.png` saves frames of the first moving clip side by side: input, no feedback, feedback in
place, both, both_steps (and both_image). Prints a table, then one JSON object as the last line. Example:

    python -m benchmarks.temporal --model tiny --width 256 --height 256 --frames 48 --strip strip.png
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    ArgumentParser,
    UsageError,
    add_common_arguments,
    add_vae_argument,
    check_plot_target,
    command_line,
    photo_clip,
    stream_config,
    usage_error,
)
from benchmarks.temporal_figures import STILL, plot, save_strip
from benchmarks.temporal_measures import contrasts, frame_changes, input_warps, stuck_errors, warp_errors
from benchmarks.temporal_report import build_report, print_table

PROG = "temporal"
MODULE = "benchmarks.temporal"
MOVING = ("pan", "zoom", "object")
SETTINGS = ("no_feedback", "in_place", "warped_feedback", "warped_noise", "both", "steps", "both_steps")


def setting_changes(
    setting: str, feedback: float, motion_strength: float = 0.0, image_feedback: float = 0.0
) -> dict[str, Any]:
    """StreamConfig changes for one of SETTINGS, both_motion, image or both_image."""
    both_steps = {
        "latent_feedback": feedback,
        "feedback_warp": True,
        "feedback_at": "steps",
        "noise": "warped",
    }
    return {
        "no_feedback": {"latent_feedback": 0.0, "noise": "fixed"},
        "in_place": {"latent_feedback": feedback, "feedback_warp": False, "noise": "fixed"},
        "warped_feedback": {"latent_feedback": feedback, "feedback_warp": True, "noise": "fixed"},
        "warped_noise": {"latent_feedback": 0.0, "noise": "warped"},
        "both": {"latent_feedback": feedback, "feedback_warp": True, "noise": "warped"},
        "steps": {
            "latent_feedback": feedback,
            "feedback_warp": True,
            "feedback_at": "steps",
            "noise": "fixed",
        },
        "both_steps": both_steps,
        "both_motion": {**both_steps, "motion_strength": motion_strength},
        "image": {"latent_feedback": 0.0, "image_feedback": image_feedback, "feedback_warp": True},
        "both_image": {**both_steps, "image_feedback": image_feedback},
    }[setting]


# ---------------------------------------------------------------------- the run
def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=f"python -m {MODULE}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser, frames=48, warmup=2)
    add_vae_argument(parser)
    parser.add_argument(
        "--feedback",
        type=float,
        default=0.5,
        help="latent feedback of the feedback settings, in (0, 1): the share of the previous output "
        "latent blended into each frame (StreamConfig.latent_feedback; default %(default)s)",
    )
    parser.add_argument(
        "--clips",
        default=",".join(MOVING),
        help=f"built-in moving clips, comma-separated, any of {', '.join(MOVING)}, or none "
        "(default %(default)s)",
    )
    parser.add_argument("--clip", metavar="FILE", help="also measure on this video file (its first --frames)")
    parser.add_argument("--pan-step", type=int, default=4, help="pan speed in px a frame (default 4)")
    parser.add_argument(
        "--zoom-rate", type=float, default=0.01, help="zoom: extra magnification a frame (default 0.01)"
    )
    parser.add_argument(
        "--object-step", type=int, default=4, help="object: its speed in px a frame (default 4)"
    )
    parser.add_argument(
        "--motion-strength",
        type=float,
        default=0.0,
        help="also run both_motion: both_steps, with this --motion-strength, in (0, 1) (default 0: not run)",
    )
    parser.add_argument(
        "--image-feedback",
        type=float,
        default=0.0,
        help="also run image (this --image-feedback alone: the previous output image moved along the "
        "motion and blended into each new one) and both_image (both_steps with it), in (0, 1) (default 0: "
        "not run)",
    )
    parser.add_argument(
        "--strip", metavar="FILE.png", help="save frames of the first moving clip side by side, per setting"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        check_arguments(args)
        config = stream_config(args, noise="fixed", latent_feedback=0.0, vae=args.vae)
        check_plot_target(args.plot)
        if args.strip and not Path(args.strip).expanduser().resolve().parent.is_dir():
            raise UsageError(f"--strip {args.strip}: its folder does not exist")
        clips = make_clips(args, (config.height, config.width))
        denoisers = load(config, args)
    except UsageError as exc:
        return usage_error(PROG, str(exc))
    except SystemExit as exc:  # --help
        return int(exc.code or 0)

    curves, times, strip = measure_clips(denoisers, clips, args.warmup)
    first = next(iter(denoisers.values()))
    settings = {
        s: setting_changes(s, args.feedback, args.motion_strength, args.image_feedback) for s in args.settings
    }
    report = build_report(first, args, curves, times, command_line(MODULE, argv), settings)
    print_table(report)
    if args.plot:
        plot(curves, report, args.plot)
        print(f"plot: {args.plot}")
    if args.strip and strip:
        save_strip(strip, args.strip)
        print(f"strip: {args.strip}")
    print(json.dumps(report))
    return 0


def check_arguments(args: argparse.Namespace) -> None:
    if not 0.0 < args.feedback < 1.0:
        raise UsageError(f"--feedback must be in (0, 1) (it is compared against 0), got {args.feedback}")
    if args.frames < 2:
        raise UsageError(
            f"--frames must be at least 2 (measures compare consecutive frames), got {args.frames}"
        )
    if args.pan_step < 0 or args.object_step < 0:
        raise UsageError("--pan-step and --object-step must be 0 or more px a frame")
    if not 0.0 <= args.motion_strength < 1.0:
        raise UsageError(f"--motion-strength must be in [0, 1), got {args.motion_strength}")
    if not 0.0 <= args.image_feedback < 1.0:
        raise UsageError(f"--image-feedback must be in [0, 1), got {args.image_feedback}")
    args.settings = SETTINGS + (("both_motion",) if args.motion_strength > 0 else ())
    args.settings += ("image", "both_image") if args.image_feedback > 0 else ()
    if not 0.0 <= args.zoom_rate <= 1.0:
        raise UsageError(f"--zoom-rate must be in [0, 1], got {args.zoom_rate}")
    kinds = [k for k in args.clips.split(",") if k and k != "none"]
    unknown = [k for k in kinds if k not in MOVING]
    if unknown:
        raise UsageError(f"--clips takes {', '.join(MOVING)} or none, got {', '.join(unknown)}")
    args.kinds = kinds


def make_clips(args: argparse.Namespace, size: tuple[int, int]) -> dict[str, list[np.ndarray]]:
    """The moving clips asked for, the video file's, and the still clip (always last)."""
    from stream.clips import ClipError, video_clip

    clips = {
        kind: photo_clip(
            kind,
            args.frames,
            size,
            photo=args.photo,
            step=args.object_step if kind == "object" else args.pan_step,
            zoom_rate=args.zoom_rate,
        )
        for kind in args.kinds
    }
    if args.clip:
        try:
            clips[f"file:{Path(args.clip).name}"] = video_clip(args.clip, args.frames, size)
        except ClipError as exc:
            raise UsageError(f"--clip: {exc}") from exc
    clips[STILL] = photo_clip("static", args.frames, size, photo=args.photo, seed=args.seed)
    return clips


def load(config: Any, args: argparse.Namespace) -> dict[str, Any]:
    """One denoiser a setting, all over the one loaded model (one shared engine)."""
    from stream.config import ConfigError
    from stream.denoiser import StreamDenoiser
    from stream.models import ModelError, load_model

    try:
        components = load_model(config)
        return {
            s: StreamDenoiser(
                components,
                config.replace(
                    **setting_changes(s, args.feedback, args.motion_strength, args.image_feedback)
                ),
            )
            for s in args.settings
        }
    except (ModelError, ConfigError) as exc:
        raise UsageError(str(exc)) from exc


def measure_clips(
    denoisers: dict[str, Any], clips: dict[str, list[np.ndarray]], warmup: int
) -> tuple[dict[str, dict[str, dict[str, list[float]]]], dict[str, list[float]], dict[str, list[np.ndarray]]]:
    """Every setting on every clip (after `warmup` frames of the still clip): per clip, the warp error
    and change curves of the input and each setting (and, on moving clips, the share of pixels the
    measuring flow masks); each setting's times a frame; the first moving clip's frames, for a strip."""
    for d in denoisers.values():
        for frame in clips[STILL][:warmup]:
            d(frame)
    times: dict[str, list[float]] = {s: [] for s in denoisers}
    curves: dict[str, dict[str, dict[str, list[float]]]] = {}
    strip: dict[str, list[np.ndarray]] = {}
    for name, frames in clips.items():
        outputs = run_clip(denoisers, frames, times)
        warps = input_warps(frames)
        curves[name] = {
            "warp_error": {k: warp_errors(v, warps) for k, v in {"input": frames, **outputs}.items()},
            "change": {k: frame_changes(v) for k, v in {"input": frames, **outputs}.items()},
            "contrast": {k: contrasts(v) for k, v in {"input": frames, **outputs}.items()},
        }
        if not strip and name != STILL:
            strip = {"input": frames, **outputs}
        if name != STILL:
            curves[name]["masked"] = {"input": [1.0 - float(w.valid.mean()) for w in warps]}
            curves[name]["stuck"] = {
                k: stuck_errors(v, warps) for k, v in {"input": frames, **outputs}.items()
            }
    return curves, times, strip


def run_clip(
    denoisers: dict[str, Any], frames: Sequence[np.ndarray], times: dict[str, list[float]]
) -> dict[str, list[np.ndarray]]:
    """Every setting's outputs for the clip, from a fresh start; the settings take turns frame by frame
    (in a rotating order), and each frame's wall-clock time is added to `times`."""
    for d in denoisers.values():
        d.reset()
    outputs: dict[str, list[np.ndarray]] = {s: [] for s in denoisers}
    names = list(denoisers)
    for i, frame in enumerate(frames):
        for s in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            outputs[s].append(denoisers[s](frame))
            times[s].append((time.perf_counter() - start) * 1000.0)
    return outputs


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
