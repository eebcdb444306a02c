"""temporal.py: cross-frame math."""

import torch

from stream import temporal


def test_feedback_blend() -> None:
    z, prev = torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2)
    torch.testing.assert_close(temporal.feedback_blend(z, prev, 0.25), torch.full_like(z, 0.25))
    assert temporal.feedback_blend(z, None, 0.5) is z
    assert temporal.feedback_blend(z, prev, 0.0) is z
    assert temporal.feedback_blend(z, torch.ones(1, 4, 3, 3), 0.5) is z  # another size: no blend


def test_frame_similarity() -> None:
    a = torch.zeros(4, 4, 3, dtype=torch.uint8)
    b = torch.full((4, 4, 3), 51, dtype=torch.uint8)
    assert temporal.frame_similarity(a, a) == 1.0
    assert abs(temporal.frame_similarity(a, b) - 0.8) < 1e-6
    assert temporal.frame_similarity(a, torch.zeros(2, 2, 3, dtype=torch.uint8)) == 0.0
