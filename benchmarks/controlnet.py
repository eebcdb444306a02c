"""What a ControlNet costs per frame, in one run: the model alone, with a ControlNet fed the frame itself
(`--control none`: the ControlNet call alone), and with canny edges (`--control canny`: the call and
the canny stage).

Three StreamDenoisers (`alone`, `controlnet_none`, `controlnet_canny`) over the same model (the
ControlNet ones share one loaded copy with a `random` ControlNet shaped like the model's UNet), called
frame after frame in turn so that drifts of the machine hit all three alike. Per variant: frame time
p50/p95/p99 and FPS, the UNet calls' time (ControlNet included) and the `control` stage (making the
conditioning image). The ControlNet call's cost is the UNet time of `controlnet_none` minus that of
`alone`; the canny stage is its own stage.

Prints a table, then one JSON object as the last line. Examples:

    python -m benchmarks.controlnet --model tiny --width 256 --height 256 --steps 2 --frames 60
    python -m benchmarks.controlnet --model tiny-sdxl --width 256 --height 256 --steps 2 --frames 60
    python -m benchmarks.controlnet --model random:sd-turbo --device cuda --steps 1 --strength 1
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.common import (
    ArgumentParser,
    UsageError,
    add_common_arguments,
    command_line,
    environment,
    latency_stats,
    model_note,
    photo_clip,
    stream_config,
    synchronize,
    usage_error,
)

PROG = "controlnet"
MODULE = "benchmarks.controlnet"
VARIANTS = ("alone", "controlnet_none", "controlnet_canny")
CLIP_LENGTH = 64


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=f"python -m {MODULE}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser, frames=48, warmup=3)
    return parser


def load(config: Any) -> dict[str, Any]:
    """The three denoisers; a model that cannot load becomes a UsageError."""
    from stream.config import ConfigError
    from stream.denoiser import StreamDenoiser
    from stream.models import ModelError, load_model

    try:
        plain = load_model(config)
        with_net = load_model(config.replace(controlnet="random"))
        return {
            "alone": StreamDenoiser(plain, config),
            "controlnet_none": StreamDenoiser(with_net, config.replace(controlnet="random", control="none")),
            "controlnet_canny": StreamDenoiser(
                with_net, config.replace(controlnet="random", control="canny")
            ),
        }
    except (ModelError, ConfigError) as exc:
        raise UsageError(str(exc)) from exc


def run(denoisers: dict[str, Any], clip: list[np.ndarray], warmup: int, frames: int) -> dict[str, Any]:
    """Per variant and frame: wall ms, the UNet calls' ms (sum of unet_i) and the control stage's ms."""
    for i in range(warmup):
        for d in denoisers.values():
            d.process(clip[i % len(clip)])
    samples: dict[str, dict[str, list[float]]] = {
        name: {"frame": [], "unet": [], "control": []} for name in denoisers
    }
    for i in range(frames):
        frame = clip[(warmup + i) % len(clip)]
        for name, d in denoisers.items():
            synchronize(d.device)
            start = time.perf_counter()
            timings = d.process(frame).timings
            samples[name]["frame"].append((time.perf_counter() - start) * 1000.0)
            samples[name]["unet"].append(sum(v for k, v in timings.items() if k.startswith("unet_")))
            samples[name]["control"].append(timings.get("control", 0.0))
    return samples


def summarize(samples: dict[str, Any], config: Any, denoiser: Any, args: Any, command: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, s in samples.items():
        out[name] = {
            "frame": {k: round(v, 3) for k, v in latency_stats(s["frame"]).items()},
            "unet_p50_ms": round(float(np.percentile(s["unet"], 50)), 3),
            "control_p50_ms": round(float(np.percentile(s["control"], 50)), 3),
        }
    net = [a - b for a, b in zip(samples["controlnet_none"]["unet"], samples["alone"]["unet"], strict=True)]
    return {
        "benchmark": "controlnet",
        "model": denoiser.name,
        "note": model_note(denoiser.name, denoiser.placeholder),
        **environment(denoiser.device),
        "dtype": str(denoiser.dtype).removeprefix("torch."),
        "width": config.width,
        "height": config.height,
        "steps": config.steps,
        "strength": config.strength,
        "guidance": config.guidance_scale,
        "frames": args.frames,
        "warmup": args.warmup,
        **out,
        "controlnet_call_ms_p50": round(float(np.percentile(net, 50)), 3),  # per frame, all steps
        "canny_ms_p50": out["controlnet_canny"]["control_p50_ms"],
        "command": command,
    }


def print_table(r: dict[str, Any]) -> None:
    print(f"controlnet: {r['model']} on {r['gpu'] or r['device']} ({r['dtype']}) -- {r['note']}")
    print(
        f"{r['width']}x{r['height']}, {r['steps']} steps, strength {r['strength']}, "
        f"guidance {r['guidance']}, {r['frames']} frames after {r['warmup']} warm-up, "
        "variants interleaved frame by frame"
    )
    print(f"{'variant':<18}{'p50':>9}{'p95':>9}{'p99':>9}{'FPS':>7}{'unet p50':>10}{'control p50':>13}   ms")
    for name in VARIANTS:
        v, f = r[name], r[name]["frame"]
        print(
            f"{name:<18}{f['p50_ms']:>9.2f}{f['p95_ms']:>9.2f}{f['p99_ms']:>9.2f}{f['fps']:>7.1f}"
            f"{v['unet_p50_ms']:>10.2f}{v['control_p50_ms']:>13.2f}"
        )
    print(
        f"ControlNet call: {r['controlnet_call_ms_p50']:.2f} ms per frame (p50 of the UNet-time difference); "
        f"canny stage: {r['canny_ms_p50']:.2f} ms (p50)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        config = stream_config(args)
        denoisers = load(config)
    except UsageError as exc:
        return usage_error(PROG, str(exc))
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    clip = photo_clip("pan", min(CLIP_LENGTH, args.warmup + args.frames), (config.height, config.width))
    samples = run(denoisers, clip, args.warmup, args.frames)
    report = summarize(samples, config, denoisers["alone"], args, command_line(MODULE, argv))
    print_table(report)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
