"""Store URLs, shared by users and the CLI: one place that maps a URL to a store."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from oncely.stores.base import Store

SCHEMES = (
    "memory://",
    "sqlite:///path",
    "redis://",
    "rediss://",
    "redis+cluster://",
    "postgresql://",
)


def store_from_url(url: str, **options: Any) -> Store:
    """`sqlite:///relative.db`, `sqlite:////absolute.db`, `memory://`, `redis://host:6379/0`,
    `rediss://...`, `redis+cluster://host:port`, `postgresql://user@host/db`.

    Keyword options go to the store's constructor.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        from oncely.stores.memory import MemoryStore

        return MemoryStore(**options)
    if scheme == "sqlite":
        from oncely.stores.sqlite import SQLiteStore

        path = unquote(url.split("://", 1)[1])
        if not path.startswith("/"):
            raise ValueError(f"sqlite URL needs three slashes: sqlite:///file.db, got {url!r}")
        path = path[1:]  # sqlite:///a.db -> a.db ; sqlite:////tmp/a.db -> /tmp/a.db
        if not path:
            raise ValueError(f"sqlite URL has no file path: {url!r}")
        return SQLiteStore(path, **options)
    if scheme in ("redis", "rediss", "redis+cluster", "unix"):
        from oncely.stores.redis import RedisStore

        return RedisStore(url, **options)
    if scheme in ("postgresql", "postgres"):
        from oncely.stores.postgres import PostgresStore

        return PostgresStore(url, **options)
    raise ValueError(f"unknown store URL {url!r}; expected one of: {', '.join(SCHEMES)}")


def redact_url(url: str) -> str:
    """The URL with its password masked, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username or ''}:***@{host}").geturl()
