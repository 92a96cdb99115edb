"""A front end's routes: its own for the classifying requests, the engine's for every other.

``FrontDoor`` is a front end's whole ASGI app. ``POST /predict``, ``POST /models/{name}/predict`` and
``POST /v2/models/{name}[/versions/{v}]/infer`` go to the front end's own FastAPI app (its decode
threads, its limits, the link to the engine); every other request is passed through, streamed both
ways, to the engine's HTTP server on its Unix socket, and every WebSocket (streams) is joined to one
opened on the engine. The engine answers those exactly as a one-process server would: its limits,
its key check, its error bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from websockets.asyncio.client import ClientConnection, unix_connect
from websockets.exceptions import ConnectionClosed

from app.api.connections import CLOSING

log = logging.getLogger(__name__)
HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"te", b"trailer", b"proxy-connection"}
WS_HEADERS = {b"authorization", b"x-api-key", b"origin", b"user-agent"}


def is_own(scope: Scope) -> bool:
    """Whether a front end serves this request itself: a POST to a classifying route."""
    if scope["method"] != "POST":
        return False
    parts = scope["path"].split("/")[1:]
    if parts == ["predict"] or (len(parts) == 3 and parts[0] == "models" and parts[2] == "predict"):
        return True
    if len(parts) >= 4 and parts[:2] == ["v2", "models"] and parts[-1] == "infer":
        return len(parts) == 4 or (len(parts) == 6 and parts[3] == "versions")
    return False


class EngineProxy:
    """Requests passed through to the engine's HTTP server at ``path`` (a Unix socket)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=path), base_url="http://engine", timeout=None
        )

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(k, v) for k, v in scope["headers"] if k not in HOP]
        has_body = any(k in (b"content-length", b"transfer-encoding") for k, _ in scope["headers"])
        target = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        body_read = asyncio.Event()
        content = _body(receive, body_read) if has_body else None
        if content is None:
            body_read.set()
        request = self.client.build_request(scope["method"], target.decode("latin-1"), headers=headers, content=content)
        sending = asyncio.ensure_future(self.client.send(request, stream=True))
        leaving = asyncio.ensure_future(_left(receive, body_read))
        try:
            await asyncio.wait((sending, leaving), return_when=asyncio.FIRST_COMPLETED)
        finally:
            leaving.cancel()
        if not sending.done():  # the client left first: closing the engine's connection tells the engine
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
            return
        try:
            response = sending.result()
        except OSError:  # the client left while its body was passed on: nobody to answer
            return
        except httpx.TransportError as exc:
            log.warning("the engine did not answer %s %s: %s", scope["method"], scope["path"], exc)
            body = b'{"error": {"code": "not_ready", "message": "the engine is not answering"}}'
            head = [(b"content-type", b"application/json"), (b"retry-after", b"1")]
            await send({"type": "http.response.start", "status": 503, "headers": head})
            await send({"type": "http.response.body", "body": body})
            return
        try:
            out = [(k, v) for k, v in response.headers.raw if k.lower() not in HOP]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        except httpx.TransportError as exc:  # the engine went away mid-answer: the answer is cut short
            log.warning("the engine stopped answering %s %s: %s", scope["method"], scope["path"], exc)
        finally:
            await response.aclose()

    async def websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Join the client's WebSocket to one on the engine: messages both ways, and the engine's close."""
        await receive()  # websocket.connect
        target = scope["path"] + ("?" + scope["query_string"].decode("latin-1") if scope.get("query_string") else "")
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k in WS_HEADERS]
        offered = scope.get("subprotocols") or None
        try:
            upstream = await unix_connect(
                self.path,
                uri=f"ws://engine{target}",
                additional_headers=headers,
                subprotocols=offered,
                compression=None,
                max_size=None,
                ping_interval=None,
            )
        except Exception as exc:  # the engine is stopping, say
            log.warning("could not open a stream on the engine: %s", exc)
            await send({"type": "websocket.close", "code": 1013, "reason": "the server is not ready"})
            return
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
        protocol = scope.get(CLOSING)
        if protocol is not None:
            protocol.app_finishes = True  # the engine ends the stream on shutdown (1001), after its answers
        up = asyncio.create_task(_client_to_engine(receive, upstream))
        try:
            await _engine_to_client(upstream, send)
        finally:
            up.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await up
            await upstream.close()

    async def close(self) -> None:
        await self.client.aclose()


async def _body(receive: Receive, read: asyncio.Event) -> AsyncIterator[bytes]:
    """The request's body as it arrives; ``read`` is set once it has all been passed on."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise OSError("the client left while sending its body")
        yield message.get("body", b"")
        if not message.get("more_body", False):
            read.set()
            return


async def _left(receive: Receive, body_read: asyncio.Event) -> None:
    """Returns once the client has gone, waiting first for its body to be read (nothing else arrives)."""
    await body_read.wait()
    while (await receive())["type"] != "http.disconnect":
        pass


async def _client_to_engine(receive: Receive, upstream: ClientConnection) -> None:
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            await upstream.close()
            return
        data = message.get("bytes")
        await upstream.send(data if data is not None else message.get("text", ""))


async def _engine_to_client(upstream: ClientConnection, send: Send) -> None:
    try:
        async for message in upstream:
            key = "bytes" if isinstance(message, bytes) else "text"
            await send({"type": "websocket.send", key: message})
    except ConnectionClosed:
        pass
    code, reason = upstream.close_code or 1000, upstream.close_reason or ""
    with contextlib.suppress(Exception):  # the client left first
        await send({"type": "websocket.close", "code": 1011 if code == 1006 else code, "reason": reason})


class FrontDoor:
    """A front end's ASGI app: ``own`` for the classifying routes, ``proxy`` for everything else.
    ``before_metrics`` runs before ``/metrics`` is passed through (the front end's observations sent first)."""

    def __init__(self, own: ASGIApp, proxy: EngineProxy, before_metrics: Callable[[], Awaitable[None]]) -> None:
        self.own, self.proxy, self.before_metrics = own, proxy, before_metrics
        self.tag = (b"fusionserve-frontend", str(os.getpid()).encode())  # which process answered (its pid)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            send = self._tagged(send)
        if kind == "lifespan" or (kind == "http" and is_own(scope)):
            await self.own(scope, receive, send)
        elif kind == "websocket":
            await self.proxy.websocket(scope, receive, send)
        else:
            if scope["path"] == "/metrics":
                with contextlib.suppress(Exception):
                    await self.before_metrics()
            await self.proxy.http(scope, receive, send)

    def _tagged(self, send: Send) -> Send:
        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.tag]}
            await send(message)

        return tagged
