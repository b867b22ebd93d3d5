"""RFC 9457 problem responses for everything oncely itself answers (SPEC §4).

None of these is ever stored: they say nothing about the handler's effects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from oncely.core.keys import HEADER, InvalidKey
from oncely.core.policy import IdempotencyPolicy

PROBLEM_CONTENT_TYPE = b"application/problem+json"


@dataclass(frozen=True, slots=True)
class Problem:
    slug: str
    title: str
    status: int
    detail: str
    retry_after: int | None = None
    extensions: dict[str, Any] = field(default_factory=dict)


class RenderedResponse(NamedTuple):
    """A response oncely answers itself: a replay or a problem. A NamedTuple: one is
    built for every replay, at half the cost of a frozen dataclass."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def render(problem: Problem, policy: IdempotencyPolicy, key: str | None = None) -> RenderedResponse:
    document: dict[str, Any] = {
        "type": policy.problem_type_base + problem.slug,
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
    }
    if key is not None:
        document["idempotency_key"] = key
    document.update(problem.extensions)
    body = json.dumps(document, separators=(",", ":")).encode()
    headers = [
        (b"content-type", PROBLEM_CONTENT_TYPE),
        (b"content-length", str(len(body)).encode()),
    ]
    if problem.retry_after is not None:
        headers.append((b"retry-after", str(problem.retry_after).encode()))
    if policy.docs_url:
        headers.append((b"link", f'<{policy.docs_url}>; rel="describedby"'.encode()))
    return RenderedResponse(problem.status, headers, body)


def _retention(policy: IdempotencyPolicy) -> dict[str, Any]:
    return {"key_retention_seconds": int(policy.retention)}


def invalid_key(error: InvalidKey) -> Problem:
    return Problem(
        slug="invalid-idempotency-key",
        title="Invalid Idempotency-Key header",
        status=400,
        detail=error.detail,
        extensions={"rule": str(error.rule)},
    )


def key_required(policy: IdempotencyPolicy) -> Problem:
    return Problem(
        slug="idempotency-key-required",
        title="Idempotency-Key header required",
        status=400,
        detail=(
            f"This endpoint requires an {HEADER} header: send a unique value (for example a "
            "UUID) per operation, and the same value when you retry it."
        ),
        extensions={"header": HEADER, **_retention(policy)},
    )


def body_too_large(policy: IdempotencyPolicy) -> Problem:
    return Problem(
        slug="request-body-too-large",
        title="Request body too large",
        status=413,
        detail=f"Requests with an {HEADER} may carry at most {policy.max_request_body} bytes.",
    )


def in_progress(policy: IdempotencyPolicy, retry_after: int) -> Problem:
    return Problem(
        slug="request-in-progress",
        title="A request with this key is in progress",
        status=policy.in_flight_status,
        detail=(
            "An earlier request with this Idempotency-Key has not finished yet. Retry after "
            "the time in Retry-After to get its response."
        ),
        retry_after=retry_after,
        extensions=_retention(policy),
    )


def mismatch(policy: IdempotencyPolicy) -> Problem:
    return Problem(
        slug="key-reused-with-different-request",
        title="Idempotency-Key reused with a different request",
        status=policy.mismatch_status,
        detail=(
            "This Idempotency-Key was already used for a request with a different method, "
            "path or body. Use a new key for a new operation."
        ),
        extensions=_retention(policy),
    )


def not_replayable(policy: IdempotencyPolicy, status: int) -> Problem:
    return Problem(
        slug="response-not-replayable",
        title="The original response is too large to replay",
        status=409,
        detail=(
            f"The request with this Idempotency-Key was completed with status {status}, "
            f"but its response exceeded {policy.max_stored_body} bytes and was not kept. "
            "It will not run again."
        ),
        extensions={"original_status": status, **_retention(policy)},
    )


def store_unavailable(policy: IdempotencyPolicy) -> Problem:
    return Problem(
        slug="idempotency-store-unavailable",
        title="Idempotency store unavailable",
        status=503,
        detail=(
            "The request was not processed because its Idempotency-Key could not be "
            "checked. It is safe to retry with the same key."
        ),
        retry_after=policy.unavailable_retry_after,
    )


def handler_failed() -> Problem:
    return Problem(
        slug="handler-failed",
        title="Internal server error",
        status=500,
        detail=(
            "The request failed inside the server. It may have had effects, so this "
            "response is what a retry with the same Idempotency-Key receives."
        ),
    )
