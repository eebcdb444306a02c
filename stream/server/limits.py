"""What one peer may cost the server: sessions, viewers and connections one address holds, text lengths,
prompt re-encodes, frame sizes, media sections, request reading time, connecting time. Each limit is a
`stream serve` flag (stream/serve_args.py)."""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from stream.config import ConfigError

MAX_MEDIA_SECTIONS = 4  # m= lines in one offer: a browser sends video, audio and data (OBS: video, audio)


@dataclass(frozen=True)
class Limits:
    max_per_address: int = 2  # sessions one network address may hold at once (0: no cap; loopback: none)
    max_viewers_per_address: int = 4  # WHEP viewers one address may hold at once (the same rules)
    max_connections_per_address: int = 100  # open connections one address may hold (trusted proxies: none)
    max_prompt_chars: int = 2000  # characters in a prompt or negative prompt
    prompt_interval: float = 0.25  # seconds between two prompt re-encodes of one session
    max_input_side: int = 1920  # pixels: a session sending larger frames is closed
    max_output_side: int = 640  # pixels: larger frames are scaled down on arrival (never below the model)
    read_timeout: float = 10.0  # seconds to send a whole request (headers and body); then 408
    max_reading: int = 32  # connections at once that have not yet sent a whole request
    connect_timeout: float = 10.0  # seconds a new session may take to connect; then it is freed
    trusted_proxies: tuple[str, ...] = ()  # addresses or networks whose X-Forwarded-For names the peer

    def __post_init__(self) -> None:
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                example = "e.g. 10.0.0.5 or 10.0.0.0/8"
                raise ConfigError(
                    f"--trusted-proxy takes IP addresses or networks ({example}), got {proxy!r}"
                ) from None
        for name in ("max_per_address", "max_viewers_per_address", "max_connections_per_address"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must be a whole number >= 0 (0: no cap), got {value!r}")
        for name in ("max_prompt_chars", "max_input_side", "max_output_side", "max_reading"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {value!r}")
        for name in ("prompt_interval", "read_timeout", "connect_timeout"):
            value = getattr(self, name)
            low_ok = value >= 0 if name == "prompt_interval" else value > 0
            if not (isinstance(value, (int, float)) and math.isfinite(value) and low_ok):
                floor = ">= 0" if name == "prompt_interval" else "> 0"
                raise ConfigError(f"--{name.replace('_', '-')} must be {floor} seconds, got {value!r}")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def peer(self, remote: str | None, forwarded_for: Sequence[str] = ()) -> str | None:
        """The peer's address: `remote` (the connection's), or, when that is a trusted proxy, the
        nearest address in its X-Forwarded-For headers (`forwarded_for`, in order) that is not one of
        the trusted proxies (the ones before it could have been written by the peer itself)."""
        if not self.is_proxy(remote):
            return remote
        hops = [h.strip() for header in forwarded_for for h in header.split(",") if h.strip()]
        ips = [_ip(h) for h in hops]
        for ip in reversed(ips):
            if ip is None:  # not an address: the chain cannot be followed past it
                return remote
            if not self.is_proxy(str(ip)):
                return str(ip)
        return str(ips[0]) if ips else remote  # every hop trusted: the first one is the peer

    def is_proxy(self, address: str | None) -> bool:
        """Whether `address` is one of the trusted proxies (`--trusted-proxy`)."""
        ip = _ip(address)
        return ip is not None and any(ip in n for n in self._proxy_networks)

    @functools.cached_property
    def _proxy_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(p, strict=False) for p in self.trusted_proxies]


def fit_side(width: int, height: int, side: int) -> tuple[int, int]:
    """(width, height) scaled down (never up) so that neither is over `side`; even numbers (yuv420p)."""
    scale = min(1.0, side / max(width, height))
    if scale >= 1.0:
        return width, height
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def _ip(address: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A peer's address as an IP (an IPv4-mapped IPv6 one as IPv4), or None when it is not one."""
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:  # a Unix socket path or another name: not an IP
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:  # ::ffff:127.0.0.1
        return ip.ipv4_mapped
    return ip


def is_loopback(address: str | None) -> bool:
    """Whether a peer's address is this machine (a local user, or a reverse proxy on it): not capped."""
    ip = _ip(address)
    return ip is not None and ip.is_loopback


def address_key(address: str | None) -> str | None:
    """What the per-address cap counts by: an IPv4 address, or an IPv6 address's /64 network (one
    host usually holds a whole /64 and may pick any address in it); None when there is no address."""
    ip = _ip(address)
    if ip is None:
        return address or None
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))
    return str(ip)


def address_full(
    address: str | None,
    held: Iterable[str | None],
    cap: int,
    what: str = "session",
    flag: str = "--max-per-address",
) -> str | None:
    """Why `address` may not start another session (or `what`) when it already holds those in `held`
    (the addresses of the running ones), or None when it may. `cap` 0 is no cap (set by `flag`).
    Addresses count by `address_key`."""
    key = address_key(address)
    if cap <= 0 or key is None or is_loopback(address):
        return None
    count = sum(1 for other in held if address_key(other) == key)
    if count < cap:
        return None
    return over_cap(f"{count} {what}(s)", flag, cap)


def over_cap(held: str, flag: str, cap: int) -> str:
    """Why an address may not have one more of what it `held` ("2 session(s)"): the cap `flag` sets."""
    return (
        f"this address already holds {held}, the most one address may hold at once ({flag} {cap}); "
        "close one first"
    )
