"""WebRTC stand-ins shared by the benchmarks that drive `stream serve` over aiortc (soak, cluster)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import av
import numpy as np
from aiortc import VideoStreamTrack
from aiortc.mediastreams import MediaStreamError


class ClipTrack(VideoStreamTrack):
    """A camera stand-in: the frames over and over, at 30 FPS."""

    def __init__(self, frames: list[np.ndarray]) -> None:
        super().__init__()
        self.frames, self.sent = frames, 0

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame.from_ndarray(self.frames[self.sent % len(self.frames)], format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        self.sent += 1
        return frame


async def count_frames(track: Any, on_frame: Callable[[], None]) -> None:
    """Receive the track's frames until it ends, calling `on_frame` for each."""
    try:
        while True:
            await track.recv()
            on_frame()
    except MediaStreamError:
        pass
