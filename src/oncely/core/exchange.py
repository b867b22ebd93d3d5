"""One request's way through oncely, sans I/O: what the adapters ask before and after
the store. ASGI and WSGI adapters call these and only move bytes around them."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from oncely.core import problems
from oncely.core.decisions import ClaimResult, Existing, Outcome
from oncely.core.fingerprint import (
    NO_FINGERPRINT,
    ReplayedFingerprints,
    RequestFacts,
    default_fingerprint,
    kept_fingerprint,
    request_fingerprint,
)
from oncely.core.keys import HEADER_LOWER, InvalidKey, parse_key
from oncely.core.policy import IdempotencyPolicy, RouteOptions
from oncely.core.problems import Problem, RenderedResponse
from oncely.core.records import StoredResponse
from oncely.core.tenancy import ANONYMOUS_SCOPE, credential_scope, scope_from_value

REPLAYED_HEADER = (b"idempotent-replayed", b"true")


@dataclass(frozen=True, slots=True)
class PassThrough:
    """Not oncely's business: hand the request to the app untouched."""


@dataclass(frozen=True, slots=True)
class Reject:
    """Answer with a problem without running the handler."""

    problem: Problem
    key: str | None = None


class Guard(NamedTuple):
    """Protect this request: read its body, fingerprint it, claim (scope, key)."""

    key: str
    scope: str
    content_type: str | None


PASS_THROUGH = PassThrough()
Admission = PassThrough | Reject | Guard


def admit(
    policy: IdempotencyPolicy,
    method: str,
    path: str,
    headers: Iterable[tuple[bytes, bytes]],
    *,
    route: RouteOptions | None = None,
    environment: Mapping[str, Any] | None = None,
    app_scope: str | None = None,
) -> Admission:
    """SPEC §2: which requests oncely guards, and which keys it refuses.

    `headers` have lower-case names (as ASGI gives them). `app_scope` is a tenant that
    the app's own auth put on the request; `environment` is the ASGI scope or WSGI
    environ, handed to a configured scope resolver.
    """
    if method not in policy.methods:
        return PASS_THROUGH
    if route is None:
        route = policy.route_options(path)
    if not route.enabled:
        return PASS_THROUGH
    # One pass over the headers collects everything the guard needs.
    key_values: list[bytes] = []
    credentials: list[tuple[bytes, bytes]] = []
    content_type: str | None = None
    credential_names = policy.credential_header_names
    for name, value in headers:
        if name == HEADER_LOWER:
            key_values.append(value)
        elif name == b"content-type":
            content_type = value.decode("latin-1")
        elif name in credential_names:
            credentials.append((name, value))
    try:
        key = parse_key(key_values)
    except InvalidKey as error:
        return Reject(problems.invalid_key(error), error.printable_key())
    if key is None:
        if policy.requires_key(method, route):
            return Reject(problems.key_required(policy))
        return PASS_THROUGH
    scope = app_scope
    if scope is None and policy.scope_resolver is not None and environment is not None:
        scope = policy.scope_resolver(environment)
    if scope is not None:
        scope = scope_from_value(scope)
    else:
        scope = credential_scope(credentials) if credentials else ANONYMOUS_SCOPE
    return Guard(key, scope, content_type)


def fingerprint_of(
    policy: IdempotencyPolicy, guard: Guard, method: str, path: str, query: bytes, body: bytes
) -> str:
    function = policy.fingerprint
    if function is None:
        return NO_FINGERPRINT
    if function is default_fingerprint:
        return request_fingerprint(method, path, query, guard.content_type, body)
    return function(RequestFacts(method, path, query, guard.content_type, body))


def replayed_fingerprints(policy: IdempotencyPolicy) -> ReplayedFingerprints | None:
    """Where an adapter keeps the fingerprints of replayed requests: only the default
    fingerprint is known to be a function of the request alone."""
    return ReplayedFingerprints() if policy.fingerprint is default_fingerprint else None


def fingerprint_request(
    policy: IdempotencyPolicy, replayed: ReplayedFingerprints | None, guard: Guard,
    method: str, path: str, query: bytes, body: bytes,
) -> tuple[str, bool]:  # fmt: skip
    """The request's fingerprint, and True when it was computed here (False: it is a
    replayed request's, kept in `replayed`)."""
    if replayed is not None:
        kept = replayed.by_key.get(guard.key)
        if kept is not None:
            found = kept_fingerprint(
                kept, guard.scope, method, path, query, guard.content_type, body
            )
            if found is not None:
                return found, False
    return fingerprint_of(policy, guard, method, path, query, body), True


def _token_prefix() -> str:
    return os.urandom(8).hex()


_token_prefix_hex = _token_prefix()
_token_counter = itertools.count()


def new_token() -> str:
    """A lease token: unguessable, so no other worker can complete our claim.

    A secret random prefix per process and a counter: unique within the process
    (`next` on a count is atomic, so threads never share one) and, through the prefix,
    across processes; no system call per request. A forked child draws a new prefix.
    """
    return _token_prefix_hex + hex(next(_token_counter))


def _new_token_prefix() -> None:
    global _token_prefix_hex
    _token_prefix_hex = _token_prefix()


os.register_at_fork(after_in_child=_new_token_prefix)


def replay_headers(response: StoredResponse) -> list[tuple[bytes, bytes]]:
    return [*response.headers, REPLAYED_HEADER]


def answer(
    policy: IdempotencyPolicy, key: str, result: ClaimResult, outcome: Outcome
) -> RenderedResponse:
    """What to send for an outcome that does not run the handler: a replay or a problem."""
    stored = result.record.response if isinstance(result, Existing) else None
    if outcome is Outcome.REPLAY and stored is not None:
        return RenderedResponse(stored.status, replay_headers(stored), stored.body)
    if outcome is Outcome.IN_PROGRESS:
        problem = problems.in_progress(policy, policy.in_flight_retry_after)
    elif outcome is Outcome.NOT_REPLAYABLE and stored is not None:
        problem = problems.not_replayable(policy, stored.status)
    else:
        problem = problems.mismatch(policy)
    return problems.render(problem, policy, key)


class ResponseCapture:
    """Collects what the handler sends, within the size limit, for the record."""

    __slots__ = ("_chunks", "_size", "headers", "overflowed", "policy", "status")

    def __init__(self, policy: IdempotencyPolicy) -> None:
        self.policy = policy
        self.status: int | None = None
        self.headers: tuple[tuple[bytes, bytes], ...] = ()
        self._chunks: list[bytes] = []
        self._size = 0
        self.overflowed = False

    def start(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        self.status = status
        kept = tuple(headers)
        known = self.policy._header_cache  # name -> kept, as keeps_header decided it
        for header in kept:
            # Rare: a denied header (Set-Cookie, hop-by-hop), a name not seen yet, or a
            # pair given as a list.
            if type(header) is not tuple or known.get(header[0]) is not True:
                keeps = self.policy.keeps_header
                kept = tuple([(name, value) for name, value in kept if keeps(name)])
                break
        self.headers = kept

    def body(self, chunk: bytes) -> None:
        if self.overflowed or not chunk:
            return
        self._size += len(chunk)
        if self._size > self.policy.max_stored_body:
            self.overflowed = True
            self._chunks.clear()
        else:
            self._chunks.append(chunk)

    def abandon(self) -> None:
        """Keep no body: the record will say "completed, too large to replay"."""
        self.overflowed = True
        self._chunks.clear()

    @property
    def started(self) -> bool:
        return self.status is not None

    def should_store(self) -> bool:
        return self.status is not None and self.policy.store_status(self.status)

    def response_to_store(self) -> StoredResponse | None:
        """The record's response, or None when this status is not stored (release)."""
        status = self.status
        if status is None or not self.should_store():
            return None
        if self.overflowed:
            return StoredResponse(status, self.headers, b"", replayable=False)
        chunks = self._chunks
        return StoredResponse(
            status, self.headers, chunks[0] if len(chunks) == 1 else b"".join(chunks)
        )


def failure_response(policy: IdempotencyPolicy) -> StoredResponse:
    """What an exception in the handler stores (and sends, if nothing was sent yet)."""
    rendered = problems.render(problems.handler_failed(), policy)
    return StoredResponse(rendered.status, tuple(rendered.headers), rendered.body)
