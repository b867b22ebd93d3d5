"""The store contract (SPEC §3): every store is one small module behind these methods.

A store does four things atomically and nothing else: claim, complete, release, renew.
The claim applies `oncely.core.claim_transition` in one atomic step; completion, release
and renewal are fenced by the lease token. The store's own clock decides expiry.

Each store offers the async methods (for ASGI) and their sync twins with a `_sync`
suffix (for WSGI), over the same records.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from oncely.core.decisions import ClaimResult
from oncely.core.records import Record, RecordState, StoredResponse

_loops_by_thread: dict[int, asyncio.AbstractEventLoop] = {}


def running_loop() -> asyncio.AbstractEventLoop:
    """`asyncio.get_running_loop()` without its getpid() system call on every use.

    A thread runs one loop at a time: while the loop last seen in this thread runs, it
    is the running one. RuntimeError outside a running loop, as asyncio's.
    """
    thread = threading.get_ident()
    loop = _loops_by_thread.get(thread)
    if loop is None or not loop.is_running():
        loop = _loops_by_thread[thread] = asyncio.get_running_loop()
    return loop


class StoreError(Exception):
    """The store could not answer (down, timed out, or returned garbage).

    Adapters fail closed on it: 503 with Retry-After, the handler does not run.
    """


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Records by state, for `oncely stats` and dashboards."""

    in_flight: int
    completed: int
    expired: int
    oldest_in_flight_age: float | None = None


@runtime_checkable
class AsyncStore(Protocol):
    name: str

    async def claim(
        self, scope: str, key: str, fingerprint: str, token: str, *, lease: float, retention: float
    ) -> ClaimResult:
        """Atomically: insert, take over an expired lease, or report what is there."""
        ...

    async def complete(self, scope: str, key: str, token: str, response: StoredResponse) -> bool:
        """Store the response if `token` still holds the lease. False: fenced out."""
        ...

    async def release(self, scope: str, key: str, token: str) -> bool:
        """Delete the in-flight record if `token` still holds it, so a retry runs again."""
        ...

    async def renew(self, scope: str, key: str, token: str, *, lease: float) -> bool:
        """Extend the lease by `lease` seconds from now. False: the lease was lost."""
        ...

    async def get(self, scope: str, key: str) -> Record | None:
        """The live record, or None when there is none or it has expired."""
        ...

    async def wait(self, scope: str, key: str, timeout: float) -> Record | None:
        """Return once the record is no longer in flight (or `timeout` passed)."""
        ...

    async def purge_expired(self) -> int: ...

    async def stats(self) -> StoreStats: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class SyncStore(Protocol):
    name: str

    def claim_sync(
        self, scope: str, key: str, fingerprint: str, token: str, *, lease: float, retention: float
    ) -> ClaimResult: ...

    def complete_sync(self, scope: str, key: str, token: str, response: StoredResponse) -> bool: ...

    def release_sync(self, scope: str, key: str, token: str) -> bool: ...

    def renew_sync(self, scope: str, key: str, token: str, *, lease: float) -> bool: ...

    def get_sync(self, scope: str, key: str) -> Record | None: ...

    def wait_sync(self, scope: str, key: str, timeout: float) -> Record | None: ...

    def purge_expired_sync(self) -> int: ...

    def stats_sync(self) -> StoreStats: ...

    def close(self) -> None: ...


@runtime_checkable
class Store(AsyncStore, SyncStore, Protocol):
    """Both twins over the same records: what every shipped store is.

    `native_expiry` is True where the backend drops expired records by itself (Redis),
    so `purge_expired` has nothing to do there. A store may also set `nonblocking_sync =
    True` when its sync twins never wait (memory): the ASGI adapter then calls
    `claim_sync` and `complete_sync` on the event loop, without a coroutine per call.
    """

    native_expiry: bool


# Polling for stores without a notification channel: quick at first (most handlers are
# fast), then backing off so a slow handler costs few reads.
POLL_FIRST_DELAY = 0.005
POLL_MAX_DELAY = 0.25


def _settled(record: Record | None) -> bool:
    return record is None or record.state is not RecordState.IN_FLIGHT


async def poll_until_settled(
    get: Callable[[], Awaitable[Record | None]], timeout: float
) -> Record | None:
    deadline = time.monotonic() + timeout
    delay = POLL_FIRST_DELAY
    record = await get()
    while not _settled(record):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 2, POLL_MAX_DELAY)
        record = await get()
    return record


def poll_until_settled_sync(get: Callable[[], Record | None], timeout: float) -> Record | None:
    deadline = time.monotonic() + timeout
    delay = POLL_FIRST_DELAY
    record = get()
    while not _settled(record):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, POLL_MAX_DELAY)
        record = get()
    return record
