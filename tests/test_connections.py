"""What one network address may hold of the server's connections (stream/server/listen.py): open
connections (--max-connections-per-address), and places among those still sending their first request
(a share of --max-reading)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from aiohttp import web

from stream.server import listen
from stream.server.limits import Limits
from stream.server.listen import AddressConnections, ReadingGuard

pytestmark = pytest.mark.timeout(60)


class FakeTransport(asyncio.Transport):
    """A connection's transport as the bookkeeping sees it: closing, and what it has left to send."""

    def __init__(self) -> None:
        super().__init__()
        self.closing, self.buffered, self.aborted = False, 0, False

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def abort(self) -> None:
        self.aborted, self.closing, self.buffered = True, True, 0


def test_an_address_counts_its_open_connections_until_they_are_gone() -> None:
    book = AddressConnections(cap=3, linger=0.2)
    mine = [FakeTransport() for _ in range(3)]
    assert all(book.add("203.0.113.7", t) for t in mine)
    assert not book.add("203.0.113.7", FakeTransport()) and book.crowded == 1
    assert book.add("198.51.100.9", FakeTransport())  # another address
    mine[0].closing = True  # closed, nothing left to send: its place is free
    assert book.add("203.0.113.7", FakeTransport())
    # closing, but a peer that does not read keeps it flushing (and open): it still counts...
    mine[1].closing, mine[1].buffered = True, 65536
    assert not book.add("203.0.113.7", FakeTransport())
    time.sleep(0.3)  # ...until it has lingered past `linger`: then it is aborted, and its place freed
    assert book.add("203.0.113.7", FakeTransport()) and mine[1].aborted
    # addresses with no open connection are forgotten once there are many
    gone = FakeTransport()
    book.add("192.0.2.1", gone)
    gone.closing = True
    book.prune_at = 1
    book.add("192.0.2.2", FakeTransport())
    assert "192.0.2.1" not in book.open and "203.0.113.7" in book.open and book.prune_at == 1024


async def exchange(port: int, request: bytes, wait: float = 10.0) -> tuple[bytes, Any]:
    """Open a connection, send `request` (if any), and read what comes back within `wait` s (up to the
    end of one response, or EOF); returns it and the open writer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if request:
        writer.write(request)
        await writer.drain()
    got = b""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            chunk = await asyncio.wait_for(reader.read(4096), max(0.01, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            break
        if not chunk:
            break
        got += chunk
        head, _, body = got.partition(b"\r\n\r\n")
        length = [
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        ]
        if length and len(body) >= length[0]:
            break
    return got, writer


GET = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


def test_over_the_cap_a_connection_gets_429_with_the_reason_and_a_reading_share(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Real connections through the guard, as if from a remote address (this machine is never capped,
    so here it is not treated as this machine): three kept-alive connections, then the fourth's request
    is answered 429 with the reason, and closed; a closed one frees a place. Of --max-reading 8, one
    address may hold 2 places still sending their first request: a third such is closed at once."""
    monkeypatch.setattr(listen, "is_loopback", lambda address: False)

    async def main() -> None:
        app = web.Application()
        guard: list[ReadingGuard] = []

        @web.middleware
        async def read_whole(request: web.Request, handler: Any) -> web.StreamResponse:
            refused = await guard[0].read(request)
            return refused if refused is not None else await handler(request)

        app.middlewares.append(read_whole)

        async def health(request: web.Request) -> web.Response:
            return web.json_response({"ok": True})

        app.router.add_get("/health", health)
        runner = web.AppRunner(app, keepalive_timeout=30)
        await runner.setup()
        assert runner.server is not None
        limits = Limits(max_connections_per_address=3, max_reading=8, read_timeout=2.0)
        guard.append(ReadingGuard(runner.server, limits))
        server = await asyncio.get_running_loop().create_server(guard[0], "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        writers = []
        try:
            for _ in range(3):
                answer, writer = await exchange(port, GET)
                writers.append(writer)
                assert answer.startswith(b"HTTP/1.1 200"), answer
            answer, writer = await exchange(port, GET)
            writers.append(writer)
            assert answer.startswith(b"HTTP/1.1 429") and b"Connection: close" in answer, answer
            error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
            assert "already holds 3 open connections" in error and "--max-connections-per-address 3" in error
            writers[0].close()
            await asyncio.sleep(0.5)
            answer, writer = await exchange(port, GET)
            writers.append(writer)
            assert answer.startswith(b"HTTP/1.1 200"), answer
            for w in writers:
                w.close()
            await asyncio.sleep(0.5)
            # silent connections: two take the address's share of the reading places, a third is closed
            silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            await asyncio.sleep(0.2)
            started = time.monotonic()
            answer, writer = await exchange(port, b"", wait=5.0)
            writers.append(writer)
            assert answer == b"" and time.monotonic() - started < 1.5  # closed at once, no answer
            for reader, w in silent:  # the two get their 408 when --read-timeout (2 s) is up
                said = await asyncio.wait_for(reader.read(4096), 8.0)
                assert said.startswith(b"HTTP/1.1 408"), said
                w.close()
        finally:
            for w in writers:
                w.close()
            server.close()
            await runner.cleanup()

    asyncio.run(main())
