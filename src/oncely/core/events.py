"""Events: one hook point for every decision (SPEC §3) and every client retry.

Adapters emit an `IdempotencyEvent` to the subscribers configured on the policy;
metrics, traces and logs are subscribers (see `oncely.instrumentation`), never code
woven through the request path. With no subscriber the cost is one check.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

logger = logging.getLogger("oncely")


class EventKind(StrEnum):
    CLAIMED = "claimed"  # fresh claim: the handler runs
    TOOK_OVER = "took-over"  # the lease of a dead worker lapsed: the handler runs again
    REPLAYED = "replayed"
    IN_PROGRESS = "in-progress"  # 409: a duplicate met the request in flight
    MISMATCH = "mismatch"  # 422/409: key reused with a different request
    NOT_REPLAYABLE = "too-large"  # completed, but too large to replay
    STORED = "stored"  # the response was stored (completion)
    RELEASED = "released"  # the key was released (status not stored, or exception)
    LEASE_LOST = "lease-lost"  # completion refused: another worker took over
    STORE_ERROR = "store-error"  # the store failed; 503 (or fail open)
    REJECTED = "rejected"  # 400 bad or missing key, 413 body too large
    CLIENT_RETRY = "client-retry"  # the client retries a request


@dataclass(frozen=True, slots=True)
class IdempotencyEvent:
    """What happened, with what a dashboard needs. Never the raw key or credential."""

    kind: EventKind
    method: str = ""
    route: str | None = None  # the route template when the framework gives one
    status: int | None = None
    store: str | None = None
    duration: float | None = None  # seconds the store operation took (claim or complete)
    handler_duration: float | None = None  # seconds the handler ran (on STORED / RELEASED)
    key_hash: str | None = None
    attempt: int | None = None
    detail: str | None = None


EventSubscriber = Callable[[IdempotencyEvent], None]


def hash_key(key: str) -> str:
    """A short stable digest that lets logs correlate a key without revealing it."""
    return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


def emit(subscribers: Sequence[EventSubscriber], event: IdempotencyEvent) -> None:
    """Deliver to each subscriber; a failing subscriber never fails the request."""
    for subscriber in subscribers:
        try:
            subscriber(event)
        except Exception:
            logger.exception("oncely event subscriber %r failed", subscriber)
