from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oncely.core.records import (
    RecordFormatError,
    StoredResponse,
    decode_response,
    encode_response,
)

headers = st.lists(st.tuples(st.binary(max_size=40), st.binary(max_size=200)), max_size=12)


@given(st.integers(100, 599), headers, st.binary(max_size=5000), st.booleans())
def test_encoding_round_trips_exactly(
    status: int, header_list: list[tuple[bytes, bytes]], body: bytes, replayable: bool
) -> None:
    response = StoredResponse(status, tuple(header_list), body, replayable)
    assert decode_response(encode_response(response)) == response


def test_encoding_is_compact() -> None:
    response = StoredResponse(201, ((b"content-type", b"application/json"),), b'{"id":1}')
    assert len(encode_response(response)) == 6 + 6 + 12 + 16 + 8


def test_unknown_version_and_truncation_are_errors() -> None:
    blob = encode_response(StoredResponse(200, ((b"a", b"b"),), b"x"))
    with pytest.raises(RecordFormatError):
        decode_response(b"\x09" + blob[1:])
    with pytest.raises(RecordFormatError):
        decode_response(blob[:8])


def test_a_record_cut_inside_a_header_is_an_error_not_a_short_header() -> None:
    blob = encode_response(StoredResponse(200, ((b"content-type", b"application/json"),), b""))
    for cut in range(1, len(blob)):
        with pytest.raises(RecordFormatError):
            decode_response(blob[:cut])


def test_drivers_buffers_decode_like_bytes() -> None:
    response = StoredResponse(201, ((b"a", b"b"),), b"body", replayable=False)
    blob = encode_response(response)
    assert decode_response(memoryview(blob)) == response
    assert decode_response(bytearray(blob)) == response
