from __future__ import annotations

from oncely.core.exchange import Guard, PassThrough, Reject, ResponseCapture, admit
from oncely.core.policy import IdempotencyPolicy, RouteOptions
from oncely.core.tenancy import ANONYMOUS_SCOPE

KEY = [(b"idempotency-key", b"k-1")]


def test_get_head_options_pass_through_even_with_a_key() -> None:
    policy = IdempotencyPolicy(require_key=True)
    for method in ("GET", "HEAD", "OPTIONS"):
        assert isinstance(admit(policy, method, "/x", KEY), PassThrough)


def test_missing_key_passes_unless_required() -> None:
    assert isinstance(admit(IdempotencyPolicy(), "POST", "/x", []), PassThrough)
    rejected = admit(IdempotencyPolicy(require_key=frozenset({"POST"})), "POST", "/x", [])
    assert isinstance(rejected, Reject)
    assert rejected.problem.status == 400
    assert rejected.problem.extensions["header"] == "Idempotency-Key"
    assert isinstance(
        admit(IdempotencyPolicy(require_key=frozenset({"POST"})), "PUT", "/x", []), PassThrough
    )


def test_path_patterns_opt_routes_in_and_out() -> None:
    policy = IdempotencyPolicy().replace(
        include_paths=["/v1/*"], exclude_paths=["/v1/webhooks*"], required_paths=["/v1/pay*"]
    )
    assert isinstance(admit(policy, "POST", "/v2/x", KEY), PassThrough)
    assert isinstance(admit(policy, "POST", "/v1/webhooks/in", KEY), PassThrough)
    assert isinstance(admit(policy, "POST", "/v1/transfers", KEY), Guard)
    assert isinstance(admit(policy, "POST", "/v1/payments", []), Reject)
    assert isinstance(admit(policy, "POST", "/v1/transfers", []), PassThrough)


def test_route_marker_overrides_patterns() -> None:
    policy = IdempotencyPolicy()
    assert isinstance(admit(policy, "POST", "/x", [], route=RouteOptions(require_key=True)), Reject)
    assert isinstance(
        admit(policy, "POST", "/x", KEY, route=RouteOptions(enabled=False)), PassThrough
    )


def test_credentials_are_hashed_into_separate_scopes() -> None:
    policy = IdempotencyPolicy()
    a = admit(policy, "POST", "/x", [*KEY, (b"authorization", b"Bearer sk_test_1")])
    b = admit(policy, "POST", "/x", [*KEY, (b"authorization", b"Bearer sk_live_1")])
    c = admit(policy, "POST", "/x", [*KEY, (b"x-api-key", b"sk_test_1")])
    anonymous = admit(policy, "POST", "/x", KEY)
    assert isinstance(a, Guard)
    assert isinstance(b, Guard)
    assert isinstance(c, Guard)
    assert isinstance(anonymous, Guard)
    assert len({a.scope, b.scope, c.scope, anonymous.scope}) == 4
    assert "sk_test_1" not in a.scope
    assert anonymous.scope == ANONYMOUS_SCOPE


def test_app_scope_and_resolver_override_credentials() -> None:
    policy = IdempotencyPolicy(scope_resolver=lambda env: env.get("user"))
    guard = admit(policy, "POST", "/x", KEY, environment={"user": "u1"})
    assert isinstance(guard, Guard)
    assert guard.scope == "app:u1"
    direct = admit(policy, "POST", "/x", KEY, environment={"user": "u1"}, app_scope="w9")
    assert isinstance(direct, Guard)
    assert direct.scope == "app:w9"


def test_presets_reproduce_known_apis() -> None:
    assert IdempotencyPolicy.ietf().mismatch_status == 422
    assert IdempotencyPolicy.aleta().mismatch_status == 409
    assert IdempotencyPolicy.stripe().methods == frozenset({"POST"})
    assert IdempotencyPolicy.apiture().fingerprint is None
    assert IdempotencyPolicy.posta().methods == frozenset({"POST", "PUT", "DELETE"})
    akahu = IdempotencyPolicy.akahu()
    assert isinstance(admit(akahu, "POST", "/payments", KEY), Guard)
    assert isinstance(admit(akahu, "POST", "/accounts", KEY), PassThrough)
    assert IdempotencyPolicy.stripe(retention=60).retention == 60


def test_header_lists() -> None:
    policy = IdempotencyPolicy()
    assert not policy.keeps_header(b"Set-Cookie")
    assert not policy.keeps_header(b"transfer-encoding")
    assert policy.keeps_header(b"content-type")
    only = policy.replace(allowed_headers=["Content-Type"])
    assert only.keeps_header(b"content-type")
    assert not only.keeps_header(b"x-other")


def test_response_capture_keeps_the_header_rules_on_every_response() -> None:
    """The capture skips the per-header check for names already known to be kept; a
    denied or new name, in any case, and a pair given as a list still take the rules."""
    policy = IdempotencyPolicy()
    for _ in range(2):  # the second round finds every name already decided
        capture = ResponseCapture(policy)
        capture.start(
            201,
            [
                (b"content-type", b"application/json"),
                [b"x-id", b"7"],  # type: ignore[list-item]
                (b"Set-Cookie", b"s=1"),
                (b"set-cookie", b"t=2"),
                (b"connection", b"close"),
            ],
        )
        assert capture.headers == ((b"content-type", b"application/json"), (b"x-id", b"7"))
        assert all(type(header) is tuple for header in capture.headers)


def test_keyword_options_cover_every_policy_field() -> None:
    import dataclasses

    from oncely.core.policy import PolicyOptions

    fields = {f.name for f in dataclasses.fields(IdempotencyPolicy) if f.init}
    assert set(PolicyOptions.__annotations__) == fields
