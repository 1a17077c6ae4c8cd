"""Replies about data that never changes (profiles `bpfprof view` loaded), kept and shared.

A large profile's flame graph takes a second or more to build; the same
request again (back to a page, a type switched back) is answered from here,
and a request for a reply being built waits for that build instead of
starting another. Bounded by count: the oldest reply goes first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

MAX_REPLIES = 8  # a large profile's flame graph is 5-15 MiB of JSON


class ReplyCache(Generic[T]):
    def __init__(self, max_entries: int = MAX_REPLIES) -> None:
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._done: OrderedDict[str, T] = OrderedDict()
        self._building: dict[str, threading.Event] = {}

    def get(self, key: str, build: Callable[[], T]) -> T:
        """The reply of `key`, built by `build` once (an exception is not kept: the next call builds again)."""
        while True:
            with self._lock:
                if key in self._done:
                    self._done.move_to_end(key)
                    return self._done[key]
                event = self._building.get(key)
                if event is None:
                    event = self._building[key] = threading.Event()
                    break
            event.wait()
        try:
            reply = build()
            with self._lock:
                self._done[key] = reply
                while len(self._done) > self.max_entries:
                    self._done.popitem(last=False)
            return reply
        finally:
            with self._lock:
                del self._building[key]
            event.set()
