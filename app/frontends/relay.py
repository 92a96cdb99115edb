"""A front end's metrics, counted in the engine's registry.

A front end counts what it does (requests by route and status, their latency, decode time) as the
one-process server does, through the same metric names; here each observation is sent on to the
engine, which records it in its own registry, so ``/metrics`` (served by the engine) shows every
process's work in one place. Observations leave once per turn of the event loop, in one message.
"""

from __future__ import annotations

import asyncio
from typing import Any

from app.frontends.link import EngineLink

RELAYED = ("requests", "request_seconds", "decode_seconds")  # the metrics a front end observes


class _Child:
    def __init__(self, relay: RelayedMetrics, name: str, labels: tuple[str, ...]) -> None:
        self.relay, self.name, self.labels = relay, name, labels

    def inc(self, amount: float = 1.0) -> None:
        self.relay.add([self.name, list(self.labels), amount])

    def observe(self, value: float) -> None:
        self.relay.add([self.name, list(self.labels), value])


class _Metric:
    def __init__(self, relay: RelayedMetrics, name: str) -> None:
        self.relay, self.name = relay, name

    def labels(self, *values: str) -> _Child:
        return _Child(self.relay, self.name, values)


class RelayedMetrics:
    """The metrics a front end's middleware and routes observe, relayed to the engine."""

    def __init__(self, frontend: int) -> None:
        self.frontend = str(frontend)
        self.link: EngineLink | None = None  # set once the front end has connected (its lifespan)
        self.requests, self.request_seconds, self.decode_seconds = (_Metric(self, name) for name in RELAYED)
        self._pending: list[list[Any]] = []

    def add(self, item: list[Any]) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending.append(item)

    def flush(self) -> None:
        items, self._pending = self._pending, []
        if items and self.link is not None and not self.link.writer.is_closing():
            self.link.send({"op": "observe", "frontend": self.frontend, "items": items})

    async def sync(self) -> None:
        """Send what is pending, and return once the engine has counted it."""
        self.flush()
        if self.link is not None:
            await self.link.sync()
