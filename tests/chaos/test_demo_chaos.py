"""Chaos: 8 clients make 2,000 transfers through a proxy that loses 20% of the responses
and resets 5% of the connections. Every transfer must take effect exactly once, no money
may appear or vanish, and every caller must end up with the original response.

The demo runs as `oncely demo` (a subprocess, SQLite store); the clients are oncely's
own `oncely.Client` with a fast retry policy.
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import oncely
import oncely.client
from oncely.client import RetryEvent, RetryPolicy
from oncely.demo.auth import workspace_scope
from oncely.stores import SQLiteStore
from tests.support.demo_accounts import PlannedTransfer
from tests.support.demo_accounts import open_accounts as shared_open_accounts
from tests.support.faultproxy import FaultProxy
from tests.support.servers import ServerProcess, free_port, start_process

TRANSFERS = 2_000
THREADS = 8
ACCOUNTS = 10
OPENING_BALANCE = 10_000_000
TOKEN = "sk_test_chaos"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Fast retries: ~600 lost attempts must cost seconds, not minutes. Room for a 409's
# Retry-After of 1 s, and a deadline per call so nothing can hang.
POLICY = RetryPolicy(attempts=15, base=0.01, cap=0.2, timeout=30.0, max_retry_after=5.0)
WALL_CLOCK_LIMIT = 90.0

_SCRIPT = Path(sys.executable).parent / "oncely"
ONCELY = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "oncely.cli"]


@dataclass(frozen=True)
class Seen:
    """What one caller got back in the end."""

    planned: PlannedTransfer
    status: int
    content: bytes
    attempts: int
    replayed: bool


class Retries:
    """An `on_retry` hook that counts retries by reason, from any thread."""

    def __init__(self) -> None:
        self.reasons: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, event: RetryEvent) -> None:
        with self._lock:
            self.reasons[event.reason] += 1


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[ServerProcess]:
    port = free_port()
    argv = [
        *ONCELY, "demo", "--port", str(port), "--log-level", "warning",
        "--store", f"sqlite:///{tmp_path / 'chaos.db'}",
    ]  # fmt: skip
    server = start_process(
        argv, port=port, cwd=tmp_path, log_path=tmp_path / "demo.log", env={"ONCELY_STORE": ""}
    )
    try:
        yield server
    finally:
        server.stop()


def open_accounts(server: ServerProcess) -> list[str]:
    with server.client() as http:
        return shared_open_accounts(
            http, count=ACCOUNTS, balance=OPENING_BALANCE, auth=AUTH,
            institution="Chaos Bank", key_prefix="chaos-open",
        )  # fmt: skip


def plan(accounts: list[str], seed: int) -> list[PlannedTransfer]:
    rng = random.Random(seed)
    planned = []
    for index in range(TRANSFERS):
        source, target = rng.sample(accounts, 2)
        key = f"chaos-{index}-{uuid.uuid4()}"
        planned.append(PlannedTransfer(key, source, target, rng.randint(1, 1_000), index))
    return planned


def run_clients(url: str, work: list[PlannedTransfer], retries: Retries) -> list[Seen]:
    queue = iter(work)
    lock = threading.Lock()
    seen: list[Seen] = []
    deadline = time.monotonic() + WALL_CLOCK_LIMIT

    def next_item() -> PlannedTransfer | None:
        with lock:
            return next(queue, None)

    def client_thread() -> None:
        policy = POLICY.with_(on_retry=retries)
        with oncely.Client(base_url=url, timeout=10.0, retry_policy=policy) as client:
            while (item := next_item()) is not None and time.monotonic() < deadline:
                response = client.post(
                    "/v1/transfers",
                    json=item.body,
                    headers={**AUTH, "Idempotency-Key": item.key},
                )
                result = Seen(
                    item, response.status_code, response.content,
                    oncely.client.attempts(response), oncely.client.was_replayed(response),
                )  # fmt: skip
                with lock:
                    seen.append(result)

    with ThreadPoolExecutor(THREADS) as pool:
        for future in [pool.submit(client_thread) for _ in range(THREADS)]:
            future.result(timeout=WALL_CLOCK_LIMIT + 60)
    return sorted(seen, key=lambda s: s.planned.index)


def transfers_by_key(database: Path) -> dict[str, list[tuple[str, str, str, int]]]:
    with contextlib.closing(sqlite3.connect(database)) as db:
        rows = db.execute(
            "SELECT idempotency_key, id, from_account, to_account, amount FROM demo_transfers"
        ).fetchall()
    found: dict[str, list[tuple[str, str, str, int]]] = {}
    for key, transfer_id, source, target, amount in rows:
        found.setdefault(key, []).append((transfer_id, source, target, amount))
    return found


@pytest.mark.slow
def test_transfers_through_lost_responses_and_resets_happen_exactly_once(
    demo: ServerProcess, tmp_path: Path
) -> None:
    started = time.monotonic()
    accounts = open_accounts(demo)
    work = plan(accounts, seed=2024)
    retries = Retries()
    with FaultProxy(demo.port, seed=2024, drop_rate=0.2, reset_rate=0.05) as proxy:
        seen = run_clients(proxy.url, work, retries)
        stats = proxy.stats
    elapsed = time.monotonic() - started

    # Every caller finished, with a success.
    assert len(seen) == TRANSFERS, f"only {len(seen)} of {TRANSFERS} calls finished in time"
    assert Counter(s.status for s in seen) == {201: TRANSFERS}

    # Each logical transfer (one key) exists exactly once, as planned.
    rows = transfers_by_key(tmp_path / "chaos.db")
    assert len(rows) == TRANSFERS
    for s in seen:
        planned = s.planned
        assert len(rows[planned.key]) == 1, f"{planned.key} ran {len(rows[planned.key])} times"
        transfer_id, source, target, amount = rows[planned.key][0]
        assert (source, target, amount) == (
            planned.from_account,
            planned.to_account,
            planned.amount,
        )
        # The caller's response names the one transfer that was made for its key.
        assert httpx.Response(201, content=s.content).json()["id"] == transfer_id

    # Every caller got the original response: the bytes the store kept from the one
    # execution, whether it came first-hand or as a replay.
    store = SQLiteStore(tmp_path / "chaos.db")
    scope = workspace_scope(TOKEN.encode())
    try:
        for s in seen:
            record = store.get_sync(scope, s.planned.key)
            assert record is not None
            assert record.response is not None
            assert record.attempts == 1  # never taken over: no execution ran twice
            assert record.response.body == s.content
    finally:
        store.close()

    # No money appeared or vanished, and each account moved exactly as planned.
    expected = dict.fromkeys(accounts, OPENING_BALANCE)
    for planned in work:
        expected[planned.from_account] -= planned.amount
        expected[planned.to_account] += planned.amount
    with demo.client() as http:
        listed = http.get("/v1/accounts", headers=AUTH).json()["data"]
    balances = {account["id"]: account["balance"] for account in listed}
    assert sum(balances.values()) == ACCOUNTS * OPENING_BALANCE
    assert balances == expected

    # The faults really happened, and the client recovered from each one.
    replayed = {s.planned.key for s in seen if s.replayed}
    in_progress = retries.reasons["409 request-in-progress"]
    assert stats.dropped > 0
    assert stats.resets > 0
    assert stats.errors == 0
    # A lost response means the request ran: its retry is answered by a replay.
    assert replayed == {key for key in stats.dropped_keys if key is not None}
    assert sum(s.attempts - 1 for s in seen) == stats.dropped + stats.resets + in_progress
    assert sum(retries.reasons.values()) == stats.dropped + stats.resets + in_progress

    summary = {
        "transfers": TRANSFERS,
        "requests": stats.requests,
        "dropped": stats.dropped,
        "resets": stats.resets,
        "retries": sum(retries.reasons.values()),
        "replayed_calls": len(replayed),
        "in_progress_409": in_progress,
        "max_attempts": max(s.attempts for s in seen),
        "wall_s": round(elapsed, 1),
    }
    print(f"\nchaos: {summary}")
    assert elapsed < WALL_CLOCK_LIMIT
