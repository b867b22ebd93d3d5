"""Redis store: one Lua script per operation, Redis Cluster ready. Needs `oncely[redis]`.

Layout: one hash per record at `<prefix>:{<digest>}`, where the digest is a 128-bit
BLAKE2b of (scope, key). Keys may hold any visible ASCII, `{` and `}` included, so they
never go into the key name: the hash tag is the digest, which puts the record and its
notification channel in one cluster slot. The hash keeps the real scope and key.

    s, k   scope, key            st  state: "0" in flight, "1" completed
    f      fingerprint           t   lease token          a  attempts
    c, e   created / expires     l   lease expires (absent once completed)
    r      the encoded response (binary, see `oncely.core.records`)

Times are integer milliseconds from the server's `TIME`, read inside the scripts, so the
workers' clocks never matter. Retention is the key's native expiry (PEXPIREAT, set at
insert; a take-over keeps it). `purge_expired` has nothing to do.

Waiting (SPEC §3) uses pub/sub: complete and release publish on `<record key>|done`
(PUBLISH on a single server, SPUBLISH on a cluster, so the message stays in the slot's
shard). `wait` subscribes, confirms the subscription, and only then reads the record, so
a completion can not slip between the read and the subscription. If pub/sub fails (or
redis-py is too old for asyncio cluster pub/sub), it polls with backoff.

The asyncio methods of a store made from a URL share round trips: concurrent script
calls go out as one pipeline on a connection the store keeps for them (`_Lane`), one
batch at a time, each call keeping its own reply or error. Measured in process (32 tasks,
uvloop, hiredis): client CPU per fresh claim + complete about 240 -> 65 us, per replay
about 150 -> 55 us. Install `oncely[hiredis]`: without it, redis-py's pure-Python parser
and packer cost about a third more per fresh request and twice as much per replay.

`stats` SCANs `<prefix>:{*}` on every master and reads each record's state in
pipelined batches: O(all keys in the database), an operator's command, not a request's.

URLs: `redis://`, `rediss://`, `unix://`, `redis+cluster://host:port`; a `prefix` query
parameter (`redis://host/0?prefix=myapp`) namespaces the keys. Needs Redis >= 6 (scripts
that read TIME before writing); Redis 7 for sharded pub/sub on a cluster.
"""

from __future__ import annotations

import asyncio
import codecs
import hashlib
import importlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.cluster
import redis.retry
from redis.asyncio.connection import AbstractConnection
from redis.backoff import ConstantBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

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
    running_loop,
)
from oncely.stores.urls import redact_url

T = TypeVar("T")

SyncClient: TypeAlias = "redis.Redis | redis.cluster.RedisCluster"
AsyncClient: TypeAlias = "redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster"

# Everything a driver may raise for "the store could not answer". RedisClusterException
# (no reachable node, slot not covered) is not a RedisError.
_DRIVER_ERRORS = (RedisError, RedisClusterException, OSError)
_DATA_ERRORS = (ValueError, TypeError, AttributeError, IndexError, RecordFormatError)

# --- Lua ---------------------------------------------------------------------------
# Every script reads the server clock itself; replies are flat arrays.
# A record reply is {code, now, st, f, t, a, c, e, l, r}: code 0 = existing record.

_NOW = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"

# claim_transition (oncely.core.decisions), atomically. ARGV: fingerprint, token,
# lease ms, retention ms, scope, key. Replies {1, now, attempt} inserted, {2, now,
# attempt} taken over, or a record reply. A claim re-sent with its own token (a driver
# retry after a lost reply) is recognised, so it does not report itself as in flight.
CLAIM_LUA = (
    _NOW
    + """
local r = redis.call('HMGET', KEYS[1], 'st', 'f', 't', 'a', 'c', 'e', 'l', 'r')
local e = tonumber(r[6])
if not e or e <= now then
  if r[1] then redis.call('DEL', KEYS[1]) end
  local expires = now + tonumber(ARGV[4])
  redis.call('HSET', KEYS[1], 'st', '0', 'f', ARGV[1], 't', ARGV[2], 'a', 1, 'c', now,
    'e', expires, 'l', now + tonumber(ARGV[3]), 's', ARGV[5], 'k', ARGV[6])
  redis.call('PEXPIREAT', KEYS[1], expires)
  return {1, now, 1}
end
if r[1] == '0' then
  if r[3] == ARGV[2] then return {1, now, tonumber(r[4])} end
  local lease = tonumber(r[7])
  if r[2] == ARGV[1] and lease and lease <= now then
    local attempt = tonumber(r[4]) + 1
    redis.call('HSET', KEYS[1], 't', ARGV[2], 'a', attempt, 'l', now + tonumber(ARGV[3]))
    return {2, now, attempt}
  end
end
return {0, now, r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8]}
"""
)

GET_LUA = (
    _NOW
    + """
local r = redis.call('HMGET', KEYS[1], 'st', 'f', 't', 'a', 'c', 'e', 'l', 'r')
return {0, now, r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8]}
"""
)

# Fenced: only the token holder of an in-flight record. ARGV: token, response, publish
# command. pcall: a server without SPUBLISH must not fail the completion itself.
COMPLETE_LUA = """
local r = redis.call('HMGET', KEYS[1], 'st', 't')
if r[1] ~= '0' or r[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'st', '1', 'r', ARGV[2])
redis.call('HDEL', KEYS[1], 'l')
redis.pcall(ARGV[3], KEYS[1] .. '|done', '1')
return 1
"""

# ARGV: token, publish command.
RELEASE_LUA = """
local r = redis.call('HMGET', KEYS[1], 'st', 't')
if r[1] ~= '0' or r[2] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.pcall(ARGV[2], KEYS[1] .. '|done', '0')
return 1
"""

# ARGV: token, lease ms. Only while the record is live.
RENEW_LUA = (
    """
local r = redis.call('HMGET', KEYS[1], 'st', 't', 'e')
if r[1] ~= '0' or r[2] ~= ARGV[1] then return 0 end
"""
    + _NOW
    + """
if tonumber(r[3]) <= now then return 0 end
redis.call('HSET', KEYS[1], 'l', now + tonumber(ARGV[2]))
return 1
"""
)

NOW_LUA = _NOW + "return now\n"


@dataclass(frozen=True, slots=True)
class Script:
    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> Script:
        return cls(source, hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest())


CLAIM = Script.of(CLAIM_LUA)
GET = Script.of(GET_LUA)
COMPLETE = Script.of(COMPLETE_LUA)
RELEASE = Script.of(RELEASE_LUA)
RENEW = Script.of(RENEW_LUA)
NOW = Script.of(NOW_LUA)


_Call: TypeAlias = tuple[Script, str, tuple[str | bytes | int, ...], "asyncio.Future[Any]"]


class _ScriptBatch:
    """Script calls sent together, in one pipeline."""

    __slots__ = ("calls", "expired", "loop", "task")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.calls: list[_Call] = []
        self.task: asyncio.Task[None] | None = None  # keeps the flush alive until it ends
        self.expired = False  # the batch outlived its deadline: its task was cancelled


class _Sender:
    """Per event loop: the batch gathering calls, and how many batches are out."""

    __slots__ = ("gathering", "loop", "on_wire")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.gathering: _ScriptBatch | None = None
        self.on_wire = 0


# Batches out at once per store and loop (a cluster's are not counted: they share no
# round trip). While one is out, new calls gather into the next batch, which leaves as
# soon as it is answered: under load, fewer and fuller round trips (measured at 32 tasks:
# about 6 calls a batch became about 17, and CPU per fresh claim + complete fell by about
# a fifth, with no loss of throughput); a lone call still goes at once.
_ON_WIRE = 1


def _load_packer() -> Callable[[Sequence[Any]], bytes] | None:
    """hiredis' command packer (the one redis-py's sync client uses), when installed."""
    try:
        packer: Callable[[Sequence[Any]], bytes] | None = getattr(
            importlib.import_module("hiredis"), "pack_command", None
        )
    except ImportError:
        return None
    return packer


_PACK = _load_packer()


class _Lane:
    """The connections a store made from a URL sends its script batches on.

    Made like its client's pooled connections, but with no socket timeout of their own:
    redis-py then arms no timer per reply read and starts no task per write, which
    cost more than the rest of a small batch. One timer per batch (`_run_on_lane`)
    bounds the whole exchange instead. A connection serves one batch at a time; the lane
    keeps the idle ones, so a batch skips the pool's checkout and bookkeeping too.
    Commands are packed by hiredis when it is installed (`oncely[hiredis]`), else by
    redis-py; replies are read by redis-py's parser (hiredis' when installed).
    """

    __slots__ = ("closed", "connect_timeout", "idle", "kwargs", "make", "owned", "pack", "timeout")

    def __init__(self, client: redis.asyncio.Redis) -> None:
        pool = client.connection_pool
        kwargs: dict[str, Any] = dict(pool.connection_kwargs)
        self.timeout: float | None = kwargs.get("socket_timeout")
        self.connect_timeout: float | None = kwargs.get("socket_connect_timeout")
        kwargs["socket_timeout"] = None
        self.kwargs = kwargs
        self.make: Callable[..., AbstractConnection] = pool.connection_class
        self.idle: list[AbstractConnection] = []
        self.owned: list[AbstractConnection] = []
        self.closed = False
        # hiredis packs only what the connection's encoder would: UTF-8, strict.
        encoding = codecs.lookup(kwargs.get("encoding", "utf-8")).name
        errors = kwargs.get("encoding_errors", "strict")
        self.pack = _PACK if encoding == "utf-8" and errors == "strict" else None

    def take(self) -> AbstractConnection:
        if self.idle:
            return self.idle.pop()
        connection = self.make(**self.kwargs)
        self.owned.append(connection)
        return connection

    def deadline(self, connection: AbstractConnection) -> float | None:
        """How long a batch on `connection` may take: the socket timeout, plus the
        connect timeout when it has to connect first."""
        if not self.timeout:
            return None
        if connection.is_connected:
            return self.timeout
        return self.timeout + (self.connect_timeout or self.timeout)

    async def aclose(self) -> None:
        self.closed = True
        owned, self.owned, self.idle = self.owned, [], []
        for connection in owned:
            with suppress(*_DRIVER_ERRORS, RuntimeError):
                await connection.disconnect()


def _expire(batch: _ScriptBatch) -> None:
    batch.expired = True
    if batch.task is not None:
        batch.task.cancel()


async def _exchange(
    connection: AbstractConnection,
    calls: Sequence[_Call],
    pack: Callable[[Sequence[Any]], bytes] | None,
) -> list[Any]:
    """EVALSHA for every call in one write, then each call's reply (or its error).
    Calls that met NOSCRIPT (a server that has not cached the script yet) go once more
    as EVAL, which runs and caches it."""
    # Bytes where they are constant: redis-py's own packer passes them through as they are.
    commands = [(b"EVALSHA", script.sha, b"1", key, *args) for script, key, args, _ in calls]
    replies = await _round_trip(connection, commands, pack)
    missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if missing:
        evals = [(b"EVAL", calls[i][0].source, b"1", calls[i][1], *calls[i][2]) for i in missing]
        again = await _round_trip(connection, evals, pack)
        for i, reply in zip(missing, again, strict=True):
            replies[i] = reply
    return replies


async def _round_trip(
    connection: AbstractConnection,
    commands: list[tuple[Any, ...]],
    pack: Callable[[Sequence[Any]], bytes] | None,
) -> list[Any]:
    """Send the commands, read their replies in order. On a broken connection (a pooled
    one the server closed), retried as the connection's `Retry` says, with only the
    commands not answered yet."""
    replies: list[Any] = []

    async def attempt() -> None:
        todo = commands[len(replies) :] if replies else commands
        if pack is None:
            payload: bytes | list[bytes] = connection.pack_commands(todo)
        elif len(todo) == 1:
            payload = pack(todo[0])
        else:
            payload = b"".join([pack(command) for command in todo])
        await connection.send_packed_command(payload)
        read, add = connection.read_response, replies.append
        for _ in todo:
            try:
                add(await read())
            except ResponseError as exc:  # this call's error; the others go on
                add(exc)

    async def broken(error: Exception) -> None:
        await connection.disconnect()

    await connection.retry.call_with_retry(attempt, broken)
    return replies


DEFAULT_PREFIX = "oncely"
_CLAIMED, _TOOK_OVER = 1, 2
_EMPTY_DIGEST = hashlib.blake2b(digest_size=16)
_RECHECK = 1.0  # a waiter re-reads the record this often even without a message
_SCAN_BATCH = 500


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _command(client: SyncClient) -> Callable[..., Any]:
    """`execute_command`, which redis-py leaves untyped."""
    execute: Callable[..., Any] = client.execute_command
    return execute


_STATES = {b"0": RecordState.IN_FLIGHT, b"1": RecordState.COMPLETED}


def _parse_record(scope: str, key: str, reply: Sequence[Any]) -> Record | None:
    """A record reply ({code, now, st, f, t, a, c, e, l, r}), or None when absent/expired."""
    state, fingerprint, token, attempts, created, expires, lease, blob = reply[2:10]
    if state is None or int(expires) <= int(reply[1]):
        return None
    known = _STATES.get(state)  # RecordState(int(...)) costs a microsecond
    return Record(
        scope=scope,
        key=key,
        fingerprint=fingerprint.decode(),
        state=RecordState(int(state)) if known is None else known,
        token=None if token is None else token.decode(),
        attempts=int(attempts),
        created_at=int(created) / 1000,
        expires_at=int(expires) / 1000,
        lease_expires_at=None if lease is None else int(lease) / 1000,
        response=None if blob is None else decode_response(blob),
    )


def _undecodable(exc: Exception) -> StoreError:
    return StoreError(f"redis store: undecodable record: {exc}")


def _claim_result(scope: str, key: str, token: str, reply: Sequence[Any]) -> ClaimResult:
    code = reply[0]
    if code in (_CLAIMED, _TOOK_OVER):
        return Claimed(token, int(reply[2]), took_over=code == _TOOK_OVER)
    record = _parse_record(scope, key, reply)
    if record is None:  # the script returns a record only when one is there
        raise ValueError("claim reported a record that is not there")
    return Existing(record, int(reply[1]) / 1000)


class RedisStore:
    """`RedisStore("redis://localhost:6379/0")`, `RedisStore("redis+cluster://node:7000")`,
    or `RedisStore(client)` with a `redis.Redis`, `redis.asyncio.Redis` or a cluster client.

    From a URL the store makes its own clients, each on first use (the asyncio one per
    event loop, so forked workers never share a connection) and closes them in
    `close`/`aclose`. Clients passed in stay the caller's to close. With only a sync
    client, the async methods run the sync ones on a thread; with only an asyncio client,
    pass `sync_client=` for the sync methods. Clients must not use `decode_responses`.

    `socket_timeout` bounds every operation, so an unresponsive server becomes a
    `StoreError` (a 503) in that time. Other keyword options go to redis-py.
    """

    name = "redis"
    native_expiry = True

    def __init__(
        self,
        url_or_client: str | SyncClient | AsyncClient,
        *,
        prefix: str | None = None,
        socket_timeout: float = 2.0,
        socket_connect_timeout: float | None = None,
        sync_client: SyncClient | None = None,
        async_client: AsyncClient | None = None,
        **client_options: Any,
    ) -> None:
        self._url: str | None = None
        self._sync: SyncClient | None = sync_client
        self._async: AsyncClient | None = async_client
        self._cluster = False
        if isinstance(url_or_client, str):
            self._url, self._cluster, url_prefix = self._parse_url(url_or_client)
            prefix = prefix or url_prefix
            self._options = {
                "socket_timeout": socket_timeout,
                "socket_connect_timeout": socket_connect_timeout or socket_timeout,
                **client_options,
            }
        elif isinstance(url_or_client, redis.Redis | redis.cluster.RedisCluster):
            self._sync = url_or_client
        elif isinstance(url_or_client, redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster):
            self._async = url_or_client
        else:
            raise TypeError(f"RedisStore needs a URL or a redis-py client, got {url_or_client!r}")
        for client in (self._sync, self._async):
            if client is None:
                continue
            self._cluster = isinstance(
                client, redis.cluster.RedisCluster | redis.asyncio.cluster.RedisCluster
            )
            if client.get_encoder().decode_responses:
                raise ValueError("RedisStore needs a client made with decode_responses=False")
        prefix = prefix or DEFAULT_PREFIX
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"a Redis key prefix can not hold braces: {prefix!r}")
        self.prefix = prefix
        self._owns_clients = self._url is not None
        self._async_loop: asyncio.AbstractEventLoop | None = None
        self._async_ready = not isinstance(self._async, redis.asyncio.cluster.RedisCluster)
        self._async_lock = asyncio.Lock()
        self._sender: _Sender | None = None
        self._lane: _Lane | None = None
        self._sync_lock = threading.Lock()
        self._publish = "SPUBLISH" if self._cluster else "PUBLISH"
        self._match = _glob_escape(prefix) + ":{*}"
        self._where = (
            redact_url(url_or_client)
            if isinstance(url_or_client, str)
            else type(url_or_client).__name__
        )

    @staticmethod
    def _parse_url(url: str) -> tuple[str, bool, str | None]:
        """(URL for redis-py, cluster?, the `prefix` query parameter if any)."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster"):
            raise ValueError(f"not a Redis URL: {url!r}")
        query = parse_qsl(parts.query, keep_blank_values=True)
        prefixes = [value for name, value in query if name == "prefix"]
        query = [(name, value) for name, value in query if name != "prefix"]
        # Rebuilt by hand: urlunsplit drops the empty host of unix:///path.
        rebuilt = f"{scheme.removesuffix('+cluster')}://{parts.netloc}{parts.path}"
        if query:
            rebuilt += "?" + urlencode(query)
        return rebuilt, scheme.endswith("+cluster"), prefixes[-1] if prefixes else None

    def record_key(self, scope: str, key: str) -> str:
        """The Redis key of (scope, key); its hash tag is a digest, safe for any key."""
        scope_bytes = scope.encode()
        digest = _EMPTY_DIGEST.copy()  # cheaper than a new blake2b(digest_size=16)
        digest.update(len(scope_bytes).to_bytes(4, "big") + scope_bytes + key.encode())
        return f"{self.prefix}:{{{digest.hexdigest()}}}"

    # clients ------------------------------------------------------------------------

    def _retry_backoff(self) -> ConstantBackoff:
        return ConstantBackoff(0.01)

    def sync_client(self) -> SyncClient:
        client = self._sync
        if client is not None:
            return client
        if self._url is None:
            raise RuntimeError(
                "RedisStore was given an asyncio client only; its sync methods need "
                "RedisStore(async_client, sync_client=redis.Redis(...)) or a URL"
            )
        with self._sync_lock:
            if self._sync is None:
                # One quick retry on a broken connection (a pooled one the server closed);
                # none on timeouts, which may have run the script already.
                retry = redis.retry.Retry(
                    self._retry_backoff(), 1, supported_errors=(redis.ConnectionError,)
                )
                options = {"retry": retry, **self._options}
                try:
                    if self._cluster:
                        self._sync = redis.cluster.RedisCluster.from_url(self._url, **options)
                    else:
                        self._sync = redis.Redis.from_url(self._url, **options)
                except _DRIVER_ERRORS as exc:  # a cluster client connects at once
                    raise self._error(exc) from exc
            return self._sync

    async def async_client(self) -> AsyncClient | None:
        """The asyncio client for the running loop; None means: use the sync one on a thread."""
        if self._url is not None and self._async_loop is not running_loop():
            # A client belongs to the loop that made it: a new loop gets a new client.
            retry = redis.asyncio.retry.Retry(
                self._retry_backoff(), 1, supported_errors=(redis.ConnectionError,)
            )
            options = {"retry": retry, **self._options}
            if self._cluster:
                self._async = redis.asyncio.cluster.RedisCluster.from_url(self._url, **options)
                self._lane = None
            else:
                self._async = redis.asyncio.Redis.from_url(self._url, **options)
                self._lane = _Lane(self._async)
            self._async_loop = asyncio.get_running_loop()
            self._async_ready = not self._cluster
            self._async_lock = asyncio.Lock()
        client = self._async
        if not self._async_ready and client is not None:
            # redis-py's asyncio cluster client breaks connections when many commands
            # race its lazy start-up: discover the topology once, before any command.
            async with self._async_lock:
                if not self._async_ready:
                    await cast(redis.asyncio.cluster.RedisCluster, client).initialize()
                    self._async_ready = True
        return client

    def _error(self, exc: Exception) -> StoreError:
        return StoreError(f"redis store {self._where}: {type(exc).__name__}: {exc}")

    # scripts: EVALSHA, and EVAL once when the server has not cached the script yet ---

    def _eval_sync(self, script: Script, key: str, *args: str | bytes | int) -> Any:
        execute = _command(self.sync_client())
        try:
            try:
                return execute("EVALSHA", script.sha, 1, key, *args)
            except NoScriptError:
                return execute("EVAL", script.source, 1, key, *args)
        except _DRIVER_ERRORS as exc:
            raise self._error(exc) from exc

    async def _eval(self, script: Script, key: str, *args: str | bytes | int) -> Any:
        """One script call. Concurrent calls share one pipeline: one socket write and
        one read for the lot, each call keeping its own reply and error. A batch goes
        out on the next loop iteration, or, while `_ON_WIRE` batches are already out,
        as soon as one of them is answered: it gathers the calls made meanwhile."""
        loop = running_loop()
        sender = self._sender
        if sender is None or sender.loop is not loop:
            sender = self._sender = _Sender(loop)
        batch = sender.gathering
        if batch is None:
            batch = sender.gathering = _ScriptBatch(loop)
            if sender.on_wire < _ON_WIRE or self._cluster:  # a cluster's calls go one by one
                self._send(sender, batch)
        future: asyncio.Future[Any] = loop.create_future()
        batch.calls.append((script, key, args, future))
        return await future

    def _send(self, sender: _Sender, batch: _ScriptBatch) -> None:
        sender.on_wire += 1
        batch.task = sender.loop.create_task(self._flush(sender, batch))

    async def _flush(self, sender: _Sender, batch: _ScriptBatch) -> None:
        if sender.gathering is batch:
            sender.gathering = None  # calls from now on gather in the next batch
        try:
            await self._flush_calls(batch)
        finally:
            sender.on_wire -= 1
            waiting = sender.gathering
            if waiting is not None and waiting.task is None:
                task = asyncio.current_task()
                if task is not None and task.cancelling():  # the loop is shutting down
                    sender.gathering = None
                    for *_, future in waiting.calls:
                        future.cancel()
                else:
                    self._send(sender, waiting)

    async def _flush_calls(self, batch: _ScriptBatch) -> None:
        calls = batch.calls
        try:
            client = await self.async_client()
            assert client is not None
            lane = self._lane
            if lane is not None:
                results = await self._run_on_lane(lane, batch)
            elif len(calls) == 1 or self._cluster:
                # Nothing to share, or a cluster (its pipelines split by slot): one by one.
                results = await asyncio.gather(
                    *(self._eval_one(client, s, k, *a) for s, k, a, _ in calls),
                    return_exceptions=True,
                )
            else:  # a client the caller made: its own pool and pipeline
                pipe = client.pipeline(transaction=False)
                for script, key, args, _ in calls:
                    pipe.execute_command("EVALSHA", script.sha, 1, key, *args)
                replies = await pipe.execute(raise_on_error=False)
                results = []
                for (script, key, args, _), reply in zip(calls, replies, strict=True):
                    if isinstance(reply, NoScriptError):  # first use on this server
                        results.append(await self._eval_one(client, script, key, *args))
                    else:
                        results.append(reply)
        except _DRIVER_ERRORS as exc:
            results = [exc] * len(calls)
        except asyncio.CancelledError:  # the loop is going away: so are the callers
            for *_, future in calls:
                future.cancel()
            raise
        except Exception as exc:  # a bug, not the store: each caller sees it
            results = [exc] * len(calls)
        for (_, _, _, future), result in zip(calls, results, strict=True):
            if future.done():  # the waiting request was cancelled
                continue
            if isinstance(result, _DRIVER_ERRORS):
                future.set_exception(self._error(result))
            elif isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _run_on_lane(self, lane: _Lane, batch: _ScriptBatch) -> list[Any]:
        """The batch on one of the lane's connections, within the batch's deadline."""
        connection = lane.take()
        deadline = lane.deadline(connection)
        timer = None if deadline is None else batch.loop.call_later(deadline, _expire, batch)
        finished = False
        try:
            replies = await _exchange(connection, batch.calls, lane.pack)
            finished = True
            return replies
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not batch.expired or task is None:
                raise
            task.uncancel()
            raise RedisTimeoutError(f"no reply within {deadline} s") from None
        finally:
            if timer is not None:
                timer.cancel()
            if lane.closed or not finished:  # or else it may be in the middle of a reply
                with suppress(*_DRIVER_ERRORS, RuntimeError):
                    await connection.disconnect(nowait=True)
            if not lane.closed:
                lane.idle.append(connection)

    @staticmethod
    async def _eval_one(
        client: AsyncClient, script: Script, key: str, *args: str | bytes | int
    ) -> Any:
        try:
            return await client.execute_command("EVALSHA", script.sha, 1, key, *args)
        except NoScriptError:
            return await client.execute_command("EVAL", script.source, 1, key, *args)

    def _decode(self, parse: Callable[[], T]) -> T:
        try:
            return parse()
        except _DATA_ERRORS as exc:
            raise _undecodable(exc) from exc

    # sync twins -------------------------------------------------------------------

    def claim_sync(
        self, scope: str, key: str, fingerprint: str, token: str, *, lease: float, retention: float
    ) -> ClaimResult:
        reply = self._eval_sync(
            CLAIM, self.record_key(scope, key),
            fingerprint, token, _ms(lease), _ms(retention), scope, key,
        )  # fmt: skip
        return self._decode(lambda: _claim_result(scope, key, token, reply))

    def complete_sync(self, scope: str, key: str, token: str, response: StoredResponse) -> bool:
        blob = encode_response(response)
        key_ = self.record_key(scope, key)
        return bool(self._eval_sync(COMPLETE, key_, token, blob, self._publish))

    def release_sync(self, scope: str, key: str, token: str) -> bool:
        return bool(self._eval_sync(RELEASE, self.record_key(scope, key), token, self._publish))

    def renew_sync(self, scope: str, key: str, token: str, *, lease: float) -> bool:
        return bool(self._eval_sync(RENEW, self.record_key(scope, key), token, _ms(lease)))

    def get_sync(self, scope: str, key: str) -> Record | None:
        reply = self._eval_sync(GET, self.record_key(scope, key))
        return self._decode(lambda: _parse_record(scope, key, reply))

    def wait_sync(self, scope: str, key: str, timeout: float) -> Record | None:
        deadline = time.monotonic() + timeout
        with self._subscription_sync(self.record_key(scope, key) + "|done", timeout) as pause:
            record = self.get_sync(scope, key)
            while record is not None and record.state is RecordState.IN_FLIGHT:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                pause(min(remaining, _RECHECK))
                record = self.get_sync(scope, key)
            return record

    def purge_expired_sync(self) -> int:
        return 0  # Redis expires records natively

    def stats_sync(self) -> StoreStats:
        """Scans `<prefix>:*` on every master: O(all keys), for operators, not requests."""
        client = self.sync_client()
        try:
            now = int(self._eval_sync_keyless(NOW))
            counter = _StatsCounter(now)
            batch: list[bytes] = []
            for name in client.scan_iter(match=self._match, count=1000, _type="hash"):
                batch.append(name)
                if len(batch) >= _SCAN_BATCH:
                    counter.add(self._hmget_sync(client, batch))
                    batch = []
            counter.add(self._hmget_sync(client, batch))
        except _DRIVER_ERRORS as exc:
            raise self._error(exc) from exc
        return self._decode(counter.stats)

    def _eval_sync_keyless(self, script: Script) -> Any:
        execute = _command(self.sync_client())
        try:
            return execute("EVALSHA", script.sha, 0)
        except NoScriptError:
            return execute("EVAL", script.source, 0)

    @staticmethod
    def _hmget_sync(client: SyncClient, names: list[bytes]) -> list[Any]:
        if not names:
            return []
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.hmget(name, ["st", "c", "e"])
        return cast(list[Any], pipe.execute())

    def close(self) -> None:
        """Close the clients the store made. Its asyncio client is closed here only when
        its loop is idle; from inside a loop, use `aclose`."""
        if not self._owns_clients:
            return
        if self._sync is not None:
            self._sync.close()
            self._sync = None
        client, loop, lane = self._async, self._async_loop, self._lane
        self._async = self._async_loop = self._lane = None
        if client is not None and loop is not None and not (loop.is_closed() or loop.is_running()):
            with suppress(*_DRIVER_ERRORS):
                loop.run_until_complete(_aclose_client(client, lane))

    # async methods ------------------------------------------------------------------

    async def _threaded(self, function: Callable[[], T]) -> T:
        return await asyncio.to_thread(function)

    async def claim(
        self, scope: str, key: str, fingerprint: str, token: str, *, lease: float, retention: float
    ) -> ClaimResult:
        # No lambdas here: a closure would turn every argument into a cell, for every claim.
        if self._async is None and self._url is None:
            return await self._claim_threaded(scope, key, fingerprint, token, lease, retention)
        reply = await self._eval(
            CLAIM, self.record_key(scope, key),
            fingerprint, token, _ms(lease), _ms(retention), scope, key,
        )  # fmt: skip
        try:
            return _claim_result(scope, key, token, reply)
        except _DATA_ERRORS as exc:
            raise _undecodable(exc) from exc

    async def _claim_threaded(
        self, scope: str, key: str, fingerprint: str, token: str, lease: float, retention: float
    ) -> ClaimResult:
        def claim() -> ClaimResult:
            return self.claim_sync(scope, key, fingerprint, token, lease=lease, retention=retention)

        return await self._threaded(claim)

    async def complete(self, scope: str, key: str, token: str, response: StoredResponse) -> bool:
        if self._async is None and self._url is None:
            return await self._complete_threaded(scope, key, token, response)
        blob = encode_response(response)
        key_ = self.record_key(scope, key)
        return bool(await self._eval(COMPLETE, key_, token, blob, self._publish))

    async def _complete_threaded(
        self, scope: str, key: str, token: str, response: StoredResponse
    ) -> bool:
        return await self._threaded(lambda: self.complete_sync(scope, key, token, response))

    async def release(self, scope: str, key: str, token: str) -> bool:
        if self._async is None and self._url is None:
            return await self._threaded(lambda: self.release_sync(scope, key, token))
        return bool(await self._eval(RELEASE, self.record_key(scope, key), token, self._publish))

    async def renew(self, scope: str, key: str, token: str, *, lease: float) -> bool:
        if self._async is None and self._url is None:
            return await self._threaded(lambda: self.renew_sync(scope, key, token, lease=lease))
        return bool(await self._eval(RENEW, self.record_key(scope, key), token, _ms(lease)))

    async def get(self, scope: str, key: str) -> Record | None:
        if self._async is None and self._url is None:
            return await self._threaded(lambda: self.get_sync(scope, key))
        reply = await self._eval(GET, self.record_key(scope, key))
        return self._decode(lambda: _parse_record(scope, key, reply))

    async def wait(self, scope: str, key: str, timeout: float) -> Record | None:
        if self._async is None and self._url is None:
            return await self._threaded(lambda: self.wait_sync(scope, key, timeout))
        deadline = time.monotonic() + timeout
        async with self._subscription(self.record_key(scope, key) + "|done", timeout) as pause:
            record = await self.get(scope, key)
            while record is not None and record.state is RecordState.IN_FLIGHT:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                await pause(min(remaining, _RECHECK))
                record = await self.get(scope, key)
            return record

    async def purge_expired(self) -> int:
        return 0

    async def stats(self) -> StoreStats:
        if self._async is None and self._url is None:
            return await self._threaded(self.stats_sync)
        try:
            client = await self.async_client()
            assert client is not None
            try:
                now = int(await client.execute_command("EVALSHA", NOW.sha, 0))
            except NoScriptError:
                now = int(await client.execute_command("EVAL", NOW.source, 0))
            counter = _StatsCounter(now)
            batch: list[bytes] = []
            async for name in client.scan_iter(match=self._match, count=1000, _type="hash"):
                batch.append(name)
                if len(batch) >= _SCAN_BATCH:
                    counter.add(await self._hmget(client, batch))
                    batch = []
            counter.add(await self._hmget(client, batch))
        except _DRIVER_ERRORS as exc:
            raise self._error(exc) from exc
        return self._decode(counter.stats)

    @staticmethod
    async def _hmget(client: AsyncClient, names: list[bytes]) -> list[Any]:
        if not names:
            return []
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.hmget(name, ["st", "c", "e"])
        rows: list[Any] = await pipe.execute()
        return rows

    async def aclose(self) -> None:
        if self._owns_clients and self._async is not None:
            client, loop, lane = self._async, self._async_loop, self._lane
            self._async = self._async_loop = self._lane = None
            if loop is asyncio.get_running_loop():
                with suppress(*_DRIVER_ERRORS):
                    await _aclose_client(client, lane)
        self.close()

    # pub/sub --------------------------------------------------------------------------

    @asynccontextmanager
    async def _subscription(
        self, channel: str, timeout: float
    ) -> AsyncIterator[Callable[[float], Awaitable[None]]]:
        """Yield `pause(seconds)`: returns on a message on `channel`, or after `seconds`.

        Falls back to backoff sleeps (polling) when pub/sub is not available.
        """
        pubsub: Any = None
        delay = POLL_FIRST_DELAY
        try:
            client = await self.async_client()
            assert client is not None
            pubsub = client.pubsub()
            if self._cluster:
                await pubsub.ssubscribe(channel)
                read = pubsub.get_sharded_message
            else:
                await pubsub.subscribe(channel)
                read = pubsub.get_message
            # Confirmed before the caller reads the record: no lost wake-up.
            if await read(timeout=min(timeout, 1.0) or 0.001) is None:
                raise TimeoutError("no subscription confirmation")
        except (*_DRIVER_ERRORS, AttributeError, TypeError):
            await _aclose_quietly(pubsub)
            pubsub = None

        async def pause(seconds: float) -> None:
            nonlocal pubsub, delay
            if pubsub is not None:
                try:
                    await read(ignore_subscribe_messages=True, timeout=seconds)
                    return
                except _DRIVER_ERRORS:
                    await _aclose_quietly(pubsub)
                    pubsub = None
            await asyncio.sleep(min(delay, seconds))
            delay = min(delay * 2, POLL_MAX_DELAY)

        try:
            yield pause
        finally:
            await _aclose_quietly(pubsub)

    @contextmanager
    def _subscription_sync(self, channel: str, timeout: float) -> Iterator[Callable[[float], None]]:
        pubsub: Any = None
        delay = POLL_FIRST_DELAY
        try:
            pubsub = cast(Any, self.sync_client()).pubsub()
            if self._cluster:
                pubsub.ssubscribe(channel)
                read = pubsub.get_sharded_message
            else:
                pubsub.subscribe(channel)
                read = pubsub.get_message
            if read(timeout=min(timeout, 1.0) or 0.001) is None:
                raise TimeoutError("no subscription confirmation")
        except (*_DRIVER_ERRORS, StoreError, AttributeError, TypeError):
            _close_quietly(pubsub)
            pubsub = None

        def pause(seconds: float) -> None:
            nonlocal pubsub, delay
            if pubsub is not None:
                try:
                    read(ignore_subscribe_messages=True, timeout=seconds)
                    return
                except _DRIVER_ERRORS:
                    _close_quietly(pubsub)
                    pubsub = None
            time.sleep(min(delay, seconds))
            delay = min(delay * 2, POLL_MAX_DELAY)

        try:
            yield pause
        finally:
            _close_quietly(pubsub)


async def _aclose_client(client: AsyncClient, lane: _Lane | None) -> None:
    if lane is not None:
        await lane.aclose()
    await client.aclose()


async def _aclose_quietly(pubsub: Any) -> None:
    if pubsub is not None:
        with suppress(*_DRIVER_ERRORS):
            await pubsub.aclose()


def _close_quietly(pubsub: Any) -> None:
    if pubsub is not None:
        with suppress(*_DRIVER_ERRORS):
            pubsub.close()


class _StatsCounter:
    def __init__(self, now_ms: int) -> None:
        self.now = now_ms
        self.in_flight = self.completed = self.expired = 0
        self.oldest: int | None = None

    def add(self, rows: list[Any]) -> None:
        for state, created, expires in rows:
            if state is None:  # expired or released between SCAN and HMGET
                continue
            if int(expires) <= self.now:
                self.expired += 1
            elif state == b"0":
                self.in_flight += 1
                created_ms = int(created)
                self.oldest = created_ms if self.oldest is None else min(self.oldest, created_ms)
            else:
                self.completed += 1

    def stats(self) -> StoreStats:
        oldest = None if self.oldest is None else max(0.0, (self.now - self.oldest) / 1000)
        return StoreStats(self.in_flight, self.completed, self.expired, oldest)
