"""Pure ASGI middleware (SPEC §3, §4). It moves bytes; `oncely.core` decides.

app.add_middleware(IdempotencyMiddleware, store=SQLiteStore("oncely.db"))
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Unpack

from oncely.context import CONTEXT_KEY, IdempotencyContext
from oncely.core import problems
from oncely.core.decisions import Claimed, ClaimResult, Outcome, decide
from oncely.core.events import EventKind, IdempotencyEvent, emit, hash_key
from oncely.core.exchange import (
    Guard,
    Reject,
    ResponseCapture,
    admit,
    answer,
    failure_response,
    fingerprint_request,
    new_token,
    replayed_fingerprints,
)
from oncely.core.policy import IdempotencyPolicy, PolicyOptions, RouteOptions
from oncely.core.problems import Problem, RenderedResponse
from oncely.core.records import StoredResponse
from oncely.markers import marker_of
from oncely.stores.base import AsyncStore, StoreError, running_loop

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger("oncely")

# The app-side tenant: an outer auth middleware may set scope["oncely.scope"] = "<tenant>".
SCOPE_KEY = "oncely.scope"
# Server extensions whose responses bypass http.response.body, so cannot be captured.
_UNCAPTURABLE_EXTENSIONS = ("http.response.pathsend", "http.response.zerocopysend")


class IdempotencyMiddleware:
    """Runs each (tenant, Idempotency-Key) once; later requests get the first response.

    `store` is any `oncely.stores` store (or a store URL). Policy fields can be given
    as `policy=IdempotencyPolicy(...)` and/or as keywords, e.g. `mismatch_status=409`.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: AsyncStore | str,
        policy: IdempotencyPolicy | None = None,
        **options: Unpack[PolicyOptions],
    ) -> None:
        if isinstance(store, str):
            from oncely.stores.urls import store_from_url

            store = store_from_url(store)
        self.app = app
        self.store = store
        base = policy or IdempotencyPolicy()
        self.policy = base.replace(**options) if options else base
        self._marked_routes: list[tuple[Any, RouteOptions]] | None = None
        self._routes: list[Any] | None = None
        self._route_templates: dict[tuple[str, str], str | None] = {}
        # Options every request gets when no route is marked and no path pattern is set.
        self._fixed_route: RouteOptions | None = None
        self._keeper: LeaseKeeper | None = None
        # A store whose sync twins never block (memory) is called without a coroutine.
        self._nonblocking: bool = getattr(store, "nonblocking_sync", False)
        self._replayed = replayed_fingerprints(self.policy)

    def _lease_keeper(self) -> LeaseKeeper:
        """The keeper of the loop running this request: one per loop (tests run many)."""
        loop = running_loop()
        keeper = self._keeper
        if keeper is None or keeper.loop is not loop:
            keeper = self._keeper = LeaseKeeper(loop, self.policy.lease)
        return keeper

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        policy = self.policy
        if scope["type"] != "http" or scope["method"] not in policy.methods:
            await self.app(scope, receive, send)
            return
        admission = admit(
            policy,
            scope["method"],
            scope["path"],
            scope["headers"],
            route=self._fixed_route or self._route_options(scope),
            environment=scope,
            app_scope=scope.get(SCOPE_KEY),
        )
        if type(admission) is Guard:
            await self._guard(admission, scope, receive, send)
        elif isinstance(admission, Reject):
            await self._reject(send, admission.problem, scope, admission.key)
        else:
            await self.app(scope, receive, send)

    # route selection -----------------------------------------------------------------

    def _route_options(self, scope: Scope) -> RouteOptions:
        by_path = self.policy.route_options(scope["path"])
        if self._marked_routes is None:
            self._marked_routes = _find_marked_routes(self.app)
            if not self._marked_routes and not self.policy.has_path_patterns:
                self._fixed_route = by_path
        if not self._marked_routes:
            return by_path
        from starlette.routing import Match

        for route, options in self._marked_routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return options.over(by_path)
        return by_path

    # the guarded path ----------------------------------------------------------------

    async def _guard(self, guard: Guard, scope: Scope, receive: Receive, send: Send) -> None:
        policy = self.policy
        message = await receive()
        body: bytes | Disconnected | None
        if message["type"] == "http.request" and not message.get("more_body", False):
            whole: bytes = message.get("body", b"")  # the common case: the body in one message
            body = whole if len(whole) <= policy.max_request_body else None
        else:
            body = await read_rest_of_body(message, receive, policy.max_request_body)
        if body is None:
            await self._reject(send, problems.body_too_large(policy), scope, guard.key)
            return
        if isinstance(body, Disconnected):
            return  # the client left before sending its request: nothing to do
        method, path, query = scope["method"], scope["path"], scope["query_string"]
        replayed = self._replayed
        fingerprint, fingerprinted = fingerprint_request(
            policy, replayed, guard, method, path, query, body
        )
        observed = bool(policy.event_subscribers)
        claim_started = time.perf_counter() if observed else 0.0
        token = new_token()
        store = self.store
        try:
            if self._nonblocking:
                result = store.claim_sync(  # type: ignore[attr-defined]
                    guard.scope, guard.key, fingerprint, token,
                    lease=policy.lease, retention=policy.retention,
                )  # fmt: skip
            else:
                result = await store.claim(
                    guard.scope, guard.key, fingerprint, token,
                    lease=policy.lease, retention=policy.retention,
                )  # fmt: skip
            outcome = decide(result, fingerprint)
            if outcome is Outcome.IN_PROGRESS and policy.wait_for_in_flight > 0:
                token, result, outcome = await self._wait_for_in_flight(guard, fingerprint)
        except StoreError as error:
            logger.error("oncely store %s failed at claim: %s", store.name, error)
            self._emit(EventKind.STORE_ERROR, scope, guard, detail="claim")
            if policy.fail_open:
                await self.app(scope, replaying_receive(body, receive), send)
            else:
                await send_problem(send, problems.store_unavailable(policy), policy, guard.key)
            return
        if observed:
            self._emit(
                EventKind(outcome.value), scope, guard,
                duration=time.perf_counter() - claim_started,
                attempt=result.attempt if isinstance(result, Claimed) else result.record.attempts,
            )  # fmt: skip

        if type(result) is not Claimed:
            if outcome is Outcome.REPLAY and fingerprinted and replayed is not None:
                replayed.keep(
                    guard.key, guard.scope, method, path, query, guard.content_type, body,
                    fingerprint,
                )  # fmt: skip
            await send_rendered(send, answer(policy, guard.key, result, outcome))
            return
        # Run the handler under the claim (inline: one coroutine less per request).
        context = IdempotencyContext(
            guard.key, guard.scope, token, result.attempt, result.took_over, store, policy
        )
        app_scope = _capturable(scope) if scope.get("extensions") else scope
        app_scope[CONTEXT_KEY] = context
        exchange = _Exchange(self, guard, context, app_scope, body, receive, send)
        try:
            await self.app(app_scope, exchange.receive, exchange.send)
        except Exception:
            if exchange.finishing is not None:
                await exchange.finishing  # the response the app finished still goes out
            elif not exchange.settled:
                failure = failure_response(policy)
                await exchange.settle(failure if policy.on_exception == "store" else None)
                if exchange.status is None:
                    await send_stored(send, failure)
            raise
        except BaseException:
            if exchange.finishing is not None:
                exchange.finishing.cancel()  # cancelled: nothing may be sent after we return
            raise
        finally:
            exchange.stop_renewing()
        if exchange.finishing is not None:
            await exchange.finishing
        elif not exchange.settled:
            # The app returned without finishing its response: keep what it sent, if
            # anything; otherwise the server answers 500 and the key is released.
            await exchange.settle(exchange.response_to_store())

    async def _reject(self, send: Send, problem: Problem, scope: Scope, key: str | None) -> None:
        self._emit(EventKind.REJECTED, scope, None, status=problem.status, detail=problem.slug)
        await send_problem(send, problem, self.policy, key)

    def _emit(self, kind: EventKind, scope: Scope, guard: Guard | None, **attributes: Any) -> None:
        subscribers = self.policy.event_subscribers
        if not subscribers:
            return
        event = IdempotencyEvent(
            kind=kind,
            method=scope["method"],
            route=self._route_template(scope),
            store=self.store.name,
            key_hash=hash_key(guard.key) if guard is not None else None,
            **attributes,
        )
        emit(subscribers, event)

    def _route_template(self, scope: Scope) -> str | None:
        """The route template for events: the router's once it ran; before that (the
        claim), the route that will match (Starlette/FastAPI). Never the raw path."""
        route = scope.get("route")
        if route is not None:
            path: str | None = getattr(route, "path", None)
            return path
        cache_key = (scope["method"], scope["path"])
        if cache_key in self._route_templates:
            return self._route_templates[cache_key]
        if self._routes is None:
            self._routes = _find_routes(self.app)
        template = _route_template_for(self._routes, scope) if self._routes else None
        if len(self._route_templates) < 4096:  # bounded: paths with ids are unbounded
            self._route_templates[cache_key] = template
        return template

    async def _claim(self, guard: Guard, fingerprint: str) -> tuple[str, ClaimResult]:
        token = new_token()
        result = await self.store.claim(
            guard.scope,
            guard.key,
            fingerprint,
            token,
            lease=self.policy.lease,
            retention=self.policy.retention,
        )
        return token, result

    async def _wait_for_in_flight(
        self, guard: Guard, fingerprint: str
    ) -> tuple[str, ClaimResult, Outcome]:
        """Wait (bounded) for the holder to finish, then claim again: replay or run."""
        deadline = time.monotonic() + self.policy.wait_for_in_flight
        while True:
            remaining = deadline - time.monotonic()
            await self.store.wait(guard.scope, guard.key, max(remaining, 0.0))
            token, result = await self._claim(guard, fingerprint)
            outcome = decide(result, fingerprint)
            if outcome is not Outcome.IN_PROGRESS or deadline - time.monotonic() <= 0:
                return token, result, outcome

    def _lease_lost(self, exchange: _Exchange) -> None:
        if exchange.context.completed_in_transaction:
            return  # the handler's own transaction completed the record: nothing lost
        logger.warning(
            "oncely: lease lost while the handler ran (key hash %s)", hash_key(exchange.guard.key)
        )
        self._emit(EventKind.LEASE_LOST, exchange.scope, exchange.guard, detail="renewal")


class _Exchange(ResponseCapture):
    """One guarded request whose handler runs: it hands the app the buffered body
    (`receive`), captures the response (a `ResponseCapture` itself), and completes the
    record before the last byte leaves.

    With a store that waits, the last body message is held back: `finishing` completes
    the record and then sends it, while the app's own `send` returns at once. The app's
    stack (everything the framework made for the request) unwinds and is freed during
    the store's round trip instead of staying alive through it, and the app's work after
    its response (background tasks) does not delay the response.
    """

    __slots__ = (
        "context", "finishing", "guard", "holding", "keeper", "middleware", "observed",
        "receive", "scope", "send_on", "settled", "started_at",
    )  # fmt: skip

    def __init__(
        self,
        middleware: IdempotencyMiddleware,
        guard: Guard,
        context: IdempotencyContext,
        scope: Scope,
        request_body: bytes,
        receive: Receive,
        send: Send,
    ) -> None:
        policy = middleware.policy
        ResponseCapture.__init__(self, policy)
        self.middleware, self.guard, self.context, self.scope = middleware, guard, context, scope
        self.receive = replaying_receive(request_body, receive)  # what the app reads
        self.send_on = send
        self.settled = False
        self.finishing: asyncio.Task[None] | None = None
        self.observed = bool(policy.event_subscribers)
        self.started_at = time.perf_counter() if self.observed else 0.0
        self.keeper = middleware._lease_keeper()
        self.keeper.hold(self)
        self.holding = True

    def stop_renewing(self) -> None:
        if self.holding:
            self.holding = False
            self.keeper.drop(self)

    async def send(self, message: Message) -> None:
        if self.finishing is not None:
            await self.finishing  # what follows the last body (trailers) goes after it
        kind = message["type"]
        if kind == "http.response.body":
            chunk = message.get("body", b"")
            if chunk:
                self.body(chunk)
            if not message.get("more_body", False) and not self.settled:
                if not self.middleware._nonblocking:
                    self.settled = True
                    self.finishing = self.keeper.loop.create_task(
                        self._finish(self.response_to_store(), message)
                    )
                    return
                await self.settle(self.response_to_store())
        elif kind == "http.response.start":
            self.start(message["status"], message.get("headers", ()))
        await self.send_on(message)

    async def _finish(self, response: StoredResponse | None, last: Message) -> None:
        await self.settle(response)
        await self.send_on(last)

    async def settle(self, response: StoredResponse | None) -> None:
        """Complete (or release, when `response` is None) before the last byte leaves."""
        self.settled = True
        self.stop_renewing()
        middleware = self.middleware
        guard, store, token = self.guard, middleware.store, self.context.token
        handler_duration = time.perf_counter() - self.started_at if self.observed else 0.0
        try:
            if response is None:
                await store.release(guard.scope, guard.key, token)
                kind = EventKind.RELEASED
            elif (
                store.complete_sync(guard.scope, guard.key, token, response)  # type: ignore[attr-defined]
                if middleware._nonblocking
                else await store.complete(guard.scope, guard.key, token, response)
            ):
                kind = EventKind.STORED
            elif self.context.completed_in_transaction:
                kind = EventKind.STORED  # the handler's own transaction stored it
            else:
                kind = EventKind.LEASE_LOST
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
        if self.observed:
            self.middleware._emit(
                kind, self.scope, guard,
                status=self.status if response is None else response.status,
                duration=time.perf_counter() - self.started_at - handler_duration,
                handler_duration=handler_duration,
                detail="completion" if kind is EventKind.STORE_ERROR else None,
            )  # fmt: skip


class LeaseKeeper:
    """Renews the claims of the handlers running on one event loop (SPEC §3), from one
    periodic timer that runs every third of the lease while any handler runs.

    A handler that entered since the last tick is renewed at the tick after next: every
    claim is renewed between one and two thirds of its lease after it was last set. A
    fast handler (the common case) only enters and leaves a dict: no clock read, no
    timer, no task of its own.
    """

    __slots__ = ("_aged", "_fresh", "_lease", "_period", "_renewing", "_timer", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, lease: float) -> None:
        self.loop = loop
        self._lease = lease
        self._period = lease / 3
        self._fresh: dict[_Exchange, bool] = {}  # entered since the last tick
        self._aged: dict[_Exchange, bool] = {}  # renewed at the next tick
        self._renewing: dict[_Exchange, asyncio.Task[None]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def hold(self, exchange: _Exchange) -> None:
        self._fresh[exchange] = True
        if self._timer is None:
            self._timer = self.loop.call_later(self._period, self._tick)

    def drop(self, exchange: _Exchange) -> None:
        if self._fresh.pop(exchange, False) or self._aged.pop(exchange, False):
            return
        task = self._renewing.pop(exchange, None)
        if task is not None:
            task.cancel()

    def _tick(self) -> None:
        due, self._aged, self._fresh = self._aged, self._fresh, {}
        for exchange in due:
            self._renewing[exchange] = self.loop.create_task(self._renew(exchange))
        busy = self._aged or self._renewing
        self._timer = self.loop.call_later(self._period, self._tick) if busy else None

    async def _renew(self, exchange: _Exchange) -> None:
        guard = exchange.guard
        try:
            renewed = await exchange.middleware.store.renew(
                guard.scope, guard.key, exchange.context.token, lease=self._lease
            )
        except StoreError as error:
            logger.warning("oncely: lease renewal failed, will retry: %s", error)
            renewed = True
        self._renewing.pop(exchange, None)
        if not renewed:
            exchange.middleware._lease_lost(exchange)
        elif exchange.holding:
            self.hold(exchange)


class Disconnected:
    """The client went away while sending the request body."""


DISCONNECTED = Disconnected()


async def read_rest_of_body(
    message: Message, receive: Receive, limit: int
) -> bytes | Disconnected | None:
    """The whole request body from its first message on, or None when over `limit`."""
    if message["type"] == "http.disconnect":
        return DISCONNECTED
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body if len(body) <= limit else None
    chunks = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            return DISCONNECTED
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def replaying_receive(body: bytes, receive: Receive) -> Receive:
    """Hands the buffered body to the app once, then forwards to the real `receive`
    (so a disconnect is reported when it really happens, never invented)."""
    delivered = False

    async def app_receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return app_receive


def _capturable(scope: Scope) -> Scope:
    extensions = scope.get("extensions")
    if not extensions or not any(name in extensions for name in _UNCAPTURABLE_EXTENSIONS):
        return scope
    kept = {k: v for k, v in extensions.items() if k not in _UNCAPTURABLE_EXTENSIONS}
    return {**scope, "extensions": kept}


async def send_stored(send: Send, response: StoredResponse) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": response.status,
            "headers": list(response.headers),
        }
    )
    await send({"type": "http.response.body", "body": response.body})


async def send_rendered(send: Send, response: RenderedResponse) -> None:
    await send(
        {"type": "http.response.start", "status": response.status, "headers": response.headers}
    )
    await send({"type": "http.response.body", "body": response.body})


async def send_problem(
    send: Send, problem: Problem, policy: IdempotencyPolicy, key: str | None = None
) -> None:
    await send_rendered(send, problems.render(problem, policy, key))


def _find_routes(app: Any) -> list[Any]:
    """The Starlette/FastAPI router's routes, found through wrapping middlewares."""
    node = app
    for _ in range(16):  # walk down through wrapping middlewares to the router
        routes = getattr(node, "routes", None)
        if isinstance(routes, list):
            return routes
        node = getattr(node, "router", None) or getattr(node, "app", None)
        if node is None:
            break
    return []


def _find_marked_routes(app: Any) -> list[tuple[Any, RouteOptions]]:
    """Starlette/FastAPI routes whose endpoint carries an oncely marker."""
    return [
        (route, options)
        for route in _find_routes(app)
        if (options := marker_of(getattr(route, "endpoint", None))) is not None
    ]


def _route_template_for(routes: list[Any], scope: Scope, depth: int = 0) -> str | None:
    """The template of the route the router will pick (a full match, else one that only
    the method missed), looking inside mounts and included routers."""
    from starlette.routing import Match, Mount

    partial: str | None = None
    for route in routes:
        match, child_scope = route.matches(scope)
        if match is Match.NONE:
            continue
        path: str | None = getattr(route, "path", None)
        inner = getattr(route, "routes", None) or getattr(
            getattr(route, "original_router", None), "routes", None
        )
        if isinstance(inner, list) and inner and depth < 4:
            found = _route_template_for(inner, {**scope, **child_scope}, depth + 1)
            if found is not None:
                path = (path or "") + found if isinstance(route, Mount) else found
        if match is Match.FULL:
            return path
        if partial is None:
            partial = path
    return partial


__all__ = ["IdempotencyMiddleware"]
