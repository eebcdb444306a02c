"""Listening with a bound on slow clients: a request must arrive whole within `read_timeout` (else 408
and the connection is closed, whether its headers or its body did not come), and at most
`max_reading` connections at once may be still sending their first request (more are closed at
once). `serve` runs the app on given sockets until Ctrl-C or SIGTERM, as aiohttp's `run_app` does."""

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

from stream.server.limits import Limits

if TYPE_CHECKING:
    from stream.server.app import StreamServer

logger = logging.getLogger(__name__)


class ReadingGuard:
    """The protocol factory in front of aiohttp's: counts connections that have not yet sent a whole
    request, and closes new ones beyond `limit`. `read(request)` reads a body within the time left."""

    def __init__(self, server: Callable[[], RequestHandler], limits: Limits) -> None:
        self.server = server
        self.limit = limits.max_reading
        self.timeout = limits.read_timeout
        self.reading: set[RequestHandler] = set()
        self.refused = 0

    def __call__(self) -> RequestHandler:
        handler = self.server()
        asyncio.get_running_loop().call_soon(self._admit, handler, 3)
        return handler

    def _admit(self, handler: RequestHandler, tries: int) -> None:
        if handler.transport is None:  # its connection_made has not run yet (it is scheduled too)
            if tries > 0:
                asyncio.get_running_loop().call_soon(self._admit, handler, tries - 1)
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

    def _expire(self, handler: RequestHandler) -> None:
        """A connection whose first request's headers have not all come within the time: 408, closed.
        (One whose headers came has left `reading`: its body, if late, gets its 408 from `read`.)"""
        transport = handler.transport
        if handler not in self.reading or transport is None or transport.is_closing():
            return
        self.reading.discard(handler)
        body = json.dumps({"error": f"the request headers were not sent whole within {self.timeout:g} s"})
        head = (
            "HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\nX-Content-Type-Options: nosniff\r\n\r\n"
        )
        transport.write((head + body).encode())
        transport.close()  # after what is buffered is sent

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
