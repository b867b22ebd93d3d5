"""`benchmarks.run --patch` file: oncely with parts knocked out, to weigh them in the server.

Which part goes depends on the variant's store (BENCH_STORE), so that one run measures
all three beside the unchanged code and the bare app:

    .venv-bench/bin/python -m benchmarks.run --patch benchmarks/experiments/knockouts.py \\
        --variants fastapi/oncely-memory,fastapi/oncely-sqlite,fastapi/oncely-redis \\
        --scenarios fresh --scale 0 --no-wsgi --profile 0

- `oncely-memory+patched`: no fingerprint (`fingerprint=None`), memory store;
- `oncely-sqlite+patched`: the fingerprint, and a memory store that keeps nothing;
- `oncely-redis+patched`: neither: what is left is the adapter alone (admission and key
  rules, tenant, token, context, lease keeper, response capture).
"""

from __future__ import annotations

import os
from typing import Any

from benchmarks.apps import asgi as apps
from benchmarks.apps.keeps_nothing import KeepsNothing

import oncely
from oncely.stores import MemoryStore

STORE = os.environ.get("BENCH_STORE", "")


class KnockedOut(oncely.IdempotencyMiddleware):
    def __init__(self, app: Any, *, store: Any, **options: Any) -> None:
        if STORE in ("sqlite", "redis"):
            store = KeepsNothing()
        if STORE in ("memory", "redis"):
            options["fingerprint"] = None
        super().__init__(app, store=store, **options)


def _memory_only(store: str, url: str, namespace: str) -> Any:
    return MemoryStore()  # the patched servers never touch SQLite or Redis


oncely.IdempotencyMiddleware = KnockedOut  # type: ignore[misc]
apps.oncely_store = _memory_only
