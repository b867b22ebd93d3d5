"""The client's sans-I/O rules: policy, backoff, classification, Retry-After, keys."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from datetime import UTC, datetime
from email.utils import format_datetime

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from oncely.client import RetryEvent, RetryPolicy, idempotency_key_from, parse_retry_after
from oncely.client._policy import (
    GiveUp,
    Retry,
    RetryState,
    reference_time,
)

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC).timestamp()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def top(low: float, high: float) -> float:
    """A jitter source that always picks the upper bound, so delays are predictable."""
    return high


def state_for(
    method: str = "POST",
    policy: RetryPolicy | None = None,
    clock: FakeClock | None = None,
    **request_kwargs: object,
) -> RetryState:
    request = httpx.Request(method, "https://api.test/pay?token=secret", **request_kwargs)  # type: ignore[arg-type]
    return RetryState(policy or RetryPolicy(), request, clock=clock or FakeClock(), uniform=top)


# -- the policy value -------------------------------------------------------------------


def test_defaults_are_spec_section_5() -> None:
    policy = RetryPolicy.default()
    assert (policy.attempts, policy.base, policy.factor, policy.cap) == (5, 0.5, 2.0, 30.0)
    assert policy.timeout == 60.0
    assert policy.max_retry_after == 60.0
    assert policy.key_methods == {"POST", "PUT", "PATCH", "DELETE"}
    assert {429, 500, 502, 503, 504} <= policy.retry_statuses
    assert not {400, 401, 403, 404, 409, 422, 501, 505} & policy.retry_statuses


def test_policy_is_a_frozen_value() -> None:
    policy = RetryPolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.attempts = 3  # type: ignore[misc]
    assert policy.with_(attempts=3) == RetryPolicy(attempts=3)
    assert policy.with_(attempts=3) != policy
    assert RetryPolicy.no_retries().attempts == 1
    # The hook is behaviour, not value: two policies that differ only by it are equal.
    assert RetryPolicy(on_retry=print) == RetryPolicy()


def test_methods_are_normalised() -> None:
    policy = RetryPolicy(key_methods=frozenset({"post", "Patch"}))
    assert policy.key_methods == {"POST", "PATCH"}


@pytest.mark.parametrize(
    "changes",
    [{"attempts": 0}, {"base": -1.0}, {"cap": -1.0}, {"factor": 0.5}, {"timeout": 0.0}],
)
def test_invalid_policies_are_refused(changes: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 (each case has its own message)
        RetryPolicy().with_(**changes)


def test_backoff_bound_doubles_from_base_to_cap() -> None:
    policy = RetryPolicy()
    bounds = [policy.backoff_bound(attempt) for attempt in range(1, 10)]
    assert bounds == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert policy.backoff_bound(100_000) == 30.0  # no OverflowError


def test_backoff_is_full_jitter() -> None:
    policy = RetryPolicy()
    calls: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        calls.append((low, high))
        return low

    assert policy.backoff(3, uniform) == 0.0
    assert calls == [(0.0, 2.0)]


@given(
    attempt=st.integers(min_value=1, max_value=200),
    base=st.floats(min_value=0, max_value=10),
    factor=st.floats(min_value=1, max_value=10),
    cap=st.floats(min_value=0, max_value=100),
    pick=st.floats(min_value=0, max_value=1),
)
def test_backoff_stays_within_zero_and_cap(
    attempt: int, base: float, factor: float, cap: float, pick: float
) -> None:
    policy = RetryPolicy(base=base, factor=factor, cap=cap)
    delay = policy.backoff(attempt, lambda low, high: low + (high - low) * pick)
    assert 0.0 <= delay <= min(cap, policy.backoff_bound(attempt))


# -- Retry-After ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        ("0", 0.0),
        (" 7 ", 7.0),
        ("1.5", 1.5),
        ("-1", None),
        ("inf", None),
        ("nan", None),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected


def test_retry_after_http_date() -> None:
    later = format_datetime(datetime(2024, 5, 1, 12, 0, 30, tzinfo=UTC), usegmt=True)
    assert later == "Wed, 01 May 2024 12:00:30 GMT"
    assert parse_retry_after(later, now=NOW) == 30.0
    earlier = "Wed, 01 May 2024 11:59:00 GMT"
    assert parse_retry_after(earlier, now=NOW) == 0.0


def test_retry_after_date_is_measured_from_the_servers_date() -> None:
    headers = {"date": "Wed, 01 May 2024 12:00:00 GMT"}
    assert reference_time(headers, wall_now=NOW + 500) == NOW  # local clock skewed by 500 s
    assert reference_time({"date": "garbage"}, wall_now=NOW + 500) == NOW + 500
    assert reference_time({}, wall_now=NOW) == NOW


# -- keys -------------------------------------------------------------------------------


def test_key_from_caller_id_is_deterministic_and_namespaced() -> None:
    key = idempotency_key_from("payments", "pr_123")
    assert key == idempotency_key_from("payments", "pr_123")
    assert key != idempotency_key_from("refunds", "pr_123")
    assert key != idempotency_key_from("payments", "pr_124")
    assert uuid.UUID(key).version == 5
    # Pinned: keys must stay the same across releases, or a restart would re-run calls.
    assert key == "2446be20-a6b0-5128-8b4a-763de7be38e3"
    namespace = uuid.UUID("6ba7b811-9dad-11d1-80b4-00c04fd430c8")
    assert idempotency_key_from(namespace, "x") == str(uuid.uuid5(namespace, "x"))


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "post"])
def test_mutating_methods_get_a_fresh_uuid4(method: str) -> None:
    first, second = state_for(method), state_for(method)
    assert first.key is not None
    assert second.key is not None
    assert uuid.UUID(first.key).version == 4
    assert first.key != second.key


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
def test_reading_methods_get_no_key(method: str) -> None:
    assert state_for(method).key is None


def test_callers_key_is_kept() -> None:
    state = state_for(headers={"Idempotency-Key": "order-42"})
    assert state.key == "order-42"


def test_key_methods_are_configurable() -> None:
    policy = RetryPolicy(key_methods=frozenset({"POST"}))
    assert state_for("PATCH", policy).key is None
    assert state_for("POST", policy).key is not None


# -- classification ---------------------------------------------------------------------


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
def test_transport_errors_are_retried(exc_type: type[httpx.TransportError]) -> None:
    state = state_for()
    state.start_attempt()
    assert state.after_exception(exc_type("boom")) == Retry(delay=0.5, reason=exc_type.__name__)


@pytest.mark.parametrize(
    "exc",
    [
        httpx.LocalProtocolError("bad header"),
        httpx.UnsupportedProtocol("ftp"),
        httpx.ProxyError("proxy said no"),
        ValueError("a bug"),
    ],
)
def test_other_errors_are_not_retried(exc: Exception) -> None:
    state = state_for()
    state.start_attempt()
    assert state.after_exception(exc) == GiveUp(None)


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504, 520])
def test_retryable_statuses(status: int) -> None:
    state = state_for()
    state.start_attempt()
    decision = state.after_response(status, {}, None, now=NOW)
    assert decision == Retry(delay=0.5, reason=f"status {status}")


@pytest.mark.parametrize("status", [200, 201, 301, 400, 401, 403, 404, 409, 422, 501, 505, 511])
def test_final_statuses(status: int) -> None:
    state = state_for()
    state.start_attempt()
    assert state.after_response(status, {}, b"{}", now=NOW) == GiveUp(None)


def test_409_in_progress_is_retried_after_its_retry_after() -> None:
    state = state_for()
    state.start_attempt()
    headers = {"content-type": "application/problem+json", "retry-after": "2"}
    body = b'{"type": "https://oncely.dev/problems/request-in-progress", "status": 409}'
    assert state.after_response(409, headers, body, now=NOW) == Retry(
        delay=2.0, reason="409 request-in-progress"
    )


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/problem+json", b'{"type": "https://x/key-reused-with-different-request"}'),
        ("application/problem+json", b"not json"),
        ("application/problem+json", b'["request-in-progress"]'),
        ("text/plain", b'{"type": "request-in-progress"}'),
    ],
)
def test_other_409s_are_final(content_type: str, body: bytes) -> None:
    state = state_for()
    state.start_attempt()
    headers = {"content-type": content_type, "retry-after": "1"}
    assert state.after_response(409, headers, body, now=NOW) == GiveUp(None)


def test_custom_retry_statuses() -> None:
    state = state_for(policy=RetryPolicy(retry_statuses=frozenset({418})))
    state.start_attempt()
    assert isinstance(state.after_response(418, {}, None, now=NOW), Retry)
    assert state.after_response(503, {}, None, now=NOW) == GiveUp(None)


def test_a_post_without_key_is_resent_only_when_it_never_left() -> None:
    policy = RetryPolicy(key_methods=frozenset({"PUT"}))
    state = state_for("POST", policy)
    state.start_attempt()
    assert isinstance(state.after_exception(httpx.ConnectError("refused")), Retry)
    assert isinstance(state.after_response(429, {}, None, now=NOW), Retry)
    assert isinstance(state.after_exception(httpx.ReadTimeout("slow")), GiveUp)
    assert isinstance(state.after_response(503, {}, None, now=NOW), GiveUp)
    # PUT is idempotent by itself (RFC 9110), so it is resent even without a key.
    put = state_for("PUT", RetryPolicy(key_methods=frozenset()))
    put.start_attempt()
    assert put.key is None
    assert isinstance(put.after_exception(httpx.ReadTimeout("slow")), Retry)


# -- stopping ---------------------------------------------------------------------------


def test_attempts_are_counted_and_exhausted() -> None:
    state = state_for(policy=RetryPolicy(attempts=3))
    delays = []
    for _ in range(3):
        state.start_attempt()
        decision = state.after_response(503, {}, None, now=NOW)
        delays.append(decision)
    assert delays[:2] == [Retry(0.5, "status 503"), Retry(1.0, "status 503")]
    assert delays[2] == GiveUp("status 503; attempts exhausted (3)")


def test_retry_after_replaces_backoff_and_is_capped() -> None:
    state = state_for(policy=RetryPolicy(max_retry_after=10))
    state.start_attempt()
    assert state.after_response(503, {"retry-after": "9"}, None, now=NOW) == Retry(
        9.0, "status 503"
    )
    decision = state.after_response(429, {"retry-after": "11"}, None, now=NOW)
    assert isinstance(decision, GiveUp)
    assert decision.reason is not None
    assert "max_retry_after" in decision.reason


def test_retry_after_as_date() -> None:
    state = state_for()
    state.start_attempt()
    headers = {"retry-after": "Wed, 01 May 2024 12:00:03 GMT"}
    assert state.after_response(503, headers, None, now=NOW) == Retry(3.0, "status 503")


def test_deadline_stops_retries() -> None:
    clock = FakeClock()
    state = state_for(policy=RetryPolicy(timeout=5.0, attempts=100), clock=clock)
    state.start_attempt()
    assert isinstance(state.after_response(503, {"retry-after": "4"}, None, now=NOW), Retry)
    clock.now += 4.5
    state.start_attempt()
    decision = state.after_response(503, {"retry-after": "1"}, None, now=NOW)
    assert isinstance(decision, GiveUp)
    assert decision.reason is not None
    assert "deadline" in decision.reason
    assert (
        RetryState(
            RetryPolicy(timeout=None), httpx.Request("GET", "http://x"), clock=clock, uniform=top
        ).remaining()
        is None
    )


def test_attempt_timeouts_end_at_the_deadline() -> None:
    clock = FakeClock()
    state = state_for(policy=RetryPolicy(timeout=10.0), clock=clock)
    clock.now += 7.0
    timeouts = state.attempt_timeouts({"connect": 5.0, "read": None, "write": 1.0})
    assert timeouts == {"connect": 3.0, "read": 3.0, "write": 1.0, "pool": 3.0}


def test_a_one_shot_body_is_never_resent() -> None:
    state = state_for(content=iter([b"chunk"]))
    state.start_attempt()
    assert state.after_exception(httpx.ConnectError("x")) == GiveUp("non-replayable body")
    assert state.after_response(503, {}, None, now=NOW) == GiveUp("non-replayable body")


# -- reporting --------------------------------------------------------------------------


def test_each_retry_is_logged_and_hooked(caplog: pytest.LogCaptureFixture) -> None:
    events: list[RetryEvent] = []
    state = state_for(policy=RetryPolicy(on_retry=events.append))
    state.start_attempt()
    decision = state.after_response(503, {}, None, now=NOW)
    assert isinstance(decision, Retry)
    with caplog.at_level(logging.INFO, logger="oncely.client"):
        state.announce(state.event(decision, status_code=503))
    assert events == [
        RetryEvent(
            method="POST",
            url="https://api.test/pay",
            attempt=1,
            max_attempts=5,
            reason="status 503",
            sleep=0.5,
            idempotency_key=state.key,
            status_code=503,
        )
    ]
    (line,) = caplog.messages
    assert "attempt 1 of 5" in line
    assert "status 503" in line
    assert "0.500 s" in line
    assert str(state.key) in line
    assert "secret" not in line  # the query string can carry credentials


def test_info_reads_the_replay_header() -> None:
    state = state_for()
    state.start_attempt()
    info = state.info({"idempotent-replayed": "true"}, GiveUp(None))
    assert (info.attempts, info.replayed, info.idempotency_key) == (1, True, state.key)
    assert not state.info({}, GiveUp(None)).replayed
