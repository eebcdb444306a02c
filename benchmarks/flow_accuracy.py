"""How accurate and how costly is the stream's optical flow?

Everything that follows the motion (flow-warped feedback, warped noise, image feedback) moves the
previous output by the input's flow (stream/flow.py); a flow that is off by a fraction of a pixel
drifts the feedback off its content. This measures the flow against motions known exactly: a real
photo moved by sub-pixel translations, a zoom about the centre and a small rotation, made at twice
the flow's size (cv2.warpAffine, cubic) and area-downsampled to it, as the stream sees a frame.

Variants, each timed on the same image pairs in turn:
- ultrafast: OpenCV's DIS ultrafast preset as it is (its finest scale a quarter of the image);
- stream: what the stream runs (flow.dis_flow: the preset with variational refinement);
- finer: the stream's, down to half the image's resolution (finest scale 1): more accurate, and
  about twice the time;
- medium: DIS's medium preset, for reference (what benchmarks/temporal.py measures with).

Reported per motion and variant: the mean endpoint error (the length of estimated minus true flow,
in flow pixels, over the inside: an eighth of each side left out, where content enters), and per
variant the time of `flow.estimate_motion` (the flow both ways and the consistency test, as on the
stream's flow thread) p50 / p95 ms over all pairs and repeats, on `--threads` OpenCV threads.

Prints a table, then one JSON object as the last line. Example:

    python -m benchmarks.flow_accuracy
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import torch

from benchmarks.common import (
    PHOTOS,
    ArgumentParser,
    UsageError,
    command_line,
    environment,
    latency_stats,
    load_photo,
    usage_error,
)
from stream import flow

PROG = "flow_accuracy"
MODULE = "benchmarks.flow_accuracy"
# (name, dx, dy, zoom, degrees): the content moves by (dx, dy) flow px, is magnified by 1 + zoom and
# turned by `degrees` about the image's centre, from one frame to the next.
MOTIONS: tuple[tuple[str, float, float, float, float], ...] = (
    ("pan 0.3", 0.3, 0.0, 0.0, 0.0),
    ("pan 0.7", 0.7, 0.0, 0.0, 0.0),
    ("pan 1.5", 1.5, 0.0, 0.0, 0.0),
    ("pan 2.5,1.1", 2.5, 1.1, 0.0, 0.0),
    ("pan 3.5,-1.5", 3.5, -1.5, 0.0, 0.0),
    ("zoom 1%", 0.0, 0.0, 0.01, 0.0),
    ("zoom 1.5%", 0.0, 0.0, 0.015, 0.0),
    ("turn 1 deg", 0.0, 0.0, 0.0, 1.0),
)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=f"python -m {MODULE}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--side", type=int, default=flow.FLOW_SIDE, help="the flow image's side in px (default %(default)s)"
    )
    parser.add_argument(
        "--photos",
        default="coffee,rocket,astronaut",
        help=f"photos to move, comma-separated, any of {', '.join(PHOTOS)} (default %(default)s)",
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed runs of each pair (default 10)")
    parser.add_argument(
        "--threads", type=int, default=1, help="OpenCV threads (cv2.setNumThreads; default 1)"
    )
    return parser


def variants() -> dict[str, Callable[[], Any]]:
    return {
        "ultrafast": lambda: cv2.DISOpticalFlow.create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST),
        "stream": flow.dis_flow,
        "finer": finer,
        "medium": lambda: cv2.DISOpticalFlow.create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM),
    }


def finer() -> Any:
    dis = flow.dis_flow()
    dis.setFinestScale(1)
    return dis


def motion_pair(photo: np.ndarray, side: int, motion: tuple[str, float, float, float, float]) -> tuple:
    """Two gray (side, side) frames and the true backward flow (side, side, 2): where each pixel of
    the second was in the first, minus where it is."""
    _, dx, dy, zoom, degrees = motion
    big = 2 * side
    gray = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    scale = big / min(gray.shape)  # cover the frame, with room around it
    base = cv2.resize(gray, None, fx=scale * 1.25, fy=scale * 1.25, interpolation=cv2.INTER_AREA)
    top, left = (base.shape[0] - big) // 2, (base.shape[1] - big) // 2
    centre = ((big - 1) / 2.0, (big - 1) / 2.0)

    def frame(matrix: np.ndarray) -> np.ndarray:
        # matrix maps frame pixels (at 2x) to base pixels
        image = cv2.warpAffine(
            base,
            matrix,
            (big, big),
            flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REFLECT,
        )
        return cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)

    first = np.float32([[1, 0, left], [0, 1, top]])
    # The second frame: x (frame px at 2x) shows what the first showed at centre + A (x - centre) + d.
    turn = np.deg2rad(degrees)
    a = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]]) / (1.0 + zoom)
    d = np.array([2 * dx, 2 * dy])
    c = np.array(centre)
    offset = c - a @ c + d  # x -> a x + offset, in the first frame's pixels
    second = np.float32([[a[0, 0], a[0, 1], offset[0] + left], [a[1, 0], a[1, 1], offset[1] + top]])
    # True flow at the flow's size: pixel p (side px) sits at 2 p + 0.5 at 2x, as INTER_AREA by 2 has it.
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float64)
    px, py = 2 * xs + 0.5, 2 * ys + 0.5
    wx = a[0, 0] * px + a[0, 1] * py + offset[0]
    wy = a[1, 0] * px + a[1, 1] * py + offset[1]
    truth = np.stack([(wx - px) / 2, (wy - py) / 2], axis=-1).astype(np.float32)
    return frame(first), frame(second), truth


def endpoint_error(estimated: np.ndarray, truth: np.ndarray) -> float:
    side = truth.shape[0]
    m = side // 8
    diff = estimated[m:-m, m:-m] - truth[m:-m, m:-m]
    return float(np.sqrt((diff**2).sum(axis=-1)).mean())


def measure(args: argparse.Namespace) -> dict[str, Any]:
    photos = [load_photo(name) for name in args.photos.split(",")]
    pairs = [(motion, *motion_pair(p, args.side, motion)) for motion in MOTIONS for p in photos]
    errors: dict[str, dict[str, list[float]]] = {v: {m[0]: [] for m in MOTIONS} for v in variants()}
    times: dict[str, list[float]] = {v: [] for v in variants()}
    made = {name: make() for name, make in variants().items()}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not timed
        for motion, first, second, truth in pairs:
            for name, dis in made.items():
                start = time.perf_counter()
                estimated = flow.estimate_motion(dis, first, second, 1, 1.0)
                elapsed = (time.perf_counter() - start) * 1000.0
                if repeat == 0:
                    errors[name][motion[0]].append(endpoint_error(estimated.flow, truth))
                else:
                    times[name].append(elapsed)
    return {
        "error": {v: {m: float(np.mean(e)) for m, e in per.items()} for v, per in errors.items()},
        "mean_error": {v: float(np.mean([np.mean(e) for e in per.values()])) for v, per in errors.items()},
        "time": {v: {k: latency_stats(t)[k] for k in ("p50_ms", "p95_ms")} for v, t in times.items()},
    }


def check_arguments(args: argparse.Namespace) -> None:
    if not 32 <= args.side <= 1024:
        raise UsageError(f"--side must be 32 to 1024 px, got {args.side}")
    unknown = [p for p in args.photos.split(",") if p not in PHOTOS]
    if unknown:
        raise UsageError(f"--photos: unknown {', '.join(unknown)}; pick from {', '.join(PHOTOS)}")
    if args.repeats < 1:
        raise UsageError(f"--repeats must be 1 or more, got {args.repeats}")
    if args.threads < 1:
        raise UsageError(f"--threads must be 1 or more, got {args.threads}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        check_arguments(args)
    except UsageError as exc:
        return usage_error(PROG, str(exc))
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    cv2.setNumThreads(args.threads)
    result = measure(args)
    names = list(variants())
    print(f"flow accuracy: DIS at {args.side}x{args.side} on {args.photos}, {args.threads} OpenCV thread(s)")
    print("mean endpoint error in flow px (lower is better) over the inside; motions per frame")
    print(f"{'motion':14s}" + "".join(f"{n:>12s}" for n in names))
    for motion in MOTIONS:
        print(f"{motion[0]:14s}" + "".join(f"{result['error'][n][motion[0]]:12.3f}" for n in names))
    print(f"{'mean':14s}" + "".join(f"{result['mean_error'][n]:12.3f}" for n in names))
    for key in ("p50_ms", "p95_ms"):
        label = f"{key[:3]} ms, both ways"
        print(f"{label:14s}" + "".join(f"{result['time'][n][key]:12.2f}" for n in names))
    report = {
        "benchmark": PROG,
        **environment(torch.device("cpu")),
        "side": args.side,
        "photos": args.photos.split(","),
        "repeats": args.repeats,
        "opencv_threads": args.threads,
        "opencv": cv2.__version__,
        "stream_dis": {"preset": "ultrafast", "refinement": flow.DIS_REFINEMENT},
        **result,
        "command": command_line(MODULE, argv),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
