from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oncely.core.keys import MAX_KEY_BYTES, InvalidKey, KeyRule, parse_key, parse_key_value

visible = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1)


def sf_string(value: str) -> bytes:
    return ('"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"').encode()


@given(visible.filter(lambda v: len(v) <= MAX_KEY_BYTES and not v.startswith('"')))
def test_bare_token_is_its_own_value(key: str) -> None:
    assert parse_key_value(key.encode()) == key


@given(visible.filter(lambda v: len(v) <= MAX_KEY_BYTES))
def test_sf_string_and_bare_token_mean_the_same_key(key: str) -> None:
    assert parse_key_value(sf_string(key)) == key
    if not key.startswith('"'):
        assert parse_key([sf_string(key), key.encode()]) == key


@pytest.mark.parametrize(
    ("raw", "rule"),
    [
        (b"", KeyRule.EMPTY),
        (b'""', KeyRule.EMPTY),
        (b"a" * 256, KeyRule.TOO_LONG),
        (b'"' + b"a" * 256 + b'"', KeyRule.TOO_LONG),
        (b"ab\x01c", KeyRule.NOT_VISIBLE_ASCII),
        (b"ab\tc", KeyRule.NOT_VISIBLE_ASCII),
        (b"ab c", KeyRule.NOT_VISIBLE_ASCII),
        ("caf\u00e9".encode(), KeyRule.NOT_VISIBLE_ASCII),
        (b"\x7f", KeyRule.NOT_VISIBLE_ASCII),
        (b'"a b"', KeyRule.NOT_VISIBLE_ASCII),
        (b'"abc', KeyRule.MALFORMED_STRING),
        (b'"a"b"', KeyRule.MALFORMED_STRING),
        (b'"a\\x"', KeyRule.MALFORMED_STRING),
        (b'"abc";p=1', KeyRule.MALFORMED_STRING),
        (b'"abc\\"', KeyRule.MALFORMED_STRING),
    ],
)
def test_invalid_keys_name_the_rule(raw: bytes, rule: KeyRule) -> None:
    with pytest.raises(InvalidKey) as caught:
        parse_key([raw])
    assert caught.value.rule is rule
    assert caught.value.detail


def test_exactly_255_bytes_is_valid() -> None:
    assert parse_key([b"k" * 255]) == "k" * 255


def test_escapes_are_unquoted() -> None:
    assert parse_key([b'"a\\"b\\\\c"']) == 'a"b\\c'


def test_absent_header_is_no_key() -> None:
    assert parse_key([]) is None


def test_disagreeing_header_lines_are_rejected() -> None:
    with pytest.raises(InvalidKey) as caught:
        parse_key([b"one", b"two"])
    assert caught.value.rule is KeyRule.CONFLICTING_HEADERS


def test_agreeing_header_lines_are_one_key() -> None:
    assert parse_key([b"one", b'"one"']) == "one"


def test_only_printable_keys_are_echoed() -> None:
    with pytest.raises(InvalidKey) as caught:
        parse_key([b"a" * 1000])
    assert caught.value.printable_key() is None  # too long to echo
    with pytest.raises(InvalidKey) as caught:
        parse_key([b"bad\x01"])
    assert caught.value.printable_key() is None
    with pytest.raises(InvalidKey) as caught:
        parse_key([b'"open'])
    assert caught.value.printable_key() == '"open'


@given(st.binary(max_size=300))
def test_any_bytes_either_parse_or_raise_invalid_key(raw: bytes) -> None:
    try:
        key = parse_key([raw])
    except InvalidKey:
        return
    assert key is not None
    assert 1 <= len(key) <= MAX_KEY_BYTES
    assert all(0x21 <= ord(c) <= 0x7E for c in key)


def _outcome(parse: Callable[[], str | None]) -> str | KeyRule | None:
    try:
        return parse()
    except InvalidKey as error:
        return error.rule


@given(
    st.one_of(
        st.binary(max_size=300),
        visible.map(str.encode),
        st.text(alphabet=st.characters(min_codepoint=0x1F, max_codepoint=0x80)).map(
            lambda text: text.encode("utf-8")
        ),
    )
)
def test_single_header_fast_path_agrees_with_the_full_parser(raw: bytes) -> None:
    assert _outcome(lambda: parse_key([raw])) == _outcome(lambda: parse_key_value(raw))
