"""The demo's accounts and planned transfers, for chaos and crash tests."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx


def open_accounts(
    http: httpx.Client,
    *,
    count: int,
    balance: int,
    auth: Mapping[str, str],
    institution: str,
    key_prefix: str,
) -> list[str]:
    """`count` NZD accounts with `balance` each; one Idempotency-Key per account."""
    ids = []
    for number in range(count):
        response = http.post(
            "/v1/accounts",
            json={
                "name": f"Account {number}", "institution": institution,
                "balance": balance, "currency": "NZD",
            },
            headers={**auth, "Idempotency-Key": f"{key_prefix}-{number}"},
        )  # fmt: skip
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    return ids


@dataclass(frozen=True)
class PlannedTransfer:
    """One logical transfer: its Idempotency-Key, and the body every attempt sends."""

    key: str
    from_account: str
    to_account: str
    amount: int
    index: int = 0  # its place in the plan, where the test orders results by it

    @property
    def body(self) -> dict[str, Any]:
        return {
            "from_account": self.from_account,
            "to_account": self.to_account,
            "amount": self.amount,
        }
