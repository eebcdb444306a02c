"""The frame-ID stamp for glass-to-glass latency: layout, and survival through the real VP8 codec."""

from __future__ import annotations

from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
from aiortc.codecs.vpx import MIN_BITRATE, Vp8Decoder, Vp8Encoder, vp8_depayload
from aiortc.jitterbuffer import JitterFrame

from stream import stamp
from tests.conftest import pan_clip


def test_words_round_trip_and_blank_patches_do_not_read() -> None:
    for frame_id in (0, 1, 77, 4095, 4096 + 5):
        assert stamp.decode_word(stamp.encode_word(frame_id)) == frame_id % 4096
    frame = np.zeros((64, 64, 3), np.uint8)
    assert stamp.read(frame) is None  # all black
    assert stamp.read(frame + 255) is None  # all white
    assert stamp.read(stamp.stamp(frame, 1234)) == 1234
    # A single flipped cell is caught by the check nibble for every single-bit error in the ID.
    word = stamp.encode_word(1234)
    assert all(stamp.decode_word(word ^ (1 << k)) is None for k in range(16))


def test_copy_patch_moves_only_the_corner() -> None:
    source = stamp.stamp(pan_clip(1, (120, 160))[0].copy(), 99)
    target = np.full_like(source, 7)
    stamp.copy_patch(source, target)
    assert stamp.read(target) == 99
    assert (target[64:, :] == 7).all() and (target[:, 64:] == 7).all()
    with pytest.raises(ValueError, match="at least 64x64 px"):
        stamp.read(np.zeros((32, 200, 3), np.uint8))


def test_stamp_survives_vp8_at_the_lowest_bitrate() -> None:
    """Stamp IDs into a panning photo clip, send it through aiortc's own VP8 encoder and decoder."""
    encoder, decoder = Vp8Encoder(), Vp8Decoder()
    encoder.target_bitrate = MIN_BITRATE  # the worst picture quality the sender ever picks
    ids = [*range(1, 40), *range(4090, 4096), 0, 1]  # across the wrap-around
    clip = pan_clip(len(ids), (256, 256), step=3)
    read = []
    for i, (frame_id, picture) in enumerate(zip(ids, clip, strict=True)):
        frame = av.VideoFrame.from_ndarray(stamp.stamp(picture.copy(), frame_id), format="rgb24")
        frame.pts, frame.time_base = i * 3000, Fraction(1, 90000)
        payloads, timestamp = encoder.encode(frame, force_keyframe=i == 0)
        data = b"".join(vp8_depayload(p) for p in payloads)
        for decoded in decoder.decode(JitterFrame(data=data, timestamp=timestamp)):
            read.append(stamp.read(decoded.to_ndarray(format="rgb24")))
    assert read == [i % 4096 for i in ids]


def test_stamp_survives_a_sender_side_downscale() -> None:
    """A browser may send a smaller frame under load; the page scales the patch back before reading."""
    picture = stamp.stamp(pan_clip(1, (192, 256))[0].copy(), 2024)
    small = cv2.resize(picture, (192, 144), interpolation=cv2.INTER_AREA)  # 75%
    back = cv2.resize(small, (256, 192), interpolation=cv2.INTER_LINEAR)
    assert stamp.read(back) == 2024
