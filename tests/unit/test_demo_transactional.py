"""The demo's writes complete their idempotency record in their own transaction (SPEC §3,
transactional completion), on SQLite (the store's file) and PostgreSQL (the store's
database, a schema of its own on the shared server, dropped afterwards).

A commit stores the money and exactly the response bytes together; a rollback leaves the
claim untouched (in flight, the original token); a lost lease rolls the write back.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from oncely.context import IdempotencyContext
from oncely.core.policy import IdempotencyPolicy
from oncely.core.records import Record, RecordState
from oncely.demo.app import (
    CompleteWith,
    CrashHooks,
    account_created,
    create_app,
    describe,
    transfer_created,
)
from oncely.demo.auth import workspace_scope
from oncely.demo.repository import (
    Account,
    InsufficientFunds,
    LeaseLost,
    PostgresRepository,
    Repository,
    SQLiteRepository,
    Transfer,
)
from oncely.stores import Store
from oncely.stores.sqlite import SQLiteStore
from tests.support.postgres_fixtures import postgres_reachable
from tests.support.services import POSTGRES_URL, service_missing

pytestmark = pytest.mark.anyio

WORKSPACE = "cred:transactional"
POLICY = IdempotencyPolicy()


@dataclass
class Bank:
    """A store and a repository on one database, as the demo builds them."""

    store: Store
    repository: Repository

    async def claim(self, key: str, token: str | None = None) -> IdempotencyContext:
        token = token or uuid.uuid4().hex
        await self.store.claim(WORKSPACE, key, "fp", token, lease=30, retention=600)
        return IdempotencyContext(key, WORKSPACE, token, 1, False, self.store, POLICY)

    async def record(self, key: str) -> Record:
        record = await self.store.get(WORKSPACE, key)
        assert record is not None
        return record

    async def account(self, balance: int) -> Account:
        return await self.repository.create_account(
            WORKSPACE, name="Test", institution="Bank", balance=balance, currency="NZD"
        )

    async def balances(self, *accounts: Account) -> list[int]:
        found = [await self.repository.get_account(WORKSPACE, a.id) for a in accounts]
        return [a.balance for a in found if a is not None]


@pytest.fixture(params=["sqlite", "postgres"])
async def bank(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Bank]:
    if request.param == "sqlite":
        store: Store = SQLiteStore(tmp_path / "bank.db")
        repository: Repository = SQLiteRepository(tmp_path / "bank.db")
        schema = None
    else:
        reason = postgres_reachable(POSTGRES_URL)
        if reason is not None:
            service_missing("postgres", reason)
        from oncely.stores.postgres import PostgresStore

        schema = f"oncely_demo_tc_{uuid.uuid4().hex[:12]}"
        store = PostgresStore(POSTGRES_URL, schema=schema, max_size=4)
        repository = PostgresRepository(POSTGRES_URL, schema=schema, max_size=4)
    await repository.open()
    try:
        yield Bank(store, repository)
    finally:
        await repository.aclose()
        await store.aclose()
        store.close()
        if schema is not None:
            import psycopg

            with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'.encode())


class ThenFail(CompleteWith[Transfer]):
    """Completes the record, then fails before the commit: everything must roll back."""

    def sqlite(self, connection: sqlite3.Connection, result: Transfer) -> bool:
        assert super().sqlite(connection, result)
        raise RuntimeError("the database went away before the commit")

    async def postgres(self, connection: Any, result: Transfer) -> bool:
        assert await super().postgres(connection, result)
        raise RuntimeError("the database went away before the commit")


async def test_a_commit_stores_the_money_and_exactly_the_response(bank: Bank) -> None:
    a, b = await bank.account(1_000), await bank.account(0)
    context = await bank.claim("pay-1")
    completion = CompleteWith(context, transfer_created)
    transfer = await bank.repository.transfer(
        WORKSPACE, from_account=a.id, to_account=b.id, amount=300, idempotency_key="pay-1",
        in_transaction=completion,
    )  # fmt: skip
    response = completion.response
    assert response is not None
    assert response.status_code == 201
    assert response.body == transfer_created(transfer).body
    record = await bank.record("pay-1")
    assert record.state is RecordState.COMPLETED
    assert record.token == context.token
    assert record.response is not None
    assert record.response.status == 201
    assert record.response.body == bytes(response.body)
    assert list(record.response.headers) == list(response.raw_headers)
    assert (b"location", f"/v1/transfers/{transfer.id}".encode()) in record.response.headers
    assert await bank.balances(a, b) == [700, 300]
    # The middleware's own completion afterwards is fenced out: the record stays as stored.
    assert not await bank.store.complete(WORKSPACE, "pay-1", context.token, record.response)


async def test_a_rollback_leaves_the_claim_in_flight_with_its_token(bank: Bank) -> None:
    a, b = await bank.account(1_000), await bank.account(0)
    context = await bank.claim("pay-2")
    with pytest.raises(RuntimeError, match="went away"):
        await bank.repository.transfer(
            WORKSPACE, from_account=a.id, to_account=b.id, amount=300, idempotency_key="pay-2",
            in_transaction=ThenFail(context, transfer_created),
        )  # fmt: skip
    record = await bank.record("pay-2")
    assert record.state is RecordState.IN_FLIGHT
    assert record.token == context.token
    assert record.response is None
    assert await bank.balances(a, b) == [1_000, 0]
    assert await bank.repository.list_transfers(WORKSPACE, a.id) == []
    # The claim is still ours: the lease lapses or the middleware releases it, as usual.
    assert await bank.store.release(WORKSPACE, "pay-2", context.token)


async def test_a_refusal_completes_nothing(bank: Bank) -> None:
    a, b = await bank.account(100), await bank.account(0)
    context = await bank.claim("pay-3")
    completion = CompleteWith(context, transfer_created)
    with pytest.raises(InsufficientFunds):
        await bank.repository.transfer(
            WORKSPACE, from_account=a.id, to_account=b.id, amount=300, idempotency_key="pay-3",
            in_transaction=completion,
        )  # fmt: skip
    assert completion.response is None  # the middleware stores the refusal, as before
    assert (await bank.record("pay-3")).state is RecordState.IN_FLIGHT


async def test_a_lost_lease_rolls_the_write_back(bank: Bank) -> None:
    a, b = await bank.account(1_000), await bank.account(0)
    context = await bank.claim("pay-4")
    # Another worker takes the request over meanwhile.
    await bank.store.release(WORKSPACE, "pay-4", context.token)
    await bank.claim("pay-4", token="other-worker")
    with pytest.raises(LeaseLost):
        await bank.repository.transfer(
            WORKSPACE, from_account=a.id, to_account=b.id, amount=300, idempotency_key="pay-4",
            in_transaction=CompleteWith(context, transfer_created),
        )  # fmt: skip
    record = await bank.record("pay-4")
    assert (record.state, record.token) == (RecordState.IN_FLIGHT, "other-worker")
    assert await bank.balances(a, b) == [1_000, 0]
    assert await bank.repository.list_transfers(WORKSPACE, a.id) == []


async def test_an_account_is_opened_with_its_record(bank: Bank) -> None:
    context = await bank.claim("open-1")
    completion = CompleteWith(context, account_created)
    account = await bank.repository.create_account(
        WORKSPACE, name="Alice", institution="Kiwibank", balance=500, currency="NZD",
        in_transaction=completion,
    )  # fmt: skip
    record = await bank.record("open-1")
    assert completion.response is not None
    assert record.response is not None
    assert record.response.body == bytes(completion.response.body)
    assert b'"balance":500' in record.response.body
    assert await bank.repository.get_account(WORKSPACE, account.id) == account

    lost = await bank.claim("open-2")
    await bank.store.release(WORKSPACE, "open-2", lost.token)
    with pytest.raises(LeaseLost):
        await bank.repository.create_account(
            WORKSPACE, name="Bob", institution="ASB", balance=1, currency="NZD",
            in_transaction=CompleteWith(lost, account_created),
        )  # fmt: skip
    assert await bank.repository.list_accounts(WORKSPACE) == [account]


# the API, in process -----------------------------------------------------------------

TOKEN = "sk_test_tc"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def post(client: httpx.AsyncClient, path: str, body: dict[str, Any], key: str) -> Any:
    return await client.post(path, json=body, headers={**AUTH, "Idempotency-Key": key})


@pytest.mark.parametrize("transactional", [True, False])
async def test_the_api_answers_with_the_bytes_it_stored(
    tmp_path: Path, transactional: bool
) -> None:
    database = tmp_path / "api.db"
    app = create_app(
        f"sqlite:///{database}", transactional_completion=transactional, hooks=CrashHooks()
    )
    assert app.state.demo.transactional_completion is transactional
    transport = httpx.ASGITransport(app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://demo") as client,
    ):
        opening = {"name": "A", "institution": "B", "balance": 1_000, "currency": "NZD"}
        a = (await post(client, "/v1/accounts", opening, "open-a")).json()["id"]
        b = (await post(client, "/v1/accounts", {**opening, "balance": 0}, "open-b")).json()["id"]
        body = {"from_account": a, "to_account": b, "amount": 250}
        first = await post(client, "/v1/transfers", body, "t-1")
        again = await post(client, "/v1/transfers", body, "t-1")
        refused = await post(client, "/v1/transfers", {**body, "amount": 10_000}, "t-2")
        schema = (await client.get("/openapi.json")).json()
    assert first.status_code == 201
    assert first.headers["location"] == f"/v1/transfers/{first.json()['id']}"
    assert list(first.headers) == ["content-length", "content-type", "location"]
    assert (again.headers["idempotent-replayed"], again.content) == ("true", first.content)
    assert refused.status_code == 409
    assert refused.json()["type"].endswith("/insufficient-funds")
    store = SQLiteStore(database)
    try:
        record = store.get_sync(workspace_scope(TOKEN.encode()), "t-1")
        refusal = store.get_sync(workspace_scope(TOKEN.encode()), "t-2")
    finally:
        store.close()
    assert record is not None
    assert record.response is not None
    assert record.response.body == first.content
    assert [(k.decode(), v.decode()) for k, v in record.response.headers] == list(
        first.headers.items()
    )
    assert refusal is not None
    assert refusal.response is not None
    assert refusal.response.body == refused.content
    # The OpenAPI still documents the 201 bodies.
    created = schema["paths"]["/v1/transfers"]["post"]["responses"]["201"]
    assert created["content"]["application/json"]["schema"]["$ref"].endswith("/TransferOut")


def test_the_banner_says_how_records_are_completed(tmp_path: Path) -> None:
    def completion_line(url: str, **options: Any) -> str:
        demo = create_app(url, hooks=CrashHooks(), **options).state.demo
        return dict(describe(demo))["completion"]

    sqlite = f"sqlite:///{tmp_path / 'banner.db'}"
    assert completion_line(sqlite).startswith("in the handler's transaction")
    off = completion_line(sqlite, transactional_completion=False)
    assert "--no-transactional-completion" in off
    memory = completion_line("memory://", transactional_completion=True)
    assert "memory store cannot share" in memory
    hooks = CrashHooks(after_commit_delay_ms=5, commit_marker=tmp_path / "marker")
    demo = create_app(sqlite, hooks=hooks).state.demo
    assert "ONCELY_DEMO_AFTER_COMMIT_DELAY_MS=5" in dict(describe(demo))["test hooks"]


def test_the_crash_hooks_come_from_the_environment(tmp_path: Path) -> None:
    assert CrashHooks.from_environment({}) == CrashHooks()
    assert not CrashHooks.from_environment({}).active
    hooks = CrashHooks.from_environment(
        {"ONCELY_DEMO_AFTER_COMMIT_DELAY_MS": "250", "ONCELY_DEMO_COMMIT_MARKER": "/tmp/m"}
    )
    assert hooks == CrashHooks(250, Path("/tmp/m"))
    assert hooks.active
