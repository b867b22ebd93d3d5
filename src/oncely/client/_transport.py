"""Retrying httpx transports, sync and async twins.

They differ only in how they send, read and sleep; every decision comes from
`RetryState` in `_policy.py`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Final, Self

import anyio
import httpx

from oncely.client._policy import (
    EXTENSION,
    GiveUp,
    Retry,
    RetryPolicy,
    RetryState,
    needs_body,
    read_in_loop,
)

__all__ = ["AsyncRetryTransport", "RetryTransport"]

# Read at most this much of a response that is about to be retried, so the connection can
# go back to the pool; a bigger body is cut off with the connection instead.
_DRAIN_LIMIT: Final = 64 * 1024


class RetryTransport(httpx.BaseTransport):
    """Wraps a transport; resends a mutating request with one `Idempotency-Key` until it
    gets an answer that is final, following `policy` (`RetryPolicy.default()` if None).

    `sleep`, `clock` (monotonic seconds), `uniform` (the jitter source) and `wall_clock`
    (POSIX seconds, for Retry-After dates) are there for tests.
    """

    def __init__(
        self,
        transport: httpx.BaseTransport | None = None,
        *,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        uniform: Callable[[float, float], float] = random.uniform,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.transport = transport if transport is not None else httpx.HTTPTransport()
        self.policy = policy if policy is not None else RetryPolicy.default()
        self._sleep = sleep
        self._clock = clock
        self._uniform = uniform
        self._wall_clock = wall_clock

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        state = RetryState(self.policy, request, clock=self._clock, uniform=self._uniform)
        original_extensions = request.extensions
        try:
            while True:
                state.start_attempt()
                request.extensions = _with_attempt_timeouts(original_extensions, state)
                try:
                    response = self.transport.handle_request(request)
                    body = None
                    if needs_body(response.status_code, response.headers) or (
                        state.safe_to_resend and read_in_loop(response.headers)
                    ):
                        response, body = _read(response)
                except Exception as exc:
                    decision = state.after_exception(exc)
                    if isinstance(decision, GiveUp):
                        state.give_up(decision)
                        state.note(exc, decision)
                        raise
                    state.announce(state.event(decision, exception=exc))
                    self._sleep(decision.delay)
                    continue
                decision = state.after_response(
                    response.status_code, response.headers, body, now=self._wall_clock()
                )
                if isinstance(decision, Retry):
                    _discard(response)
                    state.announce(state.event(decision, status_code=response.status_code))
                    self._sleep(decision.delay)
                    continue
                state.give_up(decision)
                response.extensions[EXTENSION] = state.info(response.headers, decision)
                return response
        finally:
            request.extensions = original_extensions

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Self:
        self.transport.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        self.transport.__exit__(exc_type, exc_value, traceback)


class AsyncRetryTransport(httpx.AsyncBaseTransport):
    """The async twin of `RetryTransport`; sleeps with `anyio.sleep` (asyncio or trio)."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        clock: Callable[[], float] = time.monotonic,
        uniform: Callable[[float, float], float] = random.uniform,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.transport = transport if transport is not None else httpx.AsyncHTTPTransport()
        self.policy = policy if policy is not None else RetryPolicy.default()
        self._sleep = sleep
        self._clock = clock
        self._uniform = uniform
        self._wall_clock = wall_clock

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        state = RetryState(self.policy, request, clock=self._clock, uniform=self._uniform)
        original_extensions = request.extensions
        try:
            while True:
                state.start_attempt()
                request.extensions = _with_attempt_timeouts(original_extensions, state)
                try:
                    response = await self.transport.handle_async_request(request)
                    body = None
                    if needs_body(response.status_code, response.headers) or (
                        state.safe_to_resend and read_in_loop(response.headers)
                    ):
                        response, body = await _aread(response)
                except Exception as exc:
                    decision = state.after_exception(exc)
                    if isinstance(decision, GiveUp):
                        state.give_up(decision)
                        state.note(exc, decision)
                        raise
                    state.announce(state.event(decision, exception=exc))
                    await self._sleep(decision.delay)
                    continue
                decision = state.after_response(
                    response.status_code, response.headers, body, now=self._wall_clock()
                )
                if isinstance(decision, Retry):
                    await _adiscard(response)
                    state.announce(state.event(decision, status_code=response.status_code))
                    await self._sleep(decision.delay)
                    continue
                state.give_up(decision)
                response.extensions[EXTENSION] = state.info(response.headers, decision)
                return response
        finally:
            request.extensions = original_extensions

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def __aenter__(self) -> Self:
        await self.transport.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.transport.__aexit__(exc_type, exc_value, traceback)


def _with_attempt_timeouts(extensions: dict[str, object], state: RetryState) -> dict[str, object]:
    """A copy of the request extensions whose timeouts end by the deadline at the latest."""
    if state.remaining() is None:
        return extensions
    original = extensions.get("timeout")
    timeouts = original if isinstance(original, dict) else {}
    return {**extensions, "timeout": state.attempt_timeouts(timeouts)}


def _read(response: httpx.Response) -> tuple[httpx.Response, bytes | None]:
    """Read a (small) response whose body the decision needs; see `_buffered`."""
    if response.is_stream_consumed:  # an inner transport read it already
        return response, _content(response)
    try:
        return _buffered(response, b"".join(response.iter_raw()))
    finally:
        response.close()


async def _aread(response: httpx.Response) -> tuple[httpx.Response, bytes | None]:
    if response.is_stream_consumed:
        return response, _content(response)
    try:
        return _buffered(response, b"".join([chunk async for chunk in response.aiter_raw()]))
    finally:
        await response.aclose()


def _content(response: httpx.Response) -> bytes | None:
    try:
        return response.content
    except httpx.ResponseNotRead:
        return None


def _buffered(response: httpx.Response, raw: bytes) -> tuple[httpx.Response, bytes | None]:
    """The response again, now over its read bytes, and the body decoded (gzip and the
    like undone), or None if it does not decode."""
    copy = httpx.Response(
        response.status_code,
        headers=response.headers,
        stream=httpx.ByteStream(raw),
        extensions=response.extensions,
    )
    try:
        decoded = httpx.Response(response.status_code, headers=response.headers, content=raw)
    except httpx.DecodingError:
        return copy, None
    return copy, decoded.content


def _discard(response: httpx.Response) -> None:
    """Read (a bounded part of) and close a response that will be retried."""
    read = 0
    try:
        for chunk in response.iter_raw():
            read += len(chunk)
            if read > _DRAIN_LIMIT:
                break
    except (httpx.TransportError, httpx.StreamError):
        pass  # the connection is broken; closing below releases it
    finally:
        response.close()


async def _adiscard(response: httpx.Response) -> None:
    read = 0
    try:
        async for chunk in response.aiter_raw():
            read += len(chunk)
            if read > _DRAIN_LIMIT:
                break
    except (httpx.TransportError, httpx.StreamError):
        pass
    finally:
        await response.aclose()
