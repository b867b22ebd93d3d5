"""A store's own client CPU per operation, with no app and no HTTP around it.

    .venv-bench/bin/python -m benchmarks.store_cpu redis://127.0.0.1:6379/0
    .venv-bench/bin/python -m benchmarks.store_cpu memory:// sqlite:////tmp/s.db --tasks 1

For each store URL: `--tasks` concurrent tasks (32, as many as the server benchmark's
connections) each claim and complete fresh keys, then claim completed keys again
(replays). It prints this process's CPU per fresh claim + complete and per replay claim
(best of `--rounds`), and the wall time per operation. Records go under a prefix or
table of their own (Redis, PostgreSQL), removed at the end. In a hot loop like this
the store's code stays in the caches; in the server, around an app, the same work costs
several times as much (docs/benchmarks.md, "Every miss").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from typing import Any

from oncely.core import StoredResponse
from oncely.stores.urls import store_from_url

RESPONSE = StoredResponse(
    201,
    ((b"content-type", b"application/json"), (b"content-length", b"66")),
    b'{"id":"pay_1","amount":1250,"currency":"NZD","status":"accepted"}',
)
FINGERPRINT = "5f3c8a0e9b2d4c6f8a1e3b5d7c9f0a2e"
SCOPE = "anonymous"


def options_for(url: str) -> dict[str, Any]:
    run = f"bench{os.getpid()}"
    if url.startswith(("redis", "unix")):
        return {"prefix": run}
    if url.startswith("postgres"):
        return {"table": run}
    return {}


def remove(url: str, options: dict[str, Any]) -> None:
    """Drop this run's records from a shared Redis or PostgreSQL."""
    if "prefix" in options:
        import redis

        with redis.Redis.from_url(url) as client:
            names = list(client.scan_iter(match=f"{options['prefix']}:*", count=1000))
            for start in range(0, len(names), 1000):
                client.delete(*names[start : start + 1000])
    elif "table" in options:
        import psycopg
        from psycopg import sql

        drop = sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(options["table"]))
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute(drop)


async def measure(url: str, tasks: int, per_task: int, rounds: int) -> dict[str, float]:
    store: Any = store_from_url(url, **options_for(url))
    completed: list[str] = []

    def new_keys() -> list[str]:
        """What clients send: random keys (made before the clock starts)."""
        return [str(uuid.uuid4()) for _ in range(per_task)]

    async def fresh(keys: list[str]) -> None:
        for key in keys:
            token = f"token-{key}"
            await store.claim(SCOPE, key, FINGERPRINT, token, lease=30.0, retention=3600.0)
            await store.complete(SCOPE, key, token, RESPONSE)
            completed.append(key)

    async def replay(keys: list[str]) -> None:
        for key in keys:
            await store.claim(SCOPE, key, FINGERPRINT, "token-again", lease=30.0, retention=3600.0)

    async def timed(work: list[Any]) -> tuple[float, float]:
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*work)
        return time.process_time() - cpu, time.perf_counter() - wall

    try:
        await fresh(new_keys())  # connects, and loads the scripts or prepares the statements
        operations = tasks * per_task
        fresh_cpu = fresh_wall = replay_cpu = replay_wall = float("inf")
        for _ in range(rounds):
            batches = [new_keys() for _ in range(tasks)]
            cpu, wall = await timed([fresh(keys) for keys in batches])
            fresh_cpu, fresh_wall = min(fresh_cpu, cpu), min(fresh_wall, wall)
            keys = completed[-operations:]
            cpu, wall = await timed([replay(keys[i::tasks]) for i in range(tasks)])
            replay_cpu, replay_wall = min(replay_cpu, cpu), min(replay_wall, wall)
    finally:
        await store.aclose()
        remove(url, options_for(url))
    return {
        "fresh_cpu_us": fresh_cpu / operations * 1e6,
        "fresh_wall_us": fresh_wall / operations * 1e6,
        "replay_cpu_us": replay_cpu / operations * 1e6,
        "replay_wall_us": replay_wall / operations * 1e6,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("urls", nargs="+", help="store URLs, as oncely.stores.store_from_url")
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--per-task", type=int, default=300, help="keys per task and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    import uvloop

    print("| store | tasks | fresh claim + complete: CPU µs | wall µs | replay: CPU µs | wall µs |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for url in args.urls:
        figures = uvloop.run(measure(url, args.tasks, args.per_task, args.rounds))
        print(
            f"| {url} | {args.tasks} | {figures['fresh_cpu_us']:.1f} | "
            f"{figures['fresh_wall_us']:.1f} | {figures['replay_cpu_us']:.1f} | "
            f"{figures['replay_wall_us']:.1f} |"
        )


if __name__ == "__main__":
    main()
