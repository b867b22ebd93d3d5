"""The WSGI adapter emits the same events as the ASGI one, for each row of SPEC §3."""

from __future__ import annotations

import threading
import time
from typing import Any

from oncely.core.events import EventKind, hash_key
from oncely.stores import MemoryStore
from oncely.wsgi import IdempotencyMiddleware
from tests.adapters.test_asgi_events import Recorder
from tests.adapters.test_wsgi_middleware import BrokenStore, CountingApp, call


def guarded(app: Any, recorder: Recorder, **options: Any) -> IdempotencyMiddleware:
    store = options.pop("store", None) or MemoryStore()
    return IdempotencyMiddleware(app, store=store, event_subscribers=[recorder], **options)


def test_fresh_replay_mismatch() -> None:
    recorder = Recorder()
    middleware = guarded(CountingApp(), recorder)
    call(middleware, key="k", body=b'{"a":1}')
    call(middleware, key="k", body=b'{"a":1}')
    call(middleware, key="k", body=b'{"a":2}')
    assert recorder.kinds() == [
        EventKind.CLAIMED,
        EventKind.STORED,
        EventKind.REPLAYED,
        EventKind.MISMATCH,
    ]
    claimed, stored, _, _ = recorder.events
    assert claimed.method == "POST"
    assert claimed.store == "memory"
    assert claimed.key_hash == hash_key("k")
    assert claimed.attempt == 1
    assert stored.status == 201
    assert stored.handler_duration is not None


def test_in_flight_release_rejected_and_store_error() -> None:
    recorder = Recorder()
    middleware = guarded(CountingApp(delay=0.3), recorder)
    first = threading.Thread(target=lambda: call(middleware, key="k"))
    first.start()
    time.sleep(0.1)
    call(middleware, key="k")
    first.join(timeout=5)
    call(middleware, key=b"")
    assert recorder.kinds() == [
        EventKind.CLAIMED,
        EventKind.IN_PROGRESS,
        EventKind.STORED,
        EventKind.REJECTED,
    ]

    recorder = Recorder()
    call(guarded(CountingApp(status="429 Too Many Requests"), recorder), key="k")
    assert recorder.kinds() == [EventKind.CLAIMED, EventKind.RELEASED]

    recorder = Recorder()
    call(guarded(CountingApp(), recorder, store=BrokenStore()), key="k")
    assert recorder.kinds() == [EventKind.STORE_ERROR]
    assert recorder.events[0].detail == "claim"
