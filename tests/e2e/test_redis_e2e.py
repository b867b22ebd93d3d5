"""The Redis store under real uvicorn workers: simultaneous duplicates run once, and an
outage of the store fails closed and loses nothing (SPEC §3, §4)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from tests.support.load import (
    assert_once_per_round,
    executions_per_key,
    read_effects,
    same_key_rounds,
)
from tests.support.redis_fixtures import delete_prefixed, private_redis, unique_prefix
from tests.support.servers import ServerProcess, run_uvicorn

APP = "tests.apps.store_app:app"


@pytest.fixture
def shared_redis_prefix(redis_url: str) -> Iterator[str]:
    prefix = unique_prefix()
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        delete_prefixed(client, prefix)
    finally:
        client.close()


@pytest.mark.slow
def test_200_rounds_of_20_simultaneous_duplicates_run_once_each(
    tmp_path: Path, redis_url: str, shared_redis_prefix: str
) -> None:
    effects = tmp_path / "effects.jsonl"
    env = {
        "ONCELY_STORE_URL": f"{redis_url}?prefix={shared_redis_prefix}",
        "ONCELY_EFFECTS_FILE": str(effects),
        "ONCELY_HANDLER_DELAY": "0.005",  # widen the race window a little
    }
    with run_uvicorn(APP, tmp_path=tmp_path, env=env, workers=4) as server:
        result = same_key_rounds(f"{server.url}/effects", rounds=200, concurrency=20)
        log = server.log()
    executions = assert_once_per_round(result, effects, 200, log)
    assert sum(executions.values()) == 200
    assert result.status_counts()[409] > 0, "duplicates should have met a request in flight"


# the store goes away in the middle of a run -----------------------------------------


@dataclass
class Ledger:
    """Every answer each key got, in order."""

    answers: dict[str, list[httpx.Response]] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    def first_success(self, key: str) -> httpx.Response:
        return next(r for r in self.answers[key] if r.status_code == 201)


def send(server: ServerProcess, ledger: Ledger, keys: list[str], copies: int) -> None:
    """`copies` simultaneous POSTs of each key, all keys at once."""

    async def one(client: httpx.AsyncClient, key: str) -> tuple[str, httpx.Response, float]:
        started = time.monotonic()
        response = await client.post(
            "/effects", json={"key": key}, headers={"Idempotency-Key": key}
        )
        return key, response, time.monotonic() - started

    async def all_of_them() -> list[tuple[str, httpx.Response, float]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as client:
            return await asyncio.gather(*(one(client, k) for k in keys for _ in range(copies)))

    for key, response, latency in asyncio.run(all_of_them()):
        ledger.answers.setdefault(key, []).append(response)
        ledger.latencies.append(latency)


def new_keys(label: str, count: int) -> list[str]:
    return [f"{label}-{index}-{uuid.uuid4().hex[:8]}" for index in range(count)]


@pytest.mark.slow
def test_a_store_outage_fails_closed_and_loses_nothing(tmp_path: Path) -> None:
    effects = tmp_path / "effects.jsonl"
    aof = ("--appendonly", "yes", "--appendfsync", "always")
    with private_redis(tmp_path, *aof) as store_server:
        env = {
            "ONCELY_STORE_URL": f"{store_server.url}?socket_timeout=1",
            "ONCELY_EFFECTS_FILE": str(effects),
        }
        with run_uvicorn(APP, tmp_path=tmp_path, env=env, workers=2) as app:
            before = Ledger()
            before_keys = []
            for _ in range(5):
                keys = new_keys("before", 6)
                before_keys += keys
                send(app, before, keys, copies=2)
            assert len(read_effects(effects)) == len(before_keys)

            store_server.stop()  # SIGTERM in the middle of the run
            during = Ledger()
            during_keys = new_keys("during", 10)
            send(app, during, during_keys + before_keys[:10], copies=2)
            effects_while_down = len(read_effects(effects))

            store_server.start()  # same port, same directory: it replays its AOF
            after = Ledger()
            deadline = time.monotonic() + 15
            probe = new_keys("probe", 1)
            send(app, after, probe, copies=1)
            while after.answers[probe[0]][-1].status_code != 201:
                assert time.monotonic() < deadline, "traffic did not resume"
                time.sleep(0.2)
                send(app, after, probe, copies=1)
            send(app, after, during_keys, copies=2)  # the clients' retries
            send(app, after, before_keys, copies=1)  # replays from the restarted store
            after_keys = new_keys("after", 10)
            send(app, after, after_keys, copies=2)
            log = app.log()

    # While down: 503 + Retry-After, quickly, and no handler ran.
    assert effects_while_down == len(before_keys), log
    for responses in during.answers.values():
        for response in responses:
            assert response.status_code == 503, response.text
            assert int(response.headers["retry-after"]) > 0
            assert response.headers["content-type"] == "application/problem+json"
    assert max(during.latencies) < 2.0
    # Before and after: every key ran exactly once, and the outage lost no record.
    executions = executions_per_key(effects)
    for key in before_keys + during_keys + after_keys + probe:
        assert executions[key] == 1, (key, executions[key], log)
    assert sum(executions.values()) == len(before_keys + during_keys + after_keys + probe)
    for key in before_keys:
        replay = after.answers[key][-1]
        assert replay.status_code == 201
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.json() == before.first_success(key).json()
    for key in during_keys + after_keys:
        assert {r.status_code for r in after.answers[key]} <= {201, 409}
        assert any(r.status_code == 201 for r in after.answers[key])
    for key in before_keys:
        assert {r.status_code for r in before.answers[key]} <= {201, 409}
