"""The retry loop of RetryTransport / AsyncRetryTransport against httpx.MockTransport.

Every test runs twice, sync and async, through the same scripted server; time is fake,
so nothing sleeps.
"""

from __future__ import annotations

import gzip
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import httpx
import pytest

import oncely.client
from oncely.client import (
    AsyncClient,
    AsyncRetryTransport,
    Client,
    RetryEvent,
    RetryPolicy,
    RetryTransport,
    idempotency_key_from,
)

pytestmark = pytest.mark.anyio

URL = "http://api.test/payments"
IN_PROGRESS = {"type": "https://oncely.dev/problems/request-in-progress", "status": 409}
KEY_REUSED = {"type": "https://oncely.dev/problems/key-reused-with-different-request"}

# What the scripted server does on each attempt: a status, a ready response, or an
# exception class to raise.
Outcome = int | httpx.Response | type[Exception]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["sync", "async"])
def flavor(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class TrackedStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body that remembers whether it was closed."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield self.body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.body

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


class Server:
    """Plays `outcomes` in order (the last one repeats) and records each request."""

    def __init__(self, outcomes: list[Outcome]) -> None:
        self.outcomes = outcomes
        self.requests: list[httpx.Request] = []
        self.timeouts: list[dict[str, float | None]] = []

    @property
    def keys(self) -> list[str | None]:
        return [request.headers.get("Idempotency-Key") for request in self.requests]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.timeouts.append(dict(request.extensions.get("timeout", {})))
        outcome = self.outcomes[min(len(self.requests), len(self.outcomes)) - 1]
        if isinstance(outcome, int):
            return httpx.Response(outcome)
        if isinstance(outcome, httpx.Response):
            return outcome
        raise outcome("scripted failure", request=request)  # type: ignore[call-arg]


class FakeTime:
    def __init__(self) -> None:
        self.now = 1_000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)


class Harness:
    """One scripted server and one client of the chosen flavor."""

    def __init__(
        self,
        flavor: str,
        outcomes: list[Outcome],
        policy: RetryPolicy | None = None,
        *,
        wall_clock: float = 1_714_564_800.0,  # 2024-05-01 12:00:00 UTC
    ) -> None:
        self.flavor = flavor
        self.server = Server(outcomes)
        self.time = FakeTime()
        self.policy = policy or RetryPolicy()
        self.wall_clock = wall_clock

    async def send(self, method: str = "POST", url: str = URL, **kwargs: Any) -> httpx.Response:
        common: dict[str, Any] = {
            "policy": self.policy,
            "clock": self.time.clock,
            "uniform": lambda low, high: high,
            "wall_clock": lambda: self.wall_clock,
        }
        mock = httpx.MockTransport(self.server)
        if self.flavor == "sync":
            transport = RetryTransport(mock, sleep=self.time.sleep, **common)
            return send_sync(transport, method, url, **kwargs)
        atransport = AsyncRetryTransport(mock, sleep=self.time.asleep, **common)
        async with AsyncClient(transport=atransport) as client:
            response = await client.request(method, url, **kwargs)
            await response.aread()
            return response


def send_sync(transport: RetryTransport, method: str, url: str, **kwargs: Any) -> httpx.Response:
    with Client(transport=transport) as client:
        response = client.request(method, url, **kwargs)
        response.read()
        return response


def info(response: httpx.Response) -> oncely.client.OncelyInfo:
    found = oncely.client.info(response)
    assert found is not None
    return found


def problem(status: int, body: Mapping[str, object], **headers: str) -> httpx.Response:
    return httpx.Response(
        status,
        content=json.dumps(body).encode(),
        headers={"content-type": "application/problem+json", **headers},
    )


# -- the key ----------------------------------------------------------------------------


async def test_one_key_for_all_retries_of_a_call(flavor: str) -> None:
    harness = Harness(flavor, [httpx.ReadError, 503, httpx.RemoteProtocolError, 201])
    response = await harness.send(json={"amount": 100})
    assert response.status_code == 201
    keys = harness.server.keys
    assert len(keys) == 4
    assert len(set(keys)) == 1
    key = keys[0]
    assert key is not None
    assert uuid.UUID(key).version == 4
    assert info(response).idempotency_key == key
    assert response.request.headers["Idempotency-Key"] == key
    assert [json.loads(r.content) for r in harness.server.requests] == [{"amount": 100}] * 4


async def test_each_call_gets_its_own_key(flavor: str) -> None:
    harness = Harness(flavor, [200])
    await harness.send()
    await harness.send()
    first, second = harness.server.keys
    assert first != second


@pytest.mark.parametrize(
    "key", ["order-42", idempotency_key_from("payments", "pr_123"), '"quoted"']
)
async def test_the_callers_key_is_kept(flavor: str, key: str) -> None:
    harness = Harness(flavor, [503, 200])
    response = await harness.send(headers={"Idempotency-Key": key})
    assert harness.server.keys == [key, key]
    assert info(response).idempotency_key == key


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
async def test_reading_methods_get_no_key_and_are_still_retried(flavor: str, method: str) -> None:
    harness = Harness(flavor, [503, 200])
    response = await harness.send(method)
    assert harness.server.keys == [None, None]
    assert info(response).attempts == 2
    assert info(response).idempotency_key is None


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
async def test_other_mutating_methods_get_a_key(flavor: str, method: str) -> None:
    harness = Harness(flavor, [200])
    await harness.send(method)
    assert harness.server.keys[0] is not None


# -- what is retried --------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc_type",
    [
        httpx.ConnectError,
        httpx.ConnectTimeout,
        httpx.ReadTimeout,
        httpx.WriteTimeout,
        httpx.PoolTimeout,
        httpx.ReadError,
        httpx.WriteError,
        httpx.RemoteProtocolError,
    ],
)
async def test_transport_errors_are_retried(
    flavor: str, exc_type: type[httpx.TransportError]
) -> None:
    harness = Harness(flavor, [exc_type, 200])
    response = await harness.send()
    assert response.status_code == 200
    assert info(response).attempts == 2
    assert harness.time.sleeps == [0.5]


@pytest.mark.parametrize("exc_type", [httpx.LocalProtocolError, httpx.UnsupportedProtocol])
async def test_other_errors_are_raised_at_once(flavor: str, exc_type: type[Exception]) -> None:
    harness = Harness(flavor, [exc_type, 200])
    with pytest.raises(exc_type):
        await harness.send()
    assert len(harness.server.requests) == 1


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
async def test_retryable_statuses(flavor: str, status: int) -> None:
    harness = Harness(flavor, [status, 200])
    response = await harness.send()
    assert response.status_code == 200
    assert info(response).attempts == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422, 501, 505])
async def test_final_statuses_are_returned_at_once(flavor: str, status: int) -> None:
    harness = Harness(flavor, [status, 200])
    response = await harness.send()
    assert response.status_code == status
    assert info(response).attempts == 1
    assert info(response).gave_up is None
    assert harness.time.sleeps == []


async def test_409_in_progress_waits_for_retry_after_then_gets_the_answer(flavor: str) -> None:
    outcomes: list[Outcome] = [problem(409, IN_PROGRESS, **{"Retry-After": "3"}), 201]
    harness = Harness(flavor, outcomes)
    response = await harness.send()
    assert response.status_code == 201
    assert harness.time.sleeps == [3.0]


async def test_409_key_reused_is_final_and_its_body_intact(flavor: str) -> None:
    harness = Harness(flavor, [problem(409, KEY_REUSED, **{"Retry-After": "1"}), 201])
    response = await harness.send()
    assert response.status_code == 409
    assert response.json() == KEY_REUSED
    assert len(harness.server.requests) == 1


async def test_a_gzipped_in_progress_problem_is_recognised(flavor: str) -> None:
    raw = gzip.compress(json.dumps(IN_PROGRESS).encode())
    gzipped = httpx.Response(
        409,
        headers={"content-type": "application/problem+json", "content-encoding": "gzip"},
        stream=TrackedStream(raw),
    )
    harness = Harness(flavor, [gzipped, 201])
    response = await harness.send()
    assert response.status_code == 201


async def test_a_final_409_read_by_the_transport_still_reads_for_the_caller(flavor: str) -> None:
    body = json.dumps(KEY_REUSED).encode()
    streamed = httpx.Response(
        409, headers={"content-type": "application/problem+json"}, stream=TrackedStream(body)
    )
    harness = Harness(flavor, [streamed])
    response = await harness.send()
    assert response.json() == KEY_REUSED


async def test_retried_responses_are_closed(flavor: str) -> None:
    stream = TrackedStream(b"busy")
    harness = Harness(flavor, [httpx.Response(503, stream=stream), 200])
    await harness.send()
    assert stream.closed


async def test_post_without_key_is_not_resent_once_it_may_have_run(flavor: str) -> None:
    policy = RetryPolicy(key_methods=frozenset())
    harness = Harness(flavor, [httpx.ReadTimeout, 200], policy)
    with pytest.raises(httpx.ReadTimeout):
        await harness.send()
    harness = Harness(flavor, [httpx.ConnectError, 200], policy)
    assert (await harness.send()).status_code == 200


# -- backoff, Retry-After, deadline, exhaustion -----------------------------------------


async def test_backoff_doubles(flavor: str) -> None:
    harness = Harness(flavor, [503, 503, 503, 503, 200])
    response = await harness.send()
    assert response.status_code == 200
    assert harness.time.sleeps == [0.5, 1.0, 2.0, 4.0]
    assert info(response).attempts == 5


async def test_retry_after_seconds(flavor: str) -> None:
    harness = Harness(flavor, [httpx.Response(429, headers={"Retry-After": "7"}), 200])
    await harness.send()
    assert harness.time.sleeps == [7.0]


async def test_retry_after_http_date(flavor: str) -> None:
    busy = httpx.Response(
        503,
        headers={
            "Date": "Wed, 01 May 2024 12:00:00 GMT",
            "Retry-After": "Wed, 01 May 2024 12:00:12 GMT",
        },
    )
    harness = Harness(flavor, [busy, 200], wall_clock=0.0)  # the server's Date wins
    await harness.send()
    assert harness.time.sleeps == [12.0]
    no_date = httpx.Response(503, headers={"Retry-After": "Wed, 01 May 2024 12:00:05 GMT"})
    harness = Harness(flavor, [no_date, 200])  # else the local wall clock
    await harness.send()
    assert harness.time.sleeps == [5.0]


async def test_retry_after_beyond_the_cap_returns_that_response(flavor: str) -> None:
    harness = Harness(flavor, [httpx.Response(503, headers={"Retry-After": "3600"}), 200])
    response = await harness.send()
    assert response.status_code == 503
    assert harness.time.sleeps == []
    gave_up = info(response).gave_up
    assert gave_up is not None
    assert "max_retry_after" in gave_up


async def test_deadline(flavor: str) -> None:
    policy = RetryPolicy(attempts=100, timeout=10.0)
    harness = Harness(flavor, [httpx.Response(503, headers={"Retry-After": "4"})], policy)
    response = await harness.send()
    assert response.status_code == 503
    assert harness.time.sleeps == [4.0, 4.0]
    assert info(response).attempts == 3
    gave_up = info(response).gave_up
    assert gave_up is not None
    assert "deadline" in gave_up
    # No attempt may outlive the deadline: its timeouts shrink as time passes.
    assert [t["read"] for t in harness.server.timeouts] == [5.0, 5.0, 2.0]


async def test_exhausted_attempts_return_the_last_response(flavor: str) -> None:
    harness = Harness(flavor, [500, 502, 503, 504, 500, 200])
    response = await harness.send()
    assert response.status_code == 500
    assert info(response).attempts == 5
    assert info(response).gave_up == "status 500; attempts exhausted (5)"
    assert len(harness.server.requests) == 5


async def test_exhausted_attempts_raise_the_last_exception(flavor: str) -> None:
    harness = Harness(flavor, [httpx.ConnectError, httpx.ReadTimeout])
    with pytest.raises(httpx.ReadTimeout) as caught:
        await harness.send()
    assert len(harness.server.requests) == 5
    (note,) = caught.value.__notes__
    assert "after 5 attempt(s)" in note
    assert str(harness.server.keys[0]) in note


async def test_no_retries_policy_sends_once_with_a_key(flavor: str) -> None:
    harness = Harness(flavor, [503, 200], RetryPolicy.no_retries())
    response = await harness.send()
    assert response.status_code == 503
    assert harness.server.keys[0] is not None


# -- one-shot bodies --------------------------------------------------------------------


def one_shot_body(flavor: str) -> object:
    if flavor == "sync":
        return (chunk for chunk in [b"part-1", b"part-2"])

    async def chunks() -> AsyncIterator[bytes]:
        yield b"part-1"
        yield b"part-2"

    return chunks()


async def test_a_one_shot_body_is_sent_once_and_says_so(
    flavor: str, caplog: pytest.LogCaptureFixture
) -> None:
    harness = Harness(flavor, [503, 200])
    with caplog.at_level(logging.INFO, logger="oncely.client"):
        response = await harness.send(content=one_shot_body(flavor))
    assert response.status_code == 503
    assert info(response).gave_up == "non-replayable body"
    assert len(harness.server.requests) == 1
    assert harness.server.keys[0] is not None
    assert any("non-replayable body" in message for message in caplog.messages)


async def test_a_one_shot_body_failure_is_raised_with_the_reason(flavor: str) -> None:
    harness = Harness(flavor, [httpx.ReadError, 200])
    with pytest.raises(httpx.ReadError) as caught:
        await harness.send(content=one_shot_body(flavor))
    assert "non-replayable body" in caught.value.__notes__[0]


def test_a_read_request_becomes_retryable() -> None:
    server = Server([503, 200])
    request = httpx.Request("POST", URL, content=iter([b"a", b"b"]))
    request.read()  # buffered: now bytes, so safe to send again
    transport = RetryTransport(httpx.MockTransport(server), sleep=lambda seconds: None)
    with httpx.Client(transport=transport) as client:
        assert client.send(request).status_code == 200
    assert [r.content for r in server.requests] == [b"ab", b"ab"]


# -- what the response tells ------------------------------------------------------------


async def test_replay_and_attempts_are_visible(flavor: str) -> None:
    replay = httpx.Response(201, json={"id": "pay_1"}, headers={"Idempotent-Replayed": "true"})
    harness = Harness(flavor, [httpx.RemoteProtocolError, replay])
    response = await harness.send()
    assert oncely.client.was_replayed(response)
    assert oncely.client.attempts(response) == 2
    assert info(response).gave_up is None
    fresh = await Harness(flavor, [201]).send()
    assert not oncely.client.was_replayed(fresh)
    assert oncely.client.attempts(fresh) == 1


def test_accessors_work_on_plain_httpx_responses() -> None:
    plain = httpx.Response(200, headers={"Idempotent-Replayed": "true"})
    assert oncely.client.info(plain) is None
    assert oncely.client.was_replayed(plain)
    assert oncely.client.attempts(plain) == 1


async def test_hook_and_log_line_per_retry(flavor: str, caplog: pytest.LogCaptureFixture) -> None:
    events: list[RetryEvent] = []
    harness = Harness(flavor, [503, httpx.ReadTimeout, 200], RetryPolicy(on_retry=events.append))
    with caplog.at_level(logging.INFO, logger="oncely.client"):
        await harness.send()
    assert [(e.attempt, e.reason, e.sleep, e.status_code) for e in events] == [
        (1, "status 503", 0.5, 503),
        (2, "ReadTimeout", 1.0, None),
    ]
    assert isinstance(events[1].exception, httpx.ReadTimeout)
    assert {e.idempotency_key for e in events} == {harness.server.keys[0]}
    retry_lines = [m for m in caplog.messages if m.startswith("retrying")]
    assert len(retry_lines) == 2


# -- wiring -----------------------------------------------------------------------------


def test_plain_httpx_client_with_retry_transport() -> None:
    server = Server([503, 200])
    transport = RetryTransport(httpx.MockTransport(server), sleep=lambda seconds: None)
    with httpx.Client(transport=transport) as client:
        response = client.post(URL)
    assert response.status_code == 200
    assert oncely.client.attempts(response) == 2


def test_client_wraps_the_transport_it_is_given_once() -> None:
    mock = httpx.MockTransport(Server([200]))
    policy = RetryPolicy(attempts=2)
    with Client(transport=mock, retry_policy=policy) as client:
        installed = client._transport
        assert isinstance(installed, RetryTransport)
        assert installed.transport is mock
        assert installed.policy is policy
    ready = RetryTransport(mock)
    with Client(transport=ready) as client:
        assert client._transport is ready


def test_client_wraps_mounts_and_its_default_transport() -> None:
    mock = httpx.MockTransport(Server([200]))
    with Client(mounts={"http://special.test": mock}) as client:
        assert isinstance(client._transport, RetryTransport)
        assert isinstance(client._transport.transport, httpx.HTTPTransport)
        (mounted,) = client._mounts.values()
        assert isinstance(mounted, RetryTransport)
        assert client.post("http://special.test/x").status_code == 200
    assert Client().retry_policy == RetryPolicy.default()


async def test_async_client_wraps_like_the_sync_one() -> None:
    mock = httpx.MockTransport(Server([503, 200]))
    async with AsyncClient(transport=mock, retry_policy=RetryPolicy(base=0.0)) as client:
        assert isinstance(client._transport, AsyncRetryTransport)
        response = await client.post(URL)
    assert oncely.client.attempts(response) == 2


def test_transports_close_what_they_wrap() -> None:
    closed: list[str] = []

    class Inner(httpx.BaseTransport):
        def close(self) -> None:
            closed.append("inner")

    with RetryTransport(Inner()):
        pass
    assert closed == ["inner"]
