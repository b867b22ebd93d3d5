"""What only the Redis store promises: one round trip per operation, hash tags that keep
a record in one cluster slot, native expiry, quick StoreErrors, pub/sub wake-ups, and
records that survive an AOF restart. The shared contract suite covers the rest.

Counting tests run on a private redis-server: the shared one has other traffic.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.cluster
from redis.crc import key_slot
from redis.typing import EncodableT, FieldT

from oncely.core import Claimed, Existing, RecordState, StoredResponse, claim_transition
from oncely.core.decisions import ClaimTransition
from oncely.stores import store_from_url
from oncely.stores.base import StoreError
from oncely.stores.redis import RedisStore
from tests.support.redis_fixtures import RedisCluster, RedisServer, private_redis, unique_prefix

FP = "f" * 32
OTHER_FP = "0" * 32
RESPONSE = StoredResponse(201, ((b"content-type", b"application/json"),), b'{"id": 1}')
BRACED_KEYS = ["{a}", "}{", "a{b}c", "{}", "{{x}}", "x:{y}:z", "plain", "\\*?[]"]


@pytest.fixture(scope="module")
def private_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with private_redis(tmp_path_factory.mktemp("redis-private")) as server:
        yield server


@pytest.fixture
def private_store(private_server: RedisServer) -> Iterator[RedisStore]:
    store = RedisStore(private_server.url, prefix=unique_prefix())
    yield store
    store.close()


@pytest.fixture
def admin(private_server: RedisServer) -> Iterator[redis.Redis]:
    client = private_server.client()
    yield client
    client.close()


def scope() -> str:
    return f"scope-{uuid.uuid4().hex[:8]}"


# one round trip per operation ------------------------------------------------------

# The commands each script runs inside Redis; commandstats counts those too.
CLAIM_INSERT = {"evalsha": 1, "time": 1, "hmget": 1, "hset": 1, "pexpireat": 1}
COMPLETE = {"evalsha": 1, "hmget": 1, "hset": 1, "hdel": 1, "publish": 1}
CLAIM_REPLAY = {"evalsha": 1, "time": 1, "hmget": 1}


def command_calls(admin: redis.Redis) -> dict[str, int]:
    stats: dict[str, Any] = admin.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def commands_during(admin: redis.Redis, operation: Callable[[], object]) -> dict[str, int]:
    before = command_calls(admin)
    operation()
    after = command_calls(admin)
    diff = {name: after[name] - before.get(name, 0) for name in after}
    return {name: n for name, n in diff.items() if n and name != "info"}


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_fresh_request_costs_two_round_trips_and_a_replay_one(
    private_store: RedisStore, admin: redis.Redis, mode: str
) -> None:
    store, sc = private_store, scope()

    runner = asyncio.Runner()  # one loop for the whole test: the async client lives in it

    def run(name: str, *args: Any, **kwargs: Any) -> Any:
        if mode == "sync":
            return getattr(store, f"{name}_sync")(*args, **kwargs)
        return runner.run(getattr(store, name)(*args, **kwargs))

    # Warm up: the connection exists and the server has cached the scripts.
    run("claim", sc, "warm", FP, "w", lease=5, retention=5)
    run("complete", sc, "warm", "w", RESPONSE)

    claim = commands_during(admin, lambda: run("claim", sc, "k", FP, "t", lease=5, retention=5))
    complete = commands_during(admin, lambda: run("complete", sc, "k", "t", RESPONSE))
    replay: list[Any] = []
    replay_commands = commands_during(
        admin, lambda: replay.append(run("claim", sc, "k", FP, "u", lease=5, retention=5))
    )
    runner.run(store.aclose())
    runner.close()
    assert claim == CLAIM_INSERT
    assert complete == COMPLETE
    assert replay_commands == CLAIM_REPLAY
    assert isinstance(replay[0], Existing)
    assert replay[0].record.response == RESPONSE


def test_a_server_without_the_scripts_gets_them_once(
    private_store: RedisStore, admin: redis.Redis
) -> None:
    sc = scope()
    private_store.claim_sync(sc, "warm", FP, "w", lease=5, retention=5)
    admin.script_flush()
    first = commands_during(
        admin, lambda: private_store.claim_sync(sc, "a", FP, "t", lease=5, retention=5)
    )
    second = commands_during(
        admin, lambda: private_store.claim_sync(sc, "b", FP, "t", lease=5, retention=5)
    )
    assert first["evalsha"] == 1  # NOSCRIPT
    assert first["eval"] == 1  # runs it and caches it
    assert second == CLAIM_INSERT


def test_concurrent_async_calls_share_one_pipeline(
    private_store: RedisStore, admin: redis.Redis
) -> None:
    """Claims made in the same loop iteration go out together, each with its own reply;
    a server that lost its script cache still answers every one of them."""
    sc = scope()

    async def claim_many(keys: list[str], token: str = "t") -> list[Any]:
        return await asyncio.gather(
            *(private_store.claim(sc, k, FP, f"{token}-{k}", lease=5, retention=5) for k in keys)
        )

    async def scenario() -> tuple[list[Any], list[Any], list[Any]]:
        await private_store.claim(sc, "warm", FP, "w", lease=5, retention=5)
        admin.script_flush()
        cold = await claim_many([f"cold-{i}" for i in range(10)])
        warm = await claim_many([f"k-{i}" for i in range(20)])
        again = await claim_many([f"k-{i}" for i in range(20)], token="other")
        await private_store.aclose()
        return cold, warm, again

    before = command_calls(admin)
    cold, warm, again = asyncio.run(scenario())
    after = command_calls(admin)
    assert all(isinstance(result, Claimed) for result in cold + warm)
    assert all(isinstance(result, Existing) for result in again)
    assert [r.record.token for r in again] == [f"t-k-{i}" for i in range(20)]
    # 51 script calls, but the pipelined ones need no more than one command each.
    assert after.get("evalsha", 0) - before.get("evalsha", 0) <= 51 + 10


def test_a_batch_keeps_each_calls_own_error_and_survives_a_cancelled_caller(
    private_store: RedisStore, admin: redis.Redis
) -> None:
    """One call's Redis error is that call's StoreError; a caller cancelled while its
    batch is on the wire takes nothing down with it."""
    sc = scope()
    admin.set(private_store.record_key(sc, "not-a-hash"), "x")  # WRONGTYPE for HMGET

    async def scenario() -> list[Any]:
        try:
            calls = [
                asyncio.ensure_future(
                    private_store.claim(sc, k, FP, f"t-{k}", lease=5, retention=5)
                )
                for k in ("a", "not-a-hash", "b", "c", "d")
            ]
            for _ in range(2):  # the batch gathers them all, then goes out
                await asyncio.sleep(0)
            calls[2].cancel()
            results = await asyncio.gather(*calls, return_exceptions=True)
            # The store goes on: the connection the batch used is still good.
            results.append(await private_store.claim(sc, "e", FP, "t-e", lease=5, retention=5))
            return results
        finally:
            await private_store.aclose()

    a, wrong, b, c, d, e = asyncio.run(scenario())
    assert isinstance(wrong, StoreError)
    assert "WRONGTYPE" in str(wrong)
    assert isinstance(b, asyncio.CancelledError)
    assert all(isinstance(result, Claimed) for result in (a, c, d, e))
    assert admin.hget(private_store.record_key(sc, "c"), "t") == b"t-c"


def test_a_connection_the_server_dropped_is_retried_once(
    private_store: RedisStore, admin: redis.Redis
) -> None:
    sc = scope()

    async def scenario() -> list[Any]:
        try:
            await private_store.claim(sc, "warm", FP, "w", lease=5, retention=5)
            admin.client_kill_filter(_type="normal", skipme=True)  # the store's connections
            return list(
                await asyncio.gather(
                    *(private_store.claim(sc, k, FP, "t", lease=5, retention=5) for k in "xyz")
                )
            )
        finally:
            await private_store.aclose()

    assert all(isinstance(result, Claimed) for result in asyncio.run(scenario()))


def test_aclose_closes_every_connection_the_store_opened(
    private_server: RedisServer, admin: redis.Redis
) -> None:
    def connected() -> int:
        return int(admin.info("clients")["connected_clients"])

    before = connected()
    store = RedisStore(private_server.url, prefix=unique_prefix())
    sc = scope()

    async def scenario() -> int:
        await asyncio.gather(
            *(store.claim(sc, f"k{i}", FP, "t", lease=5, retention=5) for i in range(50))
        )
        await asyncio.gather(*(store.complete(sc, f"k{i}", "t", RESPONSE) for i in range(50)))
        during = connected()
        await store.aclose()
        return during

    during = asyncio.run(scenario())
    assert before < during <= before + 4  # a few batches on the wire at once, no more
    deadline = time.monotonic() + 2
    while connected() > before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert connected() == before


# the claim script is claim_transition ---------------------------------------------


def server_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


@pytest.mark.parametrize(
    ("case", "fingerprint", "expected"),
    [
        ("absent", FP, ClaimTransition.INSERT),
        ("expired-but-present", FP, ClaimTransition.INSERT),
        ("lease-lapsed", FP, ClaimTransition.TAKE_OVER),
        ("lease-lapsed", OTHER_FP, ClaimTransition.KEEP),
        ("lease-alive", FP, ClaimTransition.KEEP),
        ("lease-alive", OTHER_FP, ClaimTransition.KEEP),
        ("completed", FP, ClaimTransition.KEEP),
        ("completed", OTHER_FP, ClaimTransition.KEEP),
    ],
)
def test_the_claim_script_applies_claim_transition(
    private_store: RedisStore,
    admin: redis.Redis,
    case: str,
    fingerprint: str,
    expected: ClaimTransition,
) -> None:
    sc = scope()
    name = private_store.record_key(sc, "k")
    now = server_ms(admin)
    fields: dict[FieldT, EncodableT] = {
        "s": sc, "k": "k", "f": FP, "st": "0", "t": "old", "a": 3,
        "c": now - 5000, "e": now + 60_000, "l": now + 60_000,
    }  # fmt: skip
    if case == "expired-but-present":  # no TTL, so only the script's own check sees it
        fields.update(st="1", e=now - 1, r=b"\x01\x00\xc8\x00\x00\x00old")
        del fields["l"]
    elif case == "lease-lapsed":
        fields["l"] = now - 1
    elif case == "completed":
        fields.update(st="1", r=b"\x01\x00\xc8\x00\x00\x00old")
        del fields["l"]
    if case != "absent":
        admin.hset(name, mapping=fields)
        if int(fields["e"]) > now:
            admin.pexpireat(name, int(fields["e"]))
    existing = private_store.get_sync(sc, "k")
    assert claim_transition(existing, fingerprint, now / 1000 + 0.5) is expected

    result = private_store.claim_sync(sc, "k", fingerprint, "new", lease=5, retention=30)
    after = private_store.get_sync(sc, "k")
    assert after is not None
    if expected is ClaimTransition.INSERT:
        assert result == Claimed("new", 1)
        assert after.response is None
        assert after.fingerprint == fingerprint
        assert 29_000 < admin.pttl(name) <= 30_000
    elif expected is ClaimTransition.TAKE_OVER:
        assert result == Claimed("new", 4, took_over=True)
        assert after.created_at == int(fields["c"]) / 1000
        assert after.expires_at == int(fields["e"]) / 1000
        assert after.token == "new"
    else:
        assert isinstance(result, Existing)
        assert result.record == after
        assert after.token == "old"


def test_a_claim_resent_with_its_own_token_is_recognised(private_store: RedisStore) -> None:
    """A driver retry after a lost reply must not meet its own record as 'in flight'."""
    sc = scope()
    assert private_store.claim_sync(sc, "k", FP, "t", lease=5, retention=5) == Claimed("t", 1)
    assert private_store.claim_sync(sc, "k", FP, "t", lease=5, retention=5) == Claimed("t", 1)
    assert isinstance(private_store.claim_sync(sc, "k", FP, "u", lease=5, retention=5), Existing)


# native expiry ---------------------------------------------------------------------


def test_retention_is_the_keys_native_expiry(private_store: RedisStore, admin: redis.Redis) -> None:
    sc = scope()
    name = private_store.record_key(sc, "k")
    private_store.claim_sync(sc, "k", FP, "a", lease=0.1, retention=30)
    first_ttl = admin.pttl(name)
    assert 29_000 < first_ttl <= 30_000
    time.sleep(0.15)
    assert private_store.claim_sync(sc, "k", FP, "b", lease=5, retention=30) == Claimed(
        "b", 2, took_over=True
    )
    assert 0 < admin.pttl(name) <= first_ttl  # a take-over keeps the expiry
    assert private_store.complete_sync(sc, "k", "b", RESPONSE)
    assert 0 < admin.pttl(name) <= first_ttl
    assert private_store.purge_expired_sync() == 0


# key layout and cluster slots ------------------------------------------------------


def test_keys_are_hash_tagged_on_a_digest(private_store: RedisStore) -> None:
    names = {private_store.record_key("s", key) for key in BRACED_KEYS}
    assert len(names) == len(BRACED_KEYS)
    for name in names:
        prefix, _, tag = name.partition(":")
        assert prefix == private_store.prefix
        assert tag.startswith("{")
        assert tag.endswith("}")
        assert len(tag) == 34
    # Scope and key can not run into each other.
    assert private_store.record_key("a", "bc") != private_store.record_key("ab", "c")


def test_records_and_channels_share_a_slot_and_spread_over_the_masters(
    redis_cluster: RedisCluster, redis_cluster_store: RedisStore
) -> None:
    store, sc = redis_cluster_store, scope()
    client: Any = redis.cluster.RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0])
    try:
        keys = BRACED_KEYS + [f"k{i}" for i in range(40)]
        for key in keys:
            assert isinstance(store.claim_sync(sc, key, FP, "t", lease=5, retention=30), Claimed)
        owners = set()
        for key in keys:
            name = store.record_key(sc, key)
            slot = key_slot(name.encode())
            assert slot == key_slot(f"{name}|done".encode())
            node = client.get_node_from_key(name)
            owners.add(node.port)
            node_client = client.get_redis_connection(node)
            assert node_client.cluster("COUNTKEYSINSLOT", slot) >= 1
            assert node_client.cluster("KEYSLOT", name) == slot
            record = store.get_sync(sc, key)
            assert record is not None
            assert record.key == key
        assert owners == set(redis_cluster.ports)
        stats = store.stats_sync()
        assert (stats.in_flight, stats.completed) == (len(keys), 0)
    finally:
        client.close()


# failures become StoreError, quickly --------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def assert_store_error_within(seconds: float, operation: Callable[[], object]) -> None:
    started = time.monotonic()
    with pytest.raises(StoreError):
        operation()
    assert time.monotonic() - started < seconds


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
def test_an_unreachable_server_is_a_store_error_at_once(scheme: str) -> None:
    store = RedisStore(f"{scheme}://127.0.0.1:{closed_port()}", prefix=unique_prefix())
    try:
        assert_store_error_within(
            1.0, lambda: store.claim_sync("s", "k", FP, "t", lease=1, retention=1)
        )
        assert_store_error_within(1.0, lambda: store.get_sync("s", "k"))

        async def async_claim() -> None:
            try:
                await store.claim("s", "k", FP, "t", lease=1, retention=1)
            finally:
                await store.aclose()

        assert_store_error_within(1.0, lambda: asyncio.run(async_claim()))
    finally:
        store.close()


def test_a_silent_server_is_a_store_error_after_the_socket_timeout() -> None:
    """It accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        store = RedisStore(f"redis://127.0.0.1:{port}", socket_timeout=0.3)
        try:
            assert_store_error_within(1.5, lambda: store.complete_sync("s", "k", "t", RESPONSE))

            async def async_complete() -> None:
                try:
                    await store.complete("s", "k", "t", RESPONSE)
                finally:
                    await store.aclose()

            assert_store_error_within(1.5, lambda: asyncio.run(async_complete()))
        finally:
            store.close()


def test_an_undecodable_record_is_a_store_error(
    private_store: RedisStore, admin: redis.Redis
) -> None:
    sc = scope()
    private_store.claim_sync(sc, "k", FP, "t", lease=5, retention=5)
    admin.hset(private_store.record_key(sc, "k"), mapping={"st": "1", "r": b"\x09garbage"})
    with pytest.raises(StoreError, match="undecodable"):
        private_store.get_sync(sc, "k")
    with pytest.raises(StoreError, match="undecodable"):
        private_store.claim_sync(sc, "k", FP, "u", lease=5, retention=5)
    admin.hdel(private_store.record_key(sc, "k"), "r", "f")
    with pytest.raises(StoreError, match="undecodable"):
        private_store.get_sync(sc, "k")


def test_errors_do_not_show_the_password() -> None:
    store = RedisStore(f"redis://:hunter2@127.0.0.1:{closed_port()}/0")
    try:
        with pytest.raises(StoreError) as caught:
            store.get_sync("s", "k")
        assert "hunter2" not in str(caught.value)
    finally:
        store.close()


# pub/sub wakes waiters -------------------------------------------------------------

COMPLETE_AFTER = 0.6  # the poll fallback would notice 0.2 s later (5 ms doubling to 0.25 s)


def subscribers(store: RedisStore, cluster: RedisCluster | None, channel: str) -> int:
    if cluster is None:
        client = redis.Redis.from_url(store._url or "")
        try:
            return int(dict(client.pubsub_numsub(channel))[channel.encode()])
        finally:
            client.close()
    nodes: Any = redis.cluster.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    try:
        owner = nodes.get_redis_connection(nodes.get_node_from_key(channel))
        reply = owner.execute_command("PUBSUB", "SHARDNUMSUB", channel)
        return int(reply[1])
    finally:
        nodes.close()


@pytest.fixture(params=["redis", "redis_cluster"])
def any_store(request: pytest.FixtureRequest) -> tuple[RedisStore, RedisCluster | None]:
    store: RedisStore = request.getfixturevalue(f"{request.param}_store")
    cluster = request.getfixturevalue("redis_cluster") if request.param == "redis_cluster" else None
    return store, cluster


def test_sync_wait_is_woken_by_the_completion(
    any_store: tuple[RedisStore, RedisCluster | None],
) -> None:
    store, cluster = any_store
    sc = scope()
    store.claim_sync(sc, "k", FP, "t", lease=30, retention=30)
    completed_at: list[float] = []
    seen: list[int] = []

    def complete_later() -> None:
        time.sleep(COMPLETE_AFTER)
        seen.append(subscribers(store, cluster, store.record_key(sc, "k") + "|done"))
        store.complete_sync(sc, "k", "t", RESPONSE)
        completed_at.append(time.monotonic())

    thread = threading.Thread(target=complete_later)
    thread.start()
    record = store.wait_sync(sc, "k", timeout=5)
    woke_at = time.monotonic()
    thread.join(timeout=10)
    assert record is not None
    assert record.state is RecordState.COMPLETED
    assert seen == [1]
    assert woke_at - completed_at[0] < 0.1


@pytest.mark.anyio
async def test_async_wait_is_woken_by_the_completion(
    any_store: tuple[RedisStore, RedisCluster | None],
) -> None:
    store, cluster = any_store
    sc = scope()
    await store.claim(sc, "k", FP, "t", lease=30, retention=30)
    completed_at: list[float] = []
    seen: list[int] = []

    async def complete_later() -> None:
        await asyncio.sleep(COMPLETE_AFTER)
        channel = store.record_key(sc, "k") + "|done"
        seen.append(await asyncio.to_thread(subscribers, store, cluster, channel))
        await store.complete(sc, "k", "t", RESPONSE)
        completed_at.append(time.monotonic())

    try:
        finisher = asyncio.create_task(complete_later())
        record = await store.wait(sc, "k", timeout=5)
        woke_at = time.monotonic()
        await finisher
    finally:
        await store.aclose()
    assert record is not None
    assert record.state is RecordState.COMPLETED
    assert seen == [1]
    assert woke_at - completed_at[0] < 0.1


def test_wait_polls_when_pubsub_is_unavailable(
    private_store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    sc = scope()
    private_store.claim_sync(sc, "k", FP, "t", lease=30, retention=30)
    client = private_store.sync_client()

    def broken_pubsub(**kwargs: Any) -> Any:
        raise redis.ConnectionError("pub/sub refused")

    monkeypatch.setattr(client, "pubsub", broken_pubsub)
    timer = threading.Timer(0.3, lambda: private_store.complete_sync(sc, "k", "t", RESPONSE))
    timer.start()
    try:
        record = private_store.wait_sync(sc, "k", timeout=5)
    finally:
        timer.join(timeout=5)
    assert record is not None
    assert record.state is RecordState.COMPLETED


# durability ------------------------------------------------------------------------


def test_records_survive_an_aof_restart(tmp_path: Path) -> None:
    aof = ("--appendonly", "yes", "--appendfsync", "always")
    with private_redis(tmp_path, *aof) as server:
        store = RedisStore(server.url, prefix=unique_prefix())
        try:
            sc = scope()
            for index in range(10):
                store.claim_sync(sc, f"done-{index}", FP, f"t{index}", lease=30, retention=60)
                assert store.complete_sync(sc, f"done-{index}", f"t{index}", RESPONSE)
            store.claim_sync(sc, "in-flight", FP, "holder", lease=30, retention=60)
            before = {key: store.get_sync(sc, key) for key in ["in-flight", "done-0", "done-9"]}
            server.stop()  # SIGTERM: Redis syncs its AOF and exits
            with pytest.raises(StoreError):
                store.get_sync(sc, "done-0")
            server.start()
            for index in range(10):
                record = store.get_sync(sc, f"done-{index}")
                assert record is not None
                assert record.response == RESPONSE
            assert {key: store.get_sync(sc, key) for key in before} == before
            assert isinstance(
                store.claim_sync(sc, "done-0", FP, "again", lease=5, retention=5), Existing
            )
            assert store.complete_sync(sc, "in-flight", "holder", RESPONSE)
        finally:
            store.close()


# construction ----------------------------------------------------------------------


def test_urls_and_options(redis_url: str) -> None:
    store = store_from_url(redis_url + "?prefix=from-url")
    assert isinstance(store, RedisStore)
    assert (store.name, store.native_expiry, store.prefix) == ("redis", True, "from-url")
    store.close()
    assert RedisStore(redis_url, prefix="explicit").prefix == "explicit"
    with pytest.raises(ValueError, match="braces"):
        RedisStore(redis_url, prefix="a{b}")
    with pytest.raises(ValueError, match="decode_responses"):
        RedisStore(redis.Redis(decode_responses=True))
    with pytest.raises(TypeError):
        RedisStore(42)  # type: ignore[arg-type]


def test_a_sync_client_serves_the_async_methods_too(private_server: RedisServer) -> None:
    client = private_server.client()
    store = RedisStore(client, prefix=unique_prefix())
    sc = scope()

    async def use() -> None:
        assert await store.claim(sc, "k", FP, "t", lease=5, retention=5) == Claimed("t", 1)
        assert await store.complete(sc, "k", "t", RESPONSE)
        record = await store.wait(sc, "k", timeout=1)
        assert record is not None
        assert record.response == RESPONSE
        assert (await store.stats()).completed == 1

    asyncio.run(use())
    store.close()
    assert client.ping()  # a client passed in stays open: it is the caller's
    client.close()


def test_an_async_client_needs_a_sync_twin_for_the_sync_methods(
    private_server: RedisServer,
) -> None:
    async_client = redis.asyncio.Redis(port=private_server.port)
    store = RedisStore(async_client, prefix=unique_prefix())
    with pytest.raises(RuntimeError, match="sync_client"):
        store.get_sync("s", "k")
    sync_client = private_server.client()
    paired = RedisStore(async_client, sync_client=sync_client, prefix=store.prefix)
    sc = scope()

    async def use() -> None:
        try:
            assert await paired.claim(sc, "k", FP, "t", lease=5, retention=5) == Claimed("t", 1)
        finally:
            await async_client.aclose()

    asyncio.run(use())
    record = paired.get_sync(sc, "k")
    assert record is not None
    assert record.token == "t"
    sync_client.close()


def test_record_keys_are_pinned_so_records_survive_an_upgrade() -> None:
    """Records written by an earlier version must be found again: the key of (scope,
    key) is part of the stored format. No connection is needed to compute it."""
    store = RedisStore("redis://127.0.0.1:6379/0", prefix="oncely")
    assert store.record_key("anonymous", "k-1") == "oncely:{4167cc81d237ddb20416cbc4751a18e8}"
    assert store.record_key("cred:0f", "ключ") == "oncely:{5cda0ed4f718592074ce8c070721c98e}"
