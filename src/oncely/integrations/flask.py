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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Unpack

from flask import Flask
from werkzeug.exceptions import HTTPException
from werkzeug.routing import RoutingException

from oncely.core.policy import IdempotencyPolicy, PolicyOptions, RouteOptions
from oncely.integrations import build_policy, build_store
from oncely.markers import exempt, idempotent, marker_of
from oncely.stores.base import SyncStore
from oncely.wsgi import IdempotencyMiddleware

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
        return middleware


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


__all__ = ["Oncely", "exempt", "idempotent", "middleware_of"]
