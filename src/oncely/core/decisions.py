"""The decision table of SPEC §3, as data.

Everything that decides what happens to a request with a key lives in this file:
stores only perform the claim transition atomically, adapters only move bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum, StrEnum
from typing import NamedTuple

from oncely.core.records import Record, RecordState


class Outcome(StrEnum):
    """What the adapter does with a request after the claim. Values are event names."""

    EXECUTE = "claimed"  # nothing (or an expired record) was there: run the handler
    TAKE_OVER = "took-over"  # in flight, its lease lapsed (the worker died): run it again
    REPLAY = "replayed"  # completed with this fingerprint: send the stored response
    IN_PROGRESS = "in-progress"  # in flight with a live lease: 409 + Retry-After (or wait)
    MISMATCH = "mismatch"  # the key was used for a different request: 422 (or 409)
    NOT_REPLAYABLE = "too-large"  # completed, but the response was too large to keep


# (state the store holds, same fingerprint?) -> outcome. A claim that created or took
# over the record never reaches this table: the store answered Claimed.
DECISION_TABLE: Mapping[tuple[RecordState, bool], Outcome] = {
    (RecordState.IN_FLIGHT, True): Outcome.IN_PROGRESS,
    (RecordState.IN_FLIGHT, False): Outcome.MISMATCH,
    (RecordState.COMPLETED, True): Outcome.REPLAY,
    (RecordState.COMPLETED, False): Outcome.MISMATCH,
}


class ClaimTransition(Enum):
    """What an atomic claim does to the store, given what it holds."""

    INSERT = "insert"  # nothing there, or the record has expired
    TAKE_OVER = "take-over"  # in flight, lease expired, same fingerprint: new token
    KEEP = "keep"  # leave it and report it


def claim_transition(existing: Record | None, fingerprint: str, now: float) -> ClaimTransition:
    """The rule every store applies inside its one atomic claim.

    SQL and Lua stores encode the same rule in their statements; the shared contract
    suite holds them to it.
    """
    if existing is None or existing.expires_at <= now:
        return ClaimTransition.INSERT
    if (
        existing.state is RecordState.IN_FLIGHT
        and existing.lease_expires_at is not None
        and existing.lease_expires_at <= now
        and existing.fingerprint == fingerprint
    ):
        return ClaimTransition.TAKE_OVER
    return ClaimTransition.KEEP


class Claimed(NamedTuple):
    """The caller holds the lease under `token` and must complete or release."""

    token: str
    attempt: int
    took_over: bool = False


class Existing(NamedTuple):
    """The store kept the record; `now` is the store's clock at the claim."""

    record: Record
    now: float

    @property
    def lease_remaining(self) -> float:
        lease = self.record.lease_expires_at
        return max(0.0, lease - self.now) if lease is not None else 0.0


ClaimResult = Claimed | Existing


def decide(result: ClaimResult, fingerprint: str) -> Outcome:
    if isinstance(result, Claimed):
        return Outcome.TAKE_OVER if result.took_over else Outcome.EXECUTE
    record = result.record
    outcome = DECISION_TABLE[(record.state, record.fingerprint == fingerprint)]
    if outcome is Outcome.REPLAY and record.response is not None and not record.response.replayable:
        return Outcome.NOT_REPLAYABLE
    return outcome
