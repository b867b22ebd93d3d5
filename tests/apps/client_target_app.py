"""What the client's end-to-end tests call: a payments endpoint behind oncely, on SQLite.

ONCELY_STORE_PATH    SQLite file of oncely's records
ONCELY_EFFECTS_PATH  SQLite file where each execution of the handler adds one row

POST /payments       records an effect and answers 201 with an id made in the handler,
                     so a caller can tell the original response from a second execution;
                     `?slow=<seconds>` holds the handler that long before its effect.
GET  /effects        every effect so far: [{"key": ..., "id": ..., "body": ...}, ...]
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import uuid

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from oncely import IdempotencyMiddleware
from oncely.stores import SQLiteStore

STORE_PATH = os.environ.get("ONCELY_STORE_PATH", "oncely.db")
EFFECTS_PATH = os.environ.get("ONCELY_EFFECTS_PATH", "effects.db")

# One worker, one event loop thread: one connection is enough.
effects_db = sqlite3.connect(EFFECTS_PATH, isolation_level=None, check_same_thread=False)
effects_db.execute("PRAGMA journal_mode = WAL")
effects_db.execute("CREATE TABLE IF NOT EXISTS effects (key TEXT, id TEXT, body TEXT)")


async def pay(request: Request) -> Response:
    body = (await request.body()).decode()
    slow = float(request.query_params.get("slow", "0"))
    if slow:
        await asyncio.sleep(slow)
    key = request.headers.get("idempotency-key")
    payment_id = uuid.uuid4().hex
    effects_db.execute("INSERT INTO effects VALUES (?, ?, ?)", (key, payment_id, body))
    return JSONResponse({"id": payment_id, "key": key}, status_code=201)


async def effects(request: Request) -> Response:
    rows = effects_db.execute("SELECT key, id, body FROM effects").fetchall()
    return JSONResponse([{"key": key, "id": id_, "body": body} for key, id_, body in rows])


app = IdempotencyMiddleware(
    Starlette(
        routes=[
            Route("/payments", pay, methods=["POST"]),
            Route("/effects", effects, methods=["GET"]),
        ]
    ),
    store=SQLiteStore(STORE_PATH),
)
