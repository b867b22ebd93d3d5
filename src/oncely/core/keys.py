"""The `Idempotency-Key` header (SPEC §2): parsing and validation, no I/O."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

HEADER = "Idempotency-Key"
HEADER_LOWER = b"idempotency-key"
MAX_KEY_BYTES = 255


class KeyRule(StrEnum):
    """The rule a rejected key broke; it is named in the 400 problem body."""

    EMPTY = "empty"
    TOO_LONG = "too-long"
    NOT_VISIBLE_ASCII = "not-visible-ascii"
    MALFORMED_STRING = "malformed-string"
    CONFLICTING_HEADERS = "conflicting-headers"


_RULE_DETAIL = {
    KeyRule.EMPTY: "The Idempotency-Key header is empty; it needs 1 to 255 characters.",
    KeyRule.TOO_LONG: f"The Idempotency-Key is longer than {MAX_KEY_BYTES} bytes.",
    KeyRule.NOT_VISIBLE_ASCII: (
        "The Idempotency-Key may contain only visible ASCII characters (0x21-0x7E): "
        "no spaces, control characters or non-ASCII bytes."
    ),
    KeyRule.MALFORMED_STRING: (
        "The Idempotency-Key starts with a double quote but is not a valid "
        'structured-field string (RFC 8941: "...", escapes \\" and \\\\ only, no parameters).'
    ),
    KeyRule.CONFLICTING_HEADERS: "The request carries several Idempotency-Key headers that differ.",
}


@dataclass(frozen=True, slots=True)
class InvalidKey(Exception):
    """The header is present but unusable."""

    rule: KeyRule
    raw: bytes

    @property
    def detail(self) -> str:
        return _RULE_DETAIL[self.rule]

    def printable_key(self) -> str | None:
        """The raw value, only when it is safe to echo back (printable ASCII, bounded)."""
        try:
            text = self.raw.decode("ascii")
        except UnicodeDecodeError:
            return None
        if not text or len(text) > MAX_KEY_BYTES + 2 or not text.isprintable():
            return None
        return text


def _is_visible_ascii(text: str) -> bool:
    # isprintable() admits the space; the key rule does not.
    return text.isascii() and text.isprintable() and " " not in text


def _unquote_sf_string(raw: str) -> str | None:
    """RFC 8941 sf-string -> its value, or None when malformed."""
    if len(raw) < 2 or raw[-1] != '"':
        return None
    body = raw[1:-1]
    if "\\" not in body:
        return None if '"' in body else body
    out: list[str] = []
    escaped = False
    for char in body:
        if escaped:
            if char not in '"\\':
                return None
            out.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            return None
        else:
            out.append(char)
    return None if escaped else "".join(out)


# The forms nearly every client sends, recognised in one match: an sf-string without
# escapes, or a bare token, of visible ASCII. Anything else takes the full path below.
_PLAIN_KEY = re.compile(
    rb'"(?P<quoted>[\x21\x23-\x5b\x5d-\x7e]{1,%d})"|(?P<bare>(?!")[\x21-\x7e]{1,%d})'
    % (MAX_KEY_BYTES, MAX_KEY_BYTES)
)


def parse_key_value(raw: bytes) -> str:
    """One header value -> the key. Raises InvalidKey naming the broken rule."""
    plain = _PLAIN_KEY.fullmatch(raw)
    if plain is not None:
        return (plain.group("quoted") or plain.group("bare")).decode("ascii")
    text = raw.decode("latin-1").strip(" \t")
    if text.startswith('"'):
        unquoted = _unquote_sf_string(text)
        if unquoted is None:
            raise InvalidKey(KeyRule.MALFORMED_STRING, raw)
        text = unquoted
    if not text:
        raise InvalidKey(KeyRule.EMPTY, raw)
    if not _is_visible_ascii(text):
        raise InvalidKey(KeyRule.NOT_VISIBLE_ASCII, raw)
    if len(text) > MAX_KEY_BYTES:
        raise InvalidKey(KeyRule.TOO_LONG, raw)
    return text


_VISIBLE_ASCII = bytes(range(0x21, 0x7F))


def parse_key(values: Sequence[bytes]) -> str | None:
    """All values of the header on one request -> the key, or None when there is none.

    Several header lines are accepted only when they all mean the same key.
    """
    if not values:
        return None
    first = values[0]
    if len(values) == 1:
        # What nearly every client sends, a bare token of visible ASCII, in one C pass.
        if (
            0 < len(first) <= MAX_KEY_BYTES
            and first[0] != 0x22  # '"': an sf-string
            and not first.translate(None, _VISIBLE_ASCII)
        ):
            return first.decode("ascii")
        return parse_key_value(first)
    key = parse_key_value(first)
    for other in values[1:]:
        if parse_key_value(other) != key:
            raise InvalidKey(KeyRule.CONFLICTING_HEADERS, b", ".join(values))
    return key
