"""Where in a request an event belongs; shared by the subscribers."""

from __future__ import annotations

from enum import Enum

from oncely.core.events import EventKind, IdempotencyEvent


class Phase(Enum):
    DECISION = "decision"  # once per request: the claim's outcome, a 503, or a 400/413
    COMPLETION = "completion"  # once per executed request: stored, released, lease lost, 503
    RENEWAL = "renewal"  # the lease was lost while the handler ran
    CLIENT = "client"  # a client retry


_BY_KIND = {
    EventKind.CLAIMED: Phase.DECISION,
    EventKind.TOOK_OVER: Phase.DECISION,
    EventKind.REPLAYED: Phase.DECISION,
    EventKind.IN_PROGRESS: Phase.DECISION,
    EventKind.MISMATCH: Phase.DECISION,
    EventKind.NOT_REPLAYABLE: Phase.DECISION,
    EventKind.REJECTED: Phase.DECISION,
    EventKind.STORED: Phase.COMPLETION,
    EventKind.RELEASED: Phase.COMPLETION,
    EventKind.CLIENT_RETRY: Phase.CLIENT,
}


def phase_of(event: IdempotencyEvent) -> Phase:
    phase = _BY_KIND.get(event.kind)
    if phase is not None:
        return phase
    if event.kind is EventKind.STORE_ERROR:
        # detail "claim" (503 before the handler) or "completion" (after it ran)
        completion = event.detail == "completion" or event.handler_duration is not None
        return Phase.COMPLETION if completion else Phase.DECISION
    # LEASE_LOST: "renewal" while the handler runs; otherwise refused at completion
    return Phase.RENEWAL if event.detail == "renewal" else Phase.COMPLETION


def status_class(status: int | None) -> str:
    if status is None:
        return "none"
    return _STATUS_CLASSES[status // 100] if 100 <= status < 600 else "other"


_STATUS_CLASSES = ("", "1xx", "2xx", "3xx", "4xx", "5xx")
STATUS_CLASSES = (*_STATUS_CLASSES[1:], "none")
