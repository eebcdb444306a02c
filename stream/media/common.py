"""Errors and frame conversions shared by sources and sinks.

A frame is an (H, W, 3) C-contiguous uint8 RGB array.
"""

from __future__ import annotations

import logging

import av
import cv2
import numpy as np

logger = logging.getLogger(__name__)


class SourceError(ValueError):
    """A frame source could not be opened; the message is one user-facing line saying what to do."""


class SinkError(ValueError):
    """A frame sink could not be opened; the message is one user-facing line saying what to do."""


def frame_from_av(frame: av.VideoFrame) -> np.ndarray:
    """Convert a PyAV frame (any pixel format) to an (H, W, 3) uint8 RGB array."""
    return np.ascontiguousarray(frame.to_ndarray(format="rgb24"))


def frame_to_av(array: np.ndarray) -> av.VideoFrame:
    """Convert an (H, W, 3) uint8 RGB array to a PyAV rgb24 frame (pts is left unset)."""
    check_frame(array)
    return av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")


def check_frame(array: np.ndarray) -> None:
    if not isinstance(array, np.ndarray) or array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        got = f"{array.dtype} array of shape {array.shape}" if isinstance(array, np.ndarray) else type(array)
        raise ValueError(f"a frame must be an (H, W, 3) uint8 RGB array, got {got}")


def bgr_to_rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def short_reason(exc: BaseException) -> str:
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    reason = str(reason).strip().splitlines()[0] if str(reason).strip() else type(exc).__name__
    return reason[:120]
