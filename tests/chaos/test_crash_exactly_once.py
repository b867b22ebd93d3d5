"""Crashes: the demo's server process is killed with SIGKILL and restarted, again and
again, while retrying clients make transfers. With transactional completion (SPEC §3)
every transfer still happens exactly once, on SQLite and on PostgreSQL.

Three runs per store, each on a fresh database:

- random kills (`test_random_kills_under_load`): CLIENTS threads of `oncely.Client` make
  transfers, each with its own key, while a killer SIGKILLs the server's process group
  KILLS times, each RANDOM_UPTIME after the last restart began listening, and restarts it
  at once on the same port. Afterwards every logical transfer (one key) exists exactly
  once, balances equal the plan, no record is in flight, every call got a final answer,
  and each caller's bytes are the stored record's bytes.
- a kill aimed at the crash window, completion on and off (`test_a_kill_after_the_commit`):
  the demo's test hooks write each transfer's key to a marker file right after its commit
  and then hold the response back for AFTER_COMMIT_DELAY_MS; the killer waits for the
  marker line and kills inside that window, once per transfer. With
  `--no-transactional-completion` the record is still in flight when the process dies, its
  lease lapses, the client's retry takes it over and the transfer runs twice: every kill
  makes a duplicate, so this test is known to be able to fail. With transactional
  completion the commit has stored the response too, and every retry gets a replay.

The demo runs as `oncely demo --lease 1`, in a process group of its own so that a kill
reaches all of it. The targeted runs start the installed `oncely` script afresh each
time (a real cold start); the random runs fork each start from a process that has
imported the demo once (ForkLauncher), so 100 kills per store fit the suite's budget on
2 cores. The summary line of each run is printed (`pytest -s` shows it).
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx
import pytest

import oncely
import oncely.client
from oncely.client import RetryEvent, RetryPolicy
from oncely.core.records import RecordState
from oncely.demo.auth import workspace_scope
from oncely.stores import store_from_url
from tests.support.demo_accounts import PlannedTransfer
from tests.support.demo_accounts import open_accounts as shared_open_accounts
from tests.support.postgres_fixtures import postgres_reachable
from tests.support.servers import REPO_ROOT, free_port
from tests.support.services import POSTGRES_URL, port_open, service_missing

_SCRIPT = Path(sys.executable).parent / "oncely"
ONCELY = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "oncely.cli"]

TOKEN = "sk_test_crash"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SCOPE = workspace_scope(TOKEN.encode())
LEASE = 1.0  # seconds: a killed worker's claims lapse quickly; live ones are renewed
ACCOUNTS = 6
OPENING_BALANCE = 1_000_000_000
REFUSED_AMOUNT = 10**13  # more than all the money: always `insufficient-funds`
REFUSAL_RATE = 0.05

KILLS = 100  # per store, random instants
CLIENTS = 4
RANDOM_UPTIME = (0.05, 0.4)  # seconds between "listening again" and the next kill
TARGETED_KILLS = 10  # per store and mode, each inside the window after a commit
AFTER_COMMIT_DELAY_MS = 1000  # the window the targeted kill aims at: wide, so never missed
READY_TIMEOUT = 20.0
RUN_LIMIT = 150.0  # seconds for one run's kills; bounded, whatever happens
MARKER_WAIT = 30.0
CALLER_RESENDS = 5

# Retry across restarts: connection errors and 409 in-progress are retried fast, for up
# to 30 s per call; Retry-After (1 s for an in-flight key) is honoured.
POLICY = RetryPolicy(attempts=1_000, base=0.02, cap=0.3, timeout=30.0, max_retry_after=2.0)
VOLATILE = {b"date", b"server", b"idempotent-replayed"}


# where the demo keeps things -----------------------------------------------------------


@dataclass(frozen=True)
class Row:
    transfer_id: str
    from_account: str
    to_account: str
    amount: int


@dataclass(frozen=True)
class Database:
    """The demo's database: the store and the money in one SQLite file or one schema."""

    kind: str
    store_url: str
    sqlite_path: Path | None = None
    schema: str | None = None

    def transfers(self) -> dict[str, list[Row]]:
        """Transfer rows by idempotency key."""
        query = "SELECT idempotency_key, id, from_account, to_account, amount FROM {}"
        if self.sqlite_path is not None:
            with contextlib.closing(sqlite3.connect(self.sqlite_path)) as db:
                rows = db.execute(query.format("demo_transfers")).fetchall()
        else:
            import psycopg

            with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
                table = f'"{self.schema}"."demo_transfers"'
                rows = conn.execute(query.format(table).encode()).fetchall()
        found: dict[str, list[Row]] = {}
        for key, *row in rows:
            found.setdefault(key, []).append(Row(row[0], row[1], row[2], int(row[3])))
        return found


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        path = tmp_path / "crash.db"
        yield Database("sqlite", f"sqlite:///{path}", sqlite_path=path)
        return
    reason = postgres_reachable(POSTGRES_URL)
    if reason is not None:
        service_missing("postgres", reason)
    import psycopg

    schema = f"oncely_crash_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"'.encode())
    separator = "&" if "?" in POSTGRES_URL else "?"
    url = f"{POSTGRES_URL}{separator}options=-csearch_path%3D{schema}"
    try:
        yield Database("postgres", url, schema=schema)
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'.encode())


# the server, killed and restarted ------------------------------------------------------


class Launcher(Protocol):
    """Starts `oncely ARGS` in a process group of its own; kills and reaps that group."""

    def start(self) -> None: ...

    def kill(self, sig: int) -> None:
        """Signal the whole group and return once the process is gone (its port free)."""
        ...

    def exited(self) -> bool: ...

    def close(self) -> None: ...


class ColdLauncher:
    """Each start runs the installed `oncely` script afresh: a real cold start."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        self.args, self.env, self.cwd, self.log = args, env, cwd, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*ONCELY, *self.args], env=self.env, cwd=self.cwd, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip

    def kill(self, sig: int) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def exited(self) -> bool:
        return self.process is None or self.process.poll() is not None

    def close(self) -> None:
        self.kill(signal.SIGTERM)


class ForkLauncher:
    """A fork server (`fork_server`, a child of the test) that has imported the demo once;
    each start forks it and runs `oncely.cli.main(ARGS)` in the fresh child, which opens
    the store and the database, builds the app and binds the port like a cold start
    does. Only the imports (~0.4 s of CPU per start on 2 cores) are shared, so that 100
    kills per store fit the test budget."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        code = "from tests.chaos.test_crash_exactly_once import fork_server; fork_server()"
        self.server = subprocess.Popen(
            [sys.executable, "-c", code, str(log), *args], env=env, cwd=cwd,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        self.child = 0

    def _ask(self, command: str, timeout: float = READY_TIMEOUT) -> str:
        server = self.server
        assert server.stdin is not None
        assert server.stdout is not None
        server.stdin.write(f"{command}\n".encode())
        server.stdin.flush()
        ready, _, _ = select.select([server.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"the fork server did not answer {command!r} in {timeout} s")
        return server.stdout.readline().decode().strip()

    def start(self) -> None:
        self.child = int(self._ask("start"))

    def kill(self, sig: int) -> None:
        if self.child:
            assert self._ask(f"kill {sig}") == "dead"
            self.child = 0

    def exited(self) -> bool:
        return self.server.poll() is not None

    def close(self) -> None:
        with contextlib.suppress(OSError, TimeoutError, AssertionError):
            self.kill(signal.SIGTERM)
        if self.child:  # the fork server could not stop it: a child must never outlive us
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.child, signal.SIGKILL)
            self.child = 0
        with contextlib.suppress(OSError):
            assert self.server.stdin is not None
            self.server.stdin.close()
        try:
            self.server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.server.pid, signal.SIGKILL)
            self.server.wait(timeout=10)


def fork_server() -> None:
    """ForkLauncher's other end: `python -c "...fork_server()" LOG ARGS...`. One reply
    line per command on stdout: "start" forks `oncely ARGS` (its pid), "kill SIG" kills
    its process group and reaps it ("dead"). At EOF it stops the child and exits."""
    import uvicorn  # noqa: F401  (imported here once, so each fork starts warm)

    import oncely.cli
    import oncely.demo.app

    log, args = sys.argv[1], sys.argv[2:]
    child = 0

    def reply(text: str) -> None:
        sys.stdout.write(f"{text}\n")
        sys.stdout.flush()

    def stop(sig: int, wait: float) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child, sig)
        deadline = time.monotonic() + wait
        while os.waitpid(child, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.killpg(child, signal.SIGKILL)
                os.waitpid(child, 0)
                return
            time.sleep(0.005)

    while line := sys.stdin.readline():
        command, *rest = line.split()
        if command == "start":
            child = os.fork()
            if child == 0:
                os.setsid()  # its own process group, as `start_new_session` gives
                out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                os.dup2(out, 1)
                os.dup2(out, 2)
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                code = 1
                try:
                    oncely.cli.main(args, prog_name="oncely")
                except SystemExit as exit:
                    code = exit.code if isinstance(exit.code, int) else 1
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            reply(str(child))
        elif command == "kill" and child:
            stop(int(rest[0]), 10.0)
            child = 0
            reply("dead")
    if child:
        stop(signal.SIGTERM, 10.0)


class CrashingDemo:
    """`oncely demo` on one port, SIGKILLed and started again on demand."""

    def __init__(
        self,
        database: Database,
        cwd: Path,
        *,
        args: tuple[str, ...] = (),
        env: dict[str, str],
        fork: bool,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [
            "demo", "--port", str(self.port), "--log-level", "warning",
            "--store", database.store_url, "--lease", str(LEASE), *args,
        ]  # fmt: skip
        environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **env}
        environment.pop("ONCELY_STORE", None)
        self.log_path = cwd / "demo.log"
        self.log_path.touch()
        launcher = ForkLauncher if fork else ColdLauncher
        self.launcher: Launcher = launcher(argv, environment, cwd, self.log_path)
        self.kills = 0
        self.first_start_seconds = 0.0
        self.restart_seconds: list[float] = []  # from SIGKILL to listening again

    def start(self) -> None:
        started = time.monotonic()
        self.launcher.start()
        deadline = started + READY_TIMEOUT
        while not port_open("127.0.0.1", self.port, timeout=0.2):
            if time.monotonic() > deadline or self.launcher.exited():
                self.stop()
                raise RuntimeError(f"the demo did not start:\n{self.log()[-3000:]}")
            time.sleep(0.01)
        if not self.first_start_seconds:
            self.first_start_seconds = time.monotonic() - started

    def crash_and_restart(self) -> None:
        started = time.monotonic()
        self.launcher.kill(signal.SIGKILL)
        self.kills += 1
        self.start()
        self.restart_seconds.append(time.monotonic() - started)

    def stop(self) -> None:
        self.launcher.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10.0)


@contextlib.contextmanager
def crashing_demo(
    database: Database, cwd: Path, *args: str, env: dict[str, str] | None = None, fork: bool
) -> Iterator[CrashingDemo]:
    demo = CrashingDemo(database, cwd, args=args, env=env or {}, fork=fork)
    demo.start()
    try:
        yield demo
    finally:
        demo.stop()


# the bank's traffic --------------------------------------------------------------------


class Planned(PlannedTransfer):
    @property
    def refused(self) -> bool:
        return self.amount == REFUSED_AMOUNT


@dataclass(frozen=True)
class Seen:
    """What one caller finally got."""

    planned: Planned
    status: int
    headers: list[tuple[bytes, bytes]]
    content: bytes
    attempts: int
    replayed: bool


@dataclass
class Traffic:
    """Every call and every retry, from any thread."""

    seen: list[Seen] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    retries: Counter[str] = field(default_factory=Counter)
    body_lost: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_retry(self, event: RetryEvent) -> None:
        with self.lock:
            self.retries[event.reason] += 1

    def call(self, client: httpx.Client, planned: Planned) -> Seen | None:
        """One logical transfer. oncely's retry transport retries everything up to the
        response headers; a kill between the headers and the body (while oncely completes
        the record) surfaces when the body is read, so the caller resends it, with the
        same key, as any caller would (`body_lost` counts these)."""
        headers = {**AUTH, "Idempotency-Key": planned.key}
        for _ in range(CALLER_RESENDS + 1):
            try:
                with client.stream(
                    "POST", "/v1/transfers", json=planned.body, headers=headers
                ) as response:
                    try:
                        content = response.read()
                    except httpx.TransportError:
                        with self.lock:
                            self.body_lost += 1
                        continue
            except httpx.HTTPError as error:  # the retry transport gave up
                with self.lock:
                    self.failures.append(f"{planned.key}: {type(error).__name__}: {error}")
                return None
            seen = Seen(
                planned, response.status_code,
                [(name.lower(), value) for name, value in response.headers.raw],
                content, oncely.client.attempts(response), oncely.client.was_replayed(response),
            )  # fmt: skip
            with self.lock:
                self.seen.append(seen)
            return seen
        with self.lock:
            self.failures.append(f"{planned.key}: body lost {CALLER_RESENDS + 1} times")
        return None

    def client(self, url: str) -> oncely.Client:
        policy = POLICY.with_(on_retry=self.on_retry)
        return oncely.Client(base_url=url, timeout=5.0, retry_policy=policy)


def open_accounts(demo: CrashingDemo) -> list[str]:
    with demo.client() as http:
        return shared_open_accounts(
            http, count=ACCOUNTS, balance=OPENING_BALANCE, auth=AUTH,
            institution="Crash Bank", key_prefix="crash-open",
        )  # fmt: skip


def planner(accounts: list[str], seed: int, prefix: str) -> Callable[[], Planned]:
    rng = random.Random(seed)
    count = 0

    def next_transfer() -> Planned:
        nonlocal count
        count += 1
        source, target = rng.sample(accounts, 2)
        amount = REFUSED_AMOUNT if rng.random() < REFUSAL_RATE else rng.randint(1, 1_000)
        return Planned(f"{prefix}-{count}-{uuid.uuid4().hex[:8]}", source, target, amount)

    return next_transfer


def balances(demo: CrashingDemo) -> dict[str, int]:
    with demo.client() as http:
        listed = http.get("/v1/accounts", headers=AUTH).json()["data"]
    return {account["id"]: account["balance"] for account in listed}


def expected_balances(accounts: list[str], effects: list[Planned]) -> dict[str, int]:
    expected = dict.fromkeys(accounts, OPENING_BALANCE)
    for planned in effects:
        expected[planned.from_account] -= planned.amount
        expected[planned.to_account] += planned.amount
    return expected


def stable(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, value in headers if name not in VOLATILE]


def check_against_the_store(database: Database, seen: list[Seen]) -> Counter[int]:
    """Each caller got exactly the stored response (status, headers, body), and no record
    is in flight once a lease has passed. Returns the records' attempt counts."""
    time.sleep(LEASE + 0.2)
    store = store_from_url(database.store_url)
    attempts: Counter[int] = Counter()
    try:
        for s in seen:
            record = store.get_sync(SCOPE, s.planned.key)
            assert record is not None, s.planned.key
            assert record.state is RecordState.COMPLETED, s.planned.key
            assert record.response is not None
            assert record.response.status == s.status
            assert record.response.body == s.content, s.planned.key
            assert list(record.response.headers) == stable(s.headers), s.planned.key
            attempts[record.attempts] += 1
        stats = store.stats_sync()
    finally:
        store.close()
    assert stats.in_flight == 0, stats
    return attempts


def restart_summary(demo: CrashingDemo) -> dict[str, float]:
    times = sorted(demo.restart_seconds)
    if not times:
        return {}
    return {
        "first_start_s": round(demo.first_start_seconds, 3),
        "restart_median_s": round(times[len(times) // 2], 3),
        "restart_max_s": round(times[-1], 3),
    }


# random kills ---------------------------------------------------------------------------


@pytest.mark.slow
def test_random_kills_under_load(database: Database, tmp_path: Path) -> None:
    started = time.monotonic()
    traffic = Traffic()
    stop = threading.Event()
    killer_errors: list[BaseException] = []
    with crashing_demo(database, tmp_path, fork=True) as demo:
        accounts = open_accounts(demo)

        def client_thread(number: int) -> None:
            next_transfer = planner(accounts, seed=1000 + number, prefix=f"c{number}")
            with traffic.client(demo.url) as client:
                while not stop.is_set():
                    if traffic.call(client, next_transfer()) is None:
                        return

        def killer() -> None:
            rng = random.Random(7)
            deadline = time.monotonic() + RUN_LIMIT
            try:
                while demo.kills < KILLS and time.monotonic() < deadline:
                    time.sleep(rng.uniform(*RANDOM_UPTIME))
                    demo.crash_and_restart()
            except BaseException as error:  # reported by the main thread
                killer_errors.append(error)
            finally:
                stop.set()

        threads = [threading.Thread(target=client_thread, args=(n,)) for n in range(CLIENTS)]
        for thread in threads:
            thread.start()
        kill_thread = threading.Thread(target=killer)
        kill_thread.start()
        kill_thread.join(RUN_LIMIT + 60)
        stop.set()
        for thread in threads:
            thread.join((POLICY.timeout or 30) + 30)
        assert not any(thread.is_alive() for thread in [kill_thread, *threads])
        run_seconds = time.monotonic() - started
        final_balances = balances(demo)
        log = demo.log()

    assert not killer_errors, killer_errors
    assert demo.kills == KILLS
    # Every call got a final answer: the transfer, or the bank's stored refusal.
    assert not traffic.failures, traffic.failures[:5]
    seen = traffic.seen
    for s in seen:
        if s.planned.refused:
            assert s.status == 409, s
            assert b"/insufficient-funds" in s.content
        else:
            assert s.status == 201, (s.status, s.content)
    # Each logical transfer exists exactly once, as planned, and its caller's answer
    # names that very transfer.
    rows = database.transfers()
    made = [s for s in seen if not s.planned.refused]
    assert set(rows) == {s.planned.key for s in made}
    duplicates = sum(len(found) - 1 for found in rows.values())
    assert duplicates == 0
    for s in made:
        (row,) = rows[s.planned.key]
        planned = s.planned
        assert (row.from_account, row.to_account, row.amount) == (
            planned.from_account, planned.to_account, planned.amount,
        )  # fmt: skip
        assert httpx.Response(201, content=s.content).json()["id"] == row.transfer_id
    # No money appeared or vanished; each account moved exactly as planned.
    assert sum(final_balances.values()) == ACCOUNTS * OPENING_BALANCE
    assert final_balances == expected_balances(accounts, [s.planned for s in made])
    # Byte-identical answers, and nothing left in flight.
    record_attempts = check_against_the_store(database, seen)
    assert "Traceback" not in log, log[-3000:]

    replayed = sum(1 for s in seen if s.replayed)
    retried_calls = sum(1 for s in seen if s.attempts > 1)
    taken_over = sum(count for attempts, count in record_attempts.items() if attempts > 1)
    # The kills really hit requests: some were in flight (taken over after their lease)
    # or had committed without their caller hearing back (answered by a replay).
    assert retried_calls > 0
    assert replayed + taken_over > 0
    assert len(made) >= KILLS
    summary = {
        "store": database.kind,
        "kills": demo.kills,
        "calls": len(seen),
        "transfers": len(made),
        "refusals": len(seen) - len(made),
        "duplicates": duplicates,
        "retried_calls": retried_calls,
        "retries": sum(traffic.retries.values()),
        "retry_reasons": dict(traffic.retries.most_common(4)),
        "replayed_calls": replayed,
        "taken_over_records": taken_over,
        "bodies_lost_after_headers": traffic.body_lost,
        **restart_summary(demo),
        "wall_s": round(run_seconds, 1),
    }
    print(f"\ncrash (random kills): {summary}")


# a kill aimed at the window after the commit ------------------------------------------


def wait_for_marker(marker: Path, key: str, deadline: float) -> None:
    """Until `key` has a line in the marker file (the demo committed its transfer)."""
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if key in marker.read_text().splitlines():
                return
        time.sleep(0.003)
    raise TimeoutError(f"no commit marker for {key} within {MARKER_WAIT} s")


@pytest.mark.slow
@pytest.mark.parametrize("transactional", [True, False], ids=["completion-on", "completion-off"])
def test_a_kill_after_the_commit(database: Database, tmp_path: Path, transactional: bool) -> None:
    started = time.monotonic()
    marker = tmp_path / "commits.txt"
    hooks = {
        "ONCELY_DEMO_AFTER_COMMIT_DELAY_MS": str(AFTER_COMMIT_DELAY_MS),
        "ONCELY_DEMO_COMMIT_MARKER": str(marker),
    }
    args = () if transactional else ("--no-transactional-completion",)
    traffic = Traffic()
    killed: list[str] = []
    killer_errors: list[BaseException] = []
    with crashing_demo(database, tmp_path, *args, env=hooks, fork=False) as demo:
        banner = demo.log()
        accounts = open_accounts(demo)
        next_transfer = planner(accounts, seed=99, prefix="t")
        plan: list[Planned] = []
        while len(plan) < TARGETED_KILLS:
            planned = next_transfer()
            if not planned.refused:
                plan.append(planned)

        def killer() -> None:
            try:
                for planned in plan:
                    wait_for_marker(marker, planned.key, time.monotonic() + MARKER_WAIT)
                    demo.crash_and_restart()  # inside the window: after commit, before reply
                    killed.append(planned.key)
            except BaseException as error:  # reported by the main thread
                killer_errors.append(error)

        kill_thread = threading.Thread(target=killer)
        kill_thread.start()
        with traffic.client(demo.url) as client:
            for planned in plan:
                if traffic.call(client, planned) is None:
                    break
        kill_thread.join(MARKER_WAIT + READY_TIMEOUT)
        assert not kill_thread.is_alive()
        final_balances = balances(demo)
        commits = marker.read_text().splitlines()

    assert not killer_errors, killer_errors
    assert not traffic.failures, traffic.failures
    assert killed == [planned.key for planned in plan]
    seen = traffic.seen
    assert [s.planned for s in seen] == plan
    assert all(s.status == 201 for s in seen), [s.content for s in seen]
    # Each call lost its first answer to the kill and got one on a retry.
    assert all(s.attempts > 1 for s in seen)
    rows = database.transfers()
    assert set(rows) == {planned.key for planned in plan}
    duplicates = sum(len(found) - 1 for found in rows.values())
    if transactional:
        assert "in the handler's transaction" in banner
        # The commit stored the response with the money: every retry was a replay of the
        # answer that the kill swallowed, and nothing ran twice.
        assert duplicates == 0
        assert all(s.replayed for s in seen)
        assert commits == [planned.key for planned in plan]
        assert final_balances == expected_balances(accounts, plan)
        assert check_against_the_store(database, seen) == {1: len(plan)}
    else:
        assert "--no-transactional-completion" in banner
        # The hole: the record was still in flight when the process died, its lease
        # lapsed, the retry took it over and moved the money again. Every kill inside the
        # window made exactly one duplicate.
        assert duplicates == len(killed) == TARGETED_KILLS
        assert all(len(rows[planned.key]) == 2 for planned in plan)
        assert not any(s.replayed for s in seen)
        assert commits == [key for planned in plan for key in (planned.key, planned.key)]
        assert final_balances == expected_balances(accounts, plan + plan)
        assert sum(final_balances.values()) == ACCOUNTS * OPENING_BALANCE
        # The caller heard about the second transfer only: the first is an orphan effect.
        for s in seen:
            reported = httpx.Response(201, content=s.content).json()["id"]
            assert reported in {row.transfer_id for row in rows[s.planned.key]}
        assert check_against_the_store(database, seen) == {2: len(plan)}
    summary = {
        "store": database.kind,
        "transactional_completion": transactional,
        "kills_in_window": len(killed),
        "duplicates": duplicates,
        "replayed_calls": sum(1 for s in seen if s.replayed),
        "retries": sum(traffic.retries.values()),
        **restart_summary(demo),
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(f"\ncrash (kill after commit): {summary}")
