"""A stream's uint8 frames to the model's device and back.

On CUDA a frame goes up through a pinned host buffer with a non-blocking copy (the copy engine runs it
while the CPU queues the frame's kernels), is converted and letterboxed on the GPU (denoiser.preprocess),
and its uint8 result comes down through another pinned buffer; the only wait is on that copy's own
event, never a device-wide synchronize. Elsewhere the frames take the plain copies (the same frames).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class FrameTransfer:
    """One stream's staging buffers (a stream's frames are handled one at a time).

    `staging` (default: on for CUDA) routes frames through the reusable host buffers; it can be forced on
    a CPU, where the buffers are not pinned, so that tests run the same code path.
    """

    def __init__(self, device: torch.device, staging: bool | None = None) -> None:
        self.device = device
        self.staging = device.type == "cuda" if staging is None else staging
        self._pin = device.type == "cuda"
        self._up: torch.Tensor | None = None  # (h, w, 3) uint8 host buffer of the last frame's size
        self._up_done: Any = None  # event after the last upload: the buffer may be written again
        self._down: torch.Tensor | None = None

    def upload(self, frame: np.ndarray) -> torch.Tensor:
        """(h, w, 3) uint8 numpy -> a new (h, w, 3) uint8 tensor on the device (queued, not waited for)."""
        if not self.staging:
            return torch.from_numpy(np.ascontiguousarray(frame)).to(self.device)
        if self._up_done is not None:
            self._up_done.synchronize()  # the previous frame's copy has left the buffer (long since)
        self._up = host = self._host(self._up, frame.shape)
        host.numpy()[...] = frame
        pixels = torch.empty(frame.shape, dtype=torch.uint8, device=self.device)
        pixels.copy_(host, non_blocking=self._pin)
        self._up_done = self._event()
        return pixels

    def download(self, image: torch.Tensor) -> np.ndarray:
        """(h, w, 3) uint8 tensor on the device -> a numpy array of its own (waits for this copy only)."""
        if not self.staging:
            return image.contiguous().cpu().numpy()
        self._down = host = self._host(self._down, tuple(image.shape))
        host.copy_(image.contiguous(), non_blocking=self._pin)
        done = self._event()
        if done is not None:
            done.synchronize()
        return host.numpy().copy()

    def _host(self, buffer: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
        if buffer is not None and tuple(buffer.shape) == tuple(shape):
            return buffer
        return torch.empty(tuple(shape), dtype=torch.uint8, pin_memory=self._pin)

    def _event(self) -> Any:
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event
