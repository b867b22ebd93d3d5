"""What the shared contract can not see in the PostgreSQL store: round trips on the wire,
LISTEN/NOTIFY wakeups, failing fast, the purge index, the sweeper, completion inside the
caller's transaction, and records that survive a restart (on a private cluster).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import pq, sql
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from oncely.core import Claimed, ClaimResult, Existing, RecordState, StoredResponse
from oncely.stores import StoreError, store_from_url
from oncely.stores.postgres import PostgresStore, _AsyncListener, _SyncListener, wake_payload
from tests.support.postgres_fixtures import PrivatePostgres, drop_table, unique_table
from tests.support.servers import free_port

pytestmark = pytest.mark.services

FP = "f" * 32
RESPONSE = StoredResponse(201, ((b"content-type", b"application/json"),), b'{"id": 1}')
CONN_KWARGS: dict[str, Any] = {"autocommit": True, "prepare_threshold": 0}


@pytest.fixture
def sync_store(postgres_url: str, postgres_table: str) -> Iterator[PostgresStore]:
    store = PostgresStore(postgres_url, table=postgres_table)
    yield store
    store.close()


def raw(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True, connect_timeout=5)


def count_rows(url: str, table: str) -> int:
    with raw(url) as conn:
        row = conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()
    assert row is not None
    return int(row[0])


# Round trips, counted on the wire ------------------------------------------------------


class WireTrace:
    """libpq's protocol trace of every pooled connection: one ReadyForQuery per round trip."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = path.open("w")
        self.connections: list[Any] = []

    def attach(self, conn: Any) -> None:
        self.connections.append(conn)
        self._trace(conn)

    def _trace(self, conn: Any) -> None:
        conn.pgconn.trace(self.file.fileno())
        conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)

    def round_trips(self) -> int:
        """Round trips since the last call (untracing flushes libpq's buffer)."""
        for conn in self.connections:
            conn.pgconn.untrace()
        text = self.path.read_text()
        self.path.write_text("")
        for conn in self.connections:
            self._trace(conn)
        return sum(1 for line in text.splitlines() if "\tReadyForQuery" in line)

    def close(self) -> None:
        for conn in self.connections:
            conn.pgconn.untrace()
        self.file.close()


@pytest.mark.anyio
async def test_async_fresh_request_is_two_round_trips_and_a_replay_one(
    postgres_url: str, postgres_table: str, tmp_path: Path
) -> None:
    trace = WireTrace(tmp_path / "wire.log")

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        await PostgresStore.configure(conn)  # as the store's docs ask of a pool passed in
        trace.attach(conn)

    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        postgres_url, kwargs=CONN_KWARGS, min_size=1, max_size=1, open=False, configure=configure
    )
    await pool.open(wait=True, timeout=10)
    store = PostgresStore(pool, table=postgres_table)
    try:
        # Warm up: schema check, and the first use of each statement prepares it.
        await store.claim("s", "warm", FP, "w", lease=30, retention=60)
        await store.complete("s", "warm", "w", RESPONSE)
        await store.claim("s", "warm", FP, "w2", lease=30, retention=60)
        trace.round_trips()

        assert await store.claim("s", "k", FP, "t", lease=30, retention=60) == Claimed("t", 1)
        assert await store.complete("s", "k", "t", RESPONSE)
        assert trace.round_trips() == 2

        before = xmin_xmax(postgres_url, postgres_table, "s", "k")
        replay = await store.claim("s", "k", FP, "t2", lease=30, retention=60)
        assert isinstance(replay, Existing)
        assert replay.record.response == RESPONSE
        assert trace.round_trips() == 1
        # A replay is a pure read: no new row version, not even a row lock.
        assert xmin_xmax(postgres_url, postgres_table, "s", "k") == before
        assert before[1] == "0"
        async with pool.connection() as conn:
            cur = await conn.execute("SHOW enable_seqscan")
            assert await cur.fetchone() == ("off",)
    finally:
        trace.close()
        await store.aclose()
        assert not pool.closed  # a pool passed in stays the caller's
        await pool.close()


def test_sync_fresh_request_is_two_round_trips_and_a_replay_one(
    postgres_url: str, postgres_table: str, tmp_path: Path
) -> None:
    trace = WireTrace(tmp_path / "wire.log")

    def configure(conn: psycopg.Connection[Any]) -> None:
        PostgresStore.configure_sync(conn)
        trace.attach(conn)

    pool: ConnectionPool[Any] = ConnectionPool(
        postgres_url, kwargs=CONN_KWARGS, min_size=1, max_size=1, open=False, configure=configure
    )
    pool.open(wait=True, timeout=10)
    store = PostgresStore(pool, table=postgres_table)
    try:
        store.claim_sync("s", "warm", FP, "w", lease=30, retention=60)
        store.complete_sync("s", "warm", "w", RESPONSE)
        store.claim_sync("s", "warm", FP, "w2", lease=30, retention=60)
        trace.round_trips()

        assert store.claim_sync("s", "k", FP, "t", lease=30, retention=60) == Claimed("t", 1)
        assert store.complete_sync("s", "k", "t", RESPONSE)
        assert trace.round_trips() == 2
        assert isinstance(store.claim_sync("s", "k", FP, "t2", lease=30, retention=60), Existing)
        assert trace.round_trips() == 1
    finally:
        trace.close()
        store.close()
        pool.close()


def xmin_xmax(url: str, table: str, scope: str, key: str) -> tuple[str, str]:
    with raw(url) as conn:
        row = conn.execute(
            f'SELECT xmin::text, xmax::text FROM "{table}" WHERE scope = %s AND key = %s',
            (scope, key),
        ).fetchone()
    assert row is not None
    return row[0], row[1]


# Races the contract does not cover -------------------------------------------------------


@pytest.mark.anyio
async def test_exactly_one_takes_over_a_lapsed_lease(postgres_store: PostgresStore) -> None:
    await postgres_store.claim("s", "k", FP, "dead", lease=0.2, retention=60)
    await asyncio.sleep(0.3)
    results = await asyncio.gather(
        *(postgres_store.claim("s", "k", FP, f"t{i}", lease=30, retention=60) for i in range(20))
    )
    claimed = [r for r in results if isinstance(r, Claimed)]
    assert len(claimed) == 1
    assert claimed[0].took_over
    assert claimed[0].attempt == 2


@pytest.mark.anyio
async def test_exactly_one_reclaims_an_expired_record(postgres_store: PostgresStore) -> None:
    await postgres_store.claim("s", "k", FP, "old", lease=30, retention=0.2)
    assert await postgres_store.complete("s", "k", "old", RESPONSE)
    await asyncio.sleep(0.3)
    results = await asyncio.gather(
        *(postgres_store.claim("s", "k", FP, f"t{i}", lease=30, retention=60) for i in range(20))
    )
    claimed = [r for r in results if isinstance(r, Claimed)]
    assert claimed == [Claimed(claimed[0].token, 1)]
    existing = [r for r in results if isinstance(r, Existing)]
    assert all(r.record.token == claimed[0].token and r.record.response is None for r in existing)


# Concurrent calls share statements (claims and completions grouped over arrays) ---------


async def warm(store: PostgresStore) -> None:
    """Pool open, schema checked: from here on a lone call suspends only on the wire."""
    await store.claim("s", "warm", FP, "w", lease=30, retention=60)
    assert await store.complete("s", "warm", "w", RESPONSE)


@pytest.mark.anyio
async def test_concurrent_claims_share_statements_and_stay_exact(
    postgres_store: PostgresStore,
) -> None:
    await warm(postgres_store)
    keys = [f"k{i}" for i in range(8)]
    calls = [(key, f"t{n}-{key}") for n in range(4) for key in keys]  # each key 4 times
    results = await asyncio.gather(
        *(postgres_store.claim("s", key, FP, token, lease=30, retention=60) for key, token in calls)
    )
    winners: dict[str, str] = {}
    for (key, token), result in zip(calls, results, strict=True):
        if isinstance(result, Claimed):
            assert key not in winners
            assert result == Claimed(token, 1)
            winners[key] = token
    assert sorted(winners) == keys
    for (key, _), result in zip(calls, results, strict=True):
        if isinstance(result, Existing):
            assert result.record.state is RecordState.IN_FLIGHT
            assert result.record.token == winners[key]
    # The first call ran alone; the 31 that queued behind it went out grouped, each
    # statement holding a key at most once: 4 statements (8 + 8 + 8 + 7), not 31.
    claims = postgres_store._claims
    assert (claims.statements, claims.grouped) == (4, 31)

    # Every caller completes with its own token: only the 8 lease holders succeed.
    done = await asyncio.gather(
        *(postgres_store.complete("s", key, token, RESPONSE) for key, token in calls)
    )
    assert {calls[i] for i, ok in enumerate(done) if ok} == set(winners.items())
    assert postgres_store._completions.grouped == 31

    replays = await asyncio.gather(
        *(postgres_store.claim("s", key, FP, "again", lease=30, retention=60) for key in keys)
    )
    for replay in replays:
        assert isinstance(replay, Existing)
        assert replay.record.state is RecordState.COMPLETED
        assert replay.record.response == RESPONSE


async def six_claimed(store: PostgresStore) -> list[str]:
    """Six in-flight records, k0 to k5, each with the token "t" + its key."""
    await warm(store)
    keys = [f"k{i}" for i in range(6)]
    for key in keys:
        await store.claim("s", key, FP, "t" + key, lease=30, retention=60)
    return keys


@pytest.mark.anyio
async def test_grouped_completion_notifies_only_marked_records(
    postgres_store: PostgresStore, postgres_url: str, postgres_table: str
) -> None:
    keys = await six_claimed(postgres_store)
    with raw(postgres_url) as conn:  # what a waiter's check does to its record
        conn.execute(
            f'UPDATE "{postgres_table}" SET waiting = true WHERE key = ANY(%s)', (["k2", "k4"],)
        )
    listener = await psycopg.AsyncConnection.connect(postgres_url, autocommit=True)
    try:
        await listener.execute(
            psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(postgres_store.sql.channel))
        )
        done = await asyncio.gather(
            *(postgres_store.complete("s", key, "t" + key, RESPONSE) for key in keys)
        )
        assert done == [True] * 6
        assert postgres_store._completions.grouped == 5
        heard = {n.payload async for n in listener.notifies(timeout=0.5)}
        assert heard == {wake_payload("s", "k2"), wake_payload("s", "k4")}
    finally:
        await listener.close()


@pytest.mark.anyio
async def test_grouped_completion_of_a_purged_record_is_refused_and_leaves_none(
    postgres_store: PostgresStore, postgres_url: str, postgres_table: str
) -> None:
    keys = await six_claimed(postgres_store)
    with raw(postgres_url) as conn:  # its lease lapsed, it expired, a purge removed it
        conn.execute(f'DELETE FROM "{postgres_table}" WHERE key = %s', ("k3",))
    done = await asyncio.gather(
        *(postgres_store.complete("s", key, "t" + key, RESPONSE) for key in keys)
    )
    assert done == [key != "k3" for key in keys]
    assert postgres_store._completions.grouped == 5
    assert await postgres_store.get("s", "k3") is None
    assert (await postgres_store.stats()).completed == 6  # warm and five: no sixth record
    assert await postgres_store.claim("s", "k3", FP, "new", lease=30, retention=60) == Claimed(
        "new", 1
    )
    assert await postgres_store.complete("s", "k3", "new", RESPONSE)


@pytest.mark.anyio
async def test_grouped_claims_take_an_infinite_retention(postgres_store: PostgresStore) -> None:
    # JSON has no number for infinity: the calls' document carries it as text.
    await warm(postgres_store)
    claims = await asyncio.gather(
        *(
            postgres_store.claim("s", f"k{i}", FP, f"t{i}", lease=30, retention=math.inf)
            for i in range(4)
        )
    )
    assert claims == [Claimed(f"t{i}", 1) for i in range(4)]
    assert postgres_store._claims.grouped == 3
    record = await postgres_store.get("s", "k2")
    assert record is not None
    assert record.expires_at == math.inf


@pytest.mark.anyio
async def test_a_failed_group_fails_each_caller_and_a_cancelled_one_is_not_sent(
    postgres_store: PostgresStore,
) -> None:
    await warm(postgres_store)
    sql = postgres_store.sql

    def claim(key: str) -> asyncio.Task[ClaimResult]:
        return asyncio.create_task(postgres_store.claim("s", key, FP, "t", lease=30, retention=60))

    # Cancelled while queued: the others go ahead, the cancelled claim is never sent.
    tasks = [claim(f"c{i}") for i in range(5)]
    await asyncio.sleep(0)  # all five started: the first is on the wire, four queued
    tasks[2].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[2], asyncio.CancelledError)
    assert all(isinstance(results[i], Claimed) for i in (0, 1, 3, 4))
    assert await postgres_store.get("s", "c2") is None

    # A grouped statement that fails: each of its callers gets its own StoreError.
    postgres_store.sql = dataclasses.replace(sql, claim_many="SELECT broken FROM nowhere")
    try:
        results = await asyncio.gather(*(claim(f"e{i}") for i in range(4)), return_exceptions=True)
    finally:
        postgres_store.sql = sql
    assert isinstance(results[0], Claimed)  # ran alone, on the single-record statement
    errors = results[1:]
    assert all(isinstance(error, StoreError) for error in errors)
    assert len({id(error) for error in errors}) == 3
    assert await postgres_store.get("s", "e1") is None


# Plans: every statement finds records by the primary key, whatever the statistics say ----

STATEMENT_PARAMS: dict[str, dict[str, Any]] = {
    "claim": {"scope": "s", "key": "k", "fingerprint": FP, "token": "t", "lease": 30.0,
              "retention": 60.0},
    "claim_many": {"calls": '[["s","k","f","t",30.0,60.0],["s","l","f","t",30.0,60.0]]'},
    "complete": {"scope": "s", "key": "k", "token": "t", "response": b"r"},
    "complete_many": {"calls": '[["s","k","t","72"],["s","l","t","72"]]'},
    "release": {"scope": "s", "key": "k", "token": "t"},
    "renew": {"scope": "s", "key": "k", "token": "t", "lease": 30.0},
    "get": {"scope": "s", "key": "k"},
    "wait_check": {"scope": "s", "key": "k"},
}  # fmt: skip


def generic_plan(
    conn: psycopg.Connection[Any], name: str, text: str, params: dict[str, Any]
) -> str:
    """The plan PostgreSQL keeps for a prepared statement once it goes generic."""
    names = list(dict.fromkeys(re.findall(r"%\((\w+)\)s", text)))
    for position, param in enumerate(names, 1):
        text = text.replace(f"%({param})s", f"${position}")
    conn.execute(sql.SQL(f"PREPARE {name} AS {text}"))
    arguments = sql.SQL(", ").join(sql.Literal(params[param]) for param in names)
    explain = sql.SQL(f"EXPLAIN EXECUTE {name}({{}})").format(arguments)
    return "\n".join(str(row[0]) for row in conn.execute(explain).fetchall())


def test_plans_made_on_an_empty_table_read_records_by_the_primary_key(
    postgres_url: str, postgres_table: str
) -> None:
    # Statements are prepared, and PostgreSQL keeps the generic plan it made from the
    # statistics of the moment: on a table analysed while empty, a sequential scan or a hash
    # join, which then reads the whole table on every claim as it grows.
    store = PostgresStore(postgres_url, table=postgres_table)
    try:
        store.init_schema_sync()
        with raw(postgres_url) as admin:
            admin.execute(f'ANALYZE "{postgres_table}"')
        assert store.stats_sync().completed == 0  # it scans the whole table, in its own transaction
        with store._sync_pool().connection() as conn:
            assert conn.execute("SHOW enable_seqscan").fetchone() == ("off",)
            conn.execute("SET plan_cache_mode = force_generic_plan")
            for name, params in STATEMENT_PARAMS.items():
                plan = generic_plan(conn, name, getattr(store.sql, name), params)
                lines = plan.splitlines()
                scans = [n for n, line in enumerate(lines) if f"on {postgres_table}" in line
                         and "Scan" in line]  # fmt: skip
                if not scans:  # it reads through INSERT ... ON CONFLICT alone
                    assert f"Conflict Arbiter Indexes: {postgres_table}_pkey" in plan, plan
                for n in scans:  # an index scan of the primary key, on both its columns
                    assert f"Index Scan using {postgres_table}_pkey" in lines[n], plan
                    assert "Index Cond: ((scope = " in lines[n + 1], plan
                    assert "(key = " in lines[n + 1], plan
                assert "Hash Join" not in plan, plan
                assert "Merge Join" not in plan, plan
    finally:
        store.close()


def test_schema_creation_is_safe_from_many_processes_at_once(
    postgres_url: str, postgres_table: str
) -> None:
    stores = [PostgresStore(postgres_url, table=postgres_table) for _ in range(4)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(stores))

    def init(store: PostgresStore) -> None:
        try:
            barrier.wait(timeout=10)
            store.init_schema_sync()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=init, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for store in stores:
        store.close()
    assert errors == []
    assert count_rows(postgres_url, postgres_table) == 0


# Waiting: LISTEN/NOTIFY, and polling when LISTEN is not available -------------------------


@pytest.mark.anyio
async def test_waiters_wake_on_notify_not_by_polling(
    postgres_store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks = count_calls(monkeypatch, postgres_store, "_wait_check")
    await postgres_store.claim("s", "k", FP, "t", lease=30, retention=60)
    completed_at = 0.0

    async def waiter() -> float:
        record = await postgres_store.wait("s", "k", timeout=10)
        assert record is not None
        assert record.state is RecordState.COMPLETED
        return time.monotonic()

    async def complete_later() -> None:
        nonlocal completed_at
        await asyncio.sleep(1.3)  # past the first re-check, deep into a poller's backoff
        assert await postgres_store.complete("s", "k", "t", RESPONSE)
        completed_at = time.monotonic()

    completer = asyncio.create_task(complete_later())
    woken = await asyncio.gather(*(waiter() for _ in range(5)))
    await completer
    assert max(woken) - completed_at < 0.25
    # A waiter reads the record at start, once a second, and on the wakeup (plus a quick
    # retry or two when another waiter held the row while marking it); polling with
    # backoff would have read it about eleven times each in these 1.3 s.
    assert checks[0] <= 5 * 5


def test_sync_waiters_wake_on_notify_not_by_polling(
    sync_store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks = count_calls(monkeypatch, sync_store, "_wait_check_sync")
    sync_store.claim_sync("s", "k", FP, "t", lease=30, retention=60)
    woken: list[float] = []

    def waiter() -> None:
        record = sync_store.wait_sync("s", "k", timeout=10)
        assert record is not None
        assert record.state is RecordState.COMPLETED
        woken.append(time.monotonic())

    threads = [threading.Thread(target=waiter) for _ in range(5)]
    for thread in threads:
        thread.start()
    time.sleep(1.3)
    assert sync_store.complete_sync("s", "k", "t", RESPONSE)
    completed_at = time.monotonic()
    for thread in threads:
        thread.join(timeout=10)
    assert len(woken) == 5
    assert max(woken) - completed_at < 0.25
    assert checks[0] <= 5 * 5


@pytest.mark.anyio
async def test_release_wakes_waiters_with_none(postgres_store: PostgresStore) -> None:
    await postgres_store.claim("s", "k", FP, "t", lease=30, retention=60)

    async def release_later() -> float:
        await asyncio.sleep(0.3)
        assert await postgres_store.release("s", "k", "t")
        return time.monotonic()

    started = time.monotonic()
    record, released_at = await asyncio.gather(
        postgres_store.wait("s", "k", timeout=10), release_later()
    )
    assert record is None
    assert time.monotonic() - released_at < 0.25
    assert time.monotonic() - started < 1


@pytest.mark.anyio
async def test_completion_without_waiters_sends_no_notify(
    postgres_store: PostgresStore, postgres_url: str
) -> None:
    listener = await psycopg.AsyncConnection.connect(postgres_url, autocommit=True)
    try:
        await listener.execute(
            psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(postgres_store.sql.channel))
        )
        await postgres_store.claim("s", "k", FP, "t", lease=30, retention=60)
        assert await postgres_store.complete("s", "k", "t", RESPONSE)
        heard = [n async for n in listener.notifies(timeout=0.3)]
        assert heard == []
    finally:
        await listener.close()


@pytest.mark.anyio
async def test_wait_polls_when_listen_fails(
    postgres_store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(*args: object) -> _AsyncListener:
        raise psycopg.OperationalError("LISTEN refused for the test")

    monkeypatch.setattr(_AsyncListener, "start", refuse)
    await postgres_store.claim("s", "k", FP, "t", lease=30, retention=60)

    async def complete_later() -> None:
        await asyncio.sleep(0.2)
        assert await postgres_store.complete("s", "k", "t", RESPONSE)

    record, _ = await asyncio.gather(postgres_store.wait("s", "k", timeout=5), complete_later())
    assert record is not None
    assert record.state is RecordState.COMPLETED


def test_sync_wait_polls_when_listen_fails(
    sync_store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object) -> None:
        raise psycopg.OperationalError("LISTEN refused for the test")

    monkeypatch.setattr(_SyncListener, "__init__", refuse)
    sync_store.claim_sync("s", "k", FP, "t", lease=30, retention=60)
    timer = threading.Timer(0.2, lambda: sync_store.complete_sync("s", "k", "t", RESPONSE))
    timer.start()
    record = sync_store.wait_sync("s", "k", timeout=5)
    timer.join()
    assert record is not None
    assert record.state is RecordState.COMPLETED


def count_calls(monkeypatch: pytest.MonkeyPatch, store: PostgresStore, name: str) -> list[int]:
    calls = [0]
    original: Callable[..., Any] = getattr(store, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(store, name, counted)
    return calls


# Failing fast ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_unreachable_server_raises_store_error_within_the_timeout() -> None:
    store = PostgresStore(f"postgresql://postgres@127.0.0.1:{free_port()}/test", timeout=1.0)
    try:
        started = time.monotonic()
        with pytest.raises(StoreError):
            await store.claim("s", "k", FP, "t", lease=30, retention=60)
        assert time.monotonic() - started < 3
        started = time.monotonic()
        with pytest.raises(StoreError):
            store.get_sync("s", "k")
        assert time.monotonic() - started < 3
    finally:
        await store.aclose()


# Purge and the sweeper -----------------------------------------------------------------


def test_purge_uses_the_expiry_index_in_bounded_batches(
    postgres_url: str, postgres_table: str
) -> None:
    store = PostgresStore(postgres_url, table=postgres_table, purge_batch=20)
    try:
        store.init_schema_sync()
        with raw(postgres_url) as conn:
            now = "extract(epoch FROM now())"
            conn.execute(
                f'INSERT INTO "{postgres_table}" (scope, key, fingerprint, state, token, attempts,'
                f" created_at, expires_at) SELECT 's', 'live-' || g, 'f', 1, 't', 1, {now},"
                f" {now} + 3600 + g FROM generate_series(1, 20000) AS g"
            )
            conn.execute(
                f'INSERT INTO "{postgres_table}" (scope, key, fingerprint, state, token, attempts,'
                f" created_at, expires_at) SELECT 's', 'old-' || g, 'f', 1, 't', 1, {now} - 7200,"
                f" {now} - 3600 FROM generate_series(1, 50) AS g"
            )
            conn.execute(f'ANALYZE "{postgres_table}"')
            plan = "\n".join(
                str(row[0])
                for row in conn.execute("EXPLAIN " + store.sql.purge, {"batch": 20}).fetchall()
            )
        assert f"{postgres_table}_expires_at_idx" in plan, plan
        assert "Seq Scan" not in plan, plan
        assert store.purge_expired_sync() == 50
        assert count_rows(postgres_url, postgres_table) == 20000
        assert store.stats_sync().expired == 0
    finally:
        store.close()


@pytest.mark.anyio
async def test_async_sweeper_purges_in_the_background(
    postgres_url: str, postgres_table: str
) -> None:
    store = PostgresStore(postgres_url, table=postgres_table, sweep_interval=0.2)
    try:
        for index in range(3):
            await store.claim("s", f"k{index}", FP, "t", lease=30, retention=0.1)
        await store.claim("s", "live", FP, "t", lease=30, retention=60)
        assert await eventually_async(lambda: count_rows(postgres_url, postgres_table) == 1)
    finally:
        await store.aclose()
    assert store._sweeper_task is None


def test_sweeper_thread_purges_in_the_background(
    sync_store: PostgresStore, postgres_url: str, postgres_table: str
) -> None:
    for index in range(3):
        sync_store.claim_sync("s", f"k{index}", FP, "t", lease=30, retention=0.1)
    sync_store.claim_sync("s", "live", FP, "t", lease=30, retention=60)
    sync_store.start_sweeper(0.2)  # no running loop here: a thread
    deadline = time.monotonic() + 5
    while count_rows(postgres_url, postgres_table) > 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert count_rows(postgres_url, postgres_table) == 1


async def eventually_async(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


# Completion inside the caller's transaction ------------------------------------------------


def test_completion_commits_with_the_callers_transaction(
    sync_store: PostgresStore, postgres_url: str
) -> None:
    sync_store.claim_sync("s", "k", FP, "t", lease=30, retention=60)
    with psycopg.connect(postgres_url) as conn:  # not autocommit: a transaction
        assert sync_store.complete_in_transaction_sync(conn, "s", "k", "t", RESPONSE)
        record = sync_store.get_sync("s", "k")  # another connection: not yet visible
        assert record is not None
        assert record.state is RecordState.IN_FLIGHT
        conn.commit()
    record = sync_store.get_sync("s", "k")
    assert record is not None
    assert record.state is RecordState.COMPLETED
    assert record.response == RESPONSE


def test_rolled_back_completion_leaves_the_claim_untouched(
    sync_store: PostgresStore, postgres_url: str
) -> None:
    sync_store.claim_sync("s", "k", FP, "t", lease=30, retention=60)
    with psycopg.connect(postgres_url) as conn:
        assert not sync_store.complete_in_transaction_sync(conn, "s", "k", "intruder", RESPONSE)
        assert sync_store.complete_in_transaction_sync(conn, "s", "k", "t", RESPONSE)
        conn.rollback()
    record = sync_store.get_sync("s", "k")
    assert record is not None
    assert record.state is RecordState.IN_FLIGHT
    assert record.token == "t"
    assert sync_store.complete_sync("s", "k", "t", RESPONSE)


@pytest.mark.anyio
async def test_async_completion_in_transaction(
    postgres_store: PostgresStore, postgres_url: str
) -> None:
    await postgres_store.claim("s", "a", FP, "ta", lease=30, retention=60)
    await postgres_store.claim("s", "b", FP, "tb", lease=30, retention=60)
    async with await psycopg.AsyncConnection.connect(postgres_url) as conn:
        assert await postgres_store.complete_in_transaction(conn, "s", "a", "ta", RESPONSE)
        await conn.commit()
        assert await postgres_store.complete_in_transaction(conn, "s", "b", "tb", RESPONSE)
        await conn.rollback()
    a = await postgres_store.get("s", "a")
    b = await postgres_store.get("s", "b")
    assert a is not None
    assert a.state is RecordState.COMPLETED
    assert b is not None
    assert b.state is RecordState.IN_FLIGHT


# Store URLs and given pools ---------------------------------------------------------------


def test_store_from_url_builds_a_postgres_store(postgres_url: str, postgres_table: str) -> None:
    store = store_from_url(postgres_url, table=postgres_table, timeout=2.0)
    try:
        assert isinstance(store, PostgresStore)
        assert store.claim_sync("s", "k", FP, "t", lease=30, retention=60) == Claimed("t", 1)
    finally:
        store.close()


def test_a_table_in_its_own_schema(postgres_url: str) -> None:
    schema = unique_table()
    store = PostgresStore(postgres_url, table="records", schema=schema)
    try:
        assert store.claim_sync("s", "k", FP, "t", lease=30, retention=60) == Claimed("t", 1)
        assert store.complete_sync("s", "k", "t", RESPONSE)
        with raw(postgres_url) as conn:
            row = conn.execute(f'SELECT count(*) FROM "{schema}".records').fetchone()
        assert row == (1,)
    finally:
        store.close()
        with raw(postgres_url) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_table_names_are_checked() -> None:
    with pytest.raises(ValueError, match="identifier"):
        PostgresStore("postgresql://127.0.0.1/x", table='x"; DROP TABLE y; --')


# Restarts, on a private cluster ----------------------------------------------------------


@pytest.fixture
def private_store(private_postgres: PrivatePostgres) -> Iterator[PostgresStore]:
    private_postgres.ensure_running()
    table = unique_table()
    store = PostgresStore(private_postgres.url, table=table, timeout=2.0)
    yield store
    store.close()
    private_postgres.ensure_running()
    drop_table(private_postgres.url, table)


def test_records_survive_a_restart_and_the_store_reconnects(
    private_postgres: PrivatePostgres, private_store: PostgresStore
) -> None:
    keys = [f"k{index}" for index in range(20)]
    for key in keys:
        assert private_store.claim_sync("s", key, FP, "t", lease=60, retention=600) == Claimed(
            "t", 1
        )
        assert private_store.complete_sync("s", key, "t", RESPONSE)
    private_store.claim_sync("s", "in-flight", FP, "held", lease=60, retention=600)

    private_postgres.stop(mode="fast")
    with pytest.raises(StoreError):
        private_store.get_sync("s", "k0")
    private_postgres.start()

    # Connections from before the restart fail once each; then the store is back.
    record = None
    for _ in range(12):
        try:
            record = private_store.get_sync("s", "k0")
            break
        except StoreError:
            time.sleep(0.05)
    assert record is not None
    for key in keys:
        record = private_store.get_sync("s", key)
        assert record is not None
        assert record.state is RecordState.COMPLETED
        assert record.response == RESPONSE
    held = private_store.claim_sync("s", "in-flight", FP, "other", lease=60, retention=600)
    assert isinstance(held, Existing)
    assert held.record.token == "held"
    assert private_store.complete_sync("s", "in-flight", "held", RESPONSE)
