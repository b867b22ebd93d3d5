"""Lease tokens fence a claim: two claims must never share one."""

from __future__ import annotations

import os
import threading

from oncely.core.exchange import new_token


def test_tokens_are_unique_across_threads() -> None:
    tokens: list[list[str]] = [[] for _ in range(4)]

    def draw(into: list[str]) -> None:
        into.extend(new_token() for _ in range(5_000))

    threads = [threading.Thread(target=draw, args=(bucket,)) for bucket in tokens]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    drawn = [token for bucket in tokens for token in bucket]
    assert len(drawn) == 20_000
    assert len(set(drawn)) == len(drawn)


def test_a_forked_worker_draws_from_its_own_secret_prefix() -> None:
    parent = new_token()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its first token and leave at once
        os.write(write_end, new_token().encode())
        os._exit(0)
    os.close(write_end)
    child = os.read(read_end, 256).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    assert child
    assert child[:16] != parent[:16]  # 64 random bits each: equal only by a 2^-64 chance
