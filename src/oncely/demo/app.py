"""The demo payments API: accounts and transfers where a retried transfer never debits twice.

    app = create_app("sqlite:///oncely-demo.db", ttl=86400, latency_ms=0)

The layers, outside in: `BearerAuth` (401 without a token, before any key is claimed),
oncely's `IdempotencyMiddleware` (the default IETF policy; a POST needs a key), then
FastAPI's routes. Every response that a handler produces, the bank's refusals included,
is stored and replayed by oncely. See docs/demo.md.

When the store is SQL, the money lives in the store's own database and the handlers
complete the idempotency record inside the transaction that writes the money (SPEC §3,
transactional completion; docs/transactional-completion.md): the response is rendered
before the commit, stored by that commit, and the very same object is returned, so a
crash at any instant leaves either nothing or the data and its response together.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Generic, Literal, TypeVar
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.routing import Route

from oncely._version import __version__
from oncely.asgi import IdempotencyMiddleware
from oncely.context import IdempotencyContext
from oncely.core import problems as oncely_problems
from oncely.core.events import EventSubscriber
from oncely.core.keys import InvalidKey, parse_key
from oncely.demo import DEFAULT_DATA_FILE, DEFAULT_STORE_URL, DEFAULT_TTL
from oncely.demo.auth import BearerAuth, bearer_token, workspace_scope
from oncely.demo.problems import (
    PROBLEM_CONTENT_TYPE,
    problem_document,
    problem_of,
)
from oncely.demo.repository import (
    ACCOUNTS,
    TRANSFERS,
    Account,
    AccountNotFound,
    DemoError,
    LeaseLost,
    PostgresRepository,
    Repository,
    SQLiteRepository,
    Transfer,
    TransferNotFound,
)
from oncely.instrumentation.logging import LoggingSubscriber
from oncely.integrations.fastapi import IdempotencyContextDep
from oncely.stores import SQLiteStore, Store, StoreError, store_from_url

if TYPE_CHECKING:
    from psycopg import AsyncConnection
    from psycopg.rows import TupleRow

T = TypeVar("T")

logger = logging.getLogger("oncely.demo")

DOCS_URL = "https://oncely.dev/docs/demo"
SWEEP_INTERVAL = 60.0
DEFAULT_LEASE = 30.0
MAX_AMOUNT = 10**15  # minor units; far below the 64-bit integer limit of both databases

# Test hooks, for tests/chaos/test_crash_exactly_once.py only: they widen and mark the
# crash window between a transfer's commit and the moment its response reaches oncely.
# Read once when the app is built; unset (the default) they cost nothing.
AFTER_COMMIT_DELAY_ENV = "ONCELY_DEMO_AFTER_COMMIT_DELAY_MS"  # sleep this long after a commit
COMMIT_MARKER_ENV = "ONCELY_DEMO_COMMIT_MARKER"  # append "<key>\n" to this file after a commit


# configuration -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CrashHooks:
    """The test hooks (see AFTER_COMMIT_DELAY_ENV): a kill aimed at the crash window."""

    after_commit_delay_ms: int = 0
    commit_marker: Path | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> CrashHooks:
        delay = environ.get(AFTER_COMMIT_DELAY_ENV, "").strip()
        marker = environ.get(COMMIT_MARKER_ENV, "").strip()
        return cls(int(delay) if delay else 0, Path(marker) if marker else None)

    @property
    def active(self) -> bool:
        return self.after_commit_delay_ms > 0 or self.commit_marker is not None


@dataclass(frozen=True, slots=True)
class Demo:
    """What the handlers share: the store, the bank's data, and the knobs.

    `transactional_completion` is what is in effect: asked for, and possible (the store
    shares the data's database).
    """

    store_url: str
    store: Store
    repository: Repository
    ttl: float
    latency_ms: int
    data_shares_store_database: bool
    lease: float = DEFAULT_LEASE
    transactional_completion: bool = False
    hooks: CrashHooks = CrashHooks()


def repository_for(store_url: str, store: Store) -> tuple[Repository, bool]:
    """The bank's data in the store's own database when the store is SQL (so that a
    transfer and its idempotency record can commit together), else in a SQLite file
    in the current directory. Returns the repository and whether it shares the store's
    database."""
    if isinstance(store, SQLiteStore):
        return SQLiteRepository(store.path), True
    if store.name == "postgres":
        return PostgresRepository(store_url), True
    return SQLiteRepository(Path(DEFAULT_DATA_FILE)), False


def where(url: str) -> str:
    """A network store's location without its credentials: scheme://host:port/path."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


def describe(demo: Demo) -> list[tuple[str, str]]:
    """Where the demo keeps what, for the start-up banner."""
    store, repository = demo.store, demo.repository
    if isinstance(store, SQLiteStore):
        store_line = f"SQLite file {store.path.resolve()}"
    elif store.name == "memory":
        store_line = "memory (idempotency records are lost when the demo stops)"
    else:
        store_line = f"{store.name} at {where(demo.store_url)}"
    tables = f"tables {ACCOUNTS}, {TRANSFERS}"
    if demo.data_shares_store_database:
        data_line = f"the store's own database, {tables}"
    else:
        data_line = f"{repository.description} ({tables}; the store is not SQL)"
    if demo.transactional_completion:
        completion = (
            "in the handler's transaction: the money and its idempotency record commit together"
        )
    elif demo.data_shares_store_database:
        completion = (
            "by oncely after the handler (--no-transactional-completion): a crash between "
            "the commit and the completion lets a retry run the request again"
        )
    else:
        completion = (
            f"by oncely after the handler: the {store.name} store cannot share the data's "
            "transaction, so transactional completion is off"
        )
    rows = [("store", store_line), ("data", data_line), ("completion", completion)]
    hooks = demo.hooks
    if hooks.active:
        rows.append((
            "test hooks",
            f"{AFTER_COMMIT_DELAY_ENV}={hooks.after_commit_delay_ms} "
            f"{COMMIT_MARKER_ENV}={hooks.commit_marker or ''}",
        ))  # fmt: skip
    return rows


def operator_store_url(demo: Demo) -> str:
    """The store URL for `oncely inspect/stats/purge`, valid from any directory."""
    if isinstance(demo.store, SQLiteStore):
        return "sqlite:///" + quote(str(demo.store.path.resolve()))
    return demo.store_url


# the wire format ---------------------------------------------------------------------


def iso(timestamp: float) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


Name = Annotated[str, Field(min_length=1, max_length=200)]
Money = Annotated[int, Field(strict=True, ge=0, le=MAX_AMOUNT)]
AccountId = Annotated[str, Field(min_length=1, max_length=64, examples=["acc_4f1c2a..."])]


class NewAccount(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[Name, Field(examples=["Alice"])]
    institution: Annotated[Name, Field(examples=["Kiwibank"])]
    balance: Annotated[Money, Field(description="Opening balance in minor units (cents).")]
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$", examples=["NZD"])]


class NewTransfer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    from_account: AccountId
    to_account: AccountId
    amount: Annotated[
        int, Field(strict=True, gt=0, le=MAX_AMOUNT, description="Minor units (cents).")
    ]


class AccountOut(BaseModel):
    id: str
    object: Literal["account"] = "account"
    name: str
    institution: str
    balance: int
    currency: str
    created_at: str

    @classmethod
    def of(cls, account: Account) -> AccountOut:
        return cls(
            id=account.id, name=account.name, institution=account.institution,
            balance=account.balance, currency=account.currency,
            created_at=iso(account.created_at),
        )  # fmt: skip


class TransferOut(BaseModel):
    id: str
    object: Literal["transfer"] = "transfer"
    from_account: str
    to_account: str
    amount: int
    currency: str
    created_at: str
    idempotency_key: str | None

    @classmethod
    def of(cls, transfer: Transfer) -> TransferOut:
        return cls(
            id=transfer.id, from_account=transfer.from_account,
            to_account=transfer.to_account, amount=transfer.amount,
            currency=transfer.currency, created_at=iso(transfer.created_at),
            idempotency_key=transfer.idempotency_key,
        )  # fmt: skip


class AccountList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AccountOut]


class TransferList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TransferOut]


class Problem(BaseModel):
    """RFC 9457 problem details (`application/problem+json`)."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_CONTENT_TYPE


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {
        status: {"model": Problem, "content": {PROBLEM_CONTENT_TYPE: {}}} for status in statuses
    }


# dependencies ------------------------------------------------------------------------


def get_demo(request: Request) -> Demo:
    demo: Demo = request.app.state.demo
    return demo


# Documents the scheme in the OpenAPI; BearerAuth has already refused requests without it.
bearer_scheme = HTTPBearer(
    auto_error=False,
    description="Any non-empty token. Each token is its own workspace (sk_test_..., sk_live_...).",
)


def get_workspace(
    request: Request,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> str:
    token = bearer_token(request.headers.raw)
    if token is None:  # unreachable behind BearerAuth; kept for apps that mount the router
        raise HTTPException(401, "Send 'Authorization: Bearer <token>'.")
    return workspace_scope(token)


async def simulate_latency(demo: Annotated[Demo, Depends(get_demo)]) -> None:
    """`--latency MS`: a slow bank, so that a concurrent retry meets an in-flight request."""
    if demo.latency_ms > 0:
        await asyncio.sleep(demo.latency_ms / 1000)


DemoDep = Annotated[Demo, Depends(get_demo)]
Workspace = Annotated[str, Depends(get_workspace)]
IdempotencyKeyHeader = Annotated[
    str,
    Header(
        alias="Idempotency-Key",
        description=(
            "Required on POST. One unique value per operation (a UUID), the same on every "
            "retry: the first request runs, later ones get its response back with "
            "`Idempotent-Replayed: true`."
        ),
    ),
]


def parsed_key(header: str) -> str | None:
    """The key as oncely understood it (a quoted sf-string is unquoted)."""
    try:
        return parse_key([header.encode("latin-1")])
    except (InvalidKey, UnicodeEncodeError):
        return None


# routes ------------------------------------------------------------------------------

router = APIRouter(prefix="/v1")
SLOW_BANK = [Depends(simulate_latency)]


def created(document: BaseModel, location: str) -> Response:
    """201 with `document` as JSON and a Location: the bytes FastAPI itself would send."""
    response = Response(
        document.model_dump_json().encode(), status_code=201, media_type="application/json"
    )
    response.headers["Location"] = location
    return response


def account_created(account: Account) -> Response:
    return created(AccountOut.of(account), f"/v1/accounts/{account.id}")


def transfer_created(transfer: Transfer) -> Response:
    return created(TransferOut.of(transfer), f"/v1/transfers/{transfer.id}")


class CompleteWith(Generic[T]):
    """The repository's `InTransaction` hook, as the API fills it in: after the write and
    before its commit, render the response from what was written and complete the
    idempotency record with it on the repository's own connection. The commit then
    stores the money and the response together; `response` is the object to return, so
    the client receives exactly the bytes that were stored."""

    def __init__(self, context: IdempotencyContext, render: Callable[[T], Response]) -> None:
        self.context = context
        self.render = render
        self.response: Response | None = None

    def sqlite(self, connection: sqlite3.Connection, result: T) -> bool:
        self.response = self.render(result)
        return self.context.complete_in_transaction_sync(connection, self.response)

    async def postgres(self, connection: AsyncConnection[TupleRow], result: T) -> bool:
        self.response = self.render(result)
        return await self.context.complete_in_transaction(connection, self.response)


def completion_for(
    demo: Demo, context: IdempotencyContext | None, render: Callable[[T], Response]
) -> CompleteWith[T] | None:
    """Transactional completion when it is on and oncely guards this request."""
    if context is None or not demo.transactional_completion:
        return None
    return CompleteWith(context, render)


def respond(
    completion: CompleteWith[T] | None, render: Callable[[T], Response], result: T
) -> Response:
    if completion is not None and completion.response is not None:
        return completion.response  # the very object whose bytes were stored
    return render(result)


def taken_over(context: IdempotencyContext | None) -> Response:
    """The record's lease was lost before our commit, so the write rolled back: another
    worker has taken this request over and runs it. The answer is oncely's own
    `request-in-progress` 409 with Retry-After: a retry gets that worker's response.
    oncely cannot store it (the record is no longer ours), as it never stores its own
    problems."""
    assert context is not None  # only a completion can lose the lease
    policy = context.policy
    problem = dataclasses.replace(
        oncely_problems.in_progress(policy, policy.in_flight_retry_after),
        detail=(
            "This request's Idempotency-Key was taken over by another worker while this one "
            "was finishing, so nothing was written here. Retry after the time in "
            "Retry-After to get that worker's response."
        ),
    )
    rendered = oncely_problems.render(problem, policy, context.key)
    response = Response(rendered.body, status_code=rendered.status)
    response.raw_headers = list(rendered.headers)
    return response


async def after_commit(demo: Demo, key: str | None) -> None:
    """The test hooks (AFTER_COMMIT_DELAY_ENV, COMMIT_MARKER_ENV): mark the commit, then
    hold the response back, so that a test can kill the process inside the window."""
    hooks = demo.hooks
    if hooks.commit_marker is not None:
        with hooks.commit_marker.open("a") as marker:  # a test hook: a tiny blocking write
            marker.write(f"{key}\n")
    if hooks.after_commit_delay_ms > 0:
        await asyncio.sleep(hooks.after_commit_delay_ms / 1000)


@router.post(
    "/accounts",
    status_code=201,
    response_model=AccountOut,
    dependencies=SLOW_BANK,
    responses=problem_responses(400, 401, 409, 422),
)
async def create_account(
    body: NewAccount,
    demo: DemoDep,
    workspace: Workspace,
    idempotency_key: IdempotencyKeyHeader,
    context: IdempotencyContextDep,
) -> Response:
    """Open an account with an opening balance."""
    completion = completion_for(demo, context, account_created)
    try:
        account = await demo.repository.create_account(
            workspace,
            name=body.name,
            institution=body.institution,
            balance=body.balance,
            currency=body.currency,
            in_transaction=completion,
        )
    except LeaseLost:
        return taken_over(context)
    return respond(completion, account_created, account)


@router.get("/accounts", responses=problem_responses(401))
async def list_accounts(
    demo: DemoDep, workspace: Workspace, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> AccountList:
    """The workspace's accounts, oldest first."""
    accounts = await demo.repository.list_accounts(workspace, limit)
    return AccountList(data=[AccountOut.of(account) for account in accounts])


@router.get("/accounts/{account_id}", responses=problem_responses(401, 404))
async def get_account(account_id: str, demo: DemoDep, workspace: Workspace) -> AccountOut:
    """An account with its current balance."""
    account = await demo.repository.get_account(workspace, account_id)
    if account is None:
        raise AccountNotFound(f"No account {account_id!r} in this workspace.", account=account_id)
    return AccountOut.of(account)


@router.get("/accounts/{account_id}/transfers", responses=problem_responses(401, 404))
async def list_account_transfers(
    account_id: str,
    demo: DemoDep,
    workspace: Workspace,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> TransferList:
    """Transfers from or to the account, newest first."""
    transfers = await demo.repository.list_transfers(workspace, account_id, limit)
    return TransferList(data=[TransferOut.of(transfer) for transfer in transfers])


@router.post(
    "/transfers",
    status_code=201,
    response_model=TransferOut,
    dependencies=SLOW_BANK,
    responses=problem_responses(400, 401, 404, 409, 422),
)
async def create_transfer(
    body: NewTransfer,
    demo: DemoDep,
    workspace: Workspace,
    idempotency_key: IdempotencyKeyHeader,
    context: IdempotencyContextDep,
) -> Response:
    """Move money between two accounts of one currency: debit and credit commit together,
    and with them the idempotency record holding this very response.

    404 `account-not-found`, 409 `insufficient-funds`, 422 `currency-mismatch` or
    `same-account`; like every response, they are replayed to a retry with the same key.
    """
    key = parsed_key(idempotency_key)
    completion = completion_for(demo, context, transfer_created)
    try:
        transfer = await demo.repository.transfer(
            workspace,
            from_account=body.from_account,
            to_account=body.to_account,
            amount=body.amount,
            idempotency_key=key,
            in_transaction=completion,
        )
    except LeaseLost:
        return taken_over(context)
    if demo.hooks.active:
        await after_commit(demo, key)
    return respond(completion, transfer_created, transfer)


@router.get("/transfers/{transfer_id}", responses=problem_responses(401, 404))
async def get_transfer(transfer_id: str, demo: DemoDep, workspace: Workspace) -> TransferOut:
    transfer = await demo.repository.get_transfer(workspace, transfer_id)
    if transfer is None:
        raise TransferNotFound(
            f"No transfer {transfer_id!r} in this workspace.", transfer=transfer_id
        )
    return TransferOut.of(transfer)


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    store: str


async def healthz(demo: DemoDep) -> Health:
    return Health(store=demo.store.name)


# errors as problems ------------------------------------------------------------------


async def on_demo_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, DemoError)
    document = problem_of(error)
    return ProblemResponse(document, status_code=document["status"])


HTTP_PROBLEMS = {
    401: ("unauthorized", "Unauthorized"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
}


async def on_http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    status = error.status_code
    slug, title = HTTP_PROBLEMS.get(status, (f"http-{status}", "HTTP error"))
    document = problem_document(slug, title, status, str(error.detail))
    return ProblemResponse(document, status_code=status, headers=error.headers)


async def on_validation_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestValidationError)
    errors = [
        {"location": list(item["loc"]), "message": item["msg"], "type": item["type"]}
        for item in error.errors()
    ]
    first = errors[0] if errors else {"location": [], "message": "invalid request"}
    location = ".".join(str(part) for part in first["location"])
    document = problem_document(
        "invalid-request",
        "The request does not match the schema",
        422,
        f"{location}: {first['message']}" if location else str(first["message"]),
        {"errors": errors},
    )
    return ProblemResponse(document, status_code=422)


# the app -----------------------------------------------------------------------------


async def _sweep(store: Store, interval: float) -> None:
    """Purge expired records now and then (SQL stores; Redis expires them itself)."""
    while True:
        await asyncio.sleep(interval)
        try:
            purged = await store.purge_expired()
        except StoreError as error:
            logger.warning("oncely demo: purging expired records failed: %s", error)
        else:
            if purged:
                logger.info("oncely demo: purged %d expired idempotency records", purged)


def observability(app: FastAPI) -> list[EventSubscriber]:
    """Structured logs always; Prometheus metrics at GET /metrics when prometheus-client
    is installed. /metrics is outside /v1/, so it needs no token and claims no key."""
    subscribers: list[EventSubscriber] = [LoggingSubscriber()]
    try:
        from prometheus_client import CollectorRegistry

        from oncely.instrumentation.prometheus import PrometheusSubscriber
    except ImportError:
        logger.info("/metrics is off: pip install 'oncely[prometheus]' to serve it")
        return subscribers
    metrics = PrometheusSubscriber(CollectorRegistry())  # per app: tests build several
    app.state.metrics = metrics
    app.router.routes.append(Route("/metrics", metrics.asgi_app(), include_in_schema=False))
    return [metrics, *subscribers]


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    demo: Demo = app.state.demo
    await demo.repository.open()
    sweeper = asyncio.create_task(_sweep(demo.store, app.state.sweep_interval))
    try:
        yield
    finally:
        sweeper.cancel()
        await asyncio.gather(sweeper, return_exceptions=True)
        await demo.repository.aclose()
        await demo.store.aclose()


def create_app(
    store_url: str = DEFAULT_STORE_URL,
    ttl: float = DEFAULT_TTL,
    latency_ms: int = 0,
    *,
    lease: float = DEFAULT_LEASE,
    transactional_completion: bool = True,
    sweep_interval: float = SWEEP_INTERVAL,
    docs_url: str | None = DOCS_URL,
    hooks: CrashHooks | None = None,
) -> FastAPI:
    """The demo as an ASGI app. `store_url` is any URL `oncely.stores.store_from_url`
    takes; `ttl` is the key retention in seconds; `latency_ms` slows every mutating
    handler down; `lease` is how long a claim lasts without renewal (a crashed worker's
    requests run again after it). `transactional_completion` completes records in the
    handlers' transactions where the store allows it (SQL stores). `hooks` defaults to
    the test hooks in the environment. Raises ValueError for a URL no store understands."""
    if ttl <= 0:
        raise ValueError("ttl must be positive")
    if lease <= 0:
        raise ValueError("lease must be positive")
    store = store_from_url(store_url)
    repository, shared = repository_for(store_url, store)
    app = FastAPI(
        title="oncely demo: payments",
        version=__version__,
        summary="Accounts and transfers; a retried transfer never debits twice.",
        description=(
            "Authenticate with `Authorization: Bearer <any token>` (each token is its own "
            "workspace). Every POST needs an `Idempotency-Key`. Amounts are integers in "
            "minor units. Errors are `application/problem+json` (RFC 9457)."
        ),
        openapi_url="/openapi.json",
        lifespan=lifespan,
    )
    app.state.demo = Demo(
        store_url, store, repository, float(ttl), latency_ms, shared,
        lease=float(lease),
        transactional_completion=transactional_completion and shared,
        hooks=CrashHooks.from_environment() if hooks is None else hooks,
    )  # fmt: skip
    app.state.sweep_interval = sweep_interval
    app.include_router(router)
    app.add_api_route("/healthz", healthz, methods=["GET"], tags=["health"])
    app.add_exception_handler(DemoError, on_demo_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    # Added last runs first: BearerAuth, then oncely, then the routes.
    app.add_middleware(
        IdempotencyMiddleware,
        store=store,
        retention=float(ttl),
        lease=float(lease),
        require_key=frozenset({"POST"}),
        docs_url=docs_url,
        event_subscribers=observability(app),
    )
    app.add_middleware(BearerAuth)
    return app
