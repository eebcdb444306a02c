"""The frame-ID stamp for glass-to-glass latency: a 4x4 grid of black/white cells in the top-left corner.

The page draws the stamp into each camera frame it sends (stream/web/app.js mirrors this module), the server
copies the patch from input to output after processing, and the page reads the ID back from the video
it receives: latency is measured on the page's one clock.

Layout (64x64 px at the frame's top-left): cell k = row * 4 + col is CELL x CELL px and carries bit k
of a 16-bit word; a bit is 1 when the cell is white. The low 12 bits are the frame ID (it wraps at
4096), the high 4 bits the check nibble `~(n0 ^ n1 ^ n2) & 0xF` of the ID's three nibbles, so an
all-black or all-white patch never reads as an ID. Cells are 16 px to match VP8's macroblocks; a read
averages each cell's central 8x8 px, which survives lossy coding and mild scaling.
"""

from __future__ import annotations

import numpy as np

GRID = 4  # cells per side
CELL = 16  # px per cell side
PATCH = GRID * CELL  # px per patch side
ID_BITS = 12
ID_MODULO = 1 << ID_BITS
_INSET = CELL // 4  # a read averages the cell's central (CELL - 2 * _INSET)^2 px


def check_nibble(frame_id: int) -> int:
    n0, n1, n2 = frame_id & 0xF, (frame_id >> 4) & 0xF, (frame_id >> 8) & 0xF
    return ~(n0 ^ n1 ^ n2) & 0xF


def encode_word(frame_id: int) -> int:
    frame_id %= ID_MODULO
    return frame_id | (check_nibble(frame_id) << ID_BITS)


def decode_word(word: int) -> int | None:
    frame_id = word & (ID_MODULO - 1)
    return frame_id if (word >> ID_BITS) == check_nibble(frame_id) else None


def stamp(frame: np.ndarray, frame_id: int) -> np.ndarray:
    """Draw `frame_id` (mod 4096) into the top-left PATCH x PATCH px of an HxWx3 uint8 frame, in place."""
    _check(frame)
    word = encode_word(frame_id)
    for k in range(GRID * GRID):
        row, col = divmod(k, GRID)
        value = 255 if (word >> k) & 1 else 0
        frame[row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL] = value
    return frame


def read(frame: np.ndarray) -> int | None:
    """The frame ID stamped in an HxWx3 uint8 frame, or None when there is no valid stamp."""
    _check(frame)
    luma = frame[:PATCH, :PATCH].astype(np.float32).mean(axis=2)
    word = 0
    for k in range(GRID * GRID):
        row, col = divmod(k, GRID)
        cell = luma[
            row * CELL + _INSET : (row + 1) * CELL - _INSET, col * CELL + _INSET : (col + 1) * CELL - _INSET
        ]
        if cell.mean() > 127.5:
            word |= 1 << k
    return decode_word(word)


def copy_patch(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The stamp patch of `source` copied into `target` (same size frames), in place; returns `target`."""
    h, w = min(PATCH, source.shape[0], target.shape[0]), min(PATCH, source.shape[1], target.shape[1])
    target[:h, :w] = source[:h, :w]
    return target


def _check(frame: np.ndarray) -> None:
    if frame.ndim != 3 or frame.shape[0] < PATCH or frame.shape[1] < PATCH or frame.dtype != np.uint8:
        raise ValueError(
            f"a stamped frame must be an HxWx3 uint8 array of at least {PATCH}x{PATCH} px, "
            f"got {frame.dtype} {frame.shape}"
        )
