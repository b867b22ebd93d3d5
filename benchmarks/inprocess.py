"""oncely's own cost per request, in one process: the app bare and wrapped, interleaved.

    .venv-bench/bin/python -m benchmarks.inprocess                 # raw and FastAPI apps
    .venv-bench/bin/python -m benchmarks.inprocess --src ../old/src  # another checkout's oncely

No server and no sockets: the ASGI app is called with prebuilt scopes, in batches that
alternate between the variants (A B C ... A B C ...), and the median batch is reported.
What it gives is the microseconds oncely adds to one request, steady to about 1 µs from
one run to the next, where the server matrix (`benchmarks.run`) moves by a quarter. So
a change to the hot path is measured here first, then confirmed in the server.

Beside `oncely` (memory store) it runs two knock-outs, to say where the cost goes:
`oncely-no-fingerprint` (`fingerprint=None`) and `oncely-null-store` (a store that keeps
nothing), and `floor`: a middleware that does the least any idempotency layer must do
(read the body, canonicalise and hash it, keep the response in a dict;
`benchmarks/apps/floor.py`), as a reference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Any], Awaitable[None]]

BODY = b'{"amount": 1250, "currency": "NZD", "reference": "inv-42"}'
POOL = 1000  # completed keys that replays cycle through


def uuid_key() -> bytes:
    """What clients send (made before the clock starts)."""
    return str(uuid.uuid4()).encode()


def request_scope(key: bytes) -> Scope:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/payments", "raw_path": b"/payments", "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
        "state": {},
        "headers": [
            (b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
            (b"idempotency-key", key), (b"content-length", b"%d" % len(BODY)),
        ],
    }  # fmt: skip


async def receive() -> Message:
    return {"type": "http.request", "body": BODY, "more_body": False}


async def discard(message: Message) -> None:
    pass


def variants(framework: str) -> dict[str, ASGIApp]:
    from benchmarks.apps import asgi as apps
    from benchmarks.apps.floor import Floor
    from benchmarks.apps.keeps_nothing import KeepsNothing
    from oncely import IdempotencyMiddleware
    from oncely.stores import MemoryStore

    def app() -> Any:
        return apps.raw_app() if framework == "raw" else apps.fastapi_app()

    return {
        "bare": app(),
        "oncely": IdempotencyMiddleware(app(), store=MemoryStore()),
        "oncely-no-fingerprint": IdempotencyMiddleware(
            app(), store=MemoryStore(), fingerprint=None
        ),
        "oncely-null-store": IdempotencyMiddleware(app(), store=KeepsNothing()),
        "floor": Floor(app()),
    }


async def measure(framework: str, scenario: str, batch: int, rounds: int) -> dict[str, list[float]]:
    apps = variants(framework)
    if scenario == "replay":
        del apps["oncely-null-store"]  # it keeps nothing, so it has nothing to replay
    pools = {name: [uuid_key() for _ in range(POOL)] for name in apps}
    if scenario == "replay":
        for name, app in apps.items():
            for key in pools[name]:
                await app(request_scope(key), receive, discard)
    timings: dict[str, list[float]] = {name: [] for name in apps}
    for round_ in range(rounds + 2):  # the first two rounds warm up
        for name, app in apps.items():
            if scenario == "replay":
                keys = [pools[name][(round_ * batch + i) % POOL] for i in range(batch)]
            else:
                keys = [uuid_key() for _ in range(batch)]
            scopes = [request_scope(key) for key in keys]
            started = time.perf_counter()
            for scope in scopes:
                await app(scope, receive, discard)
            if round_ >= 2:
                timings[name].append((time.perf_counter() - started) / batch * 1e6)
    return timings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frameworks", default="raw,fastapi")
    parser.add_argument("--scenarios", default="fresh,replay")
    parser.add_argument("--batch", type=int, default=500, help="requests per batch")
    parser.add_argument("--rounds", type=int, default=30, help="batches per variant")
    parser.add_argument("--src", help="import oncely from this folder (another checkout)")
    args = parser.parse_args(argv)
    if args.src:
        sys.path.insert(0, str(Path(args.src).resolve()))
    import uvloop

    import oncely

    print(f"oncely from {Path(oncely.__file__).parent}")
    print("| app | scenario | variant | µs/request | oncely adds µs | ratio to bare |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for framework in args.frameworks.split(","):
        for scenario in args.scenarios.split(","):
            timings = uvloop.run(measure(framework, scenario, args.batch, args.rounds))
            bare = statistics.median(timings["bare"])
            for name, values in timings.items():
                median = statistics.median(values)
                print(
                    f"| {framework} | {scenario} | {name} | {median:.2f} | "
                    f"{median - bare:+.2f} | {bare / median:.2f} |"
                )


if __name__ == "__main__":
    main()
