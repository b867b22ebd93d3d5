"""In-process store: for tests and single-process apps. Lost on restart."""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable

from oncely.core.decisions import Claimed, ClaimResult, Existing
from oncely.core.records import Record, RecordState, StoredResponse
from oncely.stores.base import StoreStats, poll_until_settled, poll_until_settled_sync

_PURGE_EVERY = 1024  # claims between opportunistic purges, so memory stays flat


class _Row:
    """A live record, mutable in place: the store's lock guards it. `Record`s, the
    public frozen view, are made only when a caller asks to see one."""

    __slots__ = (
        "attempts", "created_at", "expires_at", "fingerprint", "frozen", "lease_expires_at",
        "response", "state", "token",
    )  # fmt: skip

    def __init__(
        self, fingerprint: str, token: str, created_at: float, expires_at: float, lease: float
    ) -> None:
        self.fingerprint = fingerprint
        self.state = RecordState.IN_FLIGHT
        self.token: str | None = token
        self.attempts = 1
        self.created_at = created_at
        self.expires_at = expires_at
        self.lease_expires_at: float | None = created_at + lease
        self.response: StoredResponse | None = None
        self.frozen: Record | None = None  # a completed row never changes: view made once

    def view(self, scope: str, key: str) -> Record:
        if self.frozen is not None:
            return self.frozen
        record = Record(
            scope, key, self.fingerprint, self.state, self.token, self.attempts,
            self.created_at, self.expires_at, self.lease_expires_at, self.response,
        )  # fmt: skip
        if self.state is RecordState.COMPLETED:
            self.frozen = record
        return record


class MemoryStore:
    """All records in a dict. Operations never block, so the async methods do no I/O."""

    name = "memory"
    native_expiry = False

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._rows: dict[tuple[str, str], _Row] = {}
        self._expiry_heap: list[tuple[float, str, str]] = []
        self._lock = threading.Lock()  # WSGI threads and the event loop may share a store
        self._claims_since_purge = 0

    # sync twins do the work ------------------------------------------------------

    def claim_sync(
        self, scope: str, key: str, fingerprint: str, token: str, *, lease: float, retention: float
    ) -> ClaimResult:
        # The §3 claim transition (core.decisions.claim_transition), applied to rows in place.
        with self._lock:
            now = self._clock()
            row = self._rows.get((scope, key))
            if row is not None and row.expires_at > now:
                if (
                    row.state is RecordState.IN_FLIGHT
                    and row.lease_expires_at is not None
                    and row.lease_expires_at <= now
                    and row.fingerprint == fingerprint
                ):
                    row.token = token
                    row.attempts += 1
                    row.lease_expires_at = now + lease
                    return Claimed(token, row.attempts, took_over=True)
                return Existing(row.view(scope, key), now)
            row = _Row(fingerprint, token, now, now + retention, lease)
            self._rows[(scope, key)] = row
            heapq.heappush(self._expiry_heap, (row.expires_at, scope, key))
            self._claims_since_purge += 1
            if self._claims_since_purge >= _PURGE_EVERY:
                self._purge_locked(now)
            return Claimed(token, 1)

    def _holder(self, scope: str, key: str, token: str) -> _Row | None:
        row = self._rows.get((scope, key))
        if row is None or row.token != token or row.state is not RecordState.IN_FLIGHT:
            return None
        return row

    def complete_sync(self, scope: str, key: str, token: str, response: StoredResponse) -> bool:
        with self._lock:
            row = self._holder(scope, key, token)
            if row is None:
                return False
            row.state = RecordState.COMPLETED
            row.lease_expires_at = None
            row.response = response
            return True

    def release_sync(self, scope: str, key: str, token: str) -> bool:
        with self._lock:
            if self._holder(scope, key, token) is None:
                return False
            del self._rows[(scope, key)]
            return True

    def renew_sync(self, scope: str, key: str, token: str, *, lease: float) -> bool:
        with self._lock:
            row = self._holder(scope, key, token)
            now = self._clock()
            if row is None or row.expires_at <= now:
                return False
            row.lease_expires_at = now + lease
            return True

    def get_sync(self, scope: str, key: str) -> Record | None:
        with self._lock:
            row = self._rows.get((scope, key))
            if row is None or row.expires_at <= self._clock():
                return None
            return row.view(scope, key)

    def wait_sync(self, scope: str, key: str, timeout: float) -> Record | None:
        return poll_until_settled_sync(lambda: self.get_sync(scope, key), timeout)

    def purge_expired_sync(self) -> int:
        with self._lock:
            return self._purge_locked(self._clock())

    def _purge_locked(self, now: float) -> int:
        self._claims_since_purge = 0
        purged = 0
        heap = self._expiry_heap
        while heap and heap[0][0] <= now:
            _, scope, key = heapq.heappop(heap)
            row = self._rows.get((scope, key))
            # A key reclaimed after expiry has a newer heap entry; only drop dead records.
            if row is not None and row.expires_at <= now:
                del self._rows[(scope, key)]
                purged += 1
        return purged

    def stats_sync(self) -> StoreStats:
        with self._lock:
            now = self._clock()
            in_flight = completed = expired = 0
            oldest: float | None = None
            for row in self._rows.values():
                if row.expires_at <= now:
                    expired += 1
                elif row.state is RecordState.IN_FLIGHT:
                    in_flight += 1
                    age = now - row.created_at
                    oldest = age if oldest is None else max(oldest, age)
                else:
                    completed += 1
            return StoreStats(in_flight, completed, expired, oldest)

    def close(self) -> None:
        pass

    # async methods: nothing blocks, so they call the twins directly -----------------

    async def claim(
        self, scope: str, key: str, fingerprint: str, token: str, *, lease: float, retention: float
    ) -> ClaimResult:
        return self.claim_sync(scope, key, fingerprint, token, lease=lease, retention=retention)

    async def complete(self, scope: str, key: str, token: str, response: StoredResponse) -> bool:
        return self.complete_sync(scope, key, token, response)

    async def release(self, scope: str, key: str, token: str) -> bool:
        return self.release_sync(scope, key, token)

    async def renew(self, scope: str, key: str, token: str, *, lease: float) -> bool:
        return self.renew_sync(scope, key, token, lease=lease)

    async def get(self, scope: str, key: str) -> Record | None:
        return self.get_sync(scope, key)

    async def wait(self, scope: str, key: str, timeout: float) -> Record | None:
        return await poll_until_settled(lambda: self.get(scope, key), timeout)

    async def purge_expired(self) -> int:
        return self.purge_expired_sync()

    async def stats(self) -> StoreStats:
        return self.stats_sync()

    async def aclose(self) -> None:
        pass
