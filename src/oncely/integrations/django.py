"""Django: a middleware configured from `settings.ONCELY`, and per-view decorators.

    MIDDLEWARE = [
        ...,
        "django.contrib.auth.middleware.AuthenticationMiddleware",  # above oncely
        "oncely.integrations.django.IdempotencyMiddleware",
        ...,
    ]
    ONCELY = {
        "STORE": "sqlite:///oncely.db",   # a store URL, or a store object
        "STORE_OPTIONS": {},              # keywords for the store made from the URL
        "PRESET": "stripe",               # optional: a SPEC §6 preset
        "POLICY": {"lease": 30},          # IdempotencyPolicy fields (or a policy object)
    }

The scope (tenant) of a key is, in this order: `request.META["oncely.scope"]` set by an
outer middleware; the policy's `scope_resolver` when one is configured; the
authenticated user (`request.user.pk`, so AuthenticationMiddleware must come before
this middleware); else the hashed credential headers, as everywhere in oncely.

The middleware is synchronous (a native sync path over the store's `*_sync` methods).
Under Django's ASGI handler it runs in a worker thread; ASGI deployments can also put
`oncely.asgi.IdempotencyMiddleware` around the Django ASGI application instead.

Transactional completion (SPEC §3): a view whose data lives in the store's database
(the same SQLite file, the same PostgreSQL database) completes the record on Django's
own connection, inside its `transaction.atomic()`:

    with transaction.atomic():
        transfer = Transfer.objects.create(...)
        response = JsonResponse({"id": transfer.pk}, status=201)
        if not complete_in_transaction(request, response):
            raise LeaseLost  # rolls back; the middleware answers 409, stores nothing
    return response

Each guarded request carries its `IdempotencyContext` as `request.oncely` and at
`request.META["oncely.context"]`. Views that complete in their transaction need
oncely's middleware to be the last (innermost) entry of MIDDLEWARE: a middleware below
it that changes the response would make the client's answer differ from the record
(oncely logs a warning when it sees that).
"""

from __future__ import annotations

import getpass
import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.transaction import TransactionManagementError
from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse
from django.urls import Resolver404, resolve

from oncely.context import (
    CONTEXT_KEY,
    LeaseLost,
    TransactionalCompletionUnsupported,
    idempotency_context,
)
from oncely.core import problems
from oncely.core.decisions import Claimed
from oncely.core.exchange import Guard, PassThrough, Reject, admit, replayed_fingerprints
from oncely.core.policy import RouteOptions
from oncely.core.problems import RenderedResponse
from oncely.core.records import StoredResponse
from oncely.integrations import build_policy, build_store
from oncely.markers import exempt, idempotent, marker_of
from oncely.wsgi import (
    SCOPE_KEY,
    CapturedStream,
    Settlement,
    check_in,
    decode_headers,
    environ_headers,
    new_context,
    reject_event,
)

GetResponse = Callable[[HttpRequest], HttpResponseBase]


class IdempotencyMiddleware:
    """Runs each (tenant, Idempotency-Key) once; later requests get the first response.

    The record is claimed before the view runs and completed before the response
    leaves: at once for an `HttpResponse`, before the last chunk for a streaming one;
    or by the view's own transaction (`complete_in_transaction`).
    """

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: GetResponse) -> None:
        config = getattr(settings, "ONCELY", None)
        if not isinstance(config, Mapping) or config.get("STORE") is None:
            raise ImproperlyConfigured(
                'oncely: set ONCELY = {"STORE": "sqlite:///oncely.db"} in your settings'
            )
        self.get_response = get_response
        self.store = build_store(config["STORE"], config.get("STORE_OPTIONS"))
        self.policy = build_policy(config.get("POLICY"), preset=config.get("PRESET"))
        self.replayed = replayed_fingerprints(self.policy)

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        method = request.method or "GET"
        policy = self.policy
        if method not in policy.methods:
            return self.get_response(request)
        path = request.path
        admission = admit(
            policy,
            method,
            path,
            environ_headers(request.META),
            route=self._route_options(request, path),
            environment=request.META,
            app_scope=self._app_scope(request),
        )
        if isinstance(admission, PassThrough):
            return self.get_response(request)
        if isinstance(admission, Reject):
            reject_event(policy, self.store, method, admission.problem.status)
            return to_django(problems.render(admission.problem, policy, admission.key))
        return self._guard(admission, method, path, request)

    # the request -----------------------------------------------------------------------

    def _route_options(self, request: HttpRequest, path: str) -> RouteOptions:
        by_path = self.policy.route_options(path)
        try:
            match = resolve(request.path_info, getattr(request, "urlconf", None))
        except Resolver404:
            return by_path
        view = match.func
        marker = (
            marker_of(view)
            or marker_of(getattr(view, "view_class", None))  # class-based views
            or marker_of(getattr(view, "cls", None))  # Django REST framework views
        )
        return by_path if marker is None else marker.over(by_path)

    def _app_scope(self, request: HttpRequest) -> str | None:
        explicit = request.META.get(SCOPE_KEY)
        if explicit is not None:
            return str(explicit)
        if self.policy.scope_resolver is not None:
            return None  # admit() asks the configured resolver
        user = getattr(request, "user", None)
        if user is not None and getattr(user, "is_authenticated", False):
            return f"user:{user.pk}"
        return None

    def _read_body(self, request: HttpRequest) -> bytes | None:
        limit = self.policy.max_request_body
        try:
            declared = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            declared = 0
        if declared > limit:
            return None
        body = request.body  # cached by Django: the view reads it (or POST) again
        return body if len(body) <= limit else None

    def _guard(
        self, guard: Guard, method: str, path: str, request: HttpRequest
    ) -> HttpResponseBase:
        policy = self.policy
        body = self._read_body(request)
        if body is None:
            reject_event(policy, self.store, method, 413)
            return to_django(problems.render(problems.body_too_large(policy), policy, guard.key))
        query = request.META.get("QUERY_STRING", "").encode("latin-1", "replace")
        checked = check_in(self.store, policy, self.replayed, guard, method, path, query, body)
        if checked is None:  # the store failed and the policy says fail open
            return self.get_response(request)
        if isinstance(checked, RenderedResponse):
            return to_django(checked)
        return self._execute(guard, checked, method, request)

    # the response ----------------------------------------------------------------------

    def _execute(
        self, guard: Guard, claimed: Claimed, method: str, request: HttpRequest
    ) -> HttpResponseBase:
        context = new_context(self.store, self.policy, guard, claimed)
        request.META[CONTEXT_KEY] = context
        setattr(request, "oncely", context)  # noqa: B010 - HttpRequest declares no such field
        settlement = Settlement(self.store, self.policy, guard, context, method)
        try:
            # Django turns a view's exception into a 500 response below this point;
            # one only reaches here with DEBUG_PROPAGATE_EXCEPTIONS.
            response = self.get_response(request)
        except Exception:
            settlement.fail()
            raise
        settlement.capture.start(response.status_code, response_headers(response))
        if isinstance(response, StreamingHttpResponse):
            _capture_stream(response, settlement)
        else:
            if isinstance(response, HttpResponse):
                settlement.capture.body(response.content)
            settlement.settle_captured()
        return response

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        """A view raised `LeaseLost`: its transaction rolled back, the request belongs to
        the worker that took it over. Answer 409 request-in-progress; nothing is stored."""
        if not isinstance(exception, LeaseLost):
            return None
        context = idempotency_context(request)
        if context is not None:
            context.lease_lost = True
        policy = self.policy
        problem = problems.in_progress(policy, policy.in_flight_retry_after)
        return to_django(problems.render(problem, policy, context.key if context else None))


# transactional completion ---------------------------------------------------------------


def complete_in_transaction(
    request: HttpRequest, response: HttpResponse, using: str = DEFAULT_DB_ALIAS
) -> bool:
    """Complete the request's record with `response` on Django's connection `using`,
    inside the open `transaction.atomic(using=using)` block: the record commits or rolls
    back with the view's writes (SPEC §3, transactional completion).

    Returns False when the lease was lost (another worker took the request over): then
    raise `LeaseLost` inside the atomic block, so that it rolls back. Returns True when
    the record was completed, and when oncely does not guard this request (nothing to
    complete). Raises `TransactionalCompletionUnsupported` when the store is not on this
    database (memory, Redis, another SQLite file or PostgreSQL database).
    """
    context = idempotency_context(request)
    if context is None:
        return True
    if not isinstance(response, HttpResponse):
        raise TypeError(
            "complete_in_transaction needs a rendered HttpResponse; a streaming response "
            "is completed by the middleware, after it has been sent"
        )
    connection = connections[using]
    if not connection.in_atomic_block:
        raise TransactionManagementError(
            f"oncely: call complete_in_transaction inside transaction.atomic(using={using!r})"
        )
    connection.validate_no_broken_transaction()
    raw = shared_connection(context.store, connection)
    stored = StoredResponse(
        response.status_code, tuple(response_headers(response)), response.content
    )
    return context.complete_in_transaction_sync(raw, stored)


def shared_connection(store: Any, connection: BaseDatabaseWrapper) -> Any:
    """The DB-API connection under Django's `connection`, once it is certain to reach the
    store's database (its SQLite file, its PostgreSQL database on the same server)."""
    name = getattr(store, "name", type(store).__name__)
    if getattr(store, "complete_in_transaction_sync", None) is None:
        raise TransactionalCompletionUnsupported(
            f"the {name} store cannot complete inside Django's transaction; use SQLiteStore "
            "or PostgresStore on the database of DATABASES"
        )
    alias, vendor = connection.alias, connection.vendor
    connection.ensure_connection()
    raw = connection.connection
    if vendor == "sqlite" and name == "sqlite":
        _check_same_file(store, connection)
        return raw
    if vendor == "postgresql" and name == "postgres":
        import psycopg

        if not isinstance(raw, psycopg.Connection):
            raise TransactionalCompletionUnsupported(
                f"Django's database {alias!r} uses psycopg2; transactional completion needs "
                "psycopg 3 (pip install 'psycopg[binary]')"
            )
        _check_same_postgres(store, connection, raw)
        return raw
    raise TransactionalCompletionUnsupported(
        f"Django's database {alias!r} is {vendor}, the store is {name}: transactional "
        "completion needs the store on the same database"
    )


def _check_same_file(store: Any, connection: BaseDatabaseWrapper) -> None:
    name = str(connection.settings_dict["NAME"])
    in_memory = name == ":memory:" or "mode=memory" in name
    if name.startswith("file:"):  # a URI filename (Django opens SQLite with uri=True)
        name = unquote(urlsplit(name).path)
    ours = os.path.realpath(str(store.path))
    theirs = os.path.realpath(name)
    same = not in_memory and (
        ours == theirs
        or (os.path.exists(ours) and os.path.exists(theirs) and os.path.samefile(ours, theirs))
    )
    if not same:
        raise TransactionalCompletionUnsupported(
            f"Django's database {connection.alias!r} is the SQLite file {theirs}, the store's "
            f"is {ours}: transactional completion needs the same file"
        )


_LOCAL_HOSTS = frozenset({"", "localhost", "127.0.0.1", "::1"})


def _check_same_postgres(store: Any, connection: BaseDatabaseWrapper, raw: Any) -> None:
    """Compare what Django's connection reached (dbname, host, port) with the store's
    conninfo, libpq defaults filled in. Loopback names and local sockets count as one
    host: this guards against a configuration mistake, not an adversary."""
    from psycopg.conninfo import conninfo_to_dict

    info = raw.info
    theirs = (str(info.dbname), _host(str(info.host)), str(info.port))
    params: dict[str, Any] = dict(conninfo_to_dict(_store_conninfo(store)))
    user = params.get("user") or os.environ.get("PGUSER") or getpass.getuser()
    dbname = str(params.get("dbname") or os.environ.get("PGDATABASE") or user)
    port = str(params.get("port") or os.environ.get("PGPORT") or "5432")
    hosts = str(params.get("host") or os.environ.get("PGHOST") or "").split(",")
    ports = port.split(",")
    candidates = {
        (dbname, _host(host), ports[index] if index < len(ports) else ports[-1])
        for index, host in enumerate(hosts)
    }
    if theirs not in candidates:
        ours = ", ".join(f"{d} on {h}:{p}" for d, h, p in sorted(candidates))
        raise TransactionalCompletionUnsupported(
            f"Django's database {connection.alias!r} is {theirs[0]} on {theirs[1]}:{theirs[2]}, "
            f"the store's is {ours}: transactional completion needs the same database"
        )


def _store_conninfo(store: Any) -> str:
    conninfo = getattr(store, "conninfo", None)
    if not isinstance(conninfo, str):
        raise TransactionalCompletionUnsupported("oncely: the store's conninfo is unknown")
    return conninfo


def _host(host: str) -> str:
    return "localhost" if host in _LOCAL_HOSTS or host.startswith("/") else host.lower()


def _capture_stream(response: StreamingHttpResponse, settlement: Settlement) -> None:
    """Replace the streaming content with a CapturedStream: it completes the record
    before the last chunk, and finishes it when the client leaves early."""
    content = response.streaming_content
    # An async iterator is collected first, as Django itself does under WSGI.
    chunks: Iterable[bytes] = _collect(content) if isinstance(content, AsyncIterator) else content
    stream = CapturedStream(settlement, chunks)
    # FileResponse: a stream without read() also turns off wsgi.file_wrapper, which
    # would bypass the capture.
    response.streaming_content = stream
    django_close = response.close

    def close() -> None:
        # Before Django's own closers, which would close the source before the drain.
        try:
            stream.close()
        finally:
            django_close()

    response.close = close  # type: ignore[method-assign]


def _collect(chunks: AsyncIterator[bytes]) -> list[bytes]:
    from asgiref.sync import async_to_sync

    async def collect(source: AsyncIterator[bytes]) -> list[bytes]:
        return [chunk async for chunk in source]

    collected: list[bytes] = async_to_sync(collect)(chunks)
    return collected


def response_headers(response: HttpResponseBase) -> list[tuple[bytes, bytes]]:
    """The headers Django's WSGI handler sends for `response`, cookies included."""
    items = [*response.items()]
    items += [("Set-Cookie", cookie.output(header="")) for cookie in response.cookies.values()]
    return [
        (name.encode("latin-1", "replace"), value.encode("latin-1", "replace"))
        for name, value in items
    ]


def to_django(rendered: RenderedResponse) -> HttpResponse:
    """A stored or rendered response as an HttpResponse, headers in order.

    Django holds one value per header name: repeated headers (never produced by a
    Django view, apart from cookies) are joined with ", " as RFC 9110 §5.3 allows.
    """
    response = HttpResponse(rendered.body, status=rendered.status)
    del response["Content-Type"]  # HttpResponse's default; the stored headers decide
    for name, value in decode_headers(rendered.headers):
        if name.lower() == "set-cookie":
            response.cookies.load(value)
        elif name in response:
            response[name] = f"{response[name]}, {value}"
        else:
            response[name] = value
    return response


__all__ = [
    "IdempotencyMiddleware",
    "LeaseLost",
    "TransactionalCompletionUnsupported",
    "complete_in_transaction",
    "exempt",
    "idempotent",
]
