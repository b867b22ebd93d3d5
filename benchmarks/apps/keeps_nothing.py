"""A memory store that keeps nothing: the knock-out that weighs the store's own cost."""

from __future__ import annotations

from oncely.core import Claimed, ClaimResult, StoredResponse
from oncely.stores import MemoryStore


class KeepsNothing(MemoryStore):
    """Every claim is new and every completion succeeds; nothing is kept. It overrides
    the sync twins, so the adapter calls it on the loop like the memory store it
    replaces (no coroutine per call): only the store's own work drops out."""

    def claim_sync(
        self, scope: str, key: str, fingerprint: str, token: str, *, lease: float, retention: float
    ) -> ClaimResult:
        return Claimed(token, 1)

    def complete_sync(self, scope: str, key: str, token: str, response: StoredResponse) -> bool:
        return True
