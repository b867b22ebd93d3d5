"""PostgreSQL store: psycopg 3 and psycopg_pool, for many worker processes on many hosts.

Every operation is one statement on an autocommit connection, timed by the database's
clock (`statement_timestamp()`), so workers with skewed clocks agree on leases and expiry.
A fresh request costs two statements (claim, complete), a replay one (a claim that
races a simultaneous first insert of the same key runs once more).

Concurrent claims in one process share a statement, and so do completions: while one
is on the wire the others queue, then go out together as one statement over a JSON
array (one pooled connection, one round trip), each caller keeping its own result. A
lone request runs the one-record statement at once. Under load this cuts the driver's
work (pool, cursor, adaptation, results) per request several times over.

Waiters LISTEN on one connection per process. Completion and release NOTIFY only for
records that a waiter has marked (`waiting`): a NOTIFY serialises committing
transactions on a database-wide lock, which the common path should not pay for.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from oncely.core.decisions import Claimed, ClaimResult, Existing
from oncely.core.records import (
    Record,
    RecordFormatError,
    RecordState,
    StoredResponse,
    decode_response,
    encode_response,
)
from oncely.stores.base import (
    POLL_FIRST_DELAY,
    POLL_MAX_DELAY,
    StoreError,
    StoreStats,
    poll_until_settled,
    poll_until_settled_sync,
    running_loop,
)

AsyncConn: TypeAlias = psycopg.AsyncConnection[TupleRow]
SyncConn: TypeAlias = psycopg.Connection[TupleRow]
AsyncPool: TypeAlias = AsyncConnectionPool[AsyncConn]
SyncPool: TypeAlias = ConnectionPool[SyncConn]

log = logging.getLogger("oncely.stores.postgres")

# A waiter re-reads the record this often even when armed: it catches expiry and purge,
# which send no notification.
WAIT_RECHECK = 1.0
# After LISTEN failed, waiters poll for this long before trying to listen again.
LISTEN_RETRY = 5.0
# A claim that raced a simultaneous first insert gets no row back (see the claim statement
# in build_statements) and runs again.
CLAIM_ATTEMPTS = 5
# Concurrent claims (completions) share statements (see _Group): at most this many
# statements of one kind in flight per store and event loop, each for at most MAX_GROUP.
GROUP_FLIGHTS = 1
MAX_GROUP = 256
PURGE_MAX_BATCHES = 1000

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_NOW = "extract(epoch FROM statement_timestamp())::float8"
_RECORD = "fingerprint, state, token, attempts, created_at, expires_at, lease_expires_at, response"
# A record found by its primary key is live: `+ 0` keeps the planner from reading it
# through the expires_at index instead (see PLANNER_SETTINGS).
_LIVE = f"expires_at + 0 > {_NOW}"

# Set on every connection of the store's own pools. Statements are prepared, and
# PostgreSQL keeps the generic plan it made from the table's statistics at the time: made
# on a new or emptied table, that plan reads the records by a sequential scan or a hash
# join, and goes on doing so as the table grows until the next ANALYZE. Measured: 9.7 ms
# per grouped claim at 100,000 records, 8 ms per single claim on a table analysed while
# empty, instead of 0.1-0.7. Every statement here finds records by the primary key (purge
# by the expires_at index); with these, that is the only plan.
PLANNER_SETTINGS = (
    ("enable_seqscan", "off"),
    ("enable_hashjoin", "off"),
    ("enable_mergejoin", "off"),
)
_SET_PLANNER = "SELECT " + ", ".join(
    f"set_config('{name}', '{value}', false)" for name, value in PLANNER_SETTINGS
)
# `stats` reads every record: for it, a (parallel) sequential scan is the plan. For its
# own transaction only: 120 ms instead of 270-340 ms at 250,000 records.
_SCAN_WHOLE_TABLE = "SELECT set_config('enable_seqscan', 'on', true)"


def _claimable(row: str, fingerprint: str = "%(fingerprint)s") -> str:
    """SQL for `claim_transition(...) is not KEEP`: expired, or a lapsed lease, same request."""
    return (
        f"({row}.expires_at <= {_NOW} OR ({row}.state = 0 AND {row}.lease_expires_at <= {_NOW}"
        f" AND {row}.fingerprint = {fingerprint}))"
    )


def _columns(row: str) -> str:
    """`_RECORD`, each column qualified by `row`."""
    return ", ".join(f"{row}.{column}" for column in _RECORD.split(", "))


@dataclass(frozen=True, slots=True)
class Statements:
    """The SQL for one table; placeholders are psycopg's `%(name)s`.

    `complete` takes `scope`, `key`, `token` and `response` (`encode_response` bytes) and
    returns one row when the token held the lease: run it on your own connection to
    complete inside your transaction (see `PostgresStore.complete_in_transaction`).
    """

    table: str
    channel: str
    ddl: tuple[str, ...]
    exists: str
    claim: str
    claim_many: str
    complete: str
    complete_many: str
    release: str
    renew: str
    get: str
    wait_check: str
    purge: str
    stats: str


def build_statements(table: str, schema: str | None = None) -> Statements:
    if not _IDENTIFIER.match(table) or len(table) > 48:
        raise ValueError(
            f"table must be a plain SQL identifier of at most 48 characters: {table!r}"
        )
    if schema is not None and (not _IDENTIFIER.match(schema) or len(schema) > 63):
        raise ValueError(f"schema must be a plain SQL identifier: {schema!r}")
    t = f'"{schema}"."{table}"' if schema else f'"{table}"'
    index = f"{table}_expires_at_idx"
    index_qualified = f'"{schema}"."{index}"' if schema else f'"{index}"'
    channel = f"oncely.{schema}.{table}" if schema else f"oncely.{table}"
    if len(channel) > 63:  # NAMEDATALEN; a collision only costs a spurious wakeup
        channel = "oncely." + hashlib.sha1(channel.encode()).hexdigest()[:32]

    def notify(scope: str, key: str) -> str:
        return f"pg_notify('{channel}', md5({scope} || ' ' || {key}))"

    ddl = (
        f"SELECT pg_advisory_xact_lock(hashtext('oncely.ddl:{t}'))",
        *([f'CREATE SCHEMA IF NOT EXISTS "{schema}"'] if schema else []),
        f"""CREATE TABLE IF NOT EXISTS {t} (
            scope text NOT NULL,
            key text NOT NULL,
            fingerprint text NOT NULL,
            state smallint NOT NULL,
            token text,
            attempts integer NOT NULL,
            created_at double precision NOT NULL,
            expires_at double precision NOT NULL,
            lease_expires_at double precision,
            waiting boolean NOT NULL DEFAULT false,
            response bytea,
            PRIMARY KEY (scope, key)
        ) WITH (fillfactor = 80)""",  # room on the page for the completion's HOT update
        f'CREATE INDEX IF NOT EXISTS "{index}" ON {t} (expires_at)',
    )
    # The claim, one statement. `cur` reads the record; when it must be kept (live, or a
    # lapsed lease of another request) the INSERT gets no source row and the statement is
    # a plain read: a replay takes no row lock and writes no WAL. Otherwise the upsert
    # re-checks the rule on the newest row version under its row lock, so concurrent claims
    # serialise there and exactly one wins. The one gap: a row inserted by a concurrent
    # transaction after our snapshot is invisible to `cur` while the upsert waits for it
    # and then declines; both halves come back empty and the caller runs the claim again
    # (a new snapshot that sees the row). Always updating the row would close that gap in
    # one statement, but would turn every replay into a write and a WAL flush.
    upsert = f"""
        ON CONFLICT (scope, key) DO UPDATE SET
            fingerprint = excluded.fingerprint,
            state = 0,
            token = excluded.token,
            attempts = CASE WHEN r.expires_at <= {_NOW} THEN 1 ELSE r.attempts + 1 END,
            created_at = CASE WHEN r.expires_at <= {_NOW}
                              THEN excluded.created_at ELSE r.created_at END,
            expires_at = CASE WHEN r.expires_at <= {_NOW}
                              THEN excluded.expires_at ELSE r.expires_at END,
            lease_expires_at = excluded.lease_expires_at,
            waiting = r.waiting AND r.expires_at > {_NOW},
            response = NULL
        WHERE {_claimable("r", "excluded.fingerprint")}
    """
    insert = f"""INSERT INTO {t} AS r (scope, key, fingerprint, state, token, attempts,
                                       created_at, expires_at, lease_expires_at)"""
    insert_completed = insert[:-1] + ", response)"
    claim = f"""
        WITH cur AS (
            SELECT {_RECORD} FROM {t} WHERE scope = %(scope)s AND key = %(key)s
        ), ins AS (
            {insert}
            SELECT %(scope)s, %(key)s, %(fingerprint)s, 0, %(token)s, 1,
                   {_NOW}, {_NOW} + %(retention)s, {_NOW} + %(lease)s
            WHERE NOT EXISTS (SELECT 1 FROM cur WHERE NOT {_claimable("cur")})
            {upsert}
            RETURNING {_RECORD}
        )
        SELECT true, {_RECORD}, {_NOW} FROM ins
        UNION ALL
        SELECT false, {_RECORD}, {_NOW} FROM cur WHERE NOT {_claimable("cur")}
    """
    # The same claim for many records at once (`PostgresStore.claim` groups concurrent
    # calls), each (scope, key) at most once. The calls come as one JSON array of
    # [scope, key, fingerprint, token, lease, retention] (see `_calls_document`). Rows come
    # back numbered by their position in it, the claim's row layout after the number; a
    # position with no row raced, as above. Each record is read by a primary-key lookup per
    # call (LATERAL, kept apart by OFFSET 0): a join would leave the plan to the statistics
    # (see PLANNER_SETTINGS). Records are inserted and locked in array order:
    # the caller sorts by (scope, key), so two such statements on overlapping keys wait for
    # each other, never deadlock.
    claim_many = f"""
        WITH req AS (
            SELECT call->>0 AS scope, call->>1 AS key, call->>2 AS fingerprint,
                   call->>3 AS token, (call->>4)::float8 AS lease,
                   (call->>5)::float8 AS retention, i
            FROM jsonb_array_elements(%(calls)s::jsonb) WITH ORDINALITY AS req(call, i)
        ), cur AS (
            SELECT req.i, req.fingerprint AS wanted, {_columns("c")}
            FROM req CROSS JOIN LATERAL (
                SELECT * FROM {t} WHERE scope = req.scope AND key = req.key OFFSET 0
            ) AS c
        ), ins AS (
            {insert}
            SELECT req.scope, req.key, req.fingerprint, 0, req.token, 1,
                   {_NOW}, {_NOW} + req.retention, {_NOW} + req.lease
            FROM req
            WHERE NOT EXISTS (
                SELECT 1 FROM cur WHERE cur.i = req.i AND NOT {_claimable("cur", "cur.wanted")}
            )
            ORDER BY req.i
            {upsert}
            RETURNING r.scope, r.key, {_columns("r")}
        )
        SELECT req.i, true, {_columns("ins")}, {_NOW}
        FROM ins JOIN req ON req.scope = ins.scope AND req.key = ins.key
        UNION ALL
        SELECT cur.i, false, {_columns("cur")}, {_NOW}
        FROM cur WHERE NOT {_claimable("cur", "cur.wanted")}
    """
    fence = "scope = %(scope)s AND key = %(key)s AND token = %(token)s AND state = 0"
    return Statements(
        table=t,
        channel=channel,
        ddl=ddl,
        exists=(
            f"SELECT to_regclass('{t}') IS NOT NULL"
            f" AND to_regclass('{index_qualified}') IS NOT NULL"
        ),
        claim=claim,
        claim_many=claim_many,
        complete=f"""
            WITH done AS (
                UPDATE {t} SET state = 1, lease_expires_at = NULL, response = %(response)s
                WHERE {fence} RETURNING waiting
            )
            SELECT 1 FROM done
            LEFT JOIN LATERAL (SELECT {notify("%(scope)s", "%(key)s")} WHERE done.waiting) AS n
            ON true
        """,
        # The completion of many records (distinct (scope, key)), as one JSON array of
        # [scope, key, token, response as hex]: returns the positions (from 1) of those
        # whose token held the lease. An UPDATE joined to the calls would leave the plan
        # to the statistics (see PLANNER_SETTINGS: on a table analysed while empty, it read
        # the whole primary-key index per statement); ON CONFLICT always finds each record
        # by the key's index. Where no record is left (it expired and was purged) the row
        # inserted is an expired placeholder (attempts 0, expires_at 0): to a claim or a
        # read it is no record at all, and the next purge removes it.
        complete_many=f"""
            WITH req AS (
                SELECT call->>0 AS scope, call->>1 AS key, call->>2 AS token,
                       decode(call->>3, 'hex') AS response, i
                FROM jsonb_array_elements(%(calls)s::jsonb) WITH ORDINALITY AS req(call, i)
            ), done AS (
                {insert_completed}
                SELECT scope, key, '', 1, token, 0, 0, 0, NULL, response FROM req ORDER BY i
                ON CONFLICT (scope, key) DO UPDATE SET
                    state = 1, lease_expires_at = NULL, response = excluded.response
                WHERE r.token = excluded.token AND r.state = 0
                RETURNING r.scope, r.key, r.attempts, r.waiting
            )
            SELECT req.i FROM done JOIN req ON req.scope = done.scope AND req.key = done.key
            LEFT JOIN LATERAL (SELECT {notify("done.scope", "done.key")} WHERE done.waiting) AS n
            ON true
            WHERE done.attempts > 0
        """,
        release=f"""
            WITH gone AS (DELETE FROM {t} WHERE {fence} RETURNING waiting)
            SELECT 1 FROM gone
            LEFT JOIN LATERAL (SELECT {notify("%(scope)s", "%(key)s")} WHERE gone.waiting) AS n
            ON true
        """,
        renew=f"""
            UPDATE {t} SET lease_expires_at = {_NOW} + %(lease)s
            WHERE {fence} AND {_LIVE}
        """,
        get=f"""
            SELECT {_RECORD} FROM {t}
            WHERE scope = %(scope)s AND key = %(key)s AND {_LIVE}
        """,
        # Marks an in-flight record so that its completion notifies, and reads it. SKIP
        # LOCKED: a record locked by a completing transaction is not waited for (that
        # transaction may be the handler's own); the waiter polls instead.
        wait_check=f"""
            WITH marked AS (
                UPDATE {t} SET waiting = true
                WHERE scope = %(scope)s AND key = %(key)s AND (scope, key) IN (
                    SELECT scope, key FROM {t}
                    WHERE scope = %(scope)s AND key = %(key)s AND state = 0 AND NOT waiting
                    FOR UPDATE SKIP LOCKED
                )
                RETURNING true
            )
            SELECT r.waiting OR EXISTS (SELECT 1 FROM marked),
                   r.fingerprint, r.state, r.token, r.attempts, r.created_at, r.expires_at,
                   r.lease_expires_at, r.response
            FROM {t} AS r
            WHERE r.scope = %(scope)s AND r.key = %(key)s AND r.{_LIVE}
        """,
        # Bounded batches in index order; the outer condition is re-checked on a row that a
        # concurrent claim has just renewed, so a fresh record is never deleted.
        purge=f"""
            DELETE FROM {t} WHERE (scope, key) IN (
                SELECT scope, key FROM {t} WHERE expires_at <= {_NOW}
                ORDER BY expires_at LIMIT %(batch)s FOR UPDATE SKIP LOCKED
            ) AND expires_at <= {_NOW}
        """,
        stats=f"""
            SELECT count(*) FILTER (WHERE expires_at > {_NOW} AND state = 0),
                   count(*) FILTER (WHERE expires_at > {_NOW} AND state = 1),
                   count(*) FILTER (WHERE expires_at <= {_NOW}),
                   {_NOW} - min(created_at) FILTER (WHERE expires_at > {_NOW} AND state = 0)
            FROM {t}
        """,
    )


def wake_payload(scope: str, key: str) -> str:
    """The NOTIFY payload for a record: `md5(scope || ' ' || key)` as the SQL computes it."""
    return hashlib.md5(f"{scope} {key}".encode(), usedforsecurity=False).hexdigest()


def _record(scope: str, key: str, row: tuple[Any, ...], at: int) -> Record:
    blob = row[at + 7]
    return Record(
        scope=scope,
        key=key,
        fingerprint=row[at],
        state=RecordState(row[at + 1]),
        token=row[at + 2],
        attempts=row[at + 3],
        created_at=row[at + 4],
        expires_at=row[at + 5],
        lease_expires_at=row[at + 6],
        response=decode_response(blob) if blob is not None else None,
    )


def _claim_result(scope: str, key: str, token: str, row: tuple[Any, ...]) -> ClaimResult:
    if row[0]:
        attempts: int = row[4]
        return Claimed(token, attempts, took_over=attempts > 1)
    return Existing(_record(scope, key, row, 1), row[9])


def _settled(record: Record | None) -> bool:
    return record is None or record.state is not RecordState.IN_FLIGHT


def _stats(row: tuple[Any, ...] | None) -> StoreStats:
    if row is None:
        raise StoreError("postgres store: stats returned no row")
    return StoreStats(row[0], row[1], row[2], row[3])


# Grouping: concurrent claims (and completions) of one process share a statement.

_encode_calls = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode


def _calls_document(calls: list[list[Any]]) -> str:
    """A grouped statement's calls as one JSON text. psycopg adapts a list element by
    element in Python (10 µs per call for the claim's six arrays); the json module's C
    encoder takes 1 µs, and PostgreSQL reads it back with `jsonb_array_elements`."""
    try:
        return _encode_calls(calls)
    except ValueError:  # an infinite lease or retention: JSON has no number for it
        return _encode_calls(
            [[repr(v) if isinstance(v, float) else v for v in call] for call in calls]
        )  # as text, which `::float8` reads as well ("inf")


Params: TypeAlias = dict[str, Any]
_Call: TypeAlias = tuple[tuple[str, str], Params, "asyncio.Future[Any]"]
_ALONE: Any = object()  # the grouped statement deadlocked: run your own statement


class _Group:
    """Concurrent calls of one operation (claim or complete) on one event loop.

    A call that finds no statement of its kind in flight runs its own one-record
    statement at once: a lone request pays nothing for grouping. Calls that arrive
    while one is in flight queue up, and when it returns everything queued goes out as
    one statement over arrays (`run`): one pooled connection, one round trip, for the
    lot. There is no timer: a group is what piled up during the previous round trip.
    A (scope, key) appears once per statement (ON CONFLICT can not touch a row twice),
    a duplicate waits for the next one. Each caller gets its own result or StoreError;
    a caller cancelled while queued is dropped before anything is sent.
    """

    __slots__ = (
        "busy",
        "error",
        "grouped",
        "loop",
        "operation",
        "queue",
        "run",
        "statements",
        "tasks",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None,
        operation: str,
        run: Callable[[list[Params]], Awaitable[list[Any]]],
        error: Callable[[str, Exception], StoreError],
    ) -> None:
        self.loop = loop
        self.operation = operation
        self.run = run
        self.error = error
        self.queue: list[_Call] = []
        self.busy = 0  # statements of this kind in flight
        self.tasks: set[asyncio.Task[None]] = set()
        self.statements = 0  # grouped statements sent, and the calls they carried (tests)
        self.grouped = 0

    def submit(self, ident: tuple[str, str], params: Params) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = running_loop().create_future()
        self.queue.append((ident, params, future))
        return future

    def done(self) -> None:
        """A statement of this kind returned: send what queued meanwhile."""
        self.busy -= 1
        while self.queue and self.busy < GROUP_FLIGHTS:
            self._send()

    def _send(self) -> None:
        batch: list[_Call] = []
        later: list[_Call] = []
        seen: set[tuple[str, str]] = set()
        for call in self.queue:
            if call[2].done():  # cancelled while queued
                continue
            if call[0] in seen or len(batch) >= MAX_GROUP:
                later.append(call)
            else:
                seen.add(call[0])
                batch.append(call)
        self.queue = later
        if not batch:
            return
        # One lock order for every grouped statement of every process: no deadlocks.
        batch.sort(key=_ident)
        self.busy += 1
        self.statements += 1
        self.grouped += len(batch)
        assert self.loop is not None
        task = self.loop.create_task(self._flush(batch))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _flush(self, batch: list[_Call]) -> None:
        try:
            try:
                results = await self.run([params for _, params, _ in batch])
            except psycopg.errors.DeadlockDetected:  # a lock order the planner chose
                results = [_ALONE] * len(batch)
            except psycopg.Error as exc:
                for _, _, future in batch:
                    if not future.done():
                        error = self.error(self.operation, exc)
                        error.__cause__ = exc
                        future.set_exception(error)
                return
            for (_, _, future), result in zip(batch, results, strict=True):
                if not future.done():  # not cancelled meanwhile
                    future.set_result(result)
        except BaseException as exc:  # cancelled (the loop is closing), or a bug
            for _, _, future in batch:
                if not future.done():
                    if isinstance(exc, Exception):
                        future.set_exception(exc)
                    else:
                        future.cancel()
            raise
        finally:
            self.done()


def _ident(call: _Call) -> tuple[str, str]:
    return call[0]


# Listeners: one LISTEN connection per process (and event loop), shared by its waiters.


class _AsyncListener:
    def __init__(self, connection: AsyncConn) -> None:
        self.connection = connection
        self.waiters: dict[str, set[asyncio.Event]] = {}
        self.failed = False
        self.task: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, conninfo: str, kwargs: Mapping[str, Any], channel: str) -> _AsyncListener:
        connection = await psycopg.AsyncConnection.connect(
            conninfo, **{**kwargs, "autocommit": True}
        )
        try:
            await connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except BaseException:
            await connection.close()
            raise
        listener = cls(connection)
        listener.task = asyncio.create_task(listener._run(), name="oncely-postgres-listen")
        return listener

    async def _run(self) -> None:
        try:
            async for notify in self.connection.notifies():
                for event in self.waiters.get(notify.payload, ()):
                    event.set()
        except psycopg.Error as exc:
            log.warning("postgres LISTEN connection lost, waiters poll: %s", exc)
        finally:
            self.failed = True  # wake everyone: they re-read and fall back to polling
            for events in self.waiters.values():
                for event in events:
                    event.set()

    def add(self, payload: str, event: asyncio.Event) -> None:
        self.waiters.setdefault(payload, set()).add(event)

    def discard(self, payload: str, event: asyncio.Event) -> None:
        events = self.waiters.get(payload)
        if events is not None:
            events.discard(event)
            if not events:
                del self.waiters[payload]

    async def aclose(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.connection.close()


class _SyncListener:
    def __init__(self, conninfo: str, kwargs: Mapping[str, Any], channel: str) -> None:
        self.connection: SyncConn = psycopg.connect(conninfo, **{**kwargs, "autocommit": True})
        try:
            self.connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except BaseException:
            self.connection.close()
            raise
        self.waiters: dict[str, set[threading.Event]] = {}
        self.lock = threading.Lock()
        self.failed = False
        self.closing = False
        self.thread = threading.Thread(target=self._run, name="oncely-postgres-listen", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.closing:
                # A bounded wait, so that close() is noticed.
                for notify in self.connection.notifies(timeout=0.5):
                    with self.lock:
                        events = list(self.waiters.get(notify.payload, ()))
                    for event in events:
                        event.set()
        except psycopg.Error as exc:
            if not self.closing:
                log.warning("postgres LISTEN connection lost, waiters poll: %s", exc)
        finally:
            self.failed = True
            with self.lock:
                events = [event for group in self.waiters.values() for event in group]
            for event in events:
                event.set()
            self.connection.close()

    def add(self, payload: str, event: threading.Event) -> None:
        with self.lock:
            self.waiters.setdefault(payload, set()).add(event)

    def discard(self, payload: str, event: threading.Event) -> None:
        with self.lock:
            events = self.waiters.get(payload)
            if events is not None:
                events.discard(event)
                if not events:
                    del self.waiters[payload]

    def close(self) -> None:
        self.closing = True
        self.thread.join(timeout=2.0)


class PostgresStore:
    """`PostgresStore("postgresql://user@host/db")`, or an existing psycopg_pool pool.

    The table (`table`, in `schema` or the search path) is created on first use unless
    `create_schema=False`; `init_schema()` / `oncely init-db` create it explicitly.
    `timeout` bounds the wait for a pooled connection (and the connect): past it the
    store raises StoreError, so the middleware answers 503 rather than hang.
    `sweep_interval` purges expired records in the background, every that many seconds.

    Pools built from a URL are created lazily: the async one inside the running event
    loop, the sync one per process, so forked workers never share a connection. A pool
    you pass in is yours to open and close; it should hold autocommit connections (else
    every statement costs a COMMIT round trip more) and be made with
    `configure=PostgresStore.configure` (`configure_sync` for a sync pool), which sets
    PLANNER_SETTINGS as the store's own pools do.
    """

    name = "postgres"
    native_expiry = False

    def __init__(
        self,
        url_or_pool: str | AsyncConnectionPool[Any] | ConnectionPool[Any],
        *,
        table: str = "oncely_records",
        schema: str | None = None,
        create_schema: bool = True,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 5.0,
        sweep_interval: float | None = None,
        purge_batch: int = 5000,
        application_name: str = "oncely",
    ) -> None:
        self.sql = build_statements(table, schema)
        self.timeout = timeout
        self.sweep_interval = sweep_interval
        self.purge_batch = purge_batch
        self._create_schema = create_schema
        self._min_size = min_size
        self._max_size = max_size
        self._user_apool: AsyncPool | None = None
        self._user_pool: SyncPool | None = None
        if isinstance(url_or_pool, str):
            conninfo = url_or_pool
            given: dict[str, Any] = {}
        elif isinstance(url_or_pool, AsyncConnectionPool | ConnectionPool):
            # The twin pool and the LISTEN connection connect like the given pool.
            pool_conninfo, kwargs = url_or_pool.conninfo, url_or_pool.kwargs
            if not isinstance(pool_conninfo, str) or not isinstance(kwargs, dict | None):
                raise TypeError("a pool with a dynamic conninfo: pass the store a URL instead")
            conninfo, given = pool_conninfo, dict(kwargs or {})
            if isinstance(url_or_pool, AsyncConnectionPool):
                self._user_apool = url_or_pool
            else:
                self._user_pool = url_or_pool
        else:
            raise TypeError(f"expected a URL or a psycopg_pool pool, got {url_or_pool!r}")
        in_url = conninfo_to_dict(conninfo)
        ours: dict[str, Any] = {"autocommit": True, "prepare_threshold": 0}
        if "connect_timeout" not in in_url:
            ours["connect_timeout"] = max(2, math.ceil(timeout))  # libpq's minimum is 2 s
        if "application_name" not in in_url:
            ours["application_name"] = application_name
        self._conninfo = conninfo
        self._kwargs = {**ours, **given}
        self._schema_ready = not create_schema
        # async state, bound to one event loop
        self._apool: AsyncPool | None = self._user_apool
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._aready: asyncio.AbstractEventLoop | None = None
        self._alock: asyncio.Lock | None = None
        self._alock_loop: asyncio.AbstractEventLoop | None = None
        self._alistener: _AsyncListener | None = None
        self._alistener_starting: asyncio.Task[_AsyncListener] | None = None
        self._alisten_retry_at = 0.0
        self._sweeper_task: asyncio.Task[None] | None = None
        self._claims, self._completions = self._new_groups(None)
        # sync state, bound to one process
        self._lock = threading.Lock()
        self._pool: SyncPool | None = self._user_pool
        self._pool_pid = os.getpid() if self._user_pool is not None else 0
        self._sready_pid = 0
        self._listener: _SyncListener | None = None
        self._listen_retry_at = 0.0
        self._sweeper_stop: threading.Event | None = None
        self._sweeper_thread: threading.Thread | None = None
        self._abandoned: list[object] = []  # pools of a parent process or an old loop: left alone

    def __repr__(self) -> str:
        return f"PostgresStore(table={self.sql.table})"

    @property
    def conninfo(self) -> str:
        """The connection string the store connects with (for same-database checks)."""
        return self._conninfo

    def _error(self, operation: str, exc: Exception) -> StoreError:
        return StoreError(f"postgres store {self.sql.table}: {operation} failed: {exc}")

    # async pool and schema ----------------------------------------------------------

    async def _async_pool(self) -> AsyncPool:
        pool = self._apool
        if pool is not None and self._aready is running_loop():
            return pool
        return await self._prepare_async(schema=True)

    async def _prepare_async(self, *, schema: bool) -> AsyncPool:
        loop = asyncio.get_running_loop()
        if self._alock is None or self._alock_loop is not loop:
            self._alock, self._alock_loop = asyncio.Lock(), loop
        async with self._alock:
            if self._aloop is not loop:
                # First use, or a new event loop: what belonged to the old loop stays there.
                self._alistener = self._alistener_starting = self._sweeper_task = None
                self._claims, self._completions = self._new_groups(loop)
                if self._user_apool is None:
                    if self._apool is not None:
                        self._abandoned.append(self._apool)
                    self._apool = self._new_async_pool()
                    await self._apool.open(wait=False)
                self._aloop = loop
                if self.sweep_interval is not None and self._sweeper_task is None:
                    self._sweeper_task = loop.create_task(self._sweep_forever(self.sweep_interval))
            pool = self._apool
            assert pool is not None
            if schema and not self._schema_ready:
                await self._init_schema_async(pool)
                self._aready = loop
            elif self._schema_ready:
                self._aready = loop
            return pool

    def _new_groups(self, loop: asyncio.AbstractEventLoop | None) -> tuple[_Group, _Group]:
        return (
            _Group(loop, "claim", self._claim_many, self._error),
            _Group(loop, "complete", self._complete_many, self._error),
        )

    @staticmethod
    async def configure(conn: AsyncConn) -> None:
        """Set PLANNER_SETTINGS on a new connection of a pool the store uses."""
        await conn.execute(_SET_PLANNER, prepare=False)

    @staticmethod
    def configure_sync(conn: SyncConn) -> None:
        """`configure`, for a sync pool."""
        conn.execute(_SET_PLANNER, prepare=False)

    def _new_async_pool(self) -> AsyncPool:
        return AsyncConnectionPool(
            self._conninfo,
            kwargs=self._kwargs,
            min_size=self._min_size,
            max_size=self._max_size,
            timeout=self.timeout,
            configure=self.configure,
            open=False,
            name="oncely-postgres-async",
        )

    async def _init_schema_async(self, pool: AsyncPool) -> None:
        try:
            async with pool.connection() as conn:
                cur = await conn.execute(self.sql.exists, prepare=False)
                row = await cur.fetchone()
                if not (row and row[0]):
                    async with conn.transaction():
                        for statement in self.sql.ddl:
                            await conn.execute(statement, prepare=False)
        except psycopg.Error as exc:
            raise self._error("creating the schema", exc) from exc
        self._schema_ready = True

    async def init_schema(self) -> None:
        """Create the table and its index if absent. Idempotent; safe from many processes."""
        pool = await self._prepare_async(schema=False)
        await self._init_schema_async(pool)

    # sync pool and schema -----------------------------------------------------------

    def _sync_pool(self) -> SyncPool:
        pool = self._pool
        if pool is not None and self._sready_pid == os.getpid():
            return pool
        return self._prepare_sync(schema=True)

    def _prepare_sync(self, *, schema: bool) -> SyncPool:
        with self._lock:
            pid = os.getpid()
            if self._pool is None or self._pool_pid != pid:
                if self._pool is not None:
                    # Forked: the parent's connections are not ours to use or close.
                    self._abandoned.append(self._pool)
                    self._listener = None
                    self._sweeper_thread = None
                self._pool = ConnectionPool(
                    self._conninfo,
                    kwargs=self._kwargs,
                    min_size=self._min_size,
                    max_size=self._max_size,
                    timeout=self.timeout,
                    configure=self.configure_sync,
                    open=False,
                    name="oncely-postgres-sync",
                )
                self._pool.open(wait=False)
                self._pool_pid = pid
                if self.sweep_interval is not None and self._sweeper_task is None:
                    self._start_sweeper_thread(self.sweep_interval)
            pool = self._pool
            if schema and not self._schema_ready:
                self._init_schema_sync(pool)
            if self._schema_ready:
                self._sready_pid = pid
            return pool

    def _init_schema_sync(self, pool: SyncPool) -> None:
        try:
            with pool.connection() as conn:
                row = conn.execute(self.sql.exists, prepare=False).fetchone()
                if not (row and row[0]):
                    with conn.transaction():
                        for statement in self.sql.ddl:
                            conn.execute(statement, prepare=False)
        except psycopg.Error as exc:
            raise self._error("creating the schema", exc) from exc
        self._schema_ready = True

    def init_schema_sync(self) -> None:
        """Create the table and its index if absent (`oncely init-db`)."""
        self._init_schema_sync(self._prepare_sync(schema=False))

    # async operations ----------------------------------------------------------------

    async def claim(
        self, scope: str, key: str, fingerprint: str, token: str, *, lease: float, retention: float
    ) -> ClaimResult:
        params = {
            "scope": scope,
            "key": key,
            "fingerprint": fingerprint,
            "token": token,
            "lease": float(lease),
            "retention": float(retention),
        }
        pool = await self._async_pool()
        group = self._claims
        try:
            for _ in range(CLAIM_ATTEMPTS):
                if group.busy < GROUP_FLIGHTS:  # (then nothing is queued)
                    group.busy += 1
                    try:
                        row = await self._claim_one(pool, params)
                    finally:
                        group.done()
                else:  # others are claiming: share their next statement
                    row = await group.submit((scope, key), params)
                    if row is _ALONE:
                        row = await self._claim_one(pool, params)
                if row is not None:
                    return _claim_result(scope, key, token, row)
        except (psycopg.Error, RecordFormatError) as exc:
            raise self._error("claim", exc) from exc
        raise StoreError(f"postgres store {self.sql.table}: claim kept racing, gave up")

    async def _claim_one(self, pool: AsyncPool, params: Params) -> tuple[Any, ...] | None:
        async with pool.connection() as conn:
            cur = await conn.execute(self.sql.claim, params, binary=True)
            return await cur.fetchone()

    async def _claim_many(self, calls: list[Params]) -> list[Any]:
        """Rows of the claim statement's layout, by call; None: raced, run it again."""
        pool = await self._async_pool()
        if len(calls) == 1:
            return [await self._claim_one(pool, calls[0])]
        document = _calls_document(
            [
                [call["scope"], call["key"], call["fingerprint"], call["token"], call["lease"],
                 call["retention"]]
                for call in calls
            ]
        )  # fmt: skip
        async with pool.connection() as conn:
            cur = await conn.execute(self.sql.claim_many, {"calls": document}, binary=True)
            rows = await cur.fetchall()
        results: list[Any] = [None] * len(calls)
        for row in rows:
            results[row[0] - 1] = row[1:]
        return results

    async def complete(self, scope: str, key: str, token: str, response: StoredResponse) -> bool:
        params = {"scope": scope, "key": key, "token": token, "response": encode_response(response)}
        pool = await self._async_pool()
        group = self._completions
        try:
            if group.busy < GROUP_FLIGHTS:  # (then nothing is queued)
                group.busy += 1
                try:
                    return await self._complete_one(pool, params)
                finally:
                    group.done()
            done = await group.submit((scope, key), params)
            if done is _ALONE:
                return await self._complete_one(pool, params)
            return bool(done)
        except psycopg.Error as exc:
            raise self._error("complete", exc) from exc

    async def _complete_one(self, pool: AsyncPool, params: Params) -> bool:
        async with pool.connection() as conn:
            cur = await conn.execute(self.sql.complete, params)
            return cur.rowcount == 1

    async def _complete_many(self, calls: list[Params]) -> list[Any]:
        pool = await self._async_pool()
        if len(calls) == 1:
            return [await self._complete_one(pool, calls[0])]
        document = _calls_document(
            [[call["scope"], call["key"], call["token"], call["response"].hex()] for call in calls]
        )
        async with pool.connection() as conn:
            cur = await conn.execute(self.sql.complete_many, {"calls": document})
            rows = await cur.fetchall()
        results = [False] * len(calls)
        for (position,) in rows:
            results[position - 1] = True
        return results

    async def release(self, scope: str, key: str, token: str) -> bool:
        pool = await self._async_pool()
        try:
            async with pool.connection() as conn:
                cur = await conn.execute(
                    self.sql.release, {"scope": scope, "key": key, "token": token}
                )
                return cur.rowcount == 1
        except psycopg.Error as exc:
            raise self._error("release", exc) from exc

    async def renew(self, scope: str, key: str, token: str, *, lease: float) -> bool:
        params = {"scope": scope, "key": key, "token": token, "lease": float(lease)}
        pool = await self._async_pool()
        try:
            async with pool.connection() as conn:
                cur = await conn.execute(self.sql.renew, params)
                return cur.rowcount == 1
        except psycopg.Error as exc:
            raise self._error("renew", exc) from exc

    async def get(self, scope: str, key: str) -> Record | None:
        pool = await self._async_pool()
        try:
            async with pool.connection() as conn:
                cur = await conn.execute(self.sql.get, {"scope": scope, "key": key}, binary=True)
                row = await cur.fetchone()
            return None if row is None else _record(scope, key, row, 0)
        except (psycopg.Error, RecordFormatError) as exc:
            raise self._error("get", exc) from exc

    async def _wait_check(self, scope: str, key: str) -> tuple[bool, Record | None]:
        pool = await self._async_pool()
        try:
            async with pool.connection() as conn:
                cur = await conn.execute(
                    self.sql.wait_check, {"scope": scope, "key": key}, binary=True
                )
                row = await cur.fetchone()
            return (False, None) if row is None else (row[0], _record(scope, key, row, 1))
        except (psycopg.Error, RecordFormatError) as exc:
            raise self._error("wait", exc) from exc

    async def _async_listener(self) -> _AsyncListener | None:
        listener = self._alistener
        if listener is not None and not listener.failed:
            return listener
        if time.monotonic() < self._alisten_retry_at:
            return None
        starting = self._alistener_starting
        if starting is None:
            await self._async_pool()  # binds this store to the running loop first
            starting = asyncio.ensure_future(
                _AsyncListener.start(self._conninfo, self._kwargs, self.sql.channel)
            )
            self._alistener_starting = starting
        try:
            listener = await asyncio.shield(starting)
        except (psycopg.Error, OSError) as exc:
            log.warning("postgres LISTEN unavailable, waiters poll: %s", exc)
            self._alisten_retry_at = time.monotonic() + LISTEN_RETRY
            return None
        finally:
            if self._alistener_starting is starting and starting.done():
                self._alistener_starting = None
        if self._alistener is not listener:
            old, self._alistener = self._alistener, listener
            if old is not None:
                await old.aclose()
        return listener

    async def wait(self, scope: str, key: str, timeout: float) -> Record | None:
        deadline = time.monotonic() + timeout
        listener = await self._async_listener()
        if listener is None:
            return await poll_until_settled(lambda: self.get(scope, key), timeout)
        payload = wake_payload(scope, key)
        event = asyncio.Event()
        listener.add(payload, event)  # before the read below: no lost wakeup
        try:
            delay = POLL_FIRST_DELAY
            while True:
                armed, record = await self._wait_check(scope, key)
                remaining = deadline - time.monotonic()
                if _settled(record) or remaining <= 0:
                    return record
                if armed and not listener.failed:
                    pause = min(remaining, WAIT_RECHECK)
                else:  # not marked (the row was locked) or no listener: poll
                    pause = min(remaining, delay)
                    delay = min(delay * 2, POLL_MAX_DELAY)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), pause)
                event.clear()
        finally:
            listener.discard(payload, event)

    async def purge_expired(self) -> int:
        pool = await self._async_pool()
        total = 0
        try:
            for _ in range(PURGE_MAX_BATCHES):
                async with pool.connection() as conn:
                    cur = await conn.execute(self.sql.purge, {"batch": self.purge_batch})
                total += cur.rowcount
                if cur.rowcount < self.purge_batch:
                    break
        except psycopg.Error as exc:
            raise self._error("purge", exc) from exc
        return total

    async def stats(self) -> StoreStats:
        pool = await self._async_pool()
        try:
            async with pool.connection() as conn, conn.transaction():
                await conn.execute(_SCAN_WHOLE_TABLE, prepare=False)
                cur = await conn.execute(self.sql.stats)
                return _stats(await cur.fetchone())
        except psycopg.Error as exc:
            raise self._error("stats", exc) from exc

    async def complete_in_transaction(
        self,
        connection: psycopg.AsyncConnection[Any],
        scope: str,
        key: str,
        token: str,
        response: StoredResponse,
    ) -> bool:
        """Complete on your connection, inside your open transaction, without committing.

        The record then commits or rolls back with your writes (SPEC §3, transactional
        completion). False: the token no longer holds the lease; roll back. Errors are
        psycopg's own: the transaction is yours.
        """
        params = {"scope": scope, "key": key, "token": token, "response": encode_response(response)}
        # Not prepared: your connection lacks PLANNER_SETTINGS, so a plan kept from a table
        # once empty could scan it whole; a plan made each time sees its size.
        cur = await connection.execute(self.sql.complete, params, prepare=False)
        return cur.rowcount == 1

    async def _sweep_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                purged = await self.purge_expired()
            except StoreError as exc:
                log.warning("oncely sweeper: %s", exc)
            else:
                if purged:
                    log.debug("oncely sweeper purged %d expired records", purged)

    async def aclose(self) -> None:
        task, self._sweeper_task = self._sweeper_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        listener, self._alistener = self._alistener, None
        if listener is not None:
            await listener.aclose()
        pool = self._apool
        if pool is not None and self._user_apool is None and self._aloop is not None:
            self._apool = None
            await pool.close()
        self._aloop = self._aready = None
        self.close()

    # sync twins ------------------------------------------------------------------------

    def claim_sync(
        self, scope: str, key: str, fingerprint: str, token: str, *, lease: float, retention: float
    ) -> ClaimResult:
        params = {
            "scope": scope,
            "key": key,
            "fingerprint": fingerprint,
            "token": token,
            "lease": float(lease),
            "retention": float(retention),
        }
        pool = self._sync_pool()
        try:
            for _ in range(CLAIM_ATTEMPTS):
                with pool.connection() as conn:
                    row = conn.execute(self.sql.claim, params, binary=True).fetchone()
                if row is not None:
                    return _claim_result(scope, key, token, row)
        except (psycopg.Error, RecordFormatError) as exc:
            raise self._error("claim", exc) from exc
        raise StoreError(f"postgres store {self.sql.table}: claim kept racing, gave up")

    def complete_sync(self, scope: str, key: str, token: str, response: StoredResponse) -> bool:
        params = {"scope": scope, "key": key, "token": token, "response": encode_response(response)}
        pool = self._sync_pool()
        try:
            with pool.connection() as conn:
                return conn.execute(self.sql.complete, params).rowcount == 1
        except psycopg.Error as exc:
            raise self._error("complete", exc) from exc

    def release_sync(self, scope: str, key: str, token: str) -> bool:
        pool = self._sync_pool()
        try:
            with pool.connection() as conn:
                params = {"scope": scope, "key": key, "token": token}
                return conn.execute(self.sql.release, params).rowcount == 1
        except psycopg.Error as exc:
            raise self._error("release", exc) from exc

    def renew_sync(self, scope: str, key: str, token: str, *, lease: float) -> bool:
        params = {"scope": scope, "key": key, "token": token, "lease": float(lease)}
        pool = self._sync_pool()
        try:
            with pool.connection() as conn:
                return conn.execute(self.sql.renew, params).rowcount == 1
        except psycopg.Error as exc:
            raise self._error("renew", exc) from exc

    def get_sync(self, scope: str, key: str) -> Record | None:
        pool = self._sync_pool()
        try:
            with pool.connection() as conn:
                params = {"scope": scope, "key": key}
                row = conn.execute(self.sql.get, params, binary=True).fetchone()
            return None if row is None else _record(scope, key, row, 0)
        except (psycopg.Error, RecordFormatError) as exc:
            raise self._error("get", exc) from exc

    def _wait_check_sync(self, scope: str, key: str) -> tuple[bool, Record | None]:
        pool = self._sync_pool()
        try:
            with pool.connection() as conn:
                params = {"scope": scope, "key": key}
                row = conn.execute(self.sql.wait_check, params, binary=True).fetchone()
            return (False, None) if row is None else (row[0], _record(scope, key, row, 1))
        except (psycopg.Error, RecordFormatError) as exc:
            raise self._error("wait", exc) from exc

    def _sync_listener(self) -> _SyncListener | None:
        listener = self._listener
        if listener is not None and not listener.failed:
            return listener
        with self._lock:
            listener = self._listener
            if listener is not None and not listener.failed:
                return listener
            if time.monotonic() < self._listen_retry_at:
                return None
            try:
                listener = _SyncListener(self._conninfo, self._kwargs, self.sql.channel)
            except (psycopg.Error, OSError) as exc:
                log.warning("postgres LISTEN unavailable, waiters poll: %s", exc)
                self._listen_retry_at = time.monotonic() + LISTEN_RETRY
                return None
            old, self._listener = self._listener, listener
        if old is not None:
            old.close()
        return listener

    def wait_sync(self, scope: str, key: str, timeout: float) -> Record | None:
        deadline = time.monotonic() + timeout
        self._sync_pool()  # the first use creates the schema, before LISTEN
        listener = self._sync_listener()
        if listener is None:
            return poll_until_settled_sync(lambda: self.get_sync(scope, key), timeout)
        payload = wake_payload(scope, key)
        event = threading.Event()
        listener.add(payload, event)  # before the read below: no lost wakeup
        try:
            delay = POLL_FIRST_DELAY
            while True:
                armed, record = self._wait_check_sync(scope, key)
                remaining = deadline - time.monotonic()
                if _settled(record) or remaining <= 0:
                    return record
                if armed and not listener.failed:
                    pause = min(remaining, WAIT_RECHECK)
                else:
                    pause = min(remaining, delay)
                    delay = min(delay * 2, POLL_MAX_DELAY)
                event.wait(pause)
                event.clear()
        finally:
            listener.discard(payload, event)

    def purge_expired_sync(self) -> int:
        """Delete expired records in bounded batches (`oncely purge`)."""
        pool = self._sync_pool()
        total = 0
        try:
            for _ in range(PURGE_MAX_BATCHES):
                with pool.connection() as conn:
                    deleted = conn.execute(self.sql.purge, {"batch": self.purge_batch}).rowcount
                total += deleted
                if deleted < self.purge_batch:
                    break
        except psycopg.Error as exc:
            raise self._error("purge", exc) from exc
        return total

    def stats_sync(self) -> StoreStats:
        pool = self._sync_pool()
        try:
            with pool.connection() as conn, conn.transaction():
                conn.execute(_SCAN_WHOLE_TABLE, prepare=False)
                return _stats(conn.execute(self.sql.stats).fetchone())
        except psycopg.Error as exc:
            raise self._error("stats", exc) from exc

    def complete_in_transaction_sync(
        self,
        connection: psycopg.Connection[Any],
        scope: str,
        key: str,
        token: str,
        response: StoredResponse,
    ) -> bool:
        """The sync twin of `complete_in_transaction`: runs on your connection, never commits."""
        params = {"scope": scope, "key": key, "token": token, "response": encode_response(response)}
        return connection.execute(self.sql.complete, params, prepare=False).rowcount == 1

    def start_sweeper(self, interval: float) -> None:
        """Purge expired records every `interval` seconds until the store is closed.

        Inside a running event loop this is a task on that loop; elsewhere a daemon thread.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._start_sweeper_thread(interval)
            return
        if self._sweeper_task is None:
            self._sweeper_task = loop.create_task(self._sweep_forever(interval))

    def _start_sweeper_thread(self, interval: float) -> None:
        if self._sweeper_thread is not None and self._sweeper_thread.is_alive():
            return
        stop = threading.Event()

        def sweep() -> None:
            while not stop.wait(interval):
                try:
                    self.purge_expired_sync()
                except StoreError as exc:
                    log.warning("oncely sweeper: %s", exc)

        self._sweeper_stop = stop
        self._sweeper_thread = threading.Thread(target=sweep, name="oncely-sweeper", daemon=True)
        self._sweeper_thread.start()

    def close(self) -> None:
        """Close the sync side (and what aclose() leaves). Pools passed in stay open."""
        stop, thread = self._sweeper_stop, self._sweeper_thread
        self._sweeper_stop = self._sweeper_thread = None
        if stop is not None:
            stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        pool = self._pool
        if pool is not None and self._user_pool is None:
            self._pool = None
            self._sready_pid = 0
            if self._pool_pid == os.getpid():
                pool.close()
