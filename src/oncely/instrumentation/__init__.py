"""Subscribers for the events of `oncely.core.events`: metrics, traces, logs.

Each subscriber is a callable that takes an `IdempotencyEvent`; attach it to the
middleware with `event_subscribers=[...]`, and to the client with
`RetryPolicy(on_retry=client_retry_subscriber(...))`. Optional libraries are imported
only by the module that needs them:

- `oncely.instrumentation.prometheus.PrometheusSubscriber` (`oncely[prometheus]`)
- `oncely.instrumentation.otel.OpenTelemetrySubscriber` (`oncely[otel]`)
- `oncely.instrumentation.logging.LoggingSubscriber` (stdlib)

See docs/observability.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from oncely.core.events import EventKind, EventSubscriber, IdempotencyEvent, emit, hash_key

if TYPE_CHECKING:
    from oncely.client import RetryEvent
    from oncely.instrumentation.logging import LoggingSubscriber
    from oncely.instrumentation.otel import OpenTelemetrySubscriber
    from oncely.instrumentation.prometheus import PrometheusSubscriber

__all__ = [
    "EventKind",
    "EventSubscriber",
    "IdempotencyEvent",
    "LoggingSubscriber",
    "OpenTelemetrySubscriber",
    "PrometheusSubscriber",
    "client_retry_subscriber",
    "hash_key",
]

_LAZY = {
    "LoggingSubscriber": "oncely.instrumentation.logging",
    "OpenTelemetrySubscriber": "oncely.instrumentation.otel",
    "PrometheusSubscriber": "oncely.instrumentation.prometheus",
}


def client_retry_subscriber(*subscribers: EventSubscriber) -> Callable[[RetryEvent], None]:
    """An `on_retry` hook for the client that forwards each retry to `subscribers` as a
    `CLIENT_RETRY` event: `RetryPolicy(on_retry=client_retry_subscriber(prometheus))`.

    `attempt` is the attempt that just failed (1-based), `detail` the client's reason
    ("status 503", "ConnectError", "409 request-in-progress"). The URL is left out (a raw
    path is unbounded); the key is hashed. A failing subscriber never aborts the call.
    """
    targets = tuple(subscribers)

    def on_retry(retry: RetryEvent) -> None:
        key = retry.idempotency_key
        emit(
            targets,
            IdempotencyEvent(
                kind=EventKind.CLIENT_RETRY,
                method=retry.method,
                status=retry.status_code,
                key_hash=None if key is None else hash_key(key),
                attempt=retry.attempt,
                detail=retry.reason,
            ),
        )

    return on_retry


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'oncely.instrumentation' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
