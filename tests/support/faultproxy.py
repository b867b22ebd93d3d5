"""A fault-injecting HTTP/1.1 proxy for end-to-end tests: loses responses, resets, delays.

    with FaultProxy(server.port, seed=7, drop_rate=0.2) as proxy:
        httpx.post(f"{proxy.url}/payments", ...)
        proxy.stats.dropped

It listens on 127.0.0.1 (an ephemeral port) and runs an asyncio loop in a background
thread. It reads HTTP/1.1 message boundaries (Content-Length, chunked, or until close),
one request and then its response at a time, so keep-alive connections work and every
fault applies to one request. Faults, each chosen per request:

- reset: the request has been read from the client and is *not* forwarded; the client
  connection is closed with an RST (SO_LINGER 0). The server never sees the request.
- drop (a lost response): the request is forwarded and the server's whole response is
  read, so the server has finished with it, then the client connection is closed
  (FIN) without a byte of it. The client sees "Server disconnected".
- delay: the proxy waits this many seconds before forwarding the request.

Faults come on command (`drop_next(n)`, `reset_next(n)`, which win) or at random with a
seeded RNG (`drop_rate`, `reset_rate`, `delay_rate`), settable at any time with
`configure()`. With concurrent clients the order of draws depends on scheduling, so the
counts in `stats` (not the seed alone) are what a test should compare against.

Not supported, as the tests do not need them: pipelining, `Expect: 100-continue`
(1xx responses are passed on but not waited for), upgrades, and a response to HEAD
that announces a Content-Length (its body would be waited for).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import socket
import struct
import threading
from collections.abc import Awaitable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self, TypeVar

__all__ = ["FaultProxy", "ProxyStats"]

_HEAD_LIMIT = 64 * 1024
T = TypeVar("T")


@dataclass
class ProxyStats:
    """What the proxy did; `FaultProxy.stats` returns a copy."""

    connections: int = 0  # client connections accepted
    requests: int = 0  # requests read from clients
    forwarded: int = 0  # requests sent on to the server
    responses: int = 0  # responses delivered to clients
    dropped: int = 0  # responses the server sent that the client never got
    resets: int = 0  # client connections reset instead of forwarding
    delayed: int = 0  # requests held back by `delay`
    errors: int = 0  # connections that ended on an I/O or framing error
    dropped_keys: list[str | None] = field(default_factory=list)  # Idempotency-Key of drops


@dataclass
class _Message:
    head: bytes
    body: bytes
    headers: dict[str, str]  # lower-case names; the last value of a repeated header wins
    start_line: str
    until_eof: bool = False  # the body ended with the connection

    @property
    def raw(self) -> bytes:
        return self.head + self.body

    @property
    def closes(self) -> bool:
        return self.until_eof or "close" in self.headers.get("connection", "").lower()


@dataclass
class _Fault:
    reset: bool = False
    drop: bool = False
    delay: float = 0.0


class FaultProxy:
    def __init__(
        self,
        target_port: int,
        *,
        target_host: str = "127.0.0.1",
        seed: int = 0,
        drop_rate: float = 0.0,
        reset_rate: float = 0.0,
        delay: float = 0.0,
        delay_rate: float = 0.0,
        io_timeout: float = 30.0,
    ) -> None:
        self.target = (target_host, target_port)
        self.io_timeout = io_timeout
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._drop_rate = drop_rate
        self._reset_rate = reset_rate
        self._delay = delay
        self._delay_rate = delay_rate
        self._drop_next = 0
        self._reset_next = 0
        self._stats = ProxyStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None
        self._startup_error: BaseException | None = None

    # -- control, from the test's thread ----------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the proxy is not running")
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def stats(self) -> ProxyStats:
        with self._lock:
            return dataclasses.replace(self._stats, dropped_keys=list(self._stats.dropped_keys))

    def configure(
        self,
        *,
        drop_rate: float | None = None,
        reset_rate: float | None = None,
        delay: float | None = None,
        delay_rate: float | None = None,
    ) -> None:
        """Change the random faults; None leaves a setting as it is."""
        with self._lock:
            if drop_rate is not None:
                self._drop_rate = drop_rate
            if reset_rate is not None:
                self._reset_rate = reset_rate
            if delay is not None:
                self._delay = delay
            if delay_rate is not None:
                self._delay_rate = delay_rate

    def drop_next(self, count: int = 1) -> None:
        """Lose the responses to the next `count` requests."""
        with self._lock:
            self._drop_next += count

    def reset_next(self, count: int = 1) -> None:
        """Reset the connections of the next `count` requests instead of forwarding them."""
        with self._lock:
            self._reset_next += count

    def start(self) -> Self:
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="faultproxy", daemon=True
        )
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fault proxy did not start within 10 s")
        if self._startup_error is not None:
            raise RuntimeError("the fault proxy did not start") from self._startup_error
        return self

    def close(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._port = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- the loop thread --------------------------------------------------------------

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)  # this thread's own loop
        self._loop = loop
        try:
            server = loop.run_until_complete(
                asyncio.start_server(self._serve, "127.0.0.1", 0, limit=_HEAD_LIMIT)
            )
        except BaseException as exc:  # reported to start(), in the test's thread
            self._startup_error = exc
            ready.set()
            loop.close()
            return
        self._port = int(server.sockets[0].getsockname()[1])
        ready.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(server.wait_closed())
            loop.close()

    def _choose(self) -> _Fault:
        with self._lock:
            if self._reset_next:
                self._reset_next -= 1
                return _Fault(reset=True)
            fault = _Fault()
            if self._drop_next:
                self._drop_next -= 1
                fault.drop = True
            elif self._rng.random() < self._reset_rate:
                return _Fault(reset=True)
            elif self._rng.random() < self._drop_rate:
                fault.drop = True
            if self._delay > 0 and self._rng.random() < self._delay_rate:
                fault.delay = self._delay
            return fault

    def _count(self, **increments: int) -> None:
        with self._lock:
            for name, value in increments.items():
                setattr(self._stats, name, getattr(self._stats, name) + value)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._count(connections=1)
        server_w: asyncio.StreamWriter | None = None
        try:
            server_r: asyncio.StreamReader | None = None
            while True:
                request = await self._timed(_read_message(client_r, request_method=None))
                if request is None:
                    return
                self._count(requests=1)
                fault = self._choose()
                # Each count comes before the step it counts is visible to the client, so a
                # test that reads the stats after its call returned sees it.
                if fault.reset:
                    self._count(resets=1)
                    _reset(client_w)
                    return
                if fault.delay:
                    self._count(delayed=1)
                    await asyncio.sleep(fault.delay)
                if server_r is None or server_w is None:
                    connected = await self._timed(
                        asyncio.open_connection(*self.target, limit=_HEAD_LIMIT)
                    )
                    server_r, server_w = connected
                self._count(forwarded=1)
                server_w.write(request.raw)
                await self._timed(server_w.drain())
                method = request.start_line.split(" ", 1)[0]
                response = await self._timed(_read_response(server_r, method))
                if response is None:  # the server closed without answering
                    return
                if fault.drop:
                    with self._lock:
                        self._stats.dropped += 1
                        self._stats.dropped_keys.append(request.headers.get("idempotency-key"))
                    return
                self._count(responses=1)
                client_w.write(response.raw)
                await self._timed(client_w.drain())
                if response.closes or request.closes:
                    return
        except (OSError, EOFError, ValueError, TimeoutError, asyncio.LimitOverrunError):
            self._count(errors=1)
        finally:
            for writer in (client_w, server_w):
                if writer is not None and not writer.transport.is_closing():
                    writer.close()

    async def _timed(self, awaitable: Awaitable[T]) -> T:
        return await asyncio.wait_for(awaitable, self.io_timeout)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST rather than a FIN: linger on, timeout 0, then close."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _read_response(reader: asyncio.StreamReader, method: str) -> _Message | None:
    """The final response, with any 1xx interim responses in front of it."""
    interim = b""
    while True:
        response = await _read_message(reader, request_method=method)
        if response is None:
            return None
        status = int(response.start_line.split(" ", 2)[1])
        if status >= 200:
            response.head = interim + response.head
            return response
        interim += response.raw


async def _read_message(
    reader: asyncio.StreamReader, *, request_method: str | None
) -> _Message | None:
    """One HTTP/1.1 message; a request when `request_method` is None, else the response to
    a request with that method. None when the peer closed before sending anything."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise EOFError("connection closed inside a message head") from exc
        return None
    lines = head[:-4].decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    message = _Message(head=head, body=b"", headers=headers, start_line=lines[0])
    if request_method is not None:
        status = int(lines[0].split(" ", 2)[1])
        if status < 200 or status in (204, 304) or request_method == "HEAD":
            return message
    if "chunked" in headers.get("transfer-encoding", "").lower():
        message.body = await _read_chunked(reader)
    elif "content-length" in headers:
        message.body = await reader.readexactly(int(headers["content-length"]))
    elif request_method is not None:  # a response without framing ends with the connection
        message.body = await reader.read()
        message.until_eof = True
    return message


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        parts.append(size_line)
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while True:  # trailers, then the empty line
                line = await reader.readuntil(b"\r\n")
                parts.append(line)
                if line == b"\r\n":
                    return b"".join(parts)
        parts.append(await reader.readexactly(size + 2))
