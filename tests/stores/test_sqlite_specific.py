"""What only the SQLite store does: the async operations of one event loop turn are
handed to the store's thread together and group-committed, one IMMEDIATE transaction per
batch; only completions then wait for an fsync (one per batch), never claims. The shared
contract suite covers the behaviour; these tests pin down the edges of batching (one key
claimed many times in one batch, a bad record in a batch, a close with operations still
queued), the fsyncs (when, of which file, after which commit), and expiry under the
store's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from oncely.core import Claimed, Existing, Record, RecordState, StoredResponse
from oncely.stores import sqlite as sqlite_module
from oncely.stores.base import StoreError
from oncely.stores.sqlite import SQLiteStore

FP = "f" * 32
OTHER_FP = "0" * 32
RESPONSE = StoredResponse(201, ((b"content-type", b"application/json"),), b'{"id": 1}')
T0 = 1_000_000.0

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "oncely.db", clock=clock)
    yield store
    store.close()


async def completed(store: SQLiteStore, key: str, *, retention: float = 60.0) -> None:
    claimed = await store.claim("s", key, FP, "t-" + key, lease=30.0, retention=retention)
    assert claimed == Claimed("t-" + key, 1)
    assert await store.complete("s", key, "t-" + key, RESPONSE)


async def test_a_replay_and_a_mismatch_report_the_completed_record(store: SQLiteStore) -> None:
    await completed(store, "k")
    for fingerprint in (FP, OTHER_FP):
        result = await store.claim("s", "k", fingerprint, "other", lease=30.0, retention=60.0)
        assert isinstance(result, Existing)
        assert result.record.state is RecordState.COMPLETED
        assert result.record.response == RESPONSE
        assert result.record.token == "t-k"
        assert result.now == T0


async def test_an_expired_completed_record_is_claimable(store: SQLiteStore, clock: Clock) -> None:
    await completed(store, "k", retention=10.0)
    clock.now = T0 + 10.0  # expires_at <= now: expired
    result = await store.claim("s", "k", FP, "fresh", lease=30.0, retention=60.0)
    assert result == Claimed("fresh", 1)
    record = await store.get("s", "k")
    assert record is not None
    assert record.state is RecordState.IN_FLIGHT
    assert record.token == "fresh"


def test_an_expired_completed_record_is_claimable_sync(store: SQLiteStore, clock: Clock) -> None:
    assert store.claim_sync("s", "k", FP, "t", lease=30.0, retention=10.0) == Claimed("t", 1)
    assert store.complete_sync("s", "k", "t", RESPONSE)
    clock.now = T0 + 10.0
    assert store.claim_sync("s", "k", FP, "fresh", lease=30.0, retention=60.0) == Claimed(
        "fresh", 1
    )


async def test_an_in_flight_record_is_kept_until_its_lease_lapses(
    store: SQLiteStore, clock: Clock
) -> None:
    assert await store.claim("s", "k", FP, "first", lease=30.0, retention=60.0) == Claimed(
        "first", 1
    )
    result = await store.claim("s", "k", FP, "second", lease=30.0, retention=60.0)
    assert isinstance(result, Existing)
    assert result.record.state is RecordState.IN_FLIGHT
    assert result.lease_remaining == 30.0
    clock.now = T0 + 30.0  # the lease lapsed: taken over
    result = await store.claim("s", "k", FP, "third", lease=30.0, retention=60.0)
    assert result == Claimed("third", 2, took_over=True)
    assert not await store.complete("s", "k", "first", RESPONSE)  # fenced out
    assert await store.complete("s", "k", "third", RESPONSE)


async def test_an_unreadable_record_fails_only_its_own_request(store: SQLiteStore) -> None:
    await completed(store, "k")
    db = store.connect()
    db.execute(f"UPDATE {sqlite_module.TABLE} SET response = x'ff00' WHERE key = 'k'")
    db.close()
    bad, good = await asyncio.gather(  # one batch: the other claim still commits
        store.claim("s", "k", FP, "other", lease=30.0, retention=60.0),
        store.claim("s", "fine", FP, "t", lease=30.0, retention=60.0),
        return_exceptions=True,
    )
    assert isinstance(bad, StoreError)
    assert good == Claimed("t", 1)
    with pytest.raises(StoreError):
        store.claim_sync("s", "k", FP, "other", lease=30.0, retention=60.0)
    record = store.get_sync("s", "fine")
    assert record is not None
    assert record.state is RecordState.IN_FLIGHT


async def test_a_completion_is_seen_by_the_next_claim_on_the_same_loop(
    store: SQLiteStore,
) -> None:
    for i in range(20):
        key = f"k{i}"
        assert await store.claim("s", key, FP, "t", lease=30.0, retention=60.0) == Claimed("t", 1)
        assert await store.complete("s", key, "t", RESPONSE)
        result = await store.claim("s", key, FP, "again", lease=30.0, retention=60.0)
        assert isinstance(result, Existing)
        assert result.record.state is RecordState.COMPLETED


async def test_a_completion_by_another_connection_is_seen(store: SQLiteStore) -> None:
    assert await store.claim("s", "k", FP, "t", lease=30.0, retention=60.0) == Claimed("t", 1)
    other = SQLiteStore(store.path, clock=store._clock)
    try:
        assert other.complete_sync("s", "k", "t", RESPONSE)  # another connection, as a process
    finally:
        other.close()
    await asyncio.sleep(0)  # a new loop turn
    result = await store.claim("s", "k", FP, "again", lease=30.0, retention=60.0)
    assert isinstance(result, Existing)
    assert result.record.state is RecordState.COMPLETED


async def test_simultaneous_claims_of_one_key_in_one_batch(store: SQLiteStore) -> None:
    results = await asyncio.gather(
        *(store.claim("s", "k", FP, f"t{i}", lease=30.0, retention=60.0) for i in range(40))
    )
    claimed = [r for r in results if isinstance(r, Claimed)]
    assert len(claimed) == 1
    others = [r for r in results if isinstance(r, Existing)]
    assert len(others) == 39
    assert all(r.record.token == claimed[0].token for r in others)


async def test_concurrent_requests_share_commits(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    commit: Callable[..., Any] = sqlite_module._commit

    def counting(db: sqlite3.Connection, batch: list[Any]) -> Any:
        batches.append(sum(len(pending) for _, pending in batch))
        return commit(db, batch)

    monkeypatch.setattr(sqlite_module, "_commit", counting)

    async def request(i: int) -> None:
        key = f"k{i}"
        assert await store.claim("s", key, FP, key, lease=30.0, retention=60.0) == Claimed(key, 1)
        assert await store.complete("s", key, key, RESPONSE)

    await asyncio.gather(*(request(i) for i in range(64)))
    assert sum(batches) == 128
    assert len(batches) < 64  # one turn's operations go together


async def test_operations_submitted_before_close_still_run(store: SQLiteStore) -> None:
    task = asyncio.create_task(store.claim("s", "k", FP, "t", lease=30.0, retention=60.0))
    await asyncio.sleep(0)  # the claim is submitted, not yet handed over
    store.close()
    assert await asyncio.wait_for(task, 5) == Claimed("t", 1)
    record = store.get_sync("s", "k")
    assert record is not None
    assert record.state is RecordState.IN_FLIGHT


class SyncSpy:
    """Records each fdatasync and what another connection sees committed at that moment."""

    def __init__(self, store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.store = store
        self.fds: list[int] = []
        self.completed_at_sync: list[int] = []
        real = os.fdatasync

        def spy(fd: int) -> None:
            self.fds.append(fd)
            other = sqlite3.connect(store.path)
            try:
                (count,) = other.execute(
                    f"SELECT COUNT(*) FROM {sqlite_module.TABLE} WHERE state = 1"
                ).fetchone()
            finally:
                other.close()
            self.completed_at_sync.append(count)
            real(fd)

        monkeypatch.setattr(os, "fdatasync", spy)


async def test_only_completions_wait_for_an_fsync_after_their_commit(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = SyncSpy(store, monkeypatch)
    keys = [f"k{i}" for i in range(10)]
    claims = await asyncio.gather(
        *(store.claim("s", k, FP, k, lease=30.0, retention=60.0) for k in keys)
    )
    assert claims == [Claimed(k, 1) for k in keys]
    assert spy.fds == []  # a claim lost to a power cut is re-run by the retry anyway
    assert all(await asyncio.gather(*(store.complete("s", k, k, RESPONSE) for k in keys)))
    assert 1 <= len(spy.fds) < len(keys)  # completions of one loop turn share one
    assert spy.completed_at_sync[-1] == len(keys)  # the fsync came after the commit
    wal = os.stat(f"{store.path}-wal")
    assert {(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in spy.fds} == {
        (wal.st_dev, wal.st_ino)
    }


def test_only_completions_wait_for_an_fsync_sync(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = SyncSpy(store, monkeypatch)
    assert store.claim_sync("s", "k", FP, "t", lease=30.0, retention=60.0) == Claimed("t", 1)
    assert store.renew_sync("s", "k", "t", lease=30.0)
    assert not store.complete_sync("s", "k", "not-the-holder", RESPONSE)
    assert spy.fds == []
    assert store.complete_sync("s", "k", "t", RESPONSE)
    assert spy.completed_at_sync == [1]


async def test_synchronous_normal_never_waits_for_an_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SQLiteStore(tmp_path / "normal.db", synchronous="NORMAL")
    spy = SyncSpy(store, monkeypatch)
    try:
        await completed(store, "k")
        assert store.claim_sync("s", "j", FP, "t", lease=30.0, retention=60.0) == Claimed("t", 1)
        assert store.complete_sync("s", "j", "t", RESPONSE)
    finally:
        store.close()
    assert spy.fds == []


def test_connections_for_transactional_completion_keep_full_durability(
    store: SQLiteStore,
) -> None:
    connection = store.connect()
    try:
        (level,) = connection.execute("PRAGMA synchronous").fetchone()
    finally:
        connection.close()
    assert level == 2  # FULL: the app's own commit carries the completion


async def test_a_failed_fsync_fails_the_completion(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert await store.claim("s", "k", FP, "t", lease=30.0, retention=60.0) == Claimed("t", 1)
    assert store.claim_sync("s", "j", FP, "t", lease=30.0, retention=60.0) == Claimed("t", 1)

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(StoreError, match="Input/output error"):
        await store.complete("s", "k", "t", RESPONSE)
    with pytest.raises(StoreError, match="fsync"):
        store.complete_sync("s", "j", "t", RESPONSE)


async def test_claims_do_not_queue_behind_a_completions_fsync(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = threading.Event()  # a slow disk: the fsync returns when the test lets it
    real = os.fdatasync

    def slow(fd: int) -> None:
        disk.wait(5)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow)
    try:
        assert await store.claim("s", "k", FP, "t", lease=30.0, retention=60.0) == Claimed("t", 1)
        completion = asyncio.create_task(store.complete("s", "k", "t", RESPONSE))
        await asyncio.sleep(0.05)  # committed; its fsync hangs
        claimed = store.claim("s", "j", FP, "u", lease=30.0, retention=60.0)
        assert await asyncio.wait_for(claimed, 2) == Claimed("u", 1)
        assert not completion.done()  # not reported before it is durable
    finally:
        disk.set()
    assert await asyncio.wait_for(completion, 5)


def test_threads_racing_to_set_up_a_new_file_all_get_an_answer(tmp_path: Path) -> None:
    """Switching a new file to WAL needs an exclusive lock, and SQLite answers a racing
    connection "database is locked" at once, without its busy handler."""
    errors: list[BaseException] = []
    for attempt in range(50):  # the race is narrow: about one file in 40 hit it before
        store = SQLiteStore(tmp_path / f"new-{attempt}.db")
        barrier = threading.Barrier(20)

        def first_claim(store: SQLiteStore = store, barrier: threading.Barrier = barrier) -> None:
            barrier.wait(timeout=10)
            try:
                store.claim_sync("s", "k", FP, "t", lease=30.0, retention=60.0)
            except StoreError as error:
                errors.append(error)

        threads = [threading.Thread(target=first_claim) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        store.close()
    assert errors == []


def table_sql(path: Path) -> str:
    with contextlib.closing(sqlite3.connect(path)) as db:
        row = db.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?",
            (sqlite_module.TABLE,),
        ).fetchone()
    sql: str = row[0]
    return sql


def test_a_new_file_keeps_records_in_claim_order_and_keys_in_an_index(tmp_path: Path) -> None:
    """A rowid table: random keys (UUIDs) write one page of the key index per claim,
    not a random page of the whole table at the claim and again at the completion."""
    store = SQLiteStore(tmp_path / "new.db")
    try:
        store.claim_sync("s", "k", FP, "t", lease=30.0, retention=60.0)
    finally:
        store.close()
    sql = table_sql(tmp_path / "new.db")
    assert "PRIMARY KEY (scope, key)" in sql
    assert "WITHOUT ROWID" not in sql


def test_a_file_made_with_a_without_rowid_table_keeps_working(tmp_path: Path, clock: Clock) -> None:
    """Files made by earlier versions keep their WITHOUT ROWID table: every statement
    runs on either layout, so nothing is migrated."""
    path = tmp_path / "earlier.db"
    earlier = sqlite_module.SCHEMA.replace(
        "PRIMARY KEY (scope, key)\n);", "PRIMARY KEY (scope, key)\n) WITHOUT ROWID;"
    )
    assert earlier != sqlite_module.SCHEMA
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(earlier)
    store = SQLiteStore(path, clock=clock)
    try:
        assert store.claim_sync("s", "k", FP, "t", lease=30.0, retention=60.0) == Claimed("t", 1)
        assert store.complete_sync("s", "k", "t", RESPONSE)
        replay = store.claim_sync("s", "k", FP, "u", lease=30.0, retention=60.0)
        assert isinstance(replay, Existing)
        assert replay.record.state is RecordState.COMPLETED
        assert replay.record.response == RESPONSE
        assert store.claim_sync("s", "j", FP, "v", lease=30.0, retention=60.0) == Claimed("v", 1)
        assert store.release_sync("s", "j", "v")
        clock.now += 61.0
        assert store.stats_sync().expired == 1
        assert store.purge_expired_sync() == 1
        assert store.get_sync("s", "k") is None
    finally:
        store.close()
    assert "WITHOUT ROWID" in table_sql(path)


# replays kept in the process ----------------------------------------------------------


def refuse_the_file(store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, any operation that reaches the file or the store's thread fails."""

    def refused(*args: object, **kwargs: object) -> object:
        raise AssertionError("the replay reached the file")

    monkeypatch.setattr(store, "_submit", refused)
    monkeypatch.setattr(store, "_run", refused)


async def test_a_repeated_replay_is_answered_in_the_process(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await completed(store, "k")
    first = await store.claim("s", "k", FP, "u", lease=30.0, retention=60.0)
    assert isinstance(first, Existing)
    refuse_the_file(store, monkeypatch)
    again = await store.claim("s", "k", FP, "v", lease=30.0, retention=60.0)
    assert again == first
    mismatch = store.claim_sync("s", "k", OTHER_FP, "w", lease=30.0, retention=60.0)
    assert isinstance(mismatch, Existing)
    assert mismatch.record == first.record  # the core tells the mismatch, as from the file


def test_a_repeated_replay_is_answered_in_the_process_sync(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.claim_sync("s", "k", FP, "t", lease=30.0, retention=60.0)
    assert store.complete_sync("s", "k", "t", RESPONSE)
    first = store.claim_sync("s", "k", FP, "u", lease=30.0, retention=60.0)
    refuse_the_file(store, monkeypatch)
    assert store.claim_sync("s", "k", FP, "v", lease=30.0, retention=60.0) == first


async def test_a_kept_replay_expires_with_its_record(store: SQLiteStore, clock: Clock) -> None:
    await completed(store, "k", retention=60.0)
    assert isinstance(await store.claim("s", "k", FP, "u", lease=30.0, retention=60.0), Existing)
    clock.now += 60.0
    claimed = await store.claim("s", "k", OTHER_FP, "v", lease=30.0, retention=60.0)
    assert claimed == Claimed("v", 1)
    assert await store.complete("s", "k", "v", RESPONSE)
    replay = await store.claim("s", "k", OTHER_FP, "w", lease=30.0, retention=60.0)
    assert isinstance(replay, Existing)
    assert replay.record.fingerprint == OTHER_FP  # the new record, not the one kept before


async def test_in_flight_records_are_not_kept(store: SQLiteStore) -> None:
    assert await store.claim("s", "k", FP, "t", lease=30.0, retention=60.0) == Claimed("t", 1)
    in_flight = await store.claim("s", "k", FP, "u", lease=30.0, retention=60.0)
    assert isinstance(in_flight, Existing)
    assert in_flight.record.state is RecordState.IN_FLIGHT
    assert await store.complete("s", "k", "t", RESPONSE)
    replay = await store.claim("s", "k", FP, "v", lease=30.0, retention=60.0)
    assert isinstance(replay, Existing)
    assert replay.record.state is RecordState.COMPLETED


async def test_a_replay_in_another_process_sees_the_same_record(tmp_path: Path) -> None:
    """Two stores on one file, as two workers: each keeps what its own claims found."""
    one, two = SQLiteStore(tmp_path / "shared.db"), SQLiteStore(tmp_path / "shared.db")
    try:
        await completed(one, "k")
        records: list[Record] = []
        for store in (one, two, one, two):  # each store's first claim reads the file
            replay = await store.claim("s", "k", FP, "u", lease=30.0, retention=60.0)
            assert isinstance(replay, Existing)
            records.append(replay.record)
        assert records[1:] == records[:1] * 3
    finally:
        one.close()
        two.close()


def record_with_body(key: str, size: int) -> Record:
    response = StoredResponse(200, ((b"content-type", b"text/plain"),), b"x" * size)
    return Record("s", key, FP, RecordState.COMPLETED, "t", 1, T0, T0 + 60.0, None, response)


def test_the_replay_cache_keeps_within_its_count_and_byte_budgets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sqlite_module, "REPLAYS_KEPT", 3)
    cache = sqlite_module.ReplayCache()
    for index in range(5):
        cache.keep(record_with_body(f"k{index}", 10))
    assert len(cache) == 3
    assert cache.live("s", "k0", T0) is None  # oldest first out
    assert cache.live("s", "k4", T0) is not None

    monkeypatch.setattr(sqlite_module, "REPLAYS_KEPT", 1000)
    monkeypatch.setattr(sqlite_module, "REPLAY_BYTES_KEPT", 64 * 100)
    cache = sqlite_module.ReplayCache()
    cache.keep(record_with_body("large", 101))  # over a 64th of the budget: never kept
    assert len(cache) == 0
    for index in range(100):
        cache.keep(record_with_body(f"k{index}", 70))  # 92 bytes with the header
    assert len(cache) == 6400 // 92  # 92 bytes each, as many as fit in 6,400
    assert cache.live("s", "k99", T0) is not None
    assert cache.live("s", "k99", T0 + 60.0) is None  # expired: dropped
    assert len(cache) == 6400 // 92 - 1
