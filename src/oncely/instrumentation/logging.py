"""Structured log lines from oncely events (stdlib `logging`, no extra needed).

    app.add_middleware(IdempotencyMiddleware, store=store, event_subscribers=[LoggingSubscriber()])

One line per event on the "oncely.events" logger. The routine outcomes (claimed,
stored, replayed) are DEBUG; the ones an operator may act on are `level` (INFO by
default: in-progress, mismatch, too-large, released, rejected, client retries), WARNING
(took-over, lease-lost) or ERROR (store-error). Every record carries the event in
`extra` fields for JSON formatters: `oncely_outcome`, `oncely_key_hash`,
`oncely_method`, `oncely_route`, `oncely_status`, `oncely_store`, `oncely_attempt`,
`oncely_duration`, `oncely_handler_duration`, `oncely_detail`. The key appears only
hashed; credentials never.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from oncely.core.events import EventKind, IdempotencyEvent
from oncely.instrumentation._phase import Phase, phase_of

__all__ = ["LoggingSubscriber"]

# Templates over one mapping of arguments, formatted only if the record is emitted.
_MESSAGES: dict[EventKind, str] = {
    EventKind.CLAIMED: "%(method)s %(route)s key %(key)s claimed; the handler runs",
    EventKind.TOOK_OVER: (
        "%(method)s %(route)s key %(key)s taken over after its lease expired (attempt "
        "%(attempt)s): the previous worker died or stalled, the handler runs again"
    ),
    EventKind.REPLAYED: "%(method)s %(route)s key %(key)s replayed the stored response",
    EventKind.IN_PROGRESS: (
        "%(method)s %(route)s key %(key)s is still in flight: answered request-in-progress"
    ),
    EventKind.MISMATCH: (
        "%(method)s %(route)s key %(key)s reused with a different request: answered "
        "key-reused-with-different-request"
    ),
    EventKind.NOT_REPLAYABLE: (
        "%(method)s %(route)s key %(key)s completed with a response too large to replay: "
        "answered response-not-replayable"
    ),
    EventKind.STORED: "%(method)s %(route)s key %(key)s stored its %(status)s response",
    EventKind.RELEASED: (
        "%(method)s %(route)s key %(key)s released (status %(status)s not stored): "
        "a retry runs the handler again"
    ),
    EventKind.LEASE_LOST: (
        "%(method)s %(route)s key %(key)s lost its lease before completion: another "
        "worker took the record over, the %(status)s response was not stored"
    ),
    EventKind.STORE_ERROR: (
        "%(method)s %(route)s key %(key)s: the %(store)s store failed at %(detail)s"
    ),
    EventKind.REJECTED: "%(method)s %(route)s rejected with %(status)s: %(detail)s",
    EventKind.CLIENT_RETRY: (
        "client retries %(method)s key %(key)s after attempt %(attempt)s: %(detail)s"
    ),
}
_LEASE_LOST_RUNNING = (
    "%(method)s %(route)s key %(key)s lost its lease while the handler ran: another "
    "worker may take the record over"
)

_ROUTINE = frozenset({EventKind.CLAIMED, EventKind.STORED, EventKind.REPLAYED})
_WARNINGS = frozenset({EventKind.TOOK_OVER, EventKind.LEASE_LOST})


class LoggingSubscriber:
    """An event subscriber that logs each event, at a level by how much it matters.

    `levels` overrides the level of given kinds, e.g. `{EventKind.REPLAYED: logging.INFO}`.
    """

    def __init__(
        self,
        logger: logging.Logger | None = None,
        level: int = logging.INFO,
        *,
        levels: Mapping[EventKind, int] | None = None,
    ) -> None:
        self.logger = logging.getLogger("oncely.events") if logger is None else logger
        self.levels = {kind: _default_level(kind, level) for kind in EventKind}
        if levels:
            self.levels.update(levels)

    def __call__(self, event: IdempotencyEvent) -> None:
        level = self.levels[event.kind]
        if not self.logger.isEnabledFor(level):
            return
        message = _MESSAGES[event.kind]
        if event.kind is EventKind.LEASE_LOST and phase_of(event) is Phase.RENEWAL:
            message = _LEASE_LOST_RUNNING
        arguments: dict[str, Any] = {
            "method": event.method or "-",
            "route": event.route or "-",
            "key": event.key_hash or "-",
            "status": event.status,
            "store": event.store,
            "attempt": event.attempt,
            "detail": event.detail,
        }
        self.logger.log(level, message, arguments, extra=extra_of(event))


def _default_level(kind: EventKind, level: int) -> int:
    if kind in _ROUTINE:
        return logging.DEBUG
    if kind in _WARNINGS:
        return logging.WARNING
    return logging.ERROR if kind is EventKind.STORE_ERROR else level


def extra_of(event: IdempotencyEvent) -> dict[str, Any]:
    """The event as `extra=` fields: a stable set of names, None where absent."""
    return {
        "oncely_outcome": event.kind.value,
        "oncely_key_hash": event.key_hash,
        "oncely_method": event.method or None,
        "oncely_route": event.route,
        "oncely_status": event.status,
        "oncely_store": event.store,
        "oncely_attempt": event.attempt,
        "oncely_duration": event.duration,
        "oncely_handler_duration": event.handler_duration,
        "oncely_detail": event.detail,
    }
