"""The demo's /metrics after a scripted session: each counter has exactly its value.

The session, against `oncely demo` on SQLite with a slow bank (every POST takes 300 ms):
a fresh account, its replay, the key reused with another body, a duplicate while the
first is in flight, a bad key and a missing key, then a fresh transfer and its replay.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.servers import ServerProcess, free_port, start_process

pytestmark = pytest.mark.slow

_SCRIPT = Path(sys.executable).parent / "oncely"
ONCELY = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "oncely.cli"]
AUTH = {"Authorization": "Bearer sk_test_metrics"}
LATENCY_MS = 300


@contextlib.contextmanager
def demo(cwd: Path) -> Iterator[ServerProcess]:
    port = free_port()
    argv = [
        *ONCELY, "demo", "--port", str(port), "--log-level", "warning",
        "--store", f"sqlite:///{cwd / 'oncely.db'}", "--latency", str(LATENCY_MS),
    ]  # fmt: skip
    server = start_process(
        argv, port=port, cwd=cwd, log_path=cwd / "demo.log", env={"ONCELY_STORE": ""}
    )
    try:
        yield server
    finally:
        server.stop()


def post(http: httpx.Client, path: str, body: dict[str, Any], key: str | None) -> httpx.Response:
    headers = dict(AUTH) if key is None else {**AUTH, "Idempotency-Key": key}
    return http.post(path, json=body, headers=headers)


def account(name: str, balance: int = 10_000) -> dict[str, Any]:
    return {"name": name, "institution": "Kiwibank", "balance": balance, "currency": "NZD"}


def scrape(http: httpx.Client) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_counters_after_a_scripted_session(tmp_path: Path) -> None:
    with demo(tmp_path) as server, server.client() as http:
        before = scrape(http)  # the completion series exist (at 0) before any request
        stored_2xx = frozenset({("result", "stored"), ("status_class", "2xx")})
        assert before[("oncely_completions_total", stored_2xx)] == 0

        alice = post(http, "/v1/accounts", account("Alice"), "open-alice")
        assert alice.status_code == 201
        replay = post(http, "/v1/accounts", account("Alice"), "open-alice")
        assert replay.status_code == 201
        assert replay.headers["idempotent-replayed"] == "true"
        assert post(http, "/v1/accounts", account("Mallory"), "open-alice").status_code == 422

        slow: list[httpx.Response] = []
        first = threading.Thread(
            target=lambda: slow.append(post(http, "/v1/accounts", account("Bob"), "open-bob"))
        )
        first.start()
        time.sleep(LATENCY_MS / 3000)  # Bob's claim is in flight: the bank takes 300 ms
        with server.client() as other:
            duplicate = post(other, "/v1/accounts", account("Bob"), "open-bob")
        first.join()
        assert duplicate.status_code == 409
        assert slow[0].status_code == 201

        assert post(http, "/v1/accounts", account("Eve"), "k" * 256).status_code == 400
        assert post(http, "/v1/accounts", account("Eve"), None).status_code == 400

        transfer = {
            "from_account": alice.json()["id"],
            "to_account": slow[0].json()["id"],
            "amount": 2500,
        }
        key = f"transfer-{uuid.uuid4()}"
        assert post(http, "/v1/transfers", transfer, key).status_code == 201
        assert post(http, "/v1/transfers", transfer, key).status_code == 201

        after = scrape(http)
        log = server.log()

    def value(name: str, **labels: str) -> float:
        return after.get((name, frozenset(labels.items())), 0.0)

    def requests(outcome: str, route: str) -> float:
        return value(
            "oncely_requests_total", outcome=outcome, method="POST", route=route, store="sqlite"
        )

    assert requests("claimed", "/v1/accounts") == 2  # Alice, Bob
    assert requests("replayed", "/v1/accounts") == 1
    assert requests("mismatch", "/v1/accounts") == 1
    assert requests("in-progress", "/v1/accounts") == 1
    assert requests("rejected", "/v1/accounts") == 2  # a bad key, a missing key
    assert requests("claimed", "/v1/transfers") == 1
    assert requests("replayed", "/v1/transfers") == 1
    total = sum(v for (name, _), v in after.items() if name == "oncely_requests_total")
    assert total == 9  # each request counted once
    assert value("oncely_completions_total", result="stored", status_class="2xx") == 3
    assert value("oncely_completions_total", result="released", status_class="4xx") == 0
    assert value("oncely_in_flight", store="sqlite") == 0
    claims = value("oncely_store_operation_seconds_count", operation="claim", store="sqlite")
    assert claims == 7  # every request that reached the store; the 400s did not
    completes = value("oncely_store_operation_seconds_count", operation="complete", store="sqlite")
    assert completes == 3
    for route in ("/v1/accounts", "/v1/transfers"):
        handled = value("oncely_handler_seconds_count", route=route)
        slowest = value("oncely_handler_seconds_sum", route=route)
        assert handled == (2 if route == "/v1/accounts" else 1)
        assert slowest >= handled * LATENCY_MS / 1000
    # No raw path, key or token in any label.
    labels = " ".join(f"{k}={v}" for (_, pairs), _ in after.items() for k, v in pairs)
    assert "open-alice" not in labels
    assert "sk_test" not in labels
    assert "transfer-" not in labels
    assert "Traceback" not in log
