"""Placement: which worker takes the next session, or why none can (the 503's reason). Pure functions
over what each worker last reported."""

from __future__ import annotations

import dataclasses
from typing import Any

READY = "ready"  # answering, its model loaded, with the places it reports
STARTING = "starting"  # created or restarting: loading its model, or waiting for a free GPU
DOWN = "down"  # its process went away (killed, GPU error, node lost); Ray restarts it


@dataclasses.dataclass
class WorkerView:
    """The front's picture of one worker, from its last status."""

    name: str
    index: int
    state: str = STARTING
    reason: str = "loading its model"  # why it is not ready
    sessions: int = 0  # open sessions, plus those the front has sent it since its last status
    max_sessions: int = 0
    over_budget: int = 0  # sessions whose p95 frame time is over the budget
    incarnation: str = ""
    status: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def free(self) -> int:
        return max(0, self.max_sessions - self.sessions) if self.state == READY else 0

    def summary(self) -> dict[str, Any]:
        return {
            "worker": self.name,
            "state": self.state,
            **({"reason": self.reason} if self.state != READY else {}),
            "sessions": self.sessions,
            "max_sessions": self.max_sessions,
            "over_budget": self.over_budget,
            "host": self.status.get("host"),
        }


def pick(workers: list[WorkerView], exclude: set[str] | frozenset[str] = frozenset()) -> WorkerView | None:
    """The least loaded ready worker with a free place; among equals one whose sessions hold their budget,
    then the first. None when no worker has a place."""
    candidates = [w for w in workers if w.free > 0 and w.name not in exclude]
    if not candidates:
        return None
    return min(candidates, key=lambda w: (w.sessions / w.max_sessions, w.over_budget > 0, w.index))


def why_full(workers: list[WorkerView]) -> str:
    """Why no worker can take a session now, in the user's words."""
    ready = [w for w in workers if w.state == READY]
    if not workers:
        return "the cluster has no workers yet: start Ray workers (see the README, 'Many GPUs')"
    if not ready:
        states = "; ".join(f"{w.name} {w.state}: {w.reason}" for w in workers)
        return f"no worker is ready yet ({states}); try again in a moment"
    places = sum(w.max_sessions for w in ready)
    others = [w for w in workers if w.state != READY]
    tail = f" ({len(others)} more worker(s) not ready)" if others else ""
    return (
        f"the cluster is full: all {places} places on {len(ready)} worker(s) are taken{tail}; try again later"
    )
