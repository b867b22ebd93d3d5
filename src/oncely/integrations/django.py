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
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Mapping

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse
from django.urls import Resolver404, resolve

from oncely.core import problems
from oncely.core.exchange import Guard, PassThrough, Reject, admit, fingerprint_of
from oncely.core.policy import RouteOptions
from oncely.core.problems import RenderedResponse
from oncely.integrations import build_policy, build_store
from oncely.markers import exempt, idempotent, marker_of
from oncely.wsgi import (
    SCOPE_KEY,
    CapturedStream,
    Settlement,
    check_in,
    decode_headers,
    environ_headers,
    reject_event,
)

GetResponse = Callable[[HttpRequest], HttpResponseBase]


class IdempotencyMiddleware:
    """Runs each (tenant, Idempotency-Key) once; later requests get the first response.

    The record is claimed before the view runs and completed before the response
    leaves: at once for an `HttpResponse`, before the last chunk for a streaming one.
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
        fingerprint = fingerprint_of(policy, guard, method, path, query, body)
        checked = check_in(self.store, policy, guard, fingerprint, method)
        if checked is None:  # the store failed and the policy says fail open
            return self.get_response(request)
        if isinstance(checked, RenderedResponse):
            return to_django(checked)
        return self._execute(guard, checked, method, request)

    # the response ----------------------------------------------------------------------

    def _execute(
        self, guard: Guard, token: str, method: str, request: HttpRequest
    ) -> HttpResponseBase:
        settlement = Settlement(self.store, self.policy, guard, token, method)
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


__all__ = ["IdempotencyMiddleware", "exempt", "idempotent"]
