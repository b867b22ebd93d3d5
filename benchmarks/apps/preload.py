"""Put N live, completed records into a store before a scale run, in the store's own format.

Shared stores (SQLite, Redis, PostgreSQL) are filled directly with bulk writes; a memory
store is filled inside the server process (it lives there) through its own methods.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
import uuid
from typing import Any

from oncely.core.records import StoredResponse, encode_response

SCOPE = "anonymous"  # oncely's scope for a request without credentials
RETENTION = 24 * 3600.0
BODY = b'{"id":"pay_0","amount":1000,"currency":"EUR","status":"accepted"}'
RESPONSE = StoredResponse(
    201,
    ((b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())),
    BODY,
)


def _key(index: int) -> str:
    """A random-looking UUID, as clients send (the same as PostgreSQL's preload makes)."""
    return str(uuid.UUID(bytes=hashlib.md5(b"preload-%d" % index).digest()))


def _fingerprint(index: int) -> str:
    return hashlib.blake2b(str(index).encode(), digest_size=16).hexdigest()


def memory_store(store: Any, count: int) -> None:
    if count <= 0 or not hasattr(store, "claim_sync") or type(store).__name__ != "MemoryStore":
        return
    for index in range(count):
        key, token = _key(index), f"{index:032x}"
        store.claim_sync(SCOPE, key, _fingerprint(index), token, lease=30.0, retention=RETENTION)
        store.complete_sync(SCOPE, key, token, RESPONSE)


def sqlite(path: str, count: int, *, batch: int = 50_000) -> None:
    from oncely.stores.sqlite import TABLE, SQLiteStore

    store = SQLiteStore(path, synchronous="OFF")
    db = store.connect()
    blob = encode_response(RESPONSE)
    now = time.time()
    sql = (
        f"INSERT OR REPLACE INTO {TABLE} (scope, key, fingerprint, state, token, attempts, "
        "created_at, expires_at, lease_expires_at, response) VALUES (?,?,?,1,?,1,?,?,NULL,?)"
    )
    for start in range(0, count, batch):
        rows = [
            (SCOPE, _key(i), _fingerprint(i), f"{i:032x}", now, now + RETENTION, blob)
            for i in range(start, min(count, start + batch))
        ]
        db.execute("BEGIN")
        db.executemany(sql, rows)
        db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    store.close()


def _resp(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


def redis(url: str, prefix: str, count: int, *, port: int) -> None:
    """HSET + PEXPIREAT per record, streamed through `redis-cli --pipe`."""
    from oncely.stores.redis import RedisStore

    cli = shutil.which("redis-cli")
    if cli is None:
        raise RuntimeError("redis-cli is needed to preload Redis (apt-get install redis-tools)")
    store = RedisStore(url, prefix=prefix)
    blob = encode_response(RESPONSE)
    now_ms = int(time.time() * 1000)
    expires = now_ms + int(RETENTION * 1000)
    now_b, exp_b = str(now_ms).encode(), str(expires).encode()
    chunks: list[bytes] = []
    for index in range(count):
        name = store.record_key(SCOPE, _key(index)).encode()
        fields = (
            b"st", b"1", b"f", _fingerprint(index).encode(), b"t", f"{index:032x}".encode(),
            b"a", b"1", b"c", now_b, b"e", exp_b, b"s", SCOPE.encode(),
            b"k", _key(index).encode(), b"r", blob,
        )  # fmt: skip
        chunks.append(_resp(b"HSET", name, *fields))
        chunks.append(_resp(b"PEXPIREAT", name, exp_b))
    done = subprocess.run(
        [cli, "-h", "127.0.0.1", "-p", str(port), "--pipe"],
        input=b"".join(chunks),
        capture_output=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0 or b"errors: 0" not in done.stdout:
        raise RuntimeError(f"redis preload failed: {done.stdout[-300:]!r} {done.stderr[-300:]!r}")


def postgres(url: str, table: str, count: int) -> None:
    import psycopg

    from oncely.stores.postgres import PostgresStore

    store = PostgresStore(url, table=table)
    store.init_schema_sync()
    store.close()
    blob = encode_response(RESPONSE)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            f"""
            INSERT INTO "{table}" (scope, key, fingerprint, state, token, attempts,
                                   created_at, expires_at, lease_expires_at, waiting, response)
            SELECT %(scope)s, md5('preload-' || i)::uuid::text, md5(i::text), 1, md5('t' || i), 1,
                   extract(epoch FROM now()), extract(epoch FROM now()) + %(retention)s,
                   NULL, false, %(blob)s
            FROM generate_series(0, %(count)s - 1) AS i
            ON CONFLICT (scope, key) DO NOTHING
            """,
            {"scope": SCOPE, "retention": RETENTION, "blob": blob, "count": count},
        )
        conn.execute(f'VACUUM ANALYZE "{table}"')
