"""Drive an ASGI app in process with exact control over receive() and a record of send()."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Message = MutableMapping[str, Any]


@dataclass
class Exchange:
    messages: list[Message] = field(default_factory=list)

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.messages[0]["headers"]}

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return [(name, value) for name, value in self.messages[0]["headers"]]

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])

    def json(self) -> Any:
        return json.loads(self.body)


async def call(
    app: Callable[..., Awaitable[None]],
    method: str = "POST",
    path: str = "/pay",
    *,
    key: str | bytes | None = None,
    body: bytes | Sequence[bytes] = b"{}",
    headers: Sequence[tuple[bytes, bytes]] = (),
    query: bytes = b"",
    after_body: Callable[[], Awaitable[Message]] | None = None,
) -> Exchange:
    raw = [(b"content-type", b"application/json"), *headers]
    if key is not None:
        raw.append((b"idempotency-key", key.encode() if isinstance(key, str) else key))
    chunks = [body] if isinstance(body, bytes) else list(body)
    pending = [
        {"type": "http.request", "body": chunk, "more_body": index < len(chunks) - 1}
        for index, chunk in enumerate(chunks)
    ]
    done = asyncio.Event()

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        if after_body is not None:
            return await after_body()
        await done.wait()
        return {"type": "http.disconnect"}

    exchange = Exchange()

    async def send(message: Message) -> None:
        exchange.messages.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
        "root_path": "", "headers": raw, "client": ("127.0.0.1", 1), "server": ("test", 80),
    }  # fmt: skip
    try:
        await app(scope, receive, send)
    finally:
        done.set()
    return exchange
