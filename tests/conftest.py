"""Shared fixtures: a private model cache per test session, the built-in tiny model, photo clips."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from stream.clips import load_photo, window_pan
from stream.config import StreamConfig

# Generated models go to a fresh folder per test session, never the user's cache.
if "STREAM_CACHE" not in os.environ:
    os.environ["STREAM_CACHE"] = tempfile.mkdtemp(prefix="stream-test-cache-")
    atexit.register(shutil.rmtree, os.environ["STREAM_CACHE"], ignore_errors=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# No model from the user's Hugging Face cache: `auto` must behave the same on every machine.
os.environ["HF_HOME"] = os.path.join(os.environ["STREAM_CACHE"], "hf")


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium for the browser tests: required in CI, skipped (with the fix) elsewhere."""
    from benchmarks.chromium import CHROMIUM

    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("Chromium is not installed: apt-get install chromium (CI installs it)")
        pytest.skip("Chromium is not installed here: apt-get install chromium")
    return CHROMIUM


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from stream.models import ensure_tiny_model

    return ensure_tiny_model()


def photo(name: str = "coffee") -> np.ndarray:
    """A real photo from scikit-image's data, HxWx3 uint8 RGB."""
    return load_photo(name)


def pan_clip(frames: int, size: tuple[int, int], step: int = 4, name: str = "coffee") -> list[np.ndarray]:
    """A clip with known motion: a (h, w) window panning right over a real photo by `step` px per frame."""
    return window_pan(frames, size, step=(step, 0), photo=name)


def cpu_config(size: int, **changes: object) -> StreamConfig:
    """The tiny model on the CPU at size x size, 2 steps, with `changes`."""
    base: dict[str, object] = {"model": "tiny", "width": size, "height": size, "device": "cpu", "steps": 2}
    base.update(changes)
    return StreamConfig(**base)  # type: ignore[arg-type]


# a stream of the tiny model with a prompt, a seed and a strength (the denoiser and motion tests)
STREAM = {"strength": 0.5, "prompt": "a watercolor painting of a cup", "seed": 3}


# a stream of the adapter tests (SDXL, ControlNet): a prompt, a seed and a strength
CUP = {"strength": 0.6, "prompt": "a watercolor cup", "seed": 3}


def square_photo(size: int) -> np.ndarray:
    """A size x size crop of the coffee photo."""
    return np.ascontiguousarray(photo("coffee")[:size, 100 : 100 + size])
