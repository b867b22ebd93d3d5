"""Real gunicorn processes (sync workers) for the WSGI end-to-end tests."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from tests.support.servers import ServerProcess, free_port, start_process


@contextlib.contextmanager
def run_gunicorn(
    app: str,
    *,
    tmp_path: Path,
    env: Mapping[str, str] | None = None,
    workers: int = 4,
    extra_args: Sequence[str] = (),
) -> Iterator[ServerProcess]:
    """Run `gunicorn app` (an import string, `tests.apps.x:app`) until the block ends."""
    port = free_port()
    argv = [
        sys.executable, "-m", "gunicorn", app,
        "--bind", f"127.0.0.1:{port}",
        "--workers", str(workers),
        "--worker-class", "sync",
        "--backlog", "256",
        "--timeout", "60",
        "--graceful-timeout", "5",
        "--log-level", "warning",
        *extra_args,
    ]  # fmt: skip
    server = start_process(argv, port=port, env=env, log_path=tmp_path / f"gunicorn-{port}.log")
    try:
        yield server
    finally:
        server.stop()
