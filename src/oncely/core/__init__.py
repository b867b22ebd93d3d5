"""The sans-I/O core: keys, fingerprints, records, the decision table, policy, problems."""

from oncely.core.decisions import (
    DECISION_TABLE,
    Claimed,
    ClaimResult,
    ClaimTransition,
    Existing,
    Outcome,
    claim_transition,
    decide,
)
from oncely.core.fingerprint import RequestFacts, canonical_json, default_fingerprint
from oncely.core.keys import InvalidKey, KeyRule, parse_key
from oncely.core.policy import IdempotencyPolicy, RouteOptions
from oncely.core.records import (
    Record,
    RecordState,
    StoredResponse,
    decode_response,
    encode_response,
)

__all__ = [
    "DECISION_TABLE",
    "ClaimResult",
    "ClaimTransition",
    "Claimed",
    "Existing",
    "IdempotencyPolicy",
    "InvalidKey",
    "KeyRule",
    "Outcome",
    "Record",
    "RecordState",
    "RequestFacts",
    "RouteOptions",
    "StoredResponse",
    "canonical_json",
    "claim_transition",
    "decide",
    "decode_response",
    "default_fingerprint",
    "encode_response",
    "parse_key",
]
