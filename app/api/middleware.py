"""ASGI middleware: request body limit, compressed request bodies, and per-route request metrics."""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.budget import MemoryBudget
from app.errors import BadInput, Overloaded, TooLarge, UnsupportedMedia


def header(scope: Scope, name: bytes) -> bytes:
    """One request header's value (b"" when absent): a scan, not a dict of every header, on every request."""
    return next((v for k, v in scope.get("headers", ()) if k == name), b"")


def is_timeline(path: str) -> bool:
    """Whether ``path`` is a timeline route: ``/timeline`` or ``/models/{name}/timeline``."""
    parts = path.split("/")
    return parts[-1] == "timeline" and (len(parts) == 2 or (len(parts) == 4 and parts[1] == "models"))


@dataclass(frozen=True)
class BodyLimits:
    """The most bytes a request body may hold: ``upload`` (MAX_UPLOAD_MB), ``json`` (MAX_JSON_MB) for
    JSON, which parsing multiplies in memory, and ``video`` for the timeline routes, which take long
    videos (MAX_VIDEO_MB)."""

    upload: int
    json: int
    video: int

    def of(self, scope: Scope) -> int:
        kind = header(scope, b"content-type").split(b";", 1)[0].strip().lower()
        if kind == b"application/json":
            return self.json
        if is_timeline(scope.get("path", "")):
            return self.video
        return self.upload


class BodyLimit:
    """Refuse bodies over their limit with 413, by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, limits: BodyLimits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.of(scope)
        declared = header(scope, b"content-length")
        if declared.isdigit() and int(declared) > limit:
            scope["fusionserve.body_too_large"] = int(declared)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            if "fusionserve.body_too_large" in scope:
                raise TooLarge(
                    f"request body of {scope['fusionserve.body_too_large']} bytes is over the limit of {limit} bytes"
                )
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise TooLarge(f"request body is over the limit of {limit} bytes")
            return message

        await self.app(scope, limited, send)


class BodyDecoding:
    """Inflate request bodies sent with ``Content-Encoding: gzip`` or ``deflate`` (as Triton's clients
    send them with ``request_compression_algorithm``), as they stream in, to at most their limit
    (413 past it: a small compressed body can inflate to gigabytes); a body that does not inflate
    gets 400, and another encoding 415. Behind ``BodyLimit``, which counts the bytes on the wire."""

    ENCODINGS = ("gzip", "x-gzip", "deflate")

    def __init__(self, app: ASGIApp, limits: BodyLimits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        encoding = header(scope, b"content-encoding").decode("latin-1").lower().replace(" ", "")
        codings = [c for c in encoding.split(",") if c not in ("", "identity")]
        if not codings:
            await self.app(scope, receive, send)
            return
        # the app sees the inflated body: no encoding, and no length (the wire's no longer applies)
        scope = {
            **scope,
            "headers": [(k, v) for k, v in scope["headers"] if k not in (b"content-encoding", b"content-length")],
        }
        inflate = zlib.decompressobj(wbits=47)  # 32 + 15: a gzip or a zlib header, told apart by its bytes
        inflated, limit = 0, self.limits.of(scope)

        async def decoded() -> Message:
            nonlocal inflated
            if len(codings) > 1 or codings[0] not in self.ENCODINGS:
                raise UnsupportedMedia(
                    f"Content-Encoding {', '.join(codings)!r} is not supported; send gzip, deflate or none"
                )
            message = await receive()
            if message["type"] != "http.request":
                return message
            try:
                body = inflate.decompress(message.get("body", b""), limit - inflated + 1)
                if not message.get("more_body", False) and len(body) + inflated <= limit:
                    body += inflate.flush()
            except zlib.error as exc:
                raise BadInput(f"the {codings[0]} request body does not inflate ({exc})") from exc
            inflated += len(body)
            if inflated > limit or inflate.unconsumed_tail:
                raise TooLarge(f"the request body inflates to more than the limit of {limit} bytes")
            if not message.get("more_body", False) and not inflate.eof:
                raise BadInput(f"the {codings[0]} request body is truncated")
            return {**message, "body": body}

        await self.app(scope, decoded, send)


class Inflight:
    """Reserve each request body's bytes against the server's ``MemoryBudget`` until its answer is
    sent: the declared length before any of it is read, else (chunked or inflated bodies) as it
    arrives. A body that does not fit gets 503 (``Overloaded``, with Retry-After) at its first read.
    JSON counts ``json_factor`` times: parsed, it takes up to that much more memory."""

    def __init__(self, app: ASGIApp, budget: MemoryBudget, json_factor: int = 25) -> None:
        self.app, self.budget, self.json_factor = app, budget, json_factor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        kind = header(scope, b"content-type").split(b";", 1)[0].strip().lower()
        factor = self.json_factor if kind == b"application/json" else 1
        declared = header(scope, b"content-length")
        held, refused, counted = 0, False, declared.isdigit()
        if counted:
            cost = int(declared) * factor
            refused = not self.budget.reserve(cost)
            held = 0 if refused else cost

        async def reserved() -> Message:
            nonlocal held
            if refused:
                raise Overloaded(
                    f"the server holds {self.budget.used >> 20} MB of requests in flight; this one does not fit"
                )
            message = await receive()
            if not counted and message["type"] == "http.request":
                size = len(message.get("body", b"")) * factor
                if not self.budget.reserve(size):
                    raise Overloaded(f"the server holds {self.budget.used >> 20} MB of requests in flight")
                held += size
            return message

        try:
            await self.app(scope, reserved, send)
        finally:
            self.budget.release(held)


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
