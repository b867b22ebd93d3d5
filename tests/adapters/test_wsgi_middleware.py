"""The WSGI adapter in process: crafted environs, every row of SPEC §3 and §4.

Plain WSGI apps are wrapped on both sides in `wsgiref.validate.validator`, so PEP 3333
is checked at each call: the environ oncely hands on, the `start_response` it offers
the app, and that every iterable is closed.
"""

from __future__ import annotations

import io
import json
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from wsgiref.validate import validator

import pytest

from oncely import wsgi
from oncely.core.fingerprint import NO_FINGERPRINT
from oncely.core.records import RecordState
from oncely.stores import MemoryStore, StoreError
from oncely.stores.base import SyncStore
from oncely.wsgi import IdempotencyMiddleware, lease_keeper

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

ANON = "anonymous"


# harness -------------------------------------------------------------------------------


def make_environ(
    method: str = "POST",
    path: str = "/pay",
    *,
    key: str | bytes | None = None,
    body: bytes = b"{}",
    headers: Sequence[tuple[str, str]] = (),
    query: str = "",
    chunked: bool = False,
    content_type: str = "application/json",
) -> dict[str, Any]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method, "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": query,
        "SERVER_NAME": "test", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1", "CONTENT_TYPE": content_type,
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
        "wsgi.errors": io.StringIO(), "wsgi.multithread": True, "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }  # fmt: skip
    if chunked:
        environ["HTTP_TRANSFER_ENCODING"] = "chunked"
        environ["wsgi.input_terminated"] = True
    else:
        environ["CONTENT_LENGTH"] = str(len(body))
    if key is not None:
        raw = key if isinstance(key, bytes) else key.encode()
        environ["HTTP_IDEMPOTENCY_KEY"] = raw.decode("latin-1")
    for name, value in headers:
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    return environ


@dataclass
class Result:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    chunks: list[bytes] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


def run(
    app: WSGIApplication,
    environ: WSGIEnvironment,
    *,
    take: int | None = None,
    on_chunk: Callable[[bytes], None] | None = None,
) -> Result:
    """Act as the server: call, iterate (at most `take` chunks), always close."""
    started: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(
        status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], object]:
        if exc_info is not None and started:
            raise exc_info[1]
        started.append((status, headers))
        return lambda data: None

    iterable = app(environ, start_response)
    chunks: list[bytes] = []
    try:
        for chunk in iterable:
            if on_chunk is not None:
                on_chunk(chunk)
            chunks.append(chunk)
            if take is not None and len(chunks) >= take:
                break  # the client went away
    finally:
        close = getattr(iterable, "close", None)
        if close is not None:
            close()
    status, headers = started[-1]
    return Result(int(status[:3]), headers, b"".join(chunks), chunks)


def call(app: WSGIApplication, method: str = "POST", path: str = "/pay", **kwargs: Any) -> Result:
    take = kwargs.pop("take", None)
    return run(app, make_environ(method, path, **kwargs), take=take)


class CountingApp:
    """A plain WSGI app that counts executions and echoes the body it read."""

    def __init__(self, status: str = "201 Created", delay: float = 0.0) -> None:
        self.status = status
        self.delay = delay
        self.executions = 0
        self.bodies: list[bytes] = []
        self._lock = threading.Lock()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        with self._lock:
            self.executions += 1
            number = self.executions
        self.bodies.append(body)
        if self.delay:
            time.sleep(self.delay)
        payload = json.dumps({"n": number, "got": body.decode()}).encode()
        start_response(
            self.status,
            [
                ("Content-Type", "application/json"),
                ("Set-Cookie", "s=1"),
                ("X-Id", str(number)),
                ("Content-Length", str(len(payload))),
            ],
        )
        return [payload]


class Chunks:
    """A WSGI iterable that records close() and can fail at a given chunk."""

    def __init__(self, chunks: Sequence[bytes], fail_at: int | None = None) -> None:
        self.chunks = list(chunks)
        self.fail_at = fail_at
        self.closed = 0
        self.produced = 0

    def __iter__(self) -> Iterator[bytes]:
        for index, chunk in enumerate(self.chunks):
            if index == self.fail_at:
                raise RuntimeError("boom mid-body")
            self.produced += 1
            yield chunk

    def close(self) -> None:
        self.closed += 1


def chunked_app(body: Chunks, status: str = "200 OK") -> WSGIApplication:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response(status, [("Content-Type", "text/plain")])
        return body

    return app


def guarded(
    app: WSGIApplication, store: SyncStore | None = None, **options: Any
) -> WSGIApplication:
    """The middleware, validated on both sides (PEP 3333)."""
    middleware = IdempotencyMiddleware(validator(app), store=store or MemoryStore(), **options)
    return validator(middleware)


def in_thread(function: Callable[[], Result]) -> tuple[threading.Thread, list[Result]]:
    results: list[Result] = []
    thread = threading.Thread(target=lambda: results.append(function()))
    thread.start()
    return thread, results


# the decision table ---------------------------------------------------------------------


def test_first_request_runs_and_the_retry_is_replayed_byte_for_byte() -> None:
    app = CountingApp()
    middleware = guarded(app)
    first = call(middleware, key="k1", body=b'{"amount": 5}')
    second = call(middleware, key="k1", body=b'{ "amount":5 }')
    assert app.executions == 1
    assert first.status == second.status == 201
    assert first.body == second.body
    assert first.header("idempotent-replayed") is None
    assert second.header("idempotent-replayed") == "true"
    assert first.header("set-cookie") == "s=1"
    assert second.header("set-cookie") is None  # never stored, never replayed
    assert [h for h in second.headers if h[0] != "idempotent-replayed"] == [
        h for h in first.headers if h[0] != "Set-Cookie"
    ]


def test_same_key_different_body_is_422_and_409_when_configured() -> None:
    app = CountingApp()
    for status, middleware in ((422, guarded(app)), (409, guarded(app, mismatch_status=409))):
        call(middleware, key="k", body=b'{"amount": 5}')
        mismatch = call(middleware, key="k", body=b'{"amount": 6}')
        assert mismatch.status == status
        assert mismatch.header("content-type") == "application/problem+json"
        problem = mismatch.json()
        assert problem["type"].endswith("key-reused-with-different-request")
        assert problem["idempotency_key"] == "k"
    assert app.executions == 2


def test_in_flight_duplicate_gets_409_and_a_mismatch_in_flight_422() -> None:
    app = CountingApp(delay=0.4)
    middleware = guarded(app)
    thread, first = in_thread(lambda: call(middleware, key="k"))
    time.sleep(0.15)
    second = call(middleware, key="k")
    other = call(middleware, key="k", body=b'{"other": 1}')
    thread.join(timeout=10)
    assert second.status == 409
    assert second.header("retry-after") == "1"
    assert second.json()["type"].endswith("request-in-progress")
    assert other.status == 422
    assert first[0].status == 201
    assert app.executions == 1


def test_in_flight_duplicate_can_wait_and_replay_and_the_wait_is_bounded() -> None:
    app = CountingApp(delay=0.3)
    middleware = guarded(app, wait_for_in_flight=3.0)
    thread, first = in_thread(lambda: call(middleware, key="k"))
    time.sleep(0.1)
    second = call(middleware, key="k")
    thread.join(timeout=10)
    assert second.status == 201
    assert second.header("idempotent-replayed") == "true"
    assert second.body == first[0].body
    assert app.executions == 1

    slow = CountingApp(delay=1.0)
    impatient = guarded(slow, wait_for_in_flight=0.2)
    thread, _ = in_thread(lambda: call(impatient, key="k"))
    time.sleep(0.1)
    started = time.monotonic()
    assert call(impatient, key="k").status == 409
    assert time.monotonic() - started < 0.8
    thread.join(timeout=10)


def test_an_expired_lease_is_taken_over() -> None:
    store = MemoryStore()
    store.claim_sync(ANON, "k", NO_FINGERPRINT, "dead-worker", lease=0.05, retention=60)
    app = CountingApp()
    middleware = guarded(app, store, fingerprint=None)  # key only: the fingerprints agree
    time.sleep(0.1)
    assert call(middleware, key="k").status == 201
    record = store.get_sync(ANON, "k")
    assert record is not None
    assert record.state is RecordState.COMPLETED
    assert record.attempts == 2


def test_get_and_keyless_requests_pass_straight_through() -> None:
    app = CountingApp(status="200 OK")
    store = MemoryStore()
    middleware = guarded(app, store)
    for method, key in (("GET", "k"), ("GET", "k"), ("POST", None), ("POST", None)):
        call(middleware, method, key=key)
    assert app.executions == 4
    assert store.stats_sync().completed == 0


@pytest.mark.parametrize(
    ("raw", "rule"),
    [
        (b"", "empty"),
        (b"k" * 256, "too-long"),
        (b"bad\x01key", "not-visible-ascii"),
        ("caf\u00e9".encode(), "not-visible-ascii"),
        (b'"unterminated', "malformed-string"),
    ],
)
def test_bad_keys_are_400_problems_and_never_run(raw: bytes, rule: str) -> None:
    app = CountingApp()
    result = call(guarded(app, docs_url="https://docs.example/idem"), key=raw)
    assert result.status == 400
    problem = result.json()
    assert problem["rule"] == rule
    assert set(problem) >= {"type", "title", "status", "detail"}
    assert result.header("link") == '<https://docs.example/idem>; rel="describedby"'
    assert app.executions == 0


def test_required_key_is_400_naming_the_header() -> None:
    app = CountingApp()
    result = call(guarded(app, required_paths=["/pay"]))
    assert result.status == 400
    assert result.json()["header"] == "Idempotency-Key"
    assert app.executions == 0


def test_credentials_and_app_scopes_separate_namespaces() -> None:
    app = CountingApp()
    middleware = guarded(app)
    for token in ("Bearer sk_test_a", "Bearer sk_live_a", "Bearer sk_test_a"):
        call(middleware, key="same", headers=[("Authorization", token)])
    assert app.executions == 2
    for tenant in ("w1", "w2", "w1"):
        environ = make_environ(key="k")
        environ["oncely.scope"] = tenant
        run(middleware, environ)
    assert app.executions == 4


# request bodies -------------------------------------------------------------------------


def test_body_is_buffered_and_the_app_can_read_it_again() -> None:
    seen: list[tuple[bytes, bytes, str]] = []

    def rereading(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        stream = environ["wsgi.input"]
        length = int(environ["CONTENT_LENGTH"])
        first = stream.read(length)
        stream.seek(0)  # oncely hands the app a seekable buffer
        seen.append((first, stream.read(length), environ["CONTENT_LENGTH"]))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [first]

    middleware = IdempotencyMiddleware(rereading, store=MemoryStore())
    result = call(middleware, key="k", body=b'{"a": 1}')
    assert result.body == b'{"a": 1}'
    assert seen == [(b'{"a": 1}', b'{"a": 1}', "8")]
    # A chunked request without a length (gunicorn sets wsgi.input_terminated) is read
    # whole, and the app is told its length.
    chunked = call(middleware, key="c", body=b'{"b": 2}', chunked=True)
    assert chunked.body == b'{"b": 2}'
    assert seen[-1] == (b'{"b": 2}', b'{"b": 2}', "8")


def test_body_over_the_limit_is_413_and_leaves_no_record() -> None:
    app = CountingApp()
    store = MemoryStore()
    middleware = guarded(app, store, max_request_body=10)
    assert call(middleware, key="k", body=b"x" * 11).status == 413
    chunked = IdempotencyMiddleware(app, store=store, max_request_body=10)
    result = call(chunked, key="k", body=b"x" * 11, chunked=True)
    assert result.status == 413
    assert result.json()["type"].endswith("request-body-too-large")
    assert call(middleware, key="k", body=b"x" * 10).status == 201
    assert app.executions == 1


def test_a_client_that_sends_less_than_it_announced_claims_nothing() -> None:
    store = MemoryStore()
    environ = make_environ(key="k", body=b"{}")
    environ["CONTENT_LENGTH"] = "100"
    with pytest.raises(wsgi.IncompleteBody):
        IdempotencyMiddleware(CountingApp(), store=store)(environ, lambda *a: lambda b: None)
    assert store.get_sync(ANON, "k") is None


# responses ------------------------------------------------------------------------------


def test_record_is_complete_before_the_last_chunk_leaves() -> None:
    store = MemoryStore()
    body = Chunks([b"a", b"", b"b", b"c"])
    middleware = guarded(chunked_app(body), store)
    states: list[RecordState | None] = []

    def observe(chunk: bytes) -> None:
        record = store.get_sync(ANON, "k")
        states.append(record.state if record else None)

    result = run(middleware, make_environ(key="k"), on_chunk=observe)
    assert result.chunks == [b"a", b"b", b"c"]
    assert states == [RecordState.IN_FLIGHT, RecordState.IN_FLIGHT, RecordState.COMPLETED]
    assert body.closed == 1
    replay = call(middleware, key="k")
    assert replay.body == b"abc"
    assert replay.header("idempotent-replayed") == "true"


def test_generator_responses_are_captured_whole_and_closed() -> None:
    runs: list[int] = []
    finished: list[bool] = []

    def streaming(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
        runs.append(1)
        start_response("200 OK", [("Content-Type", "text/plain")])  # lazily, PEP 3333 allows
        try:
            for index in range(3):
                yield f"part{index};".encode()
        finally:
            finished.append(True)

    middleware = guarded(streaming)
    first = call(middleware, key="k")
    second = call(middleware, key="k")
    assert first.body == second.body == b"part0;part1;part2;"
    assert len(runs) == 1
    assert finished == [True]


def test_close_is_called_on_every_path() -> None:
    ok = Chunks([b"1", b"2"])
    call(guarded(chunked_app(ok)), key="ok")
    assert ok.closed == 1

    failing = Chunks([b"1", b"2", b"3"], fail_at=2)
    with pytest.raises(RuntimeError):
        call(guarded(chunked_app(failing)), key="fail")
    assert failing.closed == 1

    never_iterated = Chunks([b"1"])
    store = MemoryStore()
    middleware = guarded(chunked_app(never_iterated), store)
    iterable = middleware(make_environ(key="n"), lambda *a: lambda b: None)
    iterable.close()  # type: ignore[attr-defined]  # the server gives up at once
    assert never_iterated.closed == 1
    record = store.get_sync(ANON, "n")
    assert record is not None
    assert record.state is RecordState.COMPLETED


def test_a_client_that_leaves_mid_response_still_gets_the_whole_replay() -> None:
    store = MemoryStore()
    body = Chunks([b"a", b"b", b"c", b"d"])
    middleware = guarded(chunked_app(body), store)
    aborted = call(middleware, key="k", take=1)
    assert aborted.chunks == [b"a"]
    assert body.closed == 1
    assert body.produced == 4  # oncely read the rest for the record
    replay = call(middleware, key="k")
    assert replay.body == b"abcd"
    assert replay.header("idempotent-replayed") == "true"


def test_the_legacy_write_callable_is_captured_in_order() -> None:
    def writer(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"one;")
        write(b"two;")
        return [b"three"]

    middleware = guarded(writer)
    first = call(middleware, key="k")
    replay = call(middleware, key="k")
    assert first.body == replay.body == b"one;two;three"


def test_start_response_with_exc_info_replaces_an_unsent_status() -> None:
    def recovering(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise ValueError("late failure")
        except ValueError:
            import sys

            start_response("502 Bad Gateway", [("Content-Type", "text/plain")], sys.exc_info())
        return [b"upstream failed"]

    middleware = guarded(recovering)
    assert call(middleware, key="k").status == 502
    replay = call(middleware, key="k")
    assert (replay.status, replay.body) == (502, b"upstream failed")


def test_429_releases_the_key_and_other_statuses_are_stored() -> None:
    limited = CountingApp(status="429 Too Many Requests")
    middleware = guarded(limited)
    assert call(middleware, key="k").status == call(middleware, key="k").status == 429
    assert limited.executions == 2
    for status in ("400 Bad Request", "404 Not Found", "500 Internal Server Error"):
        app = CountingApp(status=status)
        middleware = guarded(app)
        call(middleware, key="k")
        assert call(middleware, key="k").header("idempotent-replayed") == "true"
        assert app.executions == 1
    app = CountingApp(status="500 Internal Server Error")
    middleware = guarded(app, store_status=lambda s: s < 500)
    call(middleware, key="k")
    call(middleware, key="k")
    assert app.executions == 2


def test_response_over_the_size_limit_reaches_the_client_but_is_never_rerun() -> None:
    middleware = guarded(chunked_app(Chunks([b"x" * 100, b"y" * 100])), max_stored_body=150)
    first = call(middleware, key="k")
    assert first.body == b"x" * 100 + b"y" * 100
    again = call(middleware, key="k")
    assert again.status == 409
    assert again.json()["type"].endswith("response-not-replayable")
    assert again.json()["original_status"] == 200


# exceptions -----------------------------------------------------------------------------


def test_an_exception_in_the_app_sends_and_stores_a_500_problem() -> None:
    runs = 0

    def broken(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        nonlocal runs
        runs += 1
        raise RuntimeError("boom")

    middleware = guarded(broken)
    first = call(middleware, key="k")
    assert first.status == 500
    assert first.header("content-type") == "application/problem+json"
    replay = call(middleware, key="k")
    assert (replay.status, replay.body) == (500, first.body)
    assert replay.header("idempotent-replayed") == "true"
    assert runs == 1

    release = guarded(broken, on_exception="release")
    for _ in range(2):
        assert call(release, key="k").status == 500
    assert runs == 3


def test_an_exception_mid_body_before_anything_was_sent_is_answered_with_the_problem() -> None:
    body = Chunks([b"a", b"b"], fail_at=1)  # "a" is held back, then the app fails
    result = call(guarded(chunked_app(body)), key="k")
    assert result.status == 500
    assert result.json()["type"].endswith("handler-failed")
    assert body.closed == 1


def test_an_exception_after_bytes_were_sent_is_re_raised_and_stored() -> None:
    store = MemoryStore()
    body = Chunks([b"a", b"b", b"c"], fail_at=2)
    middleware = guarded(chunked_app(body), store)
    with pytest.raises(RuntimeError, match="boom mid-body"):
        call(middleware, key="k")
    record = store.get_sync(ANON, "k")
    assert record is not None
    assert record.response is not None
    assert record.response.status == 500
    assert body.closed == 1


class BrokenStore(MemoryStore):
    def claim_sync(self, *args: Any, **kwargs: Any) -> Any:
        raise StoreError("connection refused")


def test_store_outage_fails_closed_with_503_or_open_when_configured() -> None:
    app = CountingApp()
    result = call(guarded(app, BrokenStore()), key="k")
    assert result.status == 503
    assert result.header("retry-after") == "2"
    assert result.json()["type"].endswith("idempotency-store-unavailable")
    assert app.executions == 0
    opened = call(guarded(app, BrokenStore(), fail_open=True), key="k", body=b'{"a":1}')
    assert opened.status == 201
    assert opened.json()["got"] == '{"a":1}'


# lease renewal --------------------------------------------------------------------------


def test_a_slow_handler_keeps_its_lease() -> None:
    app = CountingApp(delay=0.8)
    store = MemoryStore()
    middleware = guarded(app, store, lease=0.3)
    renewals = lease_keeper().renewals
    thread, first = in_thread(lambda: call(middleware, key="k"))
    time.sleep(0.6)  # two lease lengths: without renewal it would be taken over
    second = call(middleware, key="k")
    thread.join(timeout=10)
    assert second.status == 409
    assert first[0].status == 201
    assert app.executions == 1
    assert lease_keeper().renewals - renewals >= 2


def test_fast_handlers_cost_a_heap_push_and_nothing_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keeper = wsgi.LeaseKeeper()  # its own: other tests' entries would wake the shared one
    monkeypatch.setattr(wsgi, "_keeper", keeper)
    middleware = IdempotencyMiddleware(CountingApp(), store=MemoryStore(), lease=30)
    call(middleware, key="first")  # the keeper may wake once for the first entry
    time.sleep(0.05)
    renewals, wakes, waiting = keeper.renewals, keeper.wakes, keeper.waiting
    for index in range(1100):  # due in 10 s: nothing wakes the keeper before then
        call(middleware, key=f"k{index}")
    assert keeper.renewals == renewals
    assert keeper.wakes == wakes
    assert keeper.waiting < waiting + 1100  # settled entries were compacted away


def test_the_keeper_is_recreated_in_a_forked_child() -> None:
    parent = lease_keeper()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a slow handler's lease must still be renewed
        code = 1
        try:
            app = CountingApp(delay=0.5)
            middleware = IdempotencyMiddleware(app, store=MemoryStore(), lease=0.15)
            call(middleware, key="k")
            keeper = lease_keeper()
            fresh = keeper is not parent and keeper.pid == os.getpid()
            code = 0 if fresh and keeper.renewals >= 2 else 2
        finally:
            os.write(write, bytes([code]))
            os._exit(0)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], 10.0)
        status = os.read(read, 1) if ready else b"timeout"
    finally:
        os.close(read)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert status == bytes([0])
    assert lease_keeper() is parent


# Flask ----------------------------------------------------------------------------------


def flask_app(**config: Any) -> Any:
    from flask import Flask, jsonify

    from oncely.integrations.flask import Oncely, exempt, idempotent

    app = Flask(__name__)
    app.config.update(config)
    runs: list[str] = []

    @app.post("/payments/<int:payment_id>")
    @idempotent(required=True)
    def payments(payment_id: int) -> Any:
        runs.append("payments")
        return jsonify({"id": payment_id}), 201

    @app.post("/webhooks")
    @exempt
    def webhooks() -> Any:
        runs.append("webhooks")
        return jsonify({"ok": True})

    @app.post("/other")
    def other() -> Any:
        runs.append("other")
        return jsonify({"n": len(runs)})

    app.config["runs"] = runs
    Oncely(app)
    return app


def test_flask_route_markers() -> None:
    app = flask_app(ONCELY_STORE=MemoryStore())
    client = app.test_client()
    assert client.post("/payments/7").status_code == 400
    assert client.post("/payments/7", headers={"Idempotency-Key": "p"}).status_code == 201
    assert client.post("/webhooks", headers={"Idempotency-Key": "w"}).status_code == 200
    assert client.post("/webhooks", headers={"Idempotency-Key": "w"}).status_code == 200
    client.post("/other")
    client.post("/other", headers={"Idempotency-Key": "o"})
    replay = client.post("/other", headers={"Idempotency-Key": "o"})
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert client.post("/missing", headers={"Idempotency-Key": "m"}).status_code == 404
    assert app.config["runs"] == ["payments", "webhooks", "webhooks", "other", "other"]


def test_flask_reads_its_config() -> None:
    from oncely.integrations.flask import middleware_of

    app = flask_app(
        ONCELY_STORE="memory://", ONCELY_PRESET="stripe", ONCELY_LEASE=5, ONCELY_POLICY=None
    )
    policy = middleware_of(app).policy
    assert policy.methods == frozenset({"POST"})
    assert policy.mismatch_status == 409
    assert policy.lease == 5
    client = app.test_client()
    client.post("/other", json={"a": 1}, headers={"Idempotency-Key": "x"})
    assert client.post("/other", json={"a": 2}, headers={"Idempotency-Key": "x"}).status_code == 409


# Django ---------------------------------------------------------------------------------

DJANGO_RUNS: list[str] = []


def _django_views() -> list[Any]:
    from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
    from django.urls import path

    from oncely.integrations.django import exempt, idempotent

    @idempotent(required=True)
    def payments(request: HttpRequest) -> HttpResponse:
        DJANGO_RUNS.append("payments")
        return JsonResponse({"body": request.body.decode()}, status=201)

    @exempt
    def webhooks(request: HttpRequest) -> HttpResponse:
        DJANGO_RUNS.append("webhooks")
        return JsonResponse({"ok": True})

    def other(request: HttpRequest) -> HttpResponse:
        DJANGO_RUNS.append("other")
        response = JsonResponse({"n": len(DJANGO_RUNS), "post": request.POST.get("a")})
        response["X-Run"] = str(len(DJANGO_RUNS))
        return response

    def stream(request: HttpRequest) -> StreamingHttpResponse:
        DJANGO_RUNS.append("stream")
        produced = len(DJANGO_RUNS)
        return StreamingHttpResponse(
            (f"part{index}-{produced};".encode() for index in range(4)),
            content_type="text/plain",
        )

    return [
        path("payments", payments),
        path("webhooks", webhooks),
        path("other", other),
        path("stream", stream),
    ]


class UserMiddleware:
    """`X-User: name` logs in as name (stands in for AuthenticationMiddleware)."""

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        name = request.headers.get("X-User")

        @dataclass
        class User:
            pk: str | None
            is_authenticated: bool

        request.user = User(name, bool(name))
        return self.get_response(request)


urlpatterns: list[Any] = []
DJANGO_MIDDLEWARE = "oncely.integrations.django.IdempotencyMiddleware"
FORM = "application/x-www-form-urlencoded"


@pytest.fixture
def django_wsgi() -> Iterator[tuple[Any, MemoryStore]]:
    import django
    from django.conf import settings
    from django.test.utils import override_settings

    if not settings.configured:
        settings.configure(SECRET_KEY="tests", ALLOWED_HOSTS=["*"], INSTALLED_APPS=[])
        django.setup()
    if not urlpatterns:
        urlpatterns.extend(_django_views())
    from django.core.handlers.wsgi import WSGIHandler

    store = MemoryStore()
    DJANGO_RUNS.clear()
    with override_settings(
        ROOT_URLCONF=__name__,
        DEBUG=False,
        MIDDLEWARE=[
            f"{__name__}.UserMiddleware",
            "oncely.integrations.django.IdempotencyMiddleware",
        ],
        ONCELY={"STORE": store, "POLICY": {"lease": 5}},
    ):
        yield WSGIHandler(), store


def test_django_route_markers(django_wsgi: tuple[Any, MemoryStore]) -> None:
    handler, _ = django_wsgi
    assert call(handler, path="/payments").status == 400
    assert call(handler, path="/payments", key="p").status == 201
    assert call(handler, path="/webhooks", key="w").status == 200
    assert call(handler, path="/webhooks", key="w").status == 200
    call(handler, path="/other")
    first = call(handler, path="/other", key="o")
    replay = call(handler, path="/other", key="o")
    assert replay.header("idempotent-replayed") == "true"
    assert (replay.status, replay.body) == (first.status, first.body)
    assert replay.header("x-run") == first.header("x-run")
    assert DJANGO_RUNS == ["payments", "webhooks", "webhooks", "other", "other"]


def test_django_view_can_read_the_body_and_form_data_again(
    django_wsgi: tuple[Any, MemoryStore],
) -> None:
    handler, _ = django_wsgi
    payments = call(handler, path="/payments", key="b", body=b'{"amount": 3}')
    assert payments.json() == {"body": '{"amount": 3}'}
    form = call(
        handler,
        path="/other",
        key="f",
        body=b"a=1",
        content_type="application/x-www-form-urlencoded",
    )
    assert form.json()["post"] == "1"


def test_django_scope_is_the_authenticated_user(django_wsgi: tuple[Any, MemoryStore]) -> None:
    handler, store = django_wsgi
    for user in ("alice", "bob", "alice"):
        call(handler, path="/other", key="same", headers=[("X-User", user)])
    assert DJANGO_RUNS == ["other", "other"]
    assert store.get_sync("app:user:alice", "same") is not None
    call(handler, path="/other", key="same")  # anonymous: the credential scope
    assert store.get_sync(ANON, "same") is not None
    assert len(DJANGO_RUNS) == 3


def test_django_streaming_response_completes_before_its_last_chunk(
    django_wsgi: tuple[Any, MemoryStore],
) -> None:
    handler, store = django_wsgi
    states: list[RecordState | None] = []

    def observe(chunk: bytes) -> None:
        record = store.get_sync(ANON, "s")
        states.append(record.state if record else None)

    first = run(handler, make_environ(path="/stream", key="s"), on_chunk=observe)
    assert states == [RecordState.IN_FLIGHT] * 3 + [RecordState.COMPLETED]
    replay = call(handler, path="/stream", key="s")
    assert replay.body == first.body == b"part0-1;part1-1;part2-1;part3-1;"
    assert DJANGO_RUNS == ["stream"]


def test_django_streaming_client_abort_still_completes(
    django_wsgi: tuple[Any, MemoryStore],
) -> None:
    handler, _ = django_wsgi
    aborted = call(handler, path="/stream", key="a", take=1)
    assert aborted.body == b"part0-1;"
    replay = call(handler, path="/stream", key="a")
    assert replay.body == b"part0-1;part1-1;part2-1;part3-1;"
    assert DJANGO_RUNS == ["stream"]


def test_a_request_replayed_again_is_not_fingerprinted_again(fingerprinted: list[bytes]) -> None:
    app = CountingApp()
    middleware = guarded(app)
    first = call(middleware, key="k", body=b'{"amount": 5}')
    replays = [call(middleware, key="k", body=b'{"amount": 5}') for _ in range(3)]
    assert app.executions == 1
    assert [r.body for r in replays] == [first.body] * 3
    assert all(r.header("idempotent-replayed") == "true" for r in replays)
    assert fingerprinted == [b'{"amount": 5}'] * 2  # the first request and the first replay
    canonical_twin = call(middleware, key="k", body=b'{ "amount":5 }')
    mismatch = call(middleware, key="k", body=b'{"amount": 6}')
    assert canonical_twin.status == 201
    assert canonical_twin.body == first.body
    assert mismatch.status == 422
    assert app.executions == 1
    assert len(fingerprinted) == 4
