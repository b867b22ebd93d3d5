"""`oncely demo` and the operator commands, driven as a user drives them: as processes.

Each demo runs the installed `oncely` script on an ephemeral port in a temporary working
directory; requests go through real `curl` (the session from docs/demo.md, verbatim) and
httpx.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

import oncely
import oncely.client
from oncely.client import RetryPolicy
from tests.support.postgres_fixtures import postgres_reachable
from tests.support.servers import REPO_ROOT, ServerProcess, free_port, start_process
from tests.support.services import POSTGRES_URL, REDIS_URL, service_missing

_SCRIPT = Path(sys.executable).parent / "oncely"
ONCELY = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "oncely.cli"]
DOCS = REPO_ROOT / "docs" / "demo.md"
TOKEN = "sk_test_demo"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
VOLATILE_HEADERS = {b"date", b"server"}


# helpers ---------------------------------------------------------------------------


def env() -> dict[str, str]:
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    environment.pop("ONCELY_STORE", None)
    return environment


def oncely_cli(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ONCELY, *args], cwd=cwd, env=env(), capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip


def cli_json(*args: str, cwd: Path) -> Any:
    result = oncely_cli(*args, "--json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@contextlib.contextmanager
def demo(cwd: Path, *args: str, port: int | None = None) -> Iterator[ServerProcess]:
    """`oncely demo ARGS` in `cwd` until the block ends (SIGTERM: a graceful stop)."""
    port = port or free_port()
    argv = [*ONCELY, "demo", "--port", str(port), "--log-level", "warning", *args]
    server = start_process(
        argv, port=port, cwd=cwd, log_path=cwd / f"demo-{port}.log", env={"ONCELY_STORE": ""}
    )
    try:
        yield server
    finally:
        server.stop()


def post(
    client: httpx.Client, path: str, body: dict[str, Any], key: str | None, token: str = TOKEN
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post(path, json=body, headers=headers)


def open_account(
    client: httpx.Client, balance: int, *, currency: str = "NZD", token: str = TOKEN
) -> str:
    body = {"name": "Test", "institution": "Bank", "balance": balance, "currency": currency}
    response = post(client, "/v1/accounts", body, f"open-{uuid.uuid4()}", token)
    assert response.status_code == 201, response.text
    account_id: str = response.json()["id"]
    return account_id


def balance(client: httpx.Client, account_id: str, token: str = TOKEN) -> int:
    response = client.get(
        f"/v1/accounts/{account_id}", headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 200, response.text
    value: int = response.json()["balance"]
    return value


def stable_headers(response: httpx.Response) -> list[tuple[bytes, bytes]]:
    return [
        (name.lower(), value)
        for name, value in response.headers.raw
        if name.lower() not in VOLATILE_HEADERS and name.lower() != b"idempotent-replayed"
    ]


def curl_session() -> str:
    """The ```sh block after the curl-session marker in docs/demo.md."""
    text = DOCS.read_text()
    marker = text.index("<!-- curl-session:")
    match = re.compile(r"```sh\n(.*?)```", re.S).search(text, marker)
    assert match is not None, "docs/demo.md has no sh block after the curl-session marker"
    return match.group(1)


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"  # path is absolute: sqlite:////tmp/...


# a shared demo on SQLite, for the tests that need no store of their own ---------------


@pytest.fixture(scope="module")
def sqlite_demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with demo(tmp_path_factory.mktemp("demo")) as server:
        yield server


@pytest.fixture
def client(sqlite_demo: ServerProcess) -> Iterator[httpx.Client]:
    with sqlite_demo.client() as http:
        yield http


# the curl session ------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_curl_session_from_the_docs(tmp_path: Path) -> None:
    with demo(tmp_path) as server:
        script = curl_session().replace("http://127.0.0.1:8000", server.url)
        result = subprocess.run(
            ["bash", "-e", "-c", script], cwd=tmp_path, capture_output=True, text=True,
            timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        banner = server.log()
        with server.client() as http:
            accounts = http.get("/v1/accounts", headers=AUTH).json()["data"]
            alice, bob = accounts
            transfers = http.get(f"/v1/accounts/{alice['id']}/transfers", headers=AUTH).json()
    # Two transfer responses, the same bytes, the second one replayed.
    responses = result.stdout.split("HTTP/1.1 ")[1:]
    assert len(responses) == 2, result.stdout
    first, second = (response.replace("\r\n", "\n") for response in responses)
    assert first.startswith("201 Created")
    assert second.startswith("201 Created")
    assert "idempotent-replayed: true" not in first.lower()
    assert "idempotent-replayed: true" in second.lower()
    first_body = first.split("\n\n", 1)[1].splitlines()[0]
    second_body = second.split("\n\n", 1)[1].splitlines()[0]
    assert first_body == second_body
    assert '"amount":2500' in first_body
    # One debit.
    assert result.stdout.rstrip().endswith("}")
    assert '"balance":7500' in result.stdout.rstrip().splitlines()[-1]
    assert (alice["name"], alice["balance"], bob["name"], bob["balance"]) == (
        "Alice", 7500, "Bob", 2500,
    )  # fmt: skip
    assert len(transfers["data"]) == 1
    assert transfers["data"][0]["idempotency_key"] == "rent-may"
    # The banner names the store's file, absolute, the retention and a curl to copy.
    database = tmp_path / "oncely-demo.db"
    assert database.exists()
    assert f"SQLite file {database}" in banner
    assert "86400 s" in banner
    assert "curl -si http://127.0.0.1:" in banner
    assert f"oncely stats --store sqlite:///{database}" in banner


# auth, keys, problems --------------------------------------------------------------


def test_no_token_is_401_and_claims_no_key(client: httpx.Client, tmp_path: Path) -> None:
    a, b = open_account(client, 1_000), open_account(client, 0)
    body = {"from_account": a, "to_account": b, "amount": 100}
    key = f"no-token-{uuid.uuid4()}"
    refused = client.post("/v1/transfers", json=body, headers={"Idempotency-Key": key})
    assert refused.status_code == 401
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert refused.json()["type"].endswith("/unauthorized")
    assert client.get(f"/v1/accounts/{a}").status_code == 401
    for header in ("Bearer", "Basic dXNlcjpwYXNz", "sk_test_demo"):
        response = client.get(f"/v1/accounts/{a}", headers={"Authorization": header})
        assert response.status_code == 401, header
    # Nothing was claimed: the same key with a token runs the transfer, fresh.
    accepted = post(client, "/v1/transfers", body, key)
    assert accepted.status_code == 201
    assert "idempotent-replayed" not in accepted.headers
    assert balance(client, a) == 900
    assert client.get("/healthz").json()["status"] == "ok"
    assert "/v1/transfers" in client.get("/openapi.json").json()["paths"]


def test_a_post_without_a_key_is_400(client: httpx.Client) -> None:
    a, b = open_account(client, 1_000), open_account(client, 0)
    response = post(
        client, "/v1/transfers", {"from_account": a, "to_account": b, "amount": 1}, None
    )
    assert response.status_code == 400
    problem = response.json()
    assert problem["type"].endswith("/idempotency-key-required")
    assert problem["header"] == "Idempotency-Key"
    assert 'rel="describedby"' in response.headers["link"]
    assert balance(client, a) == 1_000


def test_refusals_are_problems_and_are_replayed(client: httpx.Client) -> None:
    a, b = open_account(client, 1_000), open_account(client, 0)
    euro = open_account(client, 1_000, currency="EUR")
    keys: dict[str, str] = {}
    cases = [
        ({"from_account": a, "to_account": b, "amount": 5_000}, 409, "insufficient-funds"),
        ({"from_account": a, "to_account": "acc_missing", "amount": 1}, 404, "account-not-found"),
        ({"from_account": a, "to_account": euro, "amount": 1}, 422, "currency-mismatch"),
        ({"from_account": a, "to_account": a, "amount": 1}, 422, "same-account"),
        ({"from_account": a, "to_account": b, "amount": 2.5}, 422, "invalid-request"),
        ({"from_account": a, "to_account": b, "amount": 0}, 422, "invalid-request"),
    ]
    for body, status, slug in cases:
        key = keys[slug] = f"refused-{uuid.uuid4()}"
        first = post(client, "/v1/transfers", body, key)
        assert first.status_code == status, (body, first.text)
        assert first.headers["content-type"] == "application/problem+json"
        problem = first.json()
        assert problem["type"] == f"https://oncely.dev/demo/problems/{slug}"
        assert problem["status"] == status
        assert problem["title"]
        assert problem["detail"]
        again = post(client, "/v1/transfers", body, key)
        assert again.headers["idempotent-replayed"] == "true"
        assert (again.status_code, again.content) == (first.status_code, first.content)
        assert stable_headers(again) == stable_headers(first)
    assert balance(client, a) == 1_000
    # After a top-up the stored refusal is still what that key answers; a new key is a
    # new attempt.
    rich = open_account(client, 10_000)
    top_up = {"from_account": rich, "to_account": a, "amount": 10_000}
    assert post(client, "/v1/transfers", top_up, f"top-up-{uuid.uuid4()}").status_code == 201
    retry = {"from_account": a, "to_account": b, "amount": 5_000}
    replayed = post(client, "/v1/transfers", retry, keys["insufficient-funds"])
    assert (replayed.status_code, replayed.headers["idempotent-replayed"]) == (409, "true")
    assert post(client, "/v1/transfers", retry, f"retry-{uuid.uuid4()}").status_code == 201
    assert balance(client, a) == 6_000


def test_a_key_names_one_request_and_one_workspace(client: httpx.Client) -> None:
    a, b = open_account(client, 1_000), open_account(client, 0)
    key = f"one-request-{uuid.uuid4()}"
    first = post(client, "/v1/transfers", {"from_account": a, "to_account": b, "amount": 10}, key)
    assert first.status_code == 201
    other = post(client, "/v1/transfers", {"from_account": a, "to_account": b, "amount": 11}, key)
    assert other.status_code == 422
    assert other.json()["type"].endswith("/key-reused-with-different-request")
    # The same key (and the same ids) in another workspace: unrelated.
    live = "sk_live_demo"
    live_auth = {"Authorization": f"Bearer {live}"}
    assert client.get(f"/v1/accounts/{a}", headers=live_auth).status_code == 404
    c, d = open_account(client, 500, token=live), open_account(client, 0, token=live)
    elsewhere = post(
        client, "/v1/transfers", {"from_account": c, "to_account": d, "amount": 10}, key, live
    )
    assert elsewhere.status_code == 201
    assert "idempotent-replayed" not in elsewhere.headers
    assert elsewhere.json()["id"] != first.json()["id"]
    assert balance(client, a) == 990
    assert balance(client, c, live) == 490


def test_a_duplicate_while_the_first_is_in_flight_is_409(tmp_path: Path) -> None:
    store = sqlite_url(tmp_path / "slow.db")
    with demo(tmp_path, "--store", store, "--latency", "2500") as server, server.client() as http:
        with ThreadPoolExecutor(2) as pool:
            a, b = pool.map(lambda opening: open_account(http, opening), (1_000, 0))
        body = {"from_account": a, "to_account": b, "amount": 100}
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, http, "/v1/transfers", body, "slow")
            time.sleep(0.5)
            duplicate = post(http, "/v1/transfers", body, "slow")
            in_flight = cli_json(
                "inspect", "--store", store, "--workspace", TOKEN, "slow", cwd=tmp_path
            )
            original = first.result(timeout=30)
        assert duplicate.status_code == 409
        assert duplicate.headers["retry-after"] == "1"
        assert duplicate.json()["type"].endswith("/request-in-progress")
        assert in_flight["state"] == "in_flight"
        assert in_flight["lease_expires_at"] is not None
        assert in_flight["response"] is None
        assert original.status_code == 201
        replay = post(http, "/v1/transfers", body, "slow")
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.content == original.content
        assert balance(http, a) == 900


# durability: a restart, and the retention ------------------------------------------


@dataclass
class Sent:
    key: str
    body: dict[str, Any]
    response: httpx.Response


def test_a_restart_in_the_middle_of_traffic_keeps_every_record(tmp_path: Path) -> None:
    port = free_port()
    store = sqlite_url(tmp_path / "restart.db")
    sent: list[Sent] = []
    stop = threading.Event()
    failures: list[BaseException] = []
    policy = RetryPolicy(attempts=60, base=0.05, cap=0.25, timeout=30.0)

    def traffic(accounts: list[str]) -> None:
        try:
            with oncely.Client(
                base_url=f"http://127.0.0.1:{port}", timeout=10.0, retry_policy=policy
            ) as http:
                for index in range(2_000):
                    if stop.is_set():
                        return
                    key = f"restart-{index}"
                    body = {
                        "from_account": accounts[index % 2], "to_account": accounts[1 - index % 2],
                        "amount": 1 + index % 7,
                    }  # fmt: skip
                    sent.append(Sent(key, body, post(http, "/v1/transfers", body, key)))
        except BaseException as error:  # reported by the main thread
            failures.append(error)

    with demo(tmp_path, "--store", store, port=port) as server, server.client() as http:
        accounts = [open_account(http, 1_000_000), open_account(http, 1_000_000)]
    worker = threading.Thread(target=traffic, args=(accounts,))
    with demo(tmp_path, "--store", store, port=port) as server:
        worker.start()
        wait_for(lambda: len(sent) >= 40, "40 transfers before the restart")
    before = len(sent)
    # Stopped under traffic; the client retries until the demo is back on the same port.
    with demo(tmp_path, "--store", store, port=port) as server, server.client() as http:
        wait_for(lambda: len(sent) >= before + 40, "40 transfers after the restart")
        stop.set()
        worker.join(timeout=60)
        assert not worker.is_alive()
        assert not failures, failures
        for item in sent:
            assert item.response.status_code == 201, item.response.text
            replay = post(http, "/v1/transfers", item.body, item.key)
            assert replay.headers["idempotent-replayed"] == "true"
            assert replay.status_code == item.response.status_code
            assert stable_headers(replay) == stable_headers(item.response)
            assert replay.content == item.response.content
        balances = [balance(http, account) for account in accounts]
    assert sum(balances) == 2_000_000
    # Every transfer exactly once, and every record kept.
    rows = transfer_rows(tmp_path / "restart.db")
    assert sorted(rows) == sorted(item.key for item in sent)
    assert all(len(ids) == 1 for ids in rows.values())
    for item in sent:
        assert rows[item.key] == [item.response.json()["id"]]
    stats = cli_json("stats", "--store", store, cwd=tmp_path)
    assert stats["completed"] == len(sent) + 2
    assert stats["in_flight"] == 0


def transfer_rows(path: Path) -> dict[str, list[str]]:
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute("SELECT idempotency_key, id FROM demo_transfers").fetchall()
    found: dict[str, list[str]] = {}
    for key, transfer_id in rows:
        found.setdefault(key, []).append(transfer_id)
    return found


def wait_for(condition: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.02)


def test_ttl_1_frees_keys_after_expiry_and_purge_removes_them(tmp_path: Path) -> None:
    store = sqlite_url(tmp_path / "ttl.db")
    with demo(tmp_path, "--store", store, "--ttl", "1") as server, server.client() as http:
        body = {"name": "Alice", "institution": "Bank", "balance": 100, "currency": "NZD"}
        first = post(http, "/v1/accounts", body, "open")
        assert post(http, "/v1/accounts", body, "open").headers["idempotent-replayed"] == "true"
        assert post(http, "/v1/accounts", body, "other").status_code == 201
        time.sleep(1.3)
        again = post(http, "/v1/accounts", body, "open")
        assert again.status_code == 201
        assert "idempotent-replayed" not in again.headers
        assert again.json()["id"] != first.json()["id"]
        assert "1 s" in server.log()
        time.sleep(1.3)
    assert cli_json("stats", "--store", store, cwd=tmp_path)["expired"] == 2
    assert cli_json("purge", "--store", store, cwd=tmp_path)["purged"] == 2
    stats = cli_json("stats", "--store", store, cwd=tmp_path)
    assert (stats["expired"], stats["total"]) == (0, 0)
    result = oncely_cli("inspect", "--store", store, "--workspace", TOKEN, "open", cwd=tmp_path)
    assert result.returncode == 1


# operator commands -----------------------------------------------------------------


def exercise_operator_commands(store: str, cwd: Path, server: ServerProcess) -> None:
    """init-db, a transfer through the demo, then inspect, stats and purge on `store`."""
    with server.client() as http:
        a, b = open_account(http, 1_000), open_account(http, 0)
        body = {"from_account": a, "to_account": b, "amount": 250}
        transfer = post(http, "/v1/transfers", body, "op-transfer")
        assert transfer.status_code == 201
        assert post(http, "/v1/transfers", body, "op-transfer").content == transfer.content

    record = cli_json("inspect", "--store", store, "--workspace", TOKEN, "op-transfer", cwd=cwd)
    assert record["found"] is True
    assert record["state"] == "completed"
    assert record["attempts"] == 1
    assert re.fullmatch(r"[0-9a-f]{32}", record["fingerprint"])
    assert record["scope"].startswith("cred:")
    assert record["created_at"].endswith("Z")
    assert record["expires_at"] > record["created_at"]
    assert record["lease_expires_at"] is None
    assert record["response"]["status"] == 201
    assert record["response"]["body_bytes"] == len(transfer.content)
    assert ["content-type", "application/json"] in record["response"]["headers"]
    assert "body" not in record["response"]

    with_body = cli_json(
        "inspect", "--store", store, "--workspace", TOKEN, "op-transfer", "--body", cwd=cwd
    )
    assert with_body["response"]["body"].encode() == transfer.content

    table = oncely_cli("inspect", "--store", store, "--workspace", TOKEN, "op-transfer", cwd=cwd)
    assert table.returncode == 0, table.stderr
    for expected in ("state", "completed", "fingerprint", "attempts", "201", "in 23 h"):
        assert expected in table.stdout
    assert f"{len(transfer.content)} bytes" in table.stdout

    by_scope = cli_json(
        "inspect", "--store", store, "--scope", record["scope"], "op-transfer", cwd=cwd
    )
    assert by_scope == record
    other = oncely_cli(
        "inspect", "--store", store, "--workspace", "sk_live_x", "op-transfer", cwd=cwd
    )
    assert other.returncode == 1
    assert "No record for key 'op-transfer'" in other.stdout
    missing = oncely_cli(
        "inspect", "--store", store, "--workspace", TOKEN, "nope", "--json", cwd=cwd
    )
    assert (missing.returncode, json.loads(missing.stdout)["found"]) == (1, False)

    stats = cli_json("stats", "--store", store, cwd=cwd)
    assert (stats["completed"], stats["in_flight"], stats["expired"]) == (3, 0, 0)
    assert stats["total"] == 3
    table = oncely_cli("stats", "--store", store, cwd=cwd)
    assert table.returncode == 0
    assert re.search(r"completed\s*│\s*3", table.stdout), table.stdout

    assert cli_json("purge", "--store", store, cwd=cwd)["purged"] == 0
    purged = oncely_cli("purge", "--store", store, cwd=cwd)
    assert (purged.returncode, purged.stdout.strip()) == (0, "Purged 0 expired records.")


def test_operator_commands_on_sqlite(tmp_path: Path) -> None:
    store = sqlite_url(tmp_path / "ops.db")
    init = oncely_cli("init-db", "--store", store, cwd=tmp_path)
    assert init.returncode == 0
    assert "ready" in init.stdout
    assert table_names(tmp_path / "ops.db") == {"oncely_records"}
    assert cli_json("init-db", "--store", store, cwd=tmp_path)["ready"] is True
    with demo(tmp_path, "--store", store) as server:
        exercise_operator_commands(store, tmp_path, server)
    assert table_names(tmp_path / "ops.db") == {"oncely_records", "demo_accounts", "demo_transfers"}


def table_names(path: Path) -> set[str]:
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {name for (name,) in rows}


@pytest.fixture
def postgres_schema_url() -> Iterator[tuple[str, str]]:
    """The shared PostgreSQL, with a search path of one fresh schema (dropped after)."""
    reason = postgres_reachable(POSTGRES_URL)
    if reason is not None:
        service_missing("postgres", reason)
    import psycopg

    schema = f"oncely_demo_e2e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"'.encode())
    separator = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{separator}options=-csearch_path%3D{schema}", schema
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'.encode())


def postgres_tables(schema: str) -> set[str]:
    import psycopg

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,)
        ).fetchall()
    return {name for (name,) in rows}


def test_operator_commands_on_postgres(
    tmp_path: Path, postgres_schema_url: tuple[str, str]
) -> None:
    store, schema = postgres_schema_url
    init = oncely_cli("init-db", "--store", store, cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    assert postgres_tables(schema) == {"oncely_records"}
    with demo(tmp_path, "--store", store) as server:
        assert "postgres at postgresql://127.0.0.1:5432/test" in server.log()
        assert "the store's own database" in server.log()
        exercise_operator_commands(store, tmp_path, server)
    assert postgres_tables(schema) == {"oncely_records", "demo_accounts", "demo_transfers"}
    assert not (tmp_path / "oncely-demo-data.db").exists()


def test_a_redis_store_keeps_the_money_in_a_sqlite_file(tmp_path: Path) -> None:
    import redis

    from tests.support.redis_fixtures import delete_prefixed, redis_unreachable_reason

    reason = redis_unreachable_reason(REDIS_URL)
    if reason is not None:
        service_missing("redis", reason)
    prefix = f"oncely-test-{uuid.uuid4().hex[:12]}"
    separator = "&" if "?" in REDIS_URL else "?"
    store = f"{REDIS_URL}{separator}prefix={prefix}"
    try:
        with demo(tmp_path, "--store", store) as server, server.client() as http:
            a, b = open_account(http, 100), open_account(http, 0)
            body = {"from_account": a, "to_account": b, "amount": 40}
            first = post(http, "/v1/transfers", body, "via-redis")
            assert post(http, "/v1/transfers", body, "via-redis").content == first.content
            assert balance(http, a) == 60
            log = server.log()
        data = tmp_path / "oncely-demo-data.db"
        assert f"SQLite {data}" in log
        assert "the store is not SQL" in log
        assert table_names(data) == {"demo_accounts", "demo_transfers"}
        assert cli_json("stats", "--store", store, cwd=tmp_path)["completed"] == 3
        record = cli_json(
            "inspect", "--store", store, "--workspace", TOKEN, "via-redis", cwd=tmp_path
        )
        assert record["response"]["status"] == 201
        assert cli_json("purge", "--store", store, cwd=tmp_path)["native_expiry"] is True
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        try:
            delete_prefixed(client, prefix)
        finally:
            client.close()


# errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("stats", "--store", "bogus://nowhere"),
        ("purge", "--store", "sqlite://relative.db"),
        ("demo", "--store", "bogus://nowhere"),
        ("inspect", "--store", "memory://", "key"),
    ],
)
def test_bad_usage_is_one_line_and_exit_2(tmp_path: Path, args: tuple[str, ...]) -> None:
    result = oncely_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("oncely: error: ")
    assert result.stdout == ""


def test_an_unreachable_store_is_one_line_and_exit_3(tmp_path: Path) -> None:
    dead_postgres = f"postgresql://postgres:s3cret@127.0.0.1:{free_port()}/test"
    for args in (
        ("stats", "--store", dead_postgres),
        ("stats", "--store", f"redis://127.0.0.1:{free_port()}/0"),
        ("purge", "--store", sqlite_url(tmp_path / "no" / "such" / "dir.db")),
        ("demo", "--port", str(free_port()), "--store", f"redis://127.0.0.1:{free_port()}/0"),
    ):
        result = oncely_cli(*args, cwd=tmp_path)
        assert result.returncode == 3, (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert "s3cret" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("oncely: error: store "), result.stderr


def test_help_lists_the_commands(tmp_path: Path) -> None:
    result = oncely_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in ("demo", "inspect", "stats", "purge", "init-db"):
        assert command in result.stdout
    assert "bench" not in result.stdout


def test_read_only_commands_never_create_a_store(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    for command in (["stats"], ["purge"], ["inspect", "--workspace", "sk_test", "k"]):
        result = subprocess.run(
            [sys.executable, "-m", "oncely.cli", *command, "--store", f"sqlite:///{missing}"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 3, result.stderr
        assert "does not exist" in result.stderr
        assert not missing.exists()
