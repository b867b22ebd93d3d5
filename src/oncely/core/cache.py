"""A bounded in-process cache: oldest first out, within a count and a byte budget."""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """`by_key` is a plain dict, read without a lock (a lookup is one dict access, and
    an empty cache is falsy); `put`, `drop` and `clear` take the lock, since WSGI
    threads and an event loop may share one. An entry over a 64th of the byte budget is
    never kept, so one large entry cannot empty the cache."""

    __slots__ = ("_lock", "_max_bytes", "_max_count", "_size", "_sizes", "by_key")

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self.by_key: dict[K, V] = {}
        self._sizes: dict[K, int] = {}
        self._size = 0
        self._max_count = max_count
        self._max_bytes = max_bytes
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.by_key)

    def put(self, key: K, value: V, size: int) -> None:
        """Keep `value` under `key` (replacing what was there), if it fits the budget."""
        if size > self._max_bytes // 64:
            return
        with self._lock:
            by_key, sizes = self.by_key, self._sizes
            if key in by_key:
                del by_key[key]
                self._size -= sizes.pop(key)
            while by_key and (
                len(by_key) >= self._max_count or self._size + size > self._max_bytes
            ):
                oldest = next(iter(by_key))
                del by_key[oldest]
                self._size -= sizes.pop(oldest)
            by_key[key] = value
            sizes[key] = size
            self._size += size

    def drop(self, key: K, value: V) -> None:
        """Forget `key` if it still holds `value` (another thread may have replaced it)."""
        with self._lock:
            if self.by_key.get(key) is value:
                del self.by_key[key]
                self._size -= self._sizes.pop(key)

    def clear(self) -> None:
        with self._lock:
            self.by_key.clear()
            self._sizes.clear()
            self._size = 0
