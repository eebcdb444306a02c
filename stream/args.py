"""The command line's shared pieces: the model and stream options, the budget options, the parser
(with "did you mean" for typos and every default in --help), checking the settings, and logging."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import math
import re
from collections.abc import Sequence
from typing import Any, NoReturn

from stream.config import (
    ATTENTION_BACKENDS,
    CFG_MODES,
    CONTROL_MODES,
    DTYPES,
    FEEDBACK_AT,
    NOISE_MODES,
    SCHEDULERS,
    TIMESTEP_RULES,
    ConfigError,
    StreamConfig,
)
from stream.sizes import SD_MULTIPLE, check_sides, known_multiple

# (flag, StreamConfig field, type, help); defaults come from StreamConfig itself.
CONFIG_FLAGS: list[tuple[str, str, type, str]] = [
    (
        "--model",
        "model",
        str,
        "hub id, local diffusers folder, single-file checkpoint, `tiny` (built-in, random "
        "weights, runs on a CPU), `random:sd-turbo` / `random:sd15` / `random:sdxl-turbo` (full size, "
        "random weights, for speed), `tiny-sdxl` (the built-in tiny model's SDXL twin), or "
        "`auto` (stabilityai/sd-turbo when cached or downloadable, else tiny with a warning)",
    ),
    (
        "--vae",
        "vae",
        str,
        "`auto` (the model's own), `tiny` (TAESD-shaped AutoencoderTiny; TAESDXL for SDXL), or a path / hub "
        "id (e.g. an fp16-safe SDXL VAE)",
    ),
    ("--prompt", "prompt", str, "text prompt"),
    ("--negative-prompt", "negative_prompt", str, "negative prompt (used when --guidance > 1)"),
    (
        "--width",
        "width",
        int,
        "model width in pixels: a multiple of what the model's autoencoder downsamples by (8 for SD "
        "models, 16 for the built-in tiny model); frames are letterboxed into it",
    ),
    ("--height", "height", int, "model height in pixels, the same rule as --width"),
    ("--steps", "steps", int, "denoising steps per frame, 1-5"),
    ("--strength", "strength", float, "img2img strength in (0, 1]: higher changes the frame more"),
    ("--guidance", "guidance_scale", float, "classifier-free guidance scale; CFG runs when > 1"),
    ("--scheduler", "scheduler", str, f"one of {', '.join(SCHEDULERS)}"),
    (
        "--timesteps",
        "timesteps",
        str,
        f"one of {', '.join(TIMESTEP_RULES)}: `streaming` starts each frame at a timestep that follows "
        "--strength continuously; `diffusers` uses the img2img pipeline's grid (LCM keeps its own)",
    ),
    ("--seed", "seed", int, "noise seed"),
    ("--latent-feedback", "latent_feedback", float, "share of the previous output latent blended in, [0, 1)"),
    (
        "--image-feedback",
        "image_feedback",
        float,
        "share of the previous output image blended into each new one after decoding, [0, 1): moved along "
        "the input's optical flow first (--feedback-warp), by fractions of a latent pixel too; it steadies "
        "flicker, at the price of a softer picture where the model's output does not move with the content",
    ),
    (
        "--noise",
        "noise",
        str,
        f"one of {', '.join(NOISE_MODES)}: fixed noise keeps a still scene still; warped noise also moves "
        "with the content (optical flow)",
    ),
    (
        "--similarity-threshold",
        "similarity_threshold",
        float,
        "skip the model and repeat the last output when the input is at least this similar, [0, 1); 0 = off",
    ),
    ("--max-skip", "max_skip", int, "at most this many frames in a row are skipped by the similarity filter"),
    ("--device", "device", str, "auto, cpu, cuda, cuda:N or mps"),
    ("--dtype", "dtype", str, f"one of {', '.join(DTYPES)} (auto: float16 on CUDA, float32 elsewhere)"),
    ("--attention", "attention", str, f"one of {', '.join(ATTENTION_BACKENDS)}"),
]


class UsageError(Exception):
    """A bad argument or input: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, plus: a mistyped option or command gets the subcommand's own usage and a "did you mean"."""

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(self, "commands", {}).get(getattr(parsed, "command", None), self)
            command.error(unrecognized(extras, command))
        return parsed

    def error(self, message: str) -> NoReturn:
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            options = re.findall(r"'?([^', ]+)'?", choice.group(2))
            message += did_you_mean(choice.group(1), options)
        super().error(message)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless it already says it in words (or is a switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or isinstance(action.default, bool)
            or action.default in (None, argparse.SUPPRESS)
        ):
            return text
        if action.default == "":
            return f"{text} (default: empty)"
        return super()._get_help_string(action) or text


def unrecognized(extras: list[str], parser: argparse.ArgumentParser) -> str:
    flags = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
    hints = [did_you_mean(x.split("=")[0], flags) for x in extras if x.startswith("-")]
    return f"unrecognized arguments: {' '.join(extras)}" + "".join(dict.fromkeys(h for h in hints if h))


def did_you_mean(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def add_config_arguments(parser: argparse.ArgumentParser, size_default: str | None = None) -> None:
    """The model and stream settings. `size_default`: the words for --width/--height's default when it
    is not StreamConfig's (they are then None unless given)."""
    defaults = StreamConfig()
    group = parser.add_argument_group("model and stream settings")
    for flag, field, kind, text in CONFIG_FLAGS:
        default = getattr(defaults, field)
        if size_default and field in ("width", "height"):
            text, default = f"{text} (default: {size_default})", None
        group.add_argument(
            flag, dest=field, type=kind, default=default, metavar=kind.__name__.upper(), help=text
        )
    add_motion_arguments(group)
    add_speed_arguments(parser)
    add_adapter_arguments(parser)


def add_adapter_arguments(parser: argparse.ArgumentParser) -> None:
    """LoRA and ControlNet: what is added to the model, and how strongly."""
    defaults = StreamConfig()
    group = parser.add_argument_group("LoRA and ControlNet")
    group.add_argument(
        "--lora",
        action="append",
        metavar="SOURCE[:SCALE]",
        help="a LoRA (.safetensors file, folder or hub id), optionally with its scale, fused into the model "
        "for every session; repeat for several (default: none). LCM-LoRA with --scheduler lcm runs SD 1.5 in "
        "4 steps",
    )
    group.add_argument(
        "--lora-scale", type=float, default=defaults.lora_scale, help="overall LoRA scale (live setting)"
    )
    group.add_argument(
        "--controlnet",
        default=defaults.controlnet,
        metavar="SOURCE",
        help="a ControlNet (folder, hub id or file) of the model's family, or `random` (shaped like the "
        "model, random weights, for speed); empty = none",
    )
    group.add_argument(
        "--control",
        choices=CONTROL_MODES,
        default=defaults.control,
        help="the ControlNet's conditioning image from each frame: `canny` edges (OpenCV), or `none` (the "
        "frame itself, for a source that already is one: edges, depth, pose)",
    )
    group.add_argument(
        "--controlnet-scale",
        dest="controlnet_conditioning_scale",
        type=float,
        default=defaults.controlnet_conditioning_scale,
        help="controlnet_conditioning_scale in [0, 5] (live setting)",
    )


def add_motion_arguments(group: argparse._ActionsContainer) -> None:
    """Temporal coherence that follows the motion (the input's optical flow)."""
    defaults = StreamConfig()
    group.add_argument(
        "--feedback-warp",
        dest="feedback_warp",
        type=_on_off,
        default=defaults.feedback_warp,
        metavar="on|off",
        help="warp the previous output along the input's optical flow before --latent-feedback and "
        "--image-feedback blend it in (occluded pixels take the new frame) (default: on)",
    )
    group.add_argument(
        "--feedback-at",
        dest="feedback_at",
        choices=FEEDBACK_AT,
        default=defaults.feedback_at,
        help="where --latent-feedback blends the previous output: `input`, into the new frame's latent "
        "before it is noised; `steps`, into the model's estimate of the clean latent at every denoising "
        "step, which also steadies the noise's flicker and follows the motion more closely (default: "
        "%(default)s)",
    )
    group.add_argument(
        "--motion-strength",
        dest="motion_strength",
        type=float,
        default=defaults.motion_strength,
        metavar="FLOAT",
        help="fast motion lowers --strength by up to this share of it, [0, 1); 0 = off",
    )


def _on_off(value: str) -> bool:
    if value not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"must be on or off, got {value!r}")
    return value == "on"


def config_from_args(args: argparse.Namespace) -> StreamConfig:
    """The settings, validated; a size the model cannot take is refused here, before any loading, when
    the model says its size rule up front (else after loading)."""
    names = {f.name for f in dataclasses.fields(StreamConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if isinstance(values.get("lora"), list):  # --lora is repeatable
        values["lora"] = tuple(values["lora"])
    sides = {
        "width": values.get("width", StreamConfig.width),
        "height": values.get("height", StreamConfig.height),
    }
    known = known_multiple(values.get("model", StreamConfig.model), values.get("vae", StreamConfig.vae))
    values.update(stream_batch_settings(args))
    try:
        check_sides(sides, *(known or (SD_MULTIPLE, "Stable Diffusion models")))
        config = StreamConfig(**values)
        if config.cuda_graphs == "on":  # refused here, before a model loads for minutes
            from stream.devices import resolve_device
            from stream.graphs import use_graphs

            use_graphs(config.cuda_graphs, resolve_device(config.device))
        return config
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc


def configure_logging(command: str, verbose: bool) -> None:
    """Warnings and errors; everything with -v. The server's terminal also shows, at INFO, sessions
    joining and leaving, adaptive changes and refusals."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        if command == "serve"
        else "%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if command == "serve" and not verbose:
        logging.getLogger("stream.server").setLevel(logging.INFO)


def add_budget_arguments(parser: argparse.ArgumentParser, adaptive_default: str) -> None:
    group = parser.add_argument_group("latency budget")
    group.add_argument(
        "--target-fps",
        type=float,
        default=24.0,
        help="frame rate to keep; the budget per frame is 1000/target-fps ms",
    )
    choices = ["on", "off"] if adaptive_default == "on" else ["auto", "on", "off"]
    group.add_argument(
        "--adaptive",
        choices=choices,
        default=adaptive_default,
        help="when p95 frame time stays over the budget, use fewer steps (down to 1), then a smaller "
        "model size; step back up when it stays under 70%% of the budget"
        + ("; auto: on for a webcam, off for files and synthetic" if adaptive_default == "auto" else ""),
    )


def check_budget_arguments(args: argparse.Namespace) -> None:
    if not (math.isfinite(args.target_fps) and 0 < args.target_fps <= 240):
        raise UsageError(f"--target-fps must be in (0, 240], got {args.target_fps}")


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """GPU speed: CUDA graphs and torch.compile (StreamConfig's cuda_graphs and compile)."""
    defaults = StreamConfig()
    group = parser.add_argument_group("GPU speed")
    group.add_argument(
        "--cuda-graphs",
        dest="cuda_graphs",
        choices=("auto", "on", "off"),
        default=defaults.cuda_graphs,
        help="replay the model calls as CUDA graphs, one per batch-size bucket and size: auto = on for "
        "CUDA, off elsewhere; on needs a CUDA device",
    )
    group.add_argument(
        "--compile",
        dest="compile",
        choices=("off", "default", "max-autotune"),
        default=defaults.compile,
        help="torch.compile on the UNet (the first frame of each size waits for the compile)",
    )


def add_stream_batch_arguments(parser: argparse.ArgumentParser, variants: bool = False) -> None:
    """--stream-batch, --cfg and --delta (StreamDiffusion's throughput features). `variants`: `stream
    bench` takes comma-separated lists and measures every combination in one run."""
    group = parser.add_argument_group("Stream Batch and residual CFG")
    lists = " (a comma-separated list measures each, e.g. {})" if variants else ""
    group.add_argument(
        "--stream-batch",
        dest="stream_batch_choice",
        nargs="?",
        const="on",
        default=None,
        metavar="on|off",
        help="run the k steps of k consecutive frames as one UNet call (one call per frame instead of k); "
        "each output comes k-1 frames later, with its own input's timestamp, and nothing is sent for the "
        f"first k-1 frames (default: off){lists.format('on,off')}",
    )
    group.add_argument(
        "--cfg",
        dest="cfg_choice",
        default=None,
        metavar="|".join(CFG_MODES),
        help="how guidance > 1 runs: `full` (a negative-prompt row every step), `self` (residual CFG: no "
        "extra row), `once` (a negative-prompt row at the first step only), `none` (no guidance) "
        f"(default: full){lists.format('full,self,once')}",
    )
    group.add_argument(
        "--delta",
        type=float,
        default=None,
        metavar="FLOAT",
        help="residual CFG (--cfg self/once): scale of the residual noise used as the negative prediction, "
        "[0, 2] (default: 1)",
    )


def stream_batch_variants(args: argparse.Namespace) -> list[dict[str, object]]:
    """Every (--stream-batch, --cfg) combination asked for, as StreamConfig fields."""
    batch = _choices(getattr(args, "stream_batch_choice", None), "--stream-batch", ("on", "off"))
    modes = _choices(getattr(args, "cfg_choice", None), "--cfg", CFG_MODES)
    combos: list[dict[str, object]] = []
    unset: list[str | None] = [None]
    for on in batch or unset:
        for mode in modes or unset:
            combo: dict[str, object] = {}
            if on is not None:
                combo["stream_batch"] = on == "on"
            if mode is not None:
                combo["cfg_mode"] = mode
            combos.append(combo)
    return combos


def stream_batch_settings(args: argparse.Namespace) -> dict[str, object]:
    """The one --stream-batch / --cfg setting of `run` and `serve` (lists are for `stream bench`)."""
    combos = stream_batch_variants(args)
    if len(combos) > 1:
        raise UsageError(
            "--stream-batch and --cfg take one value here; lists (e.g. --cfg full,self) are for stream bench"
        )
    return combos[0]


def _choices(text: str | None, flag: str, allowed: Sequence[str]) -> list[str]:
    if text is None:
        return []
    values = [v.strip() for v in text.split(",")]
    bad = [v for v in values if v not in allowed]
    if bad:
        raise UsageError(f"{flag} takes {' or '.join(allowed)}, got {text!r}{did_you_mean(bad[0], allowed)}")
    return list(dict.fromkeys(values))
