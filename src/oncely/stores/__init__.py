"""Where records live. Every store implements the contract in `oncely.stores.base`.

Redis and PostgreSQL need their extras (`oncely[redis]`, `oncely[postgres]`) and are
imported only when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from oncely.stores.base import AsyncStore, Store, StoreError, StoreStats, SyncStore
from oncely.stores.memory import MemoryStore
from oncely.stores.sqlite import SQLiteStore
from oncely.stores.urls import store_from_url

if TYPE_CHECKING:
    from oncely.stores.postgres import PostgresStore
    from oncely.stores.redis import RedisStore

__all__ = [
    "AsyncStore",
    "MemoryStore",
    "PostgresStore",
    "RedisStore",
    "SQLiteStore",
    "Store",
    "StoreError",
    "StoreStats",
    "SyncStore",
    "store_from_url",
]


def __getattr__(name: str) -> Any:
    if name == "RedisStore":
        from oncely.stores.redis import RedisStore

        return RedisStore
    if name == "PostgresStore":
        from oncely.stores.postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module 'oncely.stores' has no attribute {name!r}")
