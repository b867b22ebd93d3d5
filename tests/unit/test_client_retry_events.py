"""The exact events of client retries, through `client_retry_subscriber`."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest
from prometheus_client import CollectorRegistry

from oncely import AsyncRetryTransport, RetryPolicy, RetryTransport
from oncely.core.events import EventKind, IdempotencyEvent, hash_key
from oncely.instrumentation import client_retry_subscriber
from oncely.instrumentation.prometheus import PrometheusSubscriber

Outcome = int | Exception
IN_PROGRESS = {"type": "https://oncely.dev/problems/request-in-progress", "status": 409}


class Recorder:
    def __init__(self) -> None:
        self.events: list[IdempotencyEvent] = []

    def __call__(self, event: IdempotencyEvent) -> None:
        self.events.append(event)


class Server:
    """Answers each attempt with the next outcome: a status, or an exception to raise."""

    def __init__(self, *outcomes: Outcome) -> None:
        self.outcomes: Iterator[Outcome] = iter(outcomes)
        self.keys: list[str | None] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.keys.append(request.headers.get("idempotency-key"))
        outcome = next(self.outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        if outcome == 409:
            return httpx.Response(409, json=IN_PROGRESS, headers={"retry-after": "0"})
        return httpx.Response(outcome, json={})


def client(server: Server, *subscribers: Callable[[IdempotencyEvent], None], attempts: int = 5
           ) -> httpx.Client:  # fmt: skip
    policy = RetryPolicy(attempts=attempts, on_retry=client_retry_subscriber(*subscribers))
    transport = RetryTransport(httpx.MockTransport(server), policy=policy, sleep=lambda _: None)
    return httpx.Client(transport=transport, base_url="http://api.test")


def test_503_then_201_is_one_retry_event() -> None:
    server, recorder = Server(503, 201), Recorder()
    with client(server, recorder) as http:
        assert http.post("/transfers/42?token=secret", json={"amount": 1}).status_code == 201
    key = server.keys[0]
    assert key is not None
    assert server.keys == [key, key]
    assert recorder.events == [
        IdempotencyEvent(
            kind=EventKind.CLIENT_RETRY,
            method="POST",
            status=503,
            key_hash=hash_key(key),
            attempt=1,
            detail="status 503",
        )
    ]


def test_a_connect_error_is_retried_with_its_reason() -> None:
    server, recorder = Server(httpx.ConnectError("refused"), 201), Recorder()
    with client(server, recorder) as http:
        http.put("/accounts/7", json={}, headers={"Idempotency-Key": "caller-key"})
    (event,) = recorder.events
    assert event.kind is EventKind.CLIENT_RETRY
    assert event.method == "PUT"
    assert event.status is None
    assert event.attempt == 1
    assert event.detail == "ConnectError"
    assert event.key_hash == hash_key("caller-key")
    assert event.route is None  # a raw URL would be unbounded: left out


def test_attempts_are_numbered_and_the_last_failure_is_no_retry() -> None:
    server = Server(503, httpx.ReadTimeout("slow"), 409, 429, 502)
    recorder = Recorder()
    with client(server, recorder) as http:
        assert http.post("/payments", json={}).status_code == 502
    assert [(e.attempt, e.status, e.detail) for e in recorder.events] == [
        (1, 503, "status 503"),
        (2, None, "ReadTimeout"),
        (3, 409, "409 request-in-progress"),
        (4, 429, "status 429"),
    ]


def test_final_statuses_emit_nothing() -> None:
    for status in (201, 400, 404, 422):
        recorder = Recorder()
        with client(Server(status), recorder) as http:
            http.post("/payments", json={})
        assert recorder.events == []


def test_a_failing_subscriber_never_aborts_the_call() -> None:
    def broken(event: IdempotencyEvent) -> None:
        raise RuntimeError("dashboard down")

    recorder = Recorder()
    with client(Server(503, 201), broken, recorder) as http:
        assert http.post("/payments", json={}).status_code == 201
    assert len(recorder.events) == 1


def test_prometheus_counts_client_retries() -> None:
    registry = CollectorRegistry()
    prometheus = PrometheusSubscriber(registry)
    with client(Server(503, 503, httpx.ConnectError("x"), 201), prometheus) as http:
        http.post("/payments", json={})

    def retries(reason: str) -> float | None:
        return registry.get_sample_value("oncely_client_retries_total", {"reason": reason})

    assert retries("status 503") == 2
    assert retries("ConnectError") == 1
    assert registry.get_sample_value("oncely_in_flight", {"store": "none"}) is None


@pytest.mark.anyio
async def test_async_transport_emits_the_same_events() -> None:
    async def no_sleep(_: float) -> None:
        return None

    server, recorder = Server(503, 201), Recorder()
    policy = RetryPolicy(on_retry=client_retry_subscriber(recorder))
    transport = AsyncRetryTransport(httpx.MockTransport(server), policy=policy, sleep=no_sleep)
    async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as http:
        assert (await http.post("/payments", json={})).status_code == 201
    key = server.keys[0]
    assert key is not None
    assert recorder.events == [
        IdempotencyEvent(
            kind=EventKind.CLIENT_RETRY,
            method="POST",
            status=503,
            key_hash=hash_key(key),
            attempt=1,
            detail="status 503",
        )
    ]
