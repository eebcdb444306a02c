"""Listening with a bound on slow clients: a request must arrive whole within `read_timeout` (else 408
and the connection is closed, whether its headers or its body did not come), at most `max_reading`
connections at once may be still sending their first request (more are closed at once; one network
address may hold a quarter of these places), and one address may hold at most
`max_connections_per_address` open connections (a connection past it gets 429 to its first request and
is closed). This machine and trusted proxies are not held to the per-address bounds. `serve` runs the
app on given sockets until Ctrl-C or SIGTERM, as aiohttp's `run_app` does."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from stream.server.limits import Limits, address_key, is_loopback, over_cap

if TYPE_CHECKING:
    from stream.server.app import StreamServer

logger = logging.getLogger(__name__)

READING_SHARE = 4  # one capped address may hold at most 1/READING_SHARE of --max-reading's places


class ReadingGuard:
    """The protocol factory in front of aiohttp's: counts connections that have not yet sent a whole
    request, and closes new ones beyond `limit` (or beyond an address's share of it); counts each
    address's open connections, and answers a new one beyond its cap with 429. `read(request)` reads a
    body within the time left."""

    def __init__(self, server: Callable[[], RequestHandler], limits: Limits) -> None:
        self.server = server
        self.limits = limits
        self.limit = limits.max_reading
        self.share = max(1, limits.max_reading // READING_SHARE)  # of `limit`, for one address
        self.timeout = limits.read_timeout
        self.reading: set[RequestHandler] = set()
        self.keys: dict[RequestHandler, str] = {}  # a capped address's connections in `reading`: its key
        self.over_cap: set[RequestHandler] = set()  # answered 429 on their first request
        self.addresses = AddressConnections(limits.max_connections_per_address, limits.read_timeout)
        self.refused = 0

    def __call__(self) -> RequestHandler:
        handler = self.server()
        asyncio.get_running_loop().call_soon(self._admit, handler, 3)
        return handler

    def _admit(self, handler: RequestHandler, tries: int) -> None:
        transport = handler.transport
        if transport is None:  # its connection_made has not run yet (it is scheduled too)
            if tries > 0:
                asyncio.get_running_loop().call_soon(self._admit, handler, tries - 1)
            return
        self.reading = {h for h in self.reading if h.transport is not None}  # drop closed ones
        self.keys = {h: k for h, k in self.keys.items() if h in self.reading}
        key = self._capped_key(transport)
        if key is not None and sum(1 for k in self.keys.values() if k == key) >= self.share:
            why = f"{key} already has {self.share} connections still sending their first request (a "
            self._close(transport, why + f"1/{READING_SHARE} of --max-reading's places)")
            return
        if len(self.reading) >= self.limit:
            why = f"{len(self.reading)} connections are still sending their first request (--max-reading)"
            self._close(transport, why)
            return
        self.reading.add(handler)
        if key is not None:
            self.keys[handler] = key
            if not self.addresses.add(key, transport):
                self.over_cap.add(handler)
        asyncio.get_running_loop().call_later(self.timeout, self._expire, handler)

    def _capped_key(self, transport: asyncio.BaseTransport) -> str | None:
        """The per-address caps' key of the connection's peer; None when it is not capped (no caps, this
        machine, a trusted proxy with many peers behind it, or no IP address)."""
        peer = transport.get_extra_info("peername")
        address = peer[0] if isinstance(peer, (tuple, list)) and peer else None
        if (
            self.addresses.cap <= 0
            or address is None
            or is_loopback(address)
            or self.limits.is_proxy(address)
        ):
            return None
        return address_key(address)

    def _close(self, transport: asyncio.BaseTransport, why: str) -> None:
        """Close a new connection at once: too many are still sending their first request."""
        self.refused += 1
        if self.refused == 1 or self.refused % 100 == 0:
            logger.warning("closed a new connection: %s; %d closed so far", why, self.refused)
        transport.close()

    def _expire(self, handler: RequestHandler) -> None:
        """A connection whose first request's headers have not all come within the time: 408, closed.
        (One whose headers came has left `reading`: its body, if late, gets its 408 from `read`.)"""
        self.over_cap.discard(handler)
        self.keys.pop(handler, None)
        transport = handler.transport
        if handler not in self.reading or transport is None or transport.is_closing():
            return
        self.reading.discard(handler)
        _refuse(
            transport,
            "408 Request Timeout",
            f"the request headers were not sent whole within {self.timeout:g} s",
        )

    async def read(self, request: web.Request) -> web.Response | None:
        """Read the request's body within the time (an error response when it does not come); a 429 to
        the first request of a connection over its address's cap."""
        protocol: Any = request.protocol
        if protocol in self.over_cap:
            self.over_cap.discard(protocol)
            self.reading.discard(protocol)
            cap = self.addresses.cap
            return _closing_json(
                429, over_cap(f"{cap} open connections", "--max-connections-per-address", cap)
            )
        try:
            if request.body_exists:
                await asyncio.wait_for(request.read(), self.timeout)
        except asyncio.TimeoutError:
            return _closing_json(408, f"the request was not sent whole within {self.timeout:g} s")
        finally:
            self.reading.discard(protocol)
        return None


class AddressConnections:
    """Each capped address's open connections, by their asyncio transports (aiohttp forgets a
    connection's transport when it starts closing it, though a peer that does not read can keep it
    flushing, and open, for ever: such a one counts until it is gone, and is aborted once it has been
    closing for `linger` seconds)."""

    def __init__(self, cap: int, linger: float) -> None:
        self.cap = cap
        self.linger = linger
        self.open: dict[str, set[asyncio.BaseTransport]] = {}
        self.closing: dict[asyncio.BaseTransport, float] = {}  # when each was first seen still flushing
        self.prune_at = 1024  # forget addresses with no open connection when there are more than this
        self.crowded = 0  # connections over their address's cap

    def add(self, key: str, transport: asyncio.BaseTransport) -> bool:
        """Count a new connection of the address `key`; False (not counted) when it holds `cap` already."""
        if len(self.open) > self.prune_at:  # amortized: the next pruning waits for twice as many
            self.open = {k: held for k, v in self.open.items() if (held := self._held(v))}
            self.closing = {t: since for t, since in self.closing.items() if not _gone(t)}
            self.prune_at = max(1024, 2 * len(self.open))
        held = self._held(self.open.get(key, set()))
        if len(held) >= self.cap:
            self.open[key] = held
            self.crowded += 1
            if self.crowded == 1 or self.crowded % 100 == 0:
                logger.warning(
                    "a connection from %s is over --max-connections-per-address (%d open): it gets 429; "
                    "%d so far",
                    key,
                    len(held),
                    self.crowded,
                )
            return False
        self.open[key] = held | {transport}
        return True

    def _held(self, transports: set[asyncio.BaseTransport]) -> set[asyncio.BaseTransport]:
        """Those still open: closed ones dropped, ones flushing for longer than `linger` aborted."""
        now = time.monotonic()
        held = set()
        for transport in transports:
            if _gone(transport):
                self.closing.pop(transport, None)
            elif transport.is_closing() and now - self.closing.setdefault(transport, now) > self.linger:
                self.closing.pop(transport, None)
                if isinstance(transport, asyncio.WriteTransport):
                    transport.abort()
            else:
                held.add(transport)
        return held


def _gone(transport: asyncio.BaseTransport) -> bool:
    """Closed, or closing with nothing left to send."""
    if not transport.is_closing():
        return False
    return not isinstance(transport, asyncio.WriteTransport) or transport.get_write_buffer_size() == 0


def _closing_json(status: int, error: str) -> web.Response:
    response = web.json_response(
        {"error": error}, status=status, headers={"X-Content-Type-Options": "nosniff"}
    )
    response.force_close()
    return response


def _refuse(transport: asyncio.Transport, status: str, error: str) -> None:
    """Answer a connection that has sent no whole request with `status` and a JSON error, and close it
    (after what is buffered is sent)."""
    body = json.dumps({"error": error})
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\nX-Content-Type-Options: nosniff\r\n\r\n"
    )
    transport.write((head + body).encode())
    transport.close()


async def _serve(
    server: StreamServer, sockets: list[socket.socket], on_listening: Callable[[], None]
) -> None:
    limits = server.limits
    # The keep-alive timer closes a connection idle between requests; a little later than the reading
    # guard's 408 to a first request whose headers have not come in time, so that the 408 goes first.
    runner = web.AppRunner(server.app(), handle_signals=True, keepalive_timeout=limits.read_timeout + 1.0)
    await runner.setup()
    servers: list[asyncio.AbstractServer] = []
    try:
        assert runner.server is not None
        server.reading = ReadingGuard(runner.server, limits)
        loop = asyncio.get_running_loop()
        for sock in sockets:
            servers.append(await loop.create_server(server.reading, sock=sock, backlog=128))
        on_listening()
        await asyncio.Future()  # until cancelled
    finally:
        for listening in servers:
            listening.close()
        await runner.cleanup()


def serve(server: StreamServer, sockets: list[socket.socket], on_listening: Callable[[], None]) -> None:
    """Serve `server`'s app on `sockets` until Ctrl-C or SIGTERM, then shut it down cleanly."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    main = loop.create_task(_serve(server, sockets, on_listening))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        main.cancel()
        with contextlib.suppress(asyncio.CancelledError, web.GracefulExit, KeyboardInterrupt):
            loop.run_until_complete(main)
        loop.run_until_complete(loop.shutdown_asyncgens())
        asyncio.set_event_loop(None)
        loop.close()


def read_whole(server: StreamServer) -> Callable[..., Any]:
    """Middleware: a request's body is read within --read-timeout before its handler runs (else 408)."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if server.reading is not None:
            refused = await server.reading.read(request)
            if refused is not None:
                return refused
        return await handler(request)

    return middleware
