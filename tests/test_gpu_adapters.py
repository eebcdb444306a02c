"""SDXL-Turbo and ControlNet at full size on a GPU. Marked slow: `python -m pytest -m slow` on CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stream.config import StreamConfig
from stream.denoiser import StreamDenoiser

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize(
    "model,controlnet",
    [("random:sdxl-turbo", ""), ("random:sd-turbo", "random"), ("random:sdxl-turbo", "random")],
)
def test_full_size_sdxl_turbo_and_controlnet_run_in_fp16(model: str, controlnet: str) -> None:
    config = StreamConfig(
        model=model, controlnet=controlnet, device="cuda", steps=1, strength=1.0, prompt="an oil painting"
    )
    denoiser = StreamDenoiser.from_pretrained(config.model, config)
    assert denoiser.dtype == torch.float16 and denoiser.placeholder
    frame = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    for _ in range(2):
        result = denoiser.process(frame)
    assert result.frame.shape == frame.shape and result.timings["unet_1"] > 0
    assert ("control" in result.timings) == bool(controlnet)
