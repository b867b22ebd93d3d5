"""Concurrent same-key load against a running server, for concurrency tests."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class Round:
    key: str
    statuses: list[int]
    bodies: list[bytes]
    replayed: list[bool]


@dataclass
class LoadResult:
    rounds: list[Round] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def status_counts(self) -> Counter[int]:
        return Counter(status for r in self.rounds for status in r.statuses)


async def _same_key_rounds(
    url: str,
    rounds: int,
    concurrency: int,
    headers: Mapping[str, str],
    deadline_seconds: float,
) -> LoadResult:
    result = LoadResult()
    # A new connection per request, so the requests of a round spread over the workers.
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    deadline = time.monotonic() + deadline_seconds
    async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:
        for index in range(rounds):
            if time.monotonic() > deadline:
                result.errors.append(f"deadline reached after {index} rounds")
                break
            key = f"round-{index}-{uuid.uuid4().hex}"
            payload = json.dumps({"round": index}).encode()

            async def one(key: str = key, payload: bytes = payload) -> httpx.Response:
                return await client.post(
                    url,
                    content=payload,
                    headers={
                        "idempotency-key": key,
                        "content-type": "application/json",
                        **headers,
                    },
                )

            responses = await asyncio.gather(
                *(one() for _ in range(concurrency)), return_exceptions=True
            )
            statuses, bodies, replayed = [], [], []
            for response in responses:
                if isinstance(response, BaseException):
                    result.errors.append(repr(response))
                    continue
                statuses.append(response.status_code)
                bodies.append(response.content)
                replayed.append(response.headers.get("idempotent-replayed") == "true")
            result.rounds.append(Round(key, statuses, bodies, replayed))
    return result


def same_key_rounds(
    url: str,
    *,
    rounds: int,
    concurrency: int,
    headers: Mapping[str, str] | None = None,
    deadline_seconds: float = 240.0,
) -> LoadResult:
    """`rounds` times, `concurrency` simultaneous POSTs that share one fresh key."""
    return asyncio.run(
        _same_key_rounds(url, rounds, concurrency, dict(headers or {}), deadline_seconds)
    )


def read_effects(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def executions_per_key(path: Path) -> Counter[str]:
    return Counter(effect["key"] for effect in read_effects(path))


def assert_once_per_round(
    result: LoadResult, effects_path: Path, rounds: int, context: str = ""
) -> Counter[str]:
    """The concurrency bar of SPEC §3: every round completed, the load reached several
    workers, each round's key ran the handler exactly once, and every 201 of a round
    is the same response. Returns the executions per key for further checks."""
    assert not result.errors, (result.errors[:3], context)
    assert len(result.rounds) == rounds
    executions = executions_per_key(effects_path)
    round_keys = {round_.key for round_ in result.rounds}
    pids = {effect["pid"] for effect in read_effects(effects_path) if effect["key"] in round_keys}
    assert len(pids) > 1, "the load should have reached several workers"
    for round_ in result.rounds:
        assert executions[round_.key] == 1, round_
        assert set(round_.statuses) <= {201, 409}, round_.statuses
        successful = {
            body
            for status, body in zip(round_.statuses, round_.bodies, strict=True)
            if status == 201
        }
        assert len(successful) == 1, "every 201 in a round is the same response"
    assert sum(executions[key] for key in round_keys) == rounds
    return executions
