"""OpenTelemetrySubscriber: span names, parents, timing, attributes and status, recorded
with the SDK's in-memory exporter around the real ASGI middleware."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Span, StatusCode

from oncely import IdempotencyMiddleware
from oncely.core.events import EventKind, IdempotencyEvent, hash_key
from oncely.core.records import StoredResponse
from oncely.instrumentation.otel import OpenTelemetrySubscriber
from oncely.stores import MemoryStore, StoreError
from tests.adapters.harness import Exchange, call

pytestmark = pytest.mark.anyio


class Tracing:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("test")
        self.subscriber = OpenTelemetrySubscriber(self.provider)

    def guard(self, app: Any, store: Any = None, **options: Any) -> IdempotencyMiddleware:
        return IdempotencyMiddleware(
            app, store=store or MemoryStore(), event_subscribers=[self.subscriber], **options
        )

    async def request(self, middleware: Any, **kwargs: Any) -> tuple[Exchange, Span]:
        """`call(...)` under a request span, as an outer OTel ASGI middleware makes one."""
        with self.tracer.start_as_current_span("POST /pay") as request_span:
            exchange = await call(middleware, **kwargs)
        return exchange, request_span

    def spans(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.exporter.get_finished_spans() if span.name == name]


@pytest.fixture
def tracing() -> Iterator[Tracing]:
    tracing = Tracing()
    yield tracing
    tracing.provider.shutdown()


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


class CompleteFails(MemoryStore):
    async def complete(self, scope: str, key: str, token: str, response: StoredResponse) -> bool:
        raise StoreError("connection reset")


def parent_id(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


async def test_fresh_request_claim_and_complete_spans(tracing: Tracing) -> None:
    middleware = tracing.guard(App(delay=0.05))
    exchange, request_span = await tracing.request(middleware, key="secret-key-1")
    assert exchange.status == 201
    names = [span.name for span in tracing.exporter.get_finished_spans()]
    assert names == ["oncely.claim", "oncely.complete", "POST /pay"]
    (claim,) = tracing.spans("oncely.claim")
    (complete,) = tracing.spans("oncely.complete")
    (request,) = tracing.spans("POST /pay")
    context = request_span.get_span_context()
    for span in (claim, complete):
        assert parent_id(span) == context.span_id
        assert span.context is not None
        assert span.context.trace_id == context.trace_id
        assert span.status.status_code is StatusCode.UNSET
    assert dict(claim.attributes or {}) == {
        "oncely.outcome": "claimed",
        "oncely.store": "memory",
        "oncely.attempt": 1,
        "oncely.key_hash": hash_key("secret-key-1"),
        "http.request.method": "POST",
    }
    assert dict(complete.attributes or {}) == {
        "oncely.outcome": "stored",
        "oncely.store": "memory",
        "oncely.key_hash": hash_key("secret-key-1"),
        "http.request.method": "POST",
        "http.response.status_code": 201,
    }
    # Each span covers its store operation only, inside the request, in order; the
    # handler's 50 ms lie between them.
    assert claim.start_time is not None
    assert claim.end_time is not None
    assert complete.start_time is not None
    assert complete.end_time is not None
    assert request.start_time is not None
    assert request.end_time is not None
    assert claim.start_time <= claim.end_time <= complete.start_time <= complete.end_time
    assert complete.start_time - claim.end_time >= 40_000_000
    slack = 2_000_000  # wall clock vs the perf counter the durations come from
    assert request.start_time - slack <= claim.start_time
    assert complete.end_time <= request.end_time + slack


async def test_replay_mismatch_and_in_flight(tracing: Tracing) -> None:
    middleware = tracing.guard(App(delay=0.2))
    await tracing.request(middleware, key="k", body=b'{"a":1}')
    tracing.exporter.clear()
    _, replay_span = await tracing.request(middleware, key="k", body=b'{"a":1}')
    await tracing.request(middleware, key="k", body=b'{"a":2}')
    outcomes = [
        (span.name, (span.attributes or {}).get("oncely.outcome"))
        for span in tracing.exporter.get_finished_spans()
    ]
    assert outcomes == [
        ("oncely.claim", "replayed"),
        ("POST /pay", None),
        ("oncely.claim", "mismatch"),
        ("POST /pay", None),
    ]
    replay = tracing.spans("oncely.claim")[0]
    assert parent_id(replay) == replay_span.get_span_context().span_id
    assert (replay.attributes or {})["oncely.attempt"] == 1

    tracing.exporter.clear()
    first = asyncio.create_task(tracing.request(middleware, key="slow"))
    await asyncio.sleep(0.05)
    await tracing.request(middleware, key="slow")
    await first
    in_flight = [
        (span.attributes or {}).get("oncely.outcome")
        for span in tracing.exporter.get_finished_spans()
        if span.name.startswith("oncely.")
    ]
    assert in_flight == ["claimed", "in-progress", "stored"]


async def test_store_error_at_claim_is_an_error_span(tracing: Tracing) -> None:
    exchange, request_span = await tracing.request(tracing.guard(App(), ClaimFails()), key="k")
    assert exchange.status == 503
    (claim,) = tracing.spans("oncely.claim")
    assert tracing.spans("oncely.complete") == []
    assert parent_id(claim) == request_span.get_span_context().span_id
    assert claim.status.status_code is StatusCode.ERROR
    assert claim.status.description == "idempotency store failed at claim"
    attributes = dict(claim.attributes or {})
    assert attributes["oncely.outcome"] == "store-error"
    assert attributes["oncely.detail"] == "claim"
    assert "oncely.attempt" not in attributes


async def test_store_error_at_completion_is_an_error_span(tracing: Tracing) -> None:
    exchange, _ = await tracing.request(tracing.guard(App(), CompleteFails()), key="k")
    assert exchange.status == 201
    (claim,) = tracing.spans("oncely.claim")
    (complete,) = tracing.spans("oncely.complete")
    assert claim.status.status_code is StatusCode.UNSET
    assert complete.status.status_code is StatusCode.ERROR
    assert (complete.attributes or {})["oncely.outcome"] == "store-error"
    assert (complete.attributes or {})["http.response.status_code"] == 201


async def test_rejection_is_an_event_on_the_request_span(tracing: Tracing) -> None:
    exchange, _ = await tracing.request(tracing.guard(App()), key=b"")
    assert exchange.status == 400
    (request,) = tracing.exporter.get_finished_spans()
    assert request.name == "POST /pay"
    (event,) = request.events
    assert event.name == "oncely.rejected"
    assert (event.attributes or {})["http.response.status_code"] == 400
    assert (event.attributes or {})["oncely.outcome"] == "rejected"


async def test_took_over_and_released(tracing: Tracing) -> None:
    store = MemoryStore()
    await store.claim("anonymous", "k", "", "dead-worker", lease=0.01, retention=60)
    await asyncio.sleep(0.02)
    await tracing.request(tracing.guard(App(status=429), store, fingerprint=None), key="k")
    claim, complete = (tracing.spans(name)[0] for name in ("oncely.claim", "oncely.complete"))
    assert (claim.attributes or {})["oncely.outcome"] == "took-over"
    assert (claim.attributes or {})["oncely.attempt"] == 2
    assert (complete.attributes or {})["oncely.outcome"] == "released"
    assert (complete.attributes or {})["http.response.status_code"] == 429


def test_route_template_attribute_and_a_root_span_without_parent(tracing: Tracing) -> None:
    tracing.subscriber(
        IdempotencyEvent(
            EventKind.STORED,
            method="POST",
            route="/transfers/{id}",
            status=201,
            store="sqlite",
            duration=0.002,
            handler_duration=0.01,
            key_hash="abc",
        )
    )
    (span,) = tracing.exporter.get_finished_spans()
    assert span.name == "oncely.complete"
    assert span.parent is None
    assert (span.attributes or {})["http.route"] == "/transfers/{id}"
    assert span.start_time is not None
    assert span.end_time is not None
    assert span.end_time - span.start_time == 2_000_000


def test_client_retry_and_lease_lost_while_running_are_span_events(tracing: Tracing) -> None:
    with tracing.tracer.start_as_current_span("outer"):
        tracing.subscriber(
            IdempotencyEvent(EventKind.CLIENT_RETRY, method="POST", status=503, attempt=1,
                             detail="status 503")
        )  # fmt: skip
        tracing.subscriber(IdempotencyEvent(EventKind.LEASE_LOST, method="POST", detail="renewal"))
    (outer,) = tracing.exporter.get_finished_spans()
    assert [event.name for event in outer.events] == ["oncely.client_retry", "oncely.lease_lost"]
    assert dict(outer.events[0].attributes or {}) == {
        "oncely.outcome": "client-retry",
        "oncely.attempt": 1,
        "http.request.method": "POST",
        "http.response.status_code": 503,
        "oncely.detail": "status 503",
    }
