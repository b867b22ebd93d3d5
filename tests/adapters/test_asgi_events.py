"""The exact events the ASGI adapter emits for each row of the SPEC §3 table."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from oncely import IdempotencyMiddleware
from oncely.core.events import EventKind, IdempotencyEvent, hash_key
from oncely.stores import MemoryStore
from tests.adapters.harness import call
from tests.adapters.test_asgi_middleware import BrokenStore, CountingApp

pytestmark = pytest.mark.anyio


class Recorder:
    def __init__(self) -> None:
        self.events: list[IdempotencyEvent] = []

    def __call__(self, event: IdempotencyEvent) -> None:
        self.events.append(event)

    def kinds(self) -> list[EventKind]:
        return [event.kind for event in self.events]


def guarded(app: Any, recorder: Recorder, **options: Any) -> IdempotencyMiddleware:
    store = options.pop("store", None) or MemoryStore()
    return IdempotencyMiddleware(app, store=store, event_subscribers=[recorder], **options)


async def test_fresh_then_replay_then_mismatch() -> None:
    recorder = Recorder()
    middleware = guarded(CountingApp(), recorder)
    await call(middleware, key="k", body=b'{"a":1}')
    await call(middleware, key="k", body=b'{"a":1}')
    await call(middleware, key="k", body=b'{"a":2}')
    assert recorder.kinds() == [
        EventKind.CLAIMED,
        EventKind.STORED,
        EventKind.REPLAYED,
        EventKind.MISMATCH,
    ]
    claimed, stored, replayed, _ = recorder.events
    assert claimed.key_hash == hash_key("k") != "k"
    assert claimed.attempt == 1
    assert claimed.store == "memory"
    assert claimed.method == "POST"
    assert claimed.duration is not None
    assert claimed.duration >= 0
    assert stored.status == 201
    assert stored.handler_duration is not None
    assert stored.duration is not None
    assert replayed.attempt == 1


async def test_in_flight_and_release_of_unstored_status() -> None:
    recorder = Recorder()
    middleware = guarded(CountingApp(delay=0.2), recorder)
    first = asyncio.create_task(call(middleware, key="k"))
    await asyncio.sleep(0.05)
    await call(middleware, key="k")
    await first
    assert recorder.kinds() == [EventKind.CLAIMED, EventKind.IN_PROGRESS, EventKind.STORED]

    recorder = Recorder()
    await call(guarded(CountingApp(status=429), recorder), key="k")
    assert recorder.kinds() == [EventKind.CLAIMED, EventKind.RELEASED]
    assert recorder.events[1].status == 429


async def test_take_over_after_lapsed_lease() -> None:
    recorder = Recorder()
    store = MemoryStore()
    await store.claim("anonymous", "k", "", "dead-worker", lease=0.01, retention=60)
    await asyncio.sleep(0.02)
    await call(guarded(CountingApp(), recorder, store=store, fingerprint=None), key="k")
    assert recorder.kinds() == [EventKind.TOOK_OVER, EventKind.STORED]
    assert recorder.events[0].attempt == 2


async def test_lease_lost_at_completion() -> None:
    recorder = Recorder()
    store = MemoryStore()

    async def stalled(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        # Another worker takes the record over meanwhile (simulated through the store).
        record = await store.get("anonymous", "k")
        assert record is not None
        await store.release("anonymous", "k", record.token or "")
        await store.claim("anonymous", "k", record.fingerprint, "other", lease=60, retention=60)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"late"})

    await call(guarded(stalled, recorder, store=store), key="k")
    assert recorder.kinds() == [EventKind.CLAIMED, EventKind.LEASE_LOST]


async def test_too_large_rejected_and_store_error() -> None:
    async def big(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x" * 50})

    recorder = Recorder()
    middleware = guarded(big, recorder, max_stored_body=10)
    await call(middleware, key="k")
    await call(middleware, key="k")
    await call(middleware, key=b"")
    assert recorder.kinds() == [
        EventKind.CLAIMED,
        EventKind.STORED,
        EventKind.NOT_REPLAYABLE,
        EventKind.REJECTED,
    ]
    assert recorder.events[-1].status == 400

    recorder = Recorder()
    await call(guarded(CountingApp(), recorder, store=BrokenStore()), key="k")
    assert recorder.kinds() == [EventKind.STORE_ERROR]
    assert recorder.events[0].detail == "claim"


async def test_a_failing_subscriber_never_fails_the_request() -> None:
    def broken(event: IdempotencyEvent) -> None:
        raise RuntimeError("dashboard down")

    app = CountingApp()
    middleware = IdempotencyMiddleware(app, store=MemoryStore(), event_subscribers=[broken])
    assert (await call(middleware, key="k")).status == 201
    assert app.executions == 1
