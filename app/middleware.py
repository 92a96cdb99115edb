"""ASGI middleware: request body limit, and per-route request metrics."""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import too_large


class BodyLimit:
    """Refuse bodies over ``limit`` bytes with 413, by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            scope["fusionserve.body_too_large"] = int(declared)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            if "fusionserve.body_too_large" in scope:
                raise too_large(
                    f"request body of {scope['fusionserve.body_too_large']} bytes is over the "
                    f"limit of {self.limit} bytes"
                )
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise too_large(f"request body is over the limit of {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


class RequestMetrics:
    """Count requests by method, route template and status; time them."""

    def __init__(self, app: ASGIApp, metrics: Any) -> None:
        self.app, self.metrics = app, metrics

    @staticmethod
    def route_of(scope: Scope) -> str:
        """The matched route's template (``/models/{name}/predict``), set in the scope by routing."""
        path = getattr(scope.get("route"), "path", None)
        return str(path) if path else "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 499  # unless a response starts: the client went away first

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        except Exception:
            status = 500
            raise
        finally:
            route = self.route_of(scope)
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.request_seconds.labels(route).observe(time.perf_counter() - started)
