"""The client's retry rules, sans-I/O: policy, backoff schedule, classification, Retry-After.

Everything that decides lives here; the transports in `_transport.py` only send, sleep and
read. So the sync and async transports can not drift apart, and every rule is a fast unit
test with an injected clock and random source.
"""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
import json
import logging
import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

import httpx

__all__ = [
    "DEFAULT_KEY_METHODS",
    "DEFAULT_RETRY_STATUSES",
    "IDEMPOTENCY_KEY_HEADER",
    "GiveUp",
    "OncelyInfo",
    "Retry",
    "RetryEvent",
    "RetryPolicy",
    "RetryState",
    "idempotency_key_from",
    "parse_retry_after",
]

logger = logging.getLogger("oncely.client")

IDEMPOTENCY_KEY_HEADER: Final = "Idempotency-Key"
REPLAYED_HEADER: Final = "Idempotent-Replayed"
EXTENSION: Final = "oncely"

DEFAULT_KEY_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})

# RFC 9110 §9.2.2: repeating these has the same effect as sending them once, key or not.
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

# 5xx that say "this server will never do this", so a retry can not help: 501 Not
# Implemented, 505 HTTP Version Not Supported, 506 Variant Also Negotiates, 508 Loop
# Detected, 510 Not Extended, 511 Network Authentication Required.
PERMANENT_5XX: Final = frozenset({501, 505, 506, 508, 510, 511})
DEFAULT_RETRY_STATUSES: Final = frozenset(
    {429} | {status for status in range(500, 600) if status not in PERMANENT_5XX}
)

# The request may or may not have reached the server; with a key, resending is safe.
RETRYABLE_EXCEPTIONS: Final[tuple[type[httpx.TransportError], ...]] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.ReadTimeout,
    httpx.WriteTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
)
# The request certainly never left the client: safe to resend even without a key.
NOT_SENT_EXCEPTIONS: Final[tuple[type[httpx.TransportError], ...]] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
)

IN_PROGRESS_SUFFIX: Final = "request-in-progress"


@dataclass(frozen=True, slots=True)
class RetryEvent:
    """What `RetryPolicy.on_retry` receives, once per retry, before the client sleeps."""

    method: str
    url: str  # without the query string, which may hold credentials
    attempt: int  # the attempt that just failed, 1-based
    max_attempts: int
    reason: str  # "status 503", "ReadTimeout", "409 request-in-progress", ...
    sleep: float  # seconds until the next attempt
    idempotency_key: str | None
    status_code: int | None = None
    exception: BaseException | None = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How the client retries. Immutable; derive variants with `with_()`.

    The defaults are SPEC §5: 5 attempts in all, full-jitter exponential backoff from
    0.5 s doubling up to 30 s, and one minute for the whole call.
    """

    attempts: int = 5
    """Total attempts, the first one included. 1 disables retries (keys are still sent)."""
    base: float = 0.5
    """Upper bound of the first backoff sleep, in seconds."""
    factor: float = 2.0
    """Each retry multiplies the upper bound by this."""
    cap: float = 30.0
    """The upper bound never exceeds this many seconds."""
    timeout: float | None = 60.0
    """Deadline for the whole call, all attempts and sleeps included; None for none."""
    max_retry_after: float = 60.0
    """A `Retry-After` longer than this ends the retries and returns that response."""
    key_methods: frozenset[str] = DEFAULT_KEY_METHODS
    """Methods that get a fresh `Idempotency-Key` when the caller gave none."""
    retry_statuses: frozenset[int] = DEFAULT_RETRY_STATUSES
    """Statuses that are retried (409 request-in-progress is retried besides these)."""
    on_retry: Callable[[RetryEvent], None] | None = field(default=None, compare=False)
    """Called once per retry, before sleeping. Exceptions it raises abort the call."""

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if self.base < 0 or self.cap < 0 or self.max_retry_after < 0:
            raise ValueError("base, cap and max_retry_after must not be negative")
        if self.factor < 1:
            raise ValueError("factor must be at least 1")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError("timeout must be positive or None")
        # Accept any iterable and any case, so `key_methods={"post"}` just works.
        object.__setattr__(self, "key_methods", frozenset(m.upper() for m in self.key_methods))
        object.__setattr__(self, "retry_statuses", frozenset(self.retry_statuses))

    @classmethod
    def default(cls) -> RetryPolicy:
        """SPEC §5: 5 attempts, 0.5 s doubling to 30 s with full jitter, 60 s deadline."""
        return cls()

    @classmethod
    def no_retries(cls) -> RetryPolicy:
        """Send once; mutating requests still get a key, so the caller can retry later."""
        return cls(attempts=1)

    def with_(self, **changes: Any) -> RetryPolicy:
        """A copy with some fields changed: `policy.with_(attempts=3)`."""
        return dataclasses.replace(self, **changes)

    def backoff_bound(self, attempt: int) -> float:
        """Upper bound of the sleep after failed attempt number `attempt` (1-based)."""
        try:
            return float(min(self.cap, self.base * self.factor ** (attempt - 1)))
        except OverflowError:  # a policy with very many attempts: long past the cap
            return self.cap

    def backoff(self, attempt: int, uniform: Callable[[float, float], float]) -> float:
        """Full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter"):
        uniform between 0 and the bound, so that clients that failed together spread out."""
        return uniform(0.0, self.backoff_bound(attempt))


@dataclass(frozen=True, slots=True)
class OncelyInfo:
    """What the client learnt about a call; in `response.extensions["oncely"]`."""

    attempts: int
    replayed: bool  # the server sent `Idempotent-Replayed: true`
    idempotency_key: str | None
    gave_up: str | None = None
    """Why a retryable outcome was returned without another attempt (attempts exhausted,
    deadline, Retry-After too long, non-replayable body); None when nothing was retryable."""


@dataclass(frozen=True, slots=True)
class Retry:
    """Decision: send again after `delay` seconds."""

    delay: float
    reason: str


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Decision: return this response (or raise this exception) as it is."""

    reason: str | None  # None: the outcome is final, there was nothing to retry


Decision: TypeAlias = Retry | GiveUp
FINAL: Final = GiveUp(None)


def idempotency_key_from(namespace: str | uuid.UUID, caller_id: str) -> str:
    """A deterministic key from the caller's own id, e.g. a payment request id.

    The same `(namespace, caller_id)` always gives the same key, across processes and
    restarts, so a call that is repeated after a crash is recognised by the server. The
    namespace separates different operations on the same id ("capture" vs "refund").
    The result is a UUIDv5 string: 36 visible ASCII characters.
    """
    if not isinstance(namespace, uuid.UUID):
        namespace = uuid.uuid5(_KEY_NAMESPACE, namespace)
    return str(uuid.uuid5(namespace, caller_id))


# Fixed forever: changing it would change every derived key.
_KEY_NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "urn:oncely:idempotency-key")


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a `Retry-After` value (RFC 9110 §10.2.3), or None if absent
    or unreadable. `now` is the reference for an HTTP-date, as a POSIX timestamp."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)  # delta-seconds; decimals tolerated, as some servers send them
    except ValueError:
        when = http_date(value)
        return None if when is None else max(0.0, when - now)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def http_date(value: str) -> float | None:
    """An HTTP-date (IMF-fixdate, or the obsolete forms email.utils reads) as a timestamp."""
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" in RFC 5322 terms; HTTP-dates are always UTC
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def reference_time(headers: Mapping[str, str], wall_now: float) -> float:
    """The server's own `Date` if it sent one, so a skewed local clock does not matter."""
    date = headers.get("date")
    when = None if date is None else http_date(date)
    return wall_now if when is None else when


def is_in_progress_problem(headers: Mapping[str, str], body: bytes) -> bool:
    """A 409 whose problem `type` ends with `request-in-progress`: the first request with
    this key is still running on the server, so a later retry will get its response."""
    if "json" not in headers.get("content-type", ""):
        return False
    try:
        problem = json.loads(body)
    except ValueError:
        return False
    kind = problem.get("type") if isinstance(problem, dict) else None
    return isinstance(kind, str) and kind.endswith(IN_PROGRESS_SUFFIX)


# A response whose body is lost after its head arrived is retried only if the body was read
# inside the retry loop: bodies of known length up to this size are, so a server that dies
# mid-body costs a retry, not an error for the caller.
BUFFER_LIMIT: Final = 1024 * 1024


def read_in_loop(headers: Mapping[str, str]) -> bool:
    length: str = headers.get("content-length", "")
    return length.isdigit() and int(length) <= BUFFER_LIMIT


def needs_body(status_code: int, headers: Mapping[str, str]) -> bool:
    """Whether the decision needs the response body: only a JSON 409, for its problem type."""
    return status_code == 409 and "json" in headers.get("content-type", "")


def short_key(key: str | None) -> str:
    """The key for log lines: a UUID in full, anything longer cut, so lines stay short."""
    if key is None:
        return "-"
    return key if len(key) <= 36 else key[:36] + "…"


def is_replayable(request: httpx.Request) -> bool:
    """Bytes bodies (content=, json=, data=, none) can be sent again; generators, files
    and multipart streams may be one-shot, so they are never resent."""
    return isinstance(request.stream, httpx.ByteStream)


def attach_key(request: httpx.Request, policy: RetryPolicy) -> str | None:
    """Give a mutating request a fresh UUIDv4 key unless the caller set one; return the key.

    Runs once per logical call, before the first attempt, so every retry carries the same
    key. Redirects keep it too: httpx copies the headers to the redirected request.
    """
    existing: str | None = request.headers.get(IDEMPOTENCY_KEY_HEADER)
    if existing is not None:
        return existing
    if request.method.upper() not in policy.key_methods:
        return None
    key = str(uuid.uuid4())
    request.headers[IDEMPOTENCY_KEY_HEADER] = key
    return key


def says_replayed(headers: Mapping[str, str]) -> bool:
    value: str = headers.get(REPLAYED_HEADER.lower(), "")  # lower: plain dicts in tests
    return value.strip().lower() == "true"


def url_for_logs(url: httpx.URL) -> str:
    return str(url.copy_with(query=None, fragment=None))


class RetryState:
    """One logical call: counts attempts, keeps the deadline, decides after each outcome.

    The transports drive it: `start_attempt()` before sending, then `after_exception()` or
    `after_response()`; a `Retry` means sleep and send again, a `GiveUp` means stop.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        request: httpx.Request,
        *,
        clock: Callable[[], float],
        uniform: Callable[[float, float], float],
    ) -> None:
        self.policy = policy
        self.method = request.method.upper()
        self.url = url_for_logs(request.url)
        self.replayable = is_replayable(request)  # before attach/send: sending may read it
        self.key = attach_key(request, policy)
        # Without a key, a POST or PATCH may run twice if resent after it reached the server.
        self.safe_to_resend = self.key is not None or self.method in IDEMPOTENT_METHODS
        self.attempt = 0
        self._clock = clock
        self._uniform = uniform
        self._deadline = None if policy.timeout is None else clock() + policy.timeout

    def remaining(self) -> float | None:
        """Seconds left before the deadline, or None without one."""
        return None if self._deadline is None else self._deadline - self._clock()

    def start_attempt(self) -> None:
        self.attempt += 1

    def after_exception(self, exc: Exception) -> Decision:
        if not isinstance(exc, RETRYABLE_EXCEPTIONS):
            return FINAL
        if not self.safe_to_resend and not isinstance(exc, NOT_SENT_EXCEPTIONS):
            return GiveUp(f"{type(exc).__name__} on a {self.method} without a key")
        return self._next(type(exc).__name__, retry_after=None)

    def after_response(
        self, status_code: int, headers: Mapping[str, str], body: bytes | None, *, now: float
    ) -> Decision:
        """`body` is needed only when `needs_body(status_code)`; `now` is wall time."""
        if status_code == 409:
            if body is None or not self.safe_to_resend or not is_in_progress_problem(headers, body):
                return FINAL
            reason = "409 request-in-progress"
        elif status_code in self.policy.retry_statuses:
            if not self.safe_to_resend and status_code != 429:
                return GiveUp(f"status {status_code} on a {self.method} without a key")
            reason = f"status {status_code}"
        else:
            return FINAL
        wait = parse_retry_after(headers.get("retry-after"), now=reference_time(headers, now))
        return self._next(reason, retry_after=wait)

    def _next(self, reason: str, *, retry_after: float | None) -> Decision:
        if not self.replayable:
            return GiveUp("non-replayable body")
        if self.attempt >= self.policy.attempts:
            return GiveUp(f"{reason}; attempts exhausted ({self.attempt})")
        if retry_after is not None:
            if retry_after > self.policy.max_retry_after:
                return GiveUp(f"{reason}; Retry-After {retry_after:g} s > max_retry_after")
            delay = retry_after
        else:
            delay = self.policy.backoff(self.attempt, self._uniform)
        remaining = self.remaining()
        if remaining is not None and delay >= remaining:
            return GiveUp(f"{reason}; deadline ({self.policy.timeout:g} s) would pass")
        return Retry(delay=delay, reason=reason)

    def attempt_timeouts(self, original: Mapping[str, float | None]) -> dict[str, float | None]:
        """The per-attempt httpx timeouts, shortened so no attempt outlives the deadline."""
        remaining = self.remaining()
        timeouts = {name: original.get(name) for name in ("connect", "read", "write", "pool")}
        if remaining is None:
            return timeouts
        left = max(remaining, 0.001)
        return {name: left if t is None else min(t, left) for name, t in timeouts.items()}

    def event(
        self,
        decision: Retry,
        *,
        status_code: int | None = None,
        exception: BaseException | None = None,
    ) -> RetryEvent:
        return RetryEvent(
            method=self.method,
            url=self.url,
            attempt=self.attempt,
            max_attempts=self.policy.attempts,
            reason=decision.reason,
            sleep=decision.delay,
            idempotency_key=self.key,
            status_code=status_code,
            exception=exception,
        )

    def announce(self, event: RetryEvent) -> None:
        """The log line and the hook, once per retry."""
        logger.info(
            "retrying %s %s: attempt %d of %d failed (%s), next in %.3f s, key %s",
            event.method,
            event.url,
            event.attempt,
            event.max_attempts,
            event.reason,
            event.sleep,
            short_key(event.idempotency_key),
        )
        if self.policy.on_retry is not None:
            self.policy.on_retry(event)

    def give_up(self, decision: GiveUp) -> None:
        if decision.reason is not None:
            logger.info(
                "not retrying %s %s after attempt %d: %s, key %s",
                self.method,
                self.url,
                self.attempt,
                decision.reason,
                short_key(self.key),
            )

    def info(self, headers: Mapping[str, str], decision: GiveUp) -> OncelyInfo:
        return OncelyInfo(
            attempts=self.attempt,
            replayed=says_replayed(headers),
            idempotency_key=self.key,
            gave_up=decision.reason,
        )

    def note(self, exc: BaseException, decision: GiveUp) -> None:
        """Say on the exception what the client tried, for whoever reads the traceback."""
        why = f": {decision.reason}" if decision.reason else ""
        exc.add_note(
            f"oncely: {self.method} {self.url} failed after {self.attempt} attempt(s){why}; "
            f"Idempotency-Key {short_key(self.key)}"
        )
