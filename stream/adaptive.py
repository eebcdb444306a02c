"""The adaptive controller: steps a stream down its ladder of (steps, size) levels when its frame time
stays over budget, and back up when it stays well under."""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from stream.monitor import percentile


@dataclasses.dataclass(frozen=True)
class Level:
    """What the adaptive controller may change: the number of steps and the model's resolution."""

    steps: int
    width: int
    height: int

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def build_ladder(
    steps: int,
    width: int,
    height: int,
    *,
    min_steps: int = 1,
    scales: tuple[float, ...] = (0.75, 0.5),
    multiple: int = 64,
    min_side: int = 128,
) -> list[Level]:
    """Levels from the richest (the configured one) down: fewer steps to `min_steps`, then smaller sizes.

    Sizes are the configured size times each of `scales`, rounded down to `multiple` (which every
    Stable Diffusion autoencoder and UNet accepts) and at least `min_side`; sizes that do not shrink are
    left out.
    """
    ladder = [Level(s, width, height) for s in range(steps, min(min_steps, steps) - 1, -1)]
    floor = ladder[-1].steps
    for scale in scales:
        w = max(min_side, int(width * scale) // multiple * multiple)
        h = max(min_side, int(height * scale) // multiple * multiple)
        last = ladder[-1]
        if w * h < last.width * last.height and w <= last.width and h <= last.height:
            ladder.append(Level(floor, w, h))
    return ladder


@dataclasses.dataclass
class _Failure:
    """A level that went over budget: retried when the load drops under 80% of `ref`, or after `until`."""

    until: float  # clock time when its back-off runs out
    ref: float | None = None  # mean p95 of two windows at the level below, measured after the change


class AdaptiveController:
    """Steps a stream down its ladder when its p95 frame time stays over budget, and back up when it
    stays well under; with hysteresis, so it never oscillates.

    Frame times arrive one by one (`observe`). After every change the first `settle` frames are not
    judged (a new shape's first frames are slow: allocation, kernel choice). Then every `window`
    frames their p95 is judged:
    - over the budget for `down_windows` windows in a row: one level down. The level left is marked
      as failed; its reference (`ref`) is the mean p95 of the next two windows at the level below.
    - under `up_fraction` of the budget for `up_windows` windows in a row: one level up, unless that
      level failed and neither has the load dropped since (p95 here under 80% of `ref`: another
      stream ended, the GPU got free) nor has its back-off run out. The back-off starts at `backoff`
      seconds and doubles each time the same level fails again, up to `max_backoff`; a level that then
      holds for `hold_windows` windows in a row is trusted again (back-off reset).
    - in between: no change (a dead band).
    So a level that cannot hold the budget is retried ever more rarely, and a passing spike costs
    quality for at most `backoff` seconds.
    """

    def __init__(
        self,
        budget_ms: float,
        ladder: list[Level],
        *,
        enabled: bool = True,
        window: int = 24,
        down_windows: int = 2,
        up_windows: int = 3,
        up_fraction: float = 0.7,
        settle: int | None = None,
        backoff: float = 30.0,
        max_backoff: float = 480.0,
        hold_windows: int = 20,
        clock: Callable[[], float] = time.monotonic,
        max_log: int = 20,
        multiple: int = 64,
    ) -> None:
        if not ladder:
            raise ValueError("the ladder needs at least one level")
        self.budget_ms = budget_ms
        self.multiple = multiple  # sizes of ladders built by `apply`
        self.enabled = enabled
        self.window = window
        self.down_windows = down_windows
        self.up_windows = up_windows
        self.up_fraction = up_fraction
        self.settle = window if settle is None else settle
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.hold_windows = hold_windows
        self.clock = clock
        self.started = clock()
        self.changes: deque[dict[str, Any]] = deque(maxlen=max_log)
        self.change_count = 0
        self.retarget(ladder)

    def retarget(self, ladder: list[Level]) -> None:
        """A new ladder (the user changed steps or size): start again from its richest level."""
        self.ladder = list(ladder)
        self.index = 0
        self._samples: list[float] = []
        self._skip = 0  # frames still to ignore after a change
        self._over = self._under = self._held = 0
        self._failed: dict[int, _Failure] = {}  # level index -> why not to go back up to it yet
        self._backoffs: dict[int, float] = {}  # level index -> its next back-off, seconds
        self._refs: list[float] = []  # p95 of windows measured for the newest failure's ref
        self._applied: tuple[Any, int, Any] | None = None  # (requested config, index, config at index)

    @property
    def level(self) -> Level:
        return self.ladder[self.index]

    def apply(self, config: Any) -> Any:
        """`config` (anything with steps, width, height and `replace`) at the current level.

        The same object at the richest level. When the requested steps or size change (the user's
        own settings) the ladder is rebuilt from them and the controller starts again at its top.
        """
        top = Level(config.steps, config.width, config.height)
        if top != self.ladder[0]:
            self.retarget(build_ladder(top.steps, top.width, top.height, multiple=self.multiple))
        if self.index == 0 or not self.enabled:
            return config
        cached = self._applied
        if cached is None or cached[0] is not config or cached[1] != self.index:
            cached = (config, self.index, config.replace(**self.level.as_dict()))
            self._applied = cached
        return cached[2]

    def drop_level(self, reason: str) -> None:
        """The current level cannot run (e.g. the model refuses its size): remove it and the ones below."""
        if self.index == 0:
            return
        before = self.level
        self.ladder = self.ladder[: self.index]
        self.index -= 1
        self._log(before, f"level removed: {reason}")

    def observe(self, frame_ms: float) -> dict[str, Any] | None:
        """One frame's time; returns the change made (also logged in `changes`), or None."""
        if not self.enabled:
            return None
        if self._skip > 0:
            self._skip -= 1
            return None
        self._samples.append(frame_ms)
        if len(self._samples) < self.window:
            return None
        p95 = percentile(self._samples, 95)
        self._samples = []
        below = self._failed.get(self.index - 1)
        if below is not None and below.ref is None:  # measuring the reference of the level just left
            self._refs.append(p95)
            if len(self._refs) == 2:
                below.ref = sum(self._refs) / 2
        if p95 > self.budget_ms:
            self._over, self._under, self._held = self._over + 1, 0, 0
            if self._over >= self.down_windows and self.index + 1 < len(self.ladder):
                wait = self._backoffs.get(self.index, self.backoff)
                self._failed[self.index] = _Failure(until=self.clock() + wait)
                self._backoffs[self.index] = min(self.max_backoff, wait * 2)
                self._refs = []
                return self._move(+1, f"p95 {p95:.1f} ms over the {self.budget_ms:.1f} ms budget")
            return None
        self._held += 1
        if self._held >= self.hold_windows:  # this level is trusted again
            self._backoffs.pop(self.index, None)
        if p95 < self.up_fraction * self.budget_ms:
            self._over, self._under = 0, self._under + 1
            if self._under >= self.up_windows and self.index > 0:
                failure = self._failed.get(self.index - 1)
                load_dropped = failure is not None and failure.ref is not None and p95 < 0.8 * failure.ref
                if failure is None or load_dropped or self.clock() >= failure.until:
                    self._failed.pop(self.index - 1, None)
                    share = f"{self.up_fraction:.0%} of the {self.budget_ms:.1f} ms budget"
                    why = "" if failure is None else ("; the load dropped" if load_dropped else "; retrying")
                    return self._move(-1, f"p95 {p95:.1f} ms under {share}{why}")
                self._under = 0  # that level could not hold the budget at this load: not yet
        else:
            self._over = self._under = 0
        return None

    def _move(self, direction: int, reason: str) -> dict[str, Any]:
        before = self.level
        self.index += direction
        return self._log(before, reason)

    def _log(self, before: Level, reason: str) -> dict[str, Any]:
        self._over = self._under = self._held = 0
        self._samples = []
        self._skip = self.settle
        change = {
            "at": round(self.clock() - self.started, 2),
            "from": before.as_dict(),
            "to": self.level.as_dict(),
            "reason": reason,
        }
        self.changes.append(change)
        self.change_count += 1
        return change

    def snapshot(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "level": self.index,
            "levels": len(self.ladder),
            **self.level.as_dict(),
            "change_count": self.change_count,
            "changes": list(self.changes)[-10:],
        }
