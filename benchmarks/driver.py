"""The load driver: raw HTTP/1.1 over asyncio sockets, in a process of its own.

It is not the bottleneck: requests are pre-built byte strings, responses are parsed
only as far as framing needs (status line, Content-Length or chunked), and each
connection runs a closed loop. Its own CPU time is measured and reported per slice.

It runs as `python -m benchmarks.driver` and takes one JSON command per stdin line,
answering one JSON line on stdout:

    {"op": "load", "port": 8001, "mode": "fresh", "duration": 2.0, "connections": 32,
     "prefix": "r1-v3-s7-"}
    {"op": "load", "port": 8001, "mode": "replay", "duration": 2.0, "keys": 500, ...}
    {"op": "count", "port": 8001, "mode": "fresh", "requests": 200, "connections": 1, ...}
    {"op": "rounds", "port": 8001, "rounds": 30, "width": 20, "prefix": "dup-"}
    {"op": "quit"}

Keys are what clients send: random UUIDs (oncely's client sends `uuid4`, as the
Idempotency-Key draft and the payment APIs recommend). A key is derived from the
command's prefix and the request's index, so a replay pool can be sent again; with
`--keys counter` it is the prefix and the index themselves (keys that sort in the
order they are sent, which spares a B-tree store its random writes).

Every loop is bounded by a deadline and a request count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

HOST = "127.0.0.1"
PATH = "/payments"
BODY = b'{"amount":1000,"currency":"EUR","reference":"invoice-42"}'
CONNECT_TIMEOUT = 5.0
REQUEST_TIMEOUT = 10.0
MAX_REQUESTS_PER_SLICE = 2_000_000


def uuid_key(prefix: bytes, index: int) -> bytes:
    """A UUID version 4 in its text form, random-looking, the same for (prefix, index)."""
    digest = hashlib.blake2b(b"%s%d" % (prefix, index), digest_size=16).digest()
    return str(uuid.UUID(bytes=digest, version=4)).encode()


def counter_key(prefix: bytes, index: int) -> bytes:
    return b"%s%d" % (prefix, index)


key_for = uuid_key  # set by --keys


def request_bytes(port: int, key: bytes | None, path: str = PATH, body: bytes = BODY) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    ).encode()
    if key is not None:
        head += b"Idempotency-Key: " + key + b"\r\n"
    return head + b"\r\n" + body


class Closed(Exception):
    """The server closed the connection."""


class Connection(asyncio.Protocol):
    """One keep-alive connection: send a request, await its whole response."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(Closed())

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        parsed = self._parse()
        if parsed is not None:
            self.waiter = None
            waiter.set_result(parsed)

    def _parse(self) -> tuple[int, bytes] | None:
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(buffer[:end])
        lower = head.lower()
        at = lower.find(b"\r\ncontent-length:")
        if at >= 0:
            stop = lower.find(b"\r\n", at + 2)
            length = int(lower[at + 17 : stop if stop >= 0 else len(lower)])
            total = end + 4 + length
            if len(buffer) < total:
                return None
        elif b"transfer-encoding: chunked" in lower:
            last = buffer.find(b"0\r\n\r\n", end + 4)
            if last < 0:
                return None
            total = last + 5
        else:
            total = end + 4
        del buffer[:total]
        return int(head[9:12]), lower

    def request(self, payload: bytes) -> asyncio.Future[tuple[int, bytes]]:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[tuple[int, bytes]] = loop.create_future()
        if self.closed or self.transport is None:
            waiter.set_exception(Closed())
            return waiter
        self.waiter = waiter
        self.transport.write(payload)
        return waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(port: int) -> Connection:
    loop = asyncio.get_running_loop()
    _, protocol = await asyncio.wait_for(
        loop.create_connection(Connection, HOST, port), CONNECT_TIMEOUT
    )
    return protocol


@dataclass
class Tally:
    latencies: list[int] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    replayed: int = 0
    errors: list[str] = field(default_factory=list)


def percentile(sorted_values: list[int], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index] / 1e6  # ns -> ms


def summarise(tally: Tally, elapsed: float, cpu: float) -> dict[str, Any]:
    latencies = sorted(tally.latencies)
    count = len(latencies)
    return {
        "requests": count,
        "elapsed": elapsed,
        "rps": count / elapsed if elapsed > 0 else 0.0,
        "p50_ms": percentile(latencies, 0.50),
        "p90_ms": percentile(latencies, 0.90),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": latencies[-1] / 1e6 if latencies else float("nan"),
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "replayed": tally.replayed,
        "errors": tally.errors[:5],
        "error_count": len(tally.errors),
        "driver_cpu_s": cpu,
        "driver_cpu_us_per_req": cpu / count * 1e6 if count else float("nan"),
    }


async def open_connections(port: int, count: int) -> list[Connection]:
    return list(await asyncio.gather(*(connect(port) for _ in range(count))))


async def load(command: dict[str, Any]) -> dict[str, Any]:
    """A closed loop on `connections` connections for `duration` s, or `requests` requests."""
    port = int(command["port"])
    mode = command.get("mode", "fresh")
    duration = float(command.get("duration", 2.0))
    limit = int(command.get("requests", MAX_REQUESTS_PER_SLICE))
    prefix = str(command.get("prefix", "k-")).encode()
    keys = int(command.get("keys", 0))
    check_replayed = bool(command.get("check_replayed", mode == "replay"))
    connections = await open_connections(port, int(command.get("connections", 32)))
    # Replay keys cycle; fresh keys never repeat. Requests are built here, off the clock
    # of the server but on the driver's own CPU account (reported).
    if mode == "replay":
        pool = [request_bytes(port, key_for(prefix, i)) for i in range(keys)]
    elif mode == "nokey":
        pool = [request_bytes(port, None)]
    else:
        pool = []
    tally = Tally()
    issued = 0
    deadline = 0.0
    now_ns = time.perf_counter_ns

    async def worker(conn: Connection) -> None:
        nonlocal issued
        while issued < limit and time.monotonic() < deadline:
            if conn.closed:  # a server without keep-alive (gunicorn's sync worker)
                try:
                    conn = await connect(port)
                except (TimeoutError, OSError) as exc:
                    tally.errors.append(type(exc).__name__)
                    return
                connections.append(conn)
            index = issued
            issued += 1
            if mode == "fresh":
                payload = request_bytes(port, key_for(prefix, index))
            else:
                payload = pool[index % len(pool)]
            started = now_ns()
            try:
                status, head = await asyncio.wait_for(conn.request(payload), REQUEST_TIMEOUT)
            except (Closed, TimeoutError, OSError) as exc:
                tally.errors.append(type(exc).__name__)
                return
            tally.latencies.append(now_ns() - started)
            tally.statuses[status] += 1
            if check_replayed and b"replayed: true" in head:
                tally.replayed += 1
            if b"connection: close" in head:
                conn.close()
                conn.closed = True

    gc.disable()
    cpu0 = time.process_time()
    started = time.perf_counter()
    deadline = time.monotonic() + (duration if "requests" not in command else 600.0)
    try:
        await asyncio.gather(*(worker(conn) for conn in connections))
    finally:
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu0
        gc.enable()
        for conn in connections:
            conn.close()
    return summarise(tally, elapsed, cpu)


async def rounds(command: dict[str, Any]) -> dict[str, Any]:
    """`rounds` times, `width` simultaneous requests with one shared fresh key."""
    port = int(command["port"])
    width = int(command.get("width", 20))
    count = int(command.get("rounds", 30))
    prefix = str(command.get("prefix", "dup-")).encode()
    deadline = time.monotonic() + float(command.get("max_seconds", 60.0))
    connections = await open_connections(port, width)
    tally = Tally()
    per_round: list[dict[str, int]] = []
    cpu0 = time.process_time()
    started = time.perf_counter()
    done = 0
    try:
        for index in range(count):
            if time.monotonic() > deadline:
                tally.errors.append(f"deadline after {index} rounds")
                break
            payload = request_bytes(port, key_for(prefix, index))
            t0 = time.perf_counter_ns()
            replies = await asyncio.gather(
                *(asyncio.wait_for(conn.request(payload), REQUEST_TIMEOUT) for conn in connections),
                return_exceptions=True,
            )
            t1 = time.perf_counter_ns()
            statuses: Counter[int] = Counter()
            for reply in replies:
                if isinstance(reply, BaseException):
                    tally.errors.append(type(reply).__name__)
                    continue
                status, head = reply
                statuses[status] += 1
                if b"replayed: true" in head:
                    tally.replayed += 1
                tally.latencies.append(t1 - t0)
            tally.statuses.update(statuses)
            per_round.append({str(k): v for k, v in statuses.items()})
            done += 1
            if any(c.closed for c in connections):
                connections = [c for c in connections if not c.closed]
                connections += await open_connections(port, width - len(connections))
    finally:
        for conn in connections:
            conn.close()
    result = summarise(tally, time.perf_counter() - started, time.process_time() - cpu0)
    result["rounds"] = done
    result["per_round"] = per_round
    return result


async def serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            return
        command = json.loads(line)
        op = command.get("op")
        if op == "quit":
            return
        try:
            if op in ("load", "count"):
                reply = await load(command)
            elif op == "rounds":
                reply = await rounds(command)
            else:
                reply = {"error": f"unknown op {op!r}"}
        except Exception as exc:  # the orchestrator reports it; the driver goes on
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


def main() -> None:
    global key_for
    parser = argparse.ArgumentParser(prog="python -m benchmarks.driver")
    parser.add_argument("--keys", choices=("uuid", "counter"), default="uuid")
    key_for = counter_key if parser.parse_args().keys == "counter" else uuid_key
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve())


if __name__ == "__main__":
    main()
