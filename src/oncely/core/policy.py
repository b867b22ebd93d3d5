"""Configuration (SPEC §2, §3, §6). One frozen value; presets reproduce known APIs."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal, TypedDict, Unpack

from oncely.core.events import EventSubscriber
from oncely.core.fingerprint import FingerprintFunction, default_fingerprint
from oncely.core.tenancy import DEFAULT_CREDENTIAL_HEADERS

DEFAULT_RETENTION = 24 * 60 * 60.0
DEFAULT_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

# RFC 9110 §7.6.1 hop-by-hop headers, plus Set-Cookie: a session cookie must never be
# handed to whoever retries with the same key.
HOP_BY_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
DEFAULT_DENIED_HEADERS = HOP_BY_HOP_HEADERS | {"set-cookie"}


def store_all_but_429(status: int) -> bool:
    """Default: every final status is stored (the handler may have had side effects),
    except 429: a rate-limited request did nothing."""
    return status != 429


def store_2xx_only(status: int) -> bool:
    return 200 <= status < 300


@dataclass(frozen=True, slots=True)
class RouteOptions:
    """Per-route override, set by a path pattern or a framework marker."""

    enabled: bool = True
    require_key: bool | None = None

    def over(self, by_path: RouteOptions) -> RouteOptions:
        """A framework marker wins over path patterns; an unset `require_key` falls back."""
        required = by_path.require_key if self.require_key is None else self.require_key
        return RouteOptions(enabled=self.enabled, require_key=required)


class PolicyOptions(TypedDict, total=False):
    """The policy fields as keywords, so `IdempotencyMiddleware(app, lease=10)` type-checks.

    Collections may be given as lists or sets; they are normalised.
    """

    methods: Collection[str]
    require_key: bool | Collection[str]
    include_paths: Collection[str]
    exclude_paths: Collection[str]
    required_paths: Collection[str]
    retention: float
    lease: float
    mismatch_status: Literal[409, 422]
    in_flight_status: int
    in_flight_retry_after: int
    wait_for_in_flight: float
    store_status: Callable[[int], bool]
    on_exception: Literal["store", "release"]
    allowed_headers: Collection[str] | None
    denied_headers: Collection[str]
    max_request_body: int
    max_stored_body: int
    fingerprint: FingerprintFunction | None
    credential_headers: Collection[str]
    scope_resolver: Callable[[Mapping[str, Any]], str | None] | None
    fail_open: bool
    unavailable_retry_after: int
    docs_url: str | None
    problem_type_base: str
    event_subscribers: Sequence[EventSubscriber]


@dataclass(frozen=True)
class IdempotencyPolicy:
    """How the middleware treats requests. Defaults follow the IETF draft.

    Every field can be set by keyword on the middleware as well.
    """

    methods: frozenset[str] = DEFAULT_METHODS
    # True: every honoured method needs a key; a collection: those methods need one.
    require_key: bool | frozenset[str] = False
    # Glob patterns on the path. include empty = all paths.
    include_paths: tuple[str, ...] = ()
    exclude_paths: tuple[str, ...] = ()
    required_paths: tuple[str, ...] = ()

    retention: float = DEFAULT_RETENTION
    lease: float = 30.0
    mismatch_status: Literal[409, 422] = 422
    in_flight_status: int = 409
    in_flight_retry_after: int = 1
    # Seconds to wait for an in-flight duplicate to finish and replay it (0: answer 409).
    wait_for_in_flight: float = 0.0

    store_status: Callable[[int], bool] = store_all_but_429
    on_exception: Literal["store", "release"] = "store"

    # None: store every header not denied. A set: store only these (lower case).
    allowed_headers: frozenset[str] | None = None
    denied_headers: frozenset[str] = DEFAULT_DENIED_HEADERS

    max_request_body: int = 10 * 1024 * 1024
    max_stored_body: int = 1024 * 1024

    # None: compare the key alone.
    fingerprint: FingerprintFunction | None = default_fingerprint
    credential_headers: tuple[str, ...] = DEFAULT_CREDENTIAL_HEADERS
    # A function of the ASGI scope / WSGI environ giving the tenant, or None to fall back.
    scope_resolver: Callable[[Mapping[str, Any]], str | None] | None = None

    fail_open: bool = False
    unavailable_retry_after: int = 2
    docs_url: str | None = None
    problem_type_base: str = "https://oncely.dev/problems/"
    # Called with an IdempotencyEvent at every decision (see oncely.instrumentation).
    event_subscribers: tuple[EventSubscriber, ...] = ()

    _route_cache: dict[str, RouteOptions] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _header_cache: dict[bytes, bool] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @cached_property
    def credential_header_names(self) -> frozenset[bytes]:
        return frozenset(name.lower().encode("latin-1") for name in self.credential_headers)

    @cached_property
    def has_path_patterns(self) -> bool:
        return bool(self.include_paths or self.exclude_paths or self.required_paths)

    def replace(self, **changes: Unpack[PolicyOptions]) -> IdempotencyPolicy:
        return dataclasses.replace(self, **_normalise(dict(changes)))

    def requires_key(self, method: str, route: RouteOptions) -> bool:
        if route.require_key is not None:
            return route.require_key
        if isinstance(self.require_key, bool):
            return self.require_key
        return method in self.require_key

    def route_options(self, path: str) -> RouteOptions:
        """Path-pattern options, cached per path (patterns are fixed for the policy)."""
        cached = self._route_cache.get(path)
        if cached is not None:
            return cached
        enabled = not self.include_paths or _matches(path, self.include_paths)
        if _matches(path, self.exclude_paths):
            enabled = False
        required = True if _matches(path, self.required_paths) else None
        options = RouteOptions(enabled=enabled, require_key=required)
        if len(self._route_cache) < 4096:  # bounded: paths with ids are unbounded
            self._route_cache[path] = options
        return options

    def keeps_header(self, name: bytes) -> bool:
        """Whether a response header is stored for replay (cached per header name)."""
        kept = self._header_cache.get(name)
        if kept is None:
            lowered = name.decode("latin-1").lower()
            kept = lowered not in self.denied_headers and (
                self.allowed_headers is None or lowered in self.allowed_headers
            )
            if len(self._header_cache) < 1024:  # bounded: header names come from the app
                self._header_cache[name] = kept
        return kept

    # Presets reproducing SPEC §6 by configuration alone.
    @classmethod
    def ietf(cls, **changes: Unpack[PolicyOptions]) -> IdempotencyPolicy:
        return cls().replace(**changes)

    @classmethod
    def stripe(cls, **changes: Unpack[PolicyOptions]) -> IdempotencyPolicy:
        # Stripe: POST only; mismatch is an error in the 400 class (409 here, the closest
        # to Stripe's idempotency_error); only requests that started executing are saved,
        # i.e. everything the handler answered.
        return cls(methods=frozenset({"POST"}), mismatch_status=409).replace(**changes)

    @classmethod
    def akahu(cls, **changes: Unpack[PolicyOptions]) -> IdempotencyPolicy:
        return cls(
            methods=frozenset({"POST"}), include_paths=("/payments*", "/transfers*")
        ).replace(**changes)

    @classmethod
    def aleta(cls, **changes: Unpack[PolicyOptions]) -> IdempotencyPolicy:
        return cls(mismatch_status=409).replace(**changes)

    @classmethod
    def posta(cls, **changes: Unpack[PolicyOptions]) -> IdempotencyPolicy:
        return cls(methods=frozenset({"POST", "PUT", "DELETE"})).replace(**changes)

    @classmethod
    def apiture(cls, **changes: Unpack[PolicyOptions]) -> IdempotencyPolicy:
        return cls(methods=frozenset({"POST"}), fingerprint=None).replace(**changes)


def _matches(path: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns)


def _normalise(changes: dict[str, Any]) -> dict[str, Any]:
    """Accept friendly types (lists, lower-case methods) for the set-valued fields."""
    out = dict(changes)
    if "methods" in out:
        out["methods"] = frozenset(m.upper() for m in out["methods"])
    if isinstance(out.get("require_key"), Collection) and not isinstance(out["require_key"], bool):
        out["require_key"] = frozenset(m.upper() for m in out["require_key"])
    for name in (
        "include_paths",
        "exclude_paths",
        "required_paths",
        "credential_headers",
        "event_subscribers",
    ):
        if name in out:
            out[name] = tuple(out[name])
    for name in ("allowed_headers", "denied_headers"):
        if out.get(name) is not None:
            out[name] = frozenset(h.lower() for h in out[name])
    return out
