"""A plain Starlette app behind oncely, configured by environment, for end-to-end tests.

ONCELY_STORE_URL      store URL (oncely.stores.store_from_url)
ONCELY_EFFECTS_FILE   one JSON line is appended per handler execution
ONCELY_HANDLER_DELAY  seconds each mutating handler sleeps (asyncio) before its effect
ONCELY_BLOCKING_DELAY seconds each mutating handler blocks its worker (time.sleep)
ONCELY_POLICY         JSON object of policy options, e.g. {"lease": 1, "mismatch_status": 409}
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from oncely import IdempotencyMiddleware
from oncely.stores import store_from_url

EFFECTS_FILE = os.environ.get("ONCELY_EFFECTS_FILE", "effects.jsonl")
HANDLER_DELAY = float(os.environ.get("ONCELY_HANDLER_DELAY", "0"))
BLOCKING_DELAY = float(os.environ.get("ONCELY_BLOCKING_DELAY", "0"))
POLICY = json.loads(os.environ.get("ONCELY_POLICY", "{}"))


def record_effect(request: Request, body: bytes) -> str:
    execution_id = uuid.uuid4().hex
    line = json.dumps(
        {
            "key": request.headers.get("idempotency-key"),
            "id": execution_id,
            "pid": os.getpid(),
            "path": request.url.path,
            "body": body.decode("utf-8", "replace"),
        }
    )
    # O_APPEND writes of one short line are atomic across worker processes.
    with open(EFFECTS_FILE, "a", encoding="utf-8") as effects:
        effects.write(line + "\n")
    return execution_id


async def slow_down() -> None:
    if HANDLER_DELAY:
        await asyncio.sleep(HANDLER_DELAY)
    if BLOCKING_DELAY:
        time.sleep(BLOCKING_DELAY)  # noqa: ASYNC251  starves the loop: no lease renewal runs


async def effects(request: Request) -> Response:
    body = await request.body()
    await slow_down()
    if "delay" in request.query_params:
        await asyncio.sleep(float(request.query_params["delay"]))
    execution_id = record_effect(request, body)
    return JSONResponse(
        {"id": execution_id, "echo": body.decode("utf-8", "replace"), "pid": os.getpid()},
        status_code=201,
        headers={"x-execution-id": execution_id, "set-cookie": "session=secret"},
    )


async def stream(request: Request) -> Response:
    body = await request.body()
    execution_id = record_effect(request, body)

    async def chunks() -> AsyncIterator[bytes]:
        for index in range(5):
            await asyncio.sleep(0.01)
            yield f"chunk-{index}-{execution_id}\n".encode()

    return StreamingResponse(chunks(), media_type="text/plain", status_code=200)


async def status(request: Request) -> Response:
    body = await request.body()
    execution_id = record_effect(request, body)
    code = int(request.path_params["code"])
    return PlainTextResponse(execution_id, status_code=code)


async def fail(request: Request) -> Response:
    record_effect(request, await request.body())
    raise RuntimeError("handler failed after its effect")


async def effect_count(request: Request) -> Response:
    try:
        with open(EFFECTS_FILE, encoding="utf-8") as file:  # noqa: ASYNC230  test app
            count = sum(1 for _ in file)
    except FileNotFoundError:
        count = 0
    return JSONResponse({"count": count})


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


routes = [
    Route("/effects", effects, methods=["POST", "PUT", "PATCH", "DELETE", "GET"]),
    Route("/effects/count", effect_count, methods=["GET"]),
    Route("/stream", stream, methods=["POST"]),
    Route("/status/{code:int}", status, methods=["POST"]),
    Route("/fail", fail, methods=["POST"]),
    Route("/healthz", healthz, methods=["GET"]),
]

inner = Starlette(routes=routes)
app = IdempotencyMiddleware(
    inner, store=store_from_url(os.environ.get("ONCELY_STORE_URL", "memory://")), **POLICY
)
