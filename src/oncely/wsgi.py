"""WSGI middleware (SPEC §3, §4): the synchronous twin of `oncely.asgi`.

app.wsgi_app = IdempotencyMiddleware(app.wsgi_app, store="sqlite:///oncely.db")

A native sync path: the store's `*_sync` operations, no event loop anywhere. The same
`oncely.core` functions decide; this module only moves bytes between WSGI and them.
The sync helpers here (`check_in`, `Settlement`, `CapturedStream`, the lease keeper) are
shared with the Django middleware in `oncely.integrations.django`.

Every guarded request that runs its handler finds its `IdempotencyContext` at
`environ["oncely.context"]` (`oncely.idempotency_context(environ)`), for transactional
completion (SPEC §3): a record the handler's own transaction completed is not written
again, and its refused lease renewal is no lost lease.
"""

from __future__ import annotations

import heapq
import io
import itertools
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Unpack

from oncely.context import CONTEXT_KEY, IdempotencyContext
from oncely.core import problems
from oncely.core.decisions import Claimed, ClaimResult, Outcome, decide
from oncely.core.events import EventKind, IdempotencyEvent, emit, hash_key
from oncely.core.exchange import (
    Guard,
    PassThrough,
    Reject,
    ResponseCapture,
    admit,
    answer,
    failure_response,
    fingerprint_request,
    new_token,
    replayed_fingerprints,
)
from oncely.core.fingerprint import ReplayedFingerprints
from oncely.core.policy import IdempotencyPolicy, PolicyOptions, RouteOptions
from oncely.core.problems import RenderedResponse
from oncely.core.records import StoredResponse
from oncely.stores.base import StoreError, SyncStore

if TYPE_CHECKING:
    from types import TracebackType
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    ExcInfo = tuple[type[BaseException], BaseException, TracebackType]
    OptExcInfo = ExcInfo | tuple[None, None, None]

logger = logging.getLogger("oncely")

# The app-side tenant: an outer auth middleware may set environ["oncely.scope"] = "<tenant>".
SCOPE_KEY = "oncely.scope"
_READ_SIZE = 64 * 1024

RouteResolver = Callable[[Mapping[str, Any]], RouteOptions | None]


class IdempotencyMiddleware:
    """Runs each (tenant, Idempotency-Key) once; later requests get the first response.

    `store` is any `oncely.stores` store (or a store URL). Policy fields can be given
    as `policy=IdempotencyPolicy(...)` and/or as keywords, e.g. `mismatch_status=409`.
    `routes` maps an environ to a framework marker (the Flask extension passes one).
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        store: SyncStore | str,
        policy: IdempotencyPolicy | None = None,
        routes: RouteResolver | None = None,
        **options: Unpack[PolicyOptions],
    ) -> None:
        if isinstance(store, str):
            from oncely.stores.urls import store_from_url

            store = store_from_url(store)
        self.app = app
        self.store: SyncStore = store
        base = policy or IdempotencyPolicy()
        self.policy = base.replace(**options) if options else base
        self.routes = routes
        self.replayed = replayed_fingerprints(self.policy)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method: str = environ.get("REQUEST_METHOD", "GET")
        policy = self.policy
        if method not in policy.methods:
            return self.app(environ, start_response)
        path = request_path(environ)
        admission = admit(
            policy,
            method,
            path,
            environ_headers(environ),
            route=self._route_options(environ, path),
            environment=environ,
            app_scope=environ.get(SCOPE_KEY),
        )
        if isinstance(admission, PassThrough):
            return self.app(environ, start_response)
        if isinstance(admission, Reject):
            reject_event(policy, self.store, method, admission.problem.status)
            rendered = problems.render(admission.problem, policy, admission.key)
            return send_rendered(start_response, rendered)
        return self._guard(admission, method, path, environ, start_response)

    def _route_options(self, environ: WSGIEnvironment, path: str) -> RouteOptions:
        by_path = self.policy.route_options(path)
        if self.routes is None:
            return by_path
        marker = self.routes(environ)
        return by_path if marker is None else marker.over(by_path)

    def _guard(
        self,
        guard: Guard,
        method: str,
        path: str,
        environ: WSGIEnvironment,
        start_response: StartResponse,
    ) -> Iterable[bytes]:
        policy = self.policy
        body = read_input(environ, policy.max_request_body)
        if body is None:
            reject_event(policy, self.store, method, 413)
            rendered = problems.render(problems.body_too_large(policy), policy, guard.key)
            return send_rendered(start_response, rendered)
        replace_input(environ, body)
        query = environ.get("QUERY_STRING", "").encode("latin-1", "replace")
        checked = check_in(self.store, policy, self.replayed, guard, method, path, query, body)
        if checked is None:  # the store failed and the policy says fail open
            return self.app(environ, start_response)
        if isinstance(checked, RenderedResponse):
            return send_rendered(start_response, checked)
        return self._execute(guard, checked, method, environ, start_response)

    def _execute(
        self,
        guard: Guard,
        claimed: Claimed,
        method: str,
        environ: WSGIEnvironment,
        start_response: StartResponse,
    ) -> Iterable[bytes]:
        context = new_context(self.store, self.policy, guard, claimed)
        environ[CONTEXT_KEY] = context
        settlement = Settlement(self.store, self.policy, guard, context, method)
        stream = WSGIStream(settlement, start_response)
        try:
            stream.source = self.app(environ, stream.start_response)
        except Exception:
            failure = settlement.fail()
            logger.error("oncely: the handler raised; answered with a 500 problem", exc_info=True)
            return send_stored(start_response, failure)
        return stream


# the store's part, shared by the sync adapters -----------------------------------------


def check_in(
    store: SyncStore,
    policy: IdempotencyPolicy,
    replayed: ReplayedFingerprints | None,
    guard: Guard,
    method: str,
    path: str,
    query: bytes,
    body: bytes,
) -> Claimed | RenderedResponse | None:
    """Fingerprint the request, claim (scope, key) and decide, before the handler (SPEC
    §3, §4).

    Returns the claim (lease token, attempt, took over?) when the handler must run; the
    answer to send instead (a replay or a problem, including 503 when the store fails);
    or None when the store failed and `fail_open` says run the handler unguarded. A
    replayed request's fingerprint is kept in `replayed`, so that the same request sent
    again is not fingerprinted again.
    """
    fingerprint, fingerprinted = fingerprint_request(
        policy, replayed, guard, method, path, query, body
    )
    started = time.perf_counter()
    try:
        _, result, outcome = claim_and_decide(store, policy, guard, fingerprint)
    except StoreError as error:
        logger.error("oncely store %s failed at claim: %s", store.name, error)
        request_event(policy, store, method, guard, EventKind.STORE_ERROR, detail="claim")
        if policy.fail_open:
            return None
        return problems.render(problems.store_unavailable(policy), policy, guard.key)
    if policy.event_subscribers:
        request_event(
            policy, store, method, guard, EventKind(outcome.value),
            duration=time.perf_counter() - started,
            attempt=result.attempt if isinstance(result, Claimed) else result.record.attempts,
        )  # fmt: skip
    if isinstance(result, Claimed):  # EXECUTE or TAKE_OVER: the handler runs
        return result
    if outcome is Outcome.REPLAY and fingerprinted and replayed is not None:
        replayed.keep(
            guard.key, guard.scope, method, path, query, guard.content_type, body, fingerprint
        )
    return answer(policy, guard.key, result, outcome)


def new_context(
    store: SyncStore, policy: IdempotencyPolicy, guard: Guard, claimed: Claimed
) -> IdempotencyContext:
    """The handler's view of its claim (for transactional completion)."""
    return IdempotencyContext(
        guard.key, guard.scope, claimed.token, claimed.attempt, claimed.took_over, store, policy
    )


def claim_and_decide(
    store: SyncStore, policy: IdempotencyPolicy, guard: Guard, fingerprint: str
) -> tuple[str, ClaimResult, Outcome]:
    """One atomic claim, then the decision table; waits (bounded) for an in-flight
    duplicate when `wait_for_in_flight` is set, as the ASGI adapter does."""
    token, result = _claim(store, policy, guard, fingerprint)
    outcome = decide(result, fingerprint)
    if outcome is not Outcome.IN_PROGRESS or policy.wait_for_in_flight <= 0:
        return token, result, outcome
    deadline = time.monotonic() + policy.wait_for_in_flight
    while True:
        remaining = deadline - time.monotonic()
        store.wait_sync(guard.scope, guard.key, max(remaining, 0.0))
        token, result = _claim(store, policy, guard, fingerprint)
        outcome = decide(result, fingerprint)
        if outcome is not Outcome.IN_PROGRESS or deadline - time.monotonic() <= 0:
            return token, result, outcome


def _claim(
    store: SyncStore, policy: IdempotencyPolicy, guard: Guard, fingerprint: str
) -> tuple[str, ClaimResult]:
    token = new_token()
    result = store.claim_sync(
        guard.scope, guard.key, fingerprint, token, lease=policy.lease, retention=policy.retention
    )
    return token, result


def request_event(
    policy: IdempotencyPolicy,
    store: SyncStore,
    method: str,
    guard: Guard,
    kind: EventKind,
    **attributes: Any,
) -> None:
    """Tell the policy's subscribers (if any) what happened to a guarded request."""
    if policy.event_subscribers:
        event = IdempotencyEvent(
            kind=kind, method=method, store=store.name, key_hash=hash_key(guard.key), **attributes
        )
        emit(policy.event_subscribers, event)


def reject_event(policy: IdempotencyPolicy, store: SyncStore, method: str, status: int) -> None:
    if policy.event_subscribers:
        event = IdempotencyEvent(EventKind.REJECTED, method=method, store=store.name, status=status)
        emit(policy.event_subscribers, event)


# completion ---------------------------------------------------------------------------


class Settlement:
    """One claim on its way to completion: captures the response, keeps the lease
    alive while the handler works, and completes or releases exactly once.

    The handler may have completed the record in its own transaction (its `context`
    says so): the fenced completion then finds nothing to do, and that is no lost lease.
    """

    __slots__ = (
        "__weakref__", "_lease", "capture", "context", "guard", "method", "policy", "settled",
        "started", "store", "token",
    )  # fmt: skip

    def __init__(
        self,
        store: SyncStore,
        policy: IdempotencyPolicy,
        guard: Guard,
        context: IdempotencyContext,
        method: str,
    ) -> None:
        self.store, self.policy, self.guard = store, policy, guard
        self.context, self.token = context, context.token
        self.method = method
        self.capture = ResponseCapture(policy)
        self.settled = False
        self.started = time.perf_counter()
        self._lease = lease_keeper().hold(
            store, guard.scope, guard.key, self.token, policy.lease, self
        )

    def settle(self, response: StoredResponse | None) -> None:
        """Complete with `response` (release when None), fenced by the lease token."""
        if self.settled:
            return
        self.settled = True
        self._lease.drop()
        store, guard, context = self.store, self.guard, self.context
        handler_duration = time.perf_counter() - self.started
        try:
            if context.lease_lost:
                # The handler's completion was refused (or it raised LeaseLost): the
                # record is another worker's. Store nothing; the release is fenced.
                released = store.release_sync(guard.scope, guard.key, self.token)
                kind = EventKind.RELEASED if released else EventKind.LEASE_LOST
                response = None
            elif response is None:
                store.release_sync(guard.scope, guard.key, self.token)
                kind = EventKind.RELEASED
            elif store.complete_sync(guard.scope, guard.key, self.token, response):
                kind = EventKind.STORED
            elif context.completed_in_transaction:
                kind = EventKind.STORED  # the handler's own transaction stored it
                self._check_sent_what_was_stored(response)
            else:
                kind = EventKind.LEASE_LOST
            if kind is EventKind.LEASE_LOST:
                logger.warning(
                    "oncely: lease lost before completion; the record was taken over "
                    "(key hash %s)", hash_key(guard.key),
                )  # fmt: skip
        except StoreError as error:
            kind = EventKind.STORE_ERROR
            logger.error(
                "oncely store %s failed at completion; the claim lapses with its lease: %s",
                store.name, error,
            )  # fmt: skip
        if self.policy.event_subscribers:
            request_event(
                self.policy, store, self.method, guard, kind,
                status=self.capture.status if response is None else response.status,
                duration=time.perf_counter() - self.started - handler_duration,
                handler_duration=handler_duration,
                detail="completion" if kind is EventKind.STORE_ERROR else None,
            )  # fmt: skip

    def _check_sent_what_was_stored(self, sent: StoredResponse) -> None:
        """One comparison: something between the handler and oncely (a middleware below
        it, an after-request hook) changed the response after the record was stored."""
        stored = self.context.stored
        if stored is not None and stored != sent:
            logger.warning(
                "oncely: the response sent differs from the one the handler's transaction "
                "stored (key hash %s; status %s vs %s): a replay will send the stored one. "
                "Make oncely's middleware the innermost, next to the handler",
                hash_key(self.guard.key), sent.status, stored.status,
            )  # fmt: skip

    def lease_lost(self) -> None:
        """The keeper's renewal was refused: another worker took the request over, unless
        the handler's own transaction completed the record (then nothing was lost)."""
        if self.context.completed_in_transaction:
            return
        logger.warning(
            "oncely: lease lost while the handler ran (key hash %s)", hash_key(self.guard.key)
        )
        request_event(
            self.policy, self.store, self.method, self.guard, EventKind.LEASE_LOST,
            detail="renewal",
        )  # fmt: skip

    def settle_captured(self) -> None:
        self.settle(self.capture.response_to_store())

    def give_up(self) -> None:
        """The response can not be captured whole: keep its status, never run again."""
        capture = self.capture
        if capture.should_store():
            capture.abandon()
        self.settle_captured()

    def fail(self) -> StoredResponse:
        """The handler raised: store its 500 problem (or release, per policy)."""
        failure = failure_response(self.policy)
        self.settle(failure if self.policy.on_exception == "store" else None)
        return failure


class CapturedStream:
    """The handler's body on its way out (SPEC §3).

    Every chunk is captured for the record. A WSGI iterable only tells that a chunk was
    the last when it is exhausted, so one chunk is held back: chunk N is passed on once
    chunk N+1 arrived; when the iterable ends the record is completed, then the held
    chunk is passed on. A client that has read the whole response and retries at once
    therefore gets the replay.

    `close()` always closes the source. When it comes before the end (the client went
    away), the rest of the body is still read, within `max_stored_body` bytes and one
    lease length, so the record is completed rather than left in flight.
    """

    def __init__(self, settlement: Settlement, source: Iterable[bytes] = ()) -> None:
        self.settlement = settlement
        self.source = source
        self.sent_anything = False
        self._iterator: Iterator[bytes] | None = None
        self._generator: Generator[bytes, None, None] | None = None
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        if self._generator is None:
            self._generator = self._run()
        return self._generator

    # hooks for the adapters ---------------------------------------------------------

    def _chunks(self) -> Iterator[bytes]:
        """The source's chunks; a fresh call continues where the last one stopped."""
        if self._iterator is None:
            self._iterator = iter(self.source)
        return self._iterator

    def _before_send(self) -> None:
        """Called before the first chunk (or the end of an empty body) goes out."""

    def _replace_with(self, failure: StoredResponse) -> bool:
        """The handler raised mid-body: True to send `failure` instead, False to re-raise."""
        return False

    # the stream ---------------------------------------------------------------------

    def _run(self) -> Generator[bytes, None, None]:
        settlement = self.settlement
        capture = settlement.capture
        held: bytes | None = None
        try:
            for chunk in self._chunks():
                if not chunk:
                    continue
                capture.body(chunk)
                if held is not None:
                    if not self.sent_anything:
                        self._before_send()
                        self.sent_anything = True
                    yield held
                held = chunk
        except Exception:
            failure = settlement.fail()
            if not self._replace_with(failure):
                raise
            logger.error("oncely: the handler raised; answered with a 500 problem", exc_info=True)
            yield failure.body
            return
        settlement.settle_captured()
        if not self.sent_anything:
            self._before_send()
            self.sent_anything = True
        if held is not None:
            yield held

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._generator is not None:
                self._generator.close()
            if not self.settlement.settled:
                self._drain()
        finally:
            close = getattr(self.source, "close", None)
            if close is not None:
                close()

    def _drain(self) -> None:
        settlement = self.settlement
        capture = settlement.capture
        if capture.started and not capture.should_store():
            settlement.settle(None)  # e.g. a 429: nothing to keep, release at once
            return
        deadline = time.monotonic() + settlement.policy.lease
        try:
            for chunk in self._chunks():
                capture.body(chunk)
                if capture.overflowed or time.monotonic() > deadline:
                    settlement.give_up()
                    return
        except Exception:
            settlement.fail()
            logger.error("oncely: the handler raised after its client left", exc_info=True)
            return
        settlement.settle_captured()


class WSGIStream(CapturedStream):
    """A CapturedStream that is also the app's `start_response` and `write`.

    The status and headers are passed to the server just before the first body chunk,
    so an exception before that can still be answered with the stored 500 problem.
    """

    def __init__(self, settlement: Settlement, start_response: StartResponse) -> None:
        super().__init__(settlement)
        self._server_start_response = start_response
        self._status: str | None = None
        self._headers: list[tuple[str, str]] = []
        self._written: list[bytes] = []
        self._forwarded = False

    def start_response(
        self,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: OptExcInfo | None = None,
        /,
    ) -> Callable[[bytes], object]:
        if exc_info is not None and exc_info[1] is not None:
            try:
                if self._forwarded:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self._status is not None:
            raise AssertionError("start_response was already called (PEP 3333)")
        self.settlement.capture.start(parse_status(status), encode_headers(headers))
        self._status, self._headers = status, list(headers)
        return self._write

    def _write(self, data: bytes) -> None:
        # The legacy write() callable: its bytes go out through the iterable, in order,
        # so they are captured and the last one is held back like any other.
        self._written.append(data)

    def _chunks(self) -> Iterator[bytes]:
        written = self._written
        while written:
            yield written.pop(0)
        for chunk in super()._chunks():
            while written:
                yield written.pop(0)
            yield chunk
        while written:
            yield written.pop(0)

    def _before_send(self) -> None:
        if self._status is None:
            raise RuntimeError("the WSGI application did not call start_response")
        self._forwarded = True
        self._server_start_response(self._status, self._headers)

    def _replace_with(self, failure: StoredResponse) -> bool:
        if self._forwarded:
            return False
        self._forwarded = True
        self._server_start_response(status_line(failure.status), decode_headers(failure.headers))
        return True


# lease renewal without an event loop ----------------------------------------------------


class _Lease:
    """One in-flight claim whose lease the keeper renews; `drop()` when settled."""

    __slots__ = ("active", "key", "lease", "owner", "scope", "store", "token")

    def __init__(
        self, store: SyncStore, scope: str, key: str, token: str, lease: float, owner: object
    ) -> None:
        self.store, self.scope, self.key, self.token, self.lease = store, scope, key, token, lease
        # A weak reference: a request abandoned without close() stops being renewed.
        self.owner = weakref.ref(owner)
        self.active = True

    def drop(self) -> None:
        self.active = False

    @property
    def alive(self) -> bool:
        return self.active and self.owner() is not None


class LeaseKeeper:
    """Renews the leases of in-flight requests every third of the lease (SPEC §3).

    One daemon thread per process, over a heap of due times. Registering costs a heap
    push and wakes nobody: the keeper is only woken for an entry due before the time it
    already sleeps until. A handler that finishes within a third of its lease is never
    renewed; its settled entry is swept in a batch (at most one wake per
    `SWEEP_SECONDS`) or compacted away when entries pile up.
    """

    SWEEP_SECONDS = 1.0
    COMPACT_EVERY = 1024

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._condition = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, _Lease]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        # When the keeper will next look at the heap: +inf before it starts, -inf while
        # it is busy (it looks again before sleeping).
        self._wake_at = math.inf
        self.renewals = 0  # for tests and metrics
        self.wakes = 0

    def hold(
        self, store: SyncStore, scope: str, key: str, token: str, lease: float, owner: object
    ) -> _Lease:
        entry = _Lease(store, scope, key, token, lease, owner)
        due = time.monotonic() + lease / 3
        with self._condition:
            heap = self._heap
            if len(heap) >= self.COMPACT_EVERY and len(heap) % self.COMPACT_EVERY == 0:
                self._compact_locked()
            heapq.heappush(self._heap, (due, next(self._order), entry))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="oncely-lease-keeper", daemon=True
                )
                self._thread.start()
            elif due < self._wake_at:
                self._condition.notify()
        return entry

    @property
    def waiting(self) -> int:
        """Heap entries, settled ones not yet swept included (for tests and metrics)."""
        return len(self._heap)

    def _compact_locked(self) -> None:
        live = [item for item in self._heap if item[2].alive]
        if len(live) < len(self._heap):
            heapq.heapify(live)
            self._heap = live

    def _run(self) -> None:
        while True:
            entry = self._next_due()
            try:
                self._renew(entry)
            except Exception:  # never let the keeper die: other leases depend on it
                logger.exception("oncely: lease renewal crashed")

    def _next_due(self) -> _Lease:
        """The next live lease that is due; sleeps until there is one."""
        condition = self._condition
        with condition:
            while True:
                heap = self._heap
                now = time.monotonic()
                if not heap:
                    wake = now + 60.0
                else:
                    due, _, entry = heap[0]
                    if entry.alive:
                        if due <= now:
                            heapq.heappop(heap)
                            self._wake_at = -math.inf
                            return entry
                        wake = due
                    elif due <= now + self.SWEEP_SECONDS:
                        heapq.heappop(heap)  # settled: swept with its neighbours
                        continue
                    else:
                        wake = due - self.SWEEP_SECONDS
                self._wake_at = wake
                condition.wait(wake - now)
                self._wake_at = -math.inf
                self.wakes += 1

    def _renew(self, entry: _Lease) -> None:
        try:
            renewed = entry.store.renew_sync(entry.scope, entry.key, entry.token, lease=entry.lease)
        except StoreError as error:
            logger.warning("oncely: lease renewal failed, will retry: %s", error)
            renewed = True
        self.renewals += 1
        if not entry.alive:
            return  # settled meanwhile: a refused renewal means nothing
        if not renewed:
            entry.drop()
            owner = entry.owner()
            if isinstance(owner, Settlement):
                owner.lease_lost()  # it reports, or knows that nothing was lost
            else:
                logger.warning(
                    "oncely: lease lost while the handler ran (key hash %s)", hash_key(entry.key)
                )
            return
        with self._condition:
            heapq.heappush(
                self._heap, (time.monotonic() + entry.lease / 3, next(self._order), entry)
            )


_keeper: LeaseKeeper | None = None
_keeper_lock = threading.Lock()


def lease_keeper() -> LeaseKeeper:
    """This process's keeper. After a fork (gunicorn --preload) the child gets its own:
    the parent's thread does not exist there."""
    global _keeper
    keeper = _keeper
    if keeper is not None and keeper.pid == os.getpid():
        return keeper
    with _keeper_lock:
        if _keeper is None or _keeper.pid != os.getpid():
            _keeper = LeaseKeeper()
        return _keeper


def _after_fork_in_child() -> None:
    global _keeper_lock, _keeper
    _keeper_lock = threading.Lock()  # the parent's may have been held by another thread
    _keeper = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# WSGI <-> core translation ------------------------------------------------------------


def environ_headers(environ: Mapping[str, Any]) -> list[tuple[bytes, bytes]]:
    """Request headers as the core wants them: lower-case byte names (as ASGI gives).

    Servers fold repeated header lines into one comma-joined value (RFC 9110 §5.3).
    """
    headers: list[tuple[bytes, bytes]] = []
    for name, value in environ.items():
        if name.startswith("HTTP_"):
            header = name[5:].replace("_", "-").lower()
        elif name in {"CONTENT_TYPE", "CONTENT_LENGTH"}:
            if not value:
                continue
            header = name.replace("_", "-").lower()
        else:
            continue
        if isinstance(value, str):
            headers.append((header.encode("latin-1"), value.encode("latin-1", "replace")))
    return headers


def request_path(environ: Mapping[str, Any]) -> str:
    """SCRIPT_NAME + PATH_INFO as text (WSGI gives them as latin-1-decoded bytes)."""
    raw: str = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    if raw.isascii():
        return raw
    return raw.encode("latin-1", "replace").decode("utf-8", "surrogateescape")


def read_input(environ: WSGIEnvironment, limit: int) -> bytes | None:
    """The whole request body, or None when it exceeds `limit` bytes.

    Honours CONTENT_LENGTH; without one, a server that marks its input as terminated
    (`wsgi.input_terminated`, e.g. gunicorn for chunked requests) is read to the end.
    """
    stream = environ.get("wsgi.input")
    if stream is None:
        return b""
    declared = environ.get("CONTENT_LENGTH") or ""
    try:
        length: int | None = max(int(declared), 0) if declared else None
    except ValueError:
        length = None
    if length is not None:
        if length > limit:
            return None
        return _read_exactly(stream, length)
    if not environ.get("wsgi.input_terminated"):
        return b""  # PEP 3333: without a length the app must not read past the body
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = stream.read(_READ_SIZE)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)


def _read_exactly(stream: Any, length: int) -> bytes:
    chunks: list[bytes] = []
    remaining = length
    while remaining > 0:
        chunk: bytes = stream.read(min(remaining, _READ_SIZE))
        if not chunk:
            raise IncompleteBody(f"the client sent {length - remaining} of {length} bytes")
        chunks.append(chunk)
        remaining -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class IncompleteBody(OSError):
    """The client closed before sending the body it announced: nothing was claimed."""


def replace_input(environ: WSGIEnvironment, body: bytes) -> None:
    """Give the app a fresh stream over the buffered body, so it can read it again."""
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    environ["wsgi.input_terminated"] = True


def parse_status(status: str) -> int:
    return int(status[:3])


def status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


def encode_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]


def decode_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]


def send_rendered(start_response: StartResponse, response: RenderedResponse) -> list[bytes]:
    start_response(status_line(response.status), decode_headers(response.headers))
    return [response.body]


def send_stored(start_response: StartResponse, response: StoredResponse) -> list[bytes]:
    start_response(status_line(response.status), decode_headers(response.headers))
    return [response.body]


__all__ = ["IdempotencyMiddleware", "LeaseKeeper", "lease_keeper"]
