"""Opening the demo's accounts for chaos and crash tests."""

from __future__ import annotations

from collections.abc import Mapping

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
