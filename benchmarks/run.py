"""Run the benchmark matrix: oncely beside the bare app and the peer libraries, in one run.

    make bench                                    # the full matrix (about 17 minutes)
    make bench BENCH_ARGS=--quick                 # a smoke run (under 3 minutes)
    .venv-bench/bin/python -m benchmarks.run --variants fastapi/bare,fastapi/oncely-memory

Every variant is its own uvicorn process (one worker, --no-access-log). All of them run
at once and are measured in short slices, interleaved (A B C ... A B C ...): a ratio is
computed between slices of the same round and the median over rounds is reported, so
drift on a noisy machine cancels. docs/benchmarks.md explains every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import profiling, report
from benchmarks.apps import preload
from benchmarks.services import (
    Postgres,
    Redis,
    free_port,
    process_tree_cpu,
    process_tree_rss,
    start_postgres,
    start_redis,
    wait_port,
)

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SERVER_START_TIMEOUT = 180.0  # a memory store preloaded with 1M records takes a while


@dataclass(frozen=True)
class Variant:
    framework: str  # fastapi | starlette | flask
    library: str  # bare | oncely | oncely_prometheus | aih | idemkit | floor
    store: str  # "" | memory | sqlite | sqlite-normal | redis | postgres
    patch: str = ""  # a module run in the server before the app is built (experiments)

    @property
    def name(self) -> str:
        lib = self.library if not self.store else f"{self.library}-{self.store}"
        return f"{self.framework}/{lib}" + ("+patched" if self.patch else "")

    @property
    def baseline(self) -> str:
        return f"{self.framework}/bare"

    @property
    def family(self) -> str:
        """The store family a variant is compared within (sqlite-normal is sqlite)."""
        return "sqlite" if self.store.startswith("sqlite") else (self.store or "none")


def _v(name: str) -> Variant:
    framework, rest = name.split("/", 1)
    library, _, store = rest.partition("-")
    return Variant(framework, library, store)


ASGI_VARIANTS = [
    _v(n)
    for n in (
        "fastapi/bare",
        "fastapi/oncely-memory",
        "fastapi/oncely-sqlite",
        "fastapi/oncely-sqlite-normal",
        "fastapi/oncely-redis",
        "fastapi/oncely-postgres",
        "fastapi/aih-memory",
        "fastapi/aih-redis",
        "fastapi/idemkit-memory",
        "fastapi/idemkit-redis",
        "fastapi/idemkit-postgres",
        "fastapi/floor-memory",
        "starlette/bare",
        "starlette/oncely-memory",
        "starlette/oncely-sqlite",
        "starlette/oncely-redis",
        "starlette/oncely-postgres",
    )
]
# Not in the default matrix; selectable with --variants.
EXTRA_VARIANTS = [
    _v(n) for n in ("raw/bare", "raw/oncely-memory", "raw/oncely-sqlite", "raw/oncely-redis",
                    "raw/oncely-postgres", "raw/aih-memory", "raw/idemkit-memory",
                    "fastapi/oncely_prometheus-memory")
]  # fmt: skip
QUICK_VARIANTS = [
    _v(n)
    for n in (
        "fastapi/bare",
        "fastapi/oncely-memory",
        "fastapi/oncely-sqlite",
        "fastapi/oncely-redis",
        "fastapi/oncely-postgres",
        "fastapi/aih-memory",
        "fastapi/aih-redis",
        "fastapi/idemkit-memory",
        "fastapi/idemkit-redis",
        "fastapi/idemkit-postgres",
    )
]
SCALE_VARIANTS = [
    _v(n)
    for n in (
        "fastapi/bare",
        "fastapi/oncely-memory",
        "fastapi/oncely-sqlite",
        "fastapi/oncely-redis",
        "fastapi/oncely-postgres",
    )
]
WSGI_VARIANTS = [_v(n) for n in ("flask/bare", "flask/oncely-memory", "flask/oncely-sqlite")]
PROFILED = ("fastapi/oncely-memory", "fastapi/oncely-sqlite", "fastapi/oncely-redis",
            "fastapi/oncely-postgres")  # fmt: skip


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- processes ---------------------------------------------------------------------


class Driver:
    """The load driver in its own process (benchmarks/driver.py), one JSON line each way."""

    def __init__(self, keys: str = "uuid") -> None:
        self.process = subprocess.Popen(
            [PYTHON, "-m", "benchmarks.driver", "--keys", keys],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, command: dict[str, Any], timeout: float = 900.0) -> dict[str, Any]:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        answer: list[str] = []
        reader = threading.Thread(
            target=lambda: answer.append(self.process.stdout.readline()),  # type: ignore[union-attr]
            daemon=True,
        )
        reader.start()
        reader.join(timeout)
        if not answer or not answer[0]:
            raise RuntimeError(f"driver gave no answer to {command.get('op')}")
        result: dict[str, Any] = json.loads(answer[0])
        return result

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert self.process.stdin is not None
                self.process.stdin.write('{"op": "quit"}\n')
                self.process.stdin.flush()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


@dataclass
class Server:
    variant: Variant
    workers: int
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    label: str
    broken: str | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def count(self) -> int:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.port}/__bench/count", timeout=10
        ) as response:
            return int(json.loads(response.read())["executions"])

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=15)


@dataclass
class Context:
    args: argparse.Namespace
    out: Path
    run_id: str
    driver: Driver
    redis: Redis | None = None
    postgres: Postgres | None = None
    notes: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)

    def store_url(self, variant: Variant, tag: str) -> tuple[str, str] | None:
        """(url, namespace) of a variant's store, unique to this run and tag."""
        namespace = f"b{self.run_id}_{tag}_{variant.framework}_{variant.library}"
        if variant.store in ("memory", ""):
            return "", namespace
        if variant.store.startswith("sqlite"):
            return str(self.out / "stores" / f"{namespace}_{variant.store}.db"), namespace
        if variant.store == "redis":
            return (self.redis.url, namespace) if self.redis else None
        if variant.store == "postgres":
            return (self.postgres.url, namespace.lower()) if self.postgres else None
        return None


def start_server(
    ctx: Context, variant: Variant, *, workers: int, tag: str, preload_count: int = 0,
    url_ns: tuple[str, str] | None = None,
) -> Server | None:  # fmt: skip
    url_ns = url_ns or ctx.store_url(variant, tag)
    label = f"{variant.name}" + (f" x{workers}" if workers > 1 else "")
    if url_ns is None:
        ctx.notes.append(f"{label}: skipped, its store server is not available")
        return None
    url, namespace = url_ns
    if variant.library == "idemkit" and variant.store == "postgres":
        init = subprocess.run(
            [str(Path(PYTHON).parent / "idemkit"), "init-pg", url, "--table", namespace],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if init.returncode != 0:
            ctx.notes.append(f"{label}: `idemkit init-pg` failed: {init.stderr[-300:]}")
            return None
    port = free_port()
    env = {
        **os.environ,
        "BENCH_FRAMEWORK": variant.framework,
        "BENCH_LIBRARY": variant.library,
        "BENCH_STORE": variant.store,
        "BENCH_STORE_URL": url,
        "BENCH_NAMESPACE": namespace,
        "BENCH_PRELOAD": str(preload_count if variant.store == "memory" else 0),
        "PYTHONPATH": str(ROOT),
        "BENCH_ONCELY_PATCH": variant.patch,
        "BENCH_GC": ctx.args.gc,
    }
    if variant.framework == "flask":
        argv = [
            PYTHON, "-m", "gunicorn", "--workers", str(workers), "--worker-class", "sync",
            "--bind", f"127.0.0.1:{port}", "--log-level", "warning", "--backlog", "2048",
            "benchmarks.apps.wsgi:create_app()",
        ]  # fmt: skip
    else:
        argv = [
            PYTHON, "-m", "uvicorn", "--factory", "benchmarks.apps.asgi:create_app",
            "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
            "--no-access-log", "--log-level", "warning", "--backlog", "2048",
        ]  # fmt: skip
    log_path = ctx.out / "logs" / f"{label.replace('/', '_').replace(' ', '')}_{tag}.log"
    handle = log_path.open("wb")
    process = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )
    return Server(variant, workers, port, process, log_path, label)


def wait_ready(ctx: Context, servers: list[Server]) -> list[Server]:
    ready = []
    for server in servers:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        ok = False
        while time.monotonic() < deadline and server.process.poll() is None:
            if wait_port(server.port, 1.0):
                with contextlib.suppress(OSError, ValueError):
                    server.count()
                    ok = True
                    break
            time.sleep(0.2)
        if ok:
            ready.append(server)
        else:
            tail = server.log_path.read_text(errors="replace")[-600:]
            ctx.notes.append(f"{server.label}: did not start: {tail}")
            server.stop()
    return ready


# --- measurement --------------------------------------------------------------------


def store_pid(ctx: Context, variant: Variant) -> int | None:
    if variant.store == "redis" and ctx.redis:
        return ctx.redis.pid
    if variant.store == "postgres" and ctx.postgres:
        return ctx.postgres.pid
    return None


def measure(ctx: Context, server: Server, command: dict[str, Any]) -> dict[str, Any]:
    """One slice: driver load, with the server's (and store's) CPU delta around it."""
    spid = store_pid(ctx, server.variant)
    cpu0 = process_tree_cpu(server.pid)
    store0 = process_tree_cpu(spid) if spid else 0.0
    result = ctx.driver.run({"port": server.port, **command})
    cpu1 = process_tree_cpu(server.pid)
    store1 = process_tree_cpu(spid) if spid else 0.0
    requests = result.get("requests", 0)
    result["server_cpu_s"] = cpu1 - cpu0
    result["server_cpu_us_per_req"] = (cpu1 - cpu0) / requests * 1e6 if requests else None
    if spid:
        result["store_cpu_us_per_req"] = (store1 - store0) / requests * 1e6 if requests else None
    statuses = result.get("statuses", {})
    result["ok"] = sum(n for s, n in statuses.items() if s.startswith("2"))
    return result


def baseline_label(server: Server) -> str:
    return server.variant.baseline + (f" x{server.workers}" if server.workers > 1 else "")


def schedule(servers: list[Server], index: int) -> list[Server]:
    """One round: every variant right after a slice of its own bare app, the bare app
    again at the end of each group (B v1 B v2 B ... B), groups by framework and worker
    count, the variants' order rotated every round."""
    by_label = {s.label: s for s in servers}
    groups: dict[str, list[Server]] = {}
    for server in servers:
        if server.label != baseline_label(server):
            groups.setdefault(baseline_label(server), []).append(server)
    order: list[Server] = []
    for base_label, members in groups.items():
        base = by_label.get(base_label)
        shift = index % len(members)
        for server in members[shift:] + members[:shift]:
            if base is not None:
                order.append(base)
            order.append(server)
        if base is not None:
            order.append(base)
    listed = {s.label for s in order}
    order += [s for s in servers if s.label not in listed]  # a bare app with no variants
    return order


def interleaved(
    ctx: Context, servers: list[Server], scenario: str, *, rounds: int, duration: float,
    command: dict[str, Any] | None = None, prefixes: dict[str, str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """`rounds` rounds of slices in `schedule` order; each slice's ratio is taken to the
    bare-app slices just before and after it, so slow drift cancels."""
    slices: dict[str, list[dict[str, Any]]] = {s.label: [] for s in servers}
    if not servers:
        return {}
    sequence = 0
    previous: dict[str, Any] | None = None
    for index in range(rounds):
        for server in schedule(servers, index):
            sequence += 1
            prefix = (prefixes or {}).get(server.label) or (
                f"{ctx.run_id}-{scenario}-{server.port}-{sequence}-"
            )
            result = measure(
                ctx,
                server,
                {"op": "load", "mode": scenario, "duration": duration,
                 "connections": ctx.args.connections, "prefix": prefix, **(command or {})},
            )  # fmt: skip
            result["round"] = index
            result["label"] = server.label
            is_base = server.label == baseline_label(server)
            if is_base and previous is not None and previous.get("pending") == server.label:
                previous["base_after"] = result.get("rps")  # closes the sandwich
            result["base_before"] = (
                previous.get("rps") if previous and previous["label"] == baseline_label(server)
                and not is_base else None
            )  # fmt: skip
            if not is_base:
                result["pending"] = baseline_label(server)
            slices[server.label].append(result)
            previous = result
        log(f"  {scenario}: round {index + 1}/{rounds} done")
    return summarise_slices(servers, slices)


def _median(values: list[float]) -> float | None:
    clean = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(clean) if clean else None


def summarise_slices(
    servers: list[Server], slices: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    by_label = {s.label: s for s in servers}
    out: dict[str, Any] = {}
    for label, items in slices.items():
        server = by_label[label]
        base_label = baseline_label(server)
        ratios = []
        for r in items:
            around = [b for b in (r.get("base_before"), r.get("base_after")) if b]
            if around and r.get("rps") is not None:
                ratios.append(r["rps"] / (sum(around) / len(around)))
        statuses: Counter[str] = Counter()
        for r in items:
            statuses.update(r.get("statuses", {}))
        total = sum(r.get("requests", 0) for r in items)
        out[label] = {
            "variant": server.variant.name,
            "framework": server.variant.framework,
            "library": server.variant.library,
            "store": server.variant.store,
            "family": server.variant.family,
            "workers": server.workers,
            "slices": len(items),
            "rps": _median([r["rps"] for r in items]),
            "ratio": _median(ratios) if label != base_label else 1.0,
            "ratio_min": min(ratios) if ratios else None,
            "ratio_max": max(ratios) if ratios else None,
            "p50_ms": _median([r["p50_ms"] for r in items]),
            "p99_ms": _median([r["p99_ms"] for r in items]),
            "server_cpu_us": _median([r["server_cpu_us_per_req"] for r in items]),
            "driver_cpu_us": _median([r["driver_cpu_us_per_req"] for r in items]),
            "store_cpu_us": _median([r.get("store_cpu_us_per_req") for r in items]),
            "requests": total,
            "statuses": dict(statuses),
            "non_2xx_share": 1 - sum(n for s, n in statuses.items() if s.startswith("2")) / total
            if total
            else None,
            "replayed_share": sum(r.get("replayed", 0) for r in items) / total if total else None,
            "errors": sum(r.get("error_count", 0) for r in items),
            "raw": [{k: v for k, v in r.items() if k not in ("errors", "pending")} for r in items],
        }
    return out


def warm_up(ctx: Context, servers: list[Server], seconds: float) -> list[Server]:
    alive = []
    for server in servers:
        result = measure(
            ctx,
            server,
            {"op": "load", "mode": "fresh", "duration": seconds, "connections": 8,
             "prefix": f"{ctx.run_id}-warm-{server.port}-"},
        )  # fmt: skip
        if result.get("error") or not result.get("ok"):
            server.broken = f"warm-up failed: {result.get('error') or result.get('statuses')}"
            ctx.notes.append(f"{server.label}: {server.broken}")
            continue
        if result["ok"] < result["requests"]:
            ctx.notes.append(f"{server.label}: warm-up statuses {result['statuses']}")
        alive.append(server)
    return alive


def prepare_replays(ctx: Context, servers: list[Server], keys: int) -> dict[str, str]:
    prefixes = {}
    for server in servers:
        prefix = f"{ctx.run_id}-replay-{server.port}-"
        result = ctx.driver.run(
            {"op": "count", "port": server.port, "mode": "fresh", "requests": keys,
             "connections": 8, "prefix": prefix},
        )  # fmt: skip
        if result.get("ok", result.get("requests")) and result.get("requests") == keys:
            prefixes[server.label] = prefix
        else:
            ctx.notes.append(f"{server.label}: replay pool not completed: {result}")
    return prefixes


def duplicates(ctx: Context, servers: list[Server], rounds: int) -> dict[str, Any]:
    out = {}
    for server in servers:
        if server.variant.library == "floor":
            continue  # it has no concurrency control to measure: a reference for cost only
        before = server.count()
        result = ctx.driver.run(
            {"op": "rounds", "port": server.port, "rounds": rounds, "width": 20,
             "prefix": f"{ctx.run_id}-dup-{server.port}-", "max_seconds": 60},
        )  # fmt: skip
        after = server.count()
        done = result.get("rounds", 0)
        per_round = result.get("per_round", [])
        out[server.label] = {
            "rounds": done,
            "executions": after - before,
            "executions_per_round": (after - before) / done if done else None,
            "statuses": result.get("statuses"),
            "replayed": result.get("replayed"),
            "round_p50_ms": result.get("p50_ms"),
            "round_max_ms": result.get("max_ms"),
            "errors": result.get("error_count"),
            "first_rounds": per_round[:3],
        }
    return out


# --- store round trips ---------------------------------------------------------------


class RedisMonitor:
    """Counts the commands clients send (MONITOR marks commands run by scripts as `lua`)."""

    def __init__(self, port: int) -> None:
        self.process = subprocess.Popen(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(port), "MONITOR"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            errors="replace",
        )
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        time.sleep(0.3)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def stop(self) -> Counter[str]:
        time.sleep(0.3)
        self.process.terminate()
        self.process.wait(timeout=10)
        self.thread.join(timeout=5)
        commands: Counter[str] = Counter()
        for line in self.lines:
            if "[" not in line or " lua]" in line:
                continue
            parts = line.split('"')
            if len(parts) > 1:
                commands[parts[1].lower()] += 1
        return commands


def pg_statement_calls(ctx: Context) -> Counter[str]:
    import psycopg

    assert ctx.postgres is not None
    with psycopg.connect(ctx.postgres.admin_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT s.query, s.calls FROM pg_stat_statements s JOIN pg_database d "
            "ON d.oid = s.dbid WHERE d.datname = %s",
            (ctx.postgres.url.rsplit("/", 1)[1],),
        ).fetchall()
    return Counter({" ".join(q.split())[:90]: int(c) for q, c in rows})


def pg_reset(ctx: Context) -> None:
    import psycopg

    assert ctx.postgres is not None
    with psycopg.connect(ctx.postgres.admin_url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")


def round_trips(ctx: Context, servers: list[Server], requests: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for server in servers:
        store = server.variant.store
        if store not in ("redis", "postgres"):
            continue
        entry: dict[str, Any] = {}
        prefix = f"{ctx.run_id}-rt-{server.port}-"
        for scenario in ("fresh", "replay"):
            command = {"op": "count", "port": server.port, "requests": requests,
                       "connections": 1, "prefix": prefix, "mode": scenario,
                       "keys": requests}  # fmt: skip
            if store == "redis" and ctx.redis:
                monitor = RedisMonitor(ctx.redis.port)
                result = ctx.driver.run(command)
                counts = monitor.stop()
            elif store == "postgres" and ctx.postgres:
                pg_reset(ctx)
                result = ctx.driver.run(command)
                time.sleep(0.5)
                counts = pg_statement_calls(ctx)
            else:
                continue
            served = result.get("requests", 0)
            total = sum(counts.values())
            entry[scenario] = {
                "requests": served,
                "per_request": total / served if served else None,
                "breakdown": {k: round(v / served, 3) for k, v in counts.most_common(6)}
                if served
                else {},
                "statuses": result.get("statuses"),
            }
        out[server.label] = entry
    return out


# --- profiling ------------------------------------------------------------------------


def profile(ctx: Context, servers: list[Server], seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if profiling.py_spy() is None:
        ctx.notes.append("py-spy not found: no profiles (pip install py-spy)")
        return out
    for server in servers:
        if server.variant.name not in PROFILED:
            continue
        path = ctx.out / "profiles" / f"{server.variant.name.replace('/', '_')}.txt"
        recorder = profiling.start(server.pid, seconds, path)
        assert recorder is not None
        time.sleep(0.5)
        load = ctx.driver.run(
            {"op": "load", "port": server.port, "mode": "fresh", "duration": seconds + 4,
             "connections":
             ctx.args.connections, "prefix": f"{ctx.run_id}-prof-{server.port}-"},
        )  # fmt: skip
        try:
            _, err = recorder.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            recorder.kill()
            err = b"timeout"
        summary = profiling.summarise(path)
        summary["rps_while_sampled"] = load.get("rps")
        if summary.get("samples", 0) == 0:
            summary["error"] = err.decode(errors="replace")[-300:]
        summary["file"] = str(path.relative_to(ctx.out))
        out[server.label] = summary
    return out


# --- phases -----------------------------------------------------------------------------


def server_rss(servers: list[Server]) -> dict[str, float]:
    return {s.label: process_tree_rss(s.pid) / 2**20 for s in servers}


def main_phase(ctx: Context, variants: list[Variant]) -> None:
    args = ctx.args
    log(f"main phase: starting {len(variants)} servers")
    started = [s for v in variants if (s := start_server(ctx, v, workers=1, tag="main"))]
    servers = wait_ready(ctx, started)
    try:
        servers = warm_up(ctx, servers, args.warmup)
        phase: dict[str, Any] = {"servers": [s.label for s in servers]}
        scenarios = args.scenarios
        if "fresh" in scenarios:
            log("fresh keys")
            phase["fresh"] = interleaved(
                ctx, servers, "fresh", rounds=args.rounds, duration=args.duration
            )
        if "replay" in scenarios:
            log("replays: completing the key pools")
            prefixes = prepare_replays(ctx, servers, args.replay_keys)
            phase["replay"] = interleaved(
                ctx, servers, "replay", rounds=args.rounds, duration=args.duration,
                command={"keys": args.replay_keys}, prefixes=prefixes,
            )  # fmt: skip
        if "duplicates" in scenarios:
            log("duplicates: 20 simultaneous requests per key")
            phase["duplicates"] = duplicates(ctx, servers, args.dup_rounds)
        if "roundtrips" in scenarios:
            log("store round trips")
            phase["round_trips"] = round_trips(ctx, servers, args.rt_requests)
        phase["rss_mb"] = server_rss(servers)
        if args.profile > 0:
            log("profiles (py-spy)")
            phase["profiles"] = profile(ctx, servers, args.profile)
        ctx.results["main"] = phase
    finally:
        for server in started:
            server.stop()


def with_patched_twins(variants: list[Variant], patch: str) -> list[Variant]:
    """With --patch, each oncely variant beside its `+patched` twin, in the same run."""
    if not patch:
        return variants
    path = str(Path(patch).resolve())
    return [
        twin
        for v in variants
        for twin in ([v, Variant(v.framework, v.library, v.store, path)]
                     if v.library == "oncely" else [v])
    ]  # fmt: skip


def scale_phase(ctx: Context) -> None:
    args = ctx.args
    out: dict[str, Any] = {}
    variants = with_patched_twins(
        [
            v for v in SCALE_VARIANTS
            if not args.variants or v.name in args.variant_names or v.library == "bare"
        ],
        args.patch,
    )  # fmt: skip
    for size in args.scale:
        tag = f"scale{size}"
        log(f"scale: preloading {size:,} live records into each shared store")
        stores: dict[str, tuple[str, str]] = {}
        t0 = time.monotonic()
        for variant in variants:
            url_ns = ctx.store_url(variant, tag)
            if url_ns is None:
                continue
            url, namespace = url_ns
            try:
                if variant.store == "sqlite":
                    (ctx.out / "stores").mkdir(exist_ok=True)
                    preload.sqlite(url, size)
                elif variant.store == "redis" and ctx.redis:
                    preload.redis(url, namespace, size, port=ctx.redis.port)
                elif variant.store == "postgres" and ctx.postgres:
                    preload.postgres(url, namespace, size)
            except Exception as exc:  # reported, the rest goes on
                ctx.notes.append(f"scale {size}: preloading {variant.name} failed: {exc}")
                continue
            stores[variant.name] = url_ns
        log(f"  preloaded in {time.monotonic() - t0:.0f} s; starting servers")
        started = []
        for workers in args.workers:
            for variant in variants:
                if variant.store and variant.name not in stores and variant.store != "memory":
                    continue
                server = start_server(
                    ctx, variant, workers=workers, tag=tag, preload_count=size,
                    url_ns=stores.get(variant.name),
                )  # fmt: skip
                if server:
                    started.append(server)
        try:
            servers = wait_ready(ctx, started)
            servers = warm_up(ctx, servers, args.warmup)
            rss_before = server_rss(servers)
            result = interleaved(
                ctx, servers, "fresh", rounds=args.scale_rounds, duration=args.duration
            )
            rss_after = server_rss(servers)
            for label, entry in result.items():
                entry["rss_mb_start"] = rss_before.get(label)
                entry["rss_mb_end"] = rss_after.get(label)
            out[str(size)] = result
        finally:
            for server in started:
                server.stop()
        if ctx.redis:
            ctx.redis.flush()
        if ctx.postgres:
            drop_tables(ctx, [ns for name, (_, ns) in stores.items() if "postgres" in name])
        for name, (url, _) in stores.items():
            if "sqlite" in name:
                for suffix in ("", "-wal", "-shm"):
                    Path(url + suffix).unlink(missing_ok=True)
    ctx.results["scale"] = out


def drop_tables(ctx: Context, tables: list[str]) -> None:
    import psycopg

    assert ctx.postgres is not None
    with psycopg.connect(ctx.postgres.url, autocommit=True) as conn:
        for table in tables:
            conn.execute(f'DROP TABLE IF EXISTS "{table}"')


def wsgi_phase(ctx: Context) -> None:
    if not (ROOT / "src" / "oncely" / "wsgi.py").exists():
        ctx.notes.append("WSGI row skipped: src/oncely/wsgi.py does not exist yet")
        return
    args = ctx.args
    log("WSGI: Flask under gunicorn, 1 sync worker")
    started = [s for v in WSGI_VARIANTS if (s := start_server(ctx, v, workers=1, tag="wsgi"))]
    servers = wait_ready(ctx, started)
    try:
        servers = warm_up(ctx, servers, args.warmup)
        # A sync worker serves one connection at a time: one connection per slice.
        saved = args.connections
        args.connections = 1
        try:
            phase = {
                "fresh": interleaved(
                    ctx, servers, "fresh", rounds=args.rounds, duration=args.duration
                )
            }
        finally:
            args.connections = saved
        ctx.results["wsgi"] = phase
    finally:
        for server in started:
            server.stop()


# --- entry point -----------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n\n", 1)[0]
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run, under 3 minutes")
    parser.add_argument("--duration", type=float, help="seconds per slice (default 1.5; quick 1)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5; quick 2)")
    parser.add_argument(
        "--variants", help="comma-separated, e.g. fastapi/bare,fastapi/oncely-memory"
    )
    parser.add_argument(
        "--scenarios", default="fresh,replay,duplicates,roundtrips",
        help="any of fresh,replay,duplicates,roundtrips",
    )  # fmt: skip
    parser.add_argument(
        "--scale", default=None,
        help="live-record counts for the scale phase, e.g. 10000,1000000; 0 to skip",
    )  # fmt: skip
    parser.add_argument("--workers", default="1,2", help="uvicorn workers in the scale phase")
    parser.add_argument("--connections", type=int, default=32, help="driver connections")
    parser.add_argument("--profile", type=float, default=None, help="py-spy seconds; 0 skips")
    parser.add_argument("--no-wsgi", action="store_true", help="skip the WSGI row")
    parser.add_argument(
        "--keys", choices=("uuid", "counter"), default="uuid",
        help="Idempotency-Key shape: random UUIDs (what clients send) or a counter",
    )  # fmt: skip
    parser.add_argument(
        "--gc", choices=("default", "tuned"), default="default",
        help="every server's garbage collector: Python's defaults, or tuned as "
        "docs/benchmarks.md advises (gc.freeze() after start-up, a gen-0 threshold of 10,000)",
    )  # fmt: skip
    parser.add_argument("--out", default="benchmarks/results", help="results folder")
    parser.add_argument(
        "--patch", default="",
        help="a Python file the server runs before building the app (an experiment on "
        "oncely's hot path); each oncely variant is then measured with and without it",
    )  # fmt: skip
    args = parser.parse_args(argv)
    quick = args.quick
    args.duration = args.duration or (1.0 if quick else 1.5)
    args.rounds = args.rounds or (2 if quick else 5)
    args.scale_rounds = 3 if quick else 5
    args.warmup = 0.5 if quick else 1.5
    args.replay_keys = 300 if quick else 1000
    args.dup_rounds = 10 if quick else 40
    args.rt_requests = 100 if quick else 300
    if args.profile is None:
        args.profile = 0.0 if quick else 8.0
    if args.scale is None:
        args.scale = "0" if quick else "10000,1000000"
    args.scale = [int(x) for x in args.scale.split(",") if int(x) > 0]
    args.workers = [int(x) for x in args.workers.split(",") if x]
    args.scenarios = [x for x in args.scenarios.split(",") if x]
    args.variant_names = set(args.variants.split(",")) if args.variants else set()
    return args


def machine() -> dict[str, Any]:
    import psutil

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("oncely", "fastapi", "starlette", "uvicorn", "uvloop", "httptools", "redis",
                    "hiredis", "psycopg", "asgi-idempotency-header", "idemkit", "flask",
                    "gunicorn"):  # fmt: skip
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[package] = version(package)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.variant_names:
        known = {v.name: v for v in ASGI_VARIANTS + EXTRA_VARIANTS}
        unknown = args.variant_names - known.keys()
        if unknown:
            print(f"unknown variants: {sorted(unknown)}; known: {sorted(known)}", file=sys.stderr)
            return 2
        variants = [v for v in ASGI_VARIANTS + EXTRA_VARIANTS if v.name in args.variant_names]
        for variant in list(variants):  # every framework measured needs its bare baseline
            base = _v(variant.baseline)
            if base not in variants:
                variants.insert(0, base)
    else:
        variants = QUICK_VARIANTS if args.quick else ASGI_VARIANTS
    variants = with_patched_twins(variants, args.patch)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = (ROOT / args.out / stamp).resolve()
    for sub in ("logs", "stores", "profiles"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    ctx = Context(args, out, uuid.uuid4().hex[:6], Driver(args.keys))
    started = time.monotonic()
    needs = {v.store for v in variants}
    try:
        if "redis" in needs or args.scale:
            redis = start_redis()
            if isinstance(redis, str):
                ctx.notes.append(f"Redis variants skipped: {redis}")
            else:
                ctx.redis = redis
        if "postgres" in needs or args.scale:
            postgres = start_postgres()
            if isinstance(postgres, str):
                ctx.notes.append(f"PostgreSQL variants skipped: {postgres}")
            else:
                ctx.postgres = postgres
        log(f"results in {out}")
        main_phase(ctx, variants)
        if args.scale:
            scale_phase(ctx)
        if not args.no_wsgi:
            wsgi_phase(ctx)
    finally:
        ctx.driver.close()
        if ctx.redis:
            ctx.redis.stop()
        if ctx.postgres:
            ctx.postgres.stop()
        shutil.rmtree(out / "stores", ignore_errors=True)
        ctx.results["machine"] = machine()
        ctx.results["settings"] = {
            "duration": args.duration, "rounds": args.rounds, "connections": args.connections,
            "replay_keys": args.replay_keys, "dup_rounds": args.dup_rounds,
            "scale": args.scale, "workers": args.workers, "quick": args.quick,
            "keys": args.keys, "gc": args.gc, "wall_seconds": round(time.monotonic() - started),
        }  # fmt: skip
        ctx.results["notes"] = ctx.notes
        (out / "results.json").write_text(json.dumps(ctx.results, indent=1, default=str))
    report.write(out, ctx.results)
    log(f"done in {time.monotonic() - started:.0f} s: {out / 'results.md'}")
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
