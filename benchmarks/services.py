"""Private Redis and PostgreSQL servers on spare loopback ports, for this run only.

Private servers keep the measurement honest: nothing else sends them commands, so
`MONITOR` and `pg_stat_statements` count exactly the variant under load, and they can
be flushed between phases without touching anybody's data. PostgreSQL gets
`shared_preload_libraries=pg_stat_statements`, which the shared server lacks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
BENCH_DB = "bench"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def process_tree_cpu(pid: int) -> float:
    """utime + stime of a process and all its descendants, in seconds."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def process_tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


@dataclass
class Redis:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.process.pid

    def command(self, *args: str) -> str:
        done = subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        return done.stdout

    def flush(self) -> None:
        self.command("FLUSHALL")  # our private server: nobody else's data is here

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_redis() -> Redis | str:
    binary = shutil.which("redis-server")
    if binary is None or shutil.which("redis-cli") is None:
        return "redis-server/redis-cli not found (apt-get install -y redis-server)"
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no", "--protected-mode", "yes", "--loglevel", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    if not wait_port(port, 10):
        process.kill()
        return f"private redis-server did not listen on {port}"
    return Redis(port, process)


@dataclass
class Postgres:
    port: int
    data_dir: Path
    bin_dir: Path
    log: Path
    postmaster_pid: int = 0
    _owned: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{BENCH_DB}"

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def pid(self) -> int:
        return self.postmaster_pid

    def stop(self) -> None:
        _as_postgres(
            [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"],
            timeout=60,
        )
        shutil.rmtree(self.data_dir.parent, ignore_errors=True)


def _as_postgres(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    # initdb refuses to run as root: run the server as the `postgres` OS user.
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run(
        prefix + argv, capture_output=True, text=True, timeout=timeout, check=False
    )


def start_postgres() -> Postgres | str:
    if not PG_BIN_DIRS:
        return "PostgreSQL server binaries not found (apt-get install -y postgresql)"
    bin_dir = PG_BIN_DIRS[0]
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "runuser not found: cannot start PostgreSQL as the postgres user"
    base = Path(tempfile.mkdtemp(prefix="oncely-bench-pg-"))
    data = base / "data"
    log = base / "postgres.log"
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    init = _as_postgres(
        [str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
         "--no-sync", "-E", "UTF8"],
        timeout=120,
    )  # fmt: skip
    if init.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        return f"initdb failed: {init.stderr[-400:]}"
    port = free_port()
    options = (
        f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={base} "
        "-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all "
        "-c max_connections=200 -c shared_buffers=512MB"
    )
    start = _as_postgres(
        [str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w",
         "-t", "60", "start"],
        timeout=90,
    )  # fmt: skip
    if start.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        return f"pg_ctl start failed: {start.stderr[-400:]} {start.stdout[-400:]}"
    server = Postgres(port, data, bin_dir, log)
    server.postmaster_pid = int((data / "postmaster.pid").read_text().split()[0])
    import psycopg

    with psycopg.connect(server.admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {BENCH_DB}")
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    return server
