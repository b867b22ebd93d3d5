"""Redis and PostgreSQL on loopback: a skip on a laptop without them, a failure in CI.

CI sets ONCELY_REQUIRE_SERVICES=1, so a missing service can never hide behind a skip.
"""

from __future__ import annotations

import os
import socket

import pytest

REDIS_URL = os.environ.get("ONCELY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "ONCELY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)

HOW_TO_START = {
    "redis": (
        "start it with: redis-server --daemonize yes --bind 127.0.0.1 --port 6379 "
        "--save '' --appendonly no"
    ),
    "postgres": (
        "start it with: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start "
        "(trust auth, database 'test')"
    ),
}


def services_required() -> bool:
    return os.environ.get("ONCELY_REQUIRE_SERVICES", "") not in ("", "0", "false")


def service_missing(name: str, reason: str) -> None:
    """Skip (laptop) or fail (CI) a test whose service is not reachable."""
    message = f"{name} is not reachable ({reason}); {HOW_TO_START.get(name, '')}"
    if services_required():
        pytest.fail(f"ONCELY_REQUIRE_SERVICES is set: {message}", pytrace=False)
    pytest.skip(message)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
