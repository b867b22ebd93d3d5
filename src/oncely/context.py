"""The handler's view of its idempotency claim, and transactional completion (SPEC §3).

A handler that writes to the same SQLite file or PostgreSQL database as the store can
complete the record inside its own transaction. A crash at any instant then leaves
either nothing (the retry runs again) or the data and the response together (the
retry replays): effects happen exactly once.

    ctx = idempotency_context(request)            # None when the request is not guarded
    response = JSONResponse(transfer, status_code=201)
    with connection:                              # the handler's own transaction
        ...debit, credit...
        ctx.complete_in_transaction_sync(connection, response)
    return response                               # exactly what was stored

WSGI apps find the context in the environ (`idempotency_context(environ)`; Flask:
`request.environ`; Django: `request.META`, or `request.oncely`). Frameworks whose
responses have no `raw_headers`/`body` (Django, Flask) complete with a `StoredResponse`
of their status, headers and body; the integrations' `complete_in_transaction` helpers
build it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from oncely.core.policy import IdempotencyPolicy
from oncely.core.records import StoredResponse

CONTEXT_KEY = "oncely.context"
# Where requests keep their scope or environ: Starlette (scope), Werkzeug (environ),
# Django (META; an ASGIRequest also has the ASGI scope).
_CONTEXT_HOLDERS = ("scope", "environ", "META")


class RenderedResponse(Protocol):
    """What a framework response offers (Starlette/FastAPI `Response` fits)."""

    status_code: int

    @property
    def raw_headers(self) -> Iterable[tuple[bytes, bytes]]: ...

    @property
    def body(self) -> bytes | memoryview[int]: ...


class TransactionalCompletionUnsupported(TypeError):
    """The store cannot share a transaction with the handler (memory, Redis), or the
    handler's connection is not to the store's database."""


class LeaseLost(Exception):
    """Raise it (inside the transaction, so it rolls back) when `complete_in_transaction`
    returned False: another worker took the request over. The Django and Flask
    integrations answer it with oncely's `409 request-in-progress` problem, never stored.
    """


@dataclass(slots=True)
class IdempotencyContext:
    """Put on the ASGI scope (`scope["oncely.context"]`) or the WSGI environ
    (`environ["oncely.context"]`) of every guarded request that runs its handler.

    `stored` is the response the handler's transaction wrote (None until it did);
    `lease_lost` is set when the completion was refused, or `LeaseLost` was raised: the
    record is another worker's, and the middleware stores nothing.
    """

    key: str
    scope: str
    token: str = field(repr=False)  # the fence: kept out of error reports (Django's META)
    attempt: int
    took_over: bool
    store: Any = field(repr=False)
    policy: IdempotencyPolicy = field(repr=False)
    completed_in_transaction: bool = False
    stored: StoredResponse | None = field(default=None, repr=False)
    lease_lost: bool = False

    def stored_response(self, response: RenderedResponse | StoredResponse) -> StoredResponse:
        """The record of `response` as the middleware would store it: the same header
        rules, the same body limit. `response` is a Starlette-like response, or a
        `StoredResponse` of the status, headers (as sent) and body."""
        keeps = self.policy.keeps_header
        raw_headers: Iterable[tuple[bytes, bytes]]
        if isinstance(response, StoredResponse):
            status, raw_headers, body = response.status, response.headers, response.body
            replayable = response.replayable
        else:
            status, raw_headers = response.status_code, response.raw_headers
            body, replayable = bytes(response.body), True
        headers = tuple((name, value) for name, value in raw_headers if keeps(name))
        if not replayable or len(body) > self.policy.max_stored_body:
            return StoredResponse(status, headers, b"", replayable=False)
        return StoredResponse(status, headers, body)

    def complete_in_transaction_sync(
        self, connection: Any, response: RenderedResponse | StoredResponse
    ) -> bool:
        """Complete the record on `connection` (sqlite3 or psycopg, same database as the
        store) inside its open transaction. Returns False when the lease was lost: then
        roll back, another worker has taken the request over."""
        complete = getattr(self.store, "complete_in_transaction_sync", None)
        if complete is None:
            raise TransactionalCompletionUnsupported(_unsupported(self.store))
        stored = self.stored_response(response)
        return self._completed(
            stored, bool(complete(connection, self.scope, self.key, self.token, stored))
        )

    async def complete_in_transaction(
        self, connection: Any, response: RenderedResponse | StoredResponse
    ) -> bool:
        """The async twin, for a psycopg `AsyncConnection` (PostgreSQL stores)."""
        complete = getattr(self.store, "complete_in_transaction", None)
        if complete is None:
            raise TransactionalCompletionUnsupported(_unsupported(self.store))
        stored = self.stored_response(response)
        done = bool(await complete(connection, self.scope, self.key, self.token, stored))
        return self._completed(stored, done)

    def _completed(self, stored: StoredResponse, done: bool) -> bool:
        if done:
            self.completed_in_transaction = True
            self.stored = stored
        elif not self.completed_in_transaction:
            self.lease_lost = True  # (a second call in the same transaction is no loss)
        return done


def idempotency_context(request_or_scope: Any) -> IdempotencyContext | None:
    """The context of a guarded request; None when oncely did not guard it (no key,
    method not honoured).

    Accepts a Starlette/FastAPI `Request` or an ASGI scope, a WSGI environ, a Flask or
    Werkzeug request (its `environ`), or a Django request (its `META`; or its ASGI
    `scope` when oncely's ASGI middleware wraps the Django ASGI application).
    """
    for attribute in _CONTEXT_HOLDERS:
        holder = getattr(request_or_scope, attribute, None)
        if isinstance(holder, Mapping):
            context = holder.get(CONTEXT_KEY)
            if isinstance(context, IdempotencyContext):
                return context
    if isinstance(request_or_scope, Mapping):
        context = request_or_scope.get(CONTEXT_KEY)
        if isinstance(context, IdempotencyContext):
            return context
    return None


def _unsupported(store: Any) -> str:
    return (
        f"the {getattr(store, 'name', type(store).__name__)} store cannot complete inside "
        "your transaction; use SQLiteStore (same file) or PostgresStore (same database)"
    )
