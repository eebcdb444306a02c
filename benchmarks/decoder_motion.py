"""Can the model's decoder draw its own output moved by less than a latent pixel?

Latent feedback along the motion (`--feedback-warp`) moves the previous output's latent by the input's
flow, and hopes that the decoded picture moves with it. A latent pixel is 8 (SD) or 16 (the built-in
tiny model) canvas pixels, so a slow motion moves the latent by a fraction of a pixel a frame. Where
the decoder cannot draw its output moved by such a fraction, the output keeps a pattern tied to the
screen that no latent can move, and the warp error of `benchmarks/temporal.py` has a floor that
feedback cannot get under.

One frame of the photo goes through the stream (no feedback) and its denoised latent z is kept; D(z)
is the output. For each motion of `--motions` (pan:N moves the picture left by N canvas px, pan:cell
by one latent pixel, zoom:R magnifies it by 1 + R about the centre), the target is D(z) moved by it
(cv2.warpAffine, bilinear). Reported, as mean L1 on 0-255 over the frame's inside (a margin of two
latent pixels left out, where the moved picture comes from past the edge):

- unmoved: D(z) against the target (a picture stuck to the screen);
- latent warp: D(warp(z)), z warped bilinearly by the motion in latent pixels (what the feedback does);
- best latent: D(z*), z* fitted to the target by gradient descent (Adam, `--iters` steps, from the
  warped latent): a local optimum, so an estimate from above of what any latent can do;

and the share of the unmoved gap each closes (1 - error / unmoved). A whole latent pixel's pan is the
control: a convolutional decoder draws it all but exactly. On the built-in model's random decoder a
pan by 1-4 px or a 1 % zoom is barely closed even by the best latent (benchmarks/README.md); a
trained autoencoder should do better, which this measures wherever the weights are.

Prints a table (a row as each motion is done), then one JSON object as the last line. Example:

    python -m benchmarks.decoder_motion --model tiny --width 256 --height 256
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch

from benchmarks.common import (
    PHOTOS,
    ArgumentParser,
    UsageError,
    add_vae_argument,
    command_line,
    environment,
    model_config,
    model_note,
    photo_clip,
    usage_error,
)
from stream import temporal

PROG = "decoder_motion"
MODULE = "benchmarks.decoder_motion"
DEFAULT_MOTIONS = "pan:1,pan:2,pan:4,pan:8,pan:cell,zoom:0.01,zoom:0.03"


@dataclass(frozen=True)
class Motion:
    kind: str  # pan or zoom
    amount: float  # pan: canvas px; zoom: extra magnification

    @property
    def label(self) -> str:
        return f"pan {self.amount:g} px" if self.kind == "pan" else f"zoom {self.amount:.0%}"

    def matrix(self, size: tuple[int, int]) -> np.ndarray:
        """The 2x3 affine map of the canvas (h, w) that cv2.warpAffine moves the picture by."""
        h, w = size
        if self.kind == "pan":
            return np.array([[1.0, 0.0, -self.amount], [0.0, 1.0, 0.0]])
        return cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), 0.0, 1.0 + self.amount)


def margin_px(size: tuple[int, int], cell: int) -> int:
    """The border left out of the measure: two latent pixels, at most a quarter of the shorter side."""
    return min(2 * cell, min(size) // 4)


def parse_motions(text: str, cell: int, most_pan: int) -> list[Motion]:
    """`pan:N,pan:cell,zoom:R` -> motions; `cell` is the model's latent pixel in canvas px; a pan may
    move at most `most_pan` px (the margin: a longer one would bring in picture from past the edge)."""
    motions = []
    for item in (part.strip() for part in text.split(",")):
        kind, _, value = item.partition(":")
        if kind not in ("pan", "zoom") or not value:
            raise UsageError(f"--motions: each item is pan:PX, pan:cell or zoom:RATE, got {item!r}")
        try:
            amount = float(cell) if (kind, value) == ("pan", "cell") else float(value)
        except ValueError:
            raise UsageError(f"--motions: {item!r} needs a number after the colon (or pan:cell)") from None
        if not (0.0 < amount <= (most_pan if kind == "pan" else 0.5)):
            limit = (
                f"(0, {most_pan}] px (the margin left out of the measure)" if kind == "pan" else "(0, 0.5]"
            )
            raise UsageError(f"--motions: {item!r} is out of range: a {kind} takes {limit}")
        motions.append(Motion(kind, amount))
    return motions


def latent_flow(matrix: np.ndarray, latent: tuple[int, int], cell: int) -> torch.Tensor:
    """(h, w, 2) latent px: where each latent pixel's content was before the canvas moved by `matrix`
    (the motion at each latent pixel's centre), as temporal.warp takes it."""
    h, w = latent
    back = cv2.invertAffineTransform(matrix)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    cx, cy = xs * cell + (cell - 1) / 2.0, ys * cell + (cell - 1) / 2.0  # centres in canvas px
    sx = back[0, 0] * cx + back[0, 1] * cy + back[0, 2]
    sy = back[1, 0] * cx + back[1, 1] * cy + back[1, 2]
    return torch.from_numpy(np.stack([(sx - cx) / cell, (sy - cy) / cell], axis=-1).astype(np.float32))


def decoder(engine: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """z (1, C, h, w) scaled latent -> (1, 3, H, W) float32 in [0, 1], eager and differentiable."""

    def decode(z: torch.Tensor) -> torch.Tensor:
        image = engine.vae.decode((z / engine.scaling_factor).to(engine.vae_dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    return decode


def measure_motion(
    decode: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    output: np.ndarray,
    motion: Motion,
    cell: int,
    margin: int,
    iters: int,
    lr: float,
) -> dict[str, Any]:
    """One motion's row (see the module's docstring): unmoved, latent warp and best latent errors."""
    h, w = output.shape[:2]
    matrix = motion.matrix((h, w))
    moved = cv2.warpAffine(output, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    shown, target = (
        torch.from_numpy(a).permute(2, 0, 1)[None].float().to(z.device) / 255.0 for a in (output, moved)
    )
    inside = (slice(None), slice(None), slice(margin, h - margin), slice(margin, w - margin))

    def error(image: torch.Tensor) -> float:
        return float((image[inside] - target[inside]).abs().mean()) * 255.0

    start = time.perf_counter()
    warped = temporal.warp(z.float(), latent_flow(matrix, tuple(z.shape[-2:]), cell))
    fitted = warped.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([fitted], lr=lr)
    for _ in range(iters):
        optimizer.zero_grad()
        loss = (decode(fitted)[inside] - target[inside]).abs().mean()  # scored where it is measured
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    with torch.no_grad():
        unmoved, by_warp, best = error(shown), error(decode(warped)), error(decode(fitted))
    corner = np.array([margin, margin, 1.0])  # the inside's farthest-moving point
    shift = float(np.linalg.norm(matrix @ corner - corner[:2]))
    return {
        "motion": motion.label,
        "kind": motion.kind,
        "amount": motion.amount,
        "max_shift_px": shift,
        "max_shift_latent_px": shift / cell,
        "unmoved": unmoved,
        "latent_warp": by_warp,
        "best_latent": best,
        "closed_by_warp": 1.0 - by_warp / unmoved if unmoved > 0 else 0.0,
        "closed_by_best": 1.0 - best / unmoved if unmoved > 0 else 0.0,
        "fit_s": time.perf_counter() - start,
    }


def build_parser() -> ArgumentParser:
    from stream.config import DTYPES

    parser = ArgumentParser(
        prog=f"python -m {MODULE}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="anything StreamDenoiser loads (default: tiny)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda:N")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: float16 on CUDA, else float32")
    add_vae_argument(parser)
    parser.add_argument("--width", type=int, default=256, help="canvas width in px (default 256)")
    parser.add_argument("--height", type=int, default=256, help="canvas height in px (default 256)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps of the frame (default 4)")
    parser.add_argument("--strength", type=float, default=0.5, help="img2img strength (default 0.5)")
    parser.add_argument("--prompt", default="a watercolor painting", help="text prompt")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument(
        "--photo", default="coffee", choices=PHOTOS, help="scikit-image photo (default coffee)"
    )
    parser.add_argument(
        "--motions",
        default=DEFAULT_MOTIONS,
        help="comma-separated pan:PX (the picture moves left PX canvas px), pan:cell (one latent pixel, "
        "the control) and zoom:RATE (magnified by 1 + RATE) (default %(default)s)",
    )
    parser.add_argument(
        "--iters", type=int, default=300, help="gradient steps fitting the best latent (default 300)"
    )
    parser.add_argument("--lr", type=float, default=0.05, help="the fit's Adam learning rate (default 0.05)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        if args.iters < 1 or args.lr <= 0:
            raise UsageError(f"--iters must be 1 or more and --lr above 0, got {args.iters} and {args.lr}")
        denoiser = load(args)
        cell = denoiser.vae_factor
        margin = margin_px((args.height, args.width), cell)
        motions = parse_motions(args.motions, cell, margin)
    except UsageError as exc:
        return usage_error(PROG, str(exc))
    except SystemExit as exc:  # --help
        return int(exc.code or 0)

    frame = photo_clip("static", 1, (args.height, args.width), photo=args.photo, seed=args.seed)[0]
    output = denoiser(frame)
    z = denoiser.last_latent
    assert z is not None
    engine = denoiser.engine
    note = model_note(engine.name, engine.placeholder)
    dtype = str(engine.vae_dtype).removeprefix("torch.")
    print(f"decoder motion: {engine.name} on {engine.device} ({dtype}) -- {note}")
    print(
        f"{args.width}x{args.height}, a latent pixel is {cell} px; L1 on 0-255 against the output moved, "
        f"over the inside ({margin} px margin); best latent: {args.iters} Adam steps at lr {args.lr}"
    )
    print(f"{'motion':12s} {'max shift':>14s} {'unmoved':>8s} {'latent warp':>18s} {'best latent':>18s}")
    decode = decoder(engine)
    rows = []
    for motion in motions:
        row = measure_motion(decode, z, output, motion, cell, margin, args.iters, args.lr)
        rows.append(row)
        print(
            f"{row['motion']:12s} {row['max_shift_px']:5.1f} px ({row['max_shift_latent_px']:4.2f}) "
            f"{row['unmoved']:8.2f} {row['latent_warp']:8.2f} ({row['closed_by_warp']:+4.0%}) "
            f"{row['best_latent']:8.2f} ({row['closed_by_best']:+4.0%})",
            flush=True,
        )
    print("(in brackets: the share of the unmoved gap closed)")
    report = {
        "benchmark": PROG,
        "model": engine.name,
        "model_arg": args.model,
        "random_weights": bool(engine.placeholder),
        "note": note,
        **environment(engine.device),
        "dtype": dtype,
        "width": args.width,
        "height": args.height,
        "latent_px": cell,
        "margin_px": margin,
        "steps": args.steps,
        "strength": args.strength,
        "photo": args.photo,
        "iters": args.iters,
        "lr": args.lr,
        "motions": rows,
        "command": command_line(MODULE, argv),
    }
    print(json.dumps(report))
    return 0


def load(args: argparse.Namespace) -> Any:
    """The stream (no feedback, fixed noise) over the model; bad settings become a UsageError."""
    from stream.config import ConfigError
    from stream.denoiser import StreamDenoiser
    from stream.models import ModelError, load_model

    config = model_config(args, vae=args.vae, latent_feedback=0.0, cuda_graphs="off")
    try:
        return StreamDenoiser(load_model(config), config)
    except (ModelError, ConfigError) as exc:
        raise UsageError(str(exc)) from exc


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
