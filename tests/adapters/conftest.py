from __future__ import annotations

from typing import Any

import pytest

from oncely.core.fingerprint import request_fingerprint


@pytest.fixture
def fingerprinted(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The bodies the adapters computed a default fingerprint of, in order."""
    bodies: list[bytes] = []

    def counting(method: str, path: str, query: bytes, content_type: Any, body: bytes) -> str:
        bodies.append(body)
        return request_fingerprint(method, path, query, content_type, body)

    monkeypatch.setattr("oncely.core.exchange.request_fingerprint", counting)
    return bodies
