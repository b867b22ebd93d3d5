"""Views, URLs and a stand-in authentication middleware for the Django test project."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from django.db import connection, transaction
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    JsonResponse,
    StreamingHttpResponse,
)
from django.urls import path

from oncely.integrations.django import LeaseLost, complete_in_transaction, exempt, idempotent

EFFECTS_FILE = os.environ.get("ONCELY_EFFECTS_FILE", "effects.jsonl")
# POST /transfers completes its record in its transaction unless this is "0".
TRANSACTIONAL = os.environ.get("ONCELY_DJANGO_TRANSACTIONAL", "1") != "0"
# Test hook for the crash test: after the commit, append the key to this file and sleep
# (once per key: a rerun after the crash does not stop again).
COMMIT_MARKER = os.environ.get("ONCELY_DJANGO_COMMIT_MARKER")
AFTER_COMMIT_SLEEP = float(os.environ.get("ONCELY_DJANGO_AFTER_COMMIT_SLEEP", "0"))


@dataclass(frozen=True)
class User:
    pk: str
    is_authenticated: bool = True


ANONYMOUS = User(pk="", is_authenticated=False)


class HeaderUserMiddleware:
    """Stands in for AuthenticationMiddleware: `X-User: alice` logs in as alice.

    It comes before oncely's middleware, as AuthenticationMiddleware must.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        name = request.headers.get("X-User")
        request.user = User(pk=name) if name else ANONYMOUS  # type: ignore[assignment]
        return self.get_response(request)


def record_effect(request: HttpRequest, path: str) -> str:
    execution_id = uuid.uuid4().hex
    line = json.dumps(
        {
            "key": request.headers.get("Idempotency-Key"),
            "id": execution_id,
            "pid": os.getpid(),
            "path": path,
            "body": request.body.decode("utf-8", "replace"),
        }
    )
    with open(EFFECTS_FILE, "a", encoding="utf-8") as effects:
        effects.write(line + "\n")
    return execution_id


def slow_down(request: HttpRequest) -> None:
    delay = request.GET.get("delay")
    if delay:
        time.sleep(min(float(delay), 60.0))


def effects(request: HttpRequest) -> HttpResponse:
    slow_down(request)
    execution_id = record_effect(request, "/effects")
    response = JsonResponse(
        {"id": execution_id, "echo": request.body.decode("utf-8", "replace")}, status=201
    )
    response["X-Execution-Id"] = execution_id
    response.set_cookie("session", "secret")
    return response


@idempotent(required=True)
def payments(request: HttpRequest) -> HttpResponse:
    slow_down(request)
    payment = json.loads(request.body)
    execution_id = record_effect(request, "/payments")
    return JsonResponse({"id": execution_id, "amount": payment["amount"]}, status=201)


@exempt
def webhooks(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"id": record_effect(request, "/webhooks")})


def stream(request: HttpRequest) -> StreamingHttpResponse:
    execution_id = record_effect(request, "/stream")

    def chunks() -> Iterator[bytes]:
        for index in range(5):
            time.sleep(0.01)
            yield f"chunk-{index}-{execution_id}\n".encode()

    return StreamingHttpResponse(chunks(), content_type="text/plain")


def create_tables() -> None:
    """The transfers table, model-free, when a database is configured (at start-up)."""
    from django.conf import settings

    if not settings.DATABASES:
        return
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql":  # two workers start at once
            cursor.execute("SELECT pg_advisory_xact_lock(hashtext('demo_transfers'))")
        cursor.execute(
            "CREATE TABLE IF NOT EXISTS demo_transfers "
            "(id VARCHAR(32) PRIMARY KEY, idempotency_key VARCHAR(255), amount INTEGER)"
        )
    connection.close()


def transfers(request: HttpRequest) -> HttpResponse:
    """Inserts a transfer and, in the same transaction, completes the oncely record."""
    key = request.headers.get("Idempotency-Key")
    amount = int(json.loads(request.body or b"{}").get("amount", 0))
    transfer_id = uuid.uuid4().hex
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO demo_transfers (id, idempotency_key, amount) VALUES (%s, %s, %s)",
                [transfer_id, key, amount],
            )
        response = JsonResponse({"id": transfer_id, "amount": amount}, status=201)
        response["X-Transfer-Id"] = transfer_id
        if TRANSACTIONAL and not complete_in_transaction(request, response):
            raise LeaseLost  # rolls the insert back; oncely answers 409
    if COMMIT_MARKER and key:
        after_commit(key)
    return response


def after_commit(key: str) -> None:
    with open(COMMIT_MARKER or "", "a+", encoding="utf-8") as marker:
        marker.seek(0)
        if key in marker.read().split():
            return
        marker.write(key + "\n")
    time.sleep(AFTER_COMMIT_SLEEP)  # the crash test kills the server here


def healthz(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok")


urlpatterns = [
    path("effects", effects),
    path("payments", payments),
    path("webhooks", webhooks),
    path("stream", stream),
    path("healthz", healthz),
    path("transfers", transfers),
]
