"""The consumer's half: an httpx client that retries mutating requests safely.

Every mutating call gets one `Idempotency-Key`, kept on each retry, so a server that
honours the header runs it once however often the network makes us resend. See
docs/client.md.

    import oncely.client

    with oncely.client.Client(base_url="https://api.example") as client:
        response = client.post("/payments", json={"amount": 100})
        oncely.client.was_replayed(response), oncely.client.attempts(response)
"""

from __future__ import annotations

import httpx

from oncely.client._client import AsyncClient, Client
from oncely.client._policy import (
    DEFAULT_KEY_METHODS,
    DEFAULT_RETRY_STATUSES,
    EXTENSION,
    IDEMPOTENCY_KEY_HEADER,
    OncelyInfo,
    RetryEvent,
    RetryPolicy,
    idempotency_key_from,
    parse_retry_after,
    says_replayed,
)
from oncely.client._transport import AsyncRetryTransport, RetryTransport

__all__ = [
    "DEFAULT_KEY_METHODS",
    "DEFAULT_RETRY_STATUSES",
    "IDEMPOTENCY_KEY_HEADER",
    "AsyncClient",
    "AsyncRetryTransport",
    "Client",
    "OncelyInfo",
    "RetryEvent",
    "RetryPolicy",
    "RetryTransport",
    "attempts",
    "idempotency_key_from",
    "info",
    "parse_retry_after",
    "was_replayed",
]


def info(response: httpx.Response) -> OncelyInfo | None:
    """What the retry transport recorded about this response; None if it did not pass one."""
    found = response.extensions.get(EXTENSION)
    return found if isinstance(found, OncelyInfo) else None


def attempts(response: httpx.Response) -> int:
    """How many attempts the call took (1 when it did not go through a retry transport)."""
    found = info(response)
    return 1 if found is None else found.attempts


def was_replayed(response: httpx.Response) -> bool:
    """Whether the server answered with a stored response (`Idempotent-Replayed: true`).

    Works on any httpx response, retry transport or not."""
    found = info(response)
    if found is not None:
        return found.replayed
    return says_replayed(response.headers)
