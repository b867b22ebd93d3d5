"""The request fingerprint (SPEC §3): what makes two requests with one key "the same"."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What a fingerprint function may look at."""

    method: str
    path: str
    query: bytes
    content_type: str | None
    body: bytes


FingerprintFunction = Callable[[RequestFacts], str]

NO_FINGERPRINT = ""  # compare the key alone


def is_json_content_type(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def canonical_json(body: bytes) -> bytes | None:
    """Key order and insignificant whitespace removed; None when the body is not JSON."""
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def default_fingerprint(request: RequestFacts) -> str:
    """Hash of method, path with query, and body (JSON canonicalised). One hash pass."""
    body = request.body
    if body and is_json_content_type(request.content_type):
        body = canonical_json(body) or body
    digest = hashlib.blake2b(digest_size=16)
    digest.update(request.method.encode("ascii", "replace"))
    digest.update(b" ")
    digest.update(request.path.encode("utf-8", "surrogateescape"))
    digest.update(b"?")
    digest.update(request.query)
    digest.update(b"\n")
    digest.update(body)
    return digest.hexdigest()
