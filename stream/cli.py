"""The `stream` console script: `stream serve` (the browser app), `stream run` (headless) and
`stream bench` (the pipeline's latency, stage by stage)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from stream import __version__
from stream.adaptive import AdaptiveController, build_ladder
from stream.args import (
    HelpFormatter,
    Parser,
    UsageError,
    add_budget_arguments,
    add_config_arguments,
    add_stream_batch_arguments,
    check_budget_arguments,
    config_from_args,
    configure_logging,
    stream_batch_variants,
)
from stream.bench import BenchError
from stream.clips import PHOTOS, ClipError
from stream.config import ConfigError, StreamConfig
from stream.denoiser import StreamDenoiser
from stream.media import SinkError, SourceError, open_sink, open_source
from stream.models import ModelError, load_model
from stream.monitor import LatencyMonitor
from stream.run import EXIT_INTERRUPTED, run_loop
from stream.serve_args import add_cluster_arguments, add_limit_arguments
from stream.sizes import check_sides, components_multiple

logger = logging.getLogger(__name__)

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="stream",
        description="Real-time streaming video diffusion: restyle live video with a Stable Diffusion model.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"stream {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = sub.add_parser(
        "serve",
        formatter_class=HelpFormatter,
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
        "(open the page as /?token=TOKEN; OBS: the WHIP Bearer Token) (default: none, open to all)",
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
        "--virtualcam-device",
        default=None,
        metavar="DEVICE",
        help="virtual camera device, e.g. /dev/video7 (default: the first one found)",
    )
    serve.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log everything at INFO (model loading, connections); sessions, adaptive changes and "
        "refusals are logged without it",
    )
    serve.add_argument(
        "--batching",
        choices=["on", "off"],
        default="on",
        help="each round, run the sessions of one size as one batch through the model (on, the default), "
        "or one after the other (off)",
    )
    add_budget_arguments(serve, "on")
    add_cluster_arguments(serve)
    add_limit_arguments(serve)
    add_config_arguments(
        serve,
        size_default="512; on a CPU, the largest offered size that holds --target-fps, measured at start-up",
    )
    add_stream_batch_arguments(serve)
    serve.set_defaults(handler=cmd_serve)
    run = sub.add_parser(
        "run",
        formatter_class=HelpFormatter,
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
        "--virtualcam-device",
        default=None,
        metavar="DEVICE",
        help="with --sink virtualcam: e.g. /dev/video7 (default: the first one found)",
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
    add_stream_batch_arguments(run)
    run.set_defaults(handler=cmd_run)
    bench = sub.add_parser(
        "bench",
        formatter_class=HelpFormatter,
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
        "--plot",
        metavar="FILE.png",
        help="draw latency over time by stage and its distribution (default: no plot)",
    )
    bench.add_argument(
        "--sessions",
        metavar="N[,N...]",
        help="measure several sessions on one model instead (e.g. 1,2,4,8): each with its own prompt, "
        "seed and clip; aggregate frames/s, per-session FPS and latency, UNet calls per round (default: one "
        "session, the latency benchmark)",
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
    add_stream_batch_arguments(bench, variants=True)
    bench.set_defaults(handler=cmd_bench)
    parser.commands = {"serve": serve, "run": run, "bench": bench}  # type: ignore[attr-defined]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.command, getattr(args, "verbose", False))
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
        # 2. load the model (logs a warning for placeholders), check its size rule, encode the prompt once
        try:
            components = load_model(config)
            sides = {"width": config.width, "height": config.height}
            check_sides(sides, components_multiple(components), f"the model {components.name}")
        except (ModelError, ConfigError):
            with quiet("stream.media"):  # nothing was streamed: no note about the empty output file
                sink.close()
            raise
        denoiser = StreamDenoiser(components, config)
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
    from stream.serve import cmd_serve as serve

    return serve(args)


@contextlib.contextmanager
def quiet(logger_name: str) -> Iterator[None]:
    """Only errors from `logger_name` inside the block."""
    log = logging.getLogger(logger_name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def cmd_bench(args: argparse.Namespace) -> int:
    from stream import bench

    if args.stream_batch_choice is not None or args.cfg_choice is not None:
        return _bench_stream_batch(args)
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


def _bench_stream_batch(args: argparse.Namespace) -> int:
    """Stream Batch on/off and the CFG modes, every combination asked for, in one run."""
    from stream import bench_stream_batch

    if args.sessions is not None:
        raise UsageError("--stream-batch/--cfg variants and --sessions are separate benchmarks: pick one")
    variants = stream_batch_variants(args)
    args.stream_batch_choice = args.cfg_choice = None  # the variants set them, one by one
    config = config_from_args(args)
    for variant in variants:
        config.replace(**variant)  # each is checked before the model loads
    bench_stream_batch.command(config, variants, args.frames, args.warmup, args.quiet)
    return 0


def _bench_sessions(args: argparse.Namespace, config: StreamConfig) -> int:
    from stream import bench_sessions

    bench_sessions.command(args.sessions, args.batching, config, args.frames, args.warmup, args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
