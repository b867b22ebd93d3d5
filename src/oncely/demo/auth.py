"""Bearer auth for the demo: any non-empty token is accepted and is its own workspace.

`BearerAuth` is a pure ASGI middleware that sits *outside* oncely's middleware, so a
request without a token is answered 401 before oncely sees it: it never claims an
`Idempotency-Key`, and a retry with a token runs normally.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from oncely.core.tenancy import DEFAULT_CREDENTIAL_HEADERS, scope_from_credentials
from oncely.demo.problems import PROBLEM_CONTENT_TYPE, problem_bytes, problem_document

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROTECTED_PREFIX = "/v1/"
REALM = "oncely-demo"


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The token of `Authorization: Bearer <token>` (scheme case-insensitive), or None."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            token = token.strip()
            return token if scheme.lower() == b"bearer" and token else None
    return None


def workspace_scope(token: bytes) -> str:
    """The workspace of a token, which is also oncely's scope for its requests.

    oncely's default tenant is a hash of the credential headers; for a request whose only
    credential is `Authorization: Bearer <token>` that is this value. Raw tokens are never
    stored, in the demo's tables or in oncely's records.
    """
    header = (b"authorization", b"Bearer " + token)
    return scope_from_credentials([header], DEFAULT_CREDENTIAL_HEADERS)


def _unauthorized_body() -> bytes:
    return problem_bytes(
        problem_document(
            "unauthorized",
            "Missing bearer token",
            401,
            "Send 'Authorization: Bearer <token>'. In the demo any non-empty token is "
            "accepted and names its own workspace: sk_test_... and sk_live_... never share "
            "accounts or Idempotency-Keys.",
        )
    )


UNAUTHORIZED_BODY = _unauthorized_body()


class BearerAuth:
    """401 for requests under `prefix` without a bearer token; everything else passes."""

    def __init__(self, app: ASGIApp, *, prefix: str = PROTECTED_PREFIX) -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not scope["path"].startswith(self.prefix)
            or bearer_token(scope["headers"]) is not None
        ):
            await self.app(scope, receive, send)
            return
        headers = [
            (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
            (b"content-length", str(len(UNAUTHORIZED_BODY)).encode()),
            (b"www-authenticate", f'Bearer realm="{REALM}"'.encode()),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": UNAUTHORIZED_BODY})
