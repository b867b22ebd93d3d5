"""The client against a real uvicorn + oncely server, through a proxy that loses responses.

Each mutating call must take effect exactly once and its caller must get the original
response (the id the handler made for that key), replayed when the first one was lost.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import oncely
import oncely.client
from oncely.client import RetryEvent, RetryPolicy, idempotency_key_from
from tests.support.faultproxy import FaultProxy, ProxyStats
from tests.support.servers import ServerProcess, run_uvicorn

CALLS = 1_000
THREADS = 8
# Short sleeps so 1,000 calls with ~250 lost responses take seconds, not minutes; room for
# a 409's Retry-After of 1 s.
POLICY = RetryPolicy(attempts=10, base=0.01, cap=0.2, timeout=30.0, max_retry_after=5.0)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    env = {
        "ONCELY_STORE_PATH": str(tmp_path / "oncely.db"),
        "ONCELY_EFFECTS_PATH": str(tmp_path / "effects.db"),
    }
    with run_uvicorn(
        "tests.apps.client_target_app:app", tmp_path=tmp_path, env=env, workers=1
    ) as running:
        yield running


class Retries:
    """An `on_retry` hook that keeps every event (from any thread)."""

    def __init__(self) -> None:
        self.events: list[RetryEvent] = []
        self._lock = threading.Lock()

    def __call__(self, event: RetryEvent) -> None:
        with self._lock:
            self.events.append(event)

    def count(self, reason: str) -> int:
        return sum(1 for event in self.events if event.reason == reason)


@dataclass(frozen=True)
class Call:
    index: int
    status: int
    body: Any
    key: str | None
    attempts: int
    replayed: bool


def call_of(index: int, response: httpx.Response) -> Call:
    return Call(
        index=index,
        status=response.status_code,
        body=response.json(),
        key=response.request.headers.get("Idempotency-Key"),
        attempts=oncely.client.attempts(response),
        replayed=oncely.client.was_replayed(response),
    )


def check_exactly_once(
    server: ServerProcess, calls: list[Call], stats: ProxyStats, retries: Retries
) -> dict[str, int]:
    effects = httpx.get(f"{server.url}/effects", timeout=10).json()
    by_key = {effect["key"]: effect for effect in effects}
    assert len(effects) == len(calls), "a call took effect twice, or not at all"
    assert len(by_key) == len(calls)
    assert {call.key for call in calls} == set(by_key)
    for call in calls:
        assert call.status == 201, call
        # The original response: the id the one execution made for this key.
        assert call.body == {"id": by_key[call.key]["id"], "key": call.key}, call
        assert by_key[call.key]["body"] == f'{{"n":{call.index}}}'
    # Each lost response made its call retry and get the stored response replayed; a
    # reset never reached the server, so its retry ran the handler the first time.
    replayed = {call.key for call in calls if call.replayed}
    assert stats.dropped > 0
    assert replayed == set(stats.dropped_keys)
    in_progress = retries.count("409 request-in-progress")
    assert sum(call.attempts - 1 for call in calls) == stats.dropped + stats.resets + in_progress
    assert len(retries.events) == stats.dropped + stats.resets + in_progress
    assert stats.errors == 0
    return {
        "calls": len(calls),
        "effects": len(effects),
        "dropped": stats.dropped,
        "resets": stats.resets,
        "replayed": len(replayed),
        "in_progress_409": in_progress,
        "max_attempts": max(call.attempts for call in calls),
    }


def run_sync_calls(client: httpx.Client, count: int) -> list[Call]:
    def one(index: int) -> Call:
        return call_of(index, client.post("/payments", json={"n": index}))

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(one, range(count)))


def test_oncely_client_exactly_once_through_lost_responses(server: ServerProcess) -> None:
    retries = Retries()
    started = time.monotonic()
    with (
        FaultProxy(server.port, seed=20, drop_rate=0.2) as proxy,
        oncely.Client(
            base_url=proxy.url, timeout=10.0, retry_policy=POLICY.with_(on_retry=retries)
        ) as client,
    ):
        calls = run_sync_calls(client, CALLS)
        stats = proxy.stats
    summary = check_exactly_once(server, calls, stats, retries)
    print(f"\noncely.Client: {summary}, {time.monotonic() - started:.1f} s")
    assert 150 < stats.dropped < 400  # ~20% of ~1,250 attempts


def test_plain_httpx_with_retry_transport_through_drops_and_resets(
    server: ServerProcess,
) -> None:
    retries = Retries()
    started = time.monotonic()
    transport = oncely.RetryTransport(policy=POLICY.with_(on_retry=retries))
    with (
        FaultProxy(server.port, seed=21, drop_rate=0.2, reset_rate=0.05) as proxy,
        httpx.Client(base_url=proxy.url, timeout=10.0, transport=transport) as client,
    ):
        calls = run_sync_calls(client, CALLS)
        stats = proxy.stats
    summary = check_exactly_once(server, calls, stats, retries)
    print(f"\nhttpx.Client + RetryTransport: {summary}, {time.monotonic() - started:.1f} s")
    assert stats.resets > 0
    # A call whose only failure was a reset was not replayed: the server never saw it.
    assert any(call.attempts > 1 and not call.replayed for call in calls)


@pytest.mark.anyio
async def test_async_client_exactly_once_through_lost_responses(server: ServerProcess) -> None:
    retries = Retries()
    started = time.monotonic()
    count = 300
    calls: list[Call] = []
    with FaultProxy(server.port, seed=22, drop_rate=0.2, delay=0.005, delay_rate=0.1) as proxy:
        async with oncely.AsyncClient(
            base_url=proxy.url, timeout=10.0, retry_policy=POLICY.with_(on_retry=retries)
        ) as client:
            indexes = iter(range(count))

            async def worker() -> None:
                for index in indexes:  # shared: each index is taken once
                    calls.append(call_of(index, await client.post("/payments", json={"n": index})))

            with anyio.fail_after(60):
                async with anyio.create_task_group() as group:
                    for _ in range(THREADS):
                        group.start_soon(worker)
        stats = proxy.stats
    summary = check_exactly_once(server, sorted(calls, key=lambda c: c.index), stats, retries)
    print(f"\noncely.AsyncClient: {summary}, {time.monotonic() - started:.1f} s")
    assert stats.delayed > 0


def test_a_concurrent_duplicate_waits_out_the_409_and_gets_the_replay(
    server: ServerProcess,
) -> None:
    retries = Retries()
    key = idempotency_key_from("client-e2e", "payment-request-1")
    responses: list[httpx.Response] = []

    def send() -> None:
        with oncely.Client(
            base_url=server.url, timeout=10.0, retry_policy=POLICY.with_(on_retry=retries)
        ) as client:
            response = client.post(
                "/payments?slow=0.5", content=b'{"n":1}', headers={"Idempotency-Key": key}
            )
            response.read()
            responses.append(response)

    threads = [threading.Thread(target=send) for _ in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.1)  # the first is (most likely) inside its slow handler by now
    for thread in threads:
        thread.join(timeout=15)
    original, duplicate = sorted(responses, key=oncely.client.was_replayed)
    assert original.status_code == duplicate.status_code == 201
    assert duplicate.json() == original.json()
    assert not oncely.client.was_replayed(original)
    assert oncely.client.was_replayed(duplicate)
    assert oncely.client.attempts(duplicate) >= 2
    assert retries.count("409 request-in-progress") >= 1
    assert retries.events[0].sleep == 1.0  # the server's Retry-After, not the backoff
    effects = httpx.get(f"{server.url}/effects", timeout=10).json()
    assert [effect["key"] for effect in effects] == [key]
