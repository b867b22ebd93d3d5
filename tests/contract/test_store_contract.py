"""The store contract (SPEC §3), one suite for every store, over real connections.

Each store runs it twice: through its async methods (ASGI) and its sync twins (WSGI).
A store joins by providing a fixture named `<name>_store` (see STORES below).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from oncely.core import Claimed, Existing, RecordState, StoredResponse
from oncely.core.decisions import ClaimResult
from oncely.core.records import Record
from oncely.stores.base import Store, StoreStats

STORES = ["memory", "sqlite", "redis", "redis_cluster", "postgres"]
FP = "f" * 32
OTHER_FP = "0" * 32
LONG = 60.0

pytestmark = pytest.mark.anyio


class Ops:
    """The contract's operations, reached through either the async methods or the sync twins."""

    def __init__(self, store: Store, mode: str) -> None:
        self.store = store
        self.mode = mode

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self.mode == "async":
            method: Callable[..., Awaitable[Any]] = getattr(self.store, name)
            return await method(*args, **kwargs)
        return getattr(self.store, f"{name}_sync")(*args, **kwargs)

    async def claim(
        self, scope: str, key: str, fp: str = FP, token: str | None = None,
        *, lease: float = LONG, retention: float = LONG,
    ) -> ClaimResult:  # fmt: skip
        token = token or uuid.uuid4().hex
        result: ClaimResult = await self._call(
            "claim", scope, key, fp, token, lease=lease, retention=retention
        )
        return result

    async def complete(self, scope: str, key: str, token: str, response: StoredResponse) -> bool:
        return bool(await self._call("complete", scope, key, token, response))

    async def release(self, scope: str, key: str, token: str) -> bool:
        return bool(await self._call("release", scope, key, token))

    async def renew(self, scope: str, key: str, token: str, lease: float) -> bool:
        return bool(await self._call("renew", scope, key, token, lease=lease))

    async def get(self, scope: str, key: str) -> Record | None:
        record: Record | None = await self._call("get", scope, key)
        return record

    async def wait(self, scope: str, key: str, timeout: float) -> Record | None:
        record: Record | None = await self._call("wait", scope, key, timeout)
        return record

    async def purge_expired(self) -> int:
        return int(await self._call("purge_expired"))

    async def stats(self) -> StoreStats:
        stats: StoreStats = await self._call("stats")
        return stats


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest) -> Store:
    store: Store = request.getfixturevalue(f"{request.param}_store")
    return store


@pytest.fixture(params=["async", "sync"])
def ops(store: Store, request: pytest.FixtureRequest) -> Ops:
    return Ops(store, request.param)


@pytest.fixture
def scope() -> str:
    return f"scope-{uuid.uuid4().hex[:12]}"


RESPONSE = StoredResponse(
    201,
    ((b"content-type", b"application/json"), (b"x-trace", b"a\x00b"), (b"x-trace", b"2")),
    b'{"id": "tr_1"}\x00\xff binary-safe',
)


async def test_fresh_claim_creates_an_in_flight_record(ops: Ops, scope: str) -> None:
    result = await ops.claim(scope, "k1", token="t1")
    assert result == Claimed("t1", 1)
    record = await ops.get(scope, "k1")
    assert record is not None
    assert record.state is RecordState.IN_FLIGHT
    assert record.fingerprint == FP
    assert record.token == "t1"
    assert record.attempts == 1
    assert record.lease_expires_at is not None
    assert record.created_at < record.lease_expires_at <= record.expires_at + 1
    assert record.response is None


async def test_second_claim_reports_the_in_flight_record(ops: Ops, scope: str) -> None:
    await ops.claim(scope, "k", token="first")
    result = await ops.claim(scope, "k", token="second")
    assert isinstance(result, Existing)
    assert result.record.state is RecordState.IN_FLIGHT
    assert result.record.token == "first"
    assert 0 < result.lease_remaining <= LONG


async def test_claim_with_other_fingerprint_reports_the_record_unchanged(
    ops: Ops, scope: str
) -> None:
    await ops.claim(scope, "k", FP, token="first")
    result = await ops.claim(scope, "k", OTHER_FP, token="second")
    assert isinstance(result, Existing)
    assert result.record.fingerprint == FP


async def test_complete_stores_the_response_byte_for_byte(ops: Ops, scope: str) -> None:
    await ops.claim(scope, "k", token="t")
    assert await ops.complete(scope, "k", "t", RESPONSE)
    record = await ops.get(scope, "k")
    assert record is not None
    assert record.state is RecordState.COMPLETED
    assert record.response == RESPONSE
    result = await ops.claim(scope, "k", token="again")
    assert isinstance(result, Existing)
    assert result.record.response == RESPONSE


async def test_completion_is_fenced_by_the_token(ops: Ops, scope: str) -> None:
    await ops.claim(scope, "k", token="holder")
    assert not await ops.complete(scope, "k", "intruder", RESPONSE)
    assert not await ops.release(scope, "k", "intruder")
    assert not await ops.renew(scope, "k", "intruder", LONG)
    record = await ops.get(scope, "k")
    assert record is not None
    assert record.state is RecordState.IN_FLIGHT


async def test_completing_twice_is_refused(ops: Ops, scope: str) -> None:
    await ops.claim(scope, "k", token="t")
    assert await ops.complete(scope, "k", "t", RESPONSE)
    other = StoredResponse(500, (), b"late")
    assert not await ops.complete(scope, "k", "t", other)
    assert not await ops.release(scope, "k", "t")
    record = await ops.get(scope, "k")
    assert record is not None
    assert record.response == RESPONSE


async def test_release_frees_the_key(ops: Ops, scope: str) -> None:
    await ops.claim(scope, "k", token="t")
    assert await ops.release(scope, "k", "t")
    assert await ops.get(scope, "k") is None
    assert await ops.claim(scope, "k", OTHER_FP, token="t2") == Claimed("t2", 1)


async def test_missing_records_are_refused(ops: Ops, scope: str) -> None:
    assert await ops.get(scope, "nothing") is None
    assert not await ops.complete(scope, "nothing", "t", RESPONSE)
    assert not await ops.release(scope, "nothing", "t")
    assert not await ops.renew(scope, "nothing", "t", LONG)


async def test_expired_lease_is_taken_over_and_the_old_holder_fenced_out(
    ops: Ops, scope: str
) -> None:
    await ops.claim(scope, "k", token="dead-worker", lease=0.2)
    await asyncio.sleep(0.35)
    result = await ops.claim(scope, "k", token="new-worker")
    assert result == Claimed("new-worker", 2, took_over=True)
    assert not await ops.complete(scope, "k", "dead-worker", RESPONSE)
    assert await ops.complete(scope, "k", "new-worker", RESPONSE)
    record = await ops.get(scope, "k")
    assert record is not None
    assert record.attempts == 2
    assert record.response == RESPONSE


async def test_expired_lease_is_not_taken_over_by_another_request(ops: Ops, scope: str) -> None:
    await ops.claim(scope, "k", FP, token="dead-worker", lease=0.2)
    await asyncio.sleep(0.35)
    result = await ops.claim(scope, "k", OTHER_FP, token="other")
    assert isinstance(result, Existing)
    assert result.record.token == "dead-worker"
    assert result.lease_remaining == 0


async def test_live_lease_is_not_taken_over(ops: Ops, scope: str) -> None:
    await ops.claim(scope, "k", token="alive", lease=5)
    result = await ops.claim(scope, "k", token="other", lease=5)
    assert isinstance(result, Existing)


async def test_renewal_keeps_the_lease_alive(ops: Ops, scope: str) -> None:
    await ops.claim(scope, "k", token="t", lease=0.3)
    await asyncio.sleep(0.15)
    assert await ops.renew(scope, "k", "t", lease=1.0)
    await asyncio.sleep(0.3)  # past the first lease, within the renewed one
    result = await ops.claim(scope, "k", token="other")
    assert isinstance(result, Existing)
    assert result.record.token == "t"
    assert await ops.complete(scope, "k", "t", RESPONSE)


async def test_retention_expiry_frees_the_key(ops: Ops, scope: str) -> None:
    await ops.claim(scope, "k", token="t", retention=0.3)
    assert await ops.complete(scope, "k", "t", RESPONSE)
    await asyncio.sleep(0.5)
    assert await ops.get(scope, "k") is None
    assert await ops.claim(scope, "k", OTHER_FP, token="t2") == Claimed("t2", 1)
    record = await ops.get(scope, "k")
    assert record is not None
    assert record.fingerprint == OTHER_FP
    assert record.response is None


async def test_purge_removes_expired_records_and_keeps_live_ones(
    ops: Ops, store: Store, scope: str
) -> None:
    for index in range(5):
        await ops.claim(scope, f"old-{index}", token=f"t{index}", retention=0.2)
    await ops.claim(scope, "live", token="live")
    await asyncio.sleep(0.4)
    purged = await ops.purge_expired()
    if store.native_expiry:
        assert purged >= 0
    else:
        assert purged >= 5
    assert await ops.get(scope, "old-0") is None
    assert await ops.get(scope, "live") is not None
    stats = await ops.stats()
    assert stats.expired == 0 or store.native_expiry


async def test_scopes_are_separate_namespaces(ops: Ops, scope: str) -> None:
    assert isinstance(await ops.claim(scope + "-a", "same-key", token="a"), Claimed)
    assert isinstance(await ops.claim(scope + "-b", "same-key", token="b"), Claimed)
    assert await ops.complete(scope + "-a", "same-key", "a", RESPONSE)
    record_b = await ops.get(scope + "-b", "same-key")
    assert record_b is not None
    assert record_b.state is RecordState.IN_FLIGHT


async def test_keys_with_every_visible_ascii_character(ops: Ops, scope: str) -> None:
    key = "".join(chr(c) for c in range(0x21, 0x7F)) + "{x}:*?%_\\"
    assert isinstance(await ops.claim(scope, key, token="t"), Claimed)
    assert isinstance(await ops.claim(scope, key[:-1], token="u"), Claimed)
    assert await ops.complete(scope, key, "t", RESPONSE)
    record = await ops.get(scope, key)
    assert record is not None
    assert record.key == key
    assert record.scope == scope


async def test_unreplayable_marker_round_trips(ops: Ops, scope: str) -> None:
    await ops.claim(scope, "big", token="t")
    too_large = StoredResponse(200, ((b"content-type", b"text/plain"),), b"", replayable=False)
    assert await ops.complete(scope, "big", "t", too_large)
    record = await ops.get(scope, "big")
    assert record is not None
    assert record.response == too_large


async def test_simultaneous_claims_let_exactly_one_through(
    ops: Ops, store: Store, scope: str
) -> None:
    contenders = 40
    results: list[ClaimResult | None]
    if ops.mode == "async":
        results = await asyncio.gather(
            *(ops.claim(scope, "race", token=f"t{i}") for i in range(contenders))
        )
    else:
        results = [None] * contenders
        barrier = threading.Barrier(contenders)

        def contend(index: int) -> None:
            barrier.wait(timeout=10)
            results[index] = store.claim_sync(
                scope, "race", FP, f"t{index}", lease=LONG, retention=LONG
            )

        threads = [threading.Thread(target=contend, args=(i,)) for i in range(contenders)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    claimed = [r for r in results if isinstance(r, Claimed)]
    existing = [r for r in results if isinstance(r, Existing)]
    assert len(claimed) == 1
    assert len(existing) == contenders - 1
    assert all(r.record.token == claimed[0].token for r in existing)


async def test_wait_returns_when_the_holder_completes(ops: Ops, scope: str) -> None:
    await ops.claim(scope, "k", token="t")

    async def finish_later() -> None:
        await asyncio.sleep(0.15)
        await ops.complete(scope, "k", "t", RESPONSE)

    started = time.monotonic()
    if ops.mode == "async":
        finisher = asyncio.create_task(finish_later())
        record = await ops.wait(scope, "k", timeout=5)
        await finisher
    else:
        thread = threading.Thread(target=lambda: asyncio.run(finish_later()))
        thread.start()
        record = await ops.wait(scope, "k", timeout=5)
        thread.join(timeout=10)
    assert time.monotonic() - started < 3
    assert record is not None
    assert record.state is RecordState.COMPLETED
    assert record.response == RESPONSE


async def test_wait_gives_up_after_its_timeout(ops: Ops, scope: str) -> None:
    await ops.claim(scope, "k", token="t")
    started = time.monotonic()
    record = await ops.wait(scope, "k", timeout=0.3)
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 2
    assert record is not None
    assert record.state is RecordState.IN_FLIGHT


async def test_wait_returns_none_when_released(ops: Ops, scope: str) -> None:
    await ops.claim(scope, "k", token="t")
    assert await ops.release(scope, "k", "t")
    assert await ops.wait(scope, "k", timeout=1) is None


async def test_stats_count_records_by_state(ops: Ops, scope: str) -> None:
    before = await ops.stats()
    await ops.claim(scope, "a", token="a")
    await ops.claim(scope, "b", token="b")
    await ops.complete(scope, "b", "b", RESPONSE)
    after = await ops.stats()
    assert after.in_flight - before.in_flight == 1
    assert after.completed - before.completed == 1
    assert after.oldest_in_flight_age is not None
    assert after.oldest_in_flight_age >= 0
