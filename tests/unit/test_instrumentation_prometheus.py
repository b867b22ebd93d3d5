"""PrometheusSubscriber: exact metric values for every row of the SPEC §3 table, driving
the real ASGI middleware in process over a MemoryStore."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from oncely import IdempotencyMiddleware
from oncely.core.events import EventKind, IdempotencyEvent
from oncely.core.records import StoredResponse
from oncely.instrumentation.prometheus import PrometheusSubscriber, make_metrics_app
from oncely.stores import MemoryStore, StoreError
from tests.adapters.harness import call

pytestmark = pytest.mark.anyio

POST = {"method": "POST", "route": "unmatched", "store": "memory"}


class Metrics:
    """A subscriber on a fresh registry, and exact reads of its samples."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.subscriber = PrometheusSubscriber(self.registry)

    def value(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def requests(self, outcome: str, **labels: str) -> float | None:
        return self.value("oncely_requests_total", outcome=outcome, **{**POST, **labels})

    def completions(self, result: str, status_class: str) -> float | None:
        return self.value("oncely_completions_total", result=result, status_class=status_class)

    def store_ops(self, operation: str) -> float | None:
        return self.value(
            "oncely_store_operation_seconds_count", operation=operation, store="memory"
        )

    def in_flight(self) -> float | None:
        return self.value("oncely_in_flight", store="memory")

    def samples(self) -> list[tuple[str, Mapping[str, str], float]]:
        return [
            (sample.name, sample.labels, sample.value)
            for family in self.registry.collect()
            for sample in family.samples
        ]

    def guard(self, app: Any, store: Any = None, **options: Any) -> IdempotencyMiddleware:
        return IdempotencyMiddleware(
            app, store=store or MemoryStore(), event_subscribers=[self.subscriber], **options
        )


async def respond(
    send: Any, status: int = 201, body: bytes = b'{"ok":true}', delay: float = 0.0
) -> None:
    if delay:
        await asyncio.sleep(delay)
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": body})


class App:
    def __init__(self, status: int = 201, delay: float = 0.0, body: bytes = b"{}") -> None:
        self.status, self.delay, self.body = status, delay, body

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await respond(send, self.status, self.body, self.delay)


class ClaimFails(MemoryStore):
    async def claim(self, *args: Any, **kwargs: Any) -> Any:
        raise StoreError("connection refused")


class CompleteFails(MemoryStore):
    async def complete(self, scope: str, key: str, token: str, response: StoredResponse) -> bool:
        raise StoreError("connection reset")


async def test_fresh_replay_mismatch() -> None:
    metrics = Metrics()
    middleware = metrics.guard(App())
    assert (await call(middleware, key="k", body=b'{"a":1}')).status == 201
    assert (await call(middleware, key="k", body=b'{"a":1}')).status == 201
    assert (await call(middleware, key="k", body=b'{"a":2}')).status == 422
    assert metrics.requests("claimed") == 1
    assert metrics.requests("replayed") == 1
    assert metrics.requests("mismatch") == 1
    assert metrics.completions("stored", "2xx") == 1
    assert metrics.store_ops("claim") == 3
    assert metrics.store_ops("complete") == 1
    assert metrics.value("oncely_handler_seconds_count", route="unmatched") == 1
    assert metrics.in_flight() == 0


async def test_in_flight_conflict_and_the_gauge() -> None:
    metrics = Metrics()
    middleware = metrics.guard(App(delay=0.2))
    first = asyncio.create_task(call(middleware, key="k"))
    await asyncio.sleep(0.05)
    assert metrics.in_flight() == 1
    assert (await call(middleware, key="k")).status == 409
    assert (await first).status == 201
    assert metrics.requests("claimed") == 1
    assert metrics.requests("in-progress") == 1
    assert metrics.completions("stored", "2xx") == 1
    assert metrics.in_flight() == 0
    handler_sum = metrics.value("oncely_handler_seconds_sum", route="unmatched")
    assert handler_sum is not None
    assert handler_sum >= 0.2


async def test_unstored_status_releases() -> None:
    metrics = Metrics()
    await call(metrics.guard(App(status=429)), key="k")
    assert metrics.requests("claimed") == 1
    assert metrics.completions("released", "4xx") == 1
    assert metrics.completions("stored", "4xx") == 0
    assert metrics.in_flight() == 0


async def test_take_over_after_a_lapsed_lease() -> None:
    metrics = Metrics()
    store = MemoryStore()
    await store.claim("anonymous", "k", "", "dead-worker", lease=0.01, retention=60)
    await asyncio.sleep(0.02)
    await call(metrics.guard(App(), store, fingerprint=None), key="k")
    assert metrics.requests("took-over") == 1
    assert metrics.requests("claimed") is None
    assert metrics.completions("stored", "2xx") == 1
    assert metrics.in_flight() == 0


async def test_lease_lost_at_completion() -> None:
    metrics = Metrics()
    store = MemoryStore()

    async def overtaken(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        record = await store.get("anonymous", "k")
        assert record is not None
        await store.release("anonymous", "k", record.token or "")
        await store.claim("anonymous", "k", record.fingerprint, "other", lease=60, retention=60)
        await respond(send, 200)

    await call(metrics.guard(overtaken, store), key="k")
    assert metrics.requests("claimed") == 1
    assert metrics.completions("lease-lost", "2xx") == 1
    assert metrics.completions("stored", "2xx") == 0
    assert metrics.in_flight() == 0


async def test_too_large_and_rejected() -> None:
    metrics = Metrics()
    middleware = metrics.guard(App(body=b"x" * 50), max_stored_body=10, max_request_body=100)
    assert (await call(middleware, key="k")).status == 201
    assert (await call(middleware, key="k")).status == 409  # completed, too large to replay
    assert (await call(middleware, key=b"")).status == 400
    assert (await call(middleware, key="big", body=b"y" * 200)).status == 413
    assert metrics.requests("claimed") == 1
    assert metrics.requests("too-large") == 1
    assert metrics.requests("rejected") == 2
    assert metrics.completions("stored", "2xx") == 1
    assert metrics.store_ops("claim") == 2  # rejected requests never reach the store


async def test_store_error_at_claim() -> None:
    metrics = Metrics()
    assert (await call(metrics.guard(App(), ClaimFails()), key="k")).status == 503
    assert metrics.requests("store-error") == 1
    assert metrics.requests("claimed") is None
    assert metrics.completions("store-error", "5xx") == 0
    assert metrics.store_ops("claim") == 0  # the claim failed: no latency to observe
    assert metrics.in_flight() is None  # no claim was ever held


async def test_store_error_at_completion() -> None:
    metrics = Metrics()
    assert (await call(metrics.guard(App(), CompleteFails()), key="k")).status == 201
    assert metrics.requests("claimed") == 1
    assert metrics.requests("store-error") is None
    assert metrics.completions("store-error", "2xx") == 1
    assert metrics.store_ops("complete") == 1
    assert metrics.in_flight() == 0


async def test_route_label_is_the_template_never_the_raw_path() -> None:
    async def transfer(request: Request) -> JSONResponse:
        return JSONResponse({"id": request.path_params["id"]}, status_code=201)

    metrics = Metrics()
    app = Starlette(routes=[Route("/transfers/{id}", transfer, methods=["POST"])])
    middleware = metrics.guard(app)
    assert (await call(middleware, path="/transfers/42", key="k")).status == 201
    assert (await call(middleware, path="/transfers/42", key="k")).status == 201
    assert metrics.value("oncely_handler_seconds_count", route="/transfers/{id}") == 1
    assert metrics.completions("stored", "2xx") == 1
    assert not any("42" in value for _, labels, _ in metrics.samples() for value in labels.values())


async def test_each_request_is_counted_once() -> None:
    metrics = Metrics()
    middleware = metrics.guard(App())
    for key in ("a", "b", "a", "c", "a"):
        await call(middleware, key=key)
    total = sum(value for name, _, value in metrics.samples() if name == "oncely_requests_total")
    assert total == 5
    assert metrics.requests("claimed") == 3
    assert metrics.requests("replayed") == 2


def test_completion_children_exist_before_any_event() -> None:
    metrics = Metrics()
    for result in ("stored", "released", "lease-lost", "store-error"):
        for status_class in ("1xx", "2xx", "3xx", "4xx", "5xx", "none"):
            assert metrics.completions(result, status_class) == 0


def test_lease_lost_while_running_does_not_decrement_twice() -> None:
    metrics = Metrics()
    subscriber = metrics.subscriber
    common: dict[str, Any] = {"method": "POST", "store": "memory"}
    subscriber(IdempotencyEvent(EventKind.CLAIMED, duration=0.001, attempt=1, **common))
    subscriber(IdempotencyEvent(EventKind.LEASE_LOST, detail="renewal", **common))
    subscriber(
        IdempotencyEvent(
            EventKind.LEASE_LOST, status=200, duration=0.001, handler_duration=1.0, **common
        )
    )
    assert metrics.in_flight() == 0
    assert metrics.completions("lease-lost", "2xx") == 1
    assert metrics.requests("claimed") == 1


def test_client_retries_by_reason() -> None:
    metrics = Metrics()
    metrics.subscriber(IdempotencyEvent(EventKind.CLIENT_RETRY, method="POST", detail="status 503"))
    metrics.subscriber(IdempotencyEvent(EventKind.CLIENT_RETRY, method="POST", detail="status 503"))
    metrics.subscriber(
        IdempotencyEvent(EventKind.CLIENT_RETRY, method="POST", detail="ReadTimeout")
    )
    assert metrics.value("oncely_client_retries_total", reason="status 503") == 2
    assert metrics.value("oncely_client_retries_total", reason="ReadTimeout") == 1


def test_namespace() -> None:
    registry = CollectorRegistry()
    subscriber = PrometheusSubscriber(registry, namespace="payments")
    subscriber(IdempotencyEvent(EventKind.REPLAYED, method="POST", store="sqlite"))
    labels = {"outcome": "replayed", "method": "POST", "route": "unmatched", "store": "sqlite"}
    assert registry.get_sample_value("payments_requests_total", labels) == 1


async def test_metrics_app_serves_the_registry() -> None:
    metrics = Metrics()
    await call(metrics.guard(App()), key="k")
    exchange = await call(metrics.subscriber.asgi_app(), "GET", "/metrics")
    assert exchange.status == 200
    text = exchange.body.decode()
    assert (
        'oncely_requests_total{method="POST",outcome="claimed",route="unmatched",store="memory"}'
        " 1.0" in text
    )
    assert 'oncely_in_flight{store="memory"} 0.0' in text


async def test_metrics_app_as_a_starlette_route() -> None:
    async def transfer(request: Request) -> JSONResponse:
        return JSONResponse({}, status_code=201)

    metrics = Metrics()
    app = Starlette(
        routes=[
            Route("/transfers", transfer, methods=["POST"]),
            Route("/metrics", metrics.subscriber.asgi_app(), include_in_schema=False),
        ]
    )
    middleware = metrics.guard(app)
    await call(middleware, path="/transfers", key="k")
    exchange = await call(middleware, "GET", "/metrics")
    assert exchange.status == 200
    headers = {name.lower(): value for name, value in exchange.headers.items()}
    assert headers["content-type"].startswith("text/plain")
    assert 'oncely_handler_seconds_count{route="/transfers"} 1.0' in exchange.body.decode()


async def test_metrics_app_in_multiprocess_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    exchange = await call(make_metrics_app(), "GET", "/metrics")
    assert exchange.status == 200
