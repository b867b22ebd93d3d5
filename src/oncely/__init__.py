"""oncely: make retrying a mutating HTTP request safe.

Providers: `IdempotencyMiddleware` (ASGI; `oncely.wsgi` for WSGI) over a store from
`oncely.stores`. Consumers: `Client` / `AsyncClient`, or `RetryTransport` under httpx.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from oncely._version import __version__
from oncely.asgi import IdempotencyMiddleware
from oncely.context import IdempotencyContext, idempotency_context
from oncely.core.policy import IdempotencyPolicy
from oncely.markers import exempt, idempotent

if TYPE_CHECKING:
    from oncely.client import AsyncClient, AsyncRetryTransport, Client, RetryPolicy, RetryTransport

_CLIENT_NAMES = ("AsyncClient", "AsyncRetryTransport", "Client", "RetryPolicy", "RetryTransport")

__all__ = [
    "AsyncClient",
    "AsyncRetryTransport",
    "Client",
    "IdempotencyContext",
    "IdempotencyMiddleware",
    "IdempotencyPolicy",
    "RetryPolicy",
    "RetryTransport",
    "__version__",
    "exempt",
    "idempotency_context",
    "idempotent",
]


def __getattr__(name: str) -> Any:
    # The client needs httpx (`oncely[client]`): import it only when asked for.
    if name in _CLIENT_NAMES:
        import oncely.client

        return getattr(oncely.client, name)
    raise AttributeError(f"module 'oncely' has no attribute {name!r}")
