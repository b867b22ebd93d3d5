"""The demo's own RFC 9457 problems: what each refusal of the bank looks like on the wire.

These are handler responses, so oncely stores and replays them like any other; oncely's
own problems (missing key, in flight, key reuse) come from `oncely.core.problems`.
"""

from __future__ import annotations

import json
from typing import Any

from oncely.demo.repository import (
    AccountNotFound,
    CurrencyMismatch,
    DemoError,
    InsufficientFunds,
    InvalidAmount,
    SameAccount,
    TransferNotFound,
)

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://oncely.dev/demo/problems/"

# error -> (status, slug, title). 404: the thing is not in this workspace. 409: the
# request is fine but the account's current state refuses it (retrying later, after a
# deposit, may succeed). 422: the request itself can never succeed.
DEMO_PROBLEMS: dict[type[DemoError], tuple[int, str, str]] = {
    AccountNotFound: (404, "account-not-found", "Account not found"),
    TransferNotFound: (404, "transfer-not-found", "Transfer not found"),
    InsufficientFunds: (409, "insufficient-funds", "Insufficient funds"),
    CurrencyMismatch: (422, "currency-mismatch", "Accounts hold different currencies"),
    SameAccount: (422, "same-account", "Transfer to the same account"),
    InvalidAmount: (422, "invalid-amount", "Invalid amount"),
}


def problem_document(
    slug: str, title: str, status: int, detail: str, extensions: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "type": PROBLEM_TYPE_BASE + slug,
        "title": title,
        "status": status,
        "detail": detail,
        **(extensions or {}),
    }


def problem_of(error: DemoError) -> dict[str, Any]:
    status, slug, title = DEMO_PROBLEMS[type(error)]
    return problem_document(slug, title, status, error.detail, error.extensions)


def problem_bytes(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()
