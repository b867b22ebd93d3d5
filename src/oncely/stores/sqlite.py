"""SQLite store: the embedded default. Durable, and safe for several worker processes
sharing one database file (WAL, BEGIN IMMEDIATE, busy timeout).

The sync twins do the work on a per-thread connection; the async methods run them on
one dedicated thread so the event loop never blocks on the file lock or an fsync.

Only completions wait for an fsync. With `synchronous="FULL"` (or "EXTRA") the store's
own connections commit like "NORMAL" (no fsync) and a commit that completed a record
is followed by one fdatasync of the WAL file before it is reported: what FULL does at
every commit, paid only where it matters. A claim (or a release, or a renewal) lost to
a power cut changes nothing that a retry could tell apart: the handler that held the
claim died in the same power cut (the file is local to its host), and the retry runs
the handler again, as it would after taking over a claim that had survived. A
completion's fsync also covers the claim frames before it in the WAL.

A completed record that a claim found is kept in the process (`ReplayCache`): it cannot
change before it expires, so replaying the key again needs neither the file nor the
store's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from oncely.core.cache import BoundedCache
from oncely.core.decisions import Claimed, ClaimResult, ClaimTransition, Existing, claim_transition
from oncely.core.records import (
    Record,
    RecordFormatError,
    RecordState,
    StoredResponse,
    decode_response,
    encode_response,
)
from oncely.stores.base import (
    StoreError,
    StoreStats,
    poll_until_settled,
    poll_until_settled_sync,
    running_loop,
)

T = TypeVar("T")

TABLE = "oncely_records"
# A rowid table: rows are appended in the order they are claimed, and the (scope, key)
# index holds only the keys. Keys are random (UUIDs), so each claim writes one page of
# that small index at random; as a WITHOUT ROWID table the claim and the completion
# each wrote a random page of the whole table (56 against 41 µs of CPU per fresh
# claim + complete at a million records). A file made by an earlier version keeps its
# WITHOUT ROWID table: the statements are the same for both.
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state INTEGER NOT NULL,
    token TEXT,
    attempts INTEGER NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    lease_expires_at REAL,
    response BLOB,
    PRIMARY KEY (scope, key)
);
CREATE INDEX IF NOT EXISTS {TABLE}_expires_at ON {TABLE} (expires_at);
"""
_COLUMNS = (
    "scope, key, fingerprint, state, token, attempts, created_at, expires_at, "
    "lease_expires_at, response"
)
SELECT_RECORD = f"SELECT {_COLUMNS} FROM {TABLE} WHERE scope = ? AND key = ?"
UPSERT_CLAIM = f"""
INSERT INTO {TABLE} ({_COLUMNS}) VALUES (?, ?, ?, 0, ?, 1, ?, ?, ?, NULL)
ON CONFLICT (scope, key) DO UPDATE SET
    fingerprint = excluded.fingerprint, state = 0, token = excluded.token, attempts = 1,
    created_at = excluded.created_at, expires_at = excluded.expires_at,
    lease_expires_at = excluded.lease_expires_at, response = NULL
"""
TAKE_OVER = f"""
UPDATE {TABLE} SET token = ?, attempts = attempts + 1, lease_expires_at = ?
WHERE scope = ? AND key = ?
"""
# Fenced statements: only the current lease holder of an in-flight record matches.
COMPLETE = f"""
UPDATE {TABLE} SET state = 1, lease_expires_at = NULL, response = ?
WHERE scope = ? AND key = ? AND token = ? AND state = 0
"""
RELEASE = f"DELETE FROM {TABLE} WHERE scope = ? AND key = ? AND token = ? AND state = 0"
RENEW = f"""
UPDATE {TABLE} SET lease_expires_at = ?
WHERE scope = ? AND key = ? AND token = ? AND state = 0 AND expires_at > ?
"""
PURGE_BATCH = f"""
DELETE FROM {TABLE} WHERE (scope, key) IN (
    SELECT scope, key FROM {TABLE} WHERE expires_at <= ? LIMIT ?
)
"""
STATS = f"""
SELECT
    SUM(expires_at > :now AND state = 0),
    SUM(expires_at > :now AND state = 1),
    SUM(expires_at <= :now),
    MIN(CASE WHEN expires_at > :now AND state = 0 THEN created_at END)
FROM {TABLE}
"""

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]

REPLAYS_KEPT = 4096  # completed records kept in the process for repeated replays
REPLAY_BYTES_KEPT = 16 * 1024 * 1024  # and at most this many bytes of their responses


class ReplayCache(BoundedCache[tuple[str, str], Record]):
    """Completed records that a claim found, kept in this process, so that the next
    claim of the same key is answered without a hand-off to the store's thread.

    A completed record never changes until it expires: completions, take-overs and
    releases match in-flight records only, and nothing but a claim after expiry or a
    purge of expired records replaces or removes one. So a kept record is what the file
    holds for as long as it is live, in any process. Oldest first out, within a count
    and a byte budget; only replays fill it, so fresh requests never pay for it.
    """

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(REPLAYS_KEPT, REPLAY_BYTES_KEPT)

    def live(self, scope: str, key: str, now: float) -> Record | None:
        record = self.by_key.get((scope, key))
        if record is None:
            return None
        if record.expires_at > now:
            return record
        self.drop((scope, key), record)  # expired: the key may be claimed again
        return None

    def keep(self, record: Record) -> None:
        response = record.response
        if record.state is not RecordState.COMPLETED or response is None:
            return
        if (record.scope, record.key) in self.by_key:
            return
        size = len(response.body) + sum(len(name) + len(value) for name, value in response.headers)
        self.put((record.scope, record.key), record, size)


_STATES = {state.value: state for state in RecordState}


def record_from_row(row: tuple[Any, ...]) -> Record:
    state = _STATES.get(row[3])
    if state is None:
        state = RecordState(row[3])  # raises: not a state
    blob = row[9]
    return Record(
        row[0],  # scope
        row[1],  # key
        row[2],  # fingerprint
        state,
        row[4],  # token
        row[5],  # attempts
        row[6],  # created_at
        row[7],  # expires_at
        row[8],  # lease_expires_at
        decode_response(blob) if blob is not None else None,
    )


class SQLiteStore:
    """`SQLiteStore("oncely.db")`. The table is created on first use.

    `synchronous="FULL"` (default) makes every completed record survive a power cut
    (one fdatasync per batch of completions; claims do not wait for one); "NORMAL"
    survives a process crash and never waits for an fsync at commit (WAL mode).
    """

    name = "sqlite"
    native_expiry = False

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 10.0,
        synchronous: Synchronous = "FULL",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self._busy_timeout = busy_timeout
        self._synchronous = synchronous
        self._completions_fsync = synchronous in ("FULL", "EXTRA")
        self._clock = clock
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._schema_ready = False
        self._committer: GroupCommitter | None = None
        self._wal_lock = threading.Lock()
        self._wal: tuple[int, int] | None = None  # (pid, fd) of the WAL file, once opened
        self._replays = ReplayCache()

    # connections ------------------------------------------------------------------

    def connect(self) -> sqlite3.Connection:
        """A new connection with oncely's settings (also for transactional completion:
        its commits are as durable as `synchronous` says)."""
        connection = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout,
            isolation_level=None,  # autocommit; claims open their own IMMEDIATE transaction
            check_same_thread=False,
        )
        connection.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
        try:
            self._set_up(lambda: connection.execute("PRAGMA journal_mode = WAL"))
            connection.execute(f"PRAGMA synchronous = {self._synchronous}")
            if not self._schema_ready:
                self._set_up(lambda: connection.executescript(SCHEMA))
                self._schema_ready = True
        except BaseException:
            connection.close()
            raise
        return connection

    def _set_up(self, statement: Callable[[], object]) -> None:
        """Run a setup statement, retrying while the file is locked. Connections that
        race to set up a new file can get SQLITE_BUSY at once, without the busy
        handler (switching to WAL needs an exclusive lock): wait as a busy handler would.
        """
        deadline = time.monotonic() + self._busy_timeout
        pause = 0.001
        while True:
            try:
                statement()
                return
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
                    raise
                if time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _internal_connection(self) -> sqlite3.Connection:
        """A connection of the store's own: its commits do not fsync (see the module
        docstring); `_make_durable` does after a completion."""
        connection = self.connect()
        if self._completions_fsync:
            connection.execute("PRAGMA synchronous = NORMAL")
        return connection

    def _make_durable(self) -> None:
        """fdatasync the WAL file: every frame committed before this call is on disk."""
        if not self._completions_fsync:
            return
        try:
            with self._wal_lock:
                wal = self._wal
                if wal is None or wal[0] != _pid:
                    # The WAL exists (a commit came first) and stays while our connection
                    # is open: SQLite removes it only when the last connection closes.
                    flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
                    wal = self._wal = (_pid, os.open(f"{self.path}-wal", flags))
                # fdatasync where there is one (not on macOS or Windows), as SQLite uses.
                getattr(os, "fdatasync", os.fsync)(wal[1])
        except OSError as exc:
            raise StoreError(f"sqlite store {self.path}: fsync: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._internal_connection()
            self._local.connection = connection
            with self._connections_lock:
                self._connections.append(connection)
        return connection

    def _run(self, operation: Callable[..., T], *args: Any) -> T:
        try:
            return operation(self._connection(), *args)
        except (sqlite3.Error, RecordFormatError) as exc:
            raise StoreError(f"sqlite store {self.path}: {exc}") from exc

    # the operations: each takes the connection first; the writer thread and the sync
    # twins run the same functions -----------------------------------------------------

    def _claim(
        self,
        db: sqlite3.Connection,
        scope: str,
        key: str,
        fingerprint: str,
        token: str,
        lease: float,
        retention: float,
    ) -> ClaimResult:
        """The claim, to run inside an IMMEDIATE transaction (it holds the write lock,
        so the read and the write are one atomic step across processes)."""
        now = self._clock()
        row = db.execute(SELECT_RECORD, (scope, key)).fetchone()
        existing = record_from_row(row) if row is not None else None
        transition = claim_transition(existing, fingerprint, now)
        if transition is ClaimTransition.INSERT:
            db.execute(
                UPSERT_CLAIM, (scope, key, fingerprint, token, now, now + retention, now + lease)
            )
            return Claimed(token, 1)
        assert existing is not None
        if transition is ClaimTransition.TAKE_OVER:
            db.execute(TAKE_OVER, (token, now + lease, scope, key))
            return Claimed(token, existing.attempts + 1, took_over=True)
        return Existing(existing, now)

    def _renew(
        self, db: sqlite3.Connection, scope: str, key: str, token: str, lease: float
    ) -> bool:
        now = self._clock()
        return db.execute(RENEW, (now + lease, scope, key, token, now)).rowcount == 1

    def _get(self, db: sqlite3.Connection, scope: str, key: str) -> Record | None:
        row = db.execute(SELECT_RECORD, (scope, key)).fetchone()
        if row is None or row[7] <= self._clock():
            return None
        return record_from_row(row)

    def _kept_replay(self, scope: str, key: str) -> Existing | None:
        """The completed record a claim found before, while it is live (`ReplayCache`)."""
        now = self._clock()
        record = self._replays.live(scope, key, now)
        return Existing(record, now) if record is not None else None

    # sync twins -------------------------------------------------------------------

    def claim_sync(
        self, scope: str, key: str, fingerprint: str, token: str, *, lease: float, retention: float
    ) -> ClaimResult:
        if self._replays.by_key and (kept := self._kept_replay(scope, key)) is not None:
            return kept
        claimed: ClaimResult = self._run(
            _in_transaction, self._claim, scope, key, fingerprint, token, lease, retention
        )
        if type(claimed) is Existing:
            self._replays.keep(claimed.record)
        return claimed

    def complete_sync(self, scope: str, key: str, token: str, response: StoredResponse) -> bool:
        completed = self._run(_complete, scope, key, token, encode_response(response))
        if completed:
            self._make_durable()
        return completed

    def complete_in_transaction_sync(
        self,
        connection: sqlite3.Connection,
        scope: str,
        key: str,
        token: str,
        response: StoredResponse,
    ) -> bool:
        """Complete on your connection to the same file, inside your open transaction,
        without committing: the record commits or rolls back with your writes (SPEC §3).

        False: the token no longer holds the lease; roll back. Errors are sqlite3's own.
        """
        return _complete(connection, scope, key, token, encode_response(response))

    def release_sync(self, scope: str, key: str, token: str) -> bool:
        return self._run(_release, scope, key, token)

    def renew_sync(self, scope: str, key: str, token: str, *, lease: float) -> bool:
        return self._run(self._renew, scope, key, token, lease)

    def get_sync(self, scope: str, key: str) -> Record | None:
        return self._run(self._get, scope, key)

    def wait_sync(self, scope: str, key: str, timeout: float) -> Record | None:
        return poll_until_settled_sync(lambda: self.get_sync(scope, key), timeout)

    def purge_expired_sync(self, batch: int = 5000) -> int:
        """Delete expired records in batches, so the write lock is held only briefly."""

        def purge(db: sqlite3.Connection) -> int:
            total = 0
            while True:
                deleted = db.execute(PURGE_BATCH, (self._clock(), batch)).rowcount
                total += deleted
                if deleted < batch:
                    return total

        return self._run(purge)

    def stats_sync(self) -> StoreStats:
        def stats(db: sqlite3.Connection) -> StoreStats:
            now = self._clock()
            in_flight, completed, expired, oldest = db.execute(STATS, {"now": now}).fetchone()
            return StoreStats(
                in_flight or 0,
                completed or 0,
                expired or 0,
                None if oldest is None else now - oldest,
            )

        return self._run(stats)

    def close(self) -> None:
        with self._connections_lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()
        self._local = threading.local()
        self._replays.clear()
        if self._committer is not None:
            self._committer.stop()
            self._committer = None
        with self._wal_lock:
            if self._wal is not None and self._wal[0] == _pid:
                os.close(self._wal[1])
            self._wal = None

    # async methods: the same operations, group-committed on the store's own thread ---

    def _submit(
        self,
        loop: asyncio.AbstractEventLoop,
        operation: Callable[..., T],
        *args: Any,
    ) -> asyncio.Future[T]:
        committer = self._committer
        if committer is None or committer.pid != _pid:  # new, or forked
            committer = self._committer = GroupCommitter(self)
        return committer.submit(loop, operation, args)

    async def claim(
        self, scope: str, key: str, fingerprint: str, token: str, *, lease: float, retention: float
    ) -> ClaimResult:
        # A replay seen before: no hand-off to the store's thread.
        if self._replays.by_key and (kept := self._kept_replay(scope, key)) is not None:
            return kept
        claimed: ClaimResult = await self._submit(
            running_loop(), self._claim, scope, key, fingerprint, token, lease, retention
        )
        if type(claimed) is Existing:
            self._replays.keep(claimed.record)
        return claimed

    async def complete(self, scope: str, key: str, token: str, response: StoredResponse) -> bool:
        blob = encode_response(response)
        return await self._submit(running_loop(), _complete, scope, key, token, blob)

    async def release(self, scope: str, key: str, token: str) -> bool:
        return await self._submit(running_loop(), _release, scope, key, token)

    async def renew(self, scope: str, key: str, token: str, *, lease: float) -> bool:
        return await self._submit(running_loop(), self._renew, scope, key, token, lease)

    async def get(self, scope: str, key: str) -> Record | None:
        return await self._submit(running_loop(), self._get, scope, key)

    async def wait(self, scope: str, key: str, timeout: float) -> Record | None:
        return await poll_until_settled(lambda: self.get(scope, key), timeout)

    async def purge_expired(self) -> int:
        return await asyncio.to_thread(self.purge_expired_sync)

    async def stats(self) -> StoreStats:
        return await asyncio.to_thread(self.stats_sync)

    async def aclose(self) -> None:
        self.close()


MAX_BATCH = 256  # operations per group commit: bounds how long the write lock is held

_pid = os.getpid()  # this process's id without a system call per operation


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def _in_transaction(db: sqlite3.Connection, operation: Callable[..., T], *args: Any) -> T:
    db.execute("BEGIN IMMEDIATE")  # takes the write lock
    try:
        result = operation(db, *args)
        db.execute("COMMIT")
        return result
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _complete(db: sqlite3.Connection, scope: str, key: str, token: str, blob: bytes) -> bool:
    return db.execute(COMPLETE, (blob, scope, key, token)).rowcount == 1


def _release(db: sqlite3.Connection, scope: str, key: str, token: str) -> bool:
    return db.execute(RELEASE, (scope, key, token)).rowcount == 1


Outcome = tuple["asyncio.Future[Any]", bool, Any]
# What the writer runs: the operation, its arguments after the connection, the future.
Pending = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]
# One event loop turn's operations, handed over together.
Chunk = tuple[asyncio.AbstractEventLoop, list[Pending]]
# Results on their way back to one event loop.
Delivery = tuple[asyncio.AbstractEventLoop, list[Outcome]]


class GroupCommitter:
    """The async path's thread: it runs every pending operation in one IMMEDIATE
    transaction and commits once, so concurrent requests share the commit. Results go
    back through each waiting future's own event loop, one wake-up per loop and batch:
    claims, releases and renewals at once, completions after the `WalSyncer` made them
    durable, while this thread commits the next batch.

    An event loop hands over what its callbacks submitted during one turn as one chunk,
    at the end of that turn: one hand-over (and at most one wake-up of this thread) per
    turn instead of one per operation, and batches as large as the load allows.
    """

    def __init__(self, store: SQLiteStore) -> None:
        self.pid = _pid
        self._store = store
        self._queue: queue.SimpleQueue[Chunk | None] = queue.SimpleQueue()
        self._pending: dict[asyncio.AbstractEventLoop, list[Pending]] = {}
        self._stopped = False
        self._syncer = WalSyncer(store) if store._completions_fsync else None
        self._thread = threading.Thread(target=self._serve, name="oncely-sqlite", daemon=True)
        self._thread.start()

    def submit(
        self, loop: asyncio.AbstractEventLoop, operation: Callable[..., T], args: tuple[Any, ...]
    ) -> asyncio.Future[T]:
        future: asyncio.Future[T] = loop.create_future()
        pending = self._pending.get(loop)
        if pending is None:
            pending = self._pending[loop] = []
            loop.call_soon(self._hand_over, loop)
        pending.append((operation, args, future))
        return future

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        pending = self._pending.pop(loop, None)
        if not pending:
            return
        if self._stopped:  # closed meanwhile: nothing will run them
            error = StoreError(f"sqlite store {self._store.path}: closed")
            _resolve([(future, False, error) for _, _, future in pending])
            return
        self._queue.put((loop, pending))

    def stop(self) -> None:
        self._stopped = True
        for loop in list(self._pending):  # submitted before the close: they still run
            pending = self._pending.pop(loop, None)
            if pending:
                self._queue.put((loop, pending))
        self._queue.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _serve(self) -> None:
        db: sqlite3.Connection | None = None
        stopping = False
        while not stopping:
            chunk = self._queue.get()
            if chunk is None:
                break
            batch, stopping = _drain(self._queue, chunk, _has_room)
            try:
                if db is None:
                    db = self._store._internal_connection()
                outcomes = _commit(db, batch)
            except sqlite3.Error as exc:
                error = StoreError(f"sqlite store {self._store.path}: {exc}")
                outcomes = [
                    (loop, [(future, False, error) for _, _, future in pending])
                    for loop, pending in batch
                ]
            else:
                if self._syncer is not None:
                    outcomes = self._syncer.defer_completions(batch, outcomes)
            _deliver(outcomes)
        if self._syncer is not None:
            self._syncer.stop()  # after the last batch: its completions are still synced
        if db is not None:
            db.close()


class WalSyncer:
    """The thread that makes committed completions durable (FULL, EXTRA): one fdatasync
    of the WAL for every completion committed before it began, then their results. The
    committer meanwhile runs the next batch, so claims never queue behind an fsync.
    """

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store
        self._queue: queue.SimpleQueue[list[Delivery] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="oncely-sqlite-wal", daemon=True)
        self._thread.start()

    def defer_completions(self, batch: list[Chunk], outcomes: list[Delivery]) -> list[Delivery]:
        """Keep the batch's completions (committed, not yet synced) until the next
        fdatasync; give back what can be delivered now."""
        now: list[Delivery] = []
        later: list[Delivery] = []
        for (loop, pending), (_, results) in zip(batch, outcomes, strict=True):
            ready: list[Outcome] = []
            waiting: list[Outcome] = []
            for (operation, _, _), result in zip(pending, results, strict=True):
                (waiting if operation is _complete else ready).append(result)
            if ready:
                now.append((loop, ready))
            if waiting:
                later.append((loop, waiting))
        if later:
            self._queue.put(later)
        return now

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is None:
                break
            # Everything committed so far shares this fsync.
            items, stopping = _drain(self._queue, item, lambda _: True)
            waiting = [delivery for deliveries in items for delivery in deliveries]
            try:
                self._store._make_durable()
            except StoreError as error:
                waiting = [
                    (loop, [(future, False, error) for future, _, _ in results])
                    for loop, results in waiting
                ]
            _deliver(waiting)


Item = TypeVar("Item")


def _drain(
    source: queue.SimpleQueue[Item | None], first: Item, has_room: Callable[[list[Item]], bool]
) -> tuple[list[Item], bool]:
    """`first` and what else is queued already, while `has_room`; True: stop came."""
    items = [first]
    while has_room(items):
        try:
            item = source.get_nowait()
        except queue.Empty:
            break
        if item is None:
            return items, True
        items.append(item)
    return items, False


def _has_room(batch: list[Chunk]) -> bool:
    return sum(len(pending) for _, pending in batch) < MAX_BATCH


def _commit(
    db: sqlite3.Connection, batch: list[Chunk]
) -> list[tuple[asyncio.AbstractEventLoop, list[Outcome]]]:
    delivered: list[tuple[asyncio.AbstractEventLoop, list[Outcome]]] = []
    db.execute("BEGIN IMMEDIATE")
    try:
        for loop, pending in batch:
            outcomes: list[Outcome] = []
            for operation, args, future in pending:
                try:
                    outcomes.append((future, True, operation(db, *args)))
                except RecordFormatError as exc:  # one bad record fails its own request only
                    outcomes.append((future, False, StoreError(f"sqlite store: {exc}")))
            delivered.append((loop, outcomes))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return delivered


def _deliver(delivered: list[tuple[asyncio.AbstractEventLoop, list[Outcome]]]) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[Outcome]] = {}
    for loop, outcomes in delivered:
        if loop in by_loop:
            by_loop[loop] += outcomes
        else:
            by_loop[loop] = outcomes
    for loop, outcomes in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that loop has closed: nobody waits
            loop.call_soon_threadsafe(_resolve, outcomes)


def _resolve(outcomes: list[Outcome]) -> None:
    for future, succeeded, value in outcomes:
        if future.done():  # the request was cancelled meanwhile
            continue
        if succeeded:
            future.set_result(value)
        else:
            future.set_exception(value)
