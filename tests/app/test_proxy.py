"""A front end's pass-through to the engine (``app.api.proxy.EngineProxy``), against a real uvicorn on a
Unix socket: status, headers and body go through; a client that leaves closes the engine's request."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from app.api.proxy import EngineProxy

seen: dict[str, Any] = {}


async def engine(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The engine's stand-in: ``/echo`` answers 418 with the body it got; ``/slow`` waits for its client to go."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/slow":
        seen["waiting"] = True
        message = await receive()
        seen["slow"] = (message["type"], time.monotonic())
        return
    headers = [(b"x-echo", dict(scope["headers"]).get(b"x-in", b"")), (b"content-type", b"text/plain")]
    await send({"type": "http.response.start", "status": 418, "headers": headers})
    await send({"type": "http.response.body", "body": body + b"|" + scope["query_string"]})


@pytest.fixture
def socket_path(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "engine.sock")
    server = uvicorn.Server(uvicorn.Config(engine, uds=path, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield path
    server.should_exit = True
    thread.join(10)


def scope_of(path: str, query: bytes = b"", **headers: str) -> dict[str, Any]:
    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
    return {"type": "http", "method": "POST", "path": path, "query_string": query, "headers": raw}


def test_status_headers_and_body_pass_through(socket_path: str) -> None:
    sent: list[dict[str, Any]] = []
    parts = iter([{"type": "http.request", "body": b"ab", "more_body": True}, {"type": "http.request", "body": b"c"}])

    async def receive() -> dict[str, Any]:
        part = next(parts, None)
        if part is None:  # the body is read: as uvicorn, nothing more until the client goes
            await asyncio.Event().wait()
        return part  # type: ignore[return-value]

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def main() -> None:
        proxy = EngineProxy(socket_path)
        scope = scope_of("/echo", b"x=1", **{"x-in": "hello", "connection": "keep-alive", "content-length": "3"})
        await proxy.http(scope, receive, send)
        await proxy.close()

    asyncio.run(main())
    start, *body = sent
    assert start["status"] == 418
    assert (b"x-echo", b"hello") in start["headers"]
    assert b"".join(m.get("body", b"") for m in body) == b"abc|x=1"


def test_a_client_that_leaves_ends_the_engine_s_request(socket_path: str) -> None:
    seen.clear()
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": b"{}"}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.sleep(0.3)  # the client waits a while, then leaves
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def main() -> float:
        proxy = EngineProxy(socket_path)
        started = time.monotonic()
        await asyncio.wait_for(proxy.http(scope_of("/slow", **{"content-length": "2"}), receive, send), 10)
        await proxy.close()
        return started

    started = asyncio.run(main())
    deadline = time.monotonic() + 5
    while "slow" not in seen and time.monotonic() < deadline:
        time.sleep(0.02)
    assert seen.get("waiting") and seen["slow"][0] == "http.disconnect"
    assert seen["slow"][1] - started < 3  # told at once, not when the engine would have timed out
    assert sent == []  # nobody to answer
