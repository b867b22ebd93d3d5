"""The record model and its compact, versioned encoding (SPEC §3)."""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import NamedTuple

Headers = tuple[tuple[bytes, bytes], ...]


class RecordState(IntEnum):
    IN_FLIGHT = 0
    COMPLETED = 1


class StoredResponse(NamedTuple):
    """What a replay sends back. `replayable` is False when the body was over the size limit."""

    status: int
    headers: Headers
    body: bytes
    replayable: bool = True


class Record(NamedTuple):
    """One (scope, key). Times are the store's clock, in seconds since the epoch."""

    scope: str
    key: str
    fingerprint: str
    state: RecordState
    token: str | None
    attempts: int
    created_at: float
    expires_at: float
    lease_expires_at: float | None
    response: StoredResponse | None = None


# Encoding v1: version, flags, status, header count; then per header u16 name length,
# u32 value length, name, value; then the body. Little overhead, no parsing ambiguity.
_V1 = 1
_FLAG_NOT_REPLAYABLE = 1
_HEAD = struct.Struct("<BBHH")
_HEADER = struct.Struct("<HI")


class RecordFormatError(ValueError):
    """A stored response blob that this version cannot read."""


def encode_response(response: StoredResponse) -> bytes:
    flags = 0 if response.replayable else _FLAG_NOT_REPLAYABLE
    headers = response.headers
    parts = [_HEAD.pack(_V1, flags, response.status, len(headers))]
    for name, value in headers:
        parts += (_HEADER.pack(len(name), len(value)), name, value)
    parts.append(response.body)
    return b"".join(parts)


def decode_response(blob: bytes | bytearray | memoryview) -> StoredResponse:
    if type(blob) is not bytes:  # a driver's memoryview or bytearray
        blob = bytes(blob)
    try:
        version, flags, status, count = _HEAD.unpack_from(blob, 0)
        if version != _V1:
            raise RecordFormatError(f"unknown record encoding version {version}")
        offset = _HEAD.size
        headers: list[tuple[bytes, bytes]] = []
        for _ in range(count):
            name_len, value_len = _HEADER.unpack_from(blob, offset)
            offset += _HEADER.size
            name = blob[offset : offset + name_len]
            offset += name_len
            value = blob[offset : offset + value_len]
            offset += value_len
            headers.append((name, value))
    except struct.error as exc:
        raise RecordFormatError("truncated response record") from exc
    if offset > len(blob):  # a header ran past the end: slices do not raise
        raise RecordFormatError("truncated response record")
    return StoredResponse(status, tuple(headers), blob[offset:], not flags & _FLAG_NOT_REPLAYABLE)
