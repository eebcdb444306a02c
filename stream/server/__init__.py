"""`stream serve`: the browser app over WebRTC. The only module with asyncio.

Frame path (DESIGN.md "Decisions"): each session's incoming video is drained into a latest-only slot;
one worker thread owns the model and processes the newest frame of each session in turn; the
outgoing track waits for a new processed frame and carries the input's timestamp, strictly
increasing. The event loop only moves frames and messages; it never runs the model.
"""

from stream.server.app import ServerThread, StreamServer
from stream.server.rtc import parse_ice_server
from stream.server.session import apply_settings

__all__ = ["ServerThread", "StreamServer", "apply_settings", "parse_ice_server"]
