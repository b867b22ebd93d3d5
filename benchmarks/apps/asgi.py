"""The ASGI app under test, one variant per process, chosen by environment variables.

    BENCH_FRAMEWORK  fastapi | starlette | raw (a plain ASGI callable, no framework)
    BENCH_LIBRARY    bare | oncely | oncely_prometheus | aih (asgi-idempotency-header) | idemkit
                     | floor (a reference: the least any idempotency middleware does)
    BENCH_STORE      memory | sqlite | sqlite-normal | redis | postgres
    BENCH_STORE_URL  the store's URL or file path
    BENCH_NAMESPACE  a key prefix / table name of this variant's own
    BENCH_PRELOAD    live records to put in a memory store before serving (scale runs)
    BENCH_GC         default | tuned (`tune_gc`: what docs/benchmarks.md advises servers)

Served by `uvicorn --factory benchmarks.apps.asgi:create_app`. `POST /payments` is the
handler; it counts its executions, and `GET /__bench/count` reports the count (a GET,
so every middleware passes it straight through).
"""

# No `from __future__ import annotations`: FastAPI reads the handler's annotations at runtime.

import os
from typing import Any

from benchmarks.apps import preload

EXECUTIONS = 0


def _created(payload: dict[str, Any]) -> dict[str, Any]:
    global EXECUTIONS
    EXECUTIONS += 1
    return {
        "id": f"pay_{EXECUTIONS}",
        "amount": payload.get("amount"),
        "currency": payload.get("currency"),
        "status": "accepted",
    }


def fastapi_app() -> Any:
    from fastapi import FastAPI
    from pydantic import BaseModel

    class Payment(BaseModel):
        amount: int
        currency: str
        reference: str | None = None

    app = FastAPI()

    @app.post("/payments", status_code=201)
    async def create_payment(payment: Payment) -> dict[str, Any]:
        return _created(payment.model_dump())

    @app.get("/__bench/count")
    async def count() -> dict[str, int]:
        return {"executions": EXECUTIONS}

    return app


def starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def create_payment(request: Request) -> JSONResponse:
        return JSONResponse(_created(await request.json()), status_code=201)

    async def count(request: Request) -> JSONResponse:
        return JSONResponse({"executions": EXECUTIONS})

    return Starlette(
        routes=[
            Route("/payments", create_payment, methods=["POST"]),
            Route("/__bench/count", count, methods=["GET"]),
        ]
    )


def raw_app() -> Any:
    """The thinnest ASGI app (no framework): isolates oncely's own cost per request."""
    import json

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                message = await receive()
                while message["type"] != "lifespan.shutdown":
                    await send({"type": message["type"] + ".complete"})
                    message = await receive()
                await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if scope["method"] == "POST":
            status, document = 201, _created(json.loads(body))
        else:
            status, document = 200, {"executions": EXECUTIONS}
        payload = json.dumps(document).encode()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(payload)).encode())]  # fmt: skip
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    return app


class _Wrapped:
    """`add_middleware` for the raw app."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def add_middleware(self, middleware: Any, **options: Any) -> None:
        self.app = middleware(self.app, **options)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def oncely_store(store: str, url: str, namespace: str) -> Any:
    from oncely.stores import MemoryStore, SQLiteStore

    if store == "memory":
        return MemoryStore()
    if store == "sqlite":
        return SQLiteStore(url)
    if store == "sqlite-normal":
        return SQLiteStore(url, synchronous="NORMAL")
    if store == "redis":
        from oncely.stores import RedisStore

        return RedisStore(url, prefix=namespace)
    if store == "postgres":
        from oncely.stores import PostgresStore

        return PostgresStore(url, table=namespace)
    raise ValueError(f"oncely has no {store!r} store in this benchmark")


def add_middleware(app: Any, library: str, store: str, url: str, namespace: str) -> None:
    if library == "bare":
        return
    if library in ("oncely", "oncely_prometheus"):
        from oncely import IdempotencyMiddleware

        instance = oncely_store(store, url, namespace)
        preload.memory_store(instance, int(os.environ.get("BENCH_PRELOAD", "0")))
        subscribers = []
        if library == "oncely_prometheus":  # the cost of metrics: one subscriber attached
            from prometheus_client import CollectorRegistry

            from oncely.instrumentation.prometheus import PrometheusSubscriber

            subscribers.append(PrometheusSubscriber(CollectorRegistry()))
        app.add_middleware(IdempotencyMiddleware, store=instance, event_subscribers=subscribers)
        return
    if library == "floor":  # a reference, not a peer: benchmarks/apps/floor.py
        from benchmarks.apps.floor import Floor

        if store != "memory":
            raise ValueError("the floor keeps its records in a dict: floor-memory only")
        app.add_middleware(Floor)
        return
    if library == "aih":
        # As its README says: IdempotencyHeaderMiddleware(backend=...), redis.asyncio client.
        from idempotency_header_middleware import IdempotencyHeaderMiddleware
        from idempotency_header_middleware.backends import MemoryBackend, RedisBackend

        if store == "memory":
            backend: Any = MemoryBackend()
        elif store == "redis":
            import redis.asyncio

            backend = RedisBackend(
                redis=redis.asyncio.from_url(url),
                keys_key=f"{namespace}:keys",
                response_key=f"{namespace}:responses:",
            )
        else:
            raise ValueError(f"asgi-idempotency-header has no {store!r} backend")
        app.add_middleware(IdempotencyHeaderMiddleware, backend=backend)
        return
    if library == "idemkit":
        # As its README says: IdempotencyMiddleware(backend=...), backends from_url.
        from idemkit import IdempotencyMiddleware as IdemkitMiddleware
        from idemkit import InMemoryBackend

        if store == "memory":
            # Its default max_size (10,000) makes every claim past 10,000 live records
            # fail; raised so that fresh-key load measures claims, not rejections.
            backend = InMemoryBackend(max_size=100_000_000)
        elif store == "redis":
            from idemkit import RedisBackend as IdemkitRedis

            backend = IdemkitRedis.from_url(url, namespace=namespace)
        elif store == "postgres":
            from idemkit.backends.postgres import PostgresBackend

            backend = PostgresBackend.from_url(url, table=namespace)
        else:
            raise ValueError(f"idemkit has no {store!r} backend")
        app.add_middleware(IdemkitMiddleware, backend=backend)
        return
    raise ValueError(f"unknown library {library!r}")


def apply_patch() -> None:
    """BENCH_ONCELY_PATCH: a Python file run before the app is built (run.py --patch)."""
    path = os.environ.get("BENCH_ONCELY_PATCH")
    if path:
        import runpy

        runpy.run_path(path, run_name="oncely_patch")


def tune_gc() -> None:
    """BENCH_GC=tuned: what start-up made moved out of the collector's reach, and gen-0
    collections ten times rarer (run.py --gc tuned; "The garbage collector" in
    docs/benchmarks.md). Every variant of a run gets the same setting."""
    if os.environ.get("BENCH_GC", "default") == "tuned":
        import gc

        gc.collect()
        gc.freeze()
        gc.set_threshold(10_000, 10, 10)


def create_app() -> Any:
    apply_patch()
    framework = os.environ.get("BENCH_FRAMEWORK", "fastapi")
    if framework == "raw":
        app: Any = _Wrapped(raw_app())
    else:
        app = fastapi_app() if framework == "fastapi" else starlette_app()
    add_middleware(
        app,
        os.environ.get("BENCH_LIBRARY", "bare"),
        os.environ.get("BENCH_STORE", "memory"),
        os.environ.get("BENCH_STORE_URL", ""),
        os.environ.get("BENCH_NAMESPACE", "oncely_bench"),
    )
    tune_gc()
    return app
