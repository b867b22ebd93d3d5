from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oncely.core import fingerprint as fingerprint_module
from oncely.core.exchange import Guard, fingerprint_request, replayed_fingerprints
from oncely.core.fingerprint import (
    ReplayedFingerprints,
    RequestFacts,
    canonical_json,
    default_fingerprint,
    kept_fingerprint,
)
from oncely.core.policy import IdempotencyPolicy

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


# the fingerprints of replayed requests ------------------------------------------------


def _keep(replayed: Any, key: str, body: bytes = b'{"a":1}', **kw: Any) -> None:
    request: dict[str, Any] = {
        "scope": "anon", "method": "POST", "path": "/pay", "query": b"",
        "content_type": "application/json", "body": body, "fingerprint": f"fp-{key}",
    }  # fmt: skip
    request.update(kw)
    replayed.keep(key, **request)


def _found(replayed: Any, key: str, body: bytes = b'{"a":1}', **kw: Any) -> str | None:
    request: dict[str, Any] = {
        "scope": "anon", "method": "POST", "path": "/pay", "query": b"",
        "content_type": "application/json", "body": body,
    }  # fmt: skip
    request.update(kw)
    kept = replayed.by_key.get(key)
    return None if kept is None else kept_fingerprint(kept, **request)


def test_a_replayed_request_is_found_only_while_every_part_of_it_is_equal() -> None:
    replayed = ReplayedFingerprints()
    _keep(replayed, "k")
    assert _found(replayed, "k") == "fp-k"
    assert _found(replayed, "other") is None
    for different in (
        {"body": b'{"a": 1}'},  # canonically equal, but not byte-equal: fingerprinted again
        {"scope": "tenant-b"},
        {"method": "PUT"},
        {"path": "/refund"},
        {"query": b"x=1"},
        {"content_type": "text/plain"},
    ):
        assert _found(replayed, "k", **different) is None, different


def test_another_tenants_replay_with_the_same_key_replaces_the_kept_one() -> None:
    replayed = ReplayedFingerprints()
    _keep(replayed, "k", scope="tenant-a", fingerprint="a")
    _keep(replayed, "k", scope="tenant-b", fingerprint="b")
    assert len(replayed) == 1
    assert _found(replayed, "k", scope="tenant-a") is None
    assert _found(replayed, "k", scope="tenant-b") == "b"


def test_replayed_fingerprints_keep_to_their_count_and_byte_budgets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fingerprint_module, "REPLAYED_KEPT", 3)
    replayed = ReplayedFingerprints()
    for index in range(5):
        _keep(replayed, f"k{index}")
    assert list(replayed.by_key) == ["k2", "k3", "k4"]  # oldest first out

    monkeypatch.setattr(fingerprint_module, "REPLAYED_KEPT", 1000)
    monkeypatch.setattr(fingerprint_module, "REPLAYED_BYTES_KEPT", 64 * 100)
    replayed = ReplayedFingerprints()
    _keep(replayed, "too-large", body=b"x" * 101)  # over 1/64 of the budget: not kept
    assert len(replayed) == 0
    for index in range(100):
        _keep(replayed, f"k{index:02}", body=b"x" * 90)  # 90 + 3 + 4 = 97 bytes each
    assert len(replayed) == 65  # 65 * 97 = 6,305 <= 6,400
    assert "k99" in replayed.by_key
    assert "k34" not in replayed.by_key
    replayed.clear()
    assert len(replayed) == 0


def test_only_the_default_fingerprint_is_kept_for_replays() -> None:
    assert replayed_fingerprints(IdempotencyPolicy()) is not None
    assert replayed_fingerprints(IdempotencyPolicy(fingerprint=None)) is None
    assert replayed_fingerprints(IdempotencyPolicy(fingerprint=lambda facts: "x")) is None


def test_fingerprint_request_uses_a_kept_fingerprint_and_computes_the_rest() -> None:
    policy = IdempotencyPolicy()
    replayed = ReplayedFingerprints()
    guard = Guard("k", "anon", "application/json")
    body = b'{"amount": 5}'
    computed, fresh = fingerprint_request(policy, replayed, guard, "POST", "/pay", b"", body)
    assert fresh
    assert computed == default_fingerprint(facts(body, path="/pay"))
    replayed.keep("k", "anon", "POST", "/pay", b"", "application/json", body, "kept")
    assert fingerprint_request(policy, replayed, guard, "POST", "/pay", b"", body) == (
        "kept", False,
    )  # fmt: skip
    other = fingerprint_request(policy, replayed, guard, "POST", "/pay", b"", b'{"amount": 6}')
    assert other == (default_fingerprint(facts(b'{"amount": 6}', path="/pay")), True)
