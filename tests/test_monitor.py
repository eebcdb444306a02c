"""The latency monitor and the adaptive controller, driven by a model whose cost grows with steps and size."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from stream.adaptive import AdaptiveController, Level, build_ladder
from stream.config import StreamConfig
from stream.monitor import LatencyMonitor, percentile, stage_names

BUDGET = 1000.0 / 24  # 41.7 ms


class CostModel:
    """A model whose frame time grows with steps and pixels: 15 ms a step at 512x512, plus 10 ms."""

    def __init__(
        self, config: StreamConfig, jitter: float = 0.03, seed: int = 0, slow_after_change: int = 0
    ) -> None:
        self.config = config
        self.jitter = jitter
        self.load = 1.0  # > 1: something else takes the GPU (another session, another app)
        self.rng = random.Random(seed)
        self.updates = 0
        self.slow_after_change = slow_after_change  # frames at double cost after a new shape (allocation)
        self._slow = 0

    def update(self, config: StreamConfig) -> None:
        if config is not self.config:
            self.updates += 1
            self._slow = self.slow_after_change
        self.config = config

    def cost(self, level: Level | None = None) -> float:
        c = level or Level(self.config.steps, self.config.width, self.config.height)
        return (10.0 + 15.0 * c.steps * (c.width * c.height) / (512 * 512)) * self.load

    def frame_ms(self) -> float:
        slow = 2.0 if self._slow > 0 else 1.0
        self._slow = max(0, self._slow - 1)
        return self.cost() * slow * (1 + self.rng.uniform(-self.jitter, self.jitter))


class Clock:
    """Simulated time: each frame takes its frame time, or the camera's 1/24 s when that is longer."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drive(
    controller: AdaptiveController, model: CostModel, requested: StreamConfig, frames: int
) -> list[int]:
    """Run `frames` frames; returns the frame numbers at which the level changed."""
    changed = []
    clock = controller.clock
    for i in range(frames):
        model.update(controller.apply(requested))
        ms = model.frame_ms()
        if isinstance(clock, Clock):
            clock.now += max(ms, BUDGET) / 1000.0
        if controller.observe(ms) is not None:
            changed.append(i)
    model.update(controller.apply(requested))
    return changed


REQUESTED = StreamConfig(model="tiny", width=512, height=512, steps=4, device="cpu")


def best_level(ladder: list[Level], model: CostModel) -> Level:
    """The richest level whose worst frame (cost + jitter) is within the budget."""
    return next(lv for lv in ladder if model.cost(lv) * (1 + model.jitter) <= BUDGET)


def test_ladder_goes_down_steps_then_size() -> None:
    ladder = build_ladder(4, 512, 512)
    assert ladder == [
        Level(4, 512, 512),
        Level(3, 512, 512),
        Level(2, 512, 512),
        Level(1, 512, 512),
        Level(1, 384, 384),
        Level(1, 256, 256),
    ]
    assert build_ladder(2, 256, 192, min_steps=2) == [
        Level(2, 256, 192),
        Level(2, 192, 128),
        Level(2, 128, 128),
    ]
    assert build_ladder(1, 128, 128) == [Level(1, 128, 128)]  # nothing smaller to go to


def test_controller_settles_on_the_richest_level_that_holds_the_budget() -> None:
    controller = AdaptiveController(BUDGET, build_ladder(4, 512, 512))
    model = CostModel(REQUESTED)
    assert model.cost() > BUDGET  # the configured level cannot hold 24 FPS
    changed = drive(controller, model, REQUESTED, 3000)
    assert controller.level == best_level(controller.ladder, model) == Level(2, 512, 512)
    assert model.config.steps == 2 and model.cost() * 1.03 <= BUDGET  # the model really runs the level
    # Down one level at a time (each judged after the new level settled), then nothing: no oscillation.
    assert len(changed) == 2 and changed[-1] < 200, changed
    assert all(c["to"]["steps"] < c["from"]["steps"] for c in controller.changes)
    assert "over the 41.7 ms budget" in controller.changes[0]["reason"]


def test_controller_recovers_when_the_load_goes_away() -> None:
    controller = AdaptiveController(BUDGET, build_ladder(4, 512, 512))
    model = CostModel(REQUESTED)
    drive(controller, model, REQUESTED, 1000)
    steady = controller.level
    model.load = 2.0  # something else takes half the machine
    drive(controller, model, REQUESTED, 1500)
    loaded = controller.level
    assert loaded.steps * loaded.width * loaded.height < steady.steps * steady.width * steady.height
    assert model.cost() * 1.03 <= BUDGET  # it holds the budget under load too
    model.load = 1.0
    changed = drive(controller, model, REQUESTED, 1500)
    assert controller.level == steady  # back to where it was, no further
    assert changed and changed[-1] < 500, changed  # then it stays


def test_a_level_that_fails_at_this_load_is_retried_ever_more_rarely() -> None:
    # At this load 2 steps cost 44 ms (over the budget) and 1 step 27.5 ms (under 70% of it): without
    # hysteresis the controller would go down, up, down, ... for ever. The first 2 frames after each
    # change cost double (a new shape's allocation): they must not count either.
    clock = Clock()
    controller = AdaptiveController(BUDGET, [Level(2, 512, 512), Level(1, 512, 512)], clock=clock)
    requested = REQUESTED.replace(steps=2)
    model = CostModel(requested, slow_after_change=2)
    model.load = 1.1
    assert model.cost(Level(2, 512, 512)) > BUDGET and model.cost(Level(1, 512, 512)) * 1.03 < 0.7 * BUDGET
    changed = drive(controller, model, requested, 24 * 600)  # 10 minutes
    assert controller.level == Level(1, 512, 512)
    ups = [c["at"] for c in controller.changes if c["to"]["steps"] > c["from"]["steps"]]
    # Retried after 30 s, then 60, 120, 240 s later: the back-off doubles; at most 5 tries in 10 minutes.
    assert 2 <= len(ups) <= 5 and len(changed) == 2 * len(ups) + 1, controller.changes
    gaps = [b - a for a, b in zip(ups, ups[1:], strict=False)]
    assert all(later > 1.8 * earlier for earlier, later in zip(gaps, gaps[1:], strict=False)), gaps
    assert all("retrying" in c["reason"] for c in controller.changes if c["to"]["steps"] == 2)


def test_a_passing_spike_costs_quality_for_a_short_while_only() -> None:
    clock = Clock()
    controller = AdaptiveController(BUDGET, build_ladder(4, 512, 512), clock=clock)
    model = CostModel(REQUESTED, slow_after_change=2)
    drive(controller, model, REQUESTED, 500)
    steady = controller.level
    model.load = 2.5  # a 3-second hiccup
    drive(controller, model, REQUESTED, 72)
    model.load = 1.0
    drive(controller, model, REQUESTED, 24 * 120)  # two minutes later
    assert controller.level == steady
    back = [c for c in controller.changes if c["to"] == steady.as_dict()][-1]
    assert back["at"] - controller.changes[1]["at"] < 75  # within the 30 s back-off plus its windows


def test_dead_band_and_off() -> None:
    # 2 steps at 512: 40 ms, inside [70%, 100%] of the budget: no change in either direction.
    controller = AdaptiveController(BUDGET, build_ladder(2, 512, 512))
    model = CostModel(REQUESTED.replace(steps=2), jitter=0.01)
    assert drive(controller, model, REQUESTED.replace(steps=2), 2000) == []
    off = AdaptiveController(BUDGET, build_ladder(4, 512, 512), enabled=False)
    model = CostModel(REQUESTED)
    assert drive(off, model, REQUESTED, 500) == [] and model.config is REQUESTED
    assert off.snapshot()["enabled"] is False


def test_apply_follows_the_users_settings() -> None:
    controller = AdaptiveController(BUDGET, build_ladder(4, 512, 512))
    model = CostModel(REQUESTED)
    drive(controller, model, REQUESTED, 300)
    assert controller.index > 0
    config = controller.apply(REQUESTED)
    assert config is controller.apply(REQUESTED)  # cached: the denoiser is not updated every frame
    assert config.prompt == REQUESTED.prompt and config.steps < REQUESTED.steps
    # The user picks other steps: a new ladder from them, starting at its top.
    mine = REQUESTED.replace(steps=1, width=256, height=256)
    assert controller.apply(mine) is mine and controller.ladder[0] == Level(1, 256, 256)
    # A level the model refuses is removed.
    controller.retarget(build_ladder(3, 512, 512))
    controller.index = 2
    controller.drop_level("too small")
    assert len(controller.ladder) == 2 and controller.index == 1
    assert controller.changes[-1]["reason"] == "level removed: too small"


def test_monitor_budget_and_snapshot() -> None:
    monitor = LatencyMonitor(target_fps=24)
    assert monitor.holds() is None and math.isclose(monitor.budget_ms, 41.6667, rel_tol=1e-4)
    for i in range(48):
        monitor.frame_in(now=i / 30)
        monitor.frame_out({"total": 30.0 + i % 3, "unet_2": 5.0, "unet_1": 5.0, "wait": 1.0}, now=i / 24)
    monitor.sample("handoff", 0.5)
    snap = monitor.snapshot()
    assert snap["budget"]["holds"] is True and snap["budget"]["p95_ms"] == 32.0
    assert math.isclose(snap["fps_out"], 24.0) and math.isclose(snap["fps_in"], 30.0)
    assert list(snap["latency_ms"]) == ["total", "wait", "handoff", "unet_1", "unet_2"]
    for _ in range(48):
        monitor.frame_out({"total": 60.0})
    assert monitor.holds() is False
    with pytest.raises(ValueError, match="target FPS must be a positive number, got 0"):
        LatencyMonitor(target_fps=0)


def test_percentile_and_stage_order() -> None:
    assert math.isnan(percentile([], 50))
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5.0], 99) == 5.0
    names: Any = ["unet_10", "decode", "unet_2", "total", "extra", "unet_1"]
    assert stage_names(names) == ["total", "decode", "unet_1", "unet_2", "unet_10", "extra"]


def test_stages_that_stop_running_leave_the_latency_table() -> None:
    """Steps 4 -> 1: unet_2..4 stop being timed and soon stop being shown (no stale numbers)."""
    monitor = LatencyMonitor(24)
    four = {"total": 40.0, "denoise": 30.0, **{f"unet_{i}": 7.0 for i in range(1, 5)}}
    for _ in range(10):
        monitor.frame_out(four)
    assert "unet_4" in monitor.latency()
    one = {"total": 12.0, "denoise": 7.0, "unet_1": 7.0}
    for _ in range(LatencyMonitor.STALE_FRAMES):
        monitor.frame_out(one)
    assert "unet_4" in monitor.latency()  # still within its last STALE_FRAMES frames
    monitor.frame_out(one)
    assert set(monitor.latency()) == {"total", "denoise", "unet_1"}


def test_rates_fall_to_zero_when_frames_stop() -> None:
    monitor = LatencyMonitor(target_fps=24)
    for i in range(48):
        monitor.frame_in(now=i / 24)
        monitor.frame_out({"total": 10.0}, now=i / 24)
    last = 47 / 24
    assert math.isclose(monitor.snapshot(now=last + 0.01)["fps_out"], 24.0)
    slowed = monitor.snapshot(now=last + 1.0)
    assert 0 < slowed["fps_out"] < 24.0 * 0.75 and 0 < slowed["fps_in"] < 24.0 * 0.75
    stopped = monitor.snapshot(now=last + 10.0)
    assert stopped["fps_out"] == 0 and stopped["fps_in"] == 0
    slow = LatencyMonitor(target_fps=24)  # a stream at 0.2 FPS is not called stopped between frames
    for i in range(5):
        slow.frame_out({"total": 10.0}, now=i * 5.0)
    assert 0.1 < slow.snapshot(now=20.0 + 4.0)["fps_out"] <= 0.2
