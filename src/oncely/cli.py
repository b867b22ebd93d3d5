"""The `oncely` command: the demo, and an operator's view of any store.

    oncely demo [--host H] [--port P] [--store URL] [--ttl S] [--latency MS] [--lease S]
                [--no-transactional-completion]
    oncely inspect --store URL --workspace TOKEN KEY [--body] [--json]
    oncely stats --store URL [--json]
    oncely purge --store URL [--json]
    oncely init-db --store URL [--json]

Every store URL goes through `oncely.stores.store_from_url`. Output is a table for a
terminal (rich) or JSON (`--json`). Exit codes: 0 done, 1 no such record (inspect),
2 bad usage or store URL, 3 the store failed or could not be reached.
Needs the `cli` extra (click, rich); `oncely demo` needs the `demo` extra.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import click
from rich.console import Console
from rich.table import Table

from oncely._version import __version__
from oncely.core.records import Record, RecordState
from oncely.demo import DEFAULT_STORE_URL, DEFAULT_TTL
from oncely.stores import SQLiteStore, StoreError, store_from_url
from oncely.stores.urls import redact_url

if TYPE_CHECKING:
    from oncely.demo.app import Demo
    from oncely.stores import Store

F = TypeVar("F", bound=Callable[..., Any])

EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_STORE = 3
DEMO_TOKEN = "sk_test_demo"


# plumbing ----------------------------------------------------------------------------


def fail(message: str, code: int) -> NoReturn:
    """One line on stderr and a non-zero exit; no traceback."""
    click.echo(f"oncely: error: {message}", err=True)
    sys.exit(code)


@contextlib.contextmanager
def opened_store(url: str, *, existing: bool = False) -> Iterator[Store]:
    """The store for `url`, closed afterwards; bad URLs and store failures become one
    line and an exit code. `existing`: an operator command that must not create the
    store (no new SQLite file, no PostgreSQL table; `init-db` does that)."""
    quiet_driver_logs()
    scheme = urlsplit(url).scheme.lower()
    options: dict[str, object] = {}
    if existing and scheme in ("postgresql", "postgres"):
        options["create_schema"] = False
    try:
        store = store_from_url(url, **options)
    except ValueError as error:
        fail(str(error), EXIT_USAGE)
    except ImportError as error:
        extra = "postgres" if scheme.startswith("postgres") else "redis"
        fail(
            f"the {scheme} store needs an extra: pip install 'oncely[{extra}]' ({error})",
            EXIT_USAGE,
        )
    if existing and isinstance(store, SQLiteStore) and not store.path.is_file():
        fail(
            f"store {redact_url(url)} does not exist (create it with: oncely init-db --store URL)",
            EXIT_STORE,
        )
    try:
        yield store
    except (StoreError, OSError) as error:
        hint = " (create it with: oncely init-db --store URL)" if existing else ""
        first_line = str(error).splitlines()[0] if str(error) else repr(error)
        fail(f"store {redact_url(url)} failed: {first_line}{hint}", EXIT_STORE)
    finally:
        with contextlib.suppress(Exception):
            store.close()


def quiet_driver_logs() -> None:
    """psycopg_pool logs each failed connection attempt; the error line says it once."""
    pool_logger = logging.getLogger("psycopg.pool")
    pool_logger.addHandler(logging.NullHandler())
    pool_logger.propagate = False


def store_option(default: str | None = None) -> Callable[[F], F]:
    return click.option(
        "--store",
        "store_url",
        required=default is None,
        default=default,
        show_default=default is not None,
        envvar="ONCELY_STORE",
        metavar="URL",
        help=(
            "Store URL (or $ONCELY_STORE): sqlite:///file.db, sqlite:////abs/file.db, "
            "postgresql://user@host/db, redis://host:6379/0, redis+cluster://host:port, "
            "memory://."
        ),
    )


json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table."
)


def print_json(document: dict[str, Any]) -> None:
    click.echo(json.dumps(document, indent=2))


def console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def relative(timestamp: float, now: float) -> str:
    """'in 23 h 59 min', '4 s ago'."""
    delta = timestamp - now
    seconds = int(abs(delta))
    if seconds < 60:
        amount = f"{seconds} s"
    elif seconds < 3600:
        amount = f"{seconds // 60} min {seconds % 60} s"
    elif seconds < 86400:
        amount = f"{seconds // 3600} h {seconds % 3600 // 60} min"
    else:
        amount = f"{seconds // 86400} d {seconds % 86400 // 3600} h"
    return f"in {amount}" if delta >= 0 else f"{amount} ago"


def when(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return "-"
    return f"{iso(timestamp)} ({relative(timestamp, now)})"


# the command group -------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="oncely")
def main() -> None:
    """oncely: Idempotency-Key for HTTP APIs. Run the demo, or look into a store."""


# demo --------------------------------------------------------------------------------


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option(
    "--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="TCP port."
)
@store_option(DEFAULT_STORE_URL)
@click.option(
    "--ttl",
    default=DEFAULT_TTL,
    show_default=True,
    type=click.IntRange(min=1),
    help="Key retention in seconds: after it, a key is free again.",
)
@click.option(
    "--latency",
    "latency_ms",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    metavar="MS",
    help="Every mutating handler takes this long (a slow bank; try a retry meanwhile).",
)
@click.option(
    "--lease",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    metavar="SECONDS",
    help=(
        "How long a claim lasts without renewal (renewed while a handler runs): a "
        "request whose worker died runs again on a retry after it."
    ),
)
@click.option(
    "--no-transactional-completion",
    "no_transactional_completion",
    is_flag=True,
    help=(
        "Let oncely complete each record after the handler instead of inside the handler's "
        "transaction (SQL stores only; memory and Redis stores always work so). Opens the "
        "crash window that transactional completion closes: for demonstrations and tests."
    ),
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    help="uvicorn's log level (info shows each request).",
)
def demo(
    host: str,
    port: int,
    store_url: str,
    ttl: int,
    latency_ms: int,
    lease: float,
    no_transactional_completion: bool,
    log_level: str,
) -> None:
    """Start the demo payments API: retried transfers never double-debit."""
    try:
        import uvicorn

        from oncely.demo.app import create_app
    except ImportError as error:
        fail(f"oncely demo needs the demo extra: pip install 'oncely[demo]' ({error})", EXIT_USAGE)
    with opened_store(store_url) as probe:
        probe.get_sync("oncely-demo", "reachability-check")  # fail now, not at the first POST
    try:
        app = create_app(
            store_url,
            ttl=ttl,
            latency_ms=latency_ms,
            lease=lease,
            transactional_completion=not no_transactional_completion,
        )
    except ValueError as error:
        fail(str(error), EXIT_USAGE)
    print_banner(app.state.demo, f"http://{host}:{port}")
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level)
    tune_gc_for_serving()
    uvicorn.Server(config).run()


def tune_gc_for_serving() -> None:
    """What the README advises a server in production: the objects of start-up out of
    the collector's reach, and gen-0 collections ten times rarer. Requests that wait on
    their store keep their objects alive meanwhile, which makes the default collector
    run every dozen requests and walk everything now and then (docs/benchmarks.md, "The
    garbage collector")."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def print_banner(demo: Demo, base: str) -> None:
    from oncely.demo.app import describe, operator_store_url

    ttl = int(demo.ttl)
    hours = f" ({ttl / 3600:g} h)" if ttl >= 3600 else ""
    store_url = redact_url(operator_store_url(demo))
    rows = [
        ("API", f"{base}   (OpenAPI: {base}/openapi.json, try it: {base}/docs)"),
        *describe(demo),
        ("retention", f"{ttl} s{hours}: a key is free again after that"),
        ("lease", f"{demo.lease:g} s: a crashed worker's requests run again after that"),
        ("latency", f"{demo.latency_ms} ms per mutating request"),
    ]
    echo = click.echo
    echo(click.style("oncely demo", bold=True) + ": a payments API where a retried transfer")
    echo("never debits twice. Ctrl-C stops it; the store keeps every record.\n")
    for label, value in rows:
        echo(f"  {label:<10} {value}")
    echo("\nTry it (any bearer token works, and each token is its own workspace):\n")
    echo(f"  curl -si {base}/v1/accounts -H 'Authorization: Bearer {DEMO_TOKEN}' \\")
    echo("    -H 'Idempotency-Key: open-alice' -H 'Content-Type: application/json' \\")
    echo('    -d \'{"name":"Alice","institution":"Kiwibank","balance":10000,"currency":"NZD"}\'')
    echo("\n  Send it again: the same account, with Idempotent-Replayed: true.\n")
    echo("Look into the store:\n")
    echo(f"  oncely inspect --store {store_url} --workspace {DEMO_TOKEN} open-alice")
    echo(f"  oncely stats --store {store_url}\n")
    sys.stdout.flush()


# inspect -----------------------------------------------------------------------------


def record_document(record: Record, *, with_body: bool) -> dict[str, Any]:
    response = record.response
    document: dict[str, Any] = {
        "found": True,
        "key": record.key,
        "scope": record.scope,
        "state": "completed" if record.state is RecordState.COMPLETED else "in_flight",
        "fingerprint": record.fingerprint or None,
        "attempts": record.attempts,
        "created_at": iso(record.created_at),
        "expires_at": iso(record.expires_at),
        "lease_expires_at": iso(record.lease_expires_at),
        "response": None,
    }
    if response is not None:
        stored: dict[str, Any] = {
            "status": response.status,
            "replayable": response.replayable,
            "headers": [
                [name.decode("latin-1"), value.decode("latin-1")]
                for name, value in response.headers
            ],
            "body_bytes": len(response.body),
        }
        if with_body:
            try:
                stored["body"] = response.body.decode()
            except UnicodeDecodeError:
                stored["body_base64"] = base64.b64encode(response.body).decode()
        document["response"] = stored
    return document


def print_record(record: Record, *, with_body: bool) -> None:
    now = time.time()
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    state = "completed" if record.state is RecordState.COMPLETED else "in flight"
    table.add_row("key", record.key)
    table.add_row("scope", record.scope)
    table.add_row("state", state)
    table.add_row("fingerprint", record.fingerprint or "(none: the key alone is compared)")
    table.add_row("attempts", str(record.attempts))
    table.add_row("created", when(record.created_at, now))
    table.add_row("expires", when(record.expires_at, now))
    if record.state is RecordState.IN_FLIGHT:
        table.add_row("lease expires", when(record.lease_expires_at, now))
    response = record.response
    if response is not None:
        replay = "" if response.replayable else " (too large to replay: body not kept)"
        table.add_row("status", f"{response.status}{replay}")
        for name, value in response.headers:
            table.add_row("  header", f"{name.decode('latin-1')}: {value.decode('latin-1')}")
        table.add_row("body", f"{len(response.body)} bytes")
    out = console()
    out.print(table)
    if with_body and response is not None:
        out.print(response.body.decode(errors="replace"), markup=False)


@main.command()
@store_option()
@click.option(
    "--workspace",
    "token",
    metavar="TOKEN",
    help="The bearer token of the request: the demo's workspace (oncely's default scope).",
)
@click.option(
    "--scope",
    metavar="SCOPE",
    help="A scope exactly as stored (e.g. cred:<hash>, app:<tenant>), instead of --workspace.",
)
@click.argument("key")
@click.option("--body", "with_body", is_flag=True, help="Also print the stored body.")
@json_option
def inspect(
    store_url: str,
    token: str | None,
    scope: str | None,
    key: str,
    with_body: bool,
    as_json: bool,
) -> None:
    """Show the record of one Idempotency-Key: state, fingerprint, stored response, times."""
    if (token is None) == (scope is None):
        fail("give exactly one of --workspace TOKEN or --scope SCOPE", EXIT_USAGE)
    if scope is None:
        from oncely.demo.auth import workspace_scope

        assert token is not None
        scope = workspace_scope(os.fsencode(token))
    with opened_store(store_url, existing=True) as store:
        record = store.get_sync(scope, key)
    if record is None:
        if as_json:
            print_json({"found": False, "key": key, "scope": scope})
        else:
            click.echo(
                f"No record for key {key!r} in scope {scope}: never used there, or expired "
                "(a key is free again after its retention)."
            )
        sys.exit(EXIT_NOT_FOUND)
    if as_json:
        print_json(record_document(record, with_body=with_body))
    else:
        print_record(record, with_body=with_body)


# stats, purge, init-db ---------------------------------------------------------------


@main.command()
@store_option()
@json_option
def stats(store_url: str, as_json: bool) -> None:
    """Count the store's records by state."""
    with opened_store(store_url, existing=True) as store:
        counts = store.stats_sync()
    total = counts.in_flight + counts.completed + counts.expired
    if as_json:
        print_json(
            {
                "store": redact_url(store_url),
                "in_flight": counts.in_flight,
                "completed": counts.completed,
                "expired": counts.expired,
                "total": total,
                "oldest_in_flight_age_seconds": counts.oldest_in_flight_age,
            }
        )
        return
    table = Table(title=f"oncely records in {redact_url(store_url)}", title_justify="left")
    table.add_column("state")
    table.add_column("records", justify="right")
    table.add_row("in flight", str(counts.in_flight))
    table.add_row("completed", str(counts.completed))
    table.add_row("expired (awaiting purge)", str(counts.expired))
    table.add_row("total", str(total), style="bold")
    out = console()
    out.print(table)
    if counts.oldest_in_flight_age is not None:
        out.print(f"oldest in-flight record: {counts.oldest_in_flight_age:.1f} s old")


@main.command()
@store_option()
@json_option
def purge(store_url: str, as_json: bool) -> None:
    """Delete expired records (SQL stores; Redis expires them by itself)."""
    with opened_store(store_url, existing=True) as store:
        purged = store.purge_expired_sync()
        native = bool(getattr(store, "native_expiry", False))
    if as_json:
        print_json({"store": redact_url(store_url), "purged": purged, "native_expiry": native})
        return
    click.echo(f"Purged {purged} expired record{'s' if purged != 1 else ''}.")
    if native:
        click.echo("This store expires records by itself; there is nothing to purge.")


@main.command("init-db")
@store_option()
@json_option
def init_db(store_url: str, as_json: bool) -> None:
    """Create the store's table and index if absent (safe to run again)."""
    with opened_store(store_url) as store:
        if hasattr(store, "init_schema_sync"):
            store.init_schema_sync()
        else:
            store.get_sync("oncely-init-db", "probe")  # SQLite creates its table on connect
    if as_json:
        print_json({"store": redact_url(store_url), "ready": True})
    else:
        click.echo(f"The store is ready: {redact_url(store_url)}")


if __name__ == "__main__":
    main()
