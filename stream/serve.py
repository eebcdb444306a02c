"""`stream serve`'s start-up: check the arguments, take the port, load the model, measure it in the
warm-up (on a CPU: start at the largest size that holds the target rate), then serve. "serving on" is
printed once the socket listens."""

from __future__ import annotations

import argparse
import errno
import math
import socket
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from stream.args import UsageError, check_budget_arguments, config_from_args
from stream.config import StreamConfig
from stream.denoiser import StreamDenoiser
from stream.devices import resolve_device
from stream.media import VirtualCamSink
from stream.models import Components, load_model
from stream.serve_args import limits_from_args
from stream.sizes import allowed_sizes, check_sides, components_multiple, native_side
from stream.warmup import Measured, median_ms, pick_size

if TYPE_CHECKING:
    from stream.server.limits import Limits  # (stream.server imports aiohttp and aiortc)

CAMERA = (480, 640)  # (h, w) of the frames timed in the warm-up: a common webcam size


def say(message: str) -> None:
    print(f"stream: {message}", file=sys.stderr, flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    from stream.server import StreamServer, listen, parse_ice_server

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
    limits = limits_from_args(args)
    if args.token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        say(
            f"warning: --host {args.host} without --token: anyone who can reach this machine can start "
            "sessions and watch the newest one (/view); pass --token to require a token"
        )
    if any(getattr(args, flag, None) is not None for flag in ("cluster", "workers", "rtc_ports")):
        from stream.cluster.serve import cmd_serve_cluster  # Ray only when asked for

        return cmd_serve_cluster(args, config, limits)
    # 2. take the port now: a port in use is said in a second, not after loading the model
    sockets = bind(args.host, args.port)
    virtualcam = None
    try:
        virtualcam = VirtualCamSink(args.target_fps, args.virtualcam_device) if args.virtualcam else None
        # 3. load the model once; each session gets its own StreamDenoiser over the shared components
        say(f"loading model {config.model} ...")
        components = load_model(config)
        multiple = components_multiple(components)
        check_sides(
            {"width": config.width, "height": config.height}, multiple, f"the model {components.name}"
        )
        sizes = allowed_sizes(multiple, native_side(components), (config.width, config.height))
        sized = args.width is not None or args.height is not None
        config, speed, note = warm_up(components, config, args.target_fps, sized=sized)
        if note:
            say(note)
        server = StreamServer.for_components(
            config,
            components,
            **server_options(args, limits),
            virtualcam=virtualcam,
            sizes=sizes,
            batching=args.batching == "on",
        )
        # 4. serve; the address is printed once the socket listens
        base = f"http://{url_host(args.host)}:{args.port}"
        url = f"{base}/" + (f"?token={args.token}" if args.token else "")
        expect = f", expect up to {fps_text(min(speed.fps, args.target_fps))} FPS" if speed else ""

        def announce() -> None:
            size = f"{config.width}x{config.height}"
            say(f"serving {components.name} at {size}{expect} on {url} (Ctrl-C to stop)")
            say(
                f"OBS: WHIP server {base}/whip, browser source {base}/view"
                + (f", virtual camera {virtualcam.device or 'on'}" if virtualcam is not None else "")
            )

        listen.serve(server, sockets, announce)
    finally:
        for sock in sockets:
            sock.close()
        if virtualcam is not None:
            virtualcam.close()
    return 0


def bind(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address of host:port (not yet listening: the app listens when it starts)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}; check --host") from exc
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys((i[0], i[1], i[2], "", i[4]) for i in infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            if sys.platform != "win32":  # as asyncio does: a restart can take the port at once
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(
                f"port {port} on {host} is already in use (another `stream serve`?): stop that one, "
                f"or pick another port with --port {port + 1 if port < 65535 else 8080}"
            ) from exc
        if exc.errno == errno.EACCES:
            raise UsageError(
                f"not allowed to listen on port {port} (ports below 1024 need root): use --port 8080"
            ) from exc
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; check --host") from exc
    return sockets


def fps_text(fps: float) -> str:
    return f"{fps:.0f}" if fps >= 10 else f"{fps:.1f}"


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def warm_up(
    components: Components, config: StreamConfig, target_fps: float, *, sized: bool
) -> tuple[StreamConfig, Measured | None, str]:
    """Run the model before the first session (fails fast on a setting it cannot run). On a CPU, also
    measure it: without --width/--height, start at the largest offered size that holds `target_fps`.

    Returns the server's settings, the speed measured at their size (None on a GPU, whose first frames
    are not its speed), and a line for the terminal ("" when there is nothing to say).
    """
    frame = np.zeros((*CAMERA, 3), dtype=np.uint8)
    denoiser = StreamDenoiser(components, config)
    denoiser(frame)
    if resolve_device(config.device).type != "cpu":
        return config, None, ""

    def measure(width: int, height: int) -> float:
        denoiser.update(config.replace(width=width, height=height))
        return median_ms(lambda: denoiser(frame))

    budget = 1000.0 / target_fps
    if sized:
        speed = Measured(config.width, config.height, measure(config.width, config.height))
        if speed.fps >= target_fps:
            return config, speed, ""
        return (
            config,
            speed,
            (
                f"on this CPU the model runs {speed.size} at {speed.fps:.1f} FPS, under the "
                f"{target_fps:g} FPS target: the adaptive controller will use fewer steps and smaller "
                "sizes (or pick a smaller size in the page)"
            ),
        )
    multiple = components_multiple(components)
    limit = (config.width, config.height)
    candidates = [
        wh
        for wh in allowed_sizes(multiple, native_side(components), limit)
        if wh[0] <= limit[0] and wh[1] <= limit[1]
    ]
    chosen, measured = pick_size(measure, candidates, budget)
    if (chosen.width, chosen.height) == limit:
        return config, chosen, ""
    first = measured[0]
    held = "to hold" if chosen.fps >= target_fps else "the closest to"
    return (
        config.replace(width=chosen.width, height=chosen.height),
        chosen,
        (
            f"CPU: sessions start at {chosen.size} ({fps_text(chosen.fps)} FPS measured here; "
            f"{first.size}: {fps_text(first.fps)} FPS), {held} the {target_fps:g} FPS target; pick another "
            "size in the page, or pass --width/--height"
        ),
    )


def server_options(args: argparse.Namespace, limits: Limits) -> dict[str, Any]:
    """StreamServer's options from `stream serve`'s flags (the cluster's front takes the same)."""
    return {
        "max_sessions": args.max_sessions,
        "token": args.token,
        "ice_servers": args.ice_server,
        "idle_timeout": args.idle_timeout,
        "target_fps": args.target_fps,
        "adaptive": args.adaptive == "on",
        "max_viewers": args.max_viewers,
        "limits": limits,
    }
