"""The `stream` console script: `stream serve` (the browser app), `stream run` (headless) and
`stream bench` (the pipeline's latency, stage by stage)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stream import __version__
from stream.adaptive import AdaptiveController, build_ladder
from stream.bench import BenchError
from stream.clips import PHOTOS, ClipError
from stream.config import (
    ATTENTION_BACKENDS,
    DTYPES,
    NOISE_MODES,
    SCHEDULERS,
    TIMESTEP_RULES,
    ConfigError,
    StreamConfig,
)
from stream.denoiser import StreamDenoiser
from stream.media import SinkError, SourceError, VirtualCamSink, open_sink, open_source
from stream.models import ModelError, load_model
from stream.monitor import LatencyMonitor
from stream.run import EXIT_INTERRUPTED, run_loop

logger = logging.getLogger(__name__)

EXIT_USAGE = 2


# (flag, StreamConfig field, type, help); defaults come from StreamConfig itself.
CONFIG_FLAGS: list[tuple[str, str, type, str]] = [
    (
        "--model",
        "model",
        str,
        "hub id, local diffusers folder, single-file checkpoint, `tiny` (built-in, random "
        "weights, runs on a CPU), `random:sd-turbo` / `random:sd15` (full size, random weights, "
        "for speed), or "
        "`auto` (stabilityai/sd-turbo when cached or downloadable, else tiny with a warning)",
    ),
    (
        "--vae",
        "vae",
        str,
        "`auto` (the model's own), `tiny` (TAESD-shaped AutoencoderTiny), or a path / hub id",
    ),
    ("--prompt", "prompt", str, "text prompt"),
    ("--negative-prompt", "negative_prompt", str, "negative prompt (used when --guidance > 1)"),
    ("--width", "width", int, "model width in pixels, a multiple of 8; frames are letterboxed into it"),
    ("--height", "height", int, "model height in pixels, a multiple of 8"),
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
    ("--noise", "noise", str, f"one of {', '.join(NOISE_MODES)}: fixed noise keeps a still scene still"),
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


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = StreamConfig()
    group = parser.add_argument_group("model and stream settings")
    for flag, field, kind, text in CONFIG_FLAGS:
        default = getattr(defaults, field)
        group.add_argument(
            flag,
            dest=field,
            type=kind,
            default=default,
            metavar=kind.__name__.upper(),
            help=f"{text} (default: {default!r})",
        )


def config_from_args(args: argparse.Namespace) -> StreamConfig:
    names = {f.name for f in dataclasses.fields(StreamConfig)}
    try:
        return StreamConfig(**{k: v for k, v in vars(args).items() if k in names})
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stream",
        description="Real-time streaming video diffusion: restyle live video with a Stable Diffusion model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"stream {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = sub.add_parser(
        "serve",
        help="serve the browser app: webcam in, restyled video out, over WebRTC",
        description="Serve the web app on http://HOST:PORT/. Open it in a browser, allow the camera, press "
        "Start. Each browser tab is a session with its own settings; one worker thread runs the model. "
        "OBS: send with WHIP to /whip, show the output with a Browser Source on /view, or --virtualcam. "
        "Example: stream serve --model stabilityai/sd-turbo --prompt 'a watercolor painting'",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)"
    )
    serve.add_argument("--port", type=int, default=8080, help="port to listen on")
    serve.add_argument(
        "--max-sessions", type=int, default=4, help="sessions at once; the next offer gets 503"
    )
    serve.add_argument(
        "--ice-server",
        action="append",
        default=[],
        metavar="URL",
        help="STUN/TURN server, repeatable: stun:host:port or turn:user:pass@host:port "
        "(default: none, enough on a LAN or one machine)",
    )
    serve.add_argument(
        "--token",
        default=None,
        help="require 'Authorization: Bearer TOKEN' on /offer, /stats, /metrics, /whip and /whep "
        "(open the page as /?token=TOKEN; OBS: the WHIP Bearer Token)",
    )
    serve.add_argument(
        "--idle-timeout",
        type=float,
        default=30.0,
        help="close a session after this many seconds without video",
    )
    serve.add_argument(
        "--max-viewers", type=int, default=16, help="WHEP viewers at once (OBS browser sources, /view pages)"
    )
    serve.add_argument(
        "--virtualcam",
        action="store_true",
        help="also send the newest session's output to a virtual camera (OBS Virtual Camera, "
        "v4l2loopback); needs the `obs` extra: pip install 'stream[obs]'",
    )
    serve.add_argument(
        "--virtualcam-device", default=None, metavar="DEVICE", help="virtual camera device, e.g. /dev/video7"
    )
    serve.add_argument(
        "--batching",
        choices=["on", "off"],
        default="on",
        help="each round, run the sessions of one size as one batch through the model (on, the default), "
        "or one after the other (off)",
    )
    serve.add_argument("-v", "--verbose", action="store_true", help="log more (sessions, model loading)")
    add_budget_arguments(serve, "on")
    add_config_arguments(serve)
    serve.set_defaults(handler=cmd_serve)
    run = sub.add_parser(
        "run",
        help="run a source through the model into a sink, headless",
        description="Read frames from SOURCE, restyle each with the model, write them to SINK. "
        "Prints a live line with FPS and latency on stderr. Ctrl-C stops and finalizes the output file. "
        "Example: stream run --source webcam:0 --sink window --prompt 'an oil painting'",
    )
    run.add_argument(
        "--source",
        required=True,
        help="`webcam:N` (camera index N), a video file path, or `synthetic` (a moving test pattern)",
    )
    run.add_argument(
        "--sink",
        required=True,
        help="a video file path (.mp4, .mkv, .webm, .mov, .avi), `window`, or `virtualcam` (OBS Virtual "
        "Camera / v4l2loopback; needs pip install 'stream[obs]')",
    )
    run.add_argument(
        "--virtualcam-device", default=None, metavar="DEVICE", help="with --sink virtualcam: e.g. /dev/video7"
    )
    run.add_argument(
        "--frames",
        type=int,
        default=None,
        metavar="N",
        help="stop after N frames (default: until the source ends, or Ctrl-C)",
    )
    run.add_argument(
        "--fps",
        type=float,
        default=24.0,
        help="frame rate of the synthetic source and of the output file when the source has none",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="log more (model loading, choices made)")
    run.add_argument("-q", "--quiet", action="store_true", help="no live status line")
    add_budget_arguments(run, "auto")
    add_config_arguments(run)
    run.set_defaults(handler=cmd_run)
    bench = sub.add_parser(
        "bench",
        help="measure the pipeline's latency per stage, with no network",
        description="Run a clip made from a real photo through the model: a warm-up, then N timed frames. "
        "Prints p50/p95/p99 per stage (each UNet step on its own line), FPS, whether the budget holds, and "
        "the pipeline overhead (the share of frame time outside model forward passes). "
        "Example: stream bench --model random:sd-turbo --device cuda --steps 1 --json",
    )
    bench.add_argument("--frames", type=int, default=100, metavar="N", help="timed frames")
    bench.add_argument("--warmup", type=int, default=10, metavar="N", help="untimed frames first")
    bench.add_argument(
        "--motion", choices=["pan", "zoom", "static"], default="pan", help="the clip's camera motion"
    )
    bench.add_argument(
        "--photo",
        default="coffee",
        help=f"scikit-image sample photo the clip is cut from: {', '.join(PHOTOS)}",
    )
    bench.add_argument(
        "--target-fps", type=float, default=24.0, help="the budget judged: 1000/target-fps ms per frame"
    )
    bench.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    bench.add_argument(
        "--plot", metavar="FILE.png", help="draw latency over time by stage and its distribution"
    )
    bench.add_argument(
        "--sessions",
        metavar="N[,N...]",
        help="measure several sessions on one model instead (e.g. 1,2,4,8): each with its own prompt, "
        "seed and clip; aggregate frames/s, per-session FPS and latency, UNet calls per round",
    )
    bench.add_argument(
        "--batching",
        default="on,off",
        metavar="on|off[,...]",
        help="with --sessions: run the sessions of a round as one batch (on), one by one (off), or both "
        "in one run (on,off; the default)",
    )
    bench.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    bench.add_argument("-v", "--verbose", action="store_true", help="log more (model loading)")
    add_config_arguments(bench)
    bench.set_defaults(handler=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args))
    except (UsageError, ConfigError, ModelError, SourceError, SinkError, BenchError, ClipError) as exc:
        print(f"stream: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # while loading the model or serving; the frame loop handles its own
        print("stream: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def cmd_run(args: argparse.Namespace) -> int:
    # 1. check inputs: settings, then the source and sink, then the model (the slow part)
    config = config_from_args(args)
    check_budget_arguments(args)
    if args.frames is not None and args.frames < 1:
        raise UsageError(f"--frames must be a positive number of frames, got {args.frames}")
    if not (math.isfinite(args.fps) and args.fps > 0):
        raise UsageError(f"--fps must be > 0, got {args.fps}")
    if args.virtualcam_device and not args.sink.lower().startswith("virtualcam"):
        raise UsageError("--virtualcam-device goes with --sink virtualcam")
    source = open_source(args.source, config.width, config.height, args.fps)
    sink = None
    try:
        fps = float(getattr(source, "fps", 0.0) or args.fps)
        sink = open_sink(args.sink, fps, device=args.virtualcam_device)
        # 2. load the model and encode the prompt once
        denoiser = StreamDenoiser.from_pretrained(config.model, config)  # logs a warning for placeholders
        # 3. frame loop, with the budget kept by the adaptive controller when it is on
        adaptive = args.adaptive == "on" or (args.adaptive == "auto" and args.source.startswith("webcam:"))
        monitor = LatencyMonitor(args.target_fps)
        controller = AdaptiveController(
            monitor.budget_ms, build_ladder(config.steps, config.width, config.height), enabled=adaptive
        )
        return run_loop(
            source, sink, denoiser, args.frames, None if args.quiet else sys.stderr, monitor, controller
        )
    finally:
        if sink is not None:
            sink.close()
        source.close()


def cmd_serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from stream.server import StreamServer, parse_ice_server

    # 1. check inputs before the slow model load
    config = config_from_args(args)
    check_budget_arguments(args)
    if args.max_sessions < 1:
        raise UsageError(f"--max-sessions must be at least 1, got {args.max_sessions}")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be from 1 to 65535, got {args.port}")
    if not (math.isfinite(args.idle_timeout) and args.idle_timeout > 0):
        raise UsageError(f"--idle-timeout must be > 0 seconds, got {args.idle_timeout}")
    if args.token is not None and not args.token.strip():
        raise UsageError("--token must not be empty")
    for url in args.ice_server:
        parse_ice_server(url)
    if args.max_viewers < 0:
        raise UsageError(f"--max-viewers must be 0 or more, got {args.max_viewers}")
    if args.virtualcam_device and not args.virtualcam:
        raise UsageError("--virtualcam-device needs --virtualcam")
    virtualcam = VirtualCamSink(args.target_fps, args.virtualcam_device) if args.virtualcam else None
    # 2. load the model once; each session gets its own StreamDenoiser over the shared components
    print(f"stream: loading model {config.model} ...", file=sys.stderr, flush=True)
    components = load_model(config)
    StreamDenoiser(components, config)(_warmup_frame(config))  # fail fast on bad sizes; warm up

    server = StreamServer.for_components(
        config,
        components,
        max_sessions=args.max_sessions,
        token=args.token,
        ice_servers=args.ice_server,
        idle_timeout=args.idle_timeout,
        target_fps=args.target_fps,
        adaptive=args.adaptive == "on",
        max_viewers=args.max_viewers,
        virtualcam=virtualcam,
        batching=args.batching == "on",
    )
    base = f"http://{args.host}:{args.port}"
    url = f"{base}/" + (f"?token={args.token}" if args.token else "")
    print(f"stream: serving {components.name} on {url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    print(
        f"stream: OBS: WHIP server {base}/whip, browser source {base}/view"
        + (f", virtual camera {virtualcam.device or 'on'}" if virtualcam is not None else ""),
        file=sys.stderr,
        flush=True,
    )
    try:
        web.run_app(server.app(), host=args.host, port=args.port, print=None)
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from exc
    finally:
        if virtualcam is not None:
            virtualcam.close()
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from stream import bench

    config = config_from_args(args)
    check_budget_arguments(args)
    if args.sessions is not None:
        return _bench_sessions(args, config)
    if args.plot:
        bench.import_pyplot()  # fail before the slow part when matplotlib is missing
        if not Path(args.plot).parent.is_dir():
            raise UsageError(f"--plot: the folder {str(Path(args.plot).parent)!r} does not exist")
    summary = bench.run(
        config,
        frames=args.frames,
        warmup=args.warmup,
        motion=args.motion,
        photo=args.photo,
        target_fps=args.target_fps,
        progress=None if args.quiet else sys.stderr,
    )
    bench.report(
        summary, as_json=args.json, plot_path=args.plot, command=["stream", *sys.argv[1:]], out=sys.stdout
    )
    return 0


def _bench_sessions(args: argparse.Namespace, config: StreamConfig) -> int:
    from stream import bench_sessions

    bench_sessions.command(args.sessions, args.batching, config, args.frames, args.warmup, args.quiet)
    return 0


def _warmup_frame(config: StreamConfig) -> Any:
    import numpy as np

    return np.zeros((config.height, config.width, 3), dtype=np.uint8)


if __name__ == "__main__":
    sys.exit(main())
