"""Flask: `Oncely(app, store=...)` wraps `app.wsgi_app` in the WSGI middleware.

    from flask import Flask
    from oncely.integrations.flask import Oncely, idempotent

    app = Flask(__name__)
    Oncely(app, store="sqlite:///oncely.db")

    @app.post("/payments")
    @idempotent(required=True)
    def create_payment(): ...

Without arguments, `init_app` reads `app.config`: `ONCELY_STORE` (a store URL or a
store), `ONCELY_STORE_OPTIONS`, `ONCELY_PRESET`, `ONCELY_POLICY` (an IdempotencyPolicy or
a dict of its fields), and any policy field as `ONCELY_<FIELD>` (e.g. `ONCELY_LEASE`).

Transactional completion (SPEC §3): a view whose data lives in the store's database
completes the record on its own connection (sqlite3, or psycopg 3), inside its open
transaction, so that the data and the response commit together:

    with db:                                           # sqlite3: commits or rolls back
        db.execute("INSERT INTO transfers ...")
        response = make_response(jsonify(transfer), 201)
        if not complete_in_transaction(db, response):
            raise LeaseLost                            # rolls back; answered with a 409
    return response

With SQLAlchemy, the DB-API connection is `session.connection().connection.driver_connection`.
The context is at `request.environ["oncely.context"]` (`idempotency_context(request)`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Unpack

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import RoutingException

from oncely.context import LeaseLost, TransactionalCompletionUnsupported, idempotency_context
from oncely.core import problems
from oncely.core.policy import IdempotencyPolicy, PolicyOptions, RouteOptions
from oncely.core.records import StoredResponse
from oncely.integrations import build_policy, build_store
from oncely.markers import exempt, idempotent, marker_of
from oncely.stores.base import SyncStore
from oncely.wsgi import IdempotencyMiddleware, decode_headers, encode_headers

EXTENSION_KEY = "oncely"
_POLICY_FIELDS = frozenset(PolicyOptions.__annotations__)


class Oncely:
    """The Flask extension: `Oncely(app)` or `oncely = Oncely(); oncely.init_app(app)`."""

    def __init__(
        self,
        app: Flask | None = None,
        *,
        store: SyncStore | str | None = None,
        policy: IdempotencyPolicy | None = None,
        **options: Unpack[PolicyOptions],
    ) -> None:
        self.store = store
        self.policy = policy
        self.options: dict[str, Any] = dict(options)
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> IdempotencyMiddleware:
        config = app.config
        store = self.store if self.store is not None else config.get("ONCELY_STORE")
        if store is None:
            raise RuntimeError("oncely: give Oncely(store=...) or set ONCELY_STORE")
        store_options = config.get("ONCELY_STORE_OPTIONS") if isinstance(store, str) else None
        from_config = {
            name: config[f"ONCELY_{name.upper()}"]
            for name in _POLICY_FIELDS
            if f"ONCELY_{name.upper()}" in config
        }
        policy = build_policy(
            self.policy if self.policy is not None else config.get("ONCELY_POLICY"),
            preset=None if self.policy is not None else config.get("ONCELY_PRESET"),
            **{**from_config, **self.options},
        )
        middleware = IdempotencyMiddleware(
            app.wsgi_app,
            store=build_store(store, store_options),
            policy=policy,
            routes=FlaskRoutes(app),
        )
        app.wsgi_app = middleware  # type: ignore[method-assign]
        app.extensions[EXTENSION_KEY] = middleware
        app.register_error_handler(LeaseLost, _answer_lease_lost(app, policy))
        return middleware


def _answer_lease_lost(app: Flask, policy: IdempotencyPolicy) -> Any:
    def answer(error: LeaseLost) -> Response:
        """The view's transactional completion found the request taken over: its
        transaction rolled back. Answer 409 request-in-progress; nothing is stored."""
        context = idempotency_context(request.environ)
        if context is not None:
            context.lease_lost = True
        problem = problems.in_progress(policy, policy.in_flight_retry_after)
        rendered = problems.render(problem, policy, context.key if context else None)
        response: Response = app.response_class(
            rendered.body, status=rendered.status, headers=decode_headers(rendered.headers)
        )
        return response

    return answer


def complete_in_transaction(connection: Any, response: Response) -> bool:
    """Complete this request's record with `response` on `connection` (sqlite3 or
    psycopg 3, to the store's database), inside its open transaction: the record commits
    or rolls back with the view's writes (SPEC §3, transactional completion).

    Returns False when the lease was lost (another worker took the request over): roll
    back (raise `LeaseLost` inside the transaction). Returns True when the record was
    completed, and when oncely does not guard this request (nothing to complete).
    Raises `TransactionalCompletionUnsupported` for the memory and Redis stores.

    The record holds the headers Flask will send (`get_wsgi_headers`), so return this
    very response; `after_request` hooks that change it make the client's answer differ
    from the record (oncely logs a warning when it sees that).
    """
    environ = request.environ
    context = idempotency_context(environ)
    if context is None:
        return True
    if response.is_streamed:
        raise TypeError(
            "complete_in_transaction needs a buffered response; a streamed one is "
            "completed by the middleware, after it has been sent"
        )
    headers = encode_headers(response.get_wsgi_headers(environ).to_wsgi_list())
    stored = StoredResponse(response.status_code, tuple(headers), response.get_data())
    return context.complete_in_transaction_sync(connection, stored)


class FlaskRoutes:
    """Finds the view a request goes to, and its oncely marker, before Flask runs."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def __call__(self, environ: Mapping[str, Any]) -> RouteOptions | None:
        app = self.app
        try:
            adapter = app.create_url_adapter(app.request_class(dict(environ)))
            if adapter is None:
                return None
            endpoint, _ = adapter.match()
        except (HTTPException, RoutingException):
            return None  # no route (404, 405, a redirect): Flask answers, path rules apply
        view = app.view_functions.get(str(endpoint))
        if view is None:
            return None
        return marker_of(view) or marker_of(getattr(view, "view_class", None))


def middleware_of(app: Flask) -> IdempotencyMiddleware:
    """The middleware that `Oncely` installed on `app` (to reach its store or policy)."""
    middleware: IdempotencyMiddleware = app.extensions[EXTENSION_KEY]
    return middleware


__all__ = [
    "LeaseLost",
    "Oncely",
    "TransactionalCompletionUnsupported",
    "complete_in_transaction",
    "exempt",
    "idempotent",
    "middleware_of",
]
