"""The ASGI middleware in real uvicorn processes, over real sockets (SPEC §2, §3)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from oncely.core.records import RecordState
from oncely.stores import SQLiteStore
from tests.support.load import executions_per_key, read_effects
from tests.support.rawhttp import post_with_key, raw_request
from tests.support.servers import ServerProcess, run_uvicorn

APPS = {
    "fastapi": ("tests.apps.fastapi_app:app", "/payments"),
    "starlette": ("tests.apps.store_app:app", "/effects"),
}
PAYMENT = {"amount": 1250, "currency": "NZD"}
VOLATILE = {"date", "server", "idempotent-replayed", "set-cookie"}


class Running:
    def __init__(self, server: ServerProcess, effects: Path, db: Path, path: str) -> None:
        self.server, self.effects, self.db, self.path = server, effects, db, path
        self.client = httpx.Client(base_url=server.url, timeout=10.0)

    def post(
        self,
        key: str | None,
        body: object = PAYMENT,
        path: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        all_headers = dict(headers or {})
        if key is not None:
            all_headers["Idempotency-Key"] = key
        return self.client.post(path or self.path, json=body, headers=all_headers, params=params)

    def post_raw(self, key: str, content: bytes) -> httpx.Response:
        headers = {"Idempotency-Key": key, "content-type": "application/json"}
        return self.client.post(self.path, content=content, headers=headers)


@pytest.fixture(scope="module", params=sorted(APPS))
def app(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Running]:
    target, path = APPS[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    env = {
        "ONCELY_STORE_URL": f"sqlite:///{tmp / 'oncely.db'}",
        "ONCELY_EFFECTS_FILE": str(tmp / "effects.jsonl"),
    }
    with run_uvicorn(target, tmp_path=tmp, env=env) as server:
        running = Running(server, tmp / "effects.jsonl", tmp / "oncely.db", path)
        yield running
        running.client.close()


def comparable(response: httpx.Response) -> tuple[int, list[tuple[str, str]], bytes]:
    headers = [(k, v) for k, v in response.headers.multi_items() if k not in VOLATILE]
    return response.status_code, headers, response.content


def test_replay_is_byte_identical(app: Running) -> None:
    first = app.post("replay-1")
    second = app.post("replay-1")
    assert first.status_code == 201
    assert "idempotent-replayed" not in first.headers
    assert second.headers["idempotent-replayed"] == "true"
    assert comparable(first) == comparable(second)
    assert executions_per_key(app.effects)["replay-1"] == 1


def test_canonical_json_body_is_the_same_request(app: Running) -> None:
    first = app.post_raw("canon", b'{"amount": 1250, "currency": "NZD"}')
    second = app.post_raw("canon", b'{"currency":"NZD",\n "amount":1250}')
    assert second.headers["idempotent-replayed"] == "true"
    assert first.content == second.content


def test_mismatch_is_422(app: Running) -> None:
    app.post("mismatch-1")
    reused = app.post("mismatch-1", {"amount": 99, "currency": "NZD"})
    assert reused.status_code == 422
    assert reused.headers["content-type"] == "application/problem+json"
    assert reused.json()["type"].endswith("key-reused-with-different-request")
    assert executions_per_key(app.effects)["mismatch-1"] == 1


def test_in_flight_duplicate_is_409_with_retry_after(app: Running) -> None:
    results: list[httpx.Response] = []
    slow = threading.Thread(
        target=lambda: results.append(app.post("slow-1", params={"delay": "1.0"}))
    )
    slow.start()
    time.sleep(0.3)
    duplicate = app.post("slow-1", params={"delay": "1.0"})
    slow.join(timeout=10)
    assert duplicate.status_code == 409
    assert int(duplicate.headers["retry-after"]) >= 1
    assert duplicate.json()["type"].endswith("request-in-progress")
    assert results[0].status_code == 201
    # Once the first has finished, the retry gets its response (never a second run).
    retry = app.post("slow-1", params={"delay": "1.0"})
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.content == results[0].content
    assert executions_per_key(app.effects)["slow-1"] == 1


def test_get_ignores_the_key(app: Running) -> None:
    for _ in range(2):
        response = app.client.get("/effects", headers={"Idempotency-Key": "get-1"})
        assert response.is_success
        assert "idempotent-replayed" not in response.headers
    assert executions_per_key(app.effects)["get-1"] == 2


def test_credentials_never_see_each_others_records(app: Running) -> None:
    test_key = {"Authorization": "Bearer sk_test_123"}
    live_key = {"Authorization": "Bearer sk_live_123"}
    a = app.post("shared-key", headers=test_key)
    b = app.post("shared-key", headers=live_key)
    again = app.post("shared-key", headers=test_key)
    assert a.status_code == b.status_code == 201
    assert a.content != b.content
    assert "idempotent-replayed" not in b.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == a.content
    assert executions_per_key(app.effects)["shared-key"] == 2


@pytest.mark.parametrize(
    ("key", "rule"),
    [
        (b"k" * 256, "too-long"),
        (b"", "empty"),
        (b"tab\there", "not-visible-ascii"),
        ("caf\u00e9".encode(), "not-visible-ascii"),
    ],
)
def test_bad_keys_get_400_problems(app: Running, key: bytes, rule: str) -> None:
    body = json.dumps(PAYMENT).encode()
    status, head, payload = raw_request(
        app.server.port, post_with_key(app.server.port, key, app.path, body)
    )
    assert status == 400
    assert b"content-type: application/problem+json" in head.lower()
    assert json.loads(payload)["rule"] == rule
    assert not any(e["key"] == key.decode("latin-1") for e in read_effects(app.effects))


def test_streaming_response_is_replayed_whole(app: Running) -> None:
    first = app.post("stream-1", path="/stream")
    second = app.post("stream-1", path="/stream")
    assert first.status_code == 200
    assert first.text.count("chunk-") == 5
    assert second.headers["idempotent-replayed"] == "true"
    assert second.content == first.content
    assert executions_per_key(app.effects)["stream-1"] == 1


def test_fastapi_route_marker_requires_the_key(app: Running) -> None:
    response = app.post(None)
    if app.path == "/payments":
        assert response.status_code == 400
        assert response.json()["header"] == "Idempotency-Key"
    else:
        assert response.status_code == 201  # no marker, key optional by default


def test_retention_expiry_frees_the_key(tmp_path: Path) -> None:
    env = {
        "ONCELY_STORE_URL": f"sqlite:///{tmp_path / 'oncely.db'}",
        "ONCELY_EFFECTS_FILE": str(tmp_path / "effects.jsonl"),
        "ONCELY_POLICY": json.dumps({"retention": 1, "mismatch_status": 409}),
    }
    with (
        run_uvicorn("tests.apps.store_app:app", tmp_path=tmp_path, env=env) as server,
        server.client() as client,
    ):
        first = client.post("/effects", json={"n": 1}, headers={"Idempotency-Key": "ttl"})
        reused = client.post("/effects", json={"n": 2}, headers={"Idempotency-Key": "ttl"})
        assert reused.status_code == 409  # the configured mismatch status
        time.sleep(1.3)
        fresh = client.post("/effects", json={"n": 2}, headers={"Idempotency-Key": "ttl"})
    assert first.status_code == fresh.status_code == 201
    assert "idempotent-replayed" not in fresh.headers
    assert executions_per_key(tmp_path / "effects.jsonl")["ttl"] == 2


def test_killed_worker_leaves_a_claim_that_a_retry_takes_over(tmp_path: Path) -> None:
    db = tmp_path / "oncely.db"
    env = {
        "ONCELY_STORE_URL": f"sqlite:///{db}",
        "ONCELY_EFFECTS_FILE": str(tmp_path / "effects.jsonl"),
        # Long enough that the restarted server still finds the dead worker's lease alive.
        "ONCELY_POLICY": json.dumps({"lease": 2.5}),
    }
    lost: list[BaseException] = []
    with run_uvicorn("tests.apps.store_app:app", tmp_path=tmp_path, env=env) as server:

        def doomed() -> None:
            try:
                with server.client() as client:
                    client.post(
                        "/effects",
                        params={"delay": "30"},
                        json={},
                        headers={"Idempotency-Key": "crash"},
                    )
            except httpx.HTTPError as error:
                lost.append(error)

        caller = threading.Thread(target=doomed)
        caller.start()
        time.sleep(0.6)
        server.kill()  # SIGKILL mid-request: no completion, no release
        caller.join(timeout=10)
    assert lost, "the caller should have lost its connection"
    store = SQLiteStore(db)
    try:
        record = store.get_sync("anonymous", "crash")
        assert record is not None
        assert record.state is RecordState.IN_FLIGHT
        with (
            run_uvicorn("tests.apps.store_app:app", tmp_path=tmp_path, env=env) as server,
            server.client() as client,
        ):
            lease_expires_at = record.lease_expires_at
            assert lease_expires_at is not None
            sent_at = time.time()
            retry = client.post(
                "/effects", params={"delay": "30"}, json={}, headers={"Idempotency-Key": "crash"}
            )
            if retry.status_code == 409:  # refused while the dead worker's lease was alive
                assert sent_at < lease_expires_at + 0.25
                time.sleep(max(lease_expires_at - time.time(), 0.0) + 0.2)
                retry = client.post("/effects", params={"delay": "30"}, json={},
                                    headers={"Idempotency-Key": "crash"}, timeout=40)  # fmt: skip
            else:  # the lease had lapsed by the time the new server answered
                assert time.time() > lease_expires_at
        assert retry.status_code == 201
        taken_over = store.get_sync("anonymous", "crash")
        assert taken_over is not None
        assert taken_over.state is RecordState.COMPLETED
        assert taken_over.attempts == 2
    finally:
        store.close()
