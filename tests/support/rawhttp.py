"""Send bytes no well-behaved client would (bad header values) and read the answer."""

from __future__ import annotations

import socket


def raw_request(port: int, request: bytes, timeout: float = 10.0) -> tuple[int, bytes, bytes]:
    """One request on a fresh connection; returns (status, head, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    data = b"".join(chunks)
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, head, body


def post_with_key(port: int, key: bytes, path: str = "/effects", body: bytes = b"{}") -> bytes:
    return (
        (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        ).encode()
        + b"Idempotency-Key: "
        + key
        + b"\r\n\r\n"
        + body
    )
