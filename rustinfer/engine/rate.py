"""A rate over the last few seconds, safe to read from any thread.

A lifetime average (tokens since start / seconds since start) is not a rate a person can watch: it
barely moves after the first minute and never returns to zero when the server goes idle.
"""

from __future__ import annotations

import collections
import threading
import time

__all__ = ["RecentRate"]


class RecentRate:
    """Events per second over the trailing ``window_s`` seconds."""

    def __init__(self, window_s: float = 5.0) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self._events: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def add(self, count: int, now: float | None = None) -> None:
        if count <= 0:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            self._events.append((now, count))
            self._trim(now)

    def per_second(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            return sum(c for _, c in self._events) / self.window_s

    def _trim(self, now: float) -> None:
        horizon = now - self.window_s
        while self._events and self._events[0][0] <= horizon:
            self._events.popleft()
