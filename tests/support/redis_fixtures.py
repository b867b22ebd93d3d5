"""Redis fixtures (a pytest plugin): the shared server on 127.0.0.1:6379, a private
three-master cluster for the session, and private servers for fault tests.

Each store gets a unique key prefix and its keys are deleted afterwards: the shared
server is never flushed.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from oncely.stores.redis import RedisStore
from tests.support.servers import free_port
from tests.support.services import REDIS_URL, service_missing

CLUSTER_READY_TIMEOUT = 30.0


def unique_prefix() -> str:
    return f"oncely-test-{uuid.uuid4().hex[:12]}"


def delete_prefixed(client: redis.Redis, prefix: str) -> int:
    """Delete `<prefix>:*` on one server (SCAN, never FLUSH: the server is shared)."""
    names = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    # One key per UNLINK: on a cluster node, keys of one call must share a slot.
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.unlink(name)
    return sum(int(n) for n in pipe.execute()) if names else 0


def redis_unreachable_reason(url: str) -> str | None:
    client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"{url}: {exc}"
    finally:
        client.close()
    return None


# private servers -------------------------------------------------------------------


@dataclass
class RedisServer:
    """A redis-server we started on a loopback port; restartable with the same settings."""

    port: int
    directory: Path
    args: Sequence[str] = ()
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.directory / f"redis-{self.port}.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2.0, socket_connect_timeout=2.0)

    def start(self, timeout: float = 10.0) -> None:
        argv = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--daemonize", "no", "--dir", str(self.directory), "--save", "",
            *self.args,
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited:\n{self.log_path.read_text()}")
            client = self.client()
            try:
                client.ping()
                return
            except redis.BusyLoadingError:
                pass  # replaying its AOF
            except redis.ConnectionError:
                pass
            finally:
                client.close()
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"redis-server on {self.port} not ready in {timeout} s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """SIGTERM: Redis flushes its AOF and exits (as SHUTDOWN does)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def require_redis_server() -> None:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        service_missing("redis", "redis-server/redis-cli are not on PATH")


@contextlib.contextmanager
def private_redis(directory: Path, *args: str) -> Iterator[RedisServer]:
    """A redis-server of our own on a spare loopback port, stopped when the block ends."""
    require_redis_server()
    server = RedisServer(free_port(), directory, args)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class RedisCluster:
    servers: list[RedisServer]

    @property
    def ports(self) -> list[int]:
        return [server.port for server in self.servers]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def _cluster_ok(port: int) -> bool:
    client = redis.Redis(port=port, socket_timeout=1.0)
    try:
        info = client.cluster("INFO")
    except redis.RedisError:
        return False
    finally:
        client.close()
    return isinstance(info, dict) and info.get("cluster_state") in ("ok", b"ok")


def start_cluster(directory: Path, masters: int = 3) -> RedisCluster:
    """`masters` cluster-enabled servers joined by `redis-cli --cluster create`."""
    require_redis_server()
    servers = []
    try:
        for _ in range(masters):
            port = free_port()
            server = RedisServer(
                port, directory,
                (
                    "--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                    "--cluster-config-file", str(directory / f"nodes-{port}.conf"),
                    "--appendonly", "no",
                ),
            )  # fmt: skip
            server.start()
            servers.append(server)
        create = subprocess.run(
            [
                "redis-cli", "--cluster", "create",
                *(f"127.0.0.1:{s.port}" for s in servers),
                "--cluster-replicas", "0", "--cluster-yes",
            ],
            capture_output=True, timeout=CLUSTER_READY_TIMEOUT, check=False,
        )  # fmt: skip
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {create.stdout!r}")
        deadline = time.monotonic() + CLUSTER_READY_TIMEOUT
        while not all(_cluster_ok(s.port) for s in servers):
            if time.monotonic() > deadline:
                raise TimeoutError("the Redis cluster did not reach cluster_state:ok")
            time.sleep(0.1)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return RedisCluster(servers)


# fixtures --------------------------------------------------------------------------


@pytest.fixture
def redis_url() -> str:
    """The shared Redis: skip on a laptop without it, fail in CI."""
    reason = redis_unreachable_reason(REDIS_URL)
    if reason is not None:
        service_missing("redis", reason)
    return REDIS_URL


@pytest.fixture
def redis_store(redis_url: str) -> Iterator[RedisStore]:
    prefix = unique_prefix()
    store = RedisStore(redis_url, prefix=prefix)
    try:
        yield store
    finally:
        store.close()
        client = redis.Redis.from_url(redis_url, socket_timeout=5.0)
        try:
            delete_prefixed(client, prefix)
        finally:
            client.close()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A private three-master cluster for the whole session."""
    require_redis_server()
    cluster = start_cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster_store(redis_cluster: RedisCluster) -> Iterator[RedisStore]:
    prefix = unique_prefix()
    store = RedisStore(redis_cluster.url, prefix=prefix)
    try:
        yield store
    finally:
        store.close()
        for port in redis_cluster.ports:
            client = redis.Redis(port=port, socket_timeout=5.0)
            try:
                delete_prefixed(client, prefix)
            finally:
                client.close()
