"""`benchmarks.run --patch` file: the SQLite store's threads and hand-offs alone.

The `+patched` SQLite server keeps the store's async path as it is (the loop turn's
operations handed to the committer thread, results handed back, completions through
the WAL syncer's thread) but runs each operation on a dict: no SQL, no transaction, no
fsync. Beside the unchanged store it shows what the hand-offs cost and what SQLite does:

    .venv-bench/bin/python -m benchmarks.run --patch benchmarks/experiments/sqlite_hops.py \\
        --variants fastapi/oncely-sqlite,fastapi/oncely-memory \\
        --scenarios fresh --scale 0 --no-wsgi --profile 0 --rounds 7

Other stores are untouched (their `+patched` twins measure the noise).
"""

from __future__ import annotations

import sqlite3
from typing import Any

import oncely.stores.sqlite as sqlite_store
from oncely.core.decisions import Claimed, ClaimResult, Existing
from oncely.core.records import Record, RecordState, decode_response

records: dict[tuple[str, str], Record] = {}


def claim(
    self: sqlite_store.SQLiteStore,
    db: sqlite3.Connection,
    scope: str,
    key: str,
    fingerprint: str,
    token: str,
    lease: float,
    retention: float,
) -> ClaimResult:
    now = self._clock()
    existing = records.get((scope, key))
    if existing is not None:
        return Existing(existing, now)
    records[(scope, key)] = Record(
        scope, key, fingerprint, RecordState.IN_FLIGHT, token, 1, now, now + retention, now + lease
    )
    return Claimed(token, 1)


def complete(db: sqlite3.Connection, scope: str, key: str, token: str, blob: bytes) -> bool:
    record = records.get((scope, key))
    if record is None or record.token != token:
        return False
    records[(scope, key)] = record._replace(
        state=RecordState.COMPLETED, lease_expires_at=None, response=decode_response(blob)
    )
    return True


def commit(db: sqlite3.Connection, batch: list[Any]) -> list[Any]:
    return [
        (loop, [(future, True, operation(db, *args)) for operation, args, future in pending])
        for loop, pending in batch
    ]


def no_fsync(self: sqlite_store.SQLiteStore) -> None:
    return None


sqlite_store.SQLiteStore._claim = claim  # type: ignore[method-assign]
sqlite_store._complete = complete
sqlite_store._commit = commit
sqlite_store.SQLiteStore._make_durable = no_fsync  # type: ignore[method-assign]
