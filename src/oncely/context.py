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
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from oncely.core.policy import IdempotencyPolicy
from oncely.core.records import StoredResponse

CONTEXT_KEY = "oncely.context"


class RenderedResponse(Protocol):
    """What a framework response offers (Starlette/FastAPI `Response` fits)."""

    status_code: int

    @property
    def raw_headers(self) -> Iterable[tuple[bytes, bytes]]: ...

    @property
    def body(self) -> bytes | memoryview[int]: ...


class TransactionalCompletionUnsupported(TypeError):
    """The store cannot share a transaction with the handler (memory, Redis)."""


@dataclass
class IdempotencyContext:
    """Put on the ASGI scope (`scope["oncely.context"]`) of every guarded request."""

    key: str
    scope: str
    token: str
    attempt: int
    took_over: bool
    store: Any
    policy: IdempotencyPolicy
    completed_in_transaction: bool = False

    def stored_response(self, response: RenderedResponse) -> StoredResponse:
        """The record of `response` as the middleware would store it (same header rules)."""
        keeps = self.policy.keeps_header
        headers = tuple((name, value) for name, value in response.raw_headers if keeps(name))
        body = bytes(response.body)
        if len(body) > self.policy.max_stored_body:
            return StoredResponse(response.status_code, headers, b"", replayable=False)
        return StoredResponse(response.status_code, headers, body)

    def complete_in_transaction_sync(self, connection: Any, response: RenderedResponse) -> bool:
        """Complete the record on `connection` (sqlite3 or psycopg, same database as the
        store) inside its open transaction. Returns False when the lease was lost: then
        roll back, another worker has taken the request over."""
        complete = getattr(self.store, "complete_in_transaction_sync", None)
        if complete is None:
            raise TransactionalCompletionUnsupported(_unsupported(self.store))
        done = bool(
            complete(connection, self.scope, self.key, self.token, self.stored_response(response))
        )
        self.completed_in_transaction = self.completed_in_transaction or done
        return done

    async def complete_in_transaction(self, connection: Any, response: RenderedResponse) -> bool:
        """The async twin, for a psycopg `AsyncConnection` (PostgreSQL stores)."""
        complete = getattr(self.store, "complete_in_transaction", None)
        if complete is None:
            raise TransactionalCompletionUnsupported(_unsupported(self.store))
        stored = self.stored_response(response)
        done = bool(await complete(connection, self.scope, self.key, self.token, stored))
        self.completed_in_transaction = self.completed_in_transaction or done
        return done


def idempotency_context(request_or_scope: Any) -> IdempotencyContext | None:
    """The context of a guarded request, from a Starlette/FastAPI `Request` or an ASGI
    scope; None when oncely did not guard this request (no key, method not honoured)."""
    scope: Mapping[str, Any] = getattr(request_or_scope, "scope", request_or_scope)
    context = scope.get(CONTEXT_KEY)
    return context if isinstance(context, IdempotencyContext) else None


def _unsupported(store: Any) -> str:
    return (
        f"the {getattr(store, 'name', type(store).__name__)} store cannot complete inside "
        "your transaction; use SQLiteStore (same file) or PostgresStore (same database)"
    )
