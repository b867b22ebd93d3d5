"""FastAPI: the idempotency context as a dependency.

@app.post("/v1/transfers")
async def transfer(body: Transfer, ctx: IdempotencyContextDep) -> Response: ...
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from oncely.context import IdempotencyContext, idempotency_context


def get_idempotency_context(request: Request) -> IdempotencyContext | None:
    """None when the request carries no key (or its method is not guarded)."""
    return idempotency_context(request)


IdempotencyContextDep = Annotated[IdempotencyContext | None, Depends(get_idempotency_context)]

__all__ = ["IdempotencyContextDep", "get_idempotency_context"]
