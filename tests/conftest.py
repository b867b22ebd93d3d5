from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from oncely.stores import MemoryStore, SQLiteStore
from tests.support.services import services_required

# Shared assertion helpers report like test asserts do (registered before any test
# module imports them).
pytest.register_assert_rewrite("tests.support.load")

pytest_plugins = ["tests.support.redis_fixtures", "tests.support.postgres_fixtures"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def memory_store() -> Iterator[MemoryStore]:
    store = MemoryStore()
    yield store
    store.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "oncely.db")
    yield store
    store.close()


# With ONCELY_REQUIRE_SERVICES=1 (CI) a skipped test is a failure of the run: a skip
# could hide a store that was never exercised.
_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped and services_required():
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"ONCELY_REQUIRE_SERVICES is set and {len(_skipped)} test(s) were skipped: "
                + ", ".join(_skipped[:10]),
                red=True,
            )
