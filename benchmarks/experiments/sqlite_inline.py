"""`benchmarks.run --patch` file: the SQLite store's claims and completions on the loop.

The `+patched` SQLite servers run each claim and each completion on the event loop's
own thread, in a transaction of its own, instead of handing it to the store's thread:

- the loop's connection waits for no lock (`busy_timeout = 0`): when another
  connection holds the write lock, the operation goes to the store's thread as before;
- it never checkpoints (`wal_autocheckpoint = 0`, a checkpoint may fsync): every 1,000
  commits a worker thread runs a passive checkpoint instead;
- with `synchronous="FULL"` a completion still waits for the `WalSyncer`'s fdatasync.

No hand-off for a claim, none for a completion under NORMAL, but no group commit
either: every operation pays its own transaction and its own WAL frames.

    .venv-bench/bin/python -m benchmarks.run --patch benchmarks/experiments/sqlite_inline.py \\
        --variants fastapi/bare,fastapi/oncely-sqlite,fastapi/oncely-sqlite-normal \\
        --scenarios fresh --scale 0 --no-wsgi --profile 0 --rounds 5
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import oncely.stores.sqlite as sqlite_store
from oncely.core.decisions import ClaimResult, Existing
from oncely.core.records import StoredResponse, encode_response
from oncely.stores.base import StoreError, running_loop

CHECKPOINT_EVERY = 1000
_local = threading.local()
_commits = [0]


def _loop_connection(store: sqlite_store.SQLiteStore) -> sqlite3.Connection:
    connection: sqlite3.Connection | None = getattr(_local, "connection", None)
    if connection is None:
        connection = store._internal_connection()
        connection.execute("PRAGMA busy_timeout = 0")
        connection.execute("PRAGMA wal_autocheckpoint = 0")
        _local.connection = connection
    return connection


def _locked(exc: sqlite3.OperationalError) -> bool:
    return exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _committed(store: sqlite_store.SQLiteStore) -> None:
    _commits[0] += 1
    if _commits[0] >= CHECKPOINT_EVERY:
        _commits[0] = 0
        asyncio.get_running_loop().run_in_executor(None, _checkpoint, store)


def _checkpoint(store: sqlite_store.SQLiteStore) -> None:
    connection = sqlite3.connect(store.path, isolation_level=None)
    try:
        connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
    finally:
        connection.close()


async def claim(
    self: sqlite_store.SQLiteStore,
    scope: str,
    key: str,
    fingerprint: str,
    token: str,
    *,
    lease: float,
    retention: float,
) -> ClaimResult:
    if self._replays.by_key and (kept := self._kept_replay(scope, key)) is not None:
        return kept
    args = (scope, key, fingerprint, token, lease, retention)
    try:
        claimed = sqlite_store._in_transaction(_loop_connection(self), self._claim, *args)
        _committed(self)
    except sqlite3.OperationalError as exc:
        if not _locked(exc):
            raise StoreError(f"sqlite store {self.path}: {exc}") from exc
        claimed = await self._submit(running_loop(), self._claim, *args)
    if type(claimed) is Existing:
        self._replays.keep(claimed.record)
    return claimed


async def complete(
    self: sqlite_store.SQLiteStore, scope: str, key: str, token: str, response: StoredResponse
) -> bool:
    blob = encode_response(response)
    loop = running_loop()
    try:
        completed = sqlite_store._complete(_loop_connection(self), scope, key, token, blob)
        _committed(self)
    except sqlite3.OperationalError as exc:
        if not _locked(exc):
            raise StoreError(f"sqlite store {self.path}: {exc}") from exc
        return await self._submit(loop, sqlite_store._complete, scope, key, token, blob)
    committer = self._committer
    if completed and self._completions_fsync:
        if committer is None or committer.pid != sqlite_store._pid:
            committer = self._committer = sqlite_store.GroupCommitter(self)
        syncer = committer._syncer
        assert syncer is not None
        durable: asyncio.Future[bool] = loop.create_future()
        syncer._queue.put([(loop, [(durable, True, True)])])
        return await durable
    return completed


sqlite_store.SQLiteStore.claim = claim  # type: ignore[method-assign]
sqlite_store.SQLiteStore.complete = complete  # type: ignore[method-assign]
