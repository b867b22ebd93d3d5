"""The fault proxy itself, in front of a trivial stdlib HTTP server: faults really happen."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.support.faultproxy import FaultProxy


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so the proxy must find message ends
    disable_nagle_algorithm = True  # else head and body wait on delayed ACKs, 40 ms each
    server: CountingServer

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with self.server.lock:
            self.server.posts.append(body)
            count = len(self.server.posts)
        payload = json.dumps({"count": count}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"hello ", b"chunked ", b"world"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/until-close":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"no length, ends with the connection")
            self.close_connection = True
        else:
            self.send_response(204)
            self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


class CountingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.posts: list[bytes] = []


@pytest.fixture
def target() -> Iterator[CountingServer]:
    server = CountingServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def proxy(target: CountingServer) -> Iterator[FaultProxy]:
    with FaultProxy(target.server_address[1], seed=1, io_timeout=5) as running:
        yield running


def test_passes_requests_through_on_kept_alive_connections(
    proxy: FaultProxy, target: CountingServer
) -> None:
    with httpx.Client(base_url=proxy.url, timeout=5) as client:
        for n in range(20):
            assert client.post("/things", content=b"x" * n).json() == {"count": n + 1}
        assert client.get("/chunked").text == "hello chunked world"
        assert client.get("/empty").status_code == 204
        assert client.get("/until-close").text == "no length, ends with the connection"
    stats = proxy.stats
    assert (stats.requests, stats.forwarded, stats.responses) == (23, 23, 23)
    assert stats.connections == 1  # one kept-alive connection carried all of them
    assert (stats.dropped, stats.resets, stats.errors) == (0, 0, 0)


def test_drop_loses_the_response_after_the_server_ran(
    proxy: FaultProxy, target: CountingServer
) -> None:
    proxy.drop_next()
    with httpx.Client(base_url=proxy.url, timeout=5) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            client.post("/things", content=b"lost", headers={"Idempotency-Key": "k-1"})
        assert client.post("/things", content=b"kept").json() == {"count": 2}
    assert target.posts == [b"lost", b"kept"]
    stats = proxy.stats
    assert (stats.dropped, stats.dropped_keys, stats.responses) == (1, ["k-1"], 1)


def test_reset_never_reaches_the_server(proxy: FaultProxy, target: CountingServer) -> None:
    proxy.reset_next()
    with httpx.Client(base_url=proxy.url, timeout=5) as client:
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError)):
            client.post("/things", content=b"never")
        assert client.post("/things", content=b"after").json() == {"count": 1}
    assert target.posts == [b"after"]
    assert (proxy.stats.resets, proxy.stats.forwarded) == (1, 1)


def test_delay_holds_the_request_back(proxy: FaultProxy) -> None:
    proxy.configure(delay=0.3, delay_rate=1.0)
    with httpx.Client(base_url=proxy.url, timeout=5) as client:
        started = time.monotonic()
        client.get("/empty")
        assert time.monotonic() - started >= 0.3
        proxy.configure(delay_rate=0.0)
        started = time.monotonic()
        client.get("/empty")
        assert time.monotonic() - started < 0.3
    assert proxy.stats.delayed == 1


def test_random_drops_follow_the_rate_and_are_counted(
    proxy: FaultProxy, target: CountingServer
) -> None:
    proxy.configure(drop_rate=0.3)
    failures = 0
    with httpx.Client(base_url=proxy.url, timeout=5) as client:
        for _ in range(60):
            try:
                client.post("/things", content=b"x")
            except httpx.RemoteProtocolError:
                failures += 1
    stats = proxy.stats
    assert stats.dropped == failures
    assert 5 < failures < 35
    assert len(target.posts) == stats.forwarded == 60


def test_stops_listening_when_closed(target: CountingServer) -> None:
    with FaultProxy(target.server_address[1]) as proxy:
        port = proxy.port
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
