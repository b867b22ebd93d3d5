"""`Client` and `AsyncClient`: httpx's clients with the retry transport installed."""

from __future__ import annotations

from typing import Any

import httpx

from oncely.client._policy import RetryPolicy
from oncely.client._transport import AsyncRetryTransport, RetryTransport

__all__ = ["AsyncClient", "Client"]


class Client(httpx.Client):
    """An `httpx.Client` whose every transport retries as `retry_policy` says.

    Takes all of httpx.Client's arguments. A `transport=` or `mounts=` you pass (and the
    proxy transports httpx builds from the environment) are wrapped in a `RetryTransport`,
    unless they already are one.
    """

    def __init__(self, *, retry_policy: RetryPolicy | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.retry_policy = retry_policy if retry_policy is not None else RetryPolicy.default()
        # Wrapping what httpx built keeps its own transport set-up (TLS, limits, proxies).
        self._transport = self._wrap(self._transport)
        self._mounts = {
            pattern: None if transport is None else self._wrap(transport)
            for pattern, transport in self._mounts.items()
        }

    def _wrap(self, transport: httpx.BaseTransport) -> httpx.BaseTransport:
        if isinstance(transport, RetryTransport):
            return transport
        return RetryTransport(transport, policy=self.retry_policy)


class AsyncClient(httpx.AsyncClient):
    """An `httpx.AsyncClient` whose every transport retries as `retry_policy` says."""

    def __init__(self, *, retry_policy: RetryPolicy | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.retry_policy = retry_policy if retry_policy is not None else RetryPolicy.default()
        self._transport = self._wrap(self._transport)
        self._mounts = {
            pattern: None if transport is None else self._wrap(transport)
            for pattern, transport in self._mounts.items()
        }

    def _wrap(self, transport: httpx.AsyncBaseTransport) -> httpx.AsyncBaseTransport:
        if isinstance(transport, AsyncRetryTransport):
            return transport
        return AsyncRetryTransport(transport, policy=self.retry_policy)
