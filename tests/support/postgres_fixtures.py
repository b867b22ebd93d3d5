"""PostgreSQL for the tests (a pytest plugin): the shared server on loopback, and a
private throwaway cluster for the tests that stop and restart PostgreSQL.

Each test gets its own table, dropped afterwards, so tests never see each other's
records and the shared server keeps nothing.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.servers import free_port
from tests.support.services import POSTGRES_URL, service_missing

if TYPE_CHECKING:
    from oncely.stores.postgres import PostgresStore


def unique_table() -> str:
    return f"oncely_test_{uuid.uuid4().hex[:12]}"


def drop_table(url: str, table: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP TABLE IF EXISTS "{table}"')


def postgres_reachable(url: str) -> str | None:
    """None when PostgreSQL answers at `url`, else why not."""
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - a dev install has it
        return f"psycopg is not installed: {exc}"
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return str(exc).strip() or type(exc).__name__
    return None


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The shared server's URL; skips (or fails in CI) when it is not reachable."""
    reason = postgres_reachable(POSTGRES_URL)
    if reason is not None:
        service_missing("postgres", reason)
    return POSTGRES_URL


@pytest.fixture
def postgres_table(postgres_url: str) -> Iterator[str]:
    """A fresh table name on the shared server, dropped after the test."""
    table = unique_table()
    yield table
    drop_table(postgres_url, table)


@pytest.fixture
async def postgres_store(postgres_url: str, postgres_table: str) -> AsyncIterator[PostgresStore]:
    from oncely.stores.postgres import PostgresStore

    store = PostgresStore(postgres_url, table=postgres_table)
    try:
        yield store
    finally:
        await store.aclose()


# A private cluster: stopped and started by tests, never the shared server. ---------------


def postgres_bindir() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    if shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["pg_config", "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.insert(0, out.stdout.strip())
    for candidate in candidates:
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class PrivatePostgres:
    """One PostgreSQL cluster in a temporary directory, on a spare loopback port."""

    bindir: Path
    root: Path
    port: int

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def logfile(self) -> Path:
        return self.root / "postgres.log"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str, timeout: float) -> subprocess.CompletedProcess[str]:
        # PostgreSQL refuses to run as root: run its tools as the `postgres` OS user.
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run(
            [*prefix, *argv], capture_output=True, text=True, timeout=timeout, check=False
        )

    def init(self) -> None:
        result = self._run(
            str(self.bindir / "initdb"), "-D", str(self.datadir),
            "-A", "trust", "-U", "postgres", "--no-sync", "--no-instructions",
            timeout=60,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{result.stdout}\n{result.stderr}")

    def start(self, timeout: float = 30) -> None:
        options = (
            f"-c port={self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self.root} -c shared_buffers=16MB "
            "-c fsync=on -c max_connections=120 -c max_wal_size=64MB"
        )
        result = self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile),
            "-o", options, "-w", "-t", str(int(timeout)), "start",
            timeout=timeout + 10,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed:\n{result.stdout}\n{result.stderr}")

    def stop(self, mode: str = "fast", timeout: float = 30) -> None:
        result = self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.datadir),
            "-m", mode, "-w", "-t", str(int(timeout)), "stop",
            timeout=timeout + 10,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl stop failed:\n{result.stdout}\n{result.stderr}")

    def running(self) -> bool:
        result = self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "status", timeout=10
        )
        return result.returncode == 0

    def ensure_running(self) -> None:
        if not self.running():
            self.start()


@pytest.fixture(scope="session")
def private_postgres() -> Iterator[PrivatePostgres]:
    """A private cluster for restart and outage tests, shared by the session.

    A test that stops it starts it again (or calls `ensure_running`).
    """
    bindir = postgres_bindir()
    if bindir is None:
        service_missing("postgres", "initdb and pg_ctl were not found for a private cluster")
    assert bindir is not None
    root = Path(tempfile.mkdtemp(prefix="oncely-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    cluster = PrivatePostgres(bindir=bindir, root=root, port=free_port())
    try:
        cluster.init()
        cluster.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        service_missing("postgres", f"could not start a private cluster: {exc}")
    try:
        yield cluster
    finally:
        with contextlib.suppress(RuntimeError, OSError, subprocess.SubprocessError):
            if cluster.running():
                cluster.stop(mode="immediate")
        shutil.rmtree(root, ignore_errors=True)
