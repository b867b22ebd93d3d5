"""In-process store: for tests and single-process apps. Lost on restart."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable

from oncely.core.decisions import Claimed, ClaimResult, Existing
from oncely.core.records import (
    Record,
    RecordState,
    StoredResponse,
    decode_response,
    encode_response,
)
from oncely.stores.base import StoreStats, poll_until_settled, poll_until_settled_sync

_PURGE_EVERY = 1024  # claims between opportunistic purges, so memory stays flat
_VIEWS_KEPT = 4096  # decoded completed records kept for replays

# Completed records are kept as bytes in a dict with str keys: neither is a container
# that Python's garbage collector tracks, so its full collections never walk them. A
# dict of objects is walked entry by entry: one full collection paused the event loop
# for 465 ms at a million records (docs/benchmarks.md).
_COMPLETED_HEAD = struct.Struct("<ddIII")  # expires_at, created_at, attempts, fp, token len
_EXPIRES_AT = struct.Struct("<d")  # how a completed record starts
_EXPIRY_ENTRY = struct.Struct("<dI")  # expires_at, key length


def _record_key(scope: str, key: str) -> str:
    """One str for (scope, key); the length prefix keeps any two pairs apart."""
    return f"{len(scope)}:{scope}{key}"


class _Row:
    """An in-flight record, mutable in place: the store's lock guards it. `Record`s, the
    public frozen view, are made only when a caller asks to see one."""

    __slots__ = ("attempts", "created_at", "expires_at", "fingerprint", "lease_expires_at", "token")

    def __init__(
        self, fingerprint: str, token: str, created_at: float, expires_at: float, lease: float
    ) -> None:
        self.fingerprint = fingerprint
        self.token = token
        self.attempts = 1
        self.created_at = created_at
        self.expires_at = expires_at
        self.lease_expires_at = created_at + lease

    def view(self, scope: str, key: str) -> Record:
        return Record(
            scope, key, self.fingerprint, RecordState.IN_FLIGHT, self.token, self.attempts,
            self.created_at, self.expires_at, self.lease_expires_at,
        )  # fmt: skip

    def completed(self, response: StoredResponse) -> bytes:
        fingerprint = self.fingerprint.encode("utf-8", "surrogatepass")
        token = self.token.encode("utf-8", "surrogatepass")
        head = _COMPLETED_HEAD.pack(
            self.expires_at, self.created_at, self.attempts, len(fingerprint), len(token)
        )
        return b"".join((head, fingerprint, token, encode_response(response)))


def _completed_expires_at(blob: bytes) -> float:
    expires_at: float = _EXPIRES_AT.unpack_from(blob)[0]
    return expires_at


def _completed_view(scope: str, key: str, blob: bytes) -> Record:
    expires_at, created_at, attempts, fp_size, token_size = _COMPLETED_HEAD.unpack_from(blob)
    offset = _COMPLETED_HEAD.size
    fingerprint = blob[offset : offset + fp_size].decode("utf-8", "surrogatepass")
    offset += fp_size
    token = blob[offset : offset + token_size].decode("utf-8", "surrogatepass")
    response = decode_response(blob[offset + token_size :])
    return Record(
        scope, key, fingerprint, RecordState.COMPLETED, token, attempts, created_at,
        expires_at, None, response,
    )  # fmt: skip


class _ExpiryQueue:
    """(expires_at, record key) in the order claimed, packed in one bytearray (which the
    garbage collector does not walk either). One queue per retention, so expiry times
    only grow along it (unless the wall clock steps back: purges then come that late)."""

    __slots__ = ("_buffer", "_start")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._start = 0

    def push(self, expires_at: float, record_key: str) -> None:
        encoded = record_key.encode("utf-8", "surrogatepass")
        self._buffer += _EXPIRY_ENTRY.pack(expires_at, len(encoded)) + encoded

    def pop_expired(self, now: float) -> list[str]:
        buffer, offset, due = self._buffer, self._start, []
        while offset < len(buffer):
            expires_at, size = _EXPIRY_ENTRY.unpack_from(buffer, offset)
            if expires_at > now:
                break
            offset += _EXPIRY_ENTRY.size
            due.append(buffer[offset : offset + size].decode("utf-8", "surrogatepass"))
            offset += size
        if offset > len(buffer) // 2:  # amortised: drop the consumed front now and then
            del buffer[:offset]
            offset = 0
        self._start = offset
        return due

    def __len__(self) -> int:
        return len(self._buffer) - self._start


class MemoryStore:
    """All records in dicts. Operations never block, so the async methods do no I/O."""

    name = "memory"
    native_expiry = False
    # The ASGI adapter calls claim_sync/complete_sync on the loop, without a coroutine.
    nonblocking_sync = True

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # A subclass that overrides an async operation must be called through it.
        if any(name in cls.__dict__ for name in ("claim", "complete")):
            cls.nonblocking_sync = False

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._in_flight: dict[str, _Row] = {}
        self._completed: dict[str, bytes] = {}  # a key is in one of the two dicts at most
        self._views: dict[str, Record] = {}  # decoded _completed entries, for replays
        self._expiry: dict[float, _ExpiryQueue] = {}  # by retention
        self._lock = threading.Lock()  # WSGI threads and the event loop may share a store
        self._claims_since_purge = 0

    # sync twins do the work ------------------------------------------------------

    def claim_sync(
        self, scope: str, key: str, fingerprint: str, token: str, *, lease: float, retention: float
    ) -> ClaimResult:
        # The §3 claim transition (core.decisions.claim_transition), applied in place.
        record_key = _record_key(scope, key)
        with self._lock:
            now = self._clock()
            row = self._in_flight.get(record_key)
            if row is not None:
                if row.expires_at > now:
                    if row.lease_expires_at <= now and row.fingerprint == fingerprint:
                        row.token = token
                        row.attempts += 1
                        row.lease_expires_at = now + lease
                        return Claimed(token, row.attempts, took_over=True)
                    return Existing(row.view(scope, key), now)
            elif record_key in self._completed and (
                record := self._live_completed(record_key, scope, key, now)
            ):
                return Existing(record, now)
            expires_at = now + retention
            self._in_flight[record_key] = _Row(fingerprint, token, now, expires_at, lease)
            queue = self._expiry.get(retention)
            if queue is None:
                queue = self._expiry[retention] = _ExpiryQueue()
            queue.push(expires_at, record_key)
            self._claims_since_purge += 1
            if self._claims_since_purge >= _PURGE_EVERY:
                self._purge_locked(now)
            return Claimed(token, 1)

    def _live_completed(self, record_key: str, scope: str, key: str, now: float) -> Record | None:
        """The completed record, decoded once and kept for replays; None when there is
        none, or it expired (then it is dropped, so the key is free to claim)."""
        views = self._views
        record = views.get(record_key)
        if record is None:
            blob = self._completed.get(record_key)
            if blob is None:
                return None
            if _completed_expires_at(blob) > now:
                record = _completed_view(scope, key, blob)
                if len(views) >= _VIEWS_KEPT:
                    del views[next(iter(views))]
                views[record_key] = record
                return record
        elif record.expires_at > now:
            return record
        self._drop_completed(record_key)
        return None

    def _drop_completed(self, record_key: str) -> None:
        del self._completed[record_key]
        self._views.pop(record_key, None)

    def _holder(self, record_key: str, token: str) -> _Row | None:
        row = self._in_flight.get(record_key)
        return row if row is not None and row.token == token else None

    def complete_sync(self, scope: str, key: str, token: str, response: StoredResponse) -> bool:
        record_key = _record_key(scope, key)
        with self._lock:
            row = self._holder(record_key, token)
            if row is None:
                return False
            del self._in_flight[record_key]
            self._completed[record_key] = row.completed(response)
            return True

    def release_sync(self, scope: str, key: str, token: str) -> bool:
        record_key = _record_key(scope, key)
        with self._lock:
            if self._holder(record_key, token) is None:
                return False
            del self._in_flight[record_key]
            return True

    def renew_sync(self, scope: str, key: str, token: str, *, lease: float) -> bool:
        record_key = _record_key(scope, key)
        with self._lock:
            row = self._holder(record_key, token)
            now = self._clock()
            if row is None or row.expires_at <= now:
                return False
            row.lease_expires_at = now + lease
            return True

    def get_sync(self, scope: str, key: str) -> Record | None:
        record_key = _record_key(scope, key)
        with self._lock:
            now = self._clock()
            row = self._in_flight.get(record_key)
            if row is not None:
                return row.view(scope, key) if row.expires_at > now else None
            return self._live_completed(record_key, scope, key, now)

    def wait_sync(self, scope: str, key: str, timeout: float) -> Record | None:
        return poll_until_settled_sync(lambda: self.get_sync(scope, key), timeout)

    def purge_expired_sync(self) -> int:
        with self._lock:
            return self._purge_locked(self._clock())

    def _purge_locked(self, now: float) -> int:
        self._claims_since_purge = 0
        purged = 0
        for queue in self._expiry.values():
            for record_key in queue.pop_expired(now):
                # A key claimed again after expiry has a later entry; drop dead records only.
                row = self._in_flight.get(record_key)
                if row is not None:
                    if row.expires_at <= now:
                        del self._in_flight[record_key]
                        purged += 1
                elif (blob := self._completed.get(record_key)) is not None and (
                    _completed_expires_at(blob) <= now
                ):
                    self._drop_completed(record_key)
                    purged += 1
        for retention in [r for r, queue in self._expiry.items() if not queue]:
            del self._expiry[retention]
        return purged

    def stats_sync(self) -> StoreStats:
        with self._lock:
            now = self._clock()
            in_flight = completed = expired = 0
            oldest: float | None = None
            for row in self._in_flight.values():
                if row.expires_at <= now:
                    expired += 1
                else:
                    in_flight += 1
                    age = now - row.created_at
                    oldest = age if oldest is None else max(oldest, age)
            for blob in self._completed.values():
                if _completed_expires_at(blob) <= now:
                    expired += 1
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
