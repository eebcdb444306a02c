"""The model's size rule, the sizes offered, and the warm-up's choice of a size that holds the budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream.config import ConfigError, StreamConfig
from stream.server import apply_settings
from stream.sizes import allowed_sizes, check_sides, known_multiple, nearest
from stream.warmup import median_ms, pick_size

BUDGET = 1000.0 / 24


def test_the_rule_is_known_before_loading(tiny_model_dir: Path) -> None:
    assert known_multiple("tiny", "auto") == (16, "the built-in tiny model")
    assert known_multiple("random:sd-turbo", "auto")[0] == 8  # type: ignore[index]
    assert known_multiple(str(tiny_model_dir), "auto")[0] == 16  # type: ignore[index]  # read from vae/config.json
    assert known_multiple("tiny", "tiny")[0] == 8  # type: ignore[index]  # TAESD downsamples by 8
    assert known_multiple("auto", "auto") is None  # sd-turbo, or the tiny model: known after loading
    assert known_multiple("nobody/not-cached", "auto") is None


def test_nearest_sizes() -> None:
    assert nearest(520, 16) == [512, 528]
    assert nearest(250, 8) == [248, 256]
    assert nearest(40, 16) == [64]  # nothing under the 64 px floor
    assert nearest(2050, 16) == [2048]
    with pytest.raises(
        ConfigError,
        match=r"--height 200 does not fit X \(sizes must be multiples of 16\); nearest: 192 or 208",
    ):
        check_sides({"width": 256, "height": 200}, 16, "X")
    check_sides({"width": 256, "height": 192}, 16, "X")  # fine


def test_allowed_sizes_follow_the_model() -> None:
    assert allowed_sizes(16, 256, (512, 512)) == [(s, s) for s in (128, 192, 256, 320, 384, 448, 512)]
    assert allowed_sizes(8, 512, (256, 256))[-1] == (512, 512)  # up to the native size
    assert (640, 360) in allowed_sizes(8, 512, (640, 360))  # the configured size is always offered
    assert all(w % 64 == 0 for w, _ in allowed_sizes(64, 512, (512, 512)))


def test_live_size_changes_must_be_offered() -> None:
    config = StreamConfig(width=256, height=256)
    sizes = [(128, 128), (256, 256)]
    assert apply_settings(config, {"width": 128, "height": 128}, sizes).width == 128
    with pytest.raises(
        ConfigError, match="size 192x192 is not offered for this model; pick one of 128x128, 256x256"
    ):
        apply_settings(config, {"width": 192, "height": 192}, sizes)
    assert apply_settings(config, {"prompt": "a cat"}, sizes).prompt == "a cat"  # other settings unaffected


def area_ms(ms_at_256: float) -> tuple[list[tuple[int, int]], dict[str, list[tuple[int, int]]]]:
    """A fake model: frame time proportional to the area. Returns the measure function's log."""
    log: list[tuple[int, int]] = []

    def measure(w: int, h: int) -> float:
        log.append((w, h))
        return ms_at_256 * (w * h) / (256 * 256)

    return log, {"measure": measure}  # type: ignore[dict-item]


SIDES = [(s, s) for s in (128, 192, 256, 320, 384, 448, 512)]


def test_pick_size_takes_the_largest_that_holds() -> None:
    log, fake = area_ms(20.0)  # 256: 20 ms (holds 60% of 41.7 = 25 ms); 320: 31 ms (does not)
    chosen, measured = pick_size(fake["measure"], SIDES, BUDGET)  # type: ignore[arg-type]
    assert (chosen.width, chosen.height) == (256, 256) and chosen.fps == pytest.approx(50)
    assert log[0] == (512, 512) and log[-1] == (256, 256)  # the configured size first, then down
    assert (448, 448) not in log  # predicted far over from the 512 measurement: skipped
    assert [(m.width, m.height) for m in measured] == log


def test_pick_size_keeps_a_size_that_holds_and_falls_back_to_the_smallest() -> None:
    log, fake = area_ms(2.0)
    chosen, _ = pick_size(fake["measure"], SIDES, BUDGET)  # type: ignore[arg-type]
    assert (chosen.width, chosen.height) == (512, 512) and log == [(512, 512)]
    log, fake = area_ms(500.0)  # nothing holds: the fastest is the closest
    chosen, _ = pick_size(fake["measure"], SIDES, BUDGET)  # type: ignore[arg-type]
    assert (chosen.width, chosen.height) == (128, 128) and log == [(512, 512), (128, 128)]


def test_median_ms_stops_early_for_a_slow_model() -> None:
    now = [0.0]
    calls = []

    def clock() -> float:
        return now[0]

    def frame() -> None:
        calls.append(1)
        now[0] += 3.0  # 3 s a frame

    assert median_ms(frame, warmup=2, frames=5, max_seconds=4.0, clock=clock) == pytest.approx(3000)
    assert len(calls) == 1 + 1  # one untimed (over half of 4 s: the second is skipped), then one timed
    now[0], calls[:] = 0.0, []

    def fast() -> None:
        calls.append(1)
        now[0] += 0.01

    assert median_ms(fast, warmup=2, frames=5, max_seconds=4.0, clock=clock) == pytest.approx(10)
    assert len(calls) == 2 + 5
