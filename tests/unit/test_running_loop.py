"""`running_loop()`: asyncio's running loop, found without a system call per use."""

from __future__ import annotations

import asyncio

import pytest

from oncely.stores.base import running_loop


async def _seen() -> tuple[asyncio.AbstractEventLoop, asyncio.AbstractEventLoop]:
    return running_loop(), asyncio.get_running_loop()


def test_it_follows_each_new_loop_of_a_thread() -> None:
    first, expected_first = asyncio.run(_seen())
    second, expected_second = asyncio.run(_seen())
    assert first is expected_first
    assert second is expected_second
    assert first is not second


def test_outside_a_loop_it_raises_like_asyncio() -> None:
    asyncio.run(_seen())  # a loop seen in this thread, now stopped
    with pytest.raises(RuntimeError):
        running_loop()


def test_a_worker_thread_has_no_running_loop() -> None:
    def in_thread() -> bool:
        try:
            running_loop()
        except RuntimeError:
            return True
        return False

    async def main() -> bool:
        return await asyncio.to_thread(in_thread)

    assert asyncio.run(main())
