"""The demo server tunes the garbage collector as the README advises."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from oncely.cli import tune_gc_for_serving


@pytest.fixture
def collector_restored() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("collector_restored")
def test_the_demo_server_freezes_start_up_and_collects_gen_0_ten_times_less_often() -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    tune_gc_for_serving()
    assert gc.get_freeze_count() > 1000  # everything imported so far
    assert gc.get_threshold() == (10_000, 10, 10)
