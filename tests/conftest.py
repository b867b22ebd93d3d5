from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from oncely.stores import MemoryStore, SQLiteStore


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
