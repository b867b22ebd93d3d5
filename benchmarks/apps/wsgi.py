"""The WSGI app under test: the same POST handler in Flask, bare or behind oncely.

Environment as in `benchmarks.apps.asgi` (BENCH_LIBRARY bare | oncely, BENCH_STORE
memory | sqlite). Served by `gunicorn 'benchmarks.apps.wsgi:create_app()'`.
"""

from __future__ import annotations

import os
from typing import Any

EXECUTIONS = 0


def create_app() -> Any:
    from flask import Flask, jsonify, request

    app = Flask(__name__)

    @app.post("/payments")
    def create_payment() -> Any:
        global EXECUTIONS
        EXECUTIONS += 1
        payload = request.get_json()
        return jsonify(
            id=f"pay_{EXECUTIONS}",
            amount=payload.get("amount"),
            currency=payload.get("currency"),
            status="accepted",
        ), 201

    @app.get("/__bench/count")
    def count() -> Any:
        return jsonify(executions=EXECUTIONS)

    if os.environ.get("BENCH_LIBRARY", "bare") == "oncely":
        from benchmarks.apps.asgi import oncely_store
        from benchmarks.apps.preload import memory_store
        from oncely.wsgi import IdempotencyMiddleware

        store = oncely_store(
            os.environ.get("BENCH_STORE", "memory"),
            os.environ.get("BENCH_STORE_URL", ""),
            os.environ.get("BENCH_NAMESPACE", "oncely_bench"),
        )
        memory_store(store, int(os.environ.get("BENCH_PRELOAD", "0")))
        app.wsgi_app = IdempotencyMiddleware(app.wsgi_app, store=store)  # type: ignore[method-assign]
    from benchmarks.apps.asgi import tune_gc

    tune_gc()
    return app
