"""The WSGI middleware in real gunicorn (4 sync workers), for a Flask app and a Django
app, on SQLite, Redis and PostgreSQL (SPEC §2, §3, §4)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.gunicorn import run_gunicorn
from tests.support.load import (
    assert_once_per_round,
    executions_per_key,
    read_effects,
    same_key_rounds,
)
from tests.support.rawhttp import post_with_key, raw_request
from tests.support.servers import ServerProcess
from tests.support.services import POSTGRES_URL, REDIS_URL, service_missing

APPS = {
    # Flask preloaded in the master, as many deployments do: workers are forked from it.
    "flask": ("tests.apps.flask_app:app", ("--preload",)),
    "django": ("tests.apps.django_app.wsgi:application", ()),
}
STORES = ("sqlite", "redis", "postgres")
# Short, so that the in-flight test also shows renewal: the first request outlives it.
LEASE = 1.0
VOLATILE = {"date", "server", "idempotent-replayed", "set-cookie"}
PAYMENT = {"amount": 1250, "currency": "NZD"}
# The bar on SQLite; shorter on the network stores to bound the run time.
ROUNDS = {"sqlite": 200, "redis": 50, "postgres": 50}


@dataclass
class Running:
    name: str
    store: str
    server: ServerProcess
    effects: Path
    client: httpx.Client

    def post(
        self,
        key: str | None,
        path: str = "/effects",
        body: object = PAYMENT,
        *,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        all_headers = dict(headers or {})
        if key is not None:
            all_headers["Idempotency-Key"] = key
        return self.client.post(path, json=body, headers=all_headers, params=params)


@contextlib.contextmanager
def store_env(store: str, tmp: Path) -> Iterator[dict[str, str]]:
    """Environment for the test apps: a private SQLite file, Redis prefix or table."""
    if store == "sqlite":
        yield {"ONCELY_STORE_URL": f"sqlite:///{tmp / 'oncely.db'}"}
    elif store == "redis":
        import redis

        from tests.support.redis_fixtures import (
            delete_prefixed,
            redis_unreachable_reason,
            unique_prefix,
        )

        reason = redis_unreachable_reason(REDIS_URL)
        if reason is not None:
            service_missing("redis", reason)
        prefix = unique_prefix()
        yield {
            "ONCELY_STORE_URL": REDIS_URL,
            "ONCELY_STORE_OPTIONS": json.dumps({"prefix": prefix}),
        }
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=5.0)
        try:
            delete_prefixed(client, prefix)
        finally:
            client.close()
    else:
        from tests.support.postgres_fixtures import drop_table, postgres_reachable, unique_table

        reason = postgres_reachable(POSTGRES_URL)
        if reason is not None:
            service_missing("postgres", reason)
        table = unique_table()
        yield {
            "ONCELY_STORE_URL": POSTGRES_URL,
            "ONCELY_STORE_OPTIONS": json.dumps({"table": table}),
        }
        drop_table(POSTGRES_URL, table)


SERVERS = [
    pytest.param(
        (app, store), id=f"{app}-{store}", marks=[pytest.mark.services] if store != "sqlite" else []
    )
    for store in STORES
    for app in APPS
]


@pytest.fixture(scope="module", params=SERVERS)
def app(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Running]:
    name, store = request.param
    target, extra_args = APPS[name]
    tmp = tmp_path_factory.mktemp(f"{name}-{store}")
    with store_env(store, tmp) as store_vars:
        env = {
            **store_vars,
            "ONCELY_EFFECTS_FILE": str(tmp / "effects.jsonl"),
            "ONCELY_POLICY": json.dumps({"lease": LEASE}),
        }
        with (
            run_gunicorn(target, tmp_path=tmp, env=env, extra_args=extra_args) as server,
            httpx.Client(base_url=server.url, timeout=15.0) as client,
        ):
            yield Running(name, store, server, tmp / "effects.jsonl", client)


def comparable(response: httpx.Response) -> tuple[int, list[tuple[str, str]], bytes]:
    headers = [(k, v) for k, v in response.headers.multi_items() if k not in VOLATILE]
    return response.status_code, headers, response.content


def test_replay_is_byte_identical(app: Running) -> None:
    first = app.post("replay-1")
    second = app.post("replay-1")
    assert first.status_code == 201
    assert "idempotent-replayed" not in first.headers
    assert "set-cookie" in first.headers
    assert second.headers["idempotent-replayed"] == "true"
    assert "set-cookie" not in second.headers
    assert comparable(first) == comparable(second)
    assert executions_per_key(app.effects)["replay-1"] == 1


def test_canonical_json_body_is_the_same_request(app: Running) -> None:
    headers = {"Idempotency-Key": "canon", "Content-Type": "application/json"}
    first = app.client.post("/effects", content=b'{"a": 1, "b": 2}', headers=headers)
    second = app.client.post("/effects", content=b'{"b":2,\n "a":1}', headers=headers)
    assert second.headers["idempotent-replayed"] == "true"
    assert first.content == second.content


def test_mismatch_is_422(app: Running) -> None:
    app.post("mismatch-1")
    reused = app.post("mismatch-1", body={"amount": 99, "currency": "NZD"})
    assert reused.status_code == 422
    assert reused.headers["content-type"] == "application/problem+json"
    assert reused.json()["type"].endswith("key-reused-with-different-request")
    assert executions_per_key(app.effects)["mismatch-1"] == 1


def test_in_flight_duplicate_is_409_with_retry_after_even_past_the_lease(app: Running) -> None:
    results: list[httpx.Response] = []
    delay = {"delay": str(LEASE * 1.6)}
    slow = threading.Thread(target=lambda: results.append(app.post("slow-1", params=delay)))
    slow.start()
    time.sleep(LEASE * 1.25)  # past one lease: only renewal keeps the claim
    duplicate = app.post("slow-1", params=delay)
    slow.join(timeout=15)
    assert duplicate.status_code == 409
    assert int(duplicate.headers["retry-after"]) >= 1
    assert duplicate.json()["type"].endswith("request-in-progress")
    assert results[0].status_code == 201
    retry = app.post("slow-1", params=delay)
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.content == results[0].content
    assert executions_per_key(app.effects)["slow-1"] == 1


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
    port = app.server.port
    body = json.dumps(PAYMENT).encode()
    status, head, payload = raw_request(port, post_with_key(port, key, "/effects", body))
    assert status == 400
    assert b"content-type: application/problem+json" in head.lower()
    assert json.loads(payload)["rule"] == rule
    assert not any(e["key"] == key.decode("latin-1") for e in read_effects(app.effects))


def test_tenants_never_see_each_others_records(app: Running) -> None:
    """Two credentials; for Django also two logged-in users (its default scope)."""
    tenants: list[dict[str, str]] = [
        {"Authorization": "Bearer sk_test_123"},
        {"Authorization": "Bearer sk_live_123"},
    ]
    if app.name == "django":
        tenants += [{"X-User": "alice"}, {"X-User": "bob"}]
    firsts = [app.post("shared-key", headers=tenant) for tenant in tenants]
    agains = [app.post("shared-key", headers=tenant) for tenant in tenants]
    assert {first.status_code for first in firsts} == {201}
    assert len({first.content for first in firsts}) == len(tenants)
    assert not any("idempotent-replayed" in first.headers for first in firsts)
    for first, again in zip(firsts, agains, strict=True):
        assert again.headers["idempotent-replayed"] == "true"
        assert again.content == first.content
    assert executions_per_key(app.effects)["shared-key"] == len(tenants)


def test_streaming_response_is_replayed_whole(app: Running) -> None:
    first = app.post("stream-1", "/stream")
    second = app.post("stream-1", "/stream")
    assert first.status_code == 200
    assert first.text.count("chunk-") == 5
    assert second.headers["idempotent-replayed"] == "true"
    assert second.content == first.content
    assert executions_per_key(app.effects)["stream-1"] == 1


def test_route_markers(app: Running) -> None:
    missing = app.post(None, "/payments")
    assert missing.status_code == 400
    assert missing.json()["header"] == "Idempotency-Key"
    paid = app.post("pay-1", "/payments")
    assert app.post("pay-1", "/payments").content == paid.content
    for _ in range(2):
        app.post("hook-1", "/webhooks")
    assert executions_per_key(app.effects)["pay-1"] == 1
    assert executions_per_key(app.effects)["hook-1"] == 2  # exempt: never guarded


@pytest.mark.slow
def test_simultaneous_duplicates_run_once_each(app: Running) -> None:
    rounds = ROUNDS[app.store]
    # A 5 ms handler widens the race window a little, as the ASGI test does.
    url = f"{app.server.url}/effects?delay=0.005"
    result = same_key_rounds(url, rounds=rounds, concurrency=20, deadline_seconds=60)
    assert_once_per_round(result, app.effects, rounds)
    counts = result.status_counts()
    print(f"{app.name}-{app.store}: {rounds} rounds x 20, statuses {dict(counts)}")
