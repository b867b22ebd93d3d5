"""The demo's money: accounts and transfers, behind one small repository interface.

Two implementations with the same behaviour:

- `SQLiteRepository`: sqlite3 on one worker thread (the event loop never blocks on the
  file lock or an fsync). A transfer is one `BEGIN IMMEDIATE` transaction, which takes
  the database's write lock first, so transfers from several processes (or several
  repositories on one file) serialise and never overdraw.
- `PostgresRepository`: psycopg 3 with an async pool. A transfer locks its two accounts
  with `SELECT ... FOR UPDATE` in id order (so two opposite transfers can not deadlock)
  and checks the balance under that lock.

The tables (`demo_accounts`, `demo_transfers`) live in the same database as the
idempotency store whenever that store is SQL, so that a write and its idempotency record
commit in one transaction (SPEC §3, transactional completion): each write takes an
optional `InTransaction`, which the repository calls after its writes and before its
commit, on its own connection. The repository knows nothing of HTTP or of oncely; the
API (`oncely.demo.app`) renders the response there and completes the record with it.

Amounts are integers in minor units (cents); every account has one currency. Rows belong
to a workspace (the hashed credential), and a workspace never sees another's rows.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from psycopg import AsyncConnection
    from psycopg.rows import TupleRow
    from psycopg_pool import AsyncConnectionPool

T = TypeVar("T")
R_contra = TypeVar("R_contra", contravariant=True)

ACCOUNTS = "demo_accounts"
TRANSFERS = "demo_transfers"
DEFAULT_LIST_LIMIT = 100


# the model ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Account:
    id: str
    name: str
    institution: str
    balance: int
    currency: str
    created_at: float  # seconds since the epoch, UTC


@dataclass(frozen=True, slots=True)
class Transfer:
    id: str
    from_account: str
    to_account: str
    amount: int
    currency: str
    created_at: float
    idempotency_key: str | None


class DemoError(Exception):
    """A request the bank refuses. The API turns each kind into a problem response."""

    def __init__(self, detail: str, **extensions: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extensions = extensions


class AccountNotFound(DemoError):
    pass


class TransferNotFound(DemoError):
    pass


class InsufficientFunds(DemoError):
    pass


class CurrencyMismatch(DemoError):
    pass


class SameAccount(DemoError):
    pass


class InvalidAmount(DemoError):
    pass


class LeaseLost(Exception):
    """`InTransaction` said the idempotency record is no longer ours (another worker took
    the request over): the write was rolled back. Not a `DemoError`: the bank did not
    refuse anything, the request is simply running elsewhere."""


class InTransaction(Protocol[R_contra]):
    """Called inside a write's transaction, after its writes and before its commit, on the
    repository's own connection: the SQLite one (in the repository's worker thread, inside
    its `BEGIN IMMEDIATE`) or the psycopg `AsyncConnection` (inside `conn.transaction()`).

    Returns False to roll the write back (the repository then raises `LeaseLost`);
    an exception rolls it back too and propagates.
    """

    def sqlite(self, connection: sqlite3.Connection, result: R_contra) -> bool: ...

    async def postgres(self, connection: AsyncConnection[TupleRow], result: R_contra) -> bool: ...


def new_account_id() -> str:
    return "acc_" + secrets.token_hex(12)


def new_transfer_id() -> str:
    return "tr_" + secrets.token_hex(12)


def check_transfer(
    from_account: str, to_account: str, amount: int, source: Account | None, target: Account | None
) -> None:
    """The bank's rules for a transfer, given both accounts read under the lock."""
    if source is None:
        raise AccountNotFound(
            f"No account {from_account!r} in this workspace.", account=from_account
        )
    if target is None:
        raise AccountNotFound(f"No account {to_account!r} in this workspace.", account=to_account)
    if source.currency != target.currency:
        raise CurrencyMismatch(
            f"Account {source.id} holds {source.currency} and account {target.id} holds "
            f"{target.currency}; transfers move money within one currency.",
            from_currency=source.currency,
            to_currency=target.currency,
        )
    if source.balance < amount:
        raise InsufficientFunds(
            f"Account {source.id} has {source.balance} {source.currency} (minor units); "
            f"the transfer needs {amount}.",
            account=source.id,
            balance=source.balance,
            amount=amount,
        )


def check_request(from_account: str, to_account: str, amount: int) -> None:
    if amount <= 0:
        raise InvalidAmount("The amount must be a positive integer in minor units.")
    if from_account == to_account:
        raise SameAccount("A transfer needs two different accounts.", account=from_account)


class Repository(Protocol):
    """What the API needs from storage. Every method is scoped to one workspace."""

    description: str

    async def open(self) -> None:
        """Connect and create the tables if absent."""
        ...

    async def create_account(
        self,
        workspace: str,
        *,
        name: str,
        institution: str,
        balance: int,
        currency: str,
        in_transaction: InTransaction[Account] | None = None,
    ) -> Account: ...

    async def get_account(self, workspace: str, account_id: str) -> Account | None: ...

    async def list_accounts(
        self, workspace: str, limit: int = DEFAULT_LIST_LIMIT
    ) -> list[Account]: ...

    async def transfer(
        self,
        workspace: str,
        *,
        from_account: str,
        to_account: str,
        amount: int,
        idempotency_key: str | None,
        in_transaction: InTransaction[Transfer] | None = None,
    ) -> Transfer:
        """Debit and credit in one transaction. Raises a `DemoError` and changes nothing
        when an account is unknown, the currencies differ or the funds are short; raises
        `LeaseLost` and changes nothing when `in_transaction` returned False."""
        ...

    async def get_transfer(self, workspace: str, transfer_id: str) -> Transfer | None: ...

    async def list_transfers(
        self, workspace: str, account_id: str, limit: int = DEFAULT_LIST_LIMIT
    ) -> list[Transfer]:
        """Transfers from or to the account, newest first. Raises AccountNotFound."""
        ...

    async def aclose(self) -> None: ...


# SQLite ------------------------------------------------------------------------------

SQLITE_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {ACCOUNTS} (
    id TEXT PRIMARY KEY,
    workspace TEXT NOT NULL,
    name TEXT NOT NULL,
    institution TEXT NOT NULL,
    balance INTEGER NOT NULL CHECK (balance >= 0),
    currency TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS {ACCOUNTS}_workspace ON {ACCOUNTS} (workspace, created_at);
CREATE TABLE IF NOT EXISTS {TRANSFERS} (
    id TEXT PRIMARY KEY,
    workspace TEXT NOT NULL,
    from_account TEXT NOT NULL REFERENCES {ACCOUNTS} (id),
    to_account TEXT NOT NULL REFERENCES {ACCOUNTS} (id),
    amount INTEGER NOT NULL CHECK (amount > 0),
    currency TEXT NOT NULL,
    created_at REAL NOT NULL,
    idempotency_key TEXT
);
CREATE INDEX IF NOT EXISTS {TRANSFERS}_from ON {TRANSFERS} (from_account, created_at);
CREATE INDEX IF NOT EXISTS {TRANSFERS}_to ON {TRANSFERS} (to_account, created_at);
CREATE INDEX IF NOT EXISTS {TRANSFERS}_key ON {TRANSFERS} (workspace, idempotency_key);
"""
_ACCOUNT_COLUMNS = "id, name, institution, balance, currency, created_at"
_TRANSFER_COLUMNS = "id, from_account, to_account, amount, currency, created_at, idempotency_key"


def _account(row: Sequence[Any]) -> Account:
    return Account(row[0], row[1], row[2], int(row[3]), row[4], float(row[5]))


def _transfer(row: Sequence[Any]) -> Transfer:
    return Transfer(row[0], row[1], row[2], int(row[3]), row[4], float(row[5]), row[6])


class SQLiteRepository:
    """Accounts and transfers in a SQLite file (WAL, `synchronous=FULL`, like the store)."""

    def __init__(self, path: str | Path, *, busy_timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.description = f"SQLite {self.path.resolve()}"
        self._busy_timeout = busy_timeout
        self._connection: sqlite3.Connection | None = None
        self._closed = False
        # One thread owns the connection: no two statements ever overlap on it.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="oncely-demo-sqlite")

    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            connection = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout,
                isolation_level=None,  # autocommit; writes open their own transactions
                check_same_thread=False,
            )
            connection.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = FULL")
            connection.execute("PRAGMA foreign_keys = ON")
            connection.executescript(SQLITE_SCHEMA)
            self._connection = connection
        return self._connection

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: work(self._db()))

    @staticmethod
    def _write(db: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
        db.execute("BEGIN IMMEDIATE")  # the write lock first: read-check-write is atomic
        try:
            result = work(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    async def open(self) -> None:
        await self._run(lambda db: None)

    async def create_account(
        self,
        workspace: str,
        *,
        name: str,
        institution: str,
        balance: int,
        currency: str,
        in_transaction: InTransaction[Account] | None = None,
    ) -> Account:
        account = Account(new_account_id(), name, institution, balance, currency, time.time())

        def insert(db: sqlite3.Connection) -> Account:
            db.execute(
                f"INSERT INTO {ACCOUNTS} (id, workspace, name, institution, balance, currency,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (account.id, workspace, name, institution, balance, currency, account.created_at),
            )
            _finish_sqlite(db, in_transaction, account)
            return account

        if in_transaction is None:
            return await self._run(insert)  # one statement: its own transaction
        return await self._run(lambda db: self._write(db, insert))

    @staticmethod
    def _get_account(db: sqlite3.Connection, workspace: str, account_id: str) -> Account | None:
        row = db.execute(
            f"SELECT {_ACCOUNT_COLUMNS} FROM {ACCOUNTS} WHERE workspace = ? AND id = ?",
            (workspace, account_id),
        ).fetchone()
        return None if row is None else _account(row)

    async def get_account(self, workspace: str, account_id: str) -> Account | None:
        return await self._run(lambda db: self._get_account(db, workspace, account_id))

    async def list_accounts(self, workspace: str, limit: int = DEFAULT_LIST_LIMIT) -> list[Account]:
        def select(db: sqlite3.Connection) -> list[Account]:
            rows = db.execute(
                f"SELECT {_ACCOUNT_COLUMNS} FROM {ACCOUNTS} WHERE workspace = ?"
                " ORDER BY created_at, id LIMIT ?",
                (workspace, limit),
            ).fetchall()
            return [_account(row) for row in rows]

        return await self._run(select)

    async def transfer(
        self,
        workspace: str,
        *,
        from_account: str,
        to_account: str,
        amount: int,
        idempotency_key: str | None,
        in_transaction: InTransaction[Transfer] | None = None,
    ) -> Transfer:
        check_request(from_account, to_account, amount)

        def move(db: sqlite3.Connection) -> Transfer:
            source = self._get_account(db, workspace, from_account)
            target = self._get_account(db, workspace, to_account)
            check_transfer(from_account, to_account, amount, source, target)
            assert source is not None
            transfer = Transfer(
                new_transfer_id(), from_account, to_account, amount, source.currency,
                time.time(), idempotency_key,
            )  # fmt: skip
            update = f"UPDATE {ACCOUNTS} SET balance = balance + ? WHERE id = ?"
            db.execute(update, (-amount, from_account))
            db.execute(update, (amount, to_account))
            db.execute(
                f"INSERT INTO {TRANSFERS} (id, workspace, from_account, to_account, amount,"
                " currency, created_at, idempotency_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    transfer.id, workspace, from_account, to_account, amount,
                    transfer.currency, transfer.created_at, idempotency_key,
                ),
            )  # fmt: skip
            _finish_sqlite(db, in_transaction, transfer)
            return transfer

        return await self._run(lambda db: self._write(db, move))

    async def get_transfer(self, workspace: str, transfer_id: str) -> Transfer | None:
        def select(db: sqlite3.Connection) -> Transfer | None:
            row = db.execute(
                f"SELECT {_TRANSFER_COLUMNS} FROM {TRANSFERS} WHERE workspace = ? AND id = ?",
                (workspace, transfer_id),
            ).fetchone()
            return None if row is None else _transfer(row)

        return await self._run(select)

    async def list_transfers(
        self, workspace: str, account_id: str, limit: int = DEFAULT_LIST_LIMIT
    ) -> list[Transfer]:
        def select(db: sqlite3.Connection) -> list[Transfer]:
            if self._get_account(db, workspace, account_id) is None:
                raise AccountNotFound(
                    f"No account {account_id!r} in this workspace.", account=account_id
                )
            rows = db.execute(
                f"SELECT {_TRANSFER_COLUMNS} FROM {TRANSFERS}"
                " WHERE workspace = ? AND (from_account = ? OR to_account = ?)"
                " ORDER BY created_at DESC, id DESC LIMIT ?",
                (workspace, account_id, account_id, limit),
            ).fetchall()
            return [_transfer(row) for row in rows]

        return await self._run(select)

    def _close_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close_connection)
        self._executor.shutdown(wait=False)


def _finish_sqlite(
    db: sqlite3.Connection, in_transaction: InTransaction[T] | None, result: T
) -> None:
    if in_transaction is not None and not in_transaction.sqlite(db, result):
        raise LeaseLost("the idempotency record was taken over; the write was rolled back")


# PostgreSQL --------------------------------------------------------------------------

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}\Z")


@dataclass(frozen=True, slots=True)
class _PostgresStatements:
    ddl: tuple[bytes, ...]
    insert_account: bytes
    get_account: bytes
    list_accounts: bytes
    lock_accounts: bytes
    add_balance: bytes
    insert_transfer: bytes
    get_transfer: bytes
    list_transfers: bytes


def _postgres_statements(schema: str | None) -> _PostgresStatements:
    prefix = f'"{schema}".' if schema else ""
    accounts, transfers = f'{prefix}"{ACCOUNTS}"', f'{prefix}"{TRANSFERS}"'
    ddl = (
        "SELECT pg_advisory_xact_lock(hashtext('oncely.demo.ddl'))",
        *([f'CREATE SCHEMA IF NOT EXISTS "{schema}"'] if schema else []),
        f"""CREATE TABLE IF NOT EXISTS {accounts} (
            id text PRIMARY KEY,
            workspace text NOT NULL,
            name text NOT NULL,
            institution text NOT NULL,
            balance bigint NOT NULL CHECK (balance >= 0),
            currency text NOT NULL,
            created_at double precision NOT NULL
        )""",
        f"CREATE INDEX IF NOT EXISTS {ACCOUNTS}_workspace ON {accounts} (workspace, created_at)",
        f"""CREATE TABLE IF NOT EXISTS {transfers} (
            id text PRIMARY KEY,
            workspace text NOT NULL,
            from_account text NOT NULL REFERENCES {accounts} (id),
            to_account text NOT NULL REFERENCES {accounts} (id),
            amount bigint NOT NULL CHECK (amount > 0),
            currency text NOT NULL,
            created_at double precision NOT NULL,
            idempotency_key text
        )""",
        f"CREATE INDEX IF NOT EXISTS {TRANSFERS}_from ON {transfers} (from_account, created_at)",
        f"CREATE INDEX IF NOT EXISTS {TRANSFERS}_to ON {transfers} (to_account, created_at)",
        f"CREATE INDEX IF NOT EXISTS {TRANSFERS}_key ON {transfers} (workspace, idempotency_key)",
    )
    statements = {
        "insert_account": (
            f"INSERT INTO {accounts} (id, workspace, name, institution, balance, currency,"
            " created_at) VALUES (%s, %s, %s, %s, %s, %s, %s)"
        ),
        "get_account": (
            f"SELECT {_ACCOUNT_COLUMNS} FROM {accounts} WHERE workspace = %s AND id = %s"
        ),
        "list_accounts": (
            f"SELECT {_ACCOUNT_COLUMNS} FROM {accounts} WHERE workspace = %s"
            " ORDER BY created_at, id LIMIT %s"
        ),
        # Both rows locked in id order: opposite transfers queue, never deadlock.
        "lock_accounts": (
            f"SELECT {_ACCOUNT_COLUMNS} FROM {accounts}"
            " WHERE workspace = %s AND id = ANY(%s) ORDER BY id FOR UPDATE"
        ),
        "add_balance": f"UPDATE {accounts} SET balance = balance + %s WHERE id = %s",
        "insert_transfer": (
            f"INSERT INTO {transfers} (id, workspace, from_account, to_account, amount,"
            " currency, created_at, idempotency_key) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
        ),
        "get_transfer": (
            f"SELECT {_TRANSFER_COLUMNS} FROM {transfers} WHERE workspace = %s AND id = %s"
        ),
        "list_transfers": (
            f"SELECT {_TRANSFER_COLUMNS} FROM {transfers}"
            " WHERE workspace = %s AND (from_account = %s OR to_account = %s)"
            " ORDER BY created_at DESC, id DESC LIMIT %s"
        ),
    }
    # Identifiers are checked plain names, so the statements are safe to compose as text.
    return _PostgresStatements(
        ddl=tuple(statement.encode() for statement in ddl),
        **{name: statement.encode() for name, statement in statements.items()},
    )


class PostgresRepository:
    """Accounts and transfers in PostgreSQL: `schema` (or the search path) of `url`'s database.

    Needs the `postgres` extra (psycopg 3, psycopg_pool).
    """

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 10.0,
    ) -> None:
        if schema is not None and not _IDENTIFIER.match(schema):
            raise ValueError(f"schema must be a plain SQL identifier: {schema!r}")
        self.url = url
        self.schema = schema
        self.description = "PostgreSQL, " + (f"schema {schema}" if schema else "the search path")
        self._sql = _postgres_statements(schema)
        self._min_size, self._max_size, self._timeout = min_size, max_size, timeout
        self._pool: AsyncConnectionPool[AsyncConnection[TupleRow]] | None = None

    def _open_pool(self) -> AsyncConnectionPool[AsyncConnection[TupleRow]]:
        if self._pool is None:
            raise RuntimeError("PostgresRepository is not open: call `await open()` first")
        return self._pool

    async def open(self) -> None:
        from psycopg_pool import AsyncConnectionPool

        if self._pool is not None:
            return
        pool: AsyncConnectionPool[AsyncConnection[TupleRow]] = AsyncConnectionPool(
            self.url,
            kwargs={"autocommit": True, "application_name": "oncely-demo"},
            min_size=self._min_size,
            max_size=self._max_size,
            timeout=self._timeout,
            open=False,
            name="oncely-demo",
        )
        try:
            await pool.open(wait=True, timeout=self._timeout)
            async with pool.connection() as conn, conn.transaction():
                for statement in self._sql.ddl:
                    await conn.execute(statement)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def create_account(
        self,
        workspace: str,
        *,
        name: str,
        institution: str,
        balance: int,
        currency: str,
        in_transaction: InTransaction[Account] | None = None,
    ) -> Account:
        account = Account(new_account_id(), name, institution, balance, currency, time.time())
        values = (account.id, workspace, name, institution, balance, currency, account.created_at)
        async with self._open_pool().connection() as conn:
            if in_transaction is None:
                await conn.execute(self._sql.insert_account, values)  # autocommit: one statement
                return account
            async with conn.transaction():
                await conn.execute(self._sql.insert_account, values)
                await _finish_postgres(conn, in_transaction, account)
        return account

    async def _get_account(
        self, conn: AsyncConnection[TupleRow], workspace: str, account_id: str
    ) -> Account | None:
        cursor = await conn.execute(self._sql.get_account, (workspace, account_id))
        row = await cursor.fetchone()
        return None if row is None else _account(row)

    async def get_account(self, workspace: str, account_id: str) -> Account | None:
        async with self._open_pool().connection() as conn:
            return await self._get_account(conn, workspace, account_id)

    async def list_accounts(self, workspace: str, limit: int = DEFAULT_LIST_LIMIT) -> list[Account]:
        async with self._open_pool().connection() as conn:
            cursor = await conn.execute(self._sql.list_accounts, (workspace, limit))
            return [_account(row) for row in await cursor.fetchall()]

    async def transfer(
        self,
        workspace: str,
        *,
        from_account: str,
        to_account: str,
        amount: int,
        idempotency_key: str | None,
        in_transaction: InTransaction[Transfer] | None = None,
    ) -> Transfer:
        check_request(from_account, to_account, amount)
        async with self._open_pool().connection() as conn, conn.transaction():
            cursor = await conn.execute(
                self._sql.lock_accounts, (workspace, [from_account, to_account])
            )
            locked = {row[0]: _account(row) for row in await cursor.fetchall()}
            source, target = locked.get(from_account), locked.get(to_account)
            check_transfer(from_account, to_account, amount, source, target)
            assert source is not None
            transfer = Transfer(
                new_transfer_id(), from_account, to_account, amount, source.currency,
                time.time(), idempotency_key,
            )  # fmt: skip
            await conn.execute(self._sql.add_balance, (-amount, from_account))
            await conn.execute(self._sql.add_balance, (amount, to_account))
            await conn.execute(
                self._sql.insert_transfer,
                (
                    transfer.id, workspace, from_account, to_account, amount,
                    transfer.currency, transfer.created_at, idempotency_key,
                ),
            )  # fmt: skip
            await _finish_postgres(conn, in_transaction, transfer)
        return transfer

    async def get_transfer(self, workspace: str, transfer_id: str) -> Transfer | None:
        async with self._open_pool().connection() as conn:
            cursor = await conn.execute(self._sql.get_transfer, (workspace, transfer_id))
            row = await cursor.fetchone()
        return None if row is None else _transfer(row)

    async def list_transfers(
        self, workspace: str, account_id: str, limit: int = DEFAULT_LIST_LIMIT
    ) -> list[Transfer]:
        async with self._open_pool().connection() as conn:
            if await self._get_account(conn, workspace, account_id) is None:
                raise AccountNotFound(
                    f"No account {account_id!r} in this workspace.", account=account_id
                )
            cursor = await conn.execute(
                self._sql.list_transfers, (workspace, account_id, account_id, limit)
            )
            return [_transfer(row) for row in await cursor.fetchall()]

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()


async def _finish_postgres(
    conn: AsyncConnection[TupleRow], in_transaction: InTransaction[T] | None, result: T
) -> None:
    if in_transaction is not None and not await in_transaction.postgres(conn, result):
        raise LeaseLost("the idempotency record was taken over; the write was rolled back")
