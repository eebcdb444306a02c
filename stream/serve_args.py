"""`stream serve`'s own flags beyond the model and stream settings: what one peer may cost the server
(limits and security), and the cluster mode (many GPUs on Ray)."""

from __future__ import annotations

import argparse
from typing import Any

from stream.args import UsageError
from stream.config import ConfigError


# ---- scale-out: `stream serve --cluster` (stream/cluster/)
def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("many GPUs (Ray)")
    group.add_argument(
        "--cluster",
        default=None,
        metavar="ray[:ADDRESS]",
        help="serve as the front of a Ray cluster: one worker per GPU runs the model and the WebRTC media, "
        "this process serves the page, places sessions and adds up the stats. `ray` joins the cluster this "
        "machine belongs to (`ray start`), `ray:ADDRESS` the one whose head is at ADDRESS (e.g. "
        "ray:10.0.0.5:6379), `ray:local` starts one on this machine (default: no cluster, one process)",
    )
    group.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="with --cluster: run N workers (each takes one GPU when the cluster has GPUs, else one CPU) "
        "(default: one per GPU in the cluster, more as GPU nodes join; 1 on a cluster without GPUs)",
    )
    group.add_argument(
        "--rtc-ports",
        default=None,
        metavar="LOW-HIGH",
        help="with --cluster: the UDP ports the workers' WebRTC media uses, e.g. 40000-40999, to open in a "
        "firewall (default: any free port)",
    )


# `stream serve`'s limits on what one peer may cost (stream/server/limits.py); defaults from Limits.
LIMIT_FLAGS: list[tuple[str, type, str]] = [
    (
        "max_per_address",
        int,
        "sessions one network address may hold at once; more get 429 (0: no cap). Peers on this machine "
        "(loopback, e.g. a reverse proxy on it) are not capped",
    ),
    (
        "max_viewers_per_address",
        int,
        "WHEP viewers (OBS browser sources, /view pages) one network address may hold at once; more get "
        "429 (0: no cap). Peers on this machine are not capped",
    ),
    (
        "max_connections_per_address",
        int,
        "open HTTP connections one network address may hold at once; a connection past it gets 429 to its "
        "first request and is closed (0: no cap). Peers on this machine and trusted proxies are not capped",
    ),
    ("max_prompt_chars", int, "characters a prompt or negative prompt may have; longer ones are refused"),
    (
        "prompt_interval",
        float,
        "seconds between two prompt changes of one session reaching the model; "
        "the newest prompt sent in between wins",
    ),
    ("max_input_side", int, "pixels: a session whose camera frames are larger on a side is closed"),
    (
        "max_output_side",
        int,
        "pixels: frames larger on a side are scaled down on arrival (to no less than "
        "the model size); the restyled video comes back at that size",
    ),
    ("read_timeout", float, "seconds a client has to send a whole request; then 408"),
    (
        "max_reading",
        int,
        "connections at once that have not sent a whole request yet; more are closed (one address, "
        "capped as by --max-connections-per-address, may hold a quarter of them)",
    ),
    ("connect_timeout", float, "seconds a new session has to connect; then its place is freed"),
]


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    from stream.server.limits import Limits

    defaults = Limits()
    group = parser.add_argument_group("limits and security (what one peer may cost the server)")
    for name, kind, text in LIMIT_FLAGS:
        group.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=kind,
            default=getattr(defaults, name),
            metavar="N" if kind is int else "SECONDS",
            help=text,
        )
    group.add_argument(
        "--trusted-proxy",
        dest="trusted_proxy",
        action="append",
        default=[],
        metavar="ADDR",
        help="a reverse proxy or load balancer (an IP address or network, e.g. 10.0.0.5 or 10.0.0.0/8; "
        "repeat or separate with commas) whose X-Forwarded-For header names the peer: the peer's own "
        "address then counts toward --max-per-address and --max-viewers-per-address and shows in the "
        "log (default: none, every peer is the address it connects from)",
    )


def limits_from_args(args: argparse.Namespace) -> Any:
    from stream.server.limits import Limits

    try:
        proxies = tuple(p.strip() for given in args.trusted_proxy for p in given.split(",") if p.strip())
        return Limits(**{name: getattr(args, name) for name, _, _ in LIMIT_FLAGS}, trusted_proxies=proxies)
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
