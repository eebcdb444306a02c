"""Test clips with known motion, cut from real photos (scikit-image's bundled samples): the one
implementation used by `stream bench`, the benchmarks and the tests.

`photo_clip("pan" | "zoom" | "static", frames, (h, w))` turns one of scikit-image's bundled photos
(no download) into a list of HxWx3 uint8 RGB frames:

- pan: a window moving right over the photo by exactly `step` pixels a frame (integer, no resampling);
- zoom: a slow zoom in on the photo's centre, `zoom_rate` (1 % by default) more magnification a frame;
- static: one frame repeated, each copy with its own seeded Gaussian noise of sigma 2 (on 0-255), as a
  still camera's sensor gives; without it a fixed-noise denoiser would return identical frames and a
  stillness measure would read zero whatever the model does;
- object: a still background photo with a second photo's square crop (a third of the shorter side)
  moving over it by `step` px a frame along a diagonal, bouncing off the edges (integer positions, no
  resampling): motion in one region only, with the background it uncovers.

`video_clip` reads frames of any video file OpenCV can open, scaled to cover the size and centre-cropped.

The photo is resized with OpenCV (area filter when shrinking, cubic when growing) to the smallest
size that holds the requested frame size (and, for a pan, the whole path of the window).

`window_pan` crops the photo at its own scale instead, for tests that need motion known to the pixel.
"""

from __future__ import annotations

import math

import cv2
import numpy as np


class ClipError(ValueError):
    """A clip that cannot be made; the message says what to change."""


KINDS = ("pan", "zoom", "static", "object")
# scikit-image photos that ship with the package (RGB, no download needed).
PHOTOS = ("coffee", "astronaut", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
CAMERA_NOISE_SIGMA = 2.0  # the static clip's per-frame sensor noise, on 0-255


def load_photo(name: str = "coffee") -> np.ndarray:
    """One of scikit-image's bundled photos as HxWx3 uint8 RGB."""
    if name not in PHOTOS:
        raise ClipError(f"photo must be one of {', '.join(PHOTOS)}, got {name!r}")
    try:
        from skimage import data
    except ImportError as exc:
        raise ClipError("clips are cut from scikit-image's sample photos: pip install scikit-image") from exc

    image = getattr(data, name)()
    return np.ascontiguousarray(image[:, :, :3])


def photo_clip(
    kind: str,
    frames: int,
    size: tuple[int, int],
    *,
    photo: str = "coffee",
    step: int = 4,
    zoom_rate: float = 0.01,
    seed: int = 0,
    object_photo: str = "chelsea",
) -> list[np.ndarray]:
    """`frames` HxWx3 uint8 RGB frames of size (h, w) from a real photo, moving as `kind` says.

    pan: the window moves right by `step` px a frame (the picture moves left); zoom: frame i is the
    centre magnified (1 + zoom_rate) ** i; static: one frame plus seeded Gaussian noise, sigma 2;
    object: a crop of the `object_photo` moving `step` px a frame diagonally over the still photo.
    """
    h, w = size
    if kind not in KINDS:
        raise ClipError(f"clip kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if frames < 1:
        raise ClipError(f"a clip needs at least 1 frame, got {frames}")
    if h < 1 or w < 1:
        raise ClipError(f"frame size must be positive, got {h}x{w}")
    if kind in ("pan", "object") and step < 0:
        raise ClipError(f"{kind} step must be >= 0 px a frame, got {step}")
    if kind == "zoom" and not 0.0 <= zoom_rate <= 1.0:
        raise ClipError(f"zoom rate must be in [0, 1] per frame, got {zoom_rate}")
    image = load_photo(photo)
    if kind == "pan":
        path = w + step * (frames - 1)  # width the window sweeps over
        wide = _fit(image, (h, path))
        top = (wide.shape[0] - h) // 2
        return [np.ascontiguousarray(wide[top : top + h, i * step : i * step + w]) for i in range(frames)]
    base = _cover(image, (h, w))
    if kind == "object":
        return _moving_object(base, _cover(load_photo(object_photo), (h, w)), frames, step)
    if kind == "zoom":
        centre = ((w - 1) / 2.0, (h - 1) / 2.0)
        clip = []
        for i in range(frames):
            matrix = cv2.getRotationMatrix2D(centre, 0.0, (1.0 + zoom_rate) ** i)
            clip.append(cv2.warpAffine(base, matrix, (w, h), flags=cv2.INTER_LINEAR))
        return clip
    rng = np.random.default_rng(seed)
    noisy = base.astype(np.float32)[None] + rng.normal(0.0, CAMERA_NOISE_SIGMA, (frames, h, w, 3))
    return list(np.clip(np.round(noisy), 0, 255).astype(np.uint8))


def _fit(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The photo scaled (aspect kept) to the smallest size at least `size` = (h, w) in both sides."""
    ph, pw = image.shape[:2]
    scale = max(size[0] / ph, size[1] / pw)
    out_w, out_h = max(size[1], math.ceil(pw * scale)), max(size[0], math.ceil(ph * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return cv2.resize(image, (out_w, out_h), interpolation=interpolation)


def _cover(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The photo scaled to cover (h, w) and centre-cropped to it."""
    big = _fit(image, size)
    top, left = (big.shape[0] - size[0]) // 2, (big.shape[1] - size[1]) // 2
    return np.ascontiguousarray(big[top : top + size[0], left : left + size[1]])


def window_pan(
    frames: int,
    size: tuple[int, int],
    *,
    step: tuple[int, int] = (4, 0),
    origin: tuple[int, int] = (0, 0),
    photo: str = "coffee",
) -> list[np.ndarray]:
    """`frames` (h, w) crops of a photo at its own scale, the window moving (dx, dy) px a frame from
    `origin` = (top, left): motion known to the pixel, no resampling."""
    image = load_photo(photo)
    h, w = size
    (dx, dy), (top, left) = step, origin
    bottom, right = top + dy * (frames - 1) + h, left + dx * (frames - 1) + w
    if min(dx, dy, top, left) < 0 or bottom > image.shape[0] or right > image.shape[1]:
        raise ClipError(
            f"a {w}x{h} window moving ({dx}, {dy}) px for {frames} frames leaves the {photo} photo"
        )
    return [
        np.ascontiguousarray(image[top + dy * i : top + dy * i + h, left + dx * i : left + dx * i + w])
        for i in range(frames)
    ]


def _moving_object(background: np.ndarray, other: np.ndarray, frames: int, step: int) -> list[np.ndarray]:
    """A square from the centre of `other` moving `step` px a frame diagonally over `background`,
    bouncing off the edges."""
    h, w = background.shape[:2]
    side = max(1, min(h, w) // 3)
    top, left = (h - side) // 2, (w - side) // 2
    patch = other[top : top + side, left : left + side]
    clip = []
    for i in range(frames):
        y, x = _bounce(i * step // 2, h - side), _bounce(i * step, w - side)
        frame = background.copy()
        frame[y : y + side, x : x + side] = patch
        clip.append(frame)
    return clip


def _bounce(distance: int, span: int) -> int:
    """Position after travelling `distance` back and forth over [0, span]."""
    if span <= 0:
        return 0
    d = distance % (2 * span)
    return d if d <= span else 2 * span - d


def video_clip(path: str, frames: int, size: tuple[int, int]) -> list[np.ndarray]:
    """Up to `frames` HxWx3 uint8 RGB frames of a video file (any OpenCV reads), scaled to cover (h, w)
    and centre-cropped."""
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise ClipError(f"cannot read video {path!r}: is it a video file OpenCV (FFmpeg) can open?")
    clip: list[np.ndarray] = []
    try:
        while len(clip) < frames:
            ok, bgr = capture.read()
            if not ok:
                break
            clip.append(_cover(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), size))
    finally:
        capture.release()
    if len(clip) < 2:
        raise ClipError(f"video {path!r} has {len(clip)} readable frame(s); a clip needs at least 2")
    return clip
