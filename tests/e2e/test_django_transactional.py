"""Transactional completion in Django under real gunicorn (2 sync workers), on SQLite
and PostgreSQL (SPEC §3): the view completes the record inside its `transaction.atomic()`
on Django's own connection, so a SIGKILL right after the commit loses nothing and the
retry is a replay. With the feature switched off the same kill runs the transfer twice,
which shows that the test can fail."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.gunicorn import run_gunicorn
from tests.support.servers import ServerProcess
from tests.support.services import POSTGRES_URL, service_missing

APP = "tests.apps.django_app.wsgi:application"
VOLATILE = {"date", "server", "idempotent-replayed"}
LEASE = 1.0
# The hook holds the response back this long after the commit; the kill comes first.
AFTER_COMMIT_SLEEP = 20.0
KILLS = 3
BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.services),
]


SELECT_IDS = "SELECT id FROM demo_transfers WHERE idempotency_key = "


@dataclass
class Database:
    env: dict[str, str]
    rows: Callable[[str], list[str]]  # transfer ids for an Idempotency-Key


@contextlib.contextmanager
def database(backend: str, tmp: Path) -> Iterator[Database]:
    """Django's database and the store's on it: one SQLite file, or one PostgreSQL
    schema (Django's search path; the store's `schema`), dropped afterwards."""
    if backend == "sqlite":
        path = tmp / "app.db"

        def sqlite_rows(key: str) -> list[str]:
            with contextlib.closing(sqlite3.connect(path)) as db:
                return [row[0] for row in db.execute(SELECT_IDS + "?", (key,))]

        yield Database(
            {"ONCELY_DJANGO_DB": str(path), "ONCELY_STORE_URL": f"sqlite:///{path}"}, sqlite_rows
        )
        return
    import psycopg

    from tests.support.postgres_fixtures import postgres_reachable

    reason = postgres_reachable(POSTGRES_URL)
    if reason is not None:
        service_missing("postgres", reason)
    schema = f"oncely_django_{uuid.uuid4().hex[:12]}"

    def postgres_rows(key: str) -> list[str]:
        with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as db:
            query = f'SELECT id FROM "{schema}".demo_transfers WHERE idempotency_key = %s'
            return [row[0] for row in db.execute(query, (key,))]

    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as db:
        db.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield Database(
            {
                "ONCELY_DJANGO_PG_SCHEMA": schema,
                "ONCELY_TEST_POSTGRES_URL": POSTGRES_URL,
                "ONCELY_STORE_URL": POSTGRES_URL,
                "ONCELY_STORE_OPTIONS": json.dumps({"schema": schema}),
            },
            postgres_rows,
        )
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as db:
            db.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def server_env(db: Database, tmp: Path, **extra: str) -> dict[str, str]:
    return {
        **db.env,
        "ONCELY_EFFECTS_FILE": str(tmp / "effects.jsonl"),
        "ONCELY_POLICY": json.dumps({"lease": LEASE}),
        **extra,
    }


def post(server: ServerProcess, key: str, timeout: float = 15.0) -> httpx.Response:
    return httpx.post(
        f"{server.url}/transfers",
        json={"amount": 1250},
        headers={"Idempotency-Key": key},
        timeout=timeout,
    )


def comparable(response: httpx.Response) -> tuple[int, list[tuple[str, str]], bytes]:
    headers = [(k, v) for k, v in response.headers.multi_items() if k not in VOLATILE]
    return response.status_code, headers, response.content


@pytest.mark.parametrize("backend", BACKENDS)
def test_replay_is_byte_identical_and_the_transfer_runs_once(backend: str, tmp_path: Path) -> None:
    with (
        database(backend, tmp_path) as db,
        run_gunicorn(APP, tmp_path=tmp_path, env=server_env(db, tmp_path), workers=2) as server,
    ):
        firsts = {key: post(server, key) for key in ("a", "b")}
        replays = {key: post(server, key) for key in ("a", "b", "a")}
        for key, first in firsts.items():
            assert first.status_code == 201, server.log()
            assert "idempotent-replayed" not in first.headers
            assert replays[key].headers["idempotent-replayed"] == "true"
            assert comparable(replays[key]) == comparable(first)
            assert db.rows(key) == [first.json()["id"]]
        assert "lease lost" not in server.log()
        assert "differs" not in server.log()


def kill_after_commit(
    backend: str, tmp_path: Path, *, transactional: bool
) -> list[tuple[int, bool]]:
    """KILLS times: SIGKILL the server right after the view committed, restart, retry.
    Returns (rows, replayed?) per killed request."""
    marker = tmp_path / "committed.txt"
    outcomes: list[tuple[int, bool]] = []
    with database(backend, tmp_path) as db:
        env = server_env(
            db,
            tmp_path,
            ONCELY_DJANGO_TRANSACTIONAL="1" if transactional else "0",
            ONCELY_DJANGO_COMMIT_MARKER=str(marker),
            ONCELY_DJANGO_AFTER_COMMIT_SLEEP=str(AFTER_COMMIT_SLEEP),
        )
        with contextlib.ExitStack() as servers:
            server = servers.enter_context(run_gunicorn(APP, tmp_path=tmp_path, env=env, workers=2))
            for kill in range(KILLS):
                key = f"crash-{kill}-{uuid.uuid4().hex[:8]}"
                lost: list[BaseException] = []

                def first_attempt(
                    server: ServerProcess = server, key: str = key, lost: list[Any] = lost
                ) -> None:
                    try:
                        post(server, key, timeout=AFTER_COMMIT_SLEEP + 10)
                    except httpx.HTTPError as error:
                        lost.append(error)

                sender = threading.Thread(target=first_attempt)
                sender.start()
                deadline = time.monotonic() + 15
                while not (marker.exists() and key in marker.read_text().split()):
                    assert time.monotonic() < deadline, server.log()
                    time.sleep(0.01)
                server.kill()  # the whole process group, while the response is held back
                sender.join(timeout=10)
                assert lost, "the first attempt should have lost its connection"
                assert len(db.rows(key)) == 1  # committed before the kill
                server = servers.enter_context(
                    run_gunicorn(APP, tmp_path=tmp_path, env=env, workers=2)
                )
                deadline = time.monotonic() + 15
                while (retry := post(server, key)).status_code == 409:  # the lease lapses
                    assert time.monotonic() < deadline, server.log()
                    time.sleep(0.2)
                assert retry.status_code == 201, server.log()
                rows = db.rows(key)
                assert retry.json()["id"] in rows  # the answer is a transfer that exists
                outcomes.append((len(rows), retry.headers.get("idempotent-replayed") == "true"))
    return outcomes


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_kill_right_after_the_commit_is_replayed_not_rerun(backend: str, tmp_path: Path) -> None:
    outcomes = kill_after_commit(backend, tmp_path, transactional=True)
    print(f"{backend}, completion on, (rows, replayed) per kill: {outcomes}")
    assert outcomes == [(1, True)] * KILLS


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_transactional_completion_the_same_kill_runs_it_twice(
    backend: str, tmp_path: Path
) -> None:
    outcomes = kill_after_commit(backend, tmp_path, transactional=False)
    print(f"{backend}, completion off, (rows, replayed) per kill: {outcomes}")
    assert outcomes == [(2, False)] * KILLS
