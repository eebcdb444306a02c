"""The UDP port range a worker's WebRTC (ICE) sockets bind in, so a firewall can open exactly that range.

aioice binds each host candidate to port 0 (any port); a worker's event loop is a `PortRangeLoop`, which
binds those sockets to the next free port of the range instead.
"""

from __future__ import annotations

import asyncio
import errno
from typing import Any

from stream.config import ConfigError


def parse_ports(text: str) -> tuple[int, int]:
    """`LOW-HIGH`, e.g. `40000-40999`: both ends included."""
    low, sep, high = text.partition("-")
    try:
        first, last = int(low), int(high if sep else low)
    except ValueError:
        raise ConfigError(
            f"--rtc-ports must look like 40000-40999 (a UDP port range), got {text!r}"
        ) from None
    if not 1024 <= first <= last <= 65535:
        raise ConfigError(f"--rtc-ports must be LOW-HIGH with 1024 <= LOW <= HIGH <= 65535, got {text!r}")
    return first, last


class PortRangeLoop(asyncio.SelectorEventLoop):
    """An event loop whose UDP sockets bound to "any port" take a free port of `ports` instead."""

    def __init__(self, ports: tuple[int, int]) -> None:
        super().__init__()
        self.ports = ports
        self.next = 0  # the next port to try, as an offset into the range: ports are handed out in turn

    async def create_datagram_endpoint(  # type: ignore[override]
        self, protocol_factory: Any, local_addr: Any = None, remote_addr: Any = None, **kwargs: Any
    ) -> Any:
        if local_addr is None or local_addr[1] != 0:
            return await super().create_datagram_endpoint(
                protocol_factory, local_addr=local_addr, remote_addr=remote_addr, **kwargs
            )
        low, high = self.ports
        count = high - low + 1
        for offset in range(count):
            port = low + (self.next + offset) % count
            try:
                endpoint = await super().create_datagram_endpoint(
                    protocol_factory, local_addr=(local_addr[0], port), remote_addr=remote_addr, **kwargs
                )
            except OSError:
                continue  # taken (by another session, or another program)
            self.next = (port - low + 1) % count
            return endpoint
        raise OSError(
            errno.EADDRINUSE, f"no free UDP port in {low}-{high} on {local_addr[0]}: widen --rtc-ports"
        )
