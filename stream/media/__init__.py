"""Frames in and out: the latest-only slot, sources (webcam, file, synthetic) and sinks (file, window,
virtual camera). A frame is an ``(H, W, 3)`` C-contiguous ``uint8`` RGB numpy array everywhere here."""

from stream.media.common import SinkError, SourceError, frame_from_av, frame_to_av
from stream.media.sinks import FrameSink, VideoFileSink, WindowSink, open_sink, write_y4m
from stream.media.slot import LatestFrameSlot
from stream.media.sources import FrameSource, SyntheticSource, VideoFileSource, WebcamSource, open_source
from stream.media.virtualcam import VirtualCamSink

__all__ = [
    "FrameSink",
    "FrameSource",
    "LatestFrameSlot",
    "SinkError",
    "SourceError",
    "SyntheticSource",
    "VideoFileSink",
    "VideoFileSource",
    "VirtualCamSink",
    "WebcamSource",
    "WindowSink",
    "frame_from_av",
    "frame_to_av",
    "open_sink",
    "open_source",
    "write_y4m",
]
