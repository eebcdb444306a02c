"""Listening with a bound on slow clients: a request must arrive whole within `read_timeout` (else 408
and the connection is closed, whether its headers or its body did not come), at most `max_reading`
connections at once may be still sending their first request (more are closed at once), and one
network address may hold at most `max_connections_per_address` open connections (more get 429 and are
closed; this machine and trusted proxies are not capped). `serve` runs the app on given sockets until
Ctrl-C or SIGTERM, as aiohttp's `run_app` does."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from stream.server.limits import Limits, address_key, is_loopback

if TYPE_CHECKING:
    from stream.server.app import StreamServer

logger = logging.getLogger(__name__)


class ReadingGuard:
    """The protocol factory in front of aiohttp's: counts connections that have not yet sent a whole
    request, and closes new ones beyond `limit`; counts each address's open connections, and refuses
    new ones beyond its cap. `read(request)` reads a body within the time left."""

    def __init__(self, server: Callable[[], RequestHandler], limits: Limits) -> None:
        self.server = server
        self.limits = limits
        self.limit = limits.max_reading
        self.timeout = limits.read_timeout
        self.reading: set[RequestHandler] = set()
        self.refused = 0
        self.open: dict[str, set[RequestHandler]] = {}  # address_key -> its open connections
        self.prune_at = 1024  # forget addresses whose connections have all closed when there are more
        self.crowded = 0  # connections refused for their address's cap

    def __call__(self) -> RequestHandler:
        handler = self.server()
        asyncio.get_running_loop().call_soon(self._admit, handler, 3)
        return handler

    def _admit(self, handler: RequestHandler, tries: int) -> None:
        if handler.transport is None:  # its connection_made has not run yet (it is scheduled too)
            if tries > 0:
                asyncio.get_running_loop().call_soon(self._admit, handler, tries - 1)
            return
        if not self._room_for(handler):
            return
        self.reading = {h for h in self.reading if h.transport is not None}  # drop closed ones
        if len(self.reading) >= self.limit:
            self.refused += 1
            if self.refused == 1 or self.refused % 100 == 0:
                logger.warning(
                    "closed a connection: %d connections are still sending their request (--max-reading); "
                    "%d closed so far",
                    len(self.reading),
                    self.refused,
                )
            handler.transport.close()
            return
        self.reading.add(handler)
        asyncio.get_running_loop().call_later(self.timeout, self._expire, handler)

    def _room_for(self, handler: RequestHandler) -> bool:
        """Whether the new connection's address holds fewer open connections than its cap; if not, it
        gets 429 and is closed. This machine and trusted proxies (many peers behind one) are not capped."""
        cap, transport = self.limits.max_connections_per_address, handler.transport
        assert transport is not None
        peer = transport.get_extra_info("peername")
        address = peer[0] if isinstance(peer, (tuple, list)) and peer else None
        if cap <= 0 or address is None or is_loopback(address) or self.limits.is_proxy(address):
            return True
        key = address_key(address) or address
        if len(self.open) > self.prune_at:  # amortized: the next pruning waits for twice as many
            self.open = {k: v for k, v in self.open.items() if any(h.transport is not None for h in v)}
            self.prune_at = max(1024, 2 * len(self.open))
        held = {h for h in self.open.get(key, ()) if h.transport is not None}
        if len(held) >= cap:
            self.crowded += 1
            if self.crowded == 1 or self.crowded % 100 == 0:
                logger.warning(
                    "refused a connection from %s: it holds %d open connections (--max-connections-per-"
                    "address); %d refused so far",
                    address,
                    len(held),
                    self.crowded,
                )
            _refuse(
                transport,
                "429 Too Many Requests",
                f"this address already holds {len(held)} open connections, the most one address may hold "
                f"(--max-connections-per-address {cap}); close some first",
            )
            return False
        self.open[key] = held | {handler}
        return True

    def _expire(self, handler: RequestHandler) -> None:
        """A connection whose first request's headers have not all come within the time: 408, closed.
        (One whose headers came has left `reading`: its body, if late, gets its 408 from `read`.)"""
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
        """Read the request's body within the time (an error response when it does not come)."""
        try:
            if request.body_exists:
                await asyncio.wait_for(request.read(), self.timeout)
        except asyncio.TimeoutError:
            response = web.json_response(
                {"error": f"the request was not sent whole within {self.timeout:g} s"},
                status=408,
                headers={"X-Content-Type-Options": "nosniff"},
            )
            response.force_close()
            return response
        finally:
            self.reading.discard(request.protocol)  # type: ignore[arg-type]
        return None


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
