"""The request fingerprint (SPEC §3): what makes two requests with one key "the same"."""

from __future__ import annotations

import hashlib
import json
import json.encoder
import json.scanner
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from oncely.core.cache import BoundedCache


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


_json_media_cache: dict[str, bool] = {}


def is_json_content_type(content_type: str | None) -> bool:
    if not content_type:
        return False
    known = _json_media_cache.get(content_type)
    if known is not None:
        return known
    media = content_type.split(";", 1)[0].strip().lower()
    is_json = media == "application/json" or media.endswith("+json")
    if len(_json_media_cache) < 256:  # bounded: the header comes from the client
        _json_media_cache[content_type] = is_json
    return is_json


def _json_codec() -> tuple[Callable[[str, int], tuple[object, int]], Callable[[object], str]]:
    """The C scanner and a canonical encoder, made once: `json.loads`/`json.dumps` with
    arguments build new ones (and run three Python layers) on every call."""
    fallback = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # The C scanner and encoder of the _json accelerator (typeshed does not describe them).
    make_scanner: Any = json.scanner.make_scanner
    scan_once: Callable[[str, int], tuple[object, int]] = make_scanner(json.JSONDecoder())
    make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
    if make_encoder is None:  # an interpreter without the C accelerator
        return scan_once, fallback.encode

    def refuse(value: object) -> object:
        raise TypeError(f"{type(value).__name__} is not JSON")  # unreachable for parsed JSON

    # markers=None: parsed JSON cannot be circular. allow_nan: json accepts NaN on input.
    encode_chunks = make_encoder(
        None, refuse, json.encoder.encode_basestring, None, ":", ",", True, False, True
    )

    def encode(value: object) -> str:
        return "".join(encode_chunks(value, 0))

    return scan_once, encode


_scan_once, _encode_canonical = _json_codec()
_JSON_WHITESPACE = " \t\n\r"  # RFC 8259 whitespace around the value


def canonical_json(body: bytes) -> bytes | None:
    """Key order and insignificant whitespace removed; None when the body is not JSON."""
    try:
        text = body.decode().strip(_JSON_WHITESPACE)  # UTF-8, the common case
        value, end = _scan_once(text, 0)
        if end != len(text):
            raise ValueError("extra data after the JSON value")
    except (UnicodeDecodeError, ValueError, StopIteration, RecursionError):
        try:  # what json.loads also reads: a BOM, UTF-16, UTF-32
            value = json.loads(body)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return None
    # surrogatepass: "\ud800" is valid JSON, but its lone surrogate is not UTF-8.
    return _encode_canonical(value).encode("utf-8", "surrogatepass")


def default_fingerprint(request: RequestFacts) -> str:
    """Hash of method, path with query, and body (JSON canonicalised). One hash pass."""
    return request_fingerprint(
        request.method, request.path, request.query, request.content_type, request.body
    )


_EMPTY_DIGEST = hashlib.blake2b(digest_size=16)
# "METHOD path?" as bytes, per (method, path): bounded, since paths with ids are unbounded.
_request_lines: dict[tuple[str, str], bytes] = {}


def request_fingerprint(
    method: str, path: str, query: bytes, content_type: str | None, body: bytes
) -> str:
    """`default_fingerprint` without building `RequestFacts` (the adapters' hot path)."""
    if body and is_json_content_type(content_type):
        body = canonical_json(body) or body
    line = _request_lines.get((method, path))
    if line is None:
        line = b"%s %s?" % (
            method.encode("ascii", "replace"),
            path.encode("utf-8", "surrogateescape"),
        )
        if len(_request_lines) < 4096:
            _request_lines[(method, path)] = line
    digest = _EMPTY_DIGEST.copy()  # cheaper than a new blake2b(digest_size=16)
    digest.update(b"".join((line, query, b"\n", body)))
    return digest.hexdigest()


REPLAYED_KEPT = 4096  # requests whose fingerprints are kept after a replay
REPLAYED_BYTES_KEPT = 4 * 1024 * 1024  # and at most this many bytes of their bodies

# (scope, body, path, method, query, content type, fingerprint), by key
ReplayedRequest = tuple[str, bytes, str, str, bytes, "str | None", str]


class ReplayedFingerprints(BoundedCache[str, ReplayedRequest]):
    """The default fingerprints of requests that were replayed, by key, so that a client
    sending one request again and again (a retry loop, the storm after an outage) is not
    canonicalised and hashed again each time.

    A fingerprint is a function of method, path, query, content type and body, so a kept
    one is right for as long as these (and the scope) equal the kept ones; any other
    request is fingerprinted as usual. Only replays fill it, so a fresh request pays one
    dict miss (`oncely.core.exchange.fingerprint_request` looks it up). Oldest first
    out, within a count and a byte budget.
    """

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(REPLAYED_KEPT, REPLAYED_BYTES_KEPT)

    def keep(
        self, key: str, scope: str, method: str, path: str, query: bytes,
        content_type: str | None, body: bytes, fingerprint: str,
    ) -> None:  # fmt: skip
        """Replaces another tenant's request with this key, if one is kept."""
        self.put(
            key,
            (scope, body, path, method, query, content_type, fingerprint),
            len(key) + len(body) + len(path) + len(query),
        )


def kept_fingerprint(
    kept: ReplayedRequest, scope: str, method: str, path: str, query: bytes,
    content_type: str | None, body: bytes,
) -> str | None:  # fmt: skip
    """The kept fingerprint if this request is the kept one, else None."""
    if (
        kept[1] == body
        and kept[0] == scope
        and kept[2] == path
        and kept[3] == method
        and kept[4] == query
        and kept[5] == content_type
    ):
        return kept[6]
    return None
