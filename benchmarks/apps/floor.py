"""The floor: the least any idempotency middleware must do, as a reference, not a product.

It reads the body, canonicalises the JSON and hashes it, keeps the response (status,
headers, body) in a dict under the raw key and replays it with `Idempotent-Replayed`.
It has no key validation, tenant, lease, fencing, expiry, size limit or concurrency
control: two requests with one key at once both run, and the hash is never compared.
Beside oncely in one run (`fastapi/floor-memory` in `benchmarks.run`, `floor` in
`benchmarks.inprocess`) it shows how much of a target is left once this much is paid.
"""

from __future__ import annotations

import hashlib
import json
import json.scanner
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_REPLAYED = (b"idempotent-replayed", b"true")
_make_scanner: Any = json.scanner.make_scanner
_scan: Callable[[str, int], tuple[object, int]] = _make_scanner(json.JSONDecoder())


def canonical_hash(body: bytes) -> str:
    """The JSON body with sorted keys and no whitespace, hashed once."""
    value, _ = _scan(body.decode(), 0)
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(canonical, digest_size=16).hexdigest()


def buffered_receive(body: bytes, receive: Receive) -> Receive:
    """The app's receive: the body read already, then the server's own."""
    delivered = False

    async def app_receive() -> Message:
        nonlocal delivered
        if delivered:
            return await receive()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return app_receive


class Floor:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # Tuples of bytes and ints only: the GC untracks them, so kept records cost no
        # collection time (a list per record would make every full collection walk it).
        self.records: dict[bytes, tuple[int, tuple[tuple[bytes, bytes], ...], bytes]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = dict(scope["headers"]).get(b"idempotency-key") if scope["type"] == "http" else None
        if key is None:
            await self.app(scope, receive, send)
            return
        body = (await receive())["body"]  # the benchmark's bodies come in one message
        canonical_hash(body)
        stored = self.records.get(key)
        if stored is not None:
            status, headers, content = stored
            await send({"type": "http.response.start", "status": status, "headers": list(headers)})
            await send({"type": "http.response.body", "body": content})
            return
        started: list[Any] = []  # status, headers
        chunks: list[bytes] = []

        async def app_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = (*(tuple(h) for h in message.get("headers", ())), _REPLAYED)
                started.extend((message["status"], headers))
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    self.records[key] = (started[0], started[1], b"".join(chunks))
            await send(message)

        await self.app(scope, buffered_receive(body, receive), app_send)
