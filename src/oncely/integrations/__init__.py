"""Framework integrations: `oncely.integrations.flask` and `oncely.integrations.django`.

Each needs its extra (`oncely[flask]`, `oncely[django]`) and is imported only when used.
This module holds what both read from their framework's settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from oncely.core.policy import IdempotencyPolicy
from oncely.stores.base import SyncStore

PRESETS = ("ietf", "stripe", "akahu", "aleta", "posta", "apiture")


def build_store(store: SyncStore | str, options: Mapping[str, Any] | None = None) -> SyncStore:
    """A store object, or one made from a store URL (keyword `options` go to the store)."""
    if isinstance(store, str):
        from oncely.stores.urls import store_from_url

        return store_from_url(store, **dict(options or {}))
    if options:
        raise ValueError("store options apply to a store URL, not to a store object")
    return store


def build_policy(
    policy: IdempotencyPolicy | Mapping[str, Any] | None = None,
    *,
    preset: str | None = None,
    **options: Any,
) -> IdempotencyPolicy:
    """A policy from a preset name (SPEC §6), a policy or a mapping of its fields, and
    keyword overrides, applied in that order."""
    if preset is not None:
        if preset.lower() not in PRESETS:
            raise ValueError(f"unknown oncely preset {preset!r}; expected one of {PRESETS}")
        base: IdempotencyPolicy = getattr(IdempotencyPolicy, preset.lower())()
    else:
        base = IdempotencyPolicy()
    if isinstance(policy, IdempotencyPolicy):
        if preset is not None:
            raise ValueError("give either a preset or an IdempotencyPolicy, not both")
        base = policy
    elif policy:
        base = base.replace(**dict(policy))
    return base.replace(**options) if options else base


__all__ = ["PRESETS", "build_policy", "build_store"]
