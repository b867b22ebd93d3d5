"""What only the memory store does: completed records are kept as bytes under one str
per (scope, key), and expiry times are queued per retention in a bytearray, so that a
million live records give Python's garbage collector nothing to walk. The shared
contract suite covers the behaviour; these tests pin down what that layout could get
wrong: keys that run together, purges across retentions, a key claimed again after it
expired, and the decoded records kept for replays.
"""

from __future__ import annotations

import gc

from oncely.core import Claimed, ClaimResult, Existing, RecordState, StoredResponse
from oncely.stores.memory import MemoryStore

FP = "f" * 32
RESPONSE = StoredResponse(201, ((b"content-type", b"application/json"),), b'{"id": 1}')
T0 = 1_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def complete(store: MemoryStore, key: str, *, retention: float = 60.0, scope: str = "s") -> None:
    token = f"t-{key}"
    assert store.claim_sync(scope, key, FP, token, lease=5.0, retention=retention) == Claimed(
        token, 1
    )
    assert store.complete_sync(scope, key, token, RESPONSE)


def test_completed_records_give_the_garbage_collector_nothing_to_walk() -> None:
    store = MemoryStore()
    complete(store, "warm-up")
    gc.collect()
    before = len(gc.get_objects())
    for index in range(5000):
        complete(store, f"key-{index}")
    gc.collect()
    assert len(gc.get_objects()) - before < 50  # not one tracked object per record
    record = store.get_sync("s", "key-4999")
    assert record is not None
    assert record.response == RESPONSE


def test_scope_and_key_pairs_that_run_together_stay_apart() -> None:
    store = MemoryStore()
    complete(store, "bc", scope="a")
    result = store.claim_sync("ab", "c", FP, "other", lease=5.0, retention=60.0)
    assert result == Claimed("other", 1)
    assert store.get_sync("1:a", "bc") is None


def test_purges_free_each_retention_on_its_own_schedule() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    for index in range(100):  # interleaved, so neither retention blocks the other
        complete(store, f"short-{index}", retention=10.0)
        store.claim_sync("s", f"long-{index}", FP, "t", lease=5.0, retention=1000.0)
    clock.now += 20.0
    assert store.purge_expired_sync() == 100
    stats = store.stats_sync()
    assert (stats.in_flight, stats.completed, stats.expired) == (100, 0, 0)
    clock.now += 1000.0
    assert store.purge_expired_sync() == 100
    stats = store.stats_sync()
    assert (stats.in_flight, stats.completed, stats.expired) == (0, 0, 0)


def test_a_key_claimed_again_after_expiry_outlives_its_first_expiry_entry() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    complete(store, "k", retention=10.0)
    assert store.get_sync("s", "k") is not None  # read once: its decoded record is kept
    clock.now += 11.0
    assert store.claim_sync("s", "k", FP, "second", lease=5.0, retention=10.0) == Claimed(
        "second", 1
    )
    assert store.purge_expired_sync() == 0  # the first entry is due, the record is not
    record = store.get_sync("s", "k")
    assert record is not None
    assert record.state is RecordState.IN_FLIGHT
    assert record.token == "second"
    other = StoredResponse(200, (), b"second")
    assert store.complete_sync("s", "k", "second", other)
    replay = store.claim_sync("s", "k", FP, "third", lease=5.0, retention=10.0)
    assert isinstance(replay, Existing)
    assert replay.record.response == other  # not the first record's kept view
    clock.now += 11.0
    assert store.purge_expired_sync() == 1
    assert store.get_sync("s", "k") is None


def test_a_completed_record_reads_back_field_for_field() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    fingerprint = "caf\u00e9-\udc80"  # a custom fingerprint function may return any str
    assert store.claim_sync("s", "k", fingerprint, "tok", lease=5.0, retention=60.0)
    clock.now += 6.0  # the lease lapsed: a second attempt takes over
    assert store.claim_sync("s", "k", fingerprint, "tok-2", lease=5.0, retention=60.0) == (
        Claimed("tok-2", 2, took_over=True)
    )
    large = StoredResponse(200, ((b"x-a", b"1"), (b"x-b", b"")), b"", replayable=False)
    assert store.complete_sync("s", "k", "tok-2", large)
    record = store.get_sync("s", "k")
    assert record is not None
    assert (record.fingerprint, record.token, record.attempts) == (fingerprint, "tok-2", 2)
    assert (record.created_at, record.expires_at) == (T0, T0 + 60.0)
    assert record.lease_expires_at is None
    assert record.response == large


def test_a_subclass_that_overrides_an_async_operation_is_called_through_it() -> None:
    """The ASGI adapter calls a memory store's sync twins directly (no coroutine), unless
    a subclass changed what the async operations do."""

    class Audited(MemoryStore):
        async def claim(
            self, scope: str, key: str, fingerprint: str, token: str, *, lease: float,
            retention: float,
        ) -> ClaimResult:  # fmt: skip
            return await super().claim(
                scope, key, fingerprint, token, lease=lease, retention=retention
            )

    class SyncTuned(MemoryStore):
        def complete_sync(self, scope: str, key: str, token: str, response: StoredResponse) -> bool:
            return super().complete_sync(scope, key, token, response)

    assert MemoryStore().nonblocking_sync
    assert not Audited().nonblocking_sync
    assert SyncTuned().nonblocking_sync
