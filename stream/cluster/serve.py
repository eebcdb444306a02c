"""`stream serve --cluster ray[:ADDRESS]`: join (or start) a Ray cluster, start the workers, serve the front.
The workers load the model in the background; the front answers at once (/health says what is starting)."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from stream.args import UsageError
from stream.cluster.ports import parse_ports
from stream.config import ConfigError, StreamConfig

if TYPE_CHECKING:
    from stream.server.limits import Limits  # (stream.server imports aiohttp and aiortc)

logger = logging.getLogger(__name__)

NAMESPACE = "stream"  # the Ray namespace the workers are named in


def ray_address(text: str) -> str | None:
    """`--cluster`'s value as `ray.init` takes it: "auto" for the cluster of this machine, None to start a
    local one, else the address."""
    scheme, sep, address = text.partition(":")
    if scheme != "ray":
        raise UsageError(
            f"--cluster must be ray, ray:local or ray:ADDRESS (e.g. ray:10.0.0.5:6379), got {text!r}"
        )
    if not sep:
        return "auto"
    if not address:
        raise UsageError(
            "--cluster ray: needs an address after the colon, e.g. ray:10.0.0.5:6379, or ray:local"
        )
    return None if address == "local" else address


def cmd_serve_cluster(args: argparse.Namespace, config: StreamConfig, limits: Limits) -> int:
    from stream.serve import bind, say, server_options, url_host
    from stream.server import listen

    # 1. check the cluster's arguments
    if args.cluster is None:
        raise UsageError(
            "--workers and --rtc-ports are for a cluster: add --cluster ray:local (or ray:ADDRESS)"
        )
    address = ray_address(args.cluster)
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    try:
        ports = parse_ports(args.rtc_ports) if args.rtc_ports is not None else None
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    if args.virtualcam:
        raise UsageError("--virtualcam needs the model on this machine: it does not work with --cluster")
    try:
        import ray
    except ImportError:
        raise UsageError("--cluster needs Ray: pip install 'stream[cluster]'") from None
    from stream.cluster.actor import WorkerSettings
    from stream.cluster.front import ClusterFront
    from stream.cluster.pool import WorkerPool

    if not args.verbose:  # placements and workers starting, stopping and rejoining
        logging.getLogger("stream.cluster").setLevel(logging.INFO)
    # 2. take the port, then join (or start) the cluster
    sockets = bind(args.host, args.port)
    try:
        say(
            "starting a local Ray cluster ..."
            if address is None
            else f"joining the Ray cluster at {address} ..."
        )
        try:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=args.verbose)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UsageError(
                f"could not join the Ray cluster {args.cluster!r}: {exc}; start it with `ray start --head`, "
                "or use --cluster ray:local"
            ) from exc
        gpus = int(ray.cluster_resources().get("GPU", 0))
        gpu = config.device != "cpu" and (gpus > 0 or config.device.startswith("cuda"))
        workers = args.workers if args.workers is not None or gpu else 1
        # 3. the workers (one per GPU, or --workers), then the front
        settings = WorkerSettings(
            config,
            sized=args.width is not None or args.height is not None,
            target_fps=args.target_fps,
            max_sessions=args.max_sessions,
            ice_servers=tuple(args.ice_server),
            idle_timeout=args.idle_timeout,
            adaptive=args.adaptive == "on",
            max_viewers=args.max_viewers,
            batching=args.batching == "on",
            rtc_ports=ports,
            limits=limits,
        )
        pool = WorkerPool(settings, workers=workers, gpu=gpu)
        front = ClusterFront(pool, config, **server_options(args, limits))
        base = f"http://{url_host(args.host)}:{args.port}"
        url = f"{base}/" + (f"?token={args.token}" if args.token else "")
        count = f"{workers} worker(s)" if workers is not None else f"one worker per GPU ({gpus} now)"
        where = "GPU" if gpu else "CPU"

        def announce() -> None:
            say(f"serving the front of a Ray cluster on {url}: {count} on {where} loading {config.model}")
            say(f"OBS: WHIP server {base}/whip, browser source {base}/view; workers: {base}/health")

        listen.serve(front, sockets, announce)  # with the slow-client bounds, as `stream serve` alone
    finally:
        for sock in sockets:
            sock.close()
        if ray.is_initialized():
            ray.shutdown()
    return 0
