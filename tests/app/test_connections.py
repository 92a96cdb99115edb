"""A connection's guard on its own (app.api.connections): its clocks, counts and refusals.
tests/e2e/test_hostile.py holds real sockets to the same limits."""

from __future__ import annotations

import time
from typing import Any

from app.api.connections import BODY_GRACE_S, ConnectionLimits, Guard

LIMITS = ConnectionLimits(
    max_connections=10, max_header_bytes=100, header_timeout_s=1.0, body_timeout_s=30.0, body_min_rate=1000.0
)


class FakeProtocol:
    def __init__(self) -> None:
        self.refused: list[tuple[int, str]] = []
        self.loop = self

    def call_later(self, delay: float, fn: Any) -> Any:
        return type("Handle", (), {"cancel": lambda self: None})()

    def refuse(self, status: int, why: str) -> None:
        self.refused.append((status, why))


def test_a_head_counts_only_while_it_is_incomplete() -> None:
    guard = Guard(FakeProtocol(), LIMITS)
    assert guard.received(60, "headers") and not guard.received(60, "headers")  # 120 bytes of head: over 100
    guard = Guard(FakeProtocol(), LIMITS)
    assert guard.received(60, "body") and guard.received(10_000, "body")  # the head ended: the body never counts


def test_a_head_or_body_past_its_time_or_under_its_rate_is_refused() -> None:
    protocol = FakeProtocol()
    guard = Guard(protocol, LIMITS)
    guard.since -= 0.5
    guard.tick()
    assert protocol.refused == []  # half a second into the head: fine
    guard.since -= 1.0
    guard.tick()
    assert protocol.refused[-1][0] == 408 and "headers" in protocol.refused[-1][1]
    for sent, elapsed, refused in ((3000, BODY_GRACE_S - 1, False), (9000, BODY_GRACE_S + 1, False),
                                   (2000, BODY_GRACE_S + 1, True), (10**9, 31.0, True)):  # fmt: skip
        protocol = FakeProtocol()
        guard = Guard(protocol, LIMITS)
        guard.enter("body")
        guard.bytes, guard.since = sent, time.monotonic() - elapsed
        guard.tick()
        assert bool(protocol.refused) is refused, (sent, elapsed)
