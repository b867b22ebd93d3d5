"""Per-route markers (SPEC §2): opt a framework route in or out, or require the key."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from oncely.core.policy import RouteOptions

F = TypeVar("F", bound=Callable[..., Any])
MARKER_ATTRIBUTE = "__oncely_route__"


def idempotent(*, required: bool | None = None) -> Callable[[F], F]:
    """Guard this endpoint; `required=True` answers 400 to a request without a key."""
    return _mark(RouteOptions(enabled=True, require_key=required))


def exempt(endpoint: F) -> F:
    """Never guard this endpoint, whatever the path patterns say."""
    return _mark(RouteOptions(enabled=False))(endpoint)


def _mark(options: RouteOptions) -> Callable[[F], F]:
    def decorate(endpoint: F) -> F:
        setattr(endpoint, MARKER_ATTRIBUTE, options)
        return endpoint

    return decorate


def marker_of(endpoint: object) -> RouteOptions | None:
    options = getattr(endpoint, MARKER_ATTRIBUTE, None)
    return options if isinstance(options, RouteOptions) else None
