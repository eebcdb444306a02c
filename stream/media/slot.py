"""The latest-only hand-off between pipeline stages: a new item overwrites an unread one (counted as a drop),
so latency never grows when a consumer is slower than its producer."""

from __future__ import annotations

import logging
import threading
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class LatestFrameSlot(Generic[T]):
    """Thread-safe latest-only hand-off: put() overwrites an unread item (counted as a drop).

    get() returns the newest item. The slot holds at most one item, so memory never grows.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: T | None = None
        self._has_item = False  # the slot holds at most this one item
        self._closed = False
        self._puts = 0
        self._drops = 0

    def put(self, item: T) -> None:
        """Store `item`, replacing (and dropping) an unread one; never blocks. Ignored after close()."""
        with self._cond:
            if self._closed:
                return
            if self._has_item:
                self._drops += 1
            self._item = item
            self._has_item = True
            self._puts += 1
            self._cond.notify_all()

    def get(self, timeout: float | None = None) -> T | None:
        """Take the newest unread item, waiting for one; None on timeout or when closed and empty."""
        with self._cond:
            self._cond.wait_for(lambda: self._has_item or self._closed, timeout)
            if not self._has_item:
                return None
            item = self._item
            self._item = None
            self._has_item = False
            return item

    def close(self) -> None:
        """Wake every waiter; an unread item can still be taken, later puts are ignored."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def ready(self) -> bool:
        """Whether an unread item is waiting."""
        return self._has_item

    @property
    def drops(self) -> int:
        """Items that were overwritten before anyone read them."""
        return self._drops

    @property
    def puts(self) -> int:
        """Items accepted by put()."""
        return self._puts
