"""Full-size architectures on a GPU. Marked slow: run with `python -m pytest -m slow` on a CUDA machine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stream.config import StreamConfig
from stream.denoiser import StreamDenoiser

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["sd-turbo", "sd15"])
@pytest.mark.parametrize("vae", ["auto", "tiny"])
def test_random_full_size_model_runs_in_fp16(arch: str, vae: str) -> None:
    config = StreamConfig(
        model=f"random:{arch}",
        vae=vae,
        device="cuda",
        steps=4,
        strength=0.5,
        guidance_scale=2.0,
        prompt="an oil painting",
    )
    denoiser = StreamDenoiser.from_pretrained(config.model, config)
    assert denoiser.dtype == torch.float16 and denoiser.placeholder
    frame = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    result = denoiser.process(frame)
    assert result.frame.shape == frame.shape and result.frame.dtype == np.uint8
    assert result.timings["denoise"] > 0
