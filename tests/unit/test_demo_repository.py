"""The demo's data layer, both implementations held to the same behaviour.

SQLite runs on a temporary file; PostgreSQL on the shared server, in a schema of its own
that is dropped afterwards (skipped on a laptop without PostgreSQL, a failure in CI).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import anyio
import pytest

from oncely.demo.repository import (
    Account,
    AccountNotFound,
    CurrencyMismatch,
    InsufficientFunds,
    InvalidAmount,
    PostgresRepository,
    Repository,
    SameAccount,
    SQLiteRepository,
)
from tests.support.postgres_fixtures import postgres_reachable
from tests.support.services import POSTGRES_URL, service_missing

pytestmark = pytest.mark.anyio

WORKSPACE = "cred:test-workspace"
OTHER_WORKSPACE = "cred:other-workspace"


def drop_schema(schema: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'.encode())


@pytest.fixture(params=["sqlite", "postgres"])
def make_repository(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[], Repository]]:
    """A factory: every repository it makes shares one database (like worker processes)."""
    if request.param == "sqlite":
        yield lambda: SQLiteRepository(tmp_path / "demo.db")
        return
    reason = postgres_reachable(POSTGRES_URL)
    if reason is not None:
        service_missing("postgres", reason)
    schema = f"oncely_demo_test_{uuid.uuid4().hex[:12]}"
    try:
        yield lambda: PostgresRepository(POSTGRES_URL, schema=schema, max_size=20)
    finally:
        drop_schema(schema)


@pytest.fixture
async def repository(make_repository: Callable[[], Repository]) -> AsyncIterator[Repository]:
    repo = make_repository()
    await repo.open()
    try:
        yield repo
    finally:
        await repo.aclose()


async def account(
    repo: Repository, balance: int, currency: str = "NZD", workspace: str = WORKSPACE
) -> Account:
    return await repo.create_account(
        workspace, name="Test", institution="Bank", balance=balance, currency=currency
    )


async def balances(repo: Repository, *accounts: Account) -> list[int]:
    found = [await repo.get_account(WORKSPACE, a.id) for a in accounts]
    return [a.balance for a in found if a is not None]


async def test_accounts_are_created_and_read_back(repository: Repository) -> None:
    created = await account(repository, 10_000)
    assert created.id.startswith("acc_")
    assert await repository.get_account(WORKSPACE, created.id) == created
    assert await repository.list_accounts(WORKSPACE) == [created]


async def test_a_workspace_never_sees_another_workspaces_accounts(repository: Repository) -> None:
    mine = await account(repository, 100)
    theirs = await account(repository, 100, workspace=OTHER_WORKSPACE)
    assert await repository.get_account(OTHER_WORKSPACE, mine.id) is None
    assert await repository.list_accounts(OTHER_WORKSPACE) == [theirs]
    with pytest.raises(AccountNotFound):
        await repository.transfer(
            WORKSPACE, from_account=mine.id, to_account=theirs.id, amount=1, idempotency_key="k"
        )
    assert await balances(repository, mine) == [100]


async def test_a_transfer_debits_and_credits_and_is_recorded(repository: Repository) -> None:
    a, b = await account(repository, 10_000), await account(repository, 0)
    transfer = await repository.transfer(
        WORKSPACE, from_account=a.id, to_account=b.id, amount=2_500, idempotency_key="rent"
    )
    assert transfer.id.startswith("tr_")
    assert (transfer.amount, transfer.currency, transfer.idempotency_key) == (2_500, "NZD", "rent")
    assert await balances(repository, a, b) == [7_500, 2_500]
    assert await repository.get_transfer(WORKSPACE, transfer.id) == transfer
    assert await repository.get_transfer(OTHER_WORKSPACE, transfer.id) is None
    assert await repository.list_transfers(WORKSPACE, a.id) == [transfer]
    assert await repository.list_transfers(WORKSPACE, b.id) == [transfer]


async def test_transfers_are_listed_newest_first(repository: Repository) -> None:
    a, b = await account(repository, 100), await account(repository, 100)
    first = await repository.transfer(
        WORKSPACE, from_account=a.id, to_account=b.id, amount=1, idempotency_key="1"
    )
    second = await repository.transfer(
        WORKSPACE, from_account=b.id, to_account=a.id, amount=2, idempotency_key="2"
    )
    assert await repository.list_transfers(WORKSPACE, a.id) == [second, first]
    assert await repository.list_transfers(WORKSPACE, a.id, limit=1) == [second]
    with pytest.raises(AccountNotFound):
        await repository.list_transfers(WORKSPACE, "acc_missing")


async def test_refused_transfers_change_nothing(repository: Repository) -> None:
    a, b = await account(repository, 1_000), await account(repository, 0)
    euro = await account(repository, 1_000, currency="EUR")
    refusals: list[tuple[type[Exception], str, str, int]] = [
        (InsufficientFunds, a.id, b.id, 1_001),
        (AccountNotFound, a.id, "acc_missing", 1),
        (AccountNotFound, "acc_missing", b.id, 1),
        (CurrencyMismatch, a.id, euro.id, 1),
        (SameAccount, a.id, a.id, 1),
        (InvalidAmount, a.id, b.id, 0),
        (InvalidAmount, a.id, b.id, -5),
    ]
    for error, source, target, amount in refusals:
        with pytest.raises(error):
            await repository.transfer(
                WORKSPACE, from_account=source, to_account=target, amount=amount,
                idempotency_key="refused",
            )  # fmt: skip
    assert await balances(repository, a, b, euro) == [1_000, 0, 1_000]
    assert await repository.list_transfers(WORKSPACE, a.id) == []


async def test_the_whole_balance_can_be_sent(repository: Repository) -> None:
    a, b = await account(repository, 500), await account(repository, 0)
    await repository.transfer(
        WORKSPACE, from_account=a.id, to_account=b.id, amount=500, idempotency_key=None
    )
    assert await balances(repository, a, b) == [0, 500]


async def test_concurrent_transfers_never_overdraw(
    make_repository: Callable[[], Repository],
) -> None:
    """50 transfers at once from an account that can pay 10, through three repositories
    on one database (as three worker processes would be): exactly 10 succeed."""
    repos = [make_repository() for _ in range(3)]
    for repo in repos:
        await repo.open()
    try:
        source = await account(repos[0], 10 * 70)
        target = await account(repos[0], 0)

        async def send(index: int) -> bool:
            try:
                await repos[index % 3].transfer(
                    WORKSPACE, from_account=source.id, to_account=target.id, amount=70,
                    idempotency_key=f"k{index}",
                )  # fmt: skip
            except InsufficientFunds:
                return False
            return True

        with anyio.fail_after(60):
            results = await asyncio.gather(*(send(i) for i in range(50)))
        assert results.count(True) == 10
        assert await balances(repos[1], source, target) == [0, 700]
        assert len(await repos[2].list_transfers(WORKSPACE, source.id)) == 10
    finally:
        for repo in repos:
            await repo.aclose()


async def test_opposite_transfers_at_once_neither_deadlock_nor_lose_money(
    make_repository: Callable[[], Repository],
) -> None:
    repos = [make_repository() for _ in range(2)]
    for repo in repos:
        await repo.open()
    try:
        a, b = await account(repos[0], 1_000), await account(repos[0], 1_000)

        async def send(index: int) -> None:
            source, target = (a, b) if index % 2 else (b, a)
            await repos[index % 2].transfer(
                WORKSPACE, from_account=source.id, to_account=target.id, amount=1 + index % 5,
                idempotency_key=f"k{index}",
            )  # fmt: skip

        with anyio.fail_after(60):
            await asyncio.gather(*(send(i) for i in range(60)))
        assert sum(await balances(repos[1], a, b)) == 2_000
        assert len(await repos[0].list_transfers(WORKSPACE, a.id, limit=1000)) == 60
    finally:
        for repo in repos:
            await repo.aclose()


async def test_opening_twice_and_reopening_keeps_the_data(
    make_repository: Callable[[], Repository],
) -> None:
    first = make_repository()
    await first.open()
    created = await account(first, 42)
    await first.aclose()
    await first.aclose()  # closing twice is harmless
    second = make_repository()
    await second.open()
    await second.open()
    try:
        assert await second.get_account(WORKSPACE, created.id) == created
    finally:
        await second.aclose()
