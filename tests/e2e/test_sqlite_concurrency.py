"""Several worker processes sharing one SQLite file (SPEC §3: the claim is atomic)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from oncely.core.records import RecordState
from oncely.stores import SQLiteStore
from tests.support.load import assert_once_per_round, same_key_rounds
from tests.support.servers import run_uvicorn


@pytest.mark.slow
def test_200_rounds_of_20_simultaneous_duplicates_run_once_each(tmp_path: Path) -> None:
    effects = tmp_path / "effects.jsonl"
    env = {
        "ONCELY_STORE_URL": f"sqlite:///{tmp_path / 'oncely.db'}",
        "ONCELY_EFFECTS_FILE": str(effects),
        "ONCELY_HANDLER_DELAY": "0.005",  # widen the race window a little
    }
    with run_uvicorn("tests.apps.store_app:app", tmp_path=tmp_path, env=env, workers=4) as server:
        result = same_key_rounds(f"{server.url}/effects", rounds=200, concurrency=20)
    executions = assert_once_per_round(result, effects, 200)
    assert sum(executions.values()) == 200
    assert result.status_counts()[409] > 0, "duplicates should have met a request in flight"


def test_late_completion_of_a_fenced_out_worker_is_refused(tmp_path: Path) -> None:
    """Server A's handler stalls its event loop past the lease; server B takes over and
    completes; A's completion is then refused and the record keeps B's response."""
    db = tmp_path / "oncely.db"
    effects = tmp_path / "effects.jsonl"
    base_env = {
        "ONCELY_STORE_URL": f"sqlite:///{db}",
        "ONCELY_EFFECTS_FILE": str(effects),
        "ONCELY_POLICY": json.dumps({"lease": 0.5}),
    }
    stalled_env = {**base_env, "ONCELY_BLOCKING_DELAY": "2.0"}
    request = {"json": {"amount": 1}, "headers": {"Idempotency-Key": "fenced"}}
    with (
        run_uvicorn("tests.apps.store_app:app", tmp_path=tmp_path, env=stalled_env) as stalled,
        run_uvicorn("tests.apps.store_app:app", tmp_path=tmp_path, env=base_env) as healthy,
        httpx.Client(base_url=healthy.url, timeout=10) as client,
    ):
        stalled_answer: list[httpx.Response] = []

        def call_stalled() -> None:
            with httpx.Client(base_url=stalled.url, timeout=10) as c:
                stalled_answer.append(c.post("/effects", **request))  # type: ignore[arg-type]

        thread = threading.Thread(target=call_stalled)
        thread.start()
        time.sleep(1.0)  # A holds a lapsed lease: its loop is blocked, so no renewal ran
        taken_over = client.post("/effects", **request)  # type: ignore[arg-type]
        thread.join(timeout=15)
        replay = client.post("/effects", **request)  # type: ignore[arg-type]
        stalled_log = stalled.log()
    assert taken_over.status_code == 201
    assert stalled_answer[0].status_code == 201  # A's caller still got A's answer
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["id"] == taken_over.json()["id"] != stalled_answer[0].json()["id"]
    assert "lease lost" in stalled_log
    store = SQLiteStore(db)
    try:
        record = store.get_sync("anonymous", "fenced")
        assert record is not None
        assert record.state is RecordState.COMPLETED
        assert record.attempts == 2
    finally:
        store.close()
