"""The aiortc internals server/rtc.py relies on: this fails loudly when an aiortc upgrade changes them."""

from __future__ import annotations

import asyncio

from aiortc import RTCPeerConnection

from stream.server import rtc


def test_the_aiortc_internals_the_server_uses_are_there() -> None:
    missing = asyncio.run(rtc.aiortc_internals_missing())
    assert not missing, (
        f"this aiortc lacks {', '.join(missing)}: stream/server/rtc.py's low-latency jitter buffer must be "
        "updated for it (or aiortc pinned back)"
    )


def test_the_low_latency_jitter_buffer_is_installed_on_the_video_receiver() -> None:
    async def main() -> None:
        pc = RTCPeerConnection()
        receiver = pc.addTransceiver("video").receiver
        try:
            assert rtc.low_latency_receiver(pc, receiver.track)
            assert isinstance(getattr(receiver, rtc._RECEIVER_BUFFER), rtc.FrameEndJitterBuffer)
        finally:
            await pc.close()

    asyncio.run(main())
