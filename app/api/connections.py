"""Connections held to limits before any request reaches the app: how many may be open, how large
and how slow a request's headers may be, and how slow its body.

uvicorn bounds none of these with its default parser (httptools has no header limit, and a slow or
silent client keeps its connection open), so fusionserve runs uvicorn's own HTTP protocols with a
guard added (``guarded``): a connection past ``MAX_CONNECTIONS`` gets 503 and is closed at once;
headers past ``MAX_HEADER_KB`` get 431, headers not complete within ``HEADER_TIMEOUT_S`` of the
connection opening (or of their first byte) get 408; a body that takes longer than
``BODY_TIMEOUT_S``, or that arrives slower than ``BODY_MIN_KBPS`` after its first seconds, gets
408. Each answer closes the connection. Idle keep-alive connections close after ``KEEP_ALIVE_S``
(uvicorn's own timer).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

log = logging.getLogger(__name__)

BODY_GRACE_S = 5.0  # a body's first seconds, before its rate counts (a connection's slow start)
TICK_S = 0.25  # how often a guard looks at its connection's clocks

REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    body_min_rate: float  # bytes per second


class Guard:
    """One connection's clocks and counts. Its phase: ``headers`` (a request's headers are due: a new
    connection, or some of a request's bytes have arrived), ``body`` (its body is due), or ``idle``
    (the app has the request, or the connection waits between requests under uvicorn's keep-alive)."""

    def __init__(self, protocol: Any, limits: ConnectionLimits) -> None:
        self.protocol, self.limits = protocol, limits
        self.phase, self.since, self.bytes = "headers", time.monotonic(), 0
        self.timer: asyncio.TimerHandle | None = protocol.loop.call_later(TICK_S, self.tick)

    def enter(self, phase: str) -> None:
        if phase != self.phase:
            self.phase, self.since, self.bytes = phase, time.monotonic(), 0
            if phase != "idle" and self.timer is None:  # the clocks run only while a head or body is due
                self.timer = self.protocol.loop.call_later(TICK_S, self.tick)

    def received(self, size: int, phase: str) -> bool:
        """``size`` bytes were parsed and left the connection in ``phase``; False once a request's head
        is over its limit (counted only while it is incomplete, so its body never counts; one read can
        overshoot the limit by at most its own size)."""
        if phase == self.phase:
            self.bytes += size
        else:
            self.enter(phase)
        return self.phase != "headers" or self.bytes <= self.limits.max_header_bytes

    def tick(self) -> None:
        self.timer = None
        if self.phase == "idle":
            return
        elapsed, limits = time.monotonic() - self.since, self.limits
        if self.phase == "headers" and elapsed > limits.header_timeout_s:
            self.protocol.refuse(408, f"request headers not received within {limits.header_timeout_s:g} s")
            return
        slow = elapsed > BODY_GRACE_S and self.bytes < limits.body_min_rate * elapsed
        if self.phase == "body" and (elapsed > limits.body_timeout_s or slow):
            self.protocol.refuse(408, f"request body too slow ({self.bytes} bytes in {elapsed:.1f} s)")
            return
        self.timer = self.protocol.loop.call_later(TICK_S, self.tick)

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class GuardedProtocol:
    """What a guarded protocol adds to uvicorn's: mixed in before it (``guarded``)."""

    limits: ConnectionLimits
    guard: Guard | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        if len(self.connections) > self.limits.max_connections:  # type: ignore[attr-defined]
            self.refuse(503, "too many connections")
            return
        self.guard = Guard(self, self.limits)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.guard is not None:
            self.guard.stop()
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        guard = self.guard
        if guard is None:
            return  # refused: what else arrives is not read
        if guard.phase == "idle" and not self.busy():
            guard.enter("headers")  # the first bytes of a new request on a kept-alive connection
        super().data_received(data)  # type: ignore[misc]
        if self.guard is not None and not self.guard.received(len(data), self.phase()):
            self.refuse(431, f"request headers over {self.limits.max_header_bytes} bytes")

    def handle_websocket_upgrade(self, *args: Any) -> None:
        """A WebSocket takes the connection over: the HTTP clocks stop (the stream has its own idle timeout)."""
        if self.guard is not None:
            self.guard.stop()
            self.guard = None
        super().handle_websocket_upgrade(*args)  # type: ignore[misc]

    def refuse(self, status: int, why: str) -> None:
        """Answer ``status`` (when no response has started) and close the connection."""
        transport: asyncio.Transport = self.transport  # type: ignore[attr-defined]
        if self.guard is not None:
            self.guard.stop()
            self.guard = None
        if transport.is_closing():
            return
        log.info("closing a connection from %s: %s", self.client, why)  # type: ignore[attr-defined]
        cycle = getattr(self, "cycle", None)
        if cycle is None or not cycle.response_started:
            body = why.encode()
            head = b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n" % (status, REASONS[status])
            transport.write(head + b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        transport.close()

    def busy(self) -> bool:
        """A request of this connection is with the app."""
        cycle = getattr(self, "cycle", None)
        return cycle is not None and not cycle.response_complete

    def phase(self) -> str:
        raise NotImplementedError


class GuardedHttpTools(GuardedProtocol, HttpToolsProtocol):
    def phase(self) -> str:
        return self._phase

    _phase = "headers"

    def on_message_begin(self) -> None:
        self._phase = "headers"
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._phase = "body"
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._phase = "idle"
        super().on_message_complete()


class GuardedH11(GuardedProtocol, H11Protocol):
    def phase(self) -> str:
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            return "body"
        if state is h11.IDLE and self.conn.trailing_data[0]:
            return "headers"  # part of a request's head has arrived
        return "idle" if state is not h11.IDLE or self.cycle is not None else "headers"


CLOSING = "fusionserve.closing"  # the scope's key of the event set when the server shuts down


class GracefulWebSockets(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, whose shutdown lets the app finish a stream: where the app watches
    the ``CLOSING`` event in its scope, shutdown sets it, and the app answers every frame it has
    received and then closes (1001) itself, within the graceful shutdown's time; uvicorn's own
    shutdown would close at once (1012), dropping those answers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.closing = asyncio.Event()
        self.app_finishes = False  # the app watches ``closing``

    async def run_asgi(self) -> None:
        self.scope[CLOSING] = self  # type: ignore[literal-required]
        await super().run_asgi()

    def shutdown(self) -> None:
        if self.app_finishes and self.handshake_complete and not self.close_sent:
            self.closing.set()
            return
        super().shutdown()


def guarded(base: type[asyncio.Protocol], limits: ConnectionLimits) -> type[asyncio.Protocol]:
    """uvicorn's protocol class ``base`` (httptools or h11) held to ``limits``."""
    guard = GuardedH11 if issubclass(base, H11Protocol) else GuardedHttpTools
    return type(guard.__name__, (guard,), {"limits": limits})


def limits_of(settings: Any) -> ConnectionLimits:
    """The connection limits of ``settings``, the connection cap kept below the process's file limit."""
    import resource

    files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    cap = settings.max_connections
    if files != resource.RLIM_INFINITY and cap > files - 64:
        log.warning(
            "MAX_CONNECTIONS=%d is over the %d open files this process may have; using %d", cap, files, files - 64
        )
        cap = max(1, files - 64)
    return ConnectionLimits(
        max_connections=cap,
        max_header_bytes=int(settings.max_header_kb * 1024),
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        body_min_rate=settings.body_min_kbps * 1024,
    )


def guard(config: Any, settings: Any) -> None:
    """Hold a loaded ``uvicorn.Config``'s connections to ``settings``' limits, and serve WebSockets with
    ``GracefulWebSockets``: messages of at most ``MAX_UPLOAD_MB`` (a larger one closes the stream,
    1009), none read ahead of the app (the socket is not read until the app takes the last message),
    and no compression (frames are JPEG or PNG already)."""
    config.http_protocol_class = guarded(config.http_protocol_class, limits_of(settings))
    config.ws_protocol_class = GracefulWebSockets
    config.ws_max_size = settings.max_upload_bytes
    config.ws_per_message_deflate = False
