"""Pure cross-frame math: feedback blend, frame similarity, and following the motion (flow warp of
latents, noise carried along the flow, motion-aware strength). Every input in the signature, tensors out."""

from __future__ import annotations

import numpy as np
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


# ---------------------------------------------------------------------- following the motion
def _grid(h: int, w: int, device: torch.device) -> torch.Tensor:
    """(h, w, 2) float32 pixel coordinates (x, y)."""
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32, device=device),
        torch.arange(w, dtype=torch.float32, device=device),
        indexing="ij",
    )
    return torch.stack([xs, ys], dim=-1)


def warp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward warp: out[..., y, x] = x[..., y + flow_y, x + flow_x], bilinear, edges repeated.

    x: (B, C, h, w); flow: (h, w, 2) in pixels, (dx, dy): where each output pixel's content is in x.
    """
    h, w = x.shape[-2:]
    where = _grid(h, w, x.device) + flow.to(x.device, torch.float32)  # (h, w, 2)
    scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], device=x.device)
    grid = (where * scale - 1.0).unsqueeze(0).expand(x.shape[0], -1, -1, -1)  # (B, h, w, 2) in [-1, 1]
    out = torch.nn.functional.grid_sample(
        x.float(), grid, mode="bilinear", padding_mode="border", align_corners=True
    )
    return out.to(x.dtype)


def warped_feedback_blend(
    latent: torch.Tensor,
    previous: torch.Tensor | None,
    weight: float,
    flow: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    """Feedback along the motion (StreamV2V-style, with flow instead of feature matching): the previous
    output latent (or image) warped into this frame, blended with weight `weight * valid` per pixel, so
    occluded and disoccluded pixels (valid 0) take the current frame's.

    latent, previous: (1, C, h, w); flow: (h, w, 2) in their pixels; valid: (h, w) in [0, 1].
    """
    if previous is None or weight <= 0.0 or previous.shape != latent.shape:
        return latent
    moved = warp(previous.to(latent.dtype), flow)
    w = (weight * valid.to(latent.device, latent.dtype)).expand_as(latent[:, :1])  # (1, 1, h, w)
    return latent + w * (moved - latent)


def feedback_pull(
    latent: torch.Tensor,
    previous: torch.Tensor | None,
    weight: float,
    flow: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Latent feedback at the steps (frame_plan.step): the target each step's clean-latent estimate is
    moved toward, the previous output latent (warped along `flow` when given), and the weight map
    (1, 1, h, w): `weight`, times `valid` when given, so that occluded pixels keep the model's own
    estimate (in the spirit of Rerender-A-Video's cross-frame latent fusion, Yang et al. 2023).
    None when there is nothing to pull toward. Shapes as in `warped_feedback_blend`."""
    if previous is None or weight <= 0.0 or previous.shape != latent.shape:
        return None
    target = previous.to(latent.dtype) if flow is None else warp(previous.to(latent.dtype), flow)
    if valid is None:
        return target, torch.full((1, 1, 1, 1), weight, device=latent.device, dtype=latent.dtype)
    return target, (weight * valid.to(latent.device, latent.dtype))[None, None]


def transport_noise(
    noise: list[torch.Tensor],
    residual: torch.Tensor,
    flow: torch.Tensor,
    valid: torch.Tensor,
    generator: torch.Generator,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Carry noise along the motion without blurring it (in the spirit of Chang et al. 2024, "How I
    Warped Your Noise"): each pixel takes the value of the ONE nearest noise sample the flow brings
    there, never a mix, so every value stays a unit Gaussian; where no sample arrives (disocclusion,
    the frame's edge, an untrusted flow, a sample already taken by a nearer pixel) it takes fresh noise
    from `generator`. Sub-pixel motion is kept in `residual` (each sample's offset from its pixel), so
    a slow motion moves the noise after enough frames instead of never. Zero flow keeps it exactly.

    noise: tensors (1, C, h, w) moved alike; residual: (h, w, 2) in [-0.5, 0.5]; flow: (h, w, 2)
    latent px (where each pixel's content was); valid: (h, w) in [0, 1] (< 0.5: untrusted).
    Returns the moved noise and the new residual.
    """
    h, w = residual.shape[:2]
    size = h * w
    # The sample bookkeeping in NumPy on the CPU (about half the time of the same in torch at this
    # size); the noise itself is gathered with torch where it lies. On a grid of 1/1024 px every sum
    # below is exact in float32, so a uniform motion rounds alike at every pixel (no pixel splits off
    # by a rounding error).
    f = flow.detach().to("cpu", torch.float32).numpy()
    f = np.round(f * np.float32(1024.0)) / np.float32(1024.0)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    sx, sy = xs + f[..., 0], ys + f[..., 1]  # where each pixel's content was
    kept = residual.detach().to("cpu", torch.float32).numpy().reshape(size, 2)
    near = _flat(np.clip(_nearest(sx), 0, w - 1), np.clip(_nearest(sy), 0, h - 1), w)
    px = _nearest(sx - kept[near, 0].reshape(h, w))  # the sample nearest to arrive
    py = _nearest(sy - kept[near, 1].reshape(h, w))
    cx, cy = np.clip(px, 0, w - 1), np.clip(py, 0, h - 1)
    index = _flat(cx, cy, w)  # (h w,) the source sample each pixel takes
    ox = cx + kept[index, 0].reshape(h, w) - sx  # the sample's new offset
    oy = cy + kept[index, 1].reshape(h, w) - sy
    keep = ((cx == px) & (cy == py) & (valid.detach().cpu().numpy() >= 0.5)).ravel()
    # A source sample goes to one pixel only: the one it lands nearest (ties: the lower pixel index).
    key = (ox * ox + oy * oy).ravel() * np.float32(size) + np.arange(size, dtype=np.float32)
    key[~keep] = np.inf
    best = np.full(size, np.inf, dtype=np.float32)
    np.minimum.at(best, index, key)
    keep &= best[index] == key
    holes = torch.from_numpy(np.flatnonzero(~keep))  # flat, in order
    source = torch.from_numpy(index)
    moved = []
    for n in noise:
        c = n.shape[1]
        taken = n.reshape(c, size).index_select(1, source.to(n.device))  # (C, h w)
        if len(holes):
            fresh = torch.randn((c, len(holes)), generator=generator, dtype=torch.float32)
            taken[:, holes.to(n.device)] = fresh.to(n.device, n.dtype)
        moved.append(taken.view_as(n))
    offset = np.where(keep.reshape(h, w, 1), np.stack([ox, oy], axis=-1).clip(-0.5, 0.5), np.float32(0.0))
    return moved, torch.from_numpy(offset.astype(np.float32)).to(residual.device)


def _nearest(x: np.ndarray) -> np.ndarray:
    """Round half up (np.round rounds half to even, which would split a uniform motion)."""
    return np.floor(x + np.float32(0.5))


def _flat(x: np.ndarray, y: np.ndarray, w: int) -> np.ndarray:
    """Whole-pixel coordinates (as floats) -> flat int64 indices."""
    return (y.astype(np.int64) * w + x.astype(np.int64)).ravel()


def motion_strength(strength: float, speed: float, bound: float, full_speed: float, least: float) -> float:
    """Motion-aware strength (StreamDiffusionV2's motion-aware noise controller): the faster the input
    moves, the less it is noised, down to (1 - bound) x strength at `full_speed` and above, never
    below `least`. speed and full_speed in the same unit (canvas px a frame)."""
    if bound <= 0.0 or full_speed <= 0.0:
        return strength
    share = min(max(speed / full_speed, 0.0), 1.0)
    return max(least, strength * (1.0 - bound * share))


def upsample_noise(noise: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Unit Gaussian noise on a k-times finer grid whose k x k block sums / k give back `noise` exactly
    (the conditional upsampling of Chang et al. 2024, "How I Warped Your Noise"): u = z / k + (w minus
    its block mean), w i.i.d. unit Gaussian, so the fine values are again i.i.d. unit Gaussian.

    noise: (1, C, h, w) -> (1, C, h k, w k).
    """
    _, c, h, w = noise.shape
    fine = torch.randn((1, c, h * k, w * k), generator=generator, dtype=torch.float32).to(noise.device)
    blocks = fine.view(1, c, h, k, w, k)
    blocks = blocks - blocks.mean(dim=(3, 5), keepdim=True) + noise.float().view(1, c, h, 1, w, 1) / k
    return blocks.reshape(1, c, h * k, w * k).to(noise.dtype)


def downsample_noise(fine: torch.Tensor, k: int) -> torch.Tensor:
    """k x k block sums / k: (1, C, h k, w k) -> (1, C, h, w); i.i.d. unit Gaussians stay so."""
    _, c, hk, wk = fine.shape
    return (fine.float().view(1, c, hk // k, k, wk // k, k).sum(dim=(3, 5)) / k).to(fine.dtype)
