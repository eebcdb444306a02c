"""Who may do what: the server's token (--token, the operator's) guards starting sessions, stats and
metrics; a session's view key (given to its own page) or the token lets a client watch that session."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from stream.server.signaling import error

if TYPE_CHECKING:
    from stream.server.app import StreamServer
    from stream.server.session import Session

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def middleware(server: StreamServer) -> Callable[..., Any]:
    """With a token: /offer, /stats, /metrics, /whip and POST /whep need it; /whep/{session}/... needs
    the session's view key or the token (checked by its handler)."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        guarded = path in ("/offer", "/stats", "/metrics") or path.startswith(("/whip", "/whep"))
        if path.startswith("/whep/"):  # one session's viewers: its view key or the token (signaling.whep)
            guarded = False
        # (CORS preflights carry no token)
        if server.token and guarded and request.method != "OPTIONS" and not is_admin(server, request):
            given = request.headers.get("Authorization", "")
            logger.info("refused %s %s: %s token", request.method, path, "wrong" if given else "no")
            return error(
                401,
                "missing or wrong token: send the header 'Authorization: Bearer <token>'",
                cors=path.startswith(("/whip", "/whep")),
            )
        return await handler(request)

    return check


def is_admin(server: StreamServer, request: web.Request) -> bool:
    """Whether the request carries the server's token (--token); without one, nobody does."""
    return server.token is not None and same(bearer(request), server.token)


def may_watch(server: StreamServer, request: web.Request, session: Session) -> bool:
    """Whether the request may watch `session`: its view key (as the Bearer token or ?key=), or the
    server's token."""
    keys = (bearer(request), request.query.get("key", ""))
    return is_admin(server, request) or any(same(key, session.view_key) for key in keys)


def bearer(request: web.Request) -> str:
    given = request.headers.get("Authorization", "")
    return given[7:] if given.startswith("Bearer ") else ""


def same(given: str, expected: str) -> bool:
    """A constant-time comparison of secrets (any text the client sent, even not UTF-8)."""
    return secrets.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())
