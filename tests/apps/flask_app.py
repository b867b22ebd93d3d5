"""A Flask app behind oncely (the extension, configured from app.config), for tests.

ONCELY_STORE_URL      store URL (oncely.stores.store_from_url); default memory://
ONCELY_STORE_OPTIONS  JSON object of store constructor keywords (a Redis prefix, a table)
ONCELY_EFFECTS_FILE   one JSON line is appended per handler execution
ONCELY_POLICY         JSON object of policy options, e.g. {"lease": 1, "mismatch_status": 409}
`?delay=<seconds>`    the mutating handlers sleep that long before their effect

`tests.apps.flask_app:app` is also the minimal Flask app for the WSGI benchmark row.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator

from flask import Flask, Response, jsonify, request

from oncely.integrations.flask import Oncely, exempt, idempotent

EFFECTS_FILE = os.environ.get("ONCELY_EFFECTS_FILE", "effects.jsonl")

app = Flask(__name__)
app.config["ONCELY_STORE"] = os.environ.get("ONCELY_STORE_URL", "memory://")
app.config["ONCELY_STORE_OPTIONS"] = json.loads(os.environ.get("ONCELY_STORE_OPTIONS", "{}"))
app.config["ONCELY_POLICY"] = json.loads(os.environ.get("ONCELY_POLICY", "{}"))
Oncely(app)


def record_effect(path: str) -> str:
    execution_id = uuid.uuid4().hex
    line = json.dumps(
        {
            "key": request.headers.get("Idempotency-Key"),
            "id": execution_id,
            "pid": os.getpid(),
            "path": path,
            "body": request.get_data(as_text=True),
        }
    )
    # O_APPEND writes of one short line are atomic across worker processes.
    with open(EFFECTS_FILE, "a", encoding="utf-8") as effects:
        effects.write(line + "\n")
    return execution_id


def slow_down() -> None:
    delay = request.args.get("delay")
    if delay:
        time.sleep(min(float(delay), 60.0))


@app.route("/effects", methods=["POST", "PUT", "PATCH", "DELETE", "GET"])
def effects() -> Response:
    slow_down()
    execution_id = record_effect("/effects")
    response = jsonify({"id": execution_id, "echo": request.get_data(as_text=True)})
    response.status_code = 201
    response.headers["X-Execution-Id"] = execution_id
    response.set_cookie("session", "secret")
    return response


@app.post("/payments")
@idempotent(required=True)
def payments() -> tuple[Response, int]:
    slow_down()
    payment = request.get_json()
    execution_id = record_effect("/payments")
    return jsonify({"id": execution_id, "amount": payment["amount"]}), 201


@app.post("/webhooks")
@exempt
def webhooks() -> Response:
    return jsonify({"id": record_effect("/webhooks")})


@app.post("/stream")
def stream() -> Response:
    execution_id = record_effect("/stream")

    def chunks() -> Iterator[str]:
        for index in range(5):
            time.sleep(0.01)
            yield f"chunk-{index}-{execution_id}\n"

    return Response(chunks(), mimetype="text/plain")


@app.post("/fail")
def fail() -> Response:
    record_effect("/fail")
    raise RuntimeError("handler failed after its effect")


@app.get("/healthz")
def healthz() -> str:
    return "ok"
