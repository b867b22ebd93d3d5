"""PostgreSQL behind real uvicorn workers (SPEC §3, §4): simultaneous duplicates run
once, and an outage in the middle of a run fails closed and loses or duplicates nothing.

Both run on the session's private cluster, so stopping it never touches the shared server.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from oncely.core.records import RecordState
from oncely.stores.postgres import PostgresStore
from tests.support.load import (
    assert_once_per_round,
    executions_per_key,
    same_key_rounds,
)
from tests.support.postgres_fixtures import PrivatePostgres, drop_table
from tests.support.servers import run_uvicorn

pytestmark = pytest.mark.services

APP = "tests.apps.store_app:app"
TABLE = "oncely_records"  # what store_from_url(url) uses; the cluster is ours alone
SCOPE = "anonymous"  # the store app has no authentication


@pytest.fixture
def cluster(private_postgres: PrivatePostgres) -> Iterator[PrivatePostgres]:
    private_postgres.ensure_running()
    drop_table(private_postgres.url, TABLE)
    yield private_postgres
    private_postgres.ensure_running()
    drop_table(private_postgres.url, TABLE)


def records(url: str, keys: list[str]) -> dict[str, RecordState | None]:
    store = PostgresStore(url, create_schema=False)
    try:
        states: dict[str, RecordState | None] = {}
        for key in keys:
            record = store.get_sync(SCOPE, key)
            states[key] = None if record is None else record.state
        return states
    finally:
        store.close()


@pytest.mark.slow
def test_200_rounds_of_20_simultaneous_duplicates_run_once_each(
    cluster: PrivatePostgres, tmp_path: Path
) -> None:
    effects = tmp_path / "effects.jsonl"
    env = {
        "ONCELY_STORE_URL": cluster.url,
        "ONCELY_EFFECTS_FILE": str(effects),
        "ONCELY_HANDLER_DELAY": "0.005",  # widen the race window a little
    }
    with run_uvicorn(APP, tmp_path=tmp_path, env=env, workers=4) as server:
        result = same_key_rounds(f"{server.url}/effects", rounds=200, concurrency=20)
        log = server.log()
    executions = assert_once_per_round(result, effects, 200, log)
    assert sum(executions.values()) == 200
    assert result.status_counts()[409] > 0, "duplicates should have met a request in flight"
    states = records(cluster.url, [round_.key for round_ in result.rounds])
    assert set(states.values()) == {RecordState.COMPLETED}


@dataclass
class Operations:
    """Clients that each perform one logical operation after another, every one under a
    fresh key, retrying it (same key) on 503 and 409 until it succeeds."""

    url: str
    clients: int
    deadline: float
    finished: dict[str, tuple[int, float]] = field(default_factory=dict)  # key: status, when
    statuses: Counter[int] = field(default_factory=Counter)
    missing_retry_after: int = 0
    unfinished: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop_new: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._client) for _ in range(self.clients)]
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        self.stop_new.set()
        for thread in self.threads:
            thread.join(timeout=max(1.0, self.deadline - time.monotonic() + 15))

    def successes_since(self, moment: float) -> int:
        with self.lock:
            return sum(1 for _, when in self.finished.values() if when >= moment)

    def _client(self) -> None:
        with httpx.Client(timeout=15.0) as client:
            while not self.stop_new.is_set() and time.monotonic() < self.deadline:
                self._operation(client, f"op-{uuid.uuid4().hex}")

    def _operation(self, client: httpx.Client, key: str) -> None:
        body = {"key": key}
        while time.monotonic() < self.deadline:
            try:
                response = client.post(self.url, json=body, headers={"Idempotency-Key": key})
            except httpx.HTTPError as exc:
                with self.lock:
                    self.errors.append(f"{key}: {exc!r}")
                time.sleep(0.1)
                continue
            with self.lock:
                self.statuses[response.status_code] += 1
                if response.status_code == 503 and "retry-after" not in response.headers:
                    self.missing_retry_after += 1
            if response.status_code == 201:
                with self.lock:
                    self.finished[key] = (201, time.monotonic())
                return
            if response.status_code not in (409, 503):
                with self.lock:
                    self.errors.append(f"{key}: {response.status_code} {response.text[:200]}")
                return
            time.sleep(0.1)
        with self.lock:
            self.unfinished.append(key)


def wait_for(condition: object, timeout: float, what: str) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_an_outage_mid_run_fails_closed_and_loses_or_duplicates_nothing(
    cluster: PrivatePostgres, tmp_path: Path
) -> None:
    effects = tmp_path / "effects.jsonl"
    env = {
        "ONCELY_STORE_URL": cluster.url,
        "ONCELY_EFFECTS_FILE": str(effects),
        # A claim committed just as the server went down leaves a record in flight that
        # nobody holds: a short lease lets the retry take it over within the test.
        "ONCELY_POLICY": json.dumps({"lease": 2.0}),
    }
    with run_uvicorn(APP, tmp_path=tmp_path, env=env, workers=2) as server:
        load = Operations(f"{server.url}/effects", clients=6, deadline=time.monotonic() + 60)
        try:
            load.start()
            wait_for(lambda: load.successes_since(0) >= 30, 20, "traffic before the outage")

            stopped_at = time.monotonic()
            cluster.stop(mode="fast")
            time.sleep(0.5)  # handlers that claimed before the stop finish their effect
            effects_at_stop = count_lines(effects)
            wait_for(lambda: load.statuses[503] >= 6, 20, "503s during the outage")
            time.sleep(1.0)
            effects_during_outage = count_lines(effects) - effects_at_stop
            with load.lock:
                before_restart = {k for k, (_, at) in load.finished.items() if at < stopped_at}

            restarted_at = time.monotonic()
            cluster.start()
            wait_for(lambda: load.successes_since(restarted_at) >= 30, 30, "traffic to resume")
        finally:
            load.join()
        log = server.log()

    assert effects_during_outage == 0, "a handler ran while the store was down"
    assert load.missing_retry_after == 0
    assert not load.errors, load.errors[:5]
    assert not load.unfinished, "keys never completed"
    executions = executions_per_key(effects)
    assert set(executions) == set(load.finished), "an effect without a finished operation"
    duplicated = {key: n for key, n in executions.items() if n != 1}
    assert not duplicated, (duplicated, log[-2000:])
    # What completed before the outage is still there after the restart.
    states = records(cluster.url, sorted(before_restart))
    assert set(states.values()) == {RecordState.COMPLETED}
