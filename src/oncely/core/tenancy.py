"""Scope (tenant) of a key (SPEC §3): credentials are hashed, never stored."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

ANONYMOUS_SCOPE = "anonymous"
DEFAULT_CREDENTIAL_HEADERS = ("authorization", "x-api-key")


def scope_from_value(value: str) -> str:
    """A scope given by the app's own auth (a user id, a workspace id)."""
    return "app:" + value


def scope_from_credentials(
    headers: Iterable[tuple[bytes, bytes]], credential_headers: Sequence[str]
) -> str:
    """Hash of the credential headers present; two credentials never share a namespace."""
    wanted = {name.lower().encode("latin-1") for name in credential_headers}
    return credential_scope(
        [(name.lower(), value) for name, value in headers if name.lower() in wanted]
    )


def credential_scope(credentials: list[tuple[bytes, bytes]]) -> str:
    """The scope for credential headers already picked out (lower-case names)."""
    if not credentials:
        return ANONYMOUS_SCOPE
    if len(credentials) > 1:
        credentials = sorted(credentials)
    digest = hashlib.blake2b(digest_size=16, person=b"oncely-scope")
    for name, value in credentials:
        digest.update(name)
        digest.update(b":")
        digest.update(value)
        digest.update(b"\n")
    return "cred:" + digest.hexdigest()
