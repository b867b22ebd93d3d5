"""Every row of the SPEC §3 decision table."""

from __future__ import annotations

import pytest

from oncely.core.decisions import (
    DECISION_TABLE,
    Claimed,
    ClaimTransition,
    Existing,
    Outcome,
    claim_transition,
    decide,
)
from oncely.core.records import Record, RecordState, StoredResponse

FP, OTHER = "a" * 32, "b" * 32
NOW = 1_000.0


def record(
    state: RecordState, *, lease_left: float = 10, ttl_left: float = 100, **kw: object
) -> Record:
    response = StoredResponse(201, (), b"{}") if state is RecordState.COMPLETED else None
    fields: dict[str, object] = {
        "scope": "s", "key": "k", "fingerprint": FP, "state": state, "token": "t",
        "attempts": 1, "created_at": NOW - 5, "expires_at": NOW + ttl_left,
        "lease_expires_at": NOW + lease_left if state is RecordState.IN_FLIGHT else None,
        "response": response,
    }  # fmt: skip
    fields.update(kw)
    return Record(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("existing", "fingerprint", "transition"),
    [
        (None, FP, ClaimTransition.INSERT),
        (record(RecordState.COMPLETED, ttl_left=0), FP, ClaimTransition.INSERT),
        (record(RecordState.IN_FLIGHT, ttl_left=-1), OTHER, ClaimTransition.INSERT),
        (record(RecordState.IN_FLIGHT, lease_left=1), FP, ClaimTransition.KEEP),
        (record(RecordState.IN_FLIGHT, lease_left=0), FP, ClaimTransition.TAKE_OVER),
        (record(RecordState.IN_FLIGHT, lease_left=-3), OTHER, ClaimTransition.KEEP),
        (record(RecordState.COMPLETED), FP, ClaimTransition.KEEP),
        (record(RecordState.COMPLETED), OTHER, ClaimTransition.KEEP),
    ],
)
def test_claim_transition(
    existing: Record | None, fingerprint: str, transition: ClaimTransition
) -> None:
    assert claim_transition(existing, fingerprint, NOW) is transition


@pytest.mark.parametrize(
    ("result", "fingerprint", "outcome"),
    [
        (Claimed("t", 1), FP, Outcome.EXECUTE),
        (Claimed("t", 2, took_over=True), FP, Outcome.TAKE_OVER),
        (Existing(record(RecordState.IN_FLIGHT), NOW), FP, Outcome.IN_PROGRESS),
        (Existing(record(RecordState.IN_FLIGHT), NOW), OTHER, Outcome.MISMATCH),
        (Existing(record(RecordState.IN_FLIGHT, lease_left=-1), NOW), OTHER, Outcome.MISMATCH),
        (Existing(record(RecordState.COMPLETED), NOW), FP, Outcome.REPLAY),
        (Existing(record(RecordState.COMPLETED), NOW), OTHER, Outcome.MISMATCH),
        (
            Existing(
                record(RecordState.COMPLETED, response=StoredResponse(200, (), b"", False)), NOW
            ),
            FP,
            Outcome.NOT_REPLAYABLE,
        ),
    ],
)
def test_decide(result: Claimed | Existing, fingerprint: str, outcome: Outcome) -> None:
    assert decide(result, fingerprint) is outcome


def test_table_covers_every_state_and_match() -> None:
    assert set(DECISION_TABLE) == {(s, m) for s in RecordState for m in (True, False)}


def test_lease_remaining_uses_the_store_clock() -> None:
    assert Existing(record(RecordState.IN_FLIGHT, lease_left=2.5), NOW).lease_remaining == 2.5
    assert Existing(record(RecordState.IN_FLIGHT, lease_left=-2), NOW).lease_remaining == 0
