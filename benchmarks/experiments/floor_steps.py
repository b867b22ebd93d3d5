"""`benchmarks.run --patch` file: oncely replaced by the floor's steps, one more per store.

What a middleware costs in the server as it does more, measured beside the bare app in
one run (the step depends on the variant's store, BENCH_STORE):

    VARIANTS=fastapi/oncely-memory,fastapi/oncely-sqlite,fastapi/oncely-redis,fastapi/oncely-postgres
    .venv-bench/bin/python -m benchmarks.run --patch benchmarks/experiments/floor_steps.py \\
        --variants $VARIANTS --scenarios fresh --scale 0 --no-wsgi --profile 0

- `oncely-memory+patched`: a pure ASGI middleware that wraps receive and send, nothing else;
- `oncely-sqlite+patched`: it also finds the key and reads the body before the app runs;
- `oncely-redis+patched`: it also canonicalises the JSON body and hashes it;
- `oncely-postgres+patched`: it also keeps each response body in a dict (the floor,
  without its replay path).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from benchmarks.apps import asgi as apps
from benchmarks.apps.floor import buffered_receive, canonical_hash

import oncely

Message = MutableMapping[str, Any]
STEP = {"memory": 0, "sqlite": 1, "redis": 2, "postgres": 3}.get(
    os.environ.get("BENCH_STORE", ""), 0
)


class FloorStep:
    def __init__(self, app: Any, **options: Any) -> None:
        self.app = app
        self.records: dict[bytes | None, bytes] = {}

    async def __call__(
        self, scope: Any, receive: Callable[[], Awaitable[Message]], send: Any
    ) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if STEP == 0:

            async def passing_receive() -> Message:
                return await receive()

            async def passing_send(message: Message) -> None:
                await send(message)

            await self.app(scope, passing_receive, passing_send)
            return
        key = dict(scope["headers"]).get(b"idempotency-key")
        body = (await receive())["body"]
        if STEP >= 2:
            canonical_hash(body)
        chunks: list[bytes] = []

        async def app_send(message: Message) -> None:
            if STEP >= 3 and message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    self.records[key] = b"".join(chunks)
            await send(message)

        await self.app(scope, buffered_receive(body, receive), app_send)


def _no_store(store: str, url: str, namespace: str) -> None:
    return None  # the patched servers keep nothing in a store


oncely.IdempotencyMiddleware = FloorStep  # type: ignore[misc, assignment]
apps.oncely_store = _no_store
