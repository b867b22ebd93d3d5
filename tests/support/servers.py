"""Real server processes for end-to-end tests, on an ephemeral loopback port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_listening(
    port: int, process: subprocess.Popen[bytes], timeout: float = 20.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout} s")


@dataclass
class ServerProcess:
    """A running server; `url` is its base URL."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10.0, **kwargs)  # type: ignore[arg-type]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the whole process group (the master and its workers)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)
        self.process.wait(timeout=15)

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def start_process(
    argv: Sequence[str],
    *,
    port: int,
    env: Mapping[str, str] | None = None,
    log_path: Path,
    cwd: Path | None = None,
    ready_timeout: float = 20.0,
) -> ServerProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    log = log_path.open("wb")
    process = subprocess.Popen(
        list(argv),
        env=full_env,
        cwd=str(cwd or REPO_ROOT),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # own process group, so kill() reaches the workers too
    )
    server = ServerProcess(process=process, port=port, log_path=log_path)
    try:
        wait_until_listening(port, process, ready_timeout)
    except BaseException:
        server.stop()
        raise RuntimeError(f"server did not start:\n{server.log()}") from None
    return server


@contextlib.contextmanager
def run_uvicorn(
    app: str,
    *,
    tmp_path: Path,
    env: Mapping[str, str] | None = None,
    workers: int = 1,
    factory: bool = False,
    extra_args: Sequence[str] = (),
) -> Iterator[ServerProcess]:
    """Run `uvicorn app` (an import string, `tests.apps.x:app`) until the block ends."""
    port = free_port()
    argv = [
        sys.executable, "-m", "uvicorn", app,
        "--host", "127.0.0.1", "--port", str(port),
        "--no-access-log", "--log-level", "warning",
        "--workers", str(workers),
        *(["--factory"] if factory else []),
        *extra_args,
    ]  # fmt: skip
    server = start_process(argv, port=port, env=env, log_path=tmp_path / f"uvicorn-{port}.log")
    try:
        yield server
    finally:
        server.stop()
