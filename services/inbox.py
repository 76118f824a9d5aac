"""Thread-safe event counters and the bounded inbox that hands messages to a service's worker."""

from __future__ import annotations

import collections
import threading
from typing import Any


class Counters:
    """Thread-safe event counters by reason, e.g. counters.add("dropped.queue_full")."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: collections.Counter[str] = collections.Counter()

    def add(self, name: str, amount: int = 1) -> int:
        with self._lock:
            self._values[name] += amount
            return self._values[name]

    def get(self, name: str) -> int:
        with self._lock:
            return self._values[name]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self._values.items()))


class Inbox:
    """Bounded hand-off queue from the network thread to a worker thread.

    `put` waits only for the inbox's lock, never for room: when the inbox is full it drops the
    oldest item and returns it, so the caller can count it and report the loss downstream.
    """

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"inbox size must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self._items: collections.deque = collections.deque()
        self._ready = threading.Condition()

    def put(self, item: Any) -> Any | None:
        """Append item; return the dropped oldest item when the inbox was full, else None."""
        with self._ready:
            dropped = self._items.popleft() if len(self._items) >= self.maxsize else None
            self._items.append(item)
            self._ready.notify()
            return dropped

    def get(self, timeout: float | None = None) -> Any | None:
        """Return the oldest item, or None when none arrives within timeout seconds."""
        with self._ready:
            if not self._items:
                self._ready.wait(timeout)
            return self._items.popleft() if self._items else None

    def __len__(self) -> int:
        with self._ready:
            return len(self._items)
