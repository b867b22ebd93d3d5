"""In-process store: for tests and single-process apps. Lost on restart."""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable
from dataclasses import replace as _replace

from oncely.core.decisions import Claimed, ClaimResult, ClaimTransition, Existing, claim_transition
from oncely.core.records import Record, RecordState, StoredResponse
from oncely.stores.base import StoreStats, poll_until_settled, poll_until_settled_sync

_PURGE_EVERY = 1024  # claims between opportunistic purges, so memory stays flat


class MemoryStore:
    """All records in a dict. Operations never block, so the async methods do no I/O."""

    name = "memory"
    native_expiry = False

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._records: dict[tuple[str, str], Record] = {}
        self._expiry_heap: list[tuple[float, str, str]] = []
        self._lock = threading.Lock()  # WSGI threads and the event loop may share a store
        self._claims_since_purge = 0

    # sync twins do the work ------------------------------------------------------

    def claim_sync(
        self, scope: str, key: str, fingerprint: str, token: str, *, lease: float, retention: float
    ) -> ClaimResult:
        with self._lock:
            now = self._clock()
            existing = self._records.get((scope, key))
            transition = claim_transition(existing, fingerprint, now)
            if transition is ClaimTransition.KEEP:
                assert existing is not None
                return Existing(existing, now)
            if transition is ClaimTransition.TAKE_OVER:
                assert existing is not None
                self._records[(scope, key)] = _replace(
                    existing, token=token, attempts=existing.attempts + 1,
                    lease_expires_at=now + lease,
                )  # fmt: skip
                return Claimed(token, existing.attempts + 1, took_over=True)
            record = Record(
                scope=scope, key=key, fingerprint=fingerprint, state=RecordState.IN_FLIGHT,
                token=token, attempts=1, created_at=now, expires_at=now + retention,
                lease_expires_at=now + lease,
            )  # fmt: skip
            self._records[(scope, key)] = record
            heapq.heappush(self._expiry_heap, (record.expires_at, scope, key))
            self._claims_since_purge += 1
            if self._claims_since_purge >= _PURGE_EVERY:
                self._purge_locked(now)
            return Claimed(token, 1)

    def _holder(self, scope: str, key: str, token: str) -> Record | None:
        record = self._records.get((scope, key))
        if record is None or record.token != token or record.state is not RecordState.IN_FLIGHT:
            return None
        return record

    def complete_sync(self, scope: str, key: str, token: str, response: StoredResponse) -> bool:
        with self._lock:
            record = self._holder(scope, key, token)
            if record is None:
                return False
            self._records[(scope, key)] = Record(
                scope, key, record.fingerprint, RecordState.COMPLETED, token, record.attempts,
                record.created_at, record.expires_at, None, response,
            )  # fmt: skip
            return True

    def release_sync(self, scope: str, key: str, token: str) -> bool:
        with self._lock:
            if self._holder(scope, key, token) is None:
                return False
            del self._records[(scope, key)]
            return True

    def renew_sync(self, scope: str, key: str, token: str, *, lease: float) -> bool:
        with self._lock:
            record = self._holder(scope, key, token)
            now = self._clock()
            if record is None or record.expires_at <= now:
                return False
            self._records[(scope, key)] = _replace(record, lease_expires_at=now + lease)
            return True

    def get_sync(self, scope: str, key: str) -> Record | None:
        with self._lock:
            record = self._records.get((scope, key))
            if record is None or record.expires_at <= self._clock():
                return None
            return record

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
            record = self._records.get((scope, key))
            # A key reclaimed after expiry has a newer heap entry; only drop dead records.
            if record is not None and record.expires_at <= now:
                del self._records[(scope, key)]
                purged += 1
        return purged

    def stats_sync(self) -> StoreStats:
        with self._lock:
            now = self._clock()
            in_flight = completed = expired = 0
            oldest: float | None = None
            for record in self._records.values():
                if record.expires_at <= now:
                    expired += 1
                elif record.state is RecordState.IN_FLIGHT:
                    in_flight += 1
                    age = now - record.created_at
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
