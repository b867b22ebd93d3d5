"""Transactional completion (SPEC §3): the handler completes the record in its own
transaction on the store's database, so data and response commit or vanish together."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from oncely import IdempotencyMiddleware, idempotency_context
from oncely.context import TransactionalCompletionUnsupported
from oncely.core.records import RecordState
from oncely.stores import MemoryStore, SQLiteStore
from tests.adapters.harness import call

pytestmark = pytest.mark.anyio


def transfers_app(db_path: Path, *, fail_after_completion: bool = False) -> Starlette:
    def connect() -> sqlite3.Connection:
        connection = sqlite3.connect(db_path, isolation_level=None)
        connection.execute(
            "CREATE TABLE IF NOT EXISTS transfers (id INTEGER PRIMARY KEY, key TEXT)"
        )
        return connection

    async def transfer(request: Request) -> Response:
        context = idempotency_context(request)
        assert context is not None
        connection = connect()
        try:
            connection.execute("BEGIN IMMEDIATE")
            cursor = connection.execute("INSERT INTO transfers (key) VALUES (?)", (context.key,))
            response = JSONResponse({"id": cursor.lastrowid}, status_code=201)
            assert context.complete_in_transaction_sync(connection, response)
            if fail_after_completion:
                connection.execute("ROLLBACK")
                return JSONResponse({"error": "rolled back"}, status_code=503)
            connection.execute("COMMIT")
            return response
        finally:
            connection.close()

    return Starlette(routes=[Route("/transfers", transfer, methods=["POST"])])


def rows(db_path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db_path) as connection:
        return connection.execute("SELECT id, key FROM transfers").fetchall()


async def test_completed_in_the_handlers_transaction_and_replayed(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    store = SQLiteStore(db)
    middleware = IdempotencyMiddleware(transfers_app(db), store=store)
    first = await call(middleware, path="/transfers", key="t1")
    record = await store.get("anonymous", "t1")
    assert record is not None
    assert record.state is RecordState.COMPLETED
    assert record.response is not None
    assert record.response.body == first.body
    replay = await call(middleware, path="/transfers", key="t1")
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.body == first.body
    assert rows(db) == [(1, "t1")]
    store.close()


async def test_rolled_back_transaction_leaves_the_claim_to_the_middleware(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    store = SQLiteStore(db)
    middleware = IdempotencyMiddleware(transfers_app(db, fail_after_completion=True), store=store)
    first = await call(middleware, path="/transfers", key="t1")
    assert first.status == 503
    assert rows(db) == []
    record = await store.get("anonymous", "t1")
    assert record is not None
    assert record.state is RecordState.COMPLETED  # the middleware stored what was sent
    assert record.response is not None
    assert record.response.status == 503
    store.close()


async def test_a_lost_lease_refuses_the_in_transaction_completion(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    store = SQLiteStore(db)
    outcomes: list[bool] = []

    async def handler(request: Request) -> Response:
        context = idempotency_context(request)
        assert context is not None
        # Another worker took over meanwhile.
        store.release_sync(context.scope, context.key, context.token)
        store.claim_sync(context.scope, context.key, "", "other", lease=60, retention=60)
        connection = sqlite3.connect(db, isolation_level=None)
        connection.execute("BEGIN IMMEDIATE")
        outcomes.append(context.complete_in_transaction_sync(connection, JSONResponse({})))
        connection.execute("ROLLBACK")
        connection.close()
        return JSONResponse({"lost": True})

    app = Starlette(routes=[Route("/x", handler, methods=["POST"])])
    await call(IdempotencyMiddleware(app, store=store), path="/x", key="k")
    assert outcomes == [False]
    record = await store.get("anonymous", "k")
    assert record is not None
    assert record.token == "other"
    assert record.state is RecordState.IN_FLIGHT
    store.close()


async def test_stores_that_cannot_share_a_transaction_say_so() -> None:
    async def handler(request: Request) -> Response:
        context = idempotency_context(request)
        assert context is not None
        with pytest.raises(TransactionalCompletionUnsupported):
            context.complete_in_transaction_sync(object(), JSONResponse({}))
        return JSONResponse({})

    app = Starlette(routes=[Route("/x", handler, methods=["POST"])])
    assert (
        await call(IdempotencyMiddleware(app, store=MemoryStore()), path="/x", key="k")
    ).status == 200


async def test_no_context_without_a_key() -> None:
    seen: list[object] = []

    async def handler(request: Request) -> Response:
        seen.append(idempotency_context(request))
        return JSONResponse({})

    app = Starlette(routes=[Route("/x", handler, methods=["POST"])])
    await call(IdempotencyMiddleware(app, store=MemoryStore()), path="/x")
    assert seen == [None]
