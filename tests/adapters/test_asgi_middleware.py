"""The ASGI adapter in process: every row of SPEC §3 and §4, with exact message order."""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from oncely import IdempotencyMiddleware, exempt, idempotent
from oncely.core.records import RecordState, StoredResponse
from oncely.stores import MemoryStore, StoreError
from oncely.stores.base import AsyncStore
from tests.adapters.harness import Message, call

pytestmark = pytest.mark.anyio


class CountingApp:
    """A raw ASGI app that counts executions and answers with its body and count."""

    def __init__(self, status: int = 201, delay: float = 0.0) -> None:
        self.executions = 0
        self.status = status
        self.delay = delay
        self.received: list[Message] = []

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        message = await receive()
        self.received.append(message)
        self.executions += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        body = json.dumps({"n": self.executions, "got": message["body"].decode()}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": self.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"set-cookie", b"s=1"),
                    (b"x-id", str(self.executions).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def guarded(app: Any, store: AsyncStore | None = None, **options: Any) -> IdempotencyMiddleware:
    return IdempotencyMiddleware(app, store=store or MemoryStore(), **options)


class WaitingStore(MemoryStore):
    """The memory store with a completion that suspends, as a networked store's does:
    the adapter cannot complete it inline. `completing` runs inside each completion."""

    def __init__(self) -> None:
        super().__init__()
        self.completing: list[Callable[[], None]] = []
        self.answering = asyncio.Event()  # cleared: completions wait until it is set
        self.answering.set()

    async def complete(self, scope: str, key: str, token: str, response: StoredResponse) -> bool:
        await asyncio.sleep(0)
        for hook in self.completing:
            hook()
        await self.answering.wait()
        return self.complete_sync(scope, key, token, response)


def post_scope(path: str = "/s", key: bytes = b"k") -> Message:
    return {
        "type": "http", "method": "POST", "path": path, "query_string": b"",
        "headers": [(b"idempotency-key", key)],
    }  # fmt: skip


async def empty_request() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def test_first_request_runs_and_the_retry_is_replayed_byte_for_byte() -> None:
    app = CountingApp()
    middleware = guarded(app)
    first = await call(middleware, key="k1", body=b'{"amount": 5}')
    second = await call(middleware, key="k1", body=b'{ "amount":5 }')
    assert app.executions == 1
    assert first.status == second.status == 201
    assert first.body == second.body
    assert "idempotent-replayed" not in first.headers
    assert second.headers["idempotent-replayed"] == "true"
    # Set-Cookie is sent to the first caller but never stored or replayed.
    assert first.headers["set-cookie"] == "s=1"
    assert "set-cookie" not in second.headers
    assert [h for h in second.raw_headers if h[0] != b"idempotent-replayed"] == [
        h for h in first.raw_headers if h[0] != b"set-cookie"
    ]


async def test_same_key_different_body_is_422_and_409_when_configured() -> None:
    app = CountingApp()
    for status, middleware in ((422, guarded(app)), (409, guarded(app, mismatch_status=409))):
        await call(middleware, key="k", body=b'{"amount": 5}')
        mismatch = await call(middleware, key="k", body=b'{"amount": 6}')
        assert mismatch.status == status
        assert mismatch.headers["content-type"] == "application/problem+json"
        problem = mismatch.json()
        assert problem["type"].endswith("key-reused-with-different-request")
        assert problem["status"] == status
        assert problem["idempotency_key"] == "k"
        assert problem["key_retention_seconds"] == 86400
    assert app.executions == 2


async def test_in_flight_duplicate_gets_409_with_retry_after() -> None:
    app = CountingApp(delay=0.3)
    middleware = guarded(app)
    first = asyncio.create_task(call(middleware, key="k"))
    await asyncio.sleep(0.05)
    second = await call(middleware, key="k")
    assert second.status == 409
    assert second.headers["retry-after"] == "1"
    assert second.json()["type"].endswith("request-in-progress")
    assert (await first).status == 201
    assert app.executions == 1


async def test_in_flight_duplicate_can_wait_and_replay() -> None:
    app = CountingApp(delay=0.2)
    middleware = guarded(app, wait_for_in_flight=2.0)
    first = asyncio.create_task(call(middleware, key="k"))
    await asyncio.sleep(0.05)
    second = await call(middleware, key="k")
    assert second.status == 201
    assert second.headers["idempotent-replayed"] == "true"
    assert second.body == (await first).body
    assert app.executions == 1


async def test_waiting_is_bounded() -> None:
    app = CountingApp(delay=1.0)
    middleware = guarded(app, wait_for_in_flight=0.2)
    first = asyncio.create_task(call(middleware, key="k"))
    await asyncio.sleep(0.05)
    started = asyncio.get_running_loop().time()
    second = await call(middleware, key="k")
    assert second.status == 409
    assert asyncio.get_running_loop().time() - started < 0.8
    await first


async def test_get_and_keyless_requests_pass_straight_through() -> None:
    app = CountingApp(status=200)
    store = MemoryStore()
    middleware = guarded(app, store)
    await call(middleware, "GET", key="k")
    await call(middleware, "GET", key="k")
    await call(middleware, "POST")
    await call(middleware, "POST")
    assert app.executions == 4
    assert (await store.stats()).completed == 0


@pytest.mark.parametrize(
    ("raw", "rule"),
    [
        (b"", "empty"),
        (b"k" * 256, "too-long"),
        (b"bad\x01key", "not-visible-ascii"),
        ("caf\u00e9".encode(), "not-visible-ascii"),
        (b'"unterminated', "malformed-string"),
    ],
)
async def test_bad_keys_are_400_problems_and_never_run(raw: bytes, rule: str) -> None:
    app = CountingApp()
    exchange = await call(guarded(app, docs_url="https://docs.example/idempotency"), key=raw)
    assert exchange.status == 400
    problem = exchange.json()
    assert problem["rule"] == rule
    assert set(problem) >= {"type", "title", "status", "detail"}
    assert exchange.headers["link"] == '<https://docs.example/idempotency>; rel="describedby"'
    if rule == "not-visible-ascii":
        assert "idempotency_key" not in problem
    assert app.executions == 0


async def test_conflicting_header_lines_are_400() -> None:
    app = CountingApp()
    exchange = await call(
        guarded(app), headers=[(b"idempotency-key", b"a"), (b"idempotency-key", b"b")]
    )
    assert exchange.status == 400
    assert exchange.json()["rule"] == "conflicting-headers"


async def test_required_key() -> None:
    app = CountingApp()
    exchange = await call(guarded(app, require_key=["post"]))
    assert exchange.status == 400
    assert exchange.json()["header"] == "Idempotency-Key"
    assert app.executions == 0


async def test_body_over_the_limit_is_413_and_leaves_no_record() -> None:
    app = CountingApp()
    store = MemoryStore()
    exchange = await call(guarded(app, store, max_request_body=10), key="k", body=[b"x" * 6] * 2)
    assert exchange.status == 413
    assert app.executions == 0
    assert await store.get("anonymous", "k") is None


async def test_body_is_buffered_whole_and_later_receives_reach_the_real_channel() -> None:
    app = CountingApp()
    exchange = await call(guarded(app), key="k", body=[b'{"a":', b" 1}"])
    assert exchange.json()["got"] == '{"a": 1}'
    assert app.received == [{"type": "http.request", "body": b'{"a": 1}', "more_body": False}]

    async def disconnect_after_body(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        second = await receive()  # must come from the server, not be invented
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": second["type"].encode()})

    async def real_channel() -> Message:
        return {"type": "http.disconnect", "from": "server"}

    exchange = await call(guarded(disconnect_after_body), key="k2", after_body=real_channel)
    assert exchange.body == b"http.disconnect"


@pytest.mark.parametrize("make_store", [MemoryStore, WaitingStore], ids=["inline", "waits"])
async def test_record_is_complete_before_the_last_byte_is_sent(
    make_store: Callable[[], MemoryStore],
) -> None:
    store = make_store()
    states: list[RecordState | None] = []

    async def streaming(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for chunk in (b"a", b"b"):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"c"})

    middleware = guarded(streaming, store)

    async def observing_send(message: Message) -> None:
        record = await store.get("anonymous", "k")
        states.append(record.state if record else None)

    await middleware(post_scope(), empty_request, observing_send)
    in_flight, completed = RecordState.IN_FLIGHT, RecordState.COMPLETED
    assert states == [in_flight, in_flight, in_flight, completed]
    replay = await call(middleware, path="/s", key="k", body=b"")
    assert replay.body == b"abc"


async def test_429_is_not_stored_and_releases_the_key() -> None:
    app = CountingApp(status=429)
    middleware = guarded(app)
    assert (await call(middleware, key="k")).status == 429
    assert (await call(middleware, key="k")).status == 429
    assert app.executions == 2


async def test_4xx_and_5xx_are_stored_by_default_and_configurable() -> None:
    for status in (400, 404, 500, 503):
        app = CountingApp(status=status)
        middleware = guarded(app)
        await call(middleware, key="k")
        replay = await call(middleware, key="k")
        assert replay.status == status
        assert replay.headers["idempotent-replayed"] == "true"
        assert app.executions == 1
    app = CountingApp(status=500)
    middleware = guarded(app, store_status=lambda s: s < 500)
    await call(middleware, key="k")
    await call(middleware, key="k")
    assert app.executions == 2


async def test_exception_stores_a_500_problem_by_default() -> None:
    runs = 0

    async def broken(scope: Any, receive: Any, send: Any) -> None:
        nonlocal runs
        runs += 1
        raise RuntimeError("boom")

    middleware = guarded(broken)
    with pytest.raises(RuntimeError):
        await call(middleware, key="k")
    replay = await call(middleware, key="k")
    assert replay.status == 500
    assert replay.headers["content-type"] == "application/problem+json"
    assert replay.headers["idempotent-replayed"] == "true"
    assert runs == 1

    release = guarded(broken, on_exception="release")
    for _ in range(2):
        with pytest.raises(RuntimeError):
            await call(release, key="k")
    assert runs == 3


async def test_exception_answer_is_sent_when_nothing_was_sent_yet() -> None:
    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    with pytest.raises(RuntimeError):
        await guarded(broken)(post_scope("/"), empty_request, send)
    assert sent[0]["status"] == 500


async def test_response_over_the_size_limit_reaches_the_client_but_is_never_rerun() -> None:
    async def big(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x" * 100, "more_body": True})
        await send({"type": "http.response.body", "body": b"y" * 100})

    middleware = guarded(big, max_stored_body=150)
    first = await call(middleware, key="k")
    assert first.body == b"x" * 100 + b"y" * 100
    again = await call(middleware, key="k")
    assert again.status == 409
    problem = again.json()
    assert problem["type"].endswith("response-not-replayable")
    assert problem["original_status"] == 200


class BrokenStore(MemoryStore):
    async def claim(self, *args: Any, **kwargs: Any) -> Any:
        raise StoreError("connection refused")


async def test_store_outage_fails_closed_with_503() -> None:
    app = CountingApp()
    exchange = await call(guarded(app, BrokenStore()), key="k")
    assert exchange.status == 503
    assert exchange.headers["retry-after"] == "2"
    assert exchange.json()["type"].endswith("idempotency-store-unavailable")
    assert app.executions == 0


async def test_fail_open_runs_the_handler_when_configured() -> None:
    app = CountingApp()
    exchange = await call(guarded(app, BrokenStore(), fail_open=True), key="k", body=b'{"a":1}')
    assert exchange.status == 201
    assert exchange.json()["got"] == '{"a":1}'


async def test_long_handler_keeps_its_lease() -> None:
    app = CountingApp(delay=0.8)
    store = MemoryStore()
    middleware = guarded(app, store, lease=0.3)
    first = asyncio.create_task(call(middleware, key="k"))
    await asyncio.sleep(0.6)  # two lease lengths: without renewal it would be taken over
    second = await call(middleware, key="k")
    assert second.status == 409
    await first
    assert app.executions == 1


async def test_credentials_separate_namespaces() -> None:
    app = CountingApp()
    middleware = guarded(app)
    for token in (b"Bearer sk_test_a", b"Bearer sk_live_a", b"Bearer sk_test_a"):
        await call(middleware, key="same", headers=[(b"authorization", token)])
    assert app.executions == 2


async def test_app_scope_from_outer_auth() -> None:
    app = CountingApp()
    middleware = guarded(app)

    def with_tenant(tenant: str) -> Any:
        async def outer(scope: Any, receive: Any, send: Any) -> None:
            await middleware({**scope, "oncely.scope": tenant}, receive, send)

        return outer

    await call(with_tenant("w1"), key="k")
    await call(with_tenant("w2"), key="k")
    await call(with_tenant("w1"), key="k")
    assert app.executions == 2


async def test_starlette_route_markers() -> None:
    runs: list[str] = []

    @idempotent(required=True)
    async def payments(request: Request) -> Response:
        runs.append("payments")
        return JSONResponse({"ok": True}, status_code=201)

    @exempt
    async def webhooks(request: Request) -> Response:
        runs.append("webhooks")
        return JSONResponse({"ok": True})

    async def other(request: Request) -> Response:
        runs.append("other")
        return JSONResponse({"ok": True})

    app = Starlette(
        routes=[
            Route("/payments", payments, methods=["POST"]),
            Route("/webhooks", webhooks, methods=["POST"]),
            Route("/other", other, methods=["POST"]),
        ]
    )
    middleware = guarded(app)
    assert (await call(middleware, path="/payments")).status == 400
    await call(middleware, path="/webhooks", key="w")
    await call(middleware, path="/webhooks", key="w")
    await call(middleware, path="/other")
    await call(middleware, path="/other", key="o")
    replay = await call(middleware, path="/other", key="o")
    assert replay.headers["idempotent-replayed"] == "true"
    assert runs == ["webhooks", "webhooks", "other", "other"]


async def test_starlette_streaming_response_is_captured_whole() -> None:
    runs = 0

    async def stream(request: Request) -> Response:
        nonlocal runs
        runs += 1

        async def chunks() -> AsyncIterator[bytes]:
            for index in range(3):
                yield f"part{index};".encode()

        return StreamingResponse(chunks(), media_type="text/plain")

    middleware = guarded(Starlette(routes=[Route("/s", stream, methods=["POST"])]))
    first = await call(middleware, path="/s", key="k")
    second = await call(middleware, path="/s", key="k")
    assert first.body == second.body == b"part0;part1;part2;"
    assert runs == 1


async def test_a_request_replayed_again_is_not_fingerprinted_again(
    fingerprinted: list[bytes],
) -> None:
    app = CountingApp()
    middleware = guarded(app)
    first = await call(middleware, key="k", body=b'{"amount": 5}')
    replays = [await call(middleware, key="k", body=b'{"amount": 5}') for _ in range(3)]
    assert app.executions == 1
    assert [r.body for r in replays] == [first.body] * 3
    assert all(r.headers["idempotent-replayed"] == "true" for r in replays)
    assert fingerprinted == [b'{"amount": 5}'] * 2  # the first request and the first replay
    # The same key with another body is still compared by its own fingerprint.
    canonical_twin = await call(middleware, key="k", body=b'{ "amount":5 }')
    mismatch = await call(middleware, key="k", body=b'{"amount": 6}')
    on_another_path = await call(middleware, path="/refund", key="k", body=b'{"amount": 5}')
    assert canonical_twin.status == 201
    assert canonical_twin.body == first.body
    assert mismatch.status == 422
    assert on_another_path.status == 422
    assert app.executions == 1
    assert len(fingerprinted) == 5


async def test_the_apps_request_objects_are_freed_before_the_completion_waits() -> None:
    class Handled:
        """Stands for what a framework makes for a request and keeps on its stack."""

    made: list[weakref.ref[Handled]] = []
    alive_at_completion: list[bool] = []
    store = WaitingStore()
    store.completing.append(lambda: alive_at_completion.append(made[0]() is not None))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        handled = Handled()
        made.append(weakref.ref(handled))
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})
        assert handled is not None

    exchange = await call(guarded(app, store), key="k")
    assert (exchange.status, exchange.body) == (201, b"done")
    assert alive_at_completion == [False]


async def test_work_after_the_response_does_not_hold_the_response_back() -> None:
    store = WaitingStore()
    delivered = asyncio.Event()
    after_work: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        response = JSONResponse({"ok": True}, status_code=201)
        await response(scope, receive, send)
        await delivered.wait()  # a background task that needs the response gone first
        after_work.append("ran")

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            assert store.get_sync("anonymous", "k").state is RecordState.COMPLETED  # type: ignore[union-attr]
            delivered.set()

    await asyncio.wait_for(guarded(app, store)(post_scope(), empty_request, send), timeout=5)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert after_work == ["ran"]


async def test_an_exception_after_the_last_body_keeps_the_response_it_followed() -> None:
    store = WaitingStore()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"paid"})
        raise RuntimeError("after the response")

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    middleware = guarded(app, store)
    with pytest.raises(RuntimeError):
        await middleware(post_scope("/pay"), empty_request, send)
    assert [m.get("body") for m in sent] == [None, b"paid"]
    replay = await call(middleware, key="k", body=b"")
    assert (replay.status, replay.body) == (201, b"paid")
    assert replay.headers["idempotent-replayed"] == "true"


async def test_a_cancelled_request_sends_nothing_after_it_returns() -> None:
    store = WaitingStore()
    store.answering.clear()  # the completion does not answer yet
    completing = asyncio.Event()
    store.completing.append(completing.set)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"paid"})
        await asyncio.sleep(30)  # still working when the server cancels the request

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    request = asyncio.create_task(guarded(app, store)(post_scope(), empty_request, send))
    await asyncio.wait_for(completing.wait(), timeout=5)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    store.answering.set()
    for _ in range(3):
        await asyncio.sleep(0)
    assert [m["type"] for m in sent] == ["http.response.start"]
    assert store.get_sync("anonymous", "k").state is RecordState.IN_FLIGHT  # type: ignore[union-attr]
