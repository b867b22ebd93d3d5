"""LoggingSubscriber: one line per event at the right level, `extra=` fields, and never
the raw key or credential anywhere in a record."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from oncely import IdempotencyMiddleware
from oncely.core.events import EventKind, IdempotencyEvent, hash_key
from oncely.core.tenancy import credential_scope
from oncely.instrumentation.logging import LoggingSubscriber
from oncely.stores import MemoryStore, StoreError
from tests.adapters.harness import call

pytestmark = pytest.mark.anyio

KEY = "raw-key-8c1f0e7a"
CREDENTIAL = "Bearer sk_live_TOPSECRET"
FIELDS = {
    "oncely_outcome", "oncely_key_hash", "oncely_method", "oncely_route", "oncely_status",
    "oncely_store", "oncely_attempt", "oncely_duration", "oncely_handler_duration",
    "oncely_detail",
}  # fmt: skip


class App:
    def __init__(self, status: int = 201, delay: float = 0.0) -> None:
        self.status, self.delay = status, delay

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await asyncio.sleep(self.delay)
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


class ClaimFails(MemoryStore):
    async def claim(self, *args: Any, **kwargs: Any) -> Any:
        raise StoreError("connection refused")


def guard(app: Any, store: Any = None, **options: Any) -> IdempotencyMiddleware:
    return IdempotencyMiddleware(
        app, store=store or MemoryStore(), event_subscribers=[LoggingSubscriber()], **options
    )


async def send(middleware: Any, key: str | bytes = KEY, **kwargs: Any) -> int:
    headers = [(b"authorization", CREDENTIAL.encode())]
    return (await call(middleware, key=key, headers=headers, **kwargs)).status


def events(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "oncely.events"]


def fields(record: logging.LogRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in FIELDS}


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, int]]:
    return [(fields(record)["oncely_outcome"], record.levelno) for record in events(caplog)]


def assert_no_secret(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:  # every logger: oncely's own lines too
        text = " ".join([record.getMessage(), repr(vars(record))])
        assert KEY not in text
        assert "TOPSECRET" not in text


async def test_routine_outcomes_are_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    middleware = guard(App())
    await send(middleware)
    await send(middleware)
    assert lines(caplog) == [
        ("claimed", logging.DEBUG),
        ("stored", logging.DEBUG),
        ("replayed", logging.DEBUG),
    ]
    stored = events(caplog)[1]
    assert stored.getMessage() == f"POST - key {hash_key(KEY)} stored its 201 response"
    extra = fields(stored)
    assert extra.pop("oncely_duration") >= 0
    assert extra.pop("oncely_handler_duration") >= 0
    assert extra == {
        "oncely_outcome": "stored",
        "oncely_key_hash": hash_key(KEY),
        "oncely_method": "POST",
        "oncely_route": None,
        "oncely_status": 201,
        "oncely_store": "memory",
        "oncely_attempt": None,
        "oncely_detail": None,
    }
    assert_no_secret(caplog)


async def test_at_info_only_the_notable_outcomes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="oncely.events")
    middleware = guard(App(delay=0.2))
    await send(middleware, body=b'{"a":1}')  # claimed, stored: nothing at INFO
    await send(middleware, body=b'{"a":1}')  # replayed: nothing
    await send(middleware, body=b'{"a":2}')  # mismatch
    first = asyncio.create_task(send(middleware, key="other"))
    await asyncio.sleep(0.05)
    assert await send(middleware, key="other") == 409  # in-progress
    await first
    await send(middleware, key=b"")  # rejected
    await send(guard(App(status=429)))  # released
    assert lines(caplog) == [
        ("mismatch", logging.INFO),
        ("in-progress", logging.INFO),
        ("rejected", logging.INFO),
        ("released", logging.INFO),
    ]
    mismatch, in_progress, rejected, released = events(caplog)
    assert mismatch.getMessage() == (
        f"POST - key {hash_key(KEY)} reused with a different request: answered "
        "key-reused-with-different-request"
    )
    assert fields(in_progress)["oncely_key_hash"] == hash_key("other")
    assert fields(rejected)["oncely_status"] == 400
    assert fields(rejected)["oncely_key_hash"] is None
    assert fields(rejected)["oncely_detail"]
    assert fields(released)["oncely_status"] == 429
    assert_no_secret(caplog)


async def test_took_over_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="oncely.events")
    store = MemoryStore()
    await store.claim("anonymous", KEY, "", "dead-worker", lease=0.01, retention=60)
    await asyncio.sleep(0.02)
    await send(guard(App(), store, fingerprint=None, credential_headers=()))
    assert lines(caplog) == [("took-over", logging.WARNING)]
    assert fields(events(caplog)[0])["oncely_attempt"] == 2
    assert "(attempt 2)" in events(caplog)[0].getMessage()
    assert_no_secret(caplog)


async def test_lease_lost_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    store = MemoryStore()

    async def overtaken(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        tenant = credential_scope([(b"authorization", CREDENTIAL.encode())])
        record = await store.get(tenant, KEY)
        assert record is not None
        await store.release(tenant, KEY, record.token or "")
        await store.claim(tenant, KEY, record.fingerprint, "other", lease=60, retention=60)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"late"})

    await send(guard(overtaken, store))
    assert lines(caplog) == [("lease-lost", logging.WARNING)]
    assert fields(events(caplog)[0])["oncely_status"] == 200
    assert_no_secret(caplog)


async def test_store_error_is_an_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    assert await send(guard(App(), ClaimFails())) == 503
    assert lines(caplog) == [("store-error", logging.ERROR)]
    (record,) = events(caplog)
    assert record.getMessage() == f"POST - key {hash_key(KEY)}: the memory store failed at claim"
    assert fields(record)["oncely_detail"] == "claim"
    assert_no_secret(caplog)


async def test_too_large(caplog: pytest.LogCaptureFixture) -> None:
    async def big(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x" * 50})

    caplog.set_level(logging.INFO, logger="oncely.events")
    middleware = guard(big, max_stored_body=10)
    await send(middleware)
    await send(middleware)
    assert lines(caplog) == [("too-large", logging.INFO)]
    assert_no_secret(caplog)


def test_custom_logger_level_and_overrides(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("payments.idempotency")
    subscriber = LoggingSubscriber(
        logger, level=logging.WARNING, levels={EventKind.REPLAYED: logging.INFO}
    )
    caplog.set_level(logging.INFO, logger="payments.idempotency")
    subscriber(IdempotencyEvent(EventKind.REPLAYED, method="POST", route="/t/{id}", key_hash="h"))
    subscriber(IdempotencyEvent(EventKind.MISMATCH, method="POST", key_hash="h"))
    subscriber(IdempotencyEvent(EventKind.CLAIMED, method="POST", key_hash="h"))
    subscriber(
        IdempotencyEvent(EventKind.CLIENT_RETRY, method="POST", attempt=1, detail="status 503",
                         key_hash="h", status=503)
    )  # fmt: skip
    records = [r for r in caplog.records if r.name == "payments.idempotency"]
    assert [(r.getMessage(), r.levelno) for r in records] == [
        ("POST /t/{id} key h replayed the stored response", logging.INFO),
        (
            "POST - key h reused with a different request: answered "
            "key-reused-with-different-request",
            logging.WARNING,
        ),
        ("client retries POST key h after attempt 1: status 503", logging.WARNING),
    ]


def test_lease_lost_while_running_has_its_own_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="oncely.events")
    LoggingSubscriber()(IdempotencyEvent(EventKind.LEASE_LOST, method="PUT", detail="renewal"))
    (record,) = events(caplog)
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "PUT - key - lost its lease while the handler ran: another worker may take the record over"
    )


def test_nothing_is_built_when_the_level_is_off(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="oncely.events")
    LoggingSubscriber()(IdempotencyEvent(EventKind.REPLAYED, method="POST"))
    assert events(caplog) == []
