"""Transactional completion on the WSGI path (SPEC §3): a plain WSGI app, a Flask app and
a Django view complete the record in their own transaction on the store's database, so
data and response commit or vanish together; the middleware then writes nothing."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from oncely import idempotency_context
from oncely.context import CONTEXT_KEY, IdempotencyContext, TransactionalCompletionUnsupported
from oncely.core.events import EventKind
from oncely.core.records import RecordState, StoredResponse
from oncely.stores import MemoryStore, SQLiteStore
from oncely.wsgi import encode_headers, lease_keeper
from tests.adapters.test_asgi_events import Recorder
from tests.adapters.test_wsgi_middleware import ANON, Result, call, guarded

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

LOST_LEASE_LOG = "lease lost"


class CountingStore(SQLiteStore):
    """A SQLite store that remembers what its own (middleware) completions did."""

    def __init__(self, path: Path, **options: Any) -> None:
        super().__init__(path, **options)
        self.completions: list[bool] = []

    def complete_sync(self, scope: str, key: str, token: str, response: StoredResponse) -> bool:
        done = super().complete_sync(scope, key, token, response)
        self.completions.append(done)
        return done


def new_store(tmp_path: Path) -> CountingStore:
    store = CountingStore(tmp_path / "app.db")
    with store.connect() as db:
        db.execute("CREATE TABLE IF NOT EXISTS transfers (id INTEGER PRIMARY KEY, key TEXT)")
    return store


def rows(store: SQLiteStore) -> list[tuple[Any, ...]]:
    db = store.connect()
    try:
        return db.execute("SELECT id, key FROM transfers ORDER BY id").fetchall()
    finally:
        db.close()


def take_over(context: IdempotencyContext) -> None:
    """Another worker takes the request over (its lease lapsed)."""
    store = context.store
    store.release_sync(context.scope, context.key, context.token)
    store.claim_sync(context.scope, context.key, "", "other", lease=60, retention=60)


def comparable(result: Result) -> tuple[int, list[tuple[str, str]], bytes]:
    volatile = {"set-cookie", "idempotent-replayed"}
    headers = [(k.lower(), v) for k, v in result.headers if k.lower() not in volatile]
    return result.status, headers, result.body


# a plain WSGI app ------------------------------------------------------------------------


def transfers_app(
    store: SQLiteStore,
    *,
    mode: str = "commit",
    then_sleep: float = 0.0,
    outcomes: list[bool] | None = None,
) -> Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]]:
    """Inserts a transfer and completes the record in the same sqlite3 transaction.

    `mode`: "commit"; "rollback" (roll back after completing, answer 503); "lost"
    (another worker takes over first); "other-body" (commit, then send another body).
    """

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        context = idempotency_context(environ)
        assert context is not None
        assert environ[CONTEXT_KEY] is context
        if mode == "lost":
            take_over(context)
        db = store.connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            cursor = db.execute("INSERT INTO transfers (key) VALUES (?)", (context.key,))
            body = json.dumps({"id": cursor.lastrowid}).encode()
            headers = [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Set-Cookie", "session=1"),
                ("X-Transfer", str(cursor.lastrowid)),
            ]
            stored = StoredResponse(201, tuple(encode_headers(headers)), body)
            done = context.complete_in_transaction_sync(db, stored)
            if outcomes is not None:
                outcomes.append(done)
            if not done or mode == "rollback":
                db.execute("ROLLBACK")
                start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
                return [b"rolled back"]
            db.execute("COMMIT")
        finally:
            db.close()
        if then_sleep:
            time.sleep(then_sleep)
        if mode == "other-body":
            body = b'{"changed": true}'
            headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        start_response("201 Created", headers)
        return [body]

    return app


def test_completed_in_the_apps_transaction_and_replayed_byte_for_byte(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    recorder = Recorder()
    middleware = guarded(transfers_app(store), store, event_subscribers=[recorder])
    first = call(middleware, path="/transfers", key="t1")
    assert first.status == 201
    assert store.completions == [False]  # the middleware found it complete: no second write
    record = store.get_sync(ANON, "t1")
    assert record is not None
    assert record.state is RecordState.COMPLETED
    replay = call(middleware, path="/transfers", key="t1")
    assert replay.header("idempotent-replayed") == "true"
    assert replay.header("set-cookie") is None  # not stored, as the middleware would do
    assert comparable(replay) == comparable(first)
    assert rows(store) == [(1, "t1")]
    assert recorder.kinds() == [EventKind.CLAIMED, EventKind.STORED, EventKind.REPLAYED]
    store.close()


def test_a_slow_app_after_its_commit_reports_no_lost_lease(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The keeper's renewal is refused once the record is complete: nothing was lost."""
    store = new_store(tmp_path)
    recorder = Recorder()
    app = transfers_app(store, then_sleep=0.6)
    middleware = guarded(app, store, lease=0.3, event_subscribers=[recorder])
    renewals = lease_keeper().renewals
    with caplog.at_level(logging.WARNING, logger="oncely"):
        first = call(middleware, path="/transfers", key="slow")
    assert first.status == 201
    assert lease_keeper().renewals > renewals  # a renewal was tried, and refused
    assert recorder.kinds() == [EventKind.CLAIMED, EventKind.STORED]
    assert not [r for r in caplog.records if LOST_LEASE_LOG in r.getMessage()]
    replay = call(middleware, path="/transfers", key="slow")
    assert comparable(replay) == comparable(first)
    assert rows(store) == [(1, "slow")]
    store.close()


def test_a_rolled_back_transaction_leaves_the_completion_to_the_middleware(
    tmp_path: Path,
) -> None:
    store = new_store(tmp_path)
    middleware = guarded(transfers_app(store, mode="rollback"), store)
    first = call(middleware, path="/transfers", key="t1")
    assert first.status == 503
    assert rows(store) == []
    assert store.completions == [True]  # the middleware stored what was sent
    record = store.get_sync(ANON, "t1")
    assert record is not None
    assert record.response is not None
    assert (record.response.status, record.response.body) == (503, b"rolled back")
    store.close()


def test_a_lost_lease_refuses_the_completion_and_nothing_is_stored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = new_store(tmp_path)
    recorder = Recorder()
    outcomes: list[bool] = []
    app = transfers_app(store, mode="lost", outcomes=outcomes)
    middleware = guarded(app, store, event_subscribers=[recorder])
    with caplog.at_level(logging.WARNING, logger="oncely"):
        assert call(middleware, path="/transfers", key="t1").status == 503
    assert outcomes == [False]
    assert store.completions == []  # the record is the other worker's: not even tried
    record = store.get_sync(ANON, "t1")
    assert record is not None
    assert (record.token, record.state) == ("other", RecordState.IN_FLIGHT)
    assert rows(store) == []
    assert recorder.kinds() == [EventKind.CLAIMED, EventKind.LEASE_LOST]
    assert [r for r in caplog.records if LOST_LEASE_LOG in r.getMessage()]
    store.close()


def test_a_response_changed_after_the_commit_is_logged_and_the_record_wins(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = new_store(tmp_path)
    middleware = guarded(transfers_app(store, mode="other-body"), store)
    with caplog.at_level(logging.WARNING, logger="oncely"):
        sent = call(middleware, path="/transfers", key="t1")
    assert sent.body == b'{"changed": true}'
    assert [r for r in caplog.records if "differs" in r.getMessage()]
    replay = call(middleware, path="/transfers", key="t1")
    assert replay.body == b'{"id": 1}'  # what the transaction stored
    store.close()


def test_contexts_only_for_guarded_requests_that_run() -> None:
    seen: list[object] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        seen.append(idempotency_context(environ))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    middleware = guarded(app, MemoryStore())
    call(middleware, path="/x")
    call(middleware, path="/x", key="k")
    call(middleware, path="/x", key="k")  # a replay: the app does not run
    assert seen[0] is None
    assert len(seen) == 2
    context = seen[1]
    assert isinstance(context, IdempotencyContext)
    assert (context.key, context.scope, context.attempt, context.took_over) == (
        "k",
        ANON,
        1,
        False,
    )


# Flask -----------------------------------------------------------------------------------


def flask_transfers(store: Any, *, mode: str = "commit", **options: Any) -> Any:
    from flask import Flask, jsonify, make_response, request

    from oncely.integrations.flask import LeaseLost, Oncely, complete_in_transaction

    app = Flask(__name__)
    Oncely(app, store=store, **options)

    @app.post("/transfers")
    def transfer() -> Any:
        context = idempotency_context(request)
        if mode == "lost" and context is not None:
            take_over(context)
        db = store.connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                cursor = db.execute(
                    "INSERT INTO transfers (key) VALUES (?)",
                    (request.headers.get("Idempotency-Key"),),
                )
                response = make_response(jsonify(id=cursor.lastrowid), 201)
                response.headers["X-Transfer"] = str(cursor.lastrowid)
                response.set_cookie("session", "secret")
                if not complete_in_transaction(db, response):
                    raise LeaseLost
                if mode == "rollback":
                    db.execute("ROLLBACK")
                    return jsonify(error="rolled back"), 503
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        finally:
            db.close()
        return response

    return app


def flask_comparable(response: Any) -> tuple[int, list[tuple[str, str]], bytes]:
    volatile = {"set-cookie", "idempotent-replayed"}
    headers = [(k.lower(), v) for k, v in response.headers.items() if k.lower() not in volatile]
    return response.status_code, headers, response.get_data()


def test_flask_view_completes_in_its_transaction(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    recorder = Recorder()
    client = flask_transfers(store, event_subscribers=[recorder]).test_client()
    first = client.post("/transfers", headers={"Idempotency-Key": "f1"})
    assert first.status_code == 201
    assert "set-cookie" in first.headers
    assert store.completions == [False]
    replay = client.post("/transfers", headers={"Idempotency-Key": "f1"})
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert flask_comparable(replay) == flask_comparable(first)
    assert rows(store) == [(1, "f1")]
    assert recorder.kinds() == [EventKind.CLAIMED, EventKind.STORED, EventKind.REPLAYED]
    # Without a key the view runs unguarded: there is nothing to complete.
    assert client.post("/transfers").status_code == 201
    assert rows(store) == [(1, "f1"), (2, None)]
    store.close()


def test_flask_rollback_and_lost_lease(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    client = flask_transfers(store, mode="rollback").test_client()
    assert client.post("/transfers", headers={"Idempotency-Key": "r"}).status_code == 503
    assert store.completions == [True]
    assert client.post("/transfers", headers={"Idempotency-Key": "r"}).status_code == 503

    recorder = Recorder()
    client = flask_transfers(store, mode="lost", event_subscribers=[recorder]).test_client()
    lost = client.post("/transfers", headers={"Idempotency-Key": "l"})
    assert lost.status_code == 409
    assert lost.json is not None
    assert lost.json["type"].endswith("request-in-progress")
    assert lost.headers["Retry-After"] == "1"
    record = store.get_sync(ANON, "l")
    assert record is not None
    assert (record.token, record.state) == ("other", RecordState.IN_FLIGHT)
    assert rows(store) == []
    assert recorder.kinds() == [EventKind.CLAIMED, EventKind.LEASE_LOST]
    store.close()


def test_flask_memory_store_cannot_complete_in_a_transaction(tmp_path: Path) -> None:
    from flask import Flask, request

    from oncely.integrations.flask import Oncely, complete_in_transaction

    app = Flask(__name__)
    Oncely(app, store=MemoryStore())
    raised: list[type[BaseException]] = []

    @app.post("/x")
    def view() -> Any:
        db = sqlite3.connect(tmp_path / "other.db")
        response = app.make_response(("ok", 200))
        try:
            complete_in_transaction(db, response)
        except TransactionalCompletionUnsupported as error:
            raised.append(type(error))
        finally:
            db.close()
        assert idempotency_context(request.environ) is not None
        return response

    assert app.test_client().post("/x", headers={"Idempotency-Key": "k"}).status_code == 200
    assert raised == [TransactionalCompletionUnsupported]


# Django ----------------------------------------------------------------------------------

DB_ALIAS = "oncely_tx"
STATE: dict[str, Any] = {}


def _django_views() -> list[Any]:
    from django.db import connections, transaction
    from django.http import HttpRequest, HttpResponse, JsonResponse
    from django.urls import path

    from oncely.integrations.django import LeaseLost, complete_in_transaction

    def transfers(request: HttpRequest) -> HttpResponse:
        context = getattr(request, "oncely", None)
        assert context is idempotency_context(request)
        mode = STATE.get("mode", "commit")
        if mode == "lost" and context is not None:
            take_over(context)
        with transaction.atomic(using=DB_ALIAS):
            with connections[DB_ALIAS].cursor() as cursor:
                cursor.execute(
                    "INSERT INTO transfers (key) VALUES (%s)",
                    [request.headers.get("Idempotency-Key")],
                )
                row_id = cursor.lastrowid
            response = JsonResponse({"id": row_id}, status=201)
            response["X-Transfer"] = str(row_id)
            try:
                done = complete_in_transaction(request, response, using=DB_ALIAS)
            except TransactionalCompletionUnsupported as error:
                STATE["refused"] = str(error)
                raise
            if not done:
                raise LeaseLost
        return response

    return [path("transfers", transfers)]


class ChangeAfterwardsMiddleware:
    """Below oncely: adds a header after the view completed the record."""

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        response = self.get_response(request)
        if STATE.get("change"):
            response["X-Added-Later"] = "1"
        return response


urlpatterns: list[Any] = []


@pytest.fixture
def django_db(tmp_path: Path) -> Iterator[tuple[Any, CountingStore, Path]]:
    """A Django WSGI handler whose connection `oncely_tx` is the store's SQLite file."""
    import django
    from django.conf import settings
    from django.core.handlers.wsgi import WSGIHandler
    from django.db import connections
    from django.db.backends.sqlite3.base import DatabaseWrapper
    from django.test.utils import override_settings

    if not settings.configured:
        settings.configure(SECRET_KEY="tests", ALLOWED_HOSTS=["*"], INSTALLED_APPS=[])
        django.setup()
    if not urlpatterns:
        urlpatterns.extend(_django_views())
    store = new_store(tmp_path)
    database = {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(tmp_path / "app.db"),
        "OPTIONS": {"transaction_mode": "IMMEDIATE"},
    }
    filled = connections.configure_settings(
        {"default": {"ENGINE": "django.db.backends.dummy"}, DB_ALIAS: database}
    )
    connections[DB_ALIAS] = DatabaseWrapper(filled[DB_ALIAS], DB_ALIAS)
    STATE.clear()
    try:
        with override_settings(
            ROOT_URLCONF=__name__,
            DEBUG=False,
            MIDDLEWARE=[
                "oncely.integrations.django.IdempotencyMiddleware",
                f"{__name__}.ChangeAfterwardsMiddleware",
            ],
            ONCELY={"STORE": store, "POLICY": {"lease": 5}},
        ):
            yield WSGIHandler(), store, tmp_path
    finally:
        connections[DB_ALIAS].close()
        del connections[DB_ALIAS]
        store.close()


def test_django_view_completes_in_its_atomic_block(
    django_db: tuple[Any, CountingStore, Path], caplog: pytest.LogCaptureFixture
) -> None:
    handler, store, _ = django_db
    with caplog.at_level(logging.WARNING, logger="oncely"):
        first = call(handler, path="/transfers", key="d1")
        replay = call(handler, path="/transfers", key="d1")
    assert first.status == 201
    assert store.completions == [False]
    assert replay.header("idempotent-replayed") == "true"
    assert comparable(replay) == comparable(first)
    assert rows(store) == [(1, "d1")]
    assert not caplog.records


def test_django_lease_lost_is_a_409_and_stores_nothing(
    django_db: tuple[Any, CountingStore, Path],
) -> None:
    handler, store, _ = django_db
    STATE["mode"] = "lost"
    lost = call(handler, path="/transfers", key="d1")
    assert lost.status == 409
    assert lost.json()["type"].endswith("request-in-progress")
    assert lost.header("retry-after") == "1"
    record = store.get_sync(ANON, "d1")
    assert record is not None
    assert (record.token, record.state) == ("other", RecordState.IN_FLIGHT)
    assert rows(store) == []  # the atomic block rolled back


def test_django_middleware_below_oncely_changing_the_response_is_logged(
    django_db: tuple[Any, CountingStore, Path], caplog: pytest.LogCaptureFixture
) -> None:
    handler, _, _ = django_db
    STATE["change"] = True
    with caplog.at_level(logging.WARNING, logger="oncely"):
        first = call(handler, path="/transfers", key="d1")
    assert first.header("x-added-later") == "1"
    assert [r for r in caplog.records if "innermost" in r.getMessage()]
    replay = call(handler, path="/transfers", key="d1")
    assert replay.header("x-added-later") is None  # the record is what the view stored
    assert replay.body == first.body


def test_django_refuses_a_store_on_another_database(
    django_db: tuple[Any, CountingStore, Path],
) -> None:
    from django.test.utils import override_settings

    _, store, tmp_path = django_db
    other = SQLiteStore(tmp_path / "other.db")
    for refused_store, says in ((other, "other.db"), (MemoryStore(), "memory store")):
        STATE.pop("refused", None)
        with override_settings(ONCELY={"STORE": refused_store}):
            from django.core.handlers.wsgi import WSGIHandler

            answer = call(WSGIHandler(), path="/transfers", key="k")
        assert answer.status == 500
        assert says in STATE["refused"]
    other.close()
    assert rows(store) == []


@pytest.mark.services
def test_django_refuses_another_postgres_database(tmp_path: Path) -> None:
    """The check compares what Django's connection reached with the store's conninfo."""
    import django
    from django.conf import settings
    from django.db import connections
    from django.db.backends.postgresql.base import DatabaseWrapper

    from oncely.integrations.django import shared_connection
    from oncely.stores.postgres import PostgresStore
    from tests.support.postgres_fixtures import postgres_reachable
    from tests.support.services import POSTGRES_URL, service_missing

    reason = postgres_reachable(POSTGRES_URL)
    if reason is not None:
        service_missing("postgres", reason)
    if not settings.configured:
        settings.configure(SECRET_KEY="tests", ALLOWED_HOSTS=["*"], INSTALLED_APPS=[])
        django.setup()
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(POSTGRES_URL)
    database = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": params.get("dbname", "test"),
        "USER": params.get("user", "postgres"),
        "HOST": "localhost" if params.get("host") == "127.0.0.1" else params.get("host", ""),
        "PORT": str(params.get("port", "5432")),
    }
    filled = connections.configure_settings(
        {"default": {"ENGINE": "django.db.backends.dummy"}, "pg": database}
    )
    connection = DatabaseWrapper(filled["pg"], "pg")
    same = PostgresStore(POSTGRES_URL)
    other_db = PostgresStore(POSTGRES_URL.rsplit("/", 1)[0] + "/postgres")
    other_port = PostgresStore(POSTGRES_URL.replace(f":{params.get('port', 5432)}/", ":1/"))
    try:
        assert shared_connection(same, connection) is connection.connection
        for store in (other_db, other_port):
            with pytest.raises(TransactionalCompletionUnsupported, match="same database"):
                shared_connection(store, connection)
        with pytest.raises(TransactionalCompletionUnsupported, match="postgresql"):
            shared_connection(SQLiteStore(tmp_path / "x.db"), connection)
    finally:
        connection.close()
