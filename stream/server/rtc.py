"""Everything this server takes from aiortc beyond its public API, in one place: the low-latency jitter
buffer, quicker ICE consent checks (aioice), the SDP parser used to check offers, and small helpers
around tracks and ICE servers."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import av
import numpy as np
from aiortc import (
    MediaStreamTrack,
    RTCIceServer,
    RTCPeerConnection,
)
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import SessionDescription

from stream.config import ConfigError

logger = logging.getLogger(__name__)


class FrameEndJitterBuffer(JitterBuffer):
    """aiortc's video jitter buffer, but a frame leaves as soon as its last packet is in.

    aiortc hands a frame to the decoder only when the first packet of the NEXT frame arrives: one
    frame interval (42 ms at 24 FPS) of latency on every frame received. The RTP marker bit flags the
    last packet of a video frame (RFC 7741 for VP8, RFC 6184 for H.264), so a complete run of packets
    from the oldest one up to a marked packet is a whole frame, released at once.
    """

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        frame = super()._remove_frame(sequence_number)  # a frame followed by the next one's packets
        if frame is not None or self._origin is None:
            return frame
        packets: list[Any] = []
        for count in range(self.capacity):
            packet = self._packets[(self._origin + count) % self.capacity]
            if packet is None or (packets and packet.timestamp != packets[0].timestamp):
                return None  # a gap: wait for the missing packet (or the next frame, as aiortc does)
            packets.append(packet)
            if packet.marker:
                self.remove(count + 1)
                data = b"".join(p._data for p in packets)  # type: ignore[attr-defined]
                return JitterFrame(data=data, timestamp=packets[0].timestamp)
        return None


# The aiortc internals this module relies on (aiortc is pinned below 2; tests/test_rtc.py checks these).
_RECEIVER_BUFFER = "_RTCRtpReceiver__jitter_buffer"
_BUFFER_FIELDS = ("_origin", "_packets", "capacity")


async def aiortc_internals_missing() -> list[str]:
    """The aiortc internals this module uses that this aiortc lacks (empty when all are there)."""
    missing = [
        f"JitterBuffer.{name}" for name in ("_remove_frame", "remove") if not hasattr(JitterBuffer, name)
    ]
    buffer = JitterBuffer(capacity=16, is_video=True)
    missing += [f"JitterBuffer().{name}" for name in _BUFFER_FIELDS if not hasattr(buffer, name)]
    import aioice.ice

    missing += [f"aioice.ice.{name}" for name in _CONSENT_SETTINGS if not hasattr(aioice.ice, name)]
    pc = RTCPeerConnection()
    try:
        receiver = pc.addTransceiver("video").receiver
        if not isinstance(getattr(receiver, _RECEIVER_BUFFER, None), JitterBuffer):
            missing.append(f"RTCRtpReceiver.{_RECEIVER_BUFFER}")
    finally:
        await pc.close()
    return missing


# ICE consent freshness (RFC 7675), which aioice checks every 5 s and gives up after 6 unanswered checks:
# a peer that vanished would hold its place for 30 s. Checked every second, lost after 4 unanswered
# checks, its connection fails (and its session is freed) within about 5 s.
CONSENT_INTERVAL_S = 1
CONSENT_FAILURES = 4
_CONSENT_SETTINGS = ("CONSENT_INTERVAL", "CONSENT_FAILURES")  # aioice's (tests/test_rtc.py checks them)


def quick_consent() -> bool:
    """Make ICE consent checks (RFC 7675) quick to notice a peer that vanished (aioice's module settings)."""
    import aioice.ice

    if not all(hasattr(aioice.ice, name) for name in _CONSENT_SETTINGS):
        logger.warning("could not shorten ICE consent checks: this aioice version is not the one expected")
        return False
    aioice.ice.CONSENT_INTERVAL = CONSENT_INTERVAL_S  # type: ignore[attr-defined]
    aioice.ice.CONSENT_FAILURES = CONSENT_FAILURES  # type: ignore[attr-defined]
    return True


def low_latency_receiver(pc: RTCPeerConnection, track: MediaStreamTrack) -> bool:
    """Give the receiver of `track` the jitter buffer that releases frames at their last packet."""
    for transceiver in pc.getTransceivers():
        receiver = transceiver.receiver
        if receiver.track is track and hasattr(receiver, _RECEIVER_BUFFER):
            setattr(receiver, _RECEIVER_BUFFER, FrameEndJitterBuffer(capacity=512, is_video=True))
            return True
    logger.warning("could not lower the receive latency: this aiortc version is not the one expected")
    return False


def parse_ice_server(text: str) -> RTCIceServer:
    """`stun:host:port` or `turn:user:password@host:port` (also turns:)."""
    scheme, sep, rest = text.partition(":")
    if not sep or scheme not in ("stun", "turn", "turns") or not rest:
        raise ConfigError(
            f"ice server must look like stun:host:port or turn:user:pass@host:port, got {text!r}"
        )
    if "@" in rest:
        creds, _, host = rest.rpartition("@")
        user, _, password = creds.partition(":")
        return RTCIceServer(urls=f"{scheme}:{host}", username=user, credential=password)
    return RTCIceServer(urls=text)


async def discard(track: MediaStreamTrack) -> None:
    with contextlib.suppress(MediaStreamError):
        while True:
            await track.recv()


def to_video(frame: np.ndarray) -> av.VideoFrame:
    """An RGB frame as the video encoders take it: yuv420p, converted once.

    The relay hands this one frame object to every consumer's encoder thread; a frame each encoder had
    to convert itself would share PyAV's converter between threads (which breaks the second viewer).
    """
    return av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")


def check_offer(sdp: str, max_sections: int = 4) -> str | None:
    """What is wrong with an SDP offer before negotiating it, or None. One session is one video in and
    one video out: one video section, and at most `max_sections` media sections in all."""
    try:
        media = SessionDescription.parse(sdp).media
    except Exception as exc:  # aiortc's parser asserts on malformed lines
        return f"invalid SDP offer: {exc or type(exc).__name__}"
    kinds = [m.kind for m in media]
    if not kinds:
        return "invalid SDP offer: it has no media sections (m= lines)"
    if len(kinds) > max_sections:
        return f"the offer has {len(kinds)} media sections (m= lines); at most {max_sections} are accepted"
    videos = kinds.count("video")
    if videos == 0:
        return "the offer has no video track: send the camera as a video track"
    if videos > 1:
        return f"the offer has {videos} video sections; a session takes one video track: send one camera"
    if any(m.port != 0 and (m.dtls is None or not m.dtls.fingerprints) for m in media):
        return "invalid SDP offer: a media section has no DTLS fingerprint (a=fingerprint)"
    return None
