"""ControlNet for streams: the conditioning image made from each frame (canny edges with OpenCV, or the
frame itself), and the ControlNet residuals computed for the same batch of rows as the UNet call.

Every row of a batched UNet call carries its own control image and its own conditioning scale, so
streams with different images and scales still share one ControlNet call and one UNet call.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

CANNY_THRESHOLDS = (100, 200)  # OpenCV's hysteresis thresholds, as diffusers' ControlNet examples use
# `extra` keys that go to the ControlNet call, not to the UNet's added conditioning
CONTROL_KEYS = ("control", "control_scale")


def condition_image(image: torch.Tensor, mode: str) -> torch.Tensor:
    """(1, 3, H, W) canvas in [-1, 1] -> (1, 3, H, W) conditioning image in [0, 1] (what the ControlNet
    pipelines feed a ControlNet): `canny` the edges of the canvas (white on black), `none` the canvas
    itself (a source that is already a conditioning image: edges, depth, pose)."""
    pixels = ((image[0].float() + 1.0) * 127.5).round().clamp(0, 255)  # (3, H, W)
    if mode == "none":
        return (pixels / 255.0).unsqueeze(0).to(image.dtype)
    import cv2

    rgb = pixels.to(torch.uint8).permute(1, 2, 0).cpu().numpy()  # (H, W, 3)
    edges = cv2.Canny(np.ascontiguousarray(rgb), *CANNY_THRESHOLDS)  # (H, W) 0 or 255
    out = torch.from_numpy(edges).to(image.device, image.dtype) / 255.0
    return out.expand(3, -1, -1).unsqueeze(0)  # (1, 3, H, W)


def control_rows(image: torch.Tensor, scale: float, rows: int) -> dict[str, torch.Tensor]:
    """A stream's ControlNet inputs for its `rows` UNet rows: its image on every row (CFG rows too, as
    the pipelines do without guess mode) and its conditioning scale."""
    return {
        "control": image.expand(rows, -1, -1, -1),  # (rows, 3, H, W)
        "control_scale": torch.full((rows,), float(scale), device=image.device, dtype=image.dtype),
    }


def unet_kwargs(
    controlnet: Any,
    x: torch.Tensor,
    t: torch.Tensor,
    embeds: torch.Tensor,
    timestep_cond: torch.Tensor | None,
    extra: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """The UNet's extra keyword arguments for a batch of rows: SDXL's added conditioning, and the
    ControlNet's residuals (one ControlNet call over the same rows, each row scaled by its own scale)."""
    added = {k: v for k, v in extra.items() if k not in CONTROL_KEYS}
    kwargs: dict[str, Any] = {"added_cond_kwargs": added} if added else {}
    if controlnet is None or "control" not in extra:
        return kwargs
    down, mid = controlnet(
        x,
        t,
        encoder_hidden_states=embeds,
        controlnet_cond=extra["control"],
        conditioning_scale=1.0,
        timestep_cond=timestep_cond,
        added_cond_kwargs=added or None,
        return_dict=False,
    )
    scale = extra["control_scale"].to(x.dtype).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    kwargs["down_block_additional_residuals"] = [d * scale for d in down]
    kwargs["mid_block_additional_residual"] = mid * scale
    return kwargs


def placeholder_extra(engine: Any, rows: int, height: int, width: int) -> dict[str, torch.Tensor] | None:
    """Zero-valued `extra` rows of the right shapes, for timing a UNet call before any frame."""
    from stream.models.sdxl import added_conditioning

    extra: dict[str, torch.Tensor] = {}
    if engine.text_encoder_2 is not None:
        dim = int(engine.text_encoder_2.config.projection_dim)
        pooled = torch.zeros(rows, dim, device=engine.device, dtype=engine.dtype)
        extra.update(added_conditioning(pooled, height, width))
    if engine.controlnet is not None:
        image = torch.zeros(1, 3, height, width, device=engine.device, dtype=engine.dtype)
        extra.update(control_rows(image, 1.0, rows))
    return extra or None
