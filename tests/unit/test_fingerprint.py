from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from oncely.core.fingerprint import RequestFacts, canonical_json, default_fingerprint

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)


def facts(body: bytes, content_type: str | None = "application/json", **kw: Any) -> RequestFacts:
    base: dict[str, Any] = {"method": "POST", "path": "/v1/transfers", "query": b""}
    base.update(kw)
    return RequestFacts(content_type=content_type, body=body, **base)


@given(st.dictionaries(st.text(max_size=6), json_values, max_size=6), st.randoms())
def test_key_order_and_whitespace_do_not_change_the_fingerprint(
    value: dict[str, Any], rng: Any
) -> None:
    items = list(value.items())
    rng.shuffle(items)
    compact = json.dumps(value, separators=(",", ":")).encode()
    spaced = json.dumps(dict(items), indent=rng.choice([None, 1, 4])).encode()
    assert canonical_json(compact) == canonical_json(spaced)
    assert default_fingerprint(facts(compact)) == default_fingerprint(facts(spaced))


@given(json_values, json_values)
def test_different_json_values_differ(a: Any, b: Any) -> None:
    if a == b or (isinstance(a, bool) != isinstance(b, bool)):
        return
    assert default_fingerprint(facts(json.dumps(a).encode())) != default_fingerprint(
        facts(json.dumps(b).encode())
    )


def test_method_path_query_and_body_all_count() -> None:
    base = default_fingerprint(facts(b'{"a":1}'))
    assert default_fingerprint(facts(b'{"a":1}', method="PUT")) != base
    assert default_fingerprint(facts(b'{"a":1}', path="/v1/payments")) != base
    assert default_fingerprint(facts(b'{"a":1}', query=b"x=1")) != base
    assert default_fingerprint(facts(b'{"a":2}')) != base


def test_non_json_bodies_are_compared_raw() -> None:
    text = facts(b"a=1&b=2", "application/x-www-form-urlencoded")
    spaced = facts(b"a=1&b=2 ", "application/x-www-form-urlencoded")
    assert default_fingerprint(text) != default_fingerprint(spaced)


def test_invalid_json_falls_back_to_raw_bytes() -> None:
    assert canonical_json(b"{not json") is None
    assert default_fingerprint(facts(b"{not json")) != default_fingerprint(facts(b"{not json "))


def test_json_suffix_media_types_are_canonicalised() -> None:
    a = facts(b'{"b":1,"a":2}', "application/merge-patch+json; charset=utf-8")
    b = facts(b'{"a":2, "b":1}', "application/merge-patch+json")
    assert default_fingerprint(a) == default_fingerprint(b)


def test_lone_surrogate_escapes_are_canonicalised_not_a_crash() -> None:
    # "\ud800" is valid JSON text whose string is not encodable as UTF-8.
    a = facts(b'{"b":"\\ud800","a":1}')
    b = facts(b'{"a":1, "b":"\\ud800"}')
    assert default_fingerprint(a) == default_fingerprint(b)
    assert default_fingerprint(a) != default_fingerprint(facts(b'{"a":1,"b":"\\ud801"}'))


def test_json_in_other_unicode_encodings_is_canonicalised() -> None:
    # json.loads reads a UTF-8 BOM, UTF-16 and UTF-32: so do fingerprints.
    utf16 = '{"b":1,"a":2}'.encode("utf-16")
    assert canonical_json(utf16) == b'{"a":2,"b":1}'
    assert canonical_json(b'\xef\xbb\xbf{"a":1}') == b'{"a":1}'


def test_fingerprints_are_stable_across_versions() -> None:
    # Records outlive deployments: a retry after an upgrade must still match.
    body = b'{"amount": 1250, "currency": "NZD", "meta": {"z": [1, 2.5, null], "a": "\xc3\xa9"}}'
    request = RequestFacts("POST", "/v1/payments", b"x=1", "application/json", body)
    assert default_fingerprint(request) == "c346ef68902d6b5adfd60250efc60ee7"
