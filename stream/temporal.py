"""Pure cross-frame math: feedback blend and frame similarity. Every input in the signature, tensors out."""

from __future__ import annotations

import torch


def feedback_blend(latent: torch.Tensor, previous: torch.Tensor | None, weight: float) -> torch.Tensor:
    """Blend the new frame's latent with the previous output latent: (1 - w) z + w z_prev."""
    if previous is None or weight <= 0.0 or previous.shape != latent.shape:
        return latent
    return torch.lerp(latent, previous.to(latent.dtype), weight)


def frame_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Similarity of two uint8 frames in [0, 1]: 1 - mean |a - b| / 255 (1 = identical)."""
    if a.shape != b.shape:
        return 0.0
    diff = (a.to(torch.int16) - b.to(torch.int16)).abs().float().mean().item()
    return 1.0 - diff / 255.0
