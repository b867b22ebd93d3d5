"""Prometheus metrics from oncely events (`pip install 'oncely[prometheus]'`).

    metrics = PrometheusSubscriber()
    app.add_middleware(IdempotencyMiddleware, store=store, event_subscribers=[metrics])
    app.router.routes.append(Route("/metrics", metrics.asgi_app(), include_in_schema=False))

Metrics (namespace "oncely" by default):

- `oncely_requests_total{outcome, method, route, store}`: once per request that oncely
  decided on; `outcome` is the `EventKind` value (claimed, took-over, replayed,
  in-progress, mismatch, too-large, store-error, rejected).
- `oncely_completions_total{result, status_class}`: once per executed request; `result`
  is stored, released, lease-lost or store-error.
- `oncely_store_operation_seconds{operation, store}`: claim and complete latency.
- `oncely_handler_seconds{route}`: how long the handler ran.
- `oncely_in_flight{store}`: claims held by this process right now.
- `oncely_client_retries_total{reason}`: retries of the oncely client.

`route` is the framework's route template, or "unmatched": never the raw path, whose
ids would make a series per request.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TypeAlias, TypeVar, cast

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import make_asgi_app as _make_asgi_app

from oncely.asgi import ASGIApp, Receive, Scope, Send
from oncely.core.events import EventKind, IdempotencyEvent
from oncely.instrumentation._phase import STATUS_CLASSES, Phase, phase_of, status_class

__all__ = [
    "COMPLETION_RESULTS",
    "HANDLER_BUCKETS",
    "STORE_BUCKETS",
    "UNMATCHED",
    "MetricsApp",
    "PrometheusSubscriber",
    "make_metrics_app",
]

UNMATCHED = "unmatched"
COMPLETION_RESULTS = (
    EventKind.STORED.value,
    EventKind.RELEASED.value,
    EventKind.LEASE_LOST.value,
    EventKind.STORE_ERROR.value,
)
# Store round trips: sub-millisecond (memory, SQLite) to a slow network store.
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
HANDLER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_HOLDS_CLAIM = frozenset({EventKind.CLAIMED, EventKind.TOOK_OVER})
_CACHE_LIMIT = 10_000

_K = TypeVar("_K")
_V = TypeVar("_V")
_DecisionKey: TypeAlias = tuple[EventKind, str, str | None, str | None]
_DecisionChildren: TypeAlias = tuple[Counter, Histogram, Gauge | None]
_CompletionKey: TypeAlias = tuple[EventKind, int | None, str | None, str | None]
_CompletionChildren: TypeAlias = tuple[Counter, Histogram, Histogram, Gauge]


class PrometheusSubscriber:
    """An event subscriber that keeps oncely's metrics in `registry`.

    `registry=None` uses prometheus_client's default `REGISTRY` (what `make_metrics_app()`
    serves); create one subscriber per registry, and share it between middlewares.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        namespace: str = "oncely",
        *,
        store_buckets: Sequence[float] = STORE_BUCKETS,
        handler_buckets: Sequence[float] = HANDLER_BUCKETS,
    ) -> None:
        self.registry = registry = REGISTRY if registry is None else registry
        self.requests = Counter(
            "requests",
            "Requests oncely decided on, by outcome (claimed, replayed, in-progress, ...).",
            ("outcome", "method", "route", "store"),
            namespace=namespace,
            registry=registry,
        )
        self.completions = Counter(
            "completions",
            "Executed requests by what happened to their record at completion.",
            ("result", "status_class"),
            namespace=namespace,
            registry=registry,
        )
        self.store_seconds = Histogram(
            "store_operation_seconds",
            "Latency of the store's claim and complete (or release) operations.",
            ("operation", "store"),
            buckets=store_buckets,
            namespace=namespace,
            registry=registry,
        )
        self.handler_seconds = Histogram(
            "handler_seconds",
            "Time the handler ran under a claim.",
            ("route",),
            buckets=handler_buckets,
            namespace=namespace,
            registry=registry,
        )
        self.in_flight = Gauge(
            "in_flight",
            "Claims this process holds while their handler runs.",
            ("store",),
            multiprocess_mode="livesum",
            namespace=namespace,
            registry=registry,
        )
        self.client_retries = Counter(
            "client_retries",
            "Retries made by the oncely client, by reason.",
            ("reason",),
            namespace=namespace,
            registry=registry,
        )
        # Pre-created, so that every completion series exists (as 0) from the start.
        for result in COMPLETION_RESULTS:
            for klass in STATUS_CLASSES:
                self.completions.labels(result, klass)
        # The label children an event touches, cached by the event's label values: one
        # dict lookup per event, then the library's own increments.
        self._decided: dict[_DecisionKey, _DecisionChildren] = {}
        self._completed: dict[_CompletionKey, _CompletionChildren] = {}
        self._retries: dict[str | None, Counter] = {}

    def __call__(self, event: IdempotencyEvent) -> None:
        phase = phase_of(event)
        if phase is Phase.DECISION:
            key = (event.kind, event.method, event.route, event.store)
            decided = self._decided.get(key) or self._cache(self._decided, key, self._decision)
            decided[0].inc()
            if event.duration is not None:
                decided[1].observe(event.duration)
            if decided[2] is not None:
                decided[2].inc()
        elif phase is Phase.COMPLETION:
            ckey = (event.kind, event.status, event.route, event.store)
            done = self._completed.get(ckey) or self._cache(self._completed, ckey, self._completion)
            done[0].inc()
            if event.duration is not None:
                done[1].observe(event.duration)
            if event.handler_duration is not None:
                done[2].observe(event.handler_duration)
            done[3].dec()
        elif phase is Phase.CLIENT:
            reason = event.detail
            retry = self._retries.get(reason) or self._cache(self._retries, reason, self._retry)
            retry.inc()
        # Phase.RENEWAL: the completion that follows reports lease-lost.

    def _decision(self, key: _DecisionKey) -> _DecisionChildren:
        kind, method, route, store = key
        store_label = store or "none"
        return (
            self.requests.labels(kind.value, method, route or UNMATCHED, store_label),
            self.store_seconds.labels("claim", store_label),
            self.in_flight.labels(store_label) if kind in _HOLDS_CLAIM else None,
        )

    def _completion(self, key: _CompletionKey) -> _CompletionChildren:
        kind, status, route, store = key
        store_label = store or "none"
        return (
            self.completions.labels(kind.value, status_class(status)),
            self.store_seconds.labels("complete", store_label),
            self.handler_seconds.labels(route or UNMATCHED),
            self.in_flight.labels(store_label),
        )

    def _retry(self, reason: str | None) -> Counter:
        return self.client_retries.labels(reason or "unknown")

    @staticmethod
    def _cache(cache: dict[_K, _V], key: _K, make: Callable[[_K], _V]) -> _V:
        value = make(key)
        if len(cache) < _CACHE_LIMIT:  # label values are bounded; the cache is too
            cache[key] = value
        return value

    def asgi_app(self) -> MetricsApp:
        """An ASGI app serving this subscriber's registry (see `make_metrics_app`)."""
        return make_metrics_app(self.registry)


class MetricsApp:
    """Serves a registry in the Prometheus text format. A class, not a function, so that
    Starlette's `Route("/metrics", metrics_app)` takes it for an ASGI app (a plain
    function would be taken for a request handler)."""

    __slots__ = ("_app",)

    def __init__(self, registry: CollectorRegistry) -> None:
        self._app = cast(ASGIApp, _make_asgi_app(registry))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


def make_metrics_app(registry: CollectorRegistry | None = None) -> MetricsApp:
    """An ASGI app that serves the metrics in the Prometheus text format: mount it, or
    route to it: `Route("/metrics", make_metrics_app())` in Starlette or FastAPI.

    With several worker processes (`uvicorn --workers N`, gunicorn), set
    `PROMETHEUS_MULTIPROC_DIR` to an empty directory before the workers start: each
    worker then writes its values there, and this app serves the sum over all workers
    (a per-worker registry would show whichever worker answered the scrape).
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return MetricsApp(REGISTRY if registry is None else registry)
