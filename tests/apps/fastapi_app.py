"""The README's FastAPI quickstart, as a test app (env as in tests/apps/store_app.py)."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from oncely import IdempotencyMiddleware, idempotent
from oncely.stores import store_from_url

app = FastAPI()
app.add_middleware(
    IdempotencyMiddleware,
    store=store_from_url(os.environ.get("ONCELY_STORE_URL", "sqlite:///oncely-test.db")),
    **json.loads(os.environ.get("ONCELY_POLICY", "{}")),
)

EFFECTS_FILE = os.environ.get("ONCELY_EFFECTS_FILE", "effects.jsonl")


class Payment(BaseModel):
    amount: int
    currency: str


def record_effect(key: str | None, path: str) -> str:
    execution_id = uuid.uuid4().hex
    with open(EFFECTS_FILE, "a", encoding="utf-8") as effects:
        effects.write(json.dumps({"key": key, "id": execution_id, "path": path}) + "\n")
    return execution_id


@app.post("/payments", status_code=201)
@idempotent(required=True)
async def create_payment(
    payment: Payment, request: Request, delay: float = 0.0
) -> dict[str, object]:
    if delay:
        await asyncio.sleep(delay)
    payment_id = record_effect(request.headers.get("idempotency-key"), "/payments")
    return {"id": payment_id, "amount": payment.amount, "currency": payment.currency}


@app.post("/effects", status_code=201)
async def effect(request: Request) -> dict[str, object]:
    return {"id": record_effect(request.headers.get("idempotency-key"), "/effects")}


@app.get("/effects")
async def read_effect(request: Request) -> dict[str, object]:
    return {"id": record_effect(request.headers.get("idempotency-key"), "GET /effects")}


@app.post("/stream")
async def stream(request: Request) -> StreamingResponse:
    execution_id = record_effect(request.headers.get("idempotency-key"), "/stream")

    async def chunks() -> AsyncIterator[bytes]:
        for index in range(5):
            await asyncio.sleep(0.01)
            yield f"chunk-{index}-{execution_id}\n".encode()

    return StreamingResponse(chunks(), media_type="text/plain")
